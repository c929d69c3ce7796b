"""Shared machinery of the feature caches: which UNet modules feed which skip, and the reuse hooks.

A feature cache splits UNet calls into "full" calls, which run everything and copy the outputs of
the cached modules into persistent buffers, and "cached" calls, on which those modules return the
buffers without computing. The decision is taken once per UNet call, when the session plans the call
(before every hook, so a CUDA-graph hook keys its graph by it), from the step index of the pipeline
loop: a Python int, never a tensor value.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils import _pytree as pytree

from ..errors import UnsupportedPipelineError
from ._noise_guard import NoiseGuard


FULL, CACHED, OFF = "full", "cached", "off"


# ---------------------------------------------------------------------------------------------
# UNet layout: the skip connections, read from the blocks' own module lists (no block counts).


@dataclass
class SkipLayout:
    """The UNet's modules in execution order, grouped by the skip connection they produce or use.

    `down[k]` produces skip `k + 1` (skip 0 is `conv_in`'s output); `up[k]` consumes skip `k`;
    `up_blocks[i]` lists the skip indices its layers consume, `down_blocks[i]` those its layers produce.
    """

    down: list[list[torch.nn.Module]] = field(default_factory=list)
    up: list[list[torch.nn.Module]] = field(default_factory=list)
    down_blocks: list[tuple[torch.nn.Module, list[int]]] = field(default_factory=list)
    up_blocks: list[tuple[torch.nn.Module, list[int], list[torch.nn.Module]]] = field(default_factory=list)

    @property
    def num_skips(self) -> int:
        return len(self.up)


def _modules(block, name: str) -> list[torch.nn.Module]:
    return list(getattr(block, name, None) or [])


def _layers(block) -> list[list[torch.nn.Module]]:
    """A block's layers in order: each resnet with the attention that follows it, if the block has attentions."""
    resnets, attentions = _modules(block, "resnets"), _modules(block, "attentions")
    if attentions and len(attentions) != len(resnets):
        raise UnsupportedPipelineError(f"{type(block).__name__} pairs {len(resnets)} resnets with {len(attentions)} attentions")
    return [[resnet] + ([attentions[j]] if attentions else []) for j, resnet in enumerate(resnets)]


def skip_layout(unet) -> SkipLayout:
    """Map every down-side layer to the skip it produces and every up-side layer to the skip it reads.

    Follows `UNet2DConditionModel.forward`: skips are pushed per layer (and once after a block's
    downsamplers) and popped from the end by the up blocks, one per resnet.
    """
    layout = SkipLayout()
    for block in unet.down_blocks:
        produced = []
        for layer in _layers(block):
            layout.down.append(layer)
            produced.append(len(layout.down))
        downsamplers = _modules(block, "downsamplers")
        if downsamplers:
            layout.down.append(downsamplers)
            produced.append(len(layout.down))
        layout.down_blocks.append((block, produced))
    skips = len(layout.down) + 1
    consumed_total = sum(len(_modules(b, "resnets")) for b in unet.up_blocks)
    if consumed_total != skips:
        raise UnsupportedPipelineError(
            f"the up blocks read {consumed_total} skip connections but the down side makes {skips}; layout not understood"
        )
    up_in_order = []
    next_skip = skips - 1
    for block in unet.up_blocks:
        consumed = []
        for layer in _layers(block):
            up_in_order.append((next_skip, layer))
            consumed.append(next_skip)
            next_skip -= 1
        layout.up_blocks.append((block, consumed, _modules(block, "upsamplers")))
    layout.up = [modules for _, modules in sorted(up_in_order, key=lambda item: item[0])]
    return layout


# ---------------------------------------------------------------------------------------------
# Per-call state, one slot per UNet call position of a step (cond / uncond when a pipeline calls twice).


class Slot:
    """The features of one UNet call position within a step, for one input shape."""

    def __init__(self, index: int):
        self.index = index
        self.filled = False  # a full call has run on this slot during the current pipeline call


class FeatureCacheState:
    """What the reuse hooks read: the mode and slot of the UNet call in progress."""

    def __init__(self):
        self.mode = OFF
        self.slot: Slot | None = None
        self.slots: dict[int, Slot] = {}  # by the session's slot; never emptied while applied: graphs hold the buffers
        self.schedule: frozenset[int] | None = None
        self.step: int | None = None
        self.full_calls = 0
        self.cached_calls = 0
        self.repeat = 1  # cached outputs are tiled this many times along the batch (batched decoders)
        self.persistent = False  # keep outputs in persistent buffers: a CUDA graph captures the UNet

    def reset(self) -> None:
        """Start of a pipeline call: no slot holds features of this call yet."""
        for slot in self.slots.values():
            slot.filled = False
        self.mode, self.slot, self.schedule, self.step, self.repeat = OFF, None, None, None, 1
        self.full_calls = self.cached_calls = 0


class ReuseHook(ModelHook):
    """Full call: run and keep the outputs for this slot. Cached call: return the kept outputs.

    Eagerly the outputs themselves are kept, as they are (no copy). Where a CUDA graph captures the UNet
    (`FeatureCacheState.persistent`), they are copied into buffers allocated once per slot, whose addresses
    the captured graphs read on replay.
    """

    def __init__(self, state: FeatureCacheState):
        super().__init__()
        self.state = state
        # No counters here: torch.compile guards on hook attributes, and a changing one recompiles.
        self.buffers: dict[int, tuple[list[torch.Tensor], object]] = {}
        self.outputs: dict[int, object] = {}  # per slot, the kept outputs (the buffers, in the output's structure)

    def new_forward(self, module, *args, **kwargs):
        state = self.state
        if state.mode == CACHED:
            output = self.outputs.get(state.slot.index)
            if output is not None:
                return output if state.repeat == 1 else pytree.tree_map(lambda x: tile_batch(x, state.repeat), output)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if state.mode == FULL:
            if state.persistent:
                self._store(state.slot.index, output)
            else:
                self.outputs[state.slot.index] = output
        return output

    def _store(self, index: int, output) -> None:
        leaves, spec = pytree.tree_flatten(output)
        stored = self.buffers.get(index)
        fits = stored is not None and stored[1] == spec and all(
            not isinstance(b, torch.Tensor) or (b.shape == x.shape and b.dtype == x.dtype and b.device == x.device)
            for b, x in zip(stored[0], leaves)
        )
        if not fits:
            # Allocated once per slot and kept: a captured graph reads these addresses on replay.
            stored = ([torch.empty_like(x) if isinstance(x, torch.Tensor) else x for x in leaves], spec)
            self.buffers[index] = stored
        self.outputs[index] = pytree.tree_unflatten(stored[0], spec)
        for buffer, leaf in zip(stored[0], leaves):
            if isinstance(buffer, torch.Tensor):
                buffer.copy_(leaf)


# ---------------------------------------------------------------------------------------------
# Applying: hooks on the chosen modules, a decider in the session's plan of each UNet call.


class FeatureCache:
    """One applied feature cache on a pipeline's UNet; `remove()` undoes it exactly."""

    def __init__(self, pipe, session, name: str, modules: list[torch.nn.Module],
                 full_steps: Callable[[int], frozenset[int]]):
        self.unet = pipe.unet
        self.name = name
        self.hook_name = f"accel.{name}"
        self.state = FeatureCacheState()
        self.full_steps = full_steps
        self.session = session
        self.planner = session.planner(self.unet)
        self.hooks: dict[int, ReuseHook] = {}
        self.modules = modules
        for module in modules:
            if _has_hook(module, self.hook_name):
                raise RuntimeError(f"{self.hook_name} is already applied to this UNet")
        try:
            for module in modules:
                hook = ReuseHook(self.state)
                HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, self.hook_name)
                self.hooks[id(module)] = hook
            self.planner.add_decider(name, self.decide)
        except BaseException:
            self._remove_hooks()
            raise
        session.add_call_listener(self._on_call)
        self.noise = NoiseGuard(pipe, session, name)

    def _on_call(self, session) -> None:
        self.state.reset()

    def decide(self, call) -> tuple:
        """This UNet call's mode (full / cached / off) and slot: the decision the session records for it."""
        state = self.state
        if call.step is None:
            state.mode, state.slot = OFF, None
            return OFF, None
        if state.schedule is None:  # the first planned call of this pipeline call: the sampler is known by now
            self.noise.check()
            state.schedule = self.full_steps(self.session.num_steps())
        slot = state.slots.get(call.slot)
        if slot is None:
            slot = state.slots[call.slot] = Slot(call.slot)
        full = call.step in state.schedule or not slot.filled
        state.mode, state.slot, state.step, state.persistent = (FULL if full else CACHED), slot, call.step, call.graphed
        slot.filled = True
        if full:
            state.full_calls += 1
        else:
            state.cached_calls += 1
        return state.mode, slot.index

    def _remove_hooks(self) -> None:
        for module in self.modules:
            registry = getattr(module, "_diffusers_hook", None)
            if registry is not None and self.hook_name in registry.hooks:
                registry.remove_hook(self.hook_name, recurse=False)

    def remove(self) -> None:
        self.planner.remove_decider(self.name)
        self.session.remove_call_listener(self._on_call)
        self.noise.remove()
        self._remove_hooks()
        self.hooks.clear()
        self.state.slots.clear()


def tile_batch(x, times: int):
    """`times` copies of a batch, one after the other: (B, ...) -> (times * B, ...)."""
    if not isinstance(x, torch.Tensor) or x.ndim == 0:
        return x
    return x.repeat(times, *(1,) * (x.ndim - 1))


def _has_hook(module: torch.nn.Module, name: str) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    return registry is not None and name in registry.hooks
