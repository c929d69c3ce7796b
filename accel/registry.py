"""The technique registry: config type -> how to apply and remove it.

Adding a technique is one file holding its frozen config, its hooks and `apply_x` / `remove_x`,
plus one entry in `_TECHNIQUES` below.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class Technique:
    name: str
    slot: str
    config_type: type
    apply: Callable  # apply(pipe, config) -> None; raises before changing anything on bad input
    remove: Callable  # remove(pipe) -> None; undoes apply exactly
    order: int  # applied in ascending order, removed in descending order
    # The denoisers it works on: "unet" (a UNet2DConditionModel `.unet`), "transformer" (a DiT `.transformer`).
    denoisers: tuple[str, ...] = ("unet",)
    check: Callable | None = None  # check(pipe) -> None; raises UnsupportedPipelineError before anything is applied


def _check_betas_schedule(pipe) -> None:
    """The samplers run on a discrete noise schedule given by betas (SD, SDXL, PixArt), not on flow matching."""
    from .errors import UnsupportedPipelineError

    scheduler = getattr(pipe, "scheduler", None)
    if "beta_schedule" not in (getattr(scheduler, "config", None) or {}):
        raise UnsupportedPipelineError(
            f"SamplerConfig needs a scheduler with a betas noise schedule (DDIM, PNDM, Euler, DPM-Solver: SD, SDXL, "
            f"PixArt); {type(pipe).__name__} uses {type(scheduler).__name__}, which has none (flow matching)")


def _builtin_techniques() -> list[Technique]:
    from . import cache
    from .lcm import LCMLoRAConfig, apply_lcm_lora, remove_lcm_lora
    from .model_swap import UNetSwapConfig, apply_unet_swap, remove_unet_swap
    from .parallel.patch import PatchParallelConfig, apply_patch_parallel, remove_patch_parallel
    from .runtime import RuntimeConfig, apply_runtime, remove_runtime
    from .sampler import SamplerConfig, apply_sampler, remove_sampler

    return [
        Technique("lcm_lora", "model", LCMLoRAConfig, apply_lcm_lora, remove_lcm_lora, order=10),
        Technique("unet_swap", "model", UNetSwapConfig, apply_unet_swap, remove_unet_swap, order=5),
        Technique("sampler", "sampler", SamplerConfig, apply_sampler, remove_sampler, order=20,
                  denoisers=("unet", "transformer"), check=_check_betas_schedule),
        Technique("deepcache", "cache", cache.DeepCacheConfig, cache.apply_deepcache, cache.remove_deepcache, order=50),
        Technique("encoder_propagation", "cache", cache.EncoderPropagationConfig, cache.apply_encoder_propagation,
                  cache.remove_encoder_propagation, order=50),
        Technique("block_cache", "cache", cache.BlockCacheConfig, cache.apply_block_cache, cache.remove_block_cache,
                  order=50, denoisers=("unet", "transformer")),
        Technique("patch_parallel", "parallel", PatchParallelConfig, apply_patch_parallel, remove_patch_parallel,
                  order=70),
        Technique("runtime", "runtime", RuntimeConfig, apply_runtime, remove_runtime, order=90),
    ]


_TECHNIQUES: dict[type, Technique] | None = None


def _registry() -> dict[type, Technique]:
    global _TECHNIQUES
    if _TECHNIQUES is None:
        _TECHNIQUES = {t.config_type: t for t in _builtin_techniques()}
    return _TECHNIQUES


def register_technique(technique: Technique) -> None:
    """Register a technique from outside the suite (a plug-in)."""
    from .config import SLOTS

    if technique.slot not in SLOTS:
        raise ValueError(f"slot {technique.slot!r} is not one of {SLOTS}")
    registry = _registry()
    if technique.config_type in registry:
        raise ValueError(f"{technique.config_type.__name__} is already registered as {registry[technique.config_type].name!r}")
    registry[technique.config_type] = technique


def technique_for(config) -> Technique:
    try:
        return _registry()[type(config)]
    except KeyError:
        known = ", ".join(cls.__name__ for cls in _registry())
        raise ValueError(f"no technique is registered for {type(config).__name__}; registered configs: {known}") from None


def techniques_for_slot(slot: str) -> tuple[type, ...]:
    return tuple(cls for cls, t in _registry().items() if t.slot == slot)


def all_techniques() -> list[Technique]:
    return sorted(_registry().values(), key=lambda t: t.order)
