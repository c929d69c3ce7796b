"""diffusion-accel: drop-in acceleration for diffusers Stable Diffusion pipelines.

    pipe = accel.accelerate(pipe, preset="fast")   # or an AccelConfig
    accel.restore(pipe)                             # bit-identical outputs again
"""

from .cache import BlockCacheConfig, DeepCacheConfig, EncoderPropagationConfig
from .api import accelerate, changes, from_pretrained, is_accelerated, resolve_config, restore
from .config import AccelConfig
from .errors import AlreadyAcceleratedError, NotAcceleratedError, UnsupportedPipelineError
from .presets import describe_presets, get_preset, preset_names
from .registry import Technique, register_technique
from .runtime import RuntimeConfig
from .sampler import SamplerConfig

__version__ = "0.1.0"

__all__ = [
    "AccelConfig",
    "AlreadyAcceleratedError",
    "BlockCacheConfig",
    "DeepCacheConfig",
    "EncoderPropagationConfig",
    "NotAcceleratedError",
    "RuntimeConfig",
    "SamplerConfig",
    "Technique",
    "UnsupportedPipelineError",
    "accelerate",
    "changes",
    "describe_presets",
    "from_pretrained",
    "get_preset",
    "is_accelerated",
    "preset_names",
    "register_technique",
    "resolve_config",
    "restore",
]
