"""Named presets: plain data, listed by `accel presets`.

Each is an `AccelConfig`; the README's preset table gives the speed and quality measured for each.
"""

from __future__ import annotations

from .config import AccelConfig
from .runtime import RuntimeConfig
from .sampler import SamplerConfig


def _presets() -> dict[str, tuple[str, AccelConfig]]:
    return {
        "quality": (
            "DPM-Solver++ 2M, 30 steps, SDPA attention",
            AccelConfig(sampler=SamplerConfig("dpmpp_2m", num_steps=30), runtime=RuntimeConfig(attention="sdpa")),
        ),
        "balanced": (
            "DPM-Solver++ 2M, 20 steps, CUDA graphs of the UNet step (eager on CPU)",
            AccelConfig(sampler=SamplerConfig("dpmpp_2m", num_steps=20), runtime=RuntimeConfig(attention="sdpa", cuda_graph=True)),
        ),
        "fast": (
            "DPM-Solver++ 2M on Karras sigmas, 12 steps, torch.compile + CUDA graphs of UNet, VAE decoder, text encoders",
            AccelConfig(
                sampler=SamplerConfig("dpmpp_2m", num_steps=12, schedule="karras"),
                runtime=RuntimeConfig(
                    attention="sdpa", compile="full", cuda_graph=True, components=("unet", "vae", "text_encoder")
                ),
            ),
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
