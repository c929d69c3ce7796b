"""Named presets: plain data, listed by `accel presets`.

Each is an `AccelConfig`; the README's preset table gives the speed and quality measured for each.
"""

from __future__ import annotations

from .config import AccelConfig
from .runtime import RuntimeConfig
from .sampler import SamplerConfig


# Fastest runtime measured on the H100 (benchmarks/results/sd15-layout.md); graphs fall back to eager on CPU.
_COMPILED = RuntimeConfig(
    attention="sdpa", channels_last=True, compile="full", cuda_graph=True, components=("unet", "vae", "text_encoder")
)


def _presets() -> dict[str, tuple[str, AccelConfig]]:
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


def describe_presets() -> list[tuple[str, str, AccelConfig]]:
    return [(name, text, config) for name, (text, config) in _presets().items()]


def get_preset(name: str) -> AccelConfig:
    presets = _presets()
    if name not in presets:
        raise ValueError(f"unknown preset {name!r}; valid presets: {', '.join(presets)}")
    return presets[name][1]
