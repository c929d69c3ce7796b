"""Named presets: plain data, listed by `accel presets`.

Each is an `AccelConfig`; the README's preset table gives the speed and quality measured for each. Pipelines
on a flow-matching schedule (SD3, Flux, Sana) get the same names without the sampler swap (the flow-matching samplers
are not yet measured on a trained flow model, so these keep the pipeline's own scheduler and steps), on the DiT
runtime (issue 23: the fastest-compiling setup whose steady state is within 5% of the fastest measured): SDPA, fused
QKV, regional compilation and CUDA graphs of the transformer; "fast" adds the block cache on a fixed schedule (on the
transformers whose blocks it knows: PixArt, SD3, Flux, Sana).

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

# Fastest runtime measured on the H100 (benchmarks/results/sd15-layout.md); graphs fall back to eager on CPU. The text
# encoders are CUDA-graphed, not compiled (issue 23's 5% rule): on the H200, SD1.5 `balanced` compiling UNet and VAE
# decoder alone reached 142.1 ms per image after a 61.2 s first call, compiling all three 141.9 ms after 68.5 s
# (benchmarks/results/runtime/cold-start/; two runs, one day apart, the same GPU model). Inductor's pattern rewrites
# and its choice among several launch configurations of each pointwise kernel cost compile time and bought nothing
# here (the preset's attention calls SDPA itself): without them the cold compile took 58.3 s against 91.7 s, at
# 142.4 against 146.9 ms per image (H200, one run, each a fresh process on an empty cache;
# benchmarks/results/runtime/compile-time.md). Leaving the decoder eager saved more but cost 10.8% per image.
_LEAN_COMPILE = {"pattern_matcher": False, "triton.autotune_pointwise": False}
_COMPILED = RuntimeConfig(
    attention="sdpa", channels_last=True, compile="full", cuda_graph=True, components=("denoiser", "vae", "text_encoder"),
    compile_components=("denoiser", "vae"), compile_options=_LEAN_COMPILE,
)
# The DiT runtime: FLUX.1-dev architecture on the H200, 1.31x over stock after an 8.5 s regional compile, where the
# full compile takes about 2 minutes (benchmarks/results/flux-runtime/; benchmarks/run_dit_runtime.sh compares their
# steady states, the 5% rule). The transformer only: it runs every step, and regional compilation finds no repeated
# block in Sana's DC-AE and Gemma-2 encoder, which it refuses.
_DIT_RUNTIME = RuntimeConfig(attention="sdpa", fuse_qkv=True, compile="regional", cuda_graph=True)
# A full step every 3 after 2 warm-up steps, the first block only, TaylorSeer's first-order forecast: on the trained
# embedded DiT 41.42 dB to uncached at 1.94x, where the adaptive threshold 0.1 gave 37.49 dB at 1.52x
# (benchmarks/results/dit-cache-quality/); a fixed schedule also captures one CUDA graph per kind of step.
_DIT_CACHE = BlockCacheConfig(threshold=None, cache_interval=3, warmup_steps=2, first_blocks=1, taylor_order=1)


def _presets(flow: bool = False) -> dict[str, tuple[str, AccelConfig]]:
    if flow:
        runtime = ("SDPA, fused QKV, regional torch.compile and CUDA graphs of the transformer (VAE and text encoders "
                   "eager)")
        return {
            "quality": ("the pipeline's own flow-matching scheduler and steps, SDPA attention",
                        AccelConfig(runtime=RuntimeConfig(attention="sdpa"))),
            "balanced": (f"the pipeline's own scheduler and steps, {runtime}", AccelConfig(runtime=_DIT_RUNTIME)),
            "fast": ("balanced + block cache on a fixed schedule (a full step every 3 after 2, first block, "
                     "TaylorSeer order 1)", AccelConfig(cache=_DIT_CACHE, runtime=_DIT_RUNTIME)),
        }
    return {
        "quality": (
            "DPM-Solver++ 2M, 30 steps, SDPA attention",
            AccelConfig(sampler=SamplerConfig("dpmpp_2m", num_steps=30), runtime=RuntimeConfig(attention="sdpa")),
        ),
        "balanced": (
            "DPM-Solver++ 2M, 20 steps, compiled runtime (channels-last, torch.compile of UNet and VAE decoder, CUDA "
            "graphs of every component)",
            AccelConfig(sampler=SamplerConfig("dpmpp_2m", num_steps=20), runtime=_COMPILED),
        ),
        "fast": (
            "DPM-Solver++ 2M on Karras sigmas, 12 steps, compiled runtime",
            AccelConfig(sampler=SamplerConfig("dpmpp_2m", num_steps=12, schedule="karras"), runtime=_COMPILED),
        ),
    }


def preset_names() -> tuple[str, ...]:
    return tuple(_presets())


def describe_presets(pipe=None, *, flow: bool | None = None) -> list[tuple[str, str, AccelConfig]]:
    """(name, description, config) of every preset, as it applies to `pipe` (None: UNet pipelines), or to the
    flow-matching family (SD3, Flux, Sana) where `flow` is True."""
    flow = _is_flow(pipe) if flow is None else flow
    return [(name, text, config) for name, (text, config) in _presets(flow).items()]


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
