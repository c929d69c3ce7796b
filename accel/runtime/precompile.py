"""Cold regional compilation in parallel: worker processes compile the distinct blocks alongside the caller.

Regional compilation compiles one graph per distinct block (class, weight shapes, input shapes): 19 for
the SD1.5 UNet at one resolution, one after another in the calling process; most of its cold first call
is inductor lowering, code generation and Triton compiles (dynamo's compile metrics in
`benchmarks/runtime/compile_time.py`), and the blocks do not depend on each other. So the first call
records each distinct block call (one eager forward) and hands the blocks (their weights left behind:
shapes are all a compile needs) and their inputs to worker processes, which compile them with the same
settings into the shared on-disk inductor cache, starting from the last block called. The caller does
not wait: it compiles as usual from the first block, and reads from the cache every block a worker
finished before it got there. Its result never depends on the workers; a block they miss (a failed
worker, a graph that differs) costs what it would have cost anyway.

A marker in the inductor cache remembers a compiled block set, so a warm start spawns no workers.

The workers are forked from one server process per environment (`ForkServer`), which imports torch, inductor,
diffusers and accel once: spawned apart, 13 workers each spent 18.5-20.1 s on their imports (H200, run 13).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from .process import bytecode_environment, environment_defaults, inductor_cache_dir

logger = logging.getLogger(__name__)

MARKERS = "accel-precompiled"
# Global switches that enter inductor's cache key or change what a graph does; workers copy them.
_BACKEND_FLAGS = (
    ("cuda.matmul", "allow_tf32"),
    ("cuda.matmul", "allow_fp16_reduced_precision_reduction"),
    ("cuda.matmul", "allow_bf16_reduced_precision_reduction"),
    ("cudnn", "allow_tf32"),
    ("cudnn", "benchmark"),
)


@dataclass
class Job:
    """One distinct block call: the block and the inputs it was called with."""

    region: torch.nn.Module
    args: tuple
    kwargs: dict
    key: tuple = ()  # its `call_key` (computed when not given)
    path: str | None = None  # with target "aot", where the worker saves the block's whole compiled forward

    def __post_init__(self):
        self.key = self.key or call_key(self.region, self.args, self.kwargs)


def default_workers() -> int:
    """Half the host's cores, at most 8; 0 (compile in-process only) below 2, or where the platform cannot fork."""
    workers = min(8, (os.cpu_count() or 1) // 2)
    return workers if workers >= 2 and hasattr(os, "fork") else 0


def call_key(region: torch.nn.Module, args: tuple, kwargs: dict) -> tuple:
    """What makes a compiled block graph distinct: class, weight shapes, input structure and shapes."""
    weights = tuple((name, tuple(t.shape), t.dtype, t.stride(), t.requires_grad)
                    for name, t in [*region.named_parameters(), *region.named_buffers()])
    leaves, spec = pytree.tree_flatten((args, kwargs))
    inputs = tuple((tuple(x.shape), x.stride(), x.dtype, str(x.device)) if isinstance(x, torch.Tensor) else repr(x)
                   for x in leaves)
    return (type(region).__module__, type(region).__qualname__, weights, str(spec), inputs)


def record_calls(regions: list[torch.nn.Module], run, keys: dict | None = None) -> list[Job]:
    """Run `run()` eagerly (compiled regions too) and keep the first call of each distinct block; with `keys`, also
    put there each region's first call key. Calls from other threads (a background compile records while the caller
    runs the same blocks) are left out."""
    jobs: dict[tuple, Job] = {}
    thread = threading.get_ident()

    def record(module, args, kwargs):
        if threading.get_ident() != thread:
            return
        key = call_key(module, args, kwargs)
        if keys is not None:
            keys.setdefault(module, key)
        if key not in jobs:
            jobs[key] = Job(module, args, kwargs, key)

    handles = [region.register_forward_pre_hook(record, with_kwargs=True) for region in regions]
    try:
        with torch.compiler.set_stance("force_eager"):
            run()
    finally:
        for handle in handles:
            handle.remove()
    return list(jobs.values())


def stateful_hooks(module: torch.nn.Module) -> list[str]:
    """The names of the diffusers hooks on `module` that may keep state (all but those marked `stateless`)."""
    registry = getattr(module, "_diffusers_hook", None)
    hooks = getattr(registry, "hooks", None) or {}
    return [name for name, hook in hooks.items() if not getattr(hook, "stateless", False)]


def _stateless_hooks(region: torch.nn.Module) -> list[tuple[str, str, object]]:
    """(submodule path, hook name, a fresh copy of the hook) of every stateless hook inside the block, innermost
    first: what a worker re-registers on its copy, whose graph then matches the caller's."""
    found = []
    for path, module in region.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        for name in getattr(registry, "_hook_order", ()):
            hook = registry.hooks[name]
            if getattr(hook, "stateless", False):
                found.append((path, name, hook.fresh()))
    return found


def _register(region: torch.nn.Module, hooks: list[tuple[str, str, object]]) -> None:
    from diffusers.hooks import HookRegistry

    for path, name, hook in hooks:
        HookRegistry.check_if_exists_or_initialize(region.get_submodule(path)).register_hook(hook, name)


def _shapes_only(region: torch.nn.Module, own_hooks: bool = True) -> torch.nn.Module:
    """A copy of the block whose parameters and buffers live on the meta device (no weight is copied), without its
    diffusers hooks (`_stateless_hooks` lists the ones a worker puts back): hooks hold what cannot be copied or
    pickled (a hooked forward is a closure; a background compile's hook holds its worker process). Without
    `own_hooks`, also without the torch forward hooks on `region` itself, which run around its `forward`, not in a
    compiled `forward`'s graph: on an accelerated pipeline's denoiser, the session's call planner (its pre-hook
    reaches the session and its config, which pickles no further: H200, every background compile worker of a preset's
    UNet failed so, and its thread compiled it all beside the calls)."""
    memo = {}
    if not own_hooks:
        for name in ("_forward_pre_hooks", "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                     "_forward_pre_hooks_with_kwargs"):
            hooks = region.__dict__.get(name)
            if hooks is not None:
                memo[id(hooks)] = type(hooks)()
    for module in region.modules():
        for param in module._parameters.values():
            if param is not None:
                memo[id(param)] = torch.nn.Parameter(torch.empty_like(param, device="meta"), param.requires_grad)
        for buffer in module._buffers.values():
            if buffer is not None:
                memo[id(buffer)] = torch.empty_like(buffer, device="meta")
        if "_diffusers_hook" in module.__dict__:
            memo[id(module.__dict__["_diffusers_hook"])] = None
            if "forward" in module.__dict__:
                memo[id(module.__dict__["forward"])] = None
    copied = copy.deepcopy(region, memo)
    for module in copied.modules():
        if "_diffusers_hook" in module.__dict__:
            del module._diffusers_hook
            module.__dict__.pop("forward", None)  # the class's own forward again
    return copied


def _split(jobs: list[Job], workers: int) -> list[list[Job]]:
    """Deal the blocks out from the last one called: the caller compiles from the first, so the two meet."""
    last_first = jobs[::-1]
    return [last_first[index::workers] for index in range(min(workers, len(jobs)))]


def _backend_flags() -> dict:
    flags = {f"{group}.{name}": getattr(_backend(group), name) for group, name in _BACKEND_FLAGS}
    flags["deterministic"] = torch.are_deterministic_algorithms_enabled()
    return flags


def _backend(group: str):
    module = torch.backends
    for part in group.split("."):
        module = getattr(module, part)
    return module


def _marker(regions: list[torch.nn.Module], compile_kwargs: dict, calls: list[str] = ()) -> Path:
    """Where a compiled set is remembered: the regions' classes and weight shapes, the device, torch and the
    settings, and (for a set of calls) each distinct call; without `calls`, any earlier compile of the regions."""
    device = next((str(t.device) for region in regions for t in region.parameters()), "cpu")
    name = torch.cuda.get_device_name(torch.device(device)) if device.startswith("cuda") else device
    weights = sorted({repr(call_key(region, (), {})) for region in regions})
    text = repr((torch.__version__, name, sorted(compile_kwargs.items()), _backend_flags(), weights, sorted(calls)))
    return inductor_cache_dir() / MARKERS / hashlib.sha256(text.encode()).hexdigest()[:32]


def compiled_before(regions: list[torch.nn.Module], compile_kwargs: dict) -> bool:
    """Whether these regions were compiled with these settings into this cache before (at some input shape)."""
    return _marker(regions, compile_kwargs).exists()


class Workers:
    """Compile worker processes, forked by the process-wide fork server (`ForkServer`) when they get work: the
    server imports torch, inductor, diffusers and accel once (run 13 on the H200: 18.5-20.1 s for each of 13
    processes spawned at once), and each worker starts with them. They touch no GPU until they get work, compile
    their jobs into the shared inductor cache (or files) and exit."""

    def __init__(self, count: int, modules: list[str]):
        self.count = count
        self.folder = Path(tempfile.mkdtemp(prefix="accel-precompile-"))
        self.server = ForkServer.shared(modules)  # OSError where none can start
        self.processes: list[tuple[int, object, _Child]] = []

    def submit(self, parts: list[list[Job]], compile_kwargs: dict, target: str = "module",
               inference: bool = False) -> None:
        """Fork one worker per non-empty part (at most `count`) and hand it its blocks. `target`: "module" compiles
        each block as `nn.Module.compile` does (regional compilation), "forward" compiles its `forward` as
        `torch.compile(forward)` (a full compile's hook does): the graphs, and so the cache entries, must be the
        caller's; "aot" saves each block's class forward compiled whole to its job's `path` (`aot.save`), which the
        caller loads without a trace. `inference`: the caller's calls run under inference mode."""
        parts = [part for part in parts if part][:self.count]
        # Each worker's inductor compiles its Triton kernels in a pool of this many processes (1: in-process).
        threads = int(os.environ.get("ACCEL_PRECOMPILE_THREADS", 0)) or max(1, (os.cpu_count() or 1) // len(parts))
        for index, part in enumerate(parts):
            path = self.folder / f"jobs-{index}.pt"
            # A forward's graph holds none of the region's own torch hooks (a module's compile holds them all).
            torch.save({"jobs": [{"region": _shapes_only(job.region, own_hooks=target == "module"),
                                  "hooks": _stateless_hooks(job.region),
                                  "args": job.args, "kwargs": job.kwargs, "path": job.path} for job in part],
                        "target": target, "inference": inference,
                        "compile_kwargs": compile_kwargs, "grad": torch.is_grad_enabled(),
                        "flags": _backend_flags(), "recompile_limit": torch._dynamo.config.recompile_limit,
                        "threads": torch.get_num_threads()}, path)  # CPU kernels are generated for a thread count
            log = self.folder / f"worker-{index}.log"
            self.processes.append((index, log, self.server.fork(path, log, threads)))

    def wait(self, timeout: float = 900.0) -> None:
        """Let every worker finish (tests, and callers that want the cache filled before their call)."""
        for _ in self.as_finished(timeout):
            pass

    def as_finished(self, timeout: float = 900.0):
        """(worker index, exit code) of each worker as it exits; past `timeout` seconds the ones left are killed."""
        deadline = time.monotonic() + timeout
        left = {index: child for index, _, child in self.processes}
        while left:
            for index, child in list(left.items()):
                code = child.poll()
                if code is not None:
                    del left[index]
                    yield index, code
            if left and time.monotonic() > deadline:
                for child in left.values():
                    child.kill()
                return
            if left:
                time.sleep(0.1)  # short sleeps: an interpreter exit's interruption gets through

    def stop(self) -> tuple[list[int], int]:
        """End every worker: the ones still compiling are killed. Returns (failed workers, stopped count)."""
        failed, stopped = [], 0
        for index, log, child in self.processes:
            code = child.poll()
            if code is None:
                child.kill()  # inductor writes its cache entries atomically: a killed worker leaves no half entry
                if child.pid is not None:  # not waited for where the server has not forked it yet (still importing)
                    child.wait(timeout=30.0)
                stopped += 1
            elif code != 0:
                failed.append(index)
                tail = log.read_text()[-600:] if log.is_file() else ""
                logger.warning("accel: compile worker %d ended with %s; the caller compiled its blocks. %s",
                               index, code, tail)
        self.processes = []
        return failed, stopped


# What a fork server's imports depend on: a change in any of these starts a new server.
_SERVER_ENVIRONMENT = ("TORCHINDUCTOR_", "TORCH_", "TRITON_", "CUDA_", "PYTORCH_")
_BASE_MODULES = ("torch._inductor.compile_fx", "accel.runtime.aot", "diffusers.models")


class ForkServer:
    """One process, started once per environment, that imports what compiling needs and forks a worker per job file.

    Python's own `multiprocessing` "forkserver" would do this, but each child it starts runs the caller's main
    script again (as `__mp_main__`), which a script that accelerates a pipeline at its top level cannot survive;
    this server forks children that run only `compile_jobs`. It never touches the GPU (a fork after CUDA's start
    would leave the children without it), runs no thread, and exits, killing its children, when this process closes
    its input (at exit). Requests and replies are JSON lines: {"id", "job", "log", "threads", "environ"} or
    {"cancel": id} in; {"id", "pid"} when forked and {"id", "code"} when the child exits, out."""

    _lock = threading.Lock()
    _running: "ForkServer | None" = None

    @classmethod
    def shared(cls, modules: list[str] = ()) -> "ForkServer":
        """The process's server for the current environment, started where none runs (or the environment moved)."""
        with cls._lock:
            server = cls._running
            if server is None or not server.alive() or server.environment != _server_environment():
                if server is not None:
                    server.close()
                server = cls._running = cls(modules)
            return server

    def __init__(self, modules: list[str]):
        self.environment = _server_environment()
        self.folder = Path(tempfile.mkdtemp(prefix="accel-fork-server-"))
        # NVML's device count in the server: `torch.cuda.is_available()`'s default (cudaGetDeviceCount, which
        # diffusers' and inductor's imports call) marks a process's forks as unable to use CUDA (H200, torch 2.11)
        env = bytecode_environment(dict(os.environ, **dict(self.environment[:-1]), PYTORCH_NVML_BASED_CUDA_CHECK="1",
                                        ACCEL_WORKER_SPAWNED=str(time.time()),
                                        PYTHONPATH=os.pathsep.join(p for p in sys.path if p)))
        command = [sys.executable, "-c", f"import sys; from {__name__} import fork_server; fork_server(sys.argv[1:])",
                   *sorted({*_BASE_MODULES, *modules})]
        self.log = open(self.folder / "server.log", "w")
        self.process = subprocess.Popen(command, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, bufsize=1)
        self._ids = iter(range(1 << 62))
        self._changed = threading.Condition()
        self._pids: dict[int, int] = {}
        self._codes: dict[int, int] = {}
        self._reader = threading.Thread(target=self._read, name="accel-fork-server", daemon=True)
        self._reader.start()

    def alive(self) -> bool:
        return self.process.poll() is None

    def fork(self, job: Path, log: Path, threads: int) -> "_Child":
        """A worker forked for the job file `job`, writing to `log` (it waits for the server's imports)."""
        child = _Child(self, next(self._ids))
        if not self._send({"id": child.id, "job": str(job), "log": str(log), "threads": threads,
                           "requested": time.time(),
                           "environ": {k: v for k, v in os.environ.items() if k.startswith(_SERVER_ENVIRONMENT)}}):
            raise OSError(f"the compile fork server is gone (its log: {self.folder / 'server.log'})")
        return child

    def cancel(self, id: int) -> None:
        """Have the server kill the child of request `id` as soon as it has forked it (a server gone has killed its
        children already)."""
        self._send({"cancel": id})

    def _send(self, message: dict) -> bool:
        """One JSON line to the server; False where it is gone."""
        with self._lock:
            try:
                self.process.stdin.write(json.dumps(message) + "\n")
                self.process.stdin.flush()
                return True
            except OSError:
                return False

    def _read(self) -> None:
        for line in self.process.stdout:
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            with self._changed:
                if "pid" in reply:
                    self._pids[reply["id"]] = reply["pid"]
                if "code" in reply:
                    self._codes[reply["id"]] = reply["code"]
                self._changed.notify_all()
        with self._changed:  # the server is gone: so are its children
            self._changed.notify_all()

    def close(self) -> None:
        """End the server and, with it, its children."""
        try:
            self.process.stdin.close()
        except OSError:
            pass
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
        self.log.close()


class _Child:
    """A worker forked by a `ForkServer`: `poll`, `wait` and `kill`, as a `subprocess.Popen` has them."""

    def __init__(self, server: ForkServer, id: int):
        self.server, self.id = server, id

    def poll(self) -> int | None:
        with self.server._changed:
            return self._code()

    def _code(self) -> int | None:
        code = self.server._codes.get(self.id)
        if code is None and not self.server.alive() and not self.server._reader.is_alive():
            return -9  # the server died: its children were killed with it
        return code

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None where the child still runs after `timeout` seconds."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self.server._changed:
            while self._code() is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return None
                # short waits: an interpreter exit's interruption (`compile._interrupt_at_exit`) gets through
                self.server._changed.wait(0.5 if left is None else min(left, 0.5))
            return self._code()

    @property
    def pid(self) -> int | None:
        """The child's pid, once the server has forked it."""
        with self.server._changed:
            return self.server._pids.get(self.id)

    def kill(self) -> None:
        """Kill the child; one the server has not forked yet (its imports still running) it kills as it forks it,
        without this process waiting for that."""
        pid = self.pid
        if pid is None:
            self.server.cancel(self.id)
        elif self.poll() is None:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _server_environment() -> tuple:
    """The environment a server imports under: this one's compile settings, with the defaults `process.hold` gives
    them while a pipeline compiles (so that a server started before `accelerate()` serves it)."""
    environ = {**environment_defaults(), **{k: v for k, v in os.environ.items() if k.startswith(_SERVER_ENVIRONMENT)}}
    return tuple(sorted(environ.items())) + (sys.executable,)


# The classes a UNet pipeline's compile workers unpickle (a server started before the pipeline is known imports them)
PIPELINE_MODULES = ("diffusers.models.unets.unet_2d_condition", "diffusers.models.autoencoders.autoencoder_kl")


def prestart(modules: list[str] = PIPELINE_MODULES) -> None:
    """Start the fork server now, so that its imports overlap what the caller does meanwhile (loading a pipeline, its
    first call); a failure is left to the compile that needs it, which logs it and compiles in this process."""
    if not hasattr(os, "fork"):
        return
    try:
        ForkServer.shared(modules)
    except OSError:
        pass


class Precompile:
    """The distinct blocks of one call, compiled by the workers while the caller compiles them too.

    The caller's compile goes through the blocks in call order; the workers take them from the last one
    called. Whatever a worker has put in the cache by the time the caller gets there is read, not compiled.
    `finish()` after the caller's call stops the workers that are left: every block is compiled by then.
    """

    def __init__(self, jobs: list[Job], workers: Workers | None, compile_kwargs: dict,
                 regions: list[torch.nn.Module] | None = None):
        """`regions`: every compiled region of the module (default: the jobs' ones), for `compiled_before`."""
        self.jobs, self.workers, self.start = jobs, workers, time.perf_counter()
        regions = [job.region for job in jobs] if regions is None else regions
        self.marker = _marker(regions, compile_kwargs, [repr(j.key) for j in jobs])
        self.regions_marker = _marker(regions, compile_kwargs)
        self.report = {"jobs": len(jobs), "workers": 0, "failed": [], "stopped": 0, "skipped": None}
        if workers is None or not workers.count:
            self.report["skipped"] = "no workers"
        elif self.marker.exists():
            self.report["skipped"] = "compiled before (warm cache)"
        elif len(jobs) < 2:
            self.report["skipped"] = "fewer than two distinct blocks"
        else:
            parts = _split(jobs, workers.count)
            workers.submit(parts, compile_kwargs)
            self.report.update(workers=len(parts), logs=str(workers.folder))
        if self.report["skipped"] is not None and workers is not None:
            workers.stop()

    def finish(self, compiled: bool) -> dict:
        """Stop the workers still running; with `compiled` (the caller's call went through), remember the set."""
        if self.workers is not None:
            self.report["failed"], self.report["stopped"] = self.workers.stop()
        if compiled and self.report["skipped"] is None:
            self.marker.parent.mkdir(parents=True, exist_ok=True)
            self.marker.write_text(f"{len(self.jobs)} distinct block calls\n")
            self.regions_marker.write_text(f"{len(self.jobs)} distinct block calls\n")
        self.report["seconds"] = time.perf_counter() - self.start
        return self.report


def compile_time_breakdown(limit: int = 4000) -> str:
    """Dynamo's own breakdown of this process's compile time so far, as text (its first `limit` characters)."""
    try:
        from torch._dynamo.utils import compile_times

        return compile_times(repr="str", aggregate=True)[:limit]
    except Exception as err:  # a breakdown is a nice-to-have; its API moves between torch versions
        return f"unavailable: {err}"


def fork_server(modules: list[str]) -> None:
    """Server side (`ForkServer`): import what compiling needs, then fork a worker for each request on stdin, report
    each fork and exit on stdout, and when stdin closes, kill the children left and exit."""
    start = time.perf_counter()
    spawned = float(os.environ.get("ACCEL_WORKER_SPAWNED", time.time()))
    print(f"python, torch and accel imported {time.time() - spawned:.1f} s after the spawn", file=sys.stderr)
    import importlib

    for name in modules:
        began = time.perf_counter()
        try:
            importlib.import_module(name)  # the block classes the job files unpickle
        except ImportError as err:  # a child imports what it unpickles itself
            print(f"not imported: {name} ({err})", file=sys.stderr)
        print(f"{name}: {time.perf_counter() - began:.1f} s", file=sys.stderr)
    imported = time.time() - spawned
    print(f"ready at {time.perf_counter() - start:.1f} s ({imported:.1f} s after the spawn)", file=sys.stderr,
          flush=True)
    children: dict[int, int] = {}  # pid -> request id
    pending, closed = b"", False
    while not closed or children:
        if not closed:
            ready, _, _ = select.select([0], [], [], 0.05)
            if ready:
                data = os.read(0, 65536)
                closed = not data
                pending += data
            *lines, pending = pending.split(b"\n")
            for line in lines:
                if line.strip():
                    request = json.loads(line)
                    if "cancel" in request:  # comes after its request: the child is forked, or already gone
                        pid = next((p for p, i in children.items() if i == request["cancel"]), None)
                        if pid is not None:
                            os.kill(pid, signal.SIGKILL)
                        continue
                    pid = os.fork()
                    if pid == 0:
                        _child(request, imported)  # never returns
                    children[pid] = request["id"]
                    _reply({"id": request["id"], "pid": pid})
            if closed:  # the caller is gone or done with us: so are the children
                for pid in children:
                    os.kill(pid, signal.SIGKILL)
        else:
            time.sleep(0.05)
        while children:
            pid, status = os.waitpid(-1, os.WNOHANG)
            if pid == 0:
                break
            if pid in children:
                _reply({"id": children.pop(pid), "code": os.waitstatus_to_exitcode(status)})
    os._exit(0)


def _reply(message: dict) -> None:
    try:
        os.write(1, (json.dumps(message) + "\n").encode())
    except OSError:  # the caller is gone
        pass


def _child(request: dict, imported: float) -> None:
    """A forked worker: its output to its log, the caller's compile settings, then its job file; exits."""
    code = 1
    try:
        log = os.open(request["log"], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        os.dup2(log, 1)
        os.dup2(log, 2)
        os.close(log)
        null = os.open(os.devnull, os.O_RDONLY)
        os.dup2(null, 0)
        os.close(null)
        sys.stdout = open(1, "w", buffering=1, closefd=False)  # not the server's objects (their locks, buffers)
        sys.stderr = sys.stdout
        print(f"forked {time.time() - request['requested']:.1f} s after the request (the server's imports ended "
              f"{imported:.1f} s after its spawn)", flush=True)
        os.environ.update(request["environ"])
        import torch._inductor.config

        torch._inductor.config.compile_threads = request["threads"]
        if "TORCHINDUCTOR_WORKER_START" not in os.environ:
            # Inductor's Triton-compile pool forked from here, with everything imported, rather than its default of
            # fresh processes that each import torch and Triton again (13 workers start up to 44 of them at once)
            torch._inductor.config.worker_start_method = "fork"
        accel_logger = logging.getLogger("accel")  # its lines (a forward not saved, and why) go to the log
        accel_logger.setLevel(logging.INFO)
        accel_logger.addHandler(logging.StreamHandler(sys.stdout))
        compile_jobs(request["job"])
        code = 0
    except BaseException:
        import traceback

        traceback.print_exc()
    finally:
        # Inductor has written every cache entry and saved file by now: the interpreter's teardown (the compile
        # pool's shutdown, module finalizers) is skipped.
        try:
            sys.stdout.flush()
        finally:
            os._exit(code)


def compile_jobs(path: str) -> None:
    """Worker side: compile every block of a job file as the caller would, and run it once."""
    start = time.perf_counter()
    # Our own file, written a moment ago by the calling process: full unpickling is what it holds.
    payload = torch.load(path, weights_only=False)
    print(f"loaded {len(payload['jobs'])} blocks at {time.perf_counter() - start:.1f} s", flush=True)
    mine = _backend_flags()
    for key, value in payload["flags"].items():
        if value == mine[key]:
            continue  # setting a flag to its default still changes the precision setting it maps to
        if key == "deterministic":
            torch.use_deterministic_algorithms(value)
        else:
            group, name = key.rsplit(".", 1)
            setattr(_backend(group), name, value)
    torch._dynamo.config.recompile_limit = payload["recompile_limit"]
    torch.set_num_threads(payload["threads"])
    torch.set_grad_enabled(payload["grad"])
    for job in payload["jobs"]:
        device = next((x.device for x in pytree.tree_leaves((job["args"], job["kwargs"]))
                       if isinstance(x, torch.Tensor)), torch.device("cpu"))
        region = job["region"].to_empty(device=device)
        with torch.no_grad():
            for tensor in [*region.parameters(), *region.buffers()]:
                tensor.zero_()  # values never enter a compiled graph; shapes, dtypes and strides do
        _register(region, job.get("hooks", ()))  # the caller's stateless hooks: the same graph, the same cache entry
        with torch.inference_mode() if payload.get("inference") else contextlib.nullcontext():
            target = payload.get("target", "module")
            if target == "aot":
                from . import aot

                if not aot.save(region, job["args"], job["kwargs"], Path(job["path"]), payload["compile_kwargs"]):
                    print(f"not saved: {type(region).__name__}", flush=True)
            elif target == "forward":
                torch.compile(region.forward, **payload["compile_kwargs"])(*job["args"], **job["kwargs"])
            else:
                region.compile(**payload["compile_kwargs"])
                region(*job["args"], **job["kwargs"])
        print(f"compiled {type(region).__name__} at {time.perf_counter() - start:.1f} s", flush=True)
    print(compile_time_breakdown(3000), flush=True)  # where the worker's time went, for the caller's report
    if torch.cuda.is_available():
        torch.cuda.synchronize()
