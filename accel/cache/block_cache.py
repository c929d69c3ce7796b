"""Block cache for UNets and DiT transformers: First-Block Cache (ParaAttention) and TeaCache (2024), on DiTs the
first and last blocks of DBCache (Cache-DiT, 2025), and the forecast of TaylorSeer (Liu et al. 2025, "From
Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers").

Every call runs the network's head: `conv_in` and the first down block of a UNet, the first `first_blocks`
transformer blocks of a DiT (DBCache's Fn blocks). When the head's output (UNet; its down block changes the
shape) or residual (DiT: its output minus the first block's input) moved less than `threshold` (relative L1)
since the last fully computed step, the cached blocks are skipped: the last of them (the tail) returns the
head's output plus the residual (tail output minus head output) kept from that step. What follows the tail still
runs: the output layers, and on a DiT its last `last_blocks` blocks (DBCache's Bn blocks), which refine that
estimate. With `taylor_order` the residual is not re-added as kept but forecast at the current step:
TaylorSeer's Taylor expansion in the step index about the last full step, its derivatives finite differences
over the last full steps, never across the first step (at pure noise the residual moves unlike later). With
`threshold=None` a fixed schedule decides instead (a full step every `cache_interval` steps), from the step index
alone. Every call position (cond / uncond, input shape: the session's slot) keeps its own state.

The decision is a device tensor (`should_compute`). Eagerly it is read once per step, the one host sync of
this technique. Under the runtime's CUDA graphs each call position is captured once with two CUDA-graph
conditional nodes, "run the remaining blocks" and its negation, so the replayed graph decides on the GPU and
never waits for the host. Everything a call changes goes to `next_*` buffers that the next call of the same
position commits before it runs: the graph hook's warm-up runs and its capture, which execute one call
several times, then leave the same state as a single replay.

A torch without conditional nodes (2.11, say) cannot capture that decision. There the call is not captured
whole: it runs eagerly, deciding on the host once per step after the head, and each block (the ones that
always run; on full calls the cached ones too) runs as a per-block CUDA graph (captured per block and input
signature on first use, one memory pool), so the launch-bound bulk of the network still replays from graphs and
a cached call replays only the head's (and a DiT's last blocks'). The denoiser's own small ops between blocks (time embedding, `conv_in`, the output layers; a DiT's
patch embedding and final layer) stay eager. The cache's state lives in its own buffers, written eagerly
from copies of the blocks' outputs, never in a graph's static buffers.

A fixed schedule is known before the call, so it needs neither: the hooks follow it without a sync, and under
CUDA graphs each call is captured whole, one graph per call position and decision (full / cached), on any torch.
"""

from __future__ import annotations

import inspect
import logging
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils import _pytree as pytree

from ..capture import capture_graph, capture_paused, signature_key
from ..errors import UnsupportedPipelineError
from ..session import technique_functions
from ._noise_guard import NoiseGuard

logger = logging.getLogger(__name__)

NAME = "block_cache"
HOOK_NAME = f"accel.{NAME}"
# DiT block lists in the order the transformer runs them (Flux: dual-stream blocks, then single-stream ones).
DIT_BLOCK_LISTS = ("transformer_blocks", "single_transformer_blocks")
# Where DiT blocks that diffusers 0.42's TransformerBlockRegistry leaves out return their hidden states (and
# encoder hidden states), and the name of their hidden-states argument, as the registry records it for the others.
BLOCKS_DIFFUSERS_LACKS = {
    "SanaTransformerBlock": ((0, None), "hidden_states"),  # forward(hidden_states, ...) -> hidden_states
}

# How a call runs: OFF (untouched), HOST (decided on the host: after the head, eagerly or with its blocks from
# per-block CUDA graphs; or, on a fixed schedule, in the plan, eagerly or in a graph of the whole call) or DEVICE
# (decided on the GPU, for a CUDA graph of the whole call). A DEVICE call executes as BLEND (eager,
# both branches, selected with `torch.where`: the graph hook's warm-up) or GRAPH (being captured: both branches
# recorded as conditional nodes).
OFF, HOST, DEVICE, BLEND, GRAPH = "off", "host", "device", "blend", "graph"
# Which path a call the graph hook would capture takes (`BlockCache.graph_path`); a fixed schedule's calls are
# captured whole, one graph per slot and decision.
CONDITIONAL_NODES, PER_BLOCK_GRAPHS, CALL_GRAPHS = "conditional nodes", "per-block graphs", "whole-call graphs"
# A fixed schedule's decision for a call, part of the call's plan (and so of its graph key).
FULL, CACHED = "full", "cached"


@dataclass(frozen=True)
class BlockCacheConfig:
    """threshold: skip the cached blocks while the head's output (UNet) or residual (DiT) changed by less than
        this (mean |new - old| / mean |old|, against the last fully computed step). 0 never skips. None: a fixed
        schedule instead (`cache_interval`).
    warmup_steps: the first steps always run fully.
    max_consecutive_cached: at most this many cached steps in a row (None: no limit).
    cache_interval: with threshold=None, a full step every `cache_interval` steps (steps 0, N, 2N, ... and the
        warm-up), the others cached. Decided from the step index before the call, with no host sync: under CUDA
        graphs each call is captured whole, and every run (and every method given the same full steps) computes
        the same steps.
    first_blocks: DiTs: the blocks that run on every call (DBCache's Fn); the decision is taken from the residual
        after them. More blocks give a steadier signal and cost more on cached calls.
    last_blocks: DiTs: the blocks after the cached ones that run on every call too (DBCache's Bn): on cached calls
        they refine the estimate of the cached blocks' output.
    A UNet takes first_blocks=1, last_blocks=0 only: its blocks are joined by skip connections.
    taylor_order: None re-adds the cached blocks' residual kept from the last full step. An int forecasts it
        instead (TaylorSeer): a Taylor expansion of that order in the step index, its derivatives finite
        differences over the last `taylor_order + 1` full steps (1: the last two). Each call position runs fully
        until it has that many (0 re-adds the kept residual through the forecast, as None does). Step 0's residual
        starts no difference: while the history reaches back to it, the forecast is one order lower over the full
        steps after it (first order: the first cached step re-adds the kept residual; Cache-DiT 1.5.3 takes no
        derivative before step 3).
    """

    threshold: float | None = 0.1
    warmup_steps: int = 1
    max_consecutive_cached: int | None = None
    cache_interval: int | None = None
    first_blocks: int = 1
    last_blocks: int = 0
    taylor_order: int | None = None

    def __post_init__(self):
        threshold = self.threshold
        if threshold is not None and (not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not threshold >= 0):
            raise ValueError(f"BlockCacheConfig.threshold={threshold!r} is not supported; valid: a number >= 0, or None "
                             "with cache_interval")
        _check_int("warmup_steps", self.warmup_steps, 1)
        _check_int("max_consecutive_cached", self.max_consecutive_cached, 1, optional=True)
        _check_int("cache_interval", self.cache_interval, 1, optional=True)
        _check_int("first_blocks", self.first_blocks, 1)
        _check_int("last_blocks", self.last_blocks, 0)
        _check_int("taylor_order", self.taylor_order, 0, optional=True)
        if (threshold is None) == (self.cache_interval is None):
            raise ValueError(f"BlockCacheConfig(threshold={threshold!r}, cache_interval={self.cache_interval!r}) is not "
                             "supported; valid: a threshold (adaptive), or threshold=None with cache_interval=N (a "
                             "fixed schedule, a full step every N steps)")
        if self.cache_interval is not None and self.max_consecutive_cached is not None:
            raise ValueError("BlockCacheConfig.max_consecutive_cached is not supported with cache_interval, whose fixed "
                             "schedule caches at most cache_interval - 1 steps in a row; valid: max_consecutive_cached=None")


def _check_int(name: str, value, minimum: int, optional: bool = False) -> None:
    if (value is None and optional) or (isinstance(value, int) and not isinstance(value, bool) and value >= minimum):
        return
    valid = f"{'None or ' if optional else ''}an int >= {minimum}"
    raise ValueError(f"BlockCacheConfig.{name}={value!r} is not supported; valid: {valid}")


# ---------------------------------------------------------------------------------------------
# The decision: pure tensor functions, the same eagerly and inside a captured graph.


def relative_l1(new: torch.Tensor, old: torch.Tensor) -> torch.Tensor:
    """mean |new - old| / mean |old| as a float32 scalar tensor (no host sync)."""
    change = (new - old).abs().mean(dtype=torch.float32)
    return change / old.abs().mean(dtype=torch.float32).clamp_min(1e-12)


def should_compute(change: torch.Tensor, consecutive: torch.Tensor, force, threshold: float,
                   max_consecutive_cached: int | None) -> torch.Tensor:
    """A bool tensor: run the remaining blocks. True when forced, when the change is not below `threshold`
    (a NaN change too), or when `consecutive` cached calls in a row reached the limit."""
    compute = torch.logical_not(change < threshold)
    if max_consecutive_cached is not None:
        compute = compute | (consecutive >= max_consecutive_cached)
    return compute | force


def consecutive_after(consecutive: torch.Tensor, compute: torch.Tensor) -> torch.Tensor:
    """Cached calls in a row after this one: 0 after a full call, one more after a cached one."""
    return (consecutive + 1) * torch.logical_not(compute)


def taylor_weights(distance, gaps, order: int) -> list:
    """TaylorSeer's forecast as weights w_j on the residuals r_0 (newest), ..., r_order of the last `order + 1`
    full steps: sum_j w_j r_j = sum_i D_i distance^i / i!, the Taylor expansion about the newest full step,
    `distance` steps ahead. D_0 is a full step's residual and D_(i+1) at a full step is (D_i there - D_i at the
    full step before) / the steps between them: `gaps[j]` from full step j + 1 to j. Numbers, or tensors (then
    no host sync: a graph records it)."""
    derivatives = [[float(k == j) for k in range(order + 1)] for j in range(order + 1)]  # D_i at full step j, as weights
    weights, factor = derivatives[0], 1.0
    for i in range(1, order + 1):
        derivatives = [[(a - b) / gaps[j] for a, b in zip(derivatives[j], derivatives[j + 1])] for j in range(order + 1 - i)]
        factor = factor * distance / i
        weights = [w + factor * d for w, d in zip(weights, derivatives[0])]
    return weights


def conditional_nodes_supported() -> bool:
    """Whether this torch can capture CUDA-graph conditional nodes (CUDA >= 12.4 is checked at capture)."""
    graph = torch.cuda.CUDAGraph
    return all(hasattr(graph, name) for name in
               ("get_currently_capturing_graph", "begin_capture_to_if_node", "end_capture_to_conditional_node"))


@contextmanager
def if_node(pred: torch.Tensor):
    """Record the body into a conditional node of the graph being captured: on replay it runs iff `pred`."""
    graph = torch.cuda.CUDAGraph.get_currently_capturing_graph()
    graph.begin_capture_to_if_node(pred)
    try:
        yield
    finally:
        graph.end_capture_to_conditional_node()


# ---------------------------------------------------------------------------------------------
# Where the hidden states sit in a block's output.


@dataclass(frozen=True)
class _Outputs:
    """Positions of the hidden states (and encoder hidden states) in a block's output tuple; None: a tensor."""

    hidden: int | None = None
    encoder: int | None = None

    def split(self, output) -> list:
        if self.hidden is None or not isinstance(output, (tuple, list)):
            return [output]
        return [output[self.hidden], output[self.encoder] if self.encoder is not None else None]

    def join(self, leaves: list, length: int | None):
        if length is None:
            return leaves[0]
        output = [None] * length
        output[self.hidden] = leaves[0]
        if self.encoder is not None:
            output[self.encoder] = leaves[1]
        return tuple(output)


@dataclass
class _Layout:
    """The denoiser's modules by role: `stem` (UNet `conv_in`), `head` (the block after which the decision is
    taken), `rest` (skipped on cached calls), `tail` (the last skipped block: on cached calls it returns the
    estimate), and on a DiT `lead` (blocks before the head) and `trail` (blocks after the tail), which always run."""

    kind: str  # "unet" or "transformer"
    sample_arg: str
    stem: torch.nn.Module | None
    head: torch.nn.Module
    rest: list[torch.nn.Module]
    tail: torch.nn.Module
    head_outputs: _Outputs = field(default_factory=_Outputs)
    tail_outputs: _Outputs = field(default_factory=_Outputs)
    hidden_arg: str = "hidden_states"  # the first block's hidden-states argument: a DiT head's residual is from it
    lead: list[torch.nn.Module] = field(default_factory=list)
    trail: list[torch.nn.Module] = field(default_factory=list)


def denoiser_layout(pipe, first_blocks: int = 1, last_blocks: int = 0) -> _Layout:
    """The block cache's view of the pipeline's UNet or DiT transformer; UnsupportedPipelineError otherwise, and
    ValueError for `first_blocks` / `last_blocks` (BlockCacheConfig) that the denoiser cannot take."""
    unet = getattr(pipe, "unet", None)
    if unet is not None:
        down, up = list(getattr(unet, "down_blocks", None) or []), list(getattr(unet, "up_blocks", None) or [])
        if len(down) < 2 or not up or getattr(unet, "conv_in", None) is None:
            raise UnsupportedPipelineError(
                f"the block cache needs a UNet with conv_in, at least two down blocks and up blocks, got {type(unet).__name__}")
        if (first_blocks, last_blocks) != (1, 0):
            raise ValueError(
                f"BlockCacheConfig(first_blocks={first_blocks}, last_blocks={last_blocks}) needs a DiT; on a UNet, whose "
                "blocks are joined by skip connections, valid: first_blocks=1, last_blocks=0 (conv_in and the first "
                "down block run on every call; DeepCacheConfig keeps more of the shallow blocks running)")
        mid = [unet.mid_block] if getattr(unet, "mid_block", None) is not None else []
        # A down block returns (hidden states, skip outputs); the last up block returns a tensor.
        return _Layout("unet", "sample", unet.conv_in, down[0], [*down[1:], *mid, *up[:-1]], up[-1],
                       head_outputs=_Outputs(hidden=0))
    transformer = getattr(pipe, "transformer", None)
    blocks = [b for name in DIT_BLOCK_LISTS if isinstance(getattr(transformer, name, None), torch.nn.ModuleList)
              for b in getattr(transformer, name)]
    if len(blocks) < 2:
        found = "no .unet or .transformer" if transformer is None else f".transformer of type {type(transformer).__name__}"
        raise UnsupportedPipelineError(
            f"the block cache needs a UNet2DConditionModel `.unet` or a DiT `.transformer` with at least two blocks in "
            f"{' / '.join(DIT_BLOCK_LISTS)}; {type(pipe).__name__} has {found}")
    if first_blocks + last_blocks >= len(blocks):
        raise ValueError(
            f"BlockCacheConfig(first_blocks={first_blocks}, last_blocks={last_blocks}) leaves no block to cache in this "
            f"{type(transformer).__name__} of {len(blocks)} blocks; valid: first_blocks + last_blocks <= {len(blocks) - 1}")
    from diffusers.hooks._helpers import TransformerBlockRegistry  # diffusers' own table of block outputs

    head, tail = first_blocks - 1, len(blocks) - last_blocks - 1
    outputs = []
    for block in (blocks[0], blocks[head], blocks[tail]):
        try:
            meta = TransformerBlockRegistry.get(type(block))
            where = ((meta.return_hidden_states_index, meta.return_encoder_hidden_states_index),
                     meta.hidden_states_argument_name)
        except ValueError:
            where = BLOCKS_DIFFUSERS_LACKS.get(type(block).__name__)
            if where is None:
                raise UnsupportedPipelineError(
                    f"the block cache does not know where {type(block).__name__} returns its hidden states (not in "
                    f"diffusers' TransformerBlockRegistry, nor among {', '.join(BLOCKS_DIFFUSERS_LACKS)})") from None
        outputs.append((_Outputs(*where[0]), where[1]))
    return _Layout("transformer", "hidden_states", None, blocks[head], blocks[head + 1:tail], blocks[tail],
                   head_outputs=outputs[1][0], tail_outputs=outputs[2][0], hidden_arg=outputs[0][1],
                   lead=blocks[:head], trail=blocks[tail + 1:])


# ---------------------------------------------------------------------------------------------
# Per-slot state in persistent buffers (a captured graph reads and writes these addresses).


def _zeros(dtype, device):
    return torch.zeros((), dtype=dtype, device=device)


def _like(x: torch.Tensor) -> torch.Tensor:
    # Inside a capture a zeros kernel would be recorded and rerun on replay; every call writes these first.
    return torch.empty_like(x) if x.is_cuda and torch.cuda.is_current_stream_capturing() else torch.zeros_like(x)


class _Slot:
    """One denoiser call position within a step (cond / uncond when called twice, one input shape)."""

    def __init__(self, index: int, device: torch.device, taylor_order: int | None = None):
        self.index = index
        self.forced = 0  # calls of the current pipeline call forced to run fully on this slot
        self.pending = False  # `next_*` holds a call's result that is not committed yet
        self.force = _zeros(torch.bool, device)  # DEVICE calls: set by the host before the call
        self.computed = _zeros(torch.bool, device)  # the decision of the last call
        self.skipped = _zeros(torch.bool, device)
        self.consecutive = _zeros(torch.int32, device)
        self.next_consecutive = _zeros(torch.int32, device)
        self.counts = torch.zeros(2, dtype=torch.int64, device=device)  # committed (full, cached) calls
        self.reference = self.next_reference = None  # first block output / residual of the last full call
        self.residuals: list | None = None  # tail leaves minus stem leaves of the last full call
        self.next_residuals: list | None = None
        self.tail_length: int | None = None  # the tail's output tuple length (None: a tensor)
        self.records: dict[int, tuple] = {}  # output structure per skipped module, for eager placeholders
        # TaylorSeer: the residuals of the full calls before the last one (newest first), the step indices of the
        # last taylor_order + 1 full calls (newest first) and this call's, as device tensors a graph reads.
        self.taylor_order = taylor_order
        self.older: list[list] = []
        if taylor_order is not None:
            self.step = _zeros(torch.float32, device)
            self.full_steps = torch.zeros(taylor_order + 1, dtype=torch.float32, device=device)
            self.next_full_steps = torch.zeros_like(self.full_steps)

    def reset(self) -> None:
        self.forced = 0
        self.pending = False
        self.counts.zero_()

    def ensure_reference(self, probe: torch.Tensor) -> None:
        if self.reference is None or self.reference.shape != probe.shape or self.reference.dtype != probe.dtype:
            self.reference, self.next_reference = _like(probe), _like(probe)

    def ensure_residuals(self, leaves: list, stem: list) -> None:
        def fits(buffers):
            return buffers is not None and len(buffers) == len(leaves) and all(
                (b is None) == (x is None) and (b is None or b.shape == x.shape) for b, x in zip(buffers, leaves))

        if not fits(self.residuals):
            usable = [x if isinstance(x, torch.Tensor) and s is not None and s.shape == x.shape else None
                      for x, s in zip(leaves, stem)]
            self.residuals, self.next_residuals, *self.older = [
                [None if x is None else _like(x) for x in usable] for _ in range(2 + (self.taylor_order or 0))]

    def commit(self) -> None:
        """Make the last call's result the state this call reads (device ops only, no host sync)."""
        if not self.pending:
            return
        self.pending = False
        if self.reference is not None:  # None under a fixed schedule, which measures nothing
            torch.where(self.computed, self.next_reference, self.reference, out=self.reference)
        # On a full call every kept residual moves one place back, the oldest dropping out, and the new one comes in.
        history = [self.next_residuals, self.residuals, *self.older]
        for older, newer in reversed(list(zip(history[1:], history[:-1]))):
            for current, new in zip(older or [], newer or []):
                if current is not None:
                    torch.where(self.computed, new, current, out=current)
        if self.taylor_order is not None:
            torch.where(self.computed, self.next_full_steps, self.full_steps, out=self.full_steps)
        self.consecutive.copy_(self.next_consecutive)
        self.counts.add_(torch.stack((self.computed, self.skipped)))


class BlockCacheState:
    """The mode and slot of the call in progress; `full_calls` / `cached_calls` of the last pipeline call."""

    def __init__(self):
        self.mode = OFF
        self.slot: _Slot | None = None
        self.slots: dict[int, _Slot] = {}  # by the session's slot; never emptied while applied: graphs hold the buffers
        self.force = False  # HOST calls: this call must compute
        self.per_block = False  # HOST calls: the blocks run from per-block CUDA graphs
        self.device_type = "cuda"  # ... keyed on inputs of this device type
        self.compute = True  # HOST calls: the decision, once the head has run
        self.execution: str | None = None  # BLEND / GRAPH of the latest execution of a DEVICE call
        self.stem: list | None = None
        self.origin: torch.Tensor | None = None  # DiTs: the first block's input hidden states in this call

    def reset(self) -> None:
        for slot in self.slots.values():
            slot.reset()
        self.mode, self.slot, self.execution = OFF, None, None
        self.per_block = False

    def slot_for(self, index: int, device: torch.device, taylor_order: int | None) -> _Slot:
        slot = self.slots.get(index)
        if slot is None:
            slot = self.slots[index] = _Slot(index, device, taylor_order)
        return slot

    def counts(self) -> tuple[int, int]:
        """(full, cached) calls since the start of the pipeline call; reads device counters (a host sync)."""
        full = cached = 0
        for slot in self.slots.values():
            counts = slot.counts.clone()
            if slot.pending:
                counts += torch.stack((slot.computed, slot.skipped))
            f, c = counts.tolist()
            full, cached = full + f, cached + c
        return full, cached

    @property
    def full_calls(self) -> int:
        return self.counts()[0]

    @property
    def cached_calls(self) -> int:
        return self.counts()[1]


# ---------------------------------------------------------------------------------------------
# Hooks on the blocks.


@dataclass(frozen=True)
class _TensorSpec:
    shape: tuple
    dtype: torch.dtype
    device: torch.device


def _record(output) -> tuple:
    leaves, spec = pytree.tree_flatten(output)
    return spec, [_TensorSpec(tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in leaves]


def _placeholder(record: tuple):
    # Shape-correct stand-ins: on a cached call these feed only modules that are skipped too.
    spec, leaves = record
    made = [torch.empty(x.shape, dtype=x.dtype, device=x.device) if isinstance(x, _TensorSpec) else x for x in leaves]
    return pytree.tree_unflatten(made, spec)


class _StemHook(ModelHook):
    """UNet `conv_in`: its output is what the last up block's residual is measured from."""

    def __init__(self, cache: "BlockCache"):
        super().__init__()
        self.cache = cache

    def post_forward(self, module, output):
        if self.cache.state.mode != OFF:
            self.cache.state.stem = [output]
        return output


class _AlwaysHook(ModelHook):
    """A DiT block that runs on every call: one of DBCache's first blocks before the head, or of its last blocks
    after the tail. The network's first block (`origin`) keeps its input, which the head's residual is taken from."""

    def __init__(self, cache: "BlockCache", origin: bool = False):
        super().__init__()
        self.cache = cache
        self.origin = origin
        self._signature = None

    def initialize_hook(self, module):
        # The class's own signature: `module.forward` may already be wrapped by another hook.
        self._signature = inspect.signature(type(module).forward)
        return module

    def new_forward(self, module, *args, **kwargs):
        cache = self.cache
        if self.origin and cache.state.mode != OFF:
            cache.state.origin = self._signature.bind(module, *args, **kwargs).arguments[cache.layout.hidden_arg]
        return cache.run_block(module, self.fn_ref.original_forward, args, kwargs)


class _HeadHook(_AlwaysHook):
    """The block after which the decision is taken, from its output (UNet) or residual (DiT)."""

    def new_forward(self, module, *args, **kwargs):
        cache = self.cache
        output = super().new_forward(module, *args, **kwargs)
        if cache.state.mode == OFF:
            return output
        leaves = cache.layout.head_outputs.split(output)
        if cache.layout.kind != "unet":
            cache.state.stem = leaves
        cache.decide(leaves[0], cache.state.origin)
        return output


class _RestHook(ModelHook):
    """A cached block before the tail: skipped on cached calls."""

    def __init__(self, cache: "BlockCache"):
        super().__init__()
        self.cache = cache

    def new_forward(self, module, *args, **kwargs):
        state, forward = self.cache.state, self.fn_ref.original_forward
        if state.mode == OFF:
            return forward(*args, **kwargs)
        if state.execution == GRAPH:
            with if_node(state.slot.computed):
                output = forward(*args, **kwargs)
            return output  # on a cached replay these hold stale values that only skipped modules read
        record = state.slot.records.get(id(module))
        if state.mode == HOST and not state.compute and record is not None:
            return _placeholder(record)
        output = self.cache.run_block(module, forward, args, kwargs)
        state.slot.records[id(module)] = _record(output)
        return output


class _TailHook(ModelHook):
    """The last cached block: cached calls return the stem (the head's output) plus the kept residual, or its
    forecast; full calls keep a new residual."""

    def __init__(self, cache: "BlockCache"):
        super().__init__()
        self.cache = cache

    def new_forward(self, module, *args, **kwargs):
        state, outputs, forward = self.cache.state, self.cache.layout.tail_outputs, self.fn_ref.original_forward
        if state.mode == OFF:
            return forward(*args, **kwargs)
        slot, stem = state.slot, state.stem
        if state.execution == GRAPH:
            with if_node(slot.computed):
                output = forward(*args, **kwargs)
                leaves = outputs.split(output)
                slot.ensure_residuals(leaves, stem)
                _store_residuals(slot, leaves, stem)
            with if_node(slot.skipped):
                for leaf, base, residual in zip(leaves, stem, _estimate(slot)):
                    if residual is not None:
                        torch.add(base, residual, out=leaf)
            return output
        if state.mode == HOST and not state.compute and slot.residuals is not None:
            cached = [None if r is None else base + r for base, r in zip(stem, _estimate(slot))]
            return outputs.join(cached, slot.tail_length)
        output = self.cache.run_block(module, forward, args, kwargs)
        leaves = outputs.split(output)
        slot.tail_length = len(output) if isinstance(output, (tuple, list)) else None
        slot.ensure_residuals(leaves, stem)
        _store_residuals(slot, leaves, stem)
        if state.mode == HOST:
            return output
        # BLEND: both branches computed, the decision picks one without reading it on the host.
        merged = [leaf if r is None else torch.where(slot.computed, leaf, base + r)
                  for leaf, base, r in zip(leaves, stem, _estimate(slot))]
        return outputs.join(merged, slot.tail_length)


def _estimate(slot: _Slot) -> list:
    """The cached blocks' residual on a cached call: the one kept from the last full call, or its TaylorSeer
    forecast at this step (summed in float32: the weights grow with the distance and cancel)."""
    if slot.taylor_order is None:
        return slot.residuals
    steps, order = slot.full_steps, slot.taylor_order
    distance, gaps = slot.step - steps[0], steps[:-1] - steps[1:]
    weights = taylor_weights(distance, gaps, order)
    if order:
        # Step 0's residual, at pure noise, is off the later trajectory: on mini-sd3-cifar10 the slope from step 0
        # to 1 forecasts step 2 worse than re-adding step 1's (0.32 against 0.20 relative error), the slope from 1
        # to 2 step 3 better. A history reaching back to it drops it and one order (a device select: graphs too).
        lower = [*taylor_weights(distance, gaps, order - 1), 0.0]
        weights = [torch.where(steps[-1] > 0, w, w_lower) for w, w_lower in zip(weights, lower)]
    history = [slot.residuals, *slot.older]
    return [None if r is None else sum(w * kept[i].float() for w, kept in zip(weights, history)).to(r.dtype)
            for i, r in enumerate(slot.residuals)]


def _store_residuals(slot: _Slot, leaves: list, stem: list) -> None:
    for new, leaf, base in zip(slot.next_residuals, leaves, stem):
        if new is not None:
            torch.sub(leaf, base, out=new)


# ---------------------------------------------------------------------------------------------
# Per-block CUDA graphs: the graph path on a torch without conditional nodes.


class BlockGraphs:
    """The blocks' CUDA graphs: one per block and input signature (`signature_key`), captured on first use
    by `capture` (`capture_graph`; the CPU tests put a stand-in here), all drawing from one memory pool.
    A replay copies the inputs into the graph's static buffers and returns a copy of its static output."""

    def __init__(self, names: dict[int, str]):
        self.names = names  # id(block) -> its name in the denoiser, for keys and log lines
        self.capture = capture_graph
        self.graphs: dict[tuple, object] = {}  # (block name, signature) -> graph; None: capture failed, eager
        self.pool = None

    def run(self, module, forward, args: tuple, kwargs: dict, device_type: str):
        leaves, spec = pytree.tree_flatten((args, kwargs))
        key = signature_key(leaves, spec, device_type=device_type)
        if key is None:  # inputs the graph hook would not replay either
            return forward(*args, **kwargs)
        key = (self.names[id(module)], key)
        entry = self.graphs.get(key, False)
        if entry is False:
            if capture_paused():  # a background compile runs (another component's): capture after it
                return forward(*args, **kwargs)
            entry = self.graphs[key] = self._capture(key[0], forward, leaves, spec, key[1][-1])
        if entry is None:
            return forward(*args, **kwargs)
        return entry.replay(leaves)

    def _capture(self, name: str, forward, leaves, spec, device):
        try:
            entry = self.capture(lambda tree: forward(*tree[0], **tree[1]), leaves, spec, device, pool=self.pool)
        except Exception as err:  # capture is an optimisation: this block runs eagerly, said once per signature
            logger.warning("accel: CUDA-graph capture of the block %s failed (%s: %s); that block runs eagerly for "
                           "this input signature", name, type(err).__name__, err)
            return None
        self.pool = entry.pool
        return entry

    def captured(self) -> list[str]:
        """Names of the blocks with a captured graph (one entry per signature)."""
        return [name for (name, _), entry in self.graphs.items() if entry is not None]

    def clear(self) -> None:
        self.graphs.clear()
        self.pool = None


# ---------------------------------------------------------------------------------------------
# Applying: hooks on the blocks, a pre-hook on the denoiser that picks each call's slot and mode.


class BlockCache:
    """The applied block cache on a pipeline's denoiser; `remove()` undoes it exactly."""

    def __init__(self, pipe, config: BlockCacheConfig, session):
        self.session = session
        self.layout = denoiser_layout(pipe, config.first_blocks, config.last_blocks)
        self.denoiser = pipe.unet if self.layout.kind == "unet" else pipe.transformer
        self.config = config
        self.state = BlockCacheState()
        self.conditional_nodes = conditional_nodes_supported()
        self.graph_path: str | None = None  # CONDITIONAL_NODES / PER_BLOCK_GRAPHS of the latest graph-hooked call
        self._said: set[str] = set()
        self._hooked: list[torch.nn.Module] = []
        layout = self.layout
        blocks = {id(m) for m in (*layout.lead, layout.head, *layout.rest, layout.tail, *layout.trail)}
        self.block_graphs = BlockGraphs({id(m): name for name, m in self.denoiser.named_modules() if id(m) in blocks})
        origin = layout.kind == "transformer"
        hooks = [*[(m, _AlwaysHook(self, origin=origin and i == 0)) for i, m in enumerate(layout.lead)],
                 (layout.head, _HeadHook(self, origin=origin and not layout.lead)),
                 *[(m, _RestHook(self)) for m in layout.rest], (layout.tail, _TailHook(self)),
                 *[(m, _AlwaysHook(self)) for m in layout.trail]]
        if layout.stem is not None:
            hooks.insert(0, (layout.stem, _StemHook(self)))
        for module, _ in hooks:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and HOOK_NAME in registry.hooks:
                raise RuntimeError(f"the block cache is already applied to this {type(self.denoiser).__name__}")
        try:
            for module, hook in hooks:
                HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, HOOK_NAME)
                self._hooked.append(module)
            self.planner = self.session.planner(self.denoiser)
            self.planner.add_decider(NAME, self.plan)
        except BaseException:
            self._remove_hooks()
            raise
        self.session.add_call_listener(self._on_call)
        self.noise = NoiseGuard(pipe, session, NAME)

    def _on_call(self, session) -> None:
        self.state.reset()

    def _host_decisions_from_now(self, why: str) -> None:
        self.conditional_nodes = False
        if PER_BLOCK_GRAPHS not in self._said:
            logger.warning("accel: the block cache cannot decide inside a CUDA graph here (%s); from now on it decides "
                           "on the host once per step and runs its blocks from per-block CUDA graphs (the first block "
                           "on every call, the others on full calls), the rest of the denoiser eagerly", why)
            self._said.add(PER_BLOCK_GRAPHS)

    def run_block(self, module, forward, args: tuple, kwargs: dict):
        """Run one hooked block: from its per-block CUDA graph on that path, else as it is."""
        state = self.state
        if state.mode == HOST and state.per_block:
            return self.block_graphs.run(module, forward, args, kwargs, state.device_type)
        return forward(*args, **kwargs)

    def plan(self, call):
        """This call's mode and slot, made once before it runs: the decision the session records for it (the slot
        a CUDA graph with conditional nodes is keyed on, a fixed schedule's decision and slot, or None); calls
        decided on the host after their head run eagerly under graphs."""
        state = self.state
        if call.graphed and state.mode == DEVICE and state.execution == BLEND:
            # The previous call ran eagerly although it was meant for a graph: capture failed or was refused.
            self._host_decisions_from_now("the call was not replayed from a captured graph; see the CUDA-graph log line")
        state.execution, state.per_block = None, False
        state.stem = state.origin = None
        sample = call.sample
        if call.step is None:
            state.mode, state.slot = OFF, None
            return None
        self.noise.check()
        config = self.config
        slot = state.slot_for(call.slot, sample.device, config.taylor_order)
        slot.commit()
        # A forecast extrapolates from taylor_order + 1 full calls: each slot runs fully until it has them.
        force = call.step < config.warmup_steps or slot.forced < 1 + (config.taylor_order or 0)
        slot.forced += force
        if config.taylor_order is not None:
            slot.step.fill_(call.step)  # a device write, not a sync: the forecast reads it, in a graph too
        slot.pending = True  # staged by this call, also when it is replayed from a graph and no Python runs in it
        state.slot = slot
        if config.threshold is None:
            # A fixed schedule is known before the call: the hooks follow it without a sync, so graphs may capture it.
            state.mode, state.compute = HOST, force or call.step % config.cache_interval == 0
            if call.graphed and self._replayable(sample):
                self.graph_path = CALL_GRAPHS
            return FULL if state.compute else CACHED, slot.index
        if self._device_path(call.graphed, sample):
            state.mode = DEVICE
            slot.force.fill_(force)  # a device write, not a sync: the graph reads it
            self.graph_path = CONDITIONAL_NODES
            return slot.index
        state.mode, state.force, state.compute = HOST, force, True
        # A call the graph hook would capture, decided on the host: its blocks replay per-block graphs.
        state.per_block = call.graphed and self._replayable(sample)
        if state.per_block:
            state.device_type, self.graph_path = sample.device.type, PER_BLOCK_GRAPHS
        if call.graphed:
            call.run_eagerly()
        return None

    @staticmethod
    def _replayable(sample: torch.Tensor) -> bool:
        return sample.is_cuda  # the graph hook captures calls whose inputs live on a CUDA device

    def _device_path(self, graphed: bool, sample: torch.Tensor) -> bool:
        """Whether this call is decided on the device: the CUDA-graph hook will capture or replay it."""
        if not graphed or not self._replayable(sample):
            return False
        if not self.conditional_nodes:
            self._host_decisions_from_now("this torch has no CUDA-graph conditional nodes")
        elif CONDITIONAL_NODES not in self._said:
            logger.info("accel: the block cache decides inside the denoiser's CUDA graphs (conditional nodes)")
            self._said.add(CONDITIONAL_NODES)
        return self.conditional_nodes

    def decide(self, head: torch.Tensor, origin: torch.Tensor | None) -> None:
        """After the head: take this call's decision from the head's output (`origin` None: UNet) or its residual
        over the first block's input `origin` (DiT), and stage the state the call leaves behind."""
        state, slot, config = self.state, self.state.slot, self.config
        probe = None
        if config.threshold is not None:  # else a fixed schedule, decided in the plan
            probe = head if origin is None else head - origin
            slot.ensure_reference(probe)
        if state.mode == HOST:
            if probe is not None:
                state.compute = state.force or bool(should_compute(  # the one host sync of an eager call
                    relative_l1(probe, slot.reference), slot.consecutive, False, config.threshold, config.max_consecutive_cached))
                if state.compute:
                    slot.next_reference.copy_(probe)
            slot.computed.fill_(state.compute)
        else:
            state.execution = GRAPH if probe.is_cuda and torch.cuda.is_current_stream_capturing() else BLEND
            pred = should_compute(relative_l1(probe, slot.reference), slot.consecutive, slot.force,
                                  config.threshold, config.max_consecutive_cached)
            slot.computed.copy_(pred)
            slot.next_reference.copy_(probe)
        torch.logical_not(slot.computed, out=slot.skipped)
        slot.next_consecutive.copy_(consecutive_after(slot.consecutive, slot.computed))
        if slot.taylor_order is not None:
            torch.cat((slot.step.view(1), slot.full_steps[:-1]), out=slot.next_full_steps)

    def _remove_hooks(self) -> None:
        for module in self._hooked:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and HOOK_NAME in registry.hooks:
                registry.remove_hook(HOOK_NAME, recurse=False)
        self._hooked.clear()

    def remove(self) -> None:
        self.planner.remove_decider(NAME)
        self.session.remove_call_listener(self._on_call)
        self.noise.remove()
        self._remove_hooks()
        self.state.slots.clear()
        self.block_graphs.clear()


# Without AccelConfig, on an accelerated pipeline; `get_block_cache(pipe).state` counts full and cached calls.
apply_block_cache, remove_block_cache, get_block_cache = technique_functions(NAME, BlockCache)
