"""DeepCache: reuse the UNet's deep features across adjacent denoising steps (Ma et al., CVPR 2024).

On a full step the whole UNet runs and the outputs of its deep modules are kept; on the cached
steps between, only the shallow branch runs - `conv_in`, the down-side layers that produce skips
0..`cache_branch` and the up-side layers that read them - while the deep modules return the kept
outputs. Branch 0 is the shallowest (only `conv_in` and the last up layer compute), as in the
paper's code. The layout is read from the UNet's blocks, so SD1.x/2.x, SDXL and pruned UNets work.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UnsupportedPipelineError
from ..session import technique_functions
from ._reuse import FeatureCache, skip_layout

NAME = "deepcache"
HOOK_NAME = f"accel.{NAME}"


@dataclass(frozen=True)
class DeepCacheConfig:
    """cache_interval: one full step every `cache_interval` steps (1 means no caching).
    cache_branch: skip connection through which the shallow branch runs, 0 (shallowest, fastest)
        up to the UNet's number of skips minus 1 (only the mid block cached).
    uniform: full steps evenly spaced; False places them densest around `center` (a fraction of the
        steps), spreading with `power`, the paper's non-uniform 1:N strategy.
    """

    cache_interval: int = 3
    cache_branch: int = 0
    uniform: bool = True
    center: float = 0.3
    power: float = 1.4

    def __post_init__(self):
        if not isinstance(self.cache_interval, int) or isinstance(self.cache_interval, bool) or self.cache_interval < 1:
            raise ValueError(f"DeepCacheConfig.cache_interval={self.cache_interval!r} is not supported; valid: an int >= 1")
        if not isinstance(self.cache_branch, int) or isinstance(self.cache_branch, bool) or self.cache_branch < 0:
            raise ValueError(f"DeepCacheConfig.cache_branch={self.cache_branch!r} is not supported; valid: an int >= 0 "
                             "(the skip connection index, 0 = shallowest)")
        if not isinstance(self.uniform, bool):
            raise ValueError(f"DeepCacheConfig.uniform={self.uniform!r} is not supported; valid choices: True, False")
        if not 0.0 <= self.center <= 1.0:
            raise ValueError(f"DeepCacheConfig.center={self.center!r} is not supported; valid: a fraction in [0, 1]")
        if not self.power > 1.0:
            raise ValueError(f"DeepCacheConfig.power={self.power!r} is not supported; valid: a number > 1")


def full_steps(num_steps: int, config: DeepCacheConfig) -> frozenset[int]:
    """The step indices (0-based) on which the whole UNet runs; step 0 always does."""
    interval = config.cache_interval
    if interval == 1 or num_steps <= 2:
        return frozenset(range(num_steps))
    if config.uniform:
        return frozenset(range(0, num_steps, interval))
    count = math.ceil(num_steps / interval)
    center, power = config.center * (num_steps - 1), config.power
    while power > 1.0:
        # Evenly spaced in |i - center|^(1/power): denser near the centre, the paper's quadratic-centre schedule.
        low, high = -(center ** (1 / power)), (num_steps - 1 - center) ** (1 / power)
        xs = [low + (high - low) * k / (count - 1) for k in range(count)] if count > 1 else [low]
        steps = {0} | {min(num_steps - 1, max(0, round(center + math.copysign(abs(x) ** power, x)))) for x in xs}
        if len(steps) == count:
            return frozenset(steps)
        power -= 0.02
    return frozenset(range(0, num_steps, interval))


def deep_modules(unet, cache_branch: int) -> list:
    """The modules skipped on cached steps: whole blocks where every layer is deep, else single layers."""
    layout = skip_layout(unet)
    has_mid = getattr(unet, "mid_block", None) is not None
    deepest = layout.num_skips - (1 if has_mid else 2)
    if cache_branch > deepest:
        raise ValueError(
            f"DeepCacheConfig.cache_branch={cache_branch} is deeper than this UNet: it has {layout.num_skips} skip "
            f"connections{'' if has_mid else ' and no mid block'}; valid cache_branch: 0..{deepest}"
        )
    modules = []
    for block, produced in layout.down_blocks:
        if produced and all(k > cache_branch for k in produced):
            modules.append(block)
        else:
            modules += [m for k in produced if k > cache_branch for m in layout.down[k - 1]]
    if has_mid:
        modules.append(unet.mid_block)
    for block, consumed, _ in layout.up_blocks:
        if all(k > cache_branch for k in consumed):
            modules.append(block)
        else:
            modules += [m for k in consumed if k > cache_branch for m in layout.up[k]]
    return modules


def build(pipe, config: DeepCacheConfig, session) -> FeatureCache:
    """The applied DeepCache: reuse hooks on the deep modules, full steps from `full_steps`."""
    if not hasattr(pipe.unet, "down_blocks") or not hasattr(pipe.unet, "up_blocks"):
        raise UnsupportedPipelineError(f"DeepCache needs a UNet with down and up blocks, got {type(pipe.unet).__name__}")
    modules = deep_modules(pipe.unet, config.cache_branch)
    return FeatureCache(pipe, session, NAME, modules, lambda num_steps: full_steps(num_steps, config))


# Without AccelConfig, on an accelerated pipeline; `get_deepcache(pipe).state` counts full and cached calls.
apply_deepcache, remove_deepcache, get_deepcache = technique_functions(NAME, build)
