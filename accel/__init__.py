"""diffusion-accel: drop-in acceleration for diffusers Stable Diffusion pipelines.

    pipe = accel.accelerate(pipe, preset="fast")   # or an AccelConfig
    accel.restore(pipe)                             # bit-identical outputs again

Names load on first use (PEP 562), so `import accel.embedded` or the CLI's plain generation
does not pay for the hook, compile and cache machinery.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "accelerate": "api",
    "changes": "api",
    "from_pretrained": "api",
    "is_accelerated": "api",
    "resolve_config": "api",
    "restore": "api",
    "AccelConfig": "config",
    "AlreadyAcceleratedError": "errors",
    "NotAcceleratedError": "errors",
    "UnsupportedPipelineError": "errors",
    "UnsupportedDeviceError": "errors",
    "describe_presets": "presets",
    "get_preset": "presets",
    "preset_names": "presets",
    "Technique": "registry",
    "register_technique": "registry",
    "RuntimeConfig": "runtime",
    "set_lora_scale": "runtime",
    "swap_lora": "runtime",
    "SamplerConfig": "sampler",
    "UNetSwapConfig": "model_swap",
    "LCMLoRAConfig": "lcm",
    "BlockCacheConfig": "cache",
    "DeepCacheConfig": "cache",
    "EncoderPropagationConfig": "cache",
    "PatchParallelConfig": "parallel",
    "ContextParallelConfig": "parallel",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'accel' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
