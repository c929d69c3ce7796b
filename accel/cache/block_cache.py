"""Adaptive first-block cache for UNets (after ParaAttention's First-Block Cache and TeaCache, 2024).

Every call runs `conv_in` and the first down block. When the first block's output moved less than
`threshold` (relative L1) since the last fully computed step, the rest of the UNet is skipped: the
last up block returns the current `conv_in` output plus the residual (last up block output minus
`conv_in` output) kept from that step, and only the output head runs.

The decision reads a tensor value, so it costs one host synchronisation per step and cannot be
taken inside a captured CUDA graph: combining it with `RuntimeConfig(cuda_graph=True)` is refused
(use DeepCache there, whose decision comes from the step index).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..errors import UnsupportedPipelineError
from ..runtime.cuda_graph import get_cuda_graph_hook
from ..session import get_session
from ._reuse import CACHED, FULL, MAX_CALLS_PER_STEP, OFF, FeatureCacheState, ReuseHook

HOOK_NAME = "accel.block_cache"
_STATE = "_accel_block_cache"


@dataclass(frozen=True)
class BlockCacheConfig:
    """threshold: skip the rest of the UNet while the first block's output changed by less than this
        (mean |new - old| / mean |old|, against the last fully computed step). 0 never skips.
    warmup_steps: the first steps always run fully.
    max_consecutive_cached: at most this many cached steps in a row (None: no limit).
    """

    threshold: float = 0.1
    warmup_steps: int = 1
    max_consecutive_cached: int | None = None

    def __post_init__(self):
        if not isinstance(self.threshold, (int, float)) or isinstance(self.threshold, bool) or not self.threshold >= 0:
            raise ValueError(f"BlockCacheConfig.threshold={self.threshold!r} is not supported; valid: a number >= 0")
        if not isinstance(self.warmup_steps, int) or isinstance(self.warmup_steps, bool) or self.warmup_steps < 1:
            raise ValueError(f"BlockCacheConfig.warmup_steps={self.warmup_steps!r} is not supported; valid: an int >= 1")
        limit = self.max_consecutive_cached
        if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 1):
            raise ValueError(f"BlockCacheConfig.max_consecutive_cached={limit!r} is not supported; valid: None or an int >= 1")


class _Probe:
    """Per-slot memory of the last fully computed step."""

    def __init__(self):
        self.first = None  # first block output
        self.residual = None  # last up block output minus conv_in output
        self.consecutive = 0


class _CaptureInput(ModelHook):
    def __init__(self, cache: "BlockCache"):
        super().__init__()
        self.cache = cache

    def post_forward(self, module, output):
        self.cache.stem = output
        return output


class _FirstBlock(ModelHook):
    """Runs the first block, then decides whether the rest of this call is cached."""

    def __init__(self, cache: "BlockCache"):
        super().__init__()
        self.cache = cache

    def post_forward(self, module, output):
        self.cache.decide(output[0] if isinstance(output, (tuple, list)) else output)
        return output


class _LastBlock(ModelHook):
    """Cached: current stem plus the kept residual. Full: compute and keep the residual."""

    def __init__(self, cache: "BlockCache"):
        super().__init__()
        self.cache = cache

    def new_forward(self, module, *args, **kwargs):
        cache = self.cache
        probe = cache.probe
        if cache.state.mode == CACHED:
            return cache.stem + probe.residual
        output = self.fn_ref.original_forward(*args, **kwargs)
        if cache.state.mode == FULL:
            probe.residual = output - cache.stem
        return output


class BlockCache:
    def __init__(self, pipe, config: BlockCacheConfig):
        unet = pipe.unet
        self.session = get_session(pipe)
        if self.session is None:
            raise RuntimeError("the block cache needs the step index of an accelerated pipeline; use accel.accelerate")
        if getattr(self.session.config.runtime, "cuda_graph", False) or get_cuda_graph_hook(pipe.unet) is not None:
            raise ValueError("BlockCacheConfig decides from tensor values and cannot run inside CUDA graphs; "
                             "use it with RuntimeConfig(cuda_graph=False), or use DeepCacheConfig with graphs")
        down, up = list(getattr(unet, "down_blocks", [])), list(getattr(unet, "up_blocks", []))
        if len(down) < 2 or not up or getattr(unet, "conv_in", None) is None:
            raise UnsupportedPipelineError(f"the block cache needs a UNet with at least two down blocks, got {type(unet).__name__}")
        self.unet, self.config = unet, config
        self.state = FeatureCacheState()
        self.probes: dict[int, _Probe] = {}
        self.probe: _Probe | None = None
        self.stem = None
        self.deep = [*down[1:], *([unet.mid_block] if unet.mid_block is not None else []), *up[:-1]]
        self.special = [(unet.conv_in, _CaptureInput(self)), (down[0], _FirstBlock(self)), (up[-1], _LastBlock(self))]
        self._hooked = []
        try:
            for module in self.deep:
                self._register(module, ReuseHook(self.state))
            for module, hook in self.special:
                self._register(module, hook)
            self._handle = unet.register_forward_pre_hook(self._before_unet, with_kwargs=True)
        except BaseException:
            self._remove_hooks()
            raise
        self.session.add_call_listener(self._on_call)

    def _register(self, module, hook) -> None:
        registry = HookRegistry.check_if_exists_or_initialize(module)
        if HOOK_NAME in registry.hooks:
            raise RuntimeError("the block cache is already applied to this UNet")
        registry.register_hook(hook, HOOK_NAME)
        self._hooked.append(module)

    def _on_call(self, session) -> None:
        self.state.reset()
        for probe in self.probes.values():
            probe.first = probe.residual = None
            probe.consecutive = 0

    def _before_unet(self, module, args, kwargs):
        state, step = self.state, self.session.step_index
        sample = args[0] if args else kwargs.get("sample")
        if get_cuda_graph_hook(self.unet) is not None:
            raise RuntimeError("CUDA graphs were added after the block cache; its decisions cannot be captured")
        if step is None or not isinstance(sample, torch.Tensor) or torch.is_grad_enabled():
            state.mode, state.slot = OFF, None
            return None
        if step != state.step:
            state.step, state.call_in_step = step, 0
        else:
            state.call_in_step += 1
        if state.call_in_step >= MAX_CALLS_PER_STEP:  # the step index is not advancing: no caching
            state.mode, state.slot = OFF, None
            return None
        state.slot = state.slot_for(sample)
        self.probe = self.probes.setdefault(state.slot.index, _Probe())
        state.mode = FULL  # until the first block has run
        return None

    def decide(self, first: torch.Tensor) -> None:
        state, probe, config = self.state, self.probe, self.config
        if state.mode == OFF:
            return
        cached = False
        if state.step >= config.warmup_steps and probe.first is not None and probe.residual is not None:
            if config.max_consecutive_cached is None or probe.consecutive < config.max_consecutive_cached:
                change = (first - probe.first).abs().mean() / probe.first.abs().mean().clamp_min(1e-12)
                cached = bool(change < config.threshold)  # the one host sync of this technique
        if cached:
            state.mode = CACHED
            probe.consecutive += 1
            state.cached_calls += 1
        else:
            state.mode = FULL
            probe.first = first.detach().clone()
            probe.consecutive = 0
            state.full_calls += 1

    def _remove_hooks(self) -> None:
        for module in self._hooked:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and HOOK_NAME in registry.hooks:
                registry.remove_hook(HOOK_NAME, recurse=False)
        self._hooked.clear()

    def remove(self) -> None:
        self._handle.remove()
        self.session.remove_call_listener(self._on_call)
        self._remove_hooks()
        self.probes.clear()
        self.state.slots.clear()


def apply_block_cache(pipe, config: BlockCacheConfig) -> BlockCache:
    if _STATE in pipe.__dict__:
        raise RuntimeError("the block cache is already applied to this pipeline; call remove_block_cache first")
    cache = BlockCache(pipe, config)
    pipe.__dict__[_STATE] = cache
    return cache


def remove_block_cache(pipe) -> None:
    cache = pipe.__dict__.pop(_STATE, None)
    if cache is None:
        raise RuntimeError("the block cache was not applied to this pipeline")
    cache.remove()


def get_block_cache(pipe) -> BlockCache | None:
    return pipe.__dict__.get(_STATE)
