"""Named presets: plain data, listed by `accel presets`.

Each is an `AccelConfig`; the README's preset table gives the speed and quality measured for each. Pipelines
on a flow-matching schedule (SD3, Flux, Sana) get the same names without the sampler swap (the flow-matching samplers
are not yet measured on a trained flow model, so these keep the pipeline's own scheduler and steps): the runtime
alone, and for "fast" the block cache on top.

Every preset also goes by `NAME-fp8` / `NAME-int8`: the same config with the denoiser quantized
(`RuntimeConfig.quantize`; FP8 needs a GPU of compute capability 8.9 or newer, and is refused elsewhere). They are
not listed as presets of their own, so the plain names stay one reproducible config on every GPU.
"""

from __future__ import annotations

from dataclasses import replace

from .cache import BlockCacheConfig
from .config import AccelConfig
from .pipelines import flow_matching
from .runtime import RuntimeConfig
from .runtime.quantize import FORMATS
from .sampler import SamplerConfig

# Fastest runtime measured on the H100 (benchmarks/results/sd15-layout.md); graphs fall back to eager on CPU.
_COMPILED = RuntimeConfig(
    attention="sdpa", channels_last=True, compile="full", cuda_graph=True, components=("denoiser", "vae", "text_encoder")
)


def _presets(flow: bool = False) -> dict[str, tuple[str, AccelConfig]]:
    if flow:
        return {
            "quality": ("the pipeline's own flow-matching scheduler and steps, SDPA attention",
                        AccelConfig(runtime=RuntimeConfig(attention="sdpa"))),
            "balanced": ("the pipeline's own scheduler and steps, compiled runtime (torch.compile, CUDA graphs of "
                         "every component)", AccelConfig(runtime=_COMPILED)),
            "fast": ("the pipeline's own scheduler and steps, compiled runtime, block cache (threshold 0.1)",
                     AccelConfig(cache=BlockCacheConfig(threshold=0.1), runtime=_COMPILED)),
        }
    return {
        "quality": (
            "DPM-Solver++ 2M, 30 steps, SDPA attention",
            AccelConfig(sampler=SamplerConfig("dpmpp_2m", num_steps=30), runtime=RuntimeConfig(attention="sdpa")),
        ),
        "balanced": (
            "DPM-Solver++ 2M, 20 steps, compiled runtime (channels-last, torch.compile, CUDA graphs of every component)",
            AccelConfig(sampler=SamplerConfig("dpmpp_2m", num_steps=20), runtime=_COMPILED),
        ),
        "fast": (
            "DPM-Solver++ 2M on Karras sigmas, 12 steps, compiled runtime",
            AccelConfig(sampler=SamplerConfig("dpmpp_2m", num_steps=12, schedule="karras"), runtime=_COMPILED),
        ),
    }


def preset_names() -> tuple[str, ...]:
    return tuple(_presets())


def describe_presets(pipe=None) -> list[tuple[str, str, AccelConfig]]:
    """(name, description, config) of every preset, as it applies to `pipe` (None: UNet pipelines)."""
    return [(name, text, config) for name, (text, config) in _presets(_is_flow(pipe)).items()]


def get_preset(name: str, pipe=None) -> AccelConfig:
    """The preset `name` for `pipe`'s family (None: UNet and other betas-schedule pipelines); `NAME-fp8` or
    `NAME-int8` is preset NAME with its denoiser quantized."""
    presets = _presets(_is_flow(pipe))
    base, quantize = _quantized(name)
    if base not in presets:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(presets)}, each also as NAME-fp8 or "
                         f"NAME-int8 (quantized denoiser)")
    config = presets[base][1]
    return config if quantize is None else config.replace(runtime=replace(config.runtime, quantize=quantize))


def _quantized(name: str) -> tuple[str, str | None]:
    """("fast", "fp8") for "fast-fp8"; (name, None) for a name without a quantization suffix."""
    for quantize in FORMATS:
        if name.endswith(f"-{quantize}"):
            return name[: -len(quantize) - 1], quantize
    return name, None


def _is_flow(pipe) -> bool:
    return pipe is not None and flow_matching(pipe)
