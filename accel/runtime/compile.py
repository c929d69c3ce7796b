"""torch.compile of the denoiser: regional (repeated blocks only, short compile) or whole-forward.

Regional compilation follows diffusers' `compile_repeated_blocks` (PyTorch's regional compilation
recipe) but also covers the UNet's resnet blocks, which are most of its kernel launches. A block that
carries diffusers hooks (a cache's) has its own forward compiled beneath them, so the hooks run eagerly.
The inductor cache is kept on disk so a second process reuses the first one's compiled code.
With `background=True` a whole-forward compile runs in a thread while the calls run eagerly, and the calls switch
to the compiled code once it is built (`BackgroundCompile`).
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import functools
import inspect
import logging
import sys
import threading
import time
import weakref
from pathlib import Path

import torch
from diffusers.hooks import HookRegistry, ModelHook
from torch.utils import _pytree as pytree

from ..capture import _constant_key
from . import aot, process
from .process import BACKGROUND_SWITCH_INTERVAL, background_process_state  # noqa: F401 (the tests read it here)
from .precompile import (Job, Precompile, Workers, compiled_before, default_workers, prestart, record_calls,
                         stateful_hooks)

logger = logging.getLogger(__name__)

HOOK_NAME = "accel.compile"
STAGE_HOOK_NAME = "accel.compiled_stage"
# A UNet's or VAE coder's stages, in call order: with workers, a background compile builds each one's forward whole in
# its own process and the caller loads them without a trace (`BackgroundCompile._compile_stages`).
STAGE_LISTS = ("down_blocks", "mid_block", "up_blocks")
# After a background compile stage by stage, whether the whole forward compiles too: "partial" where a stage call of
# the run after loading found no compiled code, "always", or "never". On compiled stages the SD1.5 UNet took 123.9 ms
# of GPU time per 512 px image against 125.5 ms on its whole compiled forward (H200, one process), while the whole
# forward's compile took 127 s more beside the calls and slowed them to 0.18-0.25 s for most of that time
# (`benchmarks/results/runtime/first-image/`, run 14).
WHOLE_AFTER_STAGES = "partial"
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


# How long `restore` waits for a background compile before leaving its thread to finish on its own.
RESTORE_JOIN_SECONDS = 30.0
WORKER_TIMEOUT_SECONDS = 900.0  # a background compile's worker process; past this, the compile here does it all
# At interpreter exit, how long a background compile that is still running gets to unwind once interrupted.
EXIT_JOIN_SECONDS = 10.0
_RUNNING: "weakref.WeakSet[BackgroundCompile]" = weakref.WeakSet()


class _Interrupted(BaseException):
    """Raised inside a background compile's thread at interpreter exit (not an Exception: nothing in dynamo or
    inductor catches it on the way out)."""


def _interrupt_at_exit() -> None:
    """A compile thread still running when the interpreter shuts down took the process down with it ("terminate
    called without an active exception", a script that made one call with `compile_background`): interrupt each one
    (an asynchronous exception, delivered at its next Python bytecode) and wait for it to unwind."""
    for background in list(_RUNNING):
        thread = background.thread
        if thread is None or not thread.is_alive():
            continue
        background.detached = True
        # The exception can land in a finalizer (a `__del__` run by the garbage collector in that thread), which
        # Python reports as unraisable and drops (the CPU suite, 2026-12-04: regex's `Group.__del__`): so it is sent
        # again until the thread ends, and such a report of it is not printed.
        deadline = time.monotonic() + EXIT_JOIN_SECONDS
        previous = sys.unraisablehook
        sys.unraisablehook = functools.partial(_unraisable_unless_interrupted, previous)
        try:
            while thread.is_alive() and not background.interrupted and time.monotonic() < deadline:
                ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread.ident), ctypes.py_object(_Interrupted))
                thread.join(min(1.0, max(0.0, deadline - time.monotonic())))
            thread.join(max(0.0, deadline - time.monotonic()))  # caught: its unwinding (a worker stopped) ends it
        finally:
            sys.unraisablehook = previous
        if thread.is_alive():
            logger.warning("accel: the background compile of %s did not stop within %.0f s of exit", background.name,
                           EXIT_JOIN_SECONDS)


def _unraisable_unless_interrupted(hook, unraisable) -> None:
    if not isinstance(unraisable.exc_value, _Interrupted):
        hook(unraisable)


atexit.register(_interrupt_at_exit)  # with no background compile running, it does nothing




class CompileHook(ModelHook):
    """Run the wrapped forward through `torch.compile`, timing the first (compiling) call; with `background`, each
    new input signature compiles in a thread while calls run the forward eagerly (`BackgroundCompile`)."""

    def __init__(self, background: bool = False, workers: int | None = None, stages: bool = True, **compile_kwargs):
        super().__init__()
        self.compile_kwargs = compile_kwargs
        self.compiled = None
        self.first_call_seconds: float | None = None
        # Compiled forwards loaded whole (`aot.py`), by input signature; and, once `want_example` is set (a compile
        # cache about to save a new shape), the inputs of the next call, to save one: foreground compiles of a module
        # whose innermost hook this is only.
        self.preloaded: dict[str, object] = {}
        self.want_example = False
        self.example: tuple | None = None
        self.background: BackgroundCompile | None = None
        self._background, self._workers, self._stages = background, workers, stages

    def initialize_hook(self, module):
        if self._background:
            self.background = BackgroundCompile(module, HOOK_NAME, self._workers, self.compile_kwargs,
                                                eager=self._run_eager if self._stages else None)
        return module

    def new_forward(self, module, *args, **kwargs):
        if self.background is not None:
            mode = self.background.mode(self._run_compiled, args, kwargs)
            if mode == "compiled":
                return self._run_compiled(*args, **kwargs)
            return self.fn_ref.original_forward(*args, **kwargs)  # eager, or its stages' compiled forwards
        if self.preloaded and not torch.is_grad_enabled():
            fn = self.preloaded.get(aot.signature(args, kwargs))
            if fn is not None:  # traced and compiled in an earlier process: no trace here
                if self.first_call_seconds is None:
                    start = time.perf_counter()
                    out = fn(module, *args, **kwargs)
                    self.first_call_seconds = time.perf_counter() - start
                    logger.info("accel: first call ran the saved compiled forward of %s in %.1f s",
                                type(module).__name__, self.first_call_seconds)
                    return out
                return fn(module, *args, **kwargs)
        if self.want_example and not _capturing() and not torch.is_grad_enabled() and self.innermost(module):
            self.example, self.want_example = _copies(args, kwargs), False
        if self.first_call_seconds is None:
            start = time.perf_counter()
            out = self._run_compiled(*args, **kwargs)
            self.first_call_seconds = time.perf_counter() - start
            logger.info("accel: first compiled call took %.1f s", self.first_call_seconds)
            return out
        if self.compiled is None:  # the saved forward served the first calls; these inputs differ
            return self._run_compiled(*args, **kwargs)
        return self.compiled(*args, **kwargs)

    def _run_eager(self, *args, **kwargs):
        return self.fn_ref.original_forward(*args, **kwargs)

    def innermost(self, module) -> bool:
        """Whether this hook wraps the module's class forward itself (no other hook beneath it): then a saved whole
        compiled forward (`aot.class_forward`) is what this hook compiles."""
        return getattr(self.fn_ref.original_forward, "__func__", None) is type(module).forward

    def _run_compiled(self, *args, **kwargs):
        """The compiled forward, its `torch.compile` wrapper made at the first use: with `background`, in the compile
        thread, since making it imports dynamo and inductor (the CPU smoke's first image 2.1 -> 1.2 s)."""
        if self.compiled is None:
            self.compiled = torch.compile(self.fn_ref.original_forward, **self.compile_kwargs)
        return self.compiled(*args, **kwargs)


class BackgroundCompile:
    """The compiles of one module's compiled forward, one per input signature, each run in a thread.

    The first call of a signature starts a thread that runs the compiled forward once, under no_grad, on detached
    copies of that call's inputs (dynamo traces, inductor builds; the output is dropped), while that call and the
    next run the forward eagerly; once the thread is done, the next call of that signature runs the compiled code
    (one log line). The thread calls the forward below this hook, not the module: the session's planner, the
    CUDA-graph hook and the pipeline's scheduler are not touched. A module with hooks inside its forward (a cache's
    hooks on its blocks keep state) compiles in the calling thread, as without `background`. While any background
    compile runs, no CUDA graph is captured (`accel.capture.capture_paused`).

    Where workers compile and the module is made of stages (a UNet's or VAE coder's down, mid and up blocks) and
    `eager` (the forward below the hook) is given, the thread records each stage's call on the signature's inputs
    and worker processes build each distinct stage's forward whole, in parallel, into files (`aot.py`); the thread
    loads them, without a trace of its own, and the module's calls then run its own forward with the stages on that
    code (`_StageHook`). Any stage not built sends the signature on to the whole-forward compile. On compiled stages
    the SD1.5 UNet runs as fast as on its whole compiled forward (H200: 123.9 against 125.5 ms of GPU time per image);
    where a stage call still runs its own forward after loading (`WHOLE_AFTER_STAGES`), a worker then compiles the
    whole forward as without stages, the thread traces it and reads the worker's cache, and the calls move to it:
    `generation` counts such moves, on which the CUDA-graph hook captures again.
    (`benchmarks/results/runtime/first-image/`, runs 10-14.)
    """

    def __init__(self, module: torch.nn.Module, hook_name: str, workers: int | None = None,
                 compile_kwargs: dict | None = None, eager=None):
        self.module, self.hook_name, self.name = module, hook_name, type(module).__name__
        # A worker process compiles first (None: where the module is on a CUDA GPU; 0: never), so that the thread
        # here, which then only traces and reads the worker's cache entries, holds the calls up for seconds, not for
        # the whole compile (SD1.5 on the H200: 4-9 s calls, eager 0.54 s, while a thread compiled the UNet).
        self.workers, self.compile_kwargs = workers, dict(compile_kwargs or {})
        self.worker: Workers | None = None
        self.worker_reports: list[dict] = []
        self.eager = eager
        self.staged: set[tuple] = set()  # signatures whose calls run the forward on compiled stages
        self.whole: set[tuple] = set()  # staged signatures whose whole forward compiled since: they run it
        self.generation = 0
        self.stage_hooks: list[torch.nn.Module] = []  # the stages given a `_StageHook`
        self.states: dict[tuple, str] = {}  # signature -> "compiling", "compiled", "failed"
        self.seconds: dict[tuple, float] = {}
        self.switched: set[tuple] = set()
        self.thread: threading.Thread | None = None
        self.detached = False
        self.interrupted = False  # the thread caught the exit's interruption (`_interrupt_at_exit`)
        # Set where portable artifacts for the next compile were just loaded (`mark_artifacts_loaded`): the thread
        # reads them itself; a worker would start, trace and read them first, for nothing.
        self.artifacts_loaded = False
        # With `defer()` (a pipeline's session does it), compiles wait for `start_deferred()` at the end of the
        # pipeline call: the first image runs eagerly without a compiling thread beside it.
        self.deferred = False
        self.waiting: dict[tuple, tuple] = {}  # signature -> (compiled, copies of the call's inputs)
        self._foreground: bool | None = None  # decided at the first call, when every technique's hooks are on
        parameters = list(inspect.signature(type(module).forward).parameters.values())[1:]
        self._signature = inspect.Signature(parameters)

    @property
    def foreground(self) -> bool:
        if self._foreground is None:
            self._foreground = _runs_hooks(self.module, self.hook_name)
            if self._foreground:
                logger.info("accel: %s runs hooks inside its forward; it compiles on its first call, not in the "
                            "background", self.name)
        return self._foreground

    def key(self, args: tuple, kwargs: dict) -> tuple:
        """The input signature: argument structure (by parameter name), shapes, dtypes, devices, other values."""
        try:
            arguments = self._signature.bind(*args, **kwargs).arguments
        except TypeError:
            arguments = {"args": args, **kwargs}
        leaves, spec = pytree.tree_flatten(dict(arguments))
        return (spec, tuple((tuple(x.shape), x.dtype, x.device) if isinstance(x, torch.Tensor) else _constant_key(x)
                            for x in leaves))

    def settled(self, args: tuple, kwargs: dict) -> bool:
        """This signature's compile is over (compiled, or failed and running eagerly for good)."""
        return self.foreground or self.states.get(self.key(args, kwargs)) in ("compiled", "failed")

    def mode(self, compiled, args: tuple, kwargs: dict) -> str:
        """How this call runs: "compiled" (`compiled`), "staged" (the forward, its stages on compiled code) or
        "eager"; starts the signature's background compile where none ran yet."""
        if self.foreground or torch.is_grad_enabled():
            return "compiled"  # as without background: the compile runs in this call
        key = self.key(args, kwargs)
        state = self.states.get(key)
        if state == "compiled":
            if background_process_state.busy():
                # Another component still compiles: while it traces, torch.fx's process-wide flag makes dynamo refuse
                # to run compiled code in any thread ("FX to symbolically trace a dynamo-optimized function"; H200,
                # the text encoder's compiled code during the UNet's trace). Eager until every compile is over.
                return "eager"
            if key not in self.switched:
                self.switched.add(key)
                logger.info("accel: %s switches to its compiled code (compiled in the background in %.1f s%s)",
                            self.name, self.seconds[key], ", stage by stage" if key in self.staged else "")
            if key in self.whole:
                if ("whole", key) not in self.switched:
                    self.switched.add(("whole", key))
                    logger.info("accel: %s switches to its whole compiled forward (compiled in the background in "
                                "%.1f s more)", self.name, self.seconds[("whole", key)])
                return "compiled"
            return "staged" if key in self.staged else "compiled"
        if state is None and self.deferred:
            if key not in self.waiting:
                self.waiting[key] = (compiled, _copies(args, kwargs))
        elif state is None and not self.running() and not _capturing():
            self._start(key, compiled, _copies(args, kwargs))
        return "eager"

    def defer(self) -> None:
        self.deferred = True

    def start_deferred(self) -> None:
        """End the deferral: start the first waiting signature's compile (the others start at their next call)."""
        self.deferred = False
        waiting, self.waiting = self.waiting, {}
        for key, (compiled, copies) in waiting.items():
            if self.states.get(key) is None and not self.running() and not _capturing() and not self.detached:
                self._start(key, compiled, copies)
                break

    def running(self) -> bool:
        return self.thread is not None and self.thread.is_alive()

    def _start(self, key, compiled, copies: tuple) -> None:
        device = next((x.device for x in pytree.tree_leaves(copies) if isinstance(x, torch.Tensor)
                       and x.device.type == "cuda"), None)
        if device is not None:
            torch.cuda.current_stream(device).synchronize()  # the thread runs on its own current stream
        # Dynamo guards on these thread-local modes: the compiled code must match the calls' own.
        device_type = device.type if device is not None else "cpu"
        modes = (torch.is_inference_mode_enabled(), device_type, torch.is_autocast_enabled(device_type),
                 torch.get_autocast_dtype(device_type))
        self.states[key] = "compiling"
        _RUNNING.add(self)
        background_process_state.acquire()
        worker, self.artifacts_loaded = not self.artifacts_loaded, False
        if not worker:
            logger.info("accel: %s compiles in its thread from the artifacts just loaded, without a worker", self.name)
        self.thread = threading.Thread(target=self._compile, args=(key, compiled, copies, device, modes, worker),
                                       name=f"accel-compile-{self.name}", daemon=True)
        try:
            self.thread.start()
        except BaseException:
            self.states[key] = "failed"
            background_process_state.release()
            raise

    def _compile(self, key, compiled, copies, device, modes, worker: bool = True) -> None:
        start = time.perf_counter()
        state, staged = "failed", False
        try:
            with _entered(device, modes):
                staged = worker and self._use_worker(device, modes[2]) and self._compile_stages(copies, modes[0])
                if staged:
                    self.staged.add(key)
                else:
                    if worker and self._use_worker(device, modes[2]):
                        self._compile_in_worker(copies, modes[0])
                    compiled(*copies[0], **copies[1])
                if device is not None:
                    torch.cuda.synchronize(device)
            state = "compiled"
        except _Interrupted:  # the interpreter is exiting
            self.interrupted = True
            self._stop_worker()
        except Exception as err:  # compile time only: the calls keep running the forward eagerly
            if not self.detached:
                logger.warning("accel: the background compile of %s failed (%s: %s); its calls keep running eagerly",
                               self.name, type(err).__name__, err)
        finally:
            self.seconds[key] = time.perf_counter() - start
            self.states[key] = state  # before capture resumes, so that a capture sees the compiled code
            background_process_state.release()
        if staged and state == "compiled" and not self.detached and self._whole_after_stages():
            try:
                self._compile_whole(key, compiled, copies, device, modes)
            except _Interrupted:
                self.interrupted = True
                self._stop_worker()

    def _whole_after_stages(self) -> bool:
        """Whether the whole forward compiles after the stages (`WHOLE_AFTER_STAGES`): by default only where some stage
        call of the run after loading still ran its own forward (a signature no worker built)."""
        own = self.worker_reports[-1].get("own_forward_calls", 0) if self.worker_reports else 0
        if own:
            logger.info("accel: %d stage calls of %s found no compiled code and ran their own forward", own, self.name)
        else:
            logger.info("accel: %s runs every stage on compiled code", self.name)
        return WHOLE_AFTER_STAGES == "always" or (WHOLE_AFTER_STAGES == "partial" and own > 0)

    def _compile_whole(self, key, compiled, copies: tuple, device, modes: tuple) -> None:
        """The second step after the stages: a worker compiles the whole forward into the inductor cache while the
        calls run the stages (nothing of the process held), then this thread traces it and reads the cache (the
        process held, as for any trace: CUDA graphs captured before keep replaying). The calls of `key` then run it
        from their next CUDA-graph capture on (`generation`)."""
        start = time.perf_counter()
        with _entered(device, modes):  # the worker compiles under the grad mode of this thread
            self._compile_in_worker(copies, modes[0], whole=True)
        if self.detached:
            return
        background_process_state.acquire()
        try:
            with _entered(device, modes):
                compiled(*copies[0], **copies[1])
                if device is not None:
                    torch.cuda.synchronize(device)
            self.seconds[("whole", key)] = time.perf_counter() - start
            self.whole.add(key)
            self.generation += 1  # the CUDA-graph hook captures again, on the whole forward
        except Exception as err:  # the calls keep running the stages
            if not self.detached:
                logger.warning("accel: the whole forward of %s did not compile (%s: %s); it keeps running its compiled "
                               "stages", self.name, type(err).__name__, err)
        finally:
            background_process_state.release()

    def _use_worker(self, device, autocast: bool) -> bool:
        if autocast:  # the worker would trace without it
            return False
        return _workers_on(self.workers, device)

    def _compile_in_worker(self, copies: tuple, inference: bool, whole: bool = False) -> None:
        """Have a worker process compile the forward on these inputs into the shared inductor cache, and wait for it
        (the wait holds no GIL). Whatever goes wrong, the compile here still runs: it reads what the worker finished."""
        start = time.perf_counter()
        report = {"started_s": None, "seconds": None, "failed": None, "log": None, **({"whole": True} if whole else {})}
        try:
            self.worker = Workers(1, sorted({type(m).__module__ for m in self.module.modules()}))
            report["log"] = str(self.worker.folder / "worker-0.log")  # its timeline and dynamo's breakdown
            report["started_s"] = round(time.perf_counter() - start, 3)
            self.worker.submit([[Job(self.module, copies[0], copies[1])]], self.compile_kwargs,
                               target="forward", inference=inference)
            self.worker.wait(timeout=WORKER_TIMEOUT_SECONDS)  # polls: an exit's interruption gets through
            failed, stopped = self.worker.stop()
            report["failed"] = bool(failed or stopped)
        except Exception as err:  # compile time only: the compile here does it all
            report["failed"] = f"{type(err).__name__}: {err}"
            self._stop_worker()
        finally:
            self.worker = None
        report["seconds"] = round(time.perf_counter() - start, 3)
        self.worker_reports.append(report)
        if report["failed"]:
            logger.info("accel: the compile worker of %s did not finish (%s); compiling here", self.name,
                        report["failed"])

    def _compile_stages(self, copies: tuple, inference: bool) -> bool:
        """Build the module's stages on these inputs in worker processes, one whole compiled forward each, and put
        them under the stages (`_StageHook`); True once the forward ran on them here. False (logged) where the module
        has no stages, a stage carries other hooks, torch cannot save compiled forwards, or any stage was not built."""
        stages = _stages(self.module)
        if self.eager is None or len(stages) < 2 or not aot.available():
            return False
        if any(_other_hooks(stage) for stage in stages):
            return False  # a hook on a stage runs around its forward: a saved class forward would skip it
        start = time.perf_counter()
        report = {"started_s": None, "seconds": None, "failed": None, "log": None, "stages": None}
        installed: list[tuple[torch.nn.Module, str]] = []
        try:
            keys: dict[torch.nn.Module, tuple] = {}
            jobs = record_calls(stages, lambda: self.eager(*copies[0], **copies[1]), keys)
            count = max(1, min(len(jobs), default_workers()))
            self.worker = Workers(count, sorted({type(m).__module__ for m in self.module.modules()}))
            report["log"] = str(self.worker.folder)  # worker-N.log: each one's timeline and dynamo's breakdown
            report["started_s"] = round(time.perf_counter() - start, 3)
            for index, job in enumerate(jobs):
                job.path = str(self.worker.folder / f"stage-{index}{aot.SUFFIX}")
            parts = _by_size(jobs, count)
            self.worker.submit(parts, self.compile_kwargs, target="aot", inference=inference)
            loaded = {}
            # Each worker's stages are loaded, and run once on their recorded inputs (their kernels' loading), as
            # soon as it exits, while the others still compile (run 13 on the H200: 5.1 s of loading after the last
            # worker, when it waited for all of them; run 16: 3.3 s with the loading alone done so).
            for index, _ in self.worker.as_finished(WORKER_TIMEOUT_SECONDS):
                for job in parts[index]:
                    found = aot.load(Path(job.path))
                    if found is not None and found[1] == aot.signature(job.args, job.kwargs):
                        found[0](job.region, *job.args, **job.kwargs)
                        loaded[job.key] = (found[0], job)
            failed, stopped = self.worker.stop()
            report["stages"], report["built_s"] = len(jobs), round(time.perf_counter() - start, 3)
            missing = [job for job in jobs if job.key not in loaded]
            if missing:
                report["failed"] = f"{type(missing[0].region).__name__} not built (workers failed: {failed}, " \
                                   f"stopped: {stopped}; logs in {report['log']})"
            else:
                for stage, key in keys.items():
                    fn, job = loaded[key]
                    installed.append((stage, _stage_hook(stage).add(fn, job.args, job.kwargs)))
                    if stage not in self.stage_hooks:
                        self.stage_hooks.append(stage)
                before = sum(_stage_hook(stage).calls[1] for stage in self.stage_hooks)
                self.eager(*copies[0], **copies[1])  # the module's run on its stages: does every stage call find code?
                report["own_forward_calls"] = sum(_stage_hook(s).calls[1] for s in self.stage_hooks) - before
        except Exception as err:  # compile time only: the whole forward compiles instead
            report["failed"] = f"{type(err).__name__}: {err}"
        finally:
            self._stop_worker()
            report["seconds"] = round(time.perf_counter() - start, 3)
            self.worker_reports.append(report)
        if report["failed"]:
            for stage, digest in installed:
                _stage_hook(stage).remove(digest)
            logger.info("accel: the stages of %s were not built in workers (%s); compiling its whole forward",
                        self.name, report["failed"])
            return False
        report["load_s"] = round(report["seconds"] - report["built_s"], 3)
        return True

    def _stop_worker(self) -> None:
        worker, self.worker = self.worker, None
        if worker is not None:
            worker.stop()

    def stop(self, timeout: float | None = None) -> None:
        """Wait up to `timeout` seconds (None: `RESTORE_JOIN_SECONDS`) for a running compile; past that, leave its
        thread to finish on its own. A worker process compiling for it is ended at once."""
        self.detached = True
        self._stop_worker()
        timeout = RESTORE_JOIN_SECONDS if timeout is None else timeout
        if self.running():
            self.thread.join(timeout)
            if self.thread.is_alive():
                logger.warning("accel: the background compile of %s was still running after %.0f s; left to finish "
                               "on its own, its result unused", self.name, timeout)
        for stage in self.stage_hooks:
            registry = getattr(stage, "_diffusers_hook", None)
            if registry is not None and STAGE_HOOK_NAME in registry.hooks:
                registry.remove_hook(STAGE_HOOK_NAME, recurse=False)
        self.stage_hooks, self.staged, self.whole = [], set(), set()

    def report(self) -> dict:
        """The compiles' states and times, their workers' reports and, stage by stage, how many calls (CUDA-graph
        captures included, replays not) ran on the stage's compiled code and how many on its own forward."""
        states = list(self.states.values())
        stages = {}
        for stage in self.stage_hooks:
            registry = getattr(stage, "_diffusers_hook", None)
            if registry is not None and STAGE_HOOK_NAME in registry.hooks:
                name = next(n for n, m in self.module.named_modules() if m is stage)
                stages[name] = list(registry.get_hook(STAGE_HOOK_NAME).calls)
        return {"running": self.running(), "compiled": states.count("compiled"), "failed": states.count("failed"),
                "seconds": [round(s, 3) for s in self.seconds.values()], "workers": list(self.worker_reports),
                **({"stage_calls": stages} if stages else {})}


class _StageHook(ModelHook):
    """Runs a stage's whole compiled forward (built by a worker, `aot.py`) for the input signatures it was built for;
    any other call, any call with grad, and dynamo's trace of the module (the whole forward's compile after the
    stages) run the stage's own forward.

    A stage's inputs were recorded with every stage eager, so a compiled stage before it may hand it the same tensors
    in another layout: inductor's channels-last output of a decoder block in place of eager's contiguous one, or other
    strides on a size-1 dimension (on the H200, 3 of the SD VAE decoder's 5 stages ran eagerly for that: 13.7 ms per
    decode against 7.2 ms). Such a call gets its tensors in the recorded strides (a view where only size-1 dimensions
    differ, else a copy) and runs the compiled code."""

    # Its state is the loaded code, never read in a trace: a compile worker's copy of the module gets an empty one, so
    # that the worker's whole-forward graph, traced through it, is the one the thread here traces (one cache entry).
    stateless = True

    def __init__(self):
        super().__init__()
        # aot.signature without strides -> (the loaded compiled forward, its example inputs' tensor strides)
        self.fns: dict[str, tuple[object, list]] = {}
        # calls run on the loaded code, calls with no-grad that found none (their own forward), calls restrided to it
        self.calls = [0, 0, 0]

    def fresh(self) -> "_StageHook":
        return _StageHook()

    def add(self, fn, args: tuple, kwargs: dict) -> str:
        """The compiled forward `fn`, built for these example inputs, for their signature; returns its key."""
        key = aot.signature(args, kwargs, strides=False)
        self.fns[key] = (fn, [x.stride() for x in pytree.tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)])
        return key

    def remove(self, key: str) -> None:
        self.fns.pop(key, None)

    def new_forward(self, module, *args, **kwargs):
        # is_compiling first: in a trace the rest is never read, so no guard falls on the loaded code's table
        if not torch.compiler.is_compiling() and self.fns and not torch.is_grad_enabled():
            found = self.fns.get(aot.signature(args, kwargs, strides=False))
            if found is None:
                self.calls[1] += 1
            else:
                (args, kwargs), restrided = _restrided((args, kwargs), found[1])
                self.calls[2 if restrided else 0] += 1
                return found[0](module, *args, **kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)


def _restrided(tree, strides: list) -> tuple:
    """(`tree` with its tensors, in order, in the given strides, whether any had others): a view where they differ on
    size-1 dimensions only (which no element is addressed by), else a copy."""
    leaves, spec = pytree.tree_flatten(tree)
    tensors = [x for x in leaves if isinstance(x, torch.Tensor)]
    if all(x.stride() == tuple(stride) for x, stride in zip(tensors, strides)):
        return tree, False
    wanted = iter(strides)
    out, changed = [], False
    for x in leaves:
        if isinstance(x, torch.Tensor):
            stride = tuple(next(wanted))
            if x.stride() != stride:
                changed = True
                if all(a == b or n == 1 for a, b, n in zip(x.stride(), stride, x.shape)):
                    x = x.as_strided(x.shape, stride)
                else:
                    x = torch.empty_strided(x.shape, stride, dtype=x.dtype, device=x.device).copy_(x)
        out.append(x)
    return pytree.tree_unflatten(out, spec), changed


def _stages(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The module's stages (`STAGE_LISTS`), in call order; none where it has fewer than two."""
    found = []
    for name in STAGE_LISTS:
        child = module._modules.get(name)
        if isinstance(child, torch.nn.ModuleList):
            found.extend(child)
        elif child is not None:
            found.append(child)
    return found if len(found) >= 2 else []


def _by_size(jobs: list[Job], count: int) -> list[list[Job]]:
    """The stages dealt to `count` workers so that each gets about as many layers (a compile's time goes with the
    operations in the graph, not with the resolution): the largest first, each to the least loaded worker."""
    parts: list[list[Job]] = [[] for _ in range(count)]
    loads = [0] * count
    for job in sorted(jobs, key=lambda j: -sum(1 for _ in j.region.modules())):
        index = loads.index(min(loads))
        parts[index].append(job)
        loads[index] += sum(1 for _ in job.region.modules())
    return [part for part in parts if part]


def _other_hooks(stage: torch.nn.Module) -> bool:
    """Whether hooks other than ours run around the stage's forward."""
    registry = getattr(stage, "_diffusers_hook", None)
    names = set(getattr(registry, "hooks", {})) - {STAGE_HOOK_NAME}
    return bool(names or stage._forward_hooks or stage._forward_pre_hooks)


def _stage_hook(stage: torch.nn.Module) -> _StageHook:
    registry = HookRegistry.check_if_exists_or_initialize(stage)
    if STAGE_HOOK_NAME not in registry.hooks:
        registry.register_hook(_StageHook(), STAGE_HOOK_NAME)
    return registry.get_hook(STAGE_HOOK_NAME)


def _entered(device, modes: tuple) -> contextlib.ExitStack:
    """The calls' thread-local modes (inference, device type, autocast, its dtype), entered in a compile thread:
    dynamo guards on them, so the compiled code must match the calls' own."""
    inference, device_type, autocast, autocast_dtype = modes
    stack = contextlib.ExitStack()
    # inference_mode(False) would turn grad mode on: entered only where the calls run under it
    stack.enter_context(torch.inference_mode() if inference else torch.no_grad())
    stack.enter_context(torch.autocast(device_type, autocast_dtype, enabled=autocast))
    if device is not None:
        stack.enter_context(torch.cuda.device(device))
    return stack


def _copies(args: tuple, kwargs: dict) -> tuple:
    """Detached copies of a call's tensors (the caller may change them in place after the call)."""
    return pytree.tree_map(lambda x: x.detach().clone() if isinstance(x, torch.Tensor) else x, (args, kwargs))


def _capturing() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def _runs_hooks(module: torch.nn.Module, hook_name: str) -> bool:
    """Whether the forward below hook `hook_name` of `module` runs other hooks (which may keep state)."""
    registry = getattr(module, "_diffusers_hook", None)
    names = list(getattr(registry, "hooks", {}))
    if hook_name in names and names.index(hook_name) > 0:
        return True
    for sub in module.modules():
        if sub is not module and (stateful_hooks(sub) or sub._forward_hooks or sub._forward_pre_hooks):
            return True
    return False


class _FirstCallTimer(ModelHook):
    """Starts the compile workers (`precompile.py`) when applied, hands them the distinct regions of the first
    call, and records how long that first call, where regional compilation happens, took."""

    def __init__(self, regions: list[torch.nn.Module], compile_kwargs: dict, workers: int | None,
                 beneath_hooks: dict[torch.nn.Module, tuple] | None = None):
        super().__init__()
        self.regions, self.compile_kwargs = regions, compile_kwargs  # removal un-compiles these regions
        self.beneath_hooks = beneath_hooks or {}  # region -> (its forward, compiled) for hooked regions
        count = default_workers() if workers is None else workers
        if workers is None and compiled_before(regions, compile_kwargs):
            count = 0  # a warm cache: starting workers would only slow this process down
        if all(_hooked(region) for region in regions):
            count = 0  # hooked blocks compile here (below): the workers would get none
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
            # A hooked block compiles beneath its hooks, here: a worker would compile a copy with its hooks.
            regions = [r for r in self.regions if not _hooked(r)]
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
    """Whether a hook that may keep state runs inside the block (stateless ones, the pinned attention kernel, travel
    to the compile workers)."""
    return any(stateful_hooks(m) for m in region.modules())


def apply_compile(module: torch.nn.Module, mode: str, workers: int | None = None, background: bool = False,
                  stages: bool = True, **compile_kwargs) -> ModelHook:
    """`mode` is "regional" (compile each repeated block in place) or "full" (compile the forward).
    `workers`: processes that compile the distinct regions in parallel with the first call (None: half the
    cores, at most 8; 0: none, the regions compile one after another in this process).
    `background`: with "full", compile each new input signature in a thread while calls run eagerly; with workers
    and `stages`, a module made of stages is built stage by stage in parallel worker processes (`BackgroundCompile`)."""
    if background and mode != "full":
        raise ValueError(f"background compilation applies to mode='full'; mode is {mode!r}")
    registry = HookRegistry.check_if_exists_or_initialize(module)
    if HOOK_NAME in registry.hooks:
        raise RuntimeError("torch.compile is already applied to this module")
    process.hold()  # the on-disk inductor cache (which compile workers inherit) and the recompile limit
    try:
        hook = _compile_hook(module, mode, workers, background, compile_kwargs, stages)
    except BaseException:
        process.release()
        raise
    registry.register_hook(hook, HOOK_NAME)
    return hook


def _compile_hook(module: torch.nn.Module, mode: str, workers: int | None, background: bool,
                  compile_kwargs: dict, stages: bool = True) -> ModelHook:
    if mode == "full":
        hook = CompileHook(background, workers, stages, **compile_kwargs)
        first = next(module.parameters(), None)
        device = first.device if first is not None and first.device.type == "cuda" else None
        if background and stages and _workers_on(workers, device):
            # the workers' fork server imports while the first image runs, and is ready when the compile starts; not
            # where artifacts are kept (`stages` off): they load without a worker, and a server would sit idle, a
            # process of ~600 MB importing beside the first image (it still starts at a worker's request)
            prestart(sorted({type(m).__module__ for m in module.modules()}))
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
        beneath_hooks = {}
        for region in outer:
            if _hooked_itself(region):
                beneath_hooks[region] = _compile_beneath_hooks(region, compile_kwargs)
            else:
                region.compile(**compile_kwargs)
        hook = _FirstCallTimer(outer, compile_kwargs, workers, beneath_hooks)
    return hook


def _workers_on(workers: int | None, cuda_device) -> bool:
    """Whether a background compile has worker processes compile first: as many as `workers` says, or (None) where
    the module is on a CUDA GPU (`cuda_device` not None)."""
    return workers > 0 if workers is not None else cuda_device is not None


def _hooked_itself(region: torch.nn.Module) -> bool:
    registry = getattr(region, "_diffusers_hook", None)
    return bool(registry is not None and registry._fn_refs)


def _compile_beneath_hooks(region: torch.nn.Module, compile_kwargs: dict) -> tuple:
    """Compile the block's own forward, which its innermost diffusers hook calls, instead of the whole call: traced,
    the hooks' Python state (a cache's decision, its per-block records) would be guarded on, one recompilation per
    block and decision (a Flux block cache: one per block, past dynamo's recompile limit). Returns (forward,
    compiled) for `_uncompile_beneath_hooks`."""
    innermost = region._diffusers_hook._fn_refs[0]
    attr = "forward" if innermost.original_forward is None else "original_forward"  # a hook with new_forward
    forward = getattr(innermost, attr)
    compiled = torch.compile(forward, **compile_kwargs)
    setattr(innermost, attr, compiled)
    return forward, compiled


def _uncompile_beneath_hooks(region: torch.nn.Module, forward, compiled) -> None:
    """Put the block's forward back wherever the compiled one is now: under its innermost hook, or (hooks removed
    since, which hands the forward on) under the next one or as the block's forward."""
    registry = getattr(region, "_diffusers_hook", None)
    for fn_ref in getattr(registry, "_fn_refs", ()):
        for attr in ("forward", "original_forward"):
            if getattr(fn_ref, attr) is compiled:
                setattr(fn_ref, attr, forward)
    if region.__dict__.get("forward") is compiled:
        region.forward = forward


def _contains(parent: torch.nn.Module, child: torch.nn.Module) -> bool:
    return any(m is child for m in parent.modules())


def first_call_seconds(module: torch.nn.Module) -> float | None:
    hook = _hook(module)
    return None if hook is None else hook.first_call_seconds


def precompile_report(module: torch.nn.Module) -> dict | None:
    """What the parallel precompilation of a regionally compiled module did (None before its first call)."""
    return getattr(_hook(module), "precompile", None)


def background_compile_report(module: torch.nn.Module) -> dict | None:
    """The background compiles of `module` so far ({"running", "compiled", "failed", "seconds"}); None where its
    compile does not run in the background or no call has run yet."""
    background = getattr(_hook(module), "background", None)
    return None if background is None else background.report()


def compile_settled(module: torch.nn.Module, args: tuple, kwargs: dict) -> bool:
    """Whether a call of `module` with these inputs runs the code it will keep running: False while its compile
    for them is to run or runs in the background (a CUDA graph captured now would hold the eager forward)."""
    background = getattr(_hook(module), "background", None)
    return background is None or background.settled(args, kwargs)


def compile_generation(module: torch.nn.Module) -> int:
    """How many times the module's background compile moved its calls to other compiled code once they ran compiled
    code (the stages, then the whole forward): CUDA graphs captured before hold the earlier code."""
    background = getattr(_hook(module), "background", None)
    return 0 if background is None else background.generation


def mark_artifacts_loaded(module: torch.nn.Module) -> None:
    """Portable artifacts for `module`'s coming background compile were just loaded: that compile runs in its thread
    alone, which reads them, without a worker process."""
    background = getattr(_hook(module), "background", None)
    if background is not None:
        background.artifacts_loaded = True


def background_state(module: torch.nn.Module) -> str | None:
    """"running" (a background compile of `module` runs), "waiting" (a signature waits for the end of a pipeline
    call to start its compile), "failed" (none runs or waits, and one failed: its calls run eagerly), "idle", or None
    where `module` compiles in no background (also where its first call found hooks inside it and compiled there)."""
    background = getattr(_hook(module), "background", None)
    if background is None or background._foreground:  # (decided at its first call) compiles in the call instead
        return None
    if background.running():
        return "running"
    if background.waiting:
        return "waiting"
    return "failed" if "failed" in background.states.values() else "idle"


def compile_pending(module: torch.nn.Module) -> bool:
    """Whether a background compile of `module` runs, or waits for the end of the pipeline call to start."""
    return background_state(module) in ("running", "waiting")


def _foreground_hook(module: torch.nn.Module) -> CompileHook | None:
    """The module's full-compile hook where it compiles in the call (not in the background); else None."""
    hook = _hook(module)
    return hook if isinstance(hook, CompileHook) and hook.background is None else None


def want_example(module: torch.nn.Module) -> None:
    """Have the module's foreground compile hook keep the inputs of its next call (`aot_example` takes them)."""
    hook = _foreground_hook(module)
    if hook is not None:
        hook.want_example, hook.example = True, None


def aot_example(module: torch.nn.Module) -> tuple | None:
    """(the compile hook, (args, kwargs) of the call kept since `want_example`) where a whole compiled forward of the
    module can be saved (`aot.py`: a foreground compile, the innermost hook); else None. Taken: a second call
    returns None until `want_example` again."""
    hook = _foreground_hook(module)
    if hook is None or hook.example is None:
        return None
    example, hook.example, hook.want_example = hook.example, None, False
    return hook, example


def preload(module: torch.nn.Module, signature: str, fn) -> bool:
    """Let the module's foreground compile hook run `fn` (a loaded whole compiled forward) for calls of `signature`;
    False where it cannot (no such hook, a background compile, another hook beneath it)."""
    hook = _foreground_hook(module)
    if hook is None or not hook.innermost(module):
        return False
    hook.preloaded[signature] = fn
    return True


def _hook(module: torch.nn.Module):
    registry = getattr(module, "_diffusers_hook", None)
    return None if registry is None else registry.get_hook(HOOK_NAME)


def remove_compile(module: torch.nn.Module) -> None:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None or HOOK_NAME not in registry.hooks:
        return
    hook = registry.get_hook(HOOK_NAME)
    if getattr(hook, "background", None) is not None:
        hook.background.stop()
    if isinstance(hook, _FirstCallTimer):
        for region in hook.regions:
            if region in hook.beneath_hooks:
                _uncompile_beneath_hooks(region, *hook.beneath_hooks[region])
            else:
                region._compiled_call_impl = None  # what nn.Module.compile set; None is the uncompiled default
        hook.stop_workers()  # applied but never called: the idle workers go too
    registry.remove_hook(HOOK_NAME, recurse=False)
    process.release()
