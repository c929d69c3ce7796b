"""torch.compile of the denoiser: regional (repeated blocks only, short compile) or whole-forward.

Regional compilation follows diffusers' `compile_repeated_blocks` (PyTorch's regional compilation
recipe) but also covers the UNet's resnet blocks, which are most of its kernel launches.
The inductor cache is kept on disk so a second process reuses the first one's compiled code.
"""

from __future__ import annotations

import logging
import time

import torch
from diffusers.hooks import HookRegistry, ModelHook

from . import process
from .precompile import Precompile, Workers, compiled_before, default_workers, record_calls

logger = logging.getLogger(__name__)

HOOK_NAME = "accel.compile"
# The blocks that hold most kernels. Compiling the single-conv Downsample2D / Upsample2D and stand-alone
# Attention modules too cost more compile time than it saved (SD1.5, H100, cold inductor cache, first
# call: 92.3 s with them and automatic dynamic shapes, 65.0 s without them and static shapes; steady
# state 263.0 ms -> 205.2 ms end to end; `benchmarks/runtime/compile_time.py`).
REGIONAL_BLOCKS = ("BasicTransformerBlock", "Transformer2DModel", "ResnetBlock2D", "CLIPEncoderLayer")
# DiT blocks that diffusers 0.42 does not list in the model's `_repeated_blocks` (which are compiled too), and
# T5's layers for the DiTs' text encoders.
DIT_BLOCKS = ("JointTransformerBlock", "SanaTransformerBlock", "T5Block")
# Static shapes: each channel count / resolution compiles once, to kernels specialised for it. With
# dynamo's automatic dynamic shapes the second shape of a block class turned the graph dynamic, which
# compiled more slowly and ran slower.
REGIONAL_COMPILE_DEFAULTS = {"dynamic": False}


class CompileHook(ModelHook):
    """Run the wrapped forward through `torch.compile`, timing the first (compiling) call."""

    def __init__(self, **compile_kwargs):
        super().__init__()
        self.compile_kwargs = compile_kwargs
        self.compiled = None
        self.first_call_seconds: float | None = None

    def new_forward(self, module, *args, **kwargs):
        if self.compiled is None:
            self.compiled = torch.compile(self.fn_ref.original_forward, **self.compile_kwargs)
            start = time.perf_counter()
            out = self.compiled(*args, **kwargs)
            self.first_call_seconds = time.perf_counter() - start
            logger.info("accel: first compiled call took %.1f s", self.first_call_seconds)
            return out
        return self.compiled(*args, **kwargs)


class _FirstCallTimer(ModelHook):
    """Starts the compile workers (`precompile.py`) when applied, hands them the distinct regions of the first
    call, and records how long that first call, where regional compilation happens, took."""

    def __init__(self, regions: list[torch.nn.Module], compile_kwargs: dict, workers: int | None):
        super().__init__()
        self.regions, self.compile_kwargs = regions, compile_kwargs  # removal un-compiles these regions
        count = default_workers() if workers is None else workers
        if workers is None and compiled_before(regions, compile_kwargs):
            count = 0  # a warm cache: starting workers would only slow this process down
        modules = sorted({type(m).__module__ for region in regions for m in region.modules()})
        self.workers = None
        if count > 0:
            try:
                self.workers = Workers(count, modules)
            except OSError as err:  # compile time only: without workers every block compiles in this process
                logger.warning("accel: could not start %d compile workers (%s); compiling in this process", count, err)
        self.first_call_seconds: float | None = None
        self.precompile: dict | None = None

    def new_forward(self, module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        if self.first_call_seconds is not None:
            return forward(*args, **kwargs)
        start = time.perf_counter()
        precompile = None
        if self.workers is not None:
            regions = [r for r in self.regions if not _hooked(r)]  # a hooked block's graph holds its hooks
            try:
                jobs = record_calls(regions, lambda: forward(*args, **kwargs))
                precompile = Precompile(jobs, self.workers, self.compile_kwargs, self.regions)
            except Exception as err:  # an optimisation of compile time only: the call compiles as it would
                self.workers.stop()
                logger.warning("accel: parallel precompilation did not start (%s: %s); compiling in this process",
                               type(err).__name__, err)
            self.workers = None
        compiled = False
        try:
            out = forward(*args, **kwargs)
            compiled = True
        finally:
            if precompile is not None:
                self.precompile = precompile.finish(compiled)
        self.first_call_seconds = time.perf_counter() - start
        logger.info("accel: first call with regional compilation took %.1f s", self.first_call_seconds)
        return out

    def stop_workers(self) -> None:
        if self.workers is not None:
            self.workers.stop()
            self.workers = None


def _hooked(region: torch.nn.Module) -> bool:
    return any(getattr(getattr(m, "_diffusers_hook", None), "hooks", None) for m in region.modules())


def apply_compile(module: torch.nn.Module, mode: str, workers: int | None = None, **compile_kwargs) -> ModelHook:
    """`mode` is "regional" (compile each repeated block in place) or "full" (compile the forward).
    `workers`: processes that compile the distinct regions in parallel with the first call (None: half the
    cores, at most 8; 0: none, the regions compile one after another in this process)."""
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if HOOK_NAME in registry.hooks:
        raise RuntimeError("torch.compile is already applied to this module")
    process.hold()  # the on-disk inductor cache (which compile workers inherit) and the recompile limit
    try:
        hook = _compile_hook(module, mode, workers, compile_kwargs)
    except BaseException:
        process.release()
        raise
    registry.register_hook(hook, HOOK_NAME)
    return hook


def _compile_hook(module: torch.nn.Module, mode: str, workers: int | None, compile_kwargs: dict) -> ModelHook:
    if mode == "full":
        hook = CompileHook(**compile_kwargs)
    else:
        blocks = {*REGIONAL_BLOCKS, *DIT_BLOCKS}
        if "transformer_blocks" in module._modules:  # a DiT: what diffusers' compile_repeated_blocks compiles too
            blocks |= set(getattr(module, "_repeated_blocks", None) or ())
        regions = [m for m in module.modules() if type(m).__name__ in blocks and m is not module]
        # Nested regions (a resnet inside a compiled transformer) would compile twice.
        outer = [m for m in regions if not any(m is not r and _contains(r, m) for r in regions)]
        if not outer:
            raise ValueError(f"regional compilation found none of {sorted(blocks)} in {type(module).__name__}")
        compile_kwargs = {**REGIONAL_COMPILE_DEFAULTS, **compile_kwargs}
        for region in outer:
            region.compile(**compile_kwargs)
        hook = _FirstCallTimer(outer, compile_kwargs, workers)
    return hook


def _contains(parent: torch.nn.Module, child: torch.nn.Module) -> bool:
    return any(m is child for m in parent.modules())


def first_call_seconds(module: torch.nn.Module) -> float | None:
    hook = _hook(module)
    return None if hook is None else hook.first_call_seconds


def precompile_report(module: torch.nn.Module) -> dict | None:
    """What the parallel precompilation of a regionally compiled module did (None before its first call)."""
    return getattr(_hook(module), "precompile", None)


def _hook(module: torch.nn.Module):
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(HOOK_NAME)


def remove_compile(module: torch.nn.Module) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or HOOK_NAME not in registry.hooks:
        return
    hook = registry.get_hook(HOOK_NAME)
    if isinstance(hook, _FirstCallTimer):
        for region in hook.regions:
            region._compiled_call_impl = None  # what nn.Module.compile set; None is the uncompiled default
        hook.stop_workers()  # applied but never called: the idle workers go too
    registry.remove_hook(HOOK_NAME, recurse=False)
    process.release()
