"""Feature caching and step skipping, as reversible hooks (UNet pipelines; the block cache on DiTs too).

- `DeepCacheConfig`: reuse the deep branch across steps, recompute the shallow one (DeepCache).
- `EncoderPropagationConfig`: skip the encoder at non-key steps, reuse its features (Faster Diffusion).
- `BlockCacheConfig`: skip the rest of the UNet (or DiT: PixArt, SD3, Flux) when the first block's
  output barely moved (First-Block Cache); on DiTs with DBCache's first / last blocks; re-adding the
  kept residual or forecasting it (TaylorSeer); or on a fixed schedule.

Each is a config for the `cache` slot of `AccelConfig`; they compose with the compiled runtime's
CUDA graphs: DeepCache, encoder propagation and the block cache's fixed schedule tag every call as a
full or a cached one before the graph hook sees it; the block cache's threshold is captured as
CUDA-graph conditional nodes. Each warns once per pipeline call when the sampler adds fresh noise at
every step (`_noise_guard`).
"""

from .block_cache import BlockCacheConfig, apply_block_cache, get_block_cache, remove_block_cache
from .deepcache import DeepCacheConfig, apply_deepcache, full_steps, get_deepcache, remove_deepcache
from .faster_diffusion import (
    EncoderPropagationConfig,
    apply_encoder_propagation,
    get_encoder_propagation,
    key_steps,
    remove_encoder_propagation,
)

__all__ = [
    "DeepCacheConfig", "apply_deepcache", "remove_deepcache", "get_deepcache", "full_steps",
    "EncoderPropagationConfig", "apply_encoder_propagation", "remove_encoder_propagation", "get_encoder_propagation",
    "key_steps", "BlockCacheConfig", "apply_block_cache", "remove_block_cache", "get_block_cache",
]

