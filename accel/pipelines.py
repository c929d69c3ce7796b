"""What a pipeline is, as the techniques need to know it: its denoiser (a UNet or a DiT transformer) and its family."""

from __future__ import annotations

import torch

DENOISERS = {"unet": "a UNet2DConditionModel `.unet`", "transformer": "a DiT `.transformer` with `transformer_blocks`"}


def denoiser_kind(pipe) -> str | None:
    """"unet", "transformer" (a DiT whose blocks are the ModuleList `transformer_blocks`), or None."""
    from diffusers import UNet2DConditionModel

    if isinstance(getattr(pipe, "unet", None), UNet2DConditionModel):
        return "unet"
    transformer = getattr(pipe, "transformer", None)
    if isinstance(transformer, torch.nn.Module) and isinstance(getattr(transformer, "transformer_blocks", None), torch.nn.ModuleList):
        return "transformer"
    return None


def denoiser(pipe) -> torch.nn.Module:
    """The module the pipeline calls once (or twice, cond / uncond) per step: `.unet` or `.transformer`."""
    kind = denoiser_kind(pipe)
    if kind is None:
        raise TypeError(f"{type(pipe).__name__} has no denoiser this suite knows ({', '.join(DENOISERS.values())})")
    return getattr(pipe, kind)


def flow_matching(pipe) -> bool:
    """Whether the pipeline's scheduler is a flow-matching one (SD3, Flux, Sana) rather than a betas schedule: a
    scheduler without betas (FlowMatch Euler / Heun), or DPM-Solver / UniPC on flow sigmas, which keep a betas field
    they do not use (Sana's published scheduler: DPM-Solver++ with `use_flow_sigmas`)."""
    from samplers import is_flow_config

    config = getattr(getattr(pipe, "scheduler", None), "config", None) or {}
    return "beta_schedule" not in config or is_flow_config(config)
