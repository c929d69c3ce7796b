"""The technique registry: config type -> how to apply it, and which techniques cannot run together.

Adding a technique is one file holding its frozen config, its state object (with `remove()`) and its hooks,
one `Technique` entry in `_builtin_techniques` below, and, if it cannot run beside another technique, one
`Conflict` row. `accelerate` checks the whole plan before applying anything, applies in `order`, keeps each
state on the session under the technique's name, and `restore` removes them in reverse order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .errors import UnsupportedPipelineError

# AccelConfig's slots, in the order they are applied.
SLOTS = ("model", "sampler", "cache", "parallel", "runtime")


@dataclass(frozen=True)
class Technique:
    name: str
    slot: str
    config_type: type
    build: Callable  # build(pipe, config, session) -> state whose remove() undoes it exactly; raises before changing anything on bad input
    order: int  # applied in ascending order, removed in descending order
    # The denoisers it works on: "unet" (a UNet2DConditionModel `.unet`), "transformer" (a DiT `.transformer`).
    denoisers: tuple[str, ...] = ("unet",)
    check: Callable | None = None  # check(pipe) -> None; raises UnsupportedPipelineError before anything is applied


@dataclass(frozen=True)
class Conflict:
    """`first` with a config for which `when_first` holds cannot run beside `second` when `when_second` holds."""

    first: str
    second: str
    when_first: Callable
    when_second: Callable
    error: type
    message: str  # formatted with first=..., second=... (the two configs)


def _check_sampler_schedule(pipe) -> None:
    """The samplers run on a discrete noise schedule given by betas (SD, SDXL, PixArt) or on a flow-matching one
    (SD3, Flux, Sana); which samplers run on the latter, `samplers.make_scheduler` checks when it is applied."""
    from samplers import is_flow_config

    scheduler = getattr(pipe, "scheduler", None)
    config = getattr(scheduler, "config", None) or {}
    if "beta_schedule" not in config and not is_flow_config(config):
        raise UnsupportedPipelineError(
            f"SamplerConfig needs a scheduler with a betas noise schedule (DDIM, PNDM, Euler, DPM-Solver: SD, SDXL, "
            f"PixArt) or a flow-matching one (FlowMatch Euler / Heun, DPM-Solver or UniPC with use_flow_sigmas: SD3, "
            f"Flux, Sana); {type(pipe).__name__} uses {type(scheduler).__name__}, which has neither")


def _builtin_techniques() -> list[Technique]:
    from . import cache
    from .lcm import LCMLoRA, LCMLoRAConfig
    from .model_swap import UNetSwap, UNetSwapConfig
    from .parallel.context import ContextParallel, ContextParallelConfig
    from .parallel.patch import PatchParallel, PatchParallelConfig
    from .runtime import Runtime, RuntimeConfig
    from .sampler import SamplerConfig, SamplerSwap

    return [
        Technique("lcm_lora", "model", LCMLoRAConfig, LCMLoRA, order=10),
        Technique("unet_swap", "model", UNetSwapConfig, UNetSwap, order=5),
        Technique("sampler", "sampler", SamplerConfig, SamplerSwap, order=20,
                  denoisers=("unet", "transformer"), check=_check_sampler_schedule),
        Technique(cache.deepcache.NAME, "cache", cache.DeepCacheConfig, cache.deepcache.build, order=50),
        Technique(cache.faster_diffusion.NAME, "cache", cache.EncoderPropagationConfig, cache.faster_diffusion.EncoderPropagation,
                  order=50),
        Technique(cache.block_cache.NAME, "cache", cache.BlockCacheConfig, cache.block_cache.BlockCache, order=50,
                  denoisers=("unet", "transformer")),
        Technique("patch_parallel", "parallel", PatchParallelConfig, PatchParallel, order=70,
                  denoisers=("unet", "transformer")),
        Technique("context_parallel", "parallel", ContextParallelConfig, ContextParallel, order=70,
                  denoisers=("transformer",)),
        Technique("runtime", "runtime", RuntimeConfig, Runtime, order=90, denoisers=("unet", "transformer")),
    ]


def _builtin_conflicts() -> list[Conflict]:
    from .parallel import context
    from .parallel.patch import COMPILE_REFUSED, world_size

    return [
        Conflict("lcm_lora", "sampler", lambda lcm: True, lambda sampler: True, ValueError,
                 "LCMLoRAConfig sets the sampler (LCM, num_steps) itself; leave AccelConfig.sampler as None "
                 "(got {second!r})"),
        Conflict("encoder_propagation", "runtime", lambda encoder: encoder.parallel_decode,
                 lambda runtime: runtime.cuda_graph or runtime.compile == "full", ValueError,
                 "EncoderPropagationConfig(parallel_decode=True) changes the decoder's batch size from key step to key "
                 "step and cannot run inside CUDA graphs or a fully compiled UNet; use it with "
                 "RuntimeConfig(cuda_graph=False, compile=None or 'regional'), or parallel_decode=False"),
        Conflict("patch_parallel", "runtime", lambda patch: world_size(patch) > 1,
                 lambda runtime: runtime.compile is not None and runtime.covers_denoiser,
                 UnsupportedPipelineError, COMPILE_REFUSED),
        # An adaptive block cache decides from each rank's part of the sequence: ranks could disagree, and the one
        # that runs the blocks would wait forever in the attention exchange for the one that skipped them.
        Conflict("block_cache", "context_parallel", lambda cache: cache.threshold is not None,
                 lambda cp: context.world_size(cp) > 1, ValueError,
                 "BlockCacheConfig(threshold={first.threshold!r}) decides from the features it sees, and under context "
                 "parallelism each process sees only its part of the sequence, so processes could take different "
                 "decisions and deadlock in the attention exchange; use a fixed schedule (BlockCacheConfig("
                 "threshold=None, cache_interval=N)), the same on every process"),
    ]


_TECHNIQUES: dict[type, Technique] | None = None
_CONFLICTS: list[Conflict] | None = None


def _registry() -> dict[type, Technique]:
    global _TECHNIQUES
    if _TECHNIQUES is None:
        _TECHNIQUES = {t.config_type: t for t in _builtin_techniques()}
    return _TECHNIQUES


def register_technique(technique: Technique, conflicts: tuple[Conflict, ...] = ()) -> None:
    """Register a technique from outside the suite (a plug-in), with the techniques it cannot run beside."""
    if technique.slot not in SLOTS:
        raise ValueError(f"slot {technique.slot!r} is not one of {SLOTS}")
    registry = _registry()
    if technique.config_type in registry:
        raise ValueError(f"{technique.config_type.__name__} is already registered as {registry[technique.config_type].name!r}")
    registry[technique.config_type] = technique
    all_conflicts().extend(conflicts)


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


def all_conflicts() -> list[Conflict]:
    global _CONFLICTS
    if _CONFLICTS is None:
        _CONFLICTS = _builtin_conflicts()
    return _CONFLICTS


def check_conflicts(plan: list[tuple[Technique, object]]) -> None:
    """Raise the first conflict between two configs of the plan, before anything is applied."""
    configs = {technique.name: config for technique, config in plan}
    for conflict in all_conflicts():
        first, second = configs.get(conflict.first), configs.get(conflict.second)
        if first is not None and second is not None and conflict.when_first(first) and conflict.when_second(second):
            raise conflict.error(conflict.message.format(first=first, second=second))
