"""The process-wide settings compilation needs, held while an accelerated pipeline compiles and put back after.

Inductor's cache lives on disk so that a second process reuses the first one's compiled code
(`TORCHINDUCTOR_CACHE_DIR` and the FX-graph / autograd caches), and dynamo's recompile limit is raised because
regional compilation compiles one graph per block shape. These are process state, not pipeline state: they are
held while any pipeline with a compile step is accelerated and restored to what they were when the last one is
restored. What dynamo and inductor compiled stays in their in-memory caches (`torch._dynamo.reset()` drops it).
`background_process_state` is the same kind of holder for what a background compile needs while it runs.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import os
import sys
import threading
from pathlib import Path

import torch

from ..capture import pause_capture, resume_capture

logger = logging.getLogger(__name__)

# Regional compilation of the SD UNet compiles ~20 shapes of one block class; dynamo's default limit is 8.
RECOMPILE_LIMIT = 64
_ENVIRONMENT = ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")

_lock = threading.Lock()
_holders = 0
_saved: dict | None = None


# The suite's folder in the user's cache: the inductor cache's default and the compile server's bytecode live there.
USER_CACHE = Path.home() / ".cache" / "diffusion-accel"


def inductor_cache_dir() -> Path:
    """The on-disk inductor cache this suite compiles into: `$TORCHINDUCTOR_CACHE_DIR`, else a user cache folder."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", USER_CACHE / "inductor"))


def bytecode_cache_dir() -> Path:
    """Where the compile workers' server keeps Python bytecode when the installed packages have none and this Python
    writes none (`bytecode_environment`): a folder of the user cache, beside the inductor cache's default."""
    return USER_CACHE / "pycache"


def bytecode_environment(environ: dict[str, str]) -> dict[str, str]:
    """`environ` for a Python process of the suite's own that should import from bytecode.

    A Python told to write no bytecode (`PYTHONDONTWRITEBYTECODE`, common in container images) over packages
    installed without it (uv's default) compiles torch's and diffusers' source at every import: on the H200's host
    the compile workers' server took 20.6 s to import so, 10.4 s with bytecode (`benchmarks/results/runtime/
    first-image/`, runs 19-20), on the path to a compiled pipeline. Where torch's own bytecode is missing and none is
    written, the process writes and reads it in `bytecode_cache_dir()` instead (`PYTHONPYCACHEPREFIX`), leaving
    site-packages untouched; a prefix the user set, or bytecode beside the sources, is left as it is."""
    if not environ.get("PYTHONDONTWRITEBYTECODE") or environ.get("PYTHONPYCACHEPREFIX"):
        return environ
    source = getattr(torch, "__file__", None)
    if source is None or Path(importlib.util.cache_from_source(source)).is_file():
        return environ
    environ = {k: v for k, v in environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    return {**environ, "PYTHONPYCACHEPREFIX": str(bytecode_cache_dir())}


def environment_defaults() -> dict[str, str]:
    """The environment `hold` gives a compile where the user set none of it: the on-disk cache and its FX-graph and
    autograd caches (compile workers, forked or spawned, must import under the same)."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(inductor_cache_dir()), "TORCHINDUCTOR_FX_GRAPH_CACHE": "1",
            "TORCHINDUCTOR_AUTOGRAD_CACHE": "1"}


def hold() -> Path:
    """Set the compile settings (unless the user set them) for one more holder; returns the cache folder."""
    global _holders, _saved
    with _lock:
        if _holders == 0:
            _saved = {"environment": {name: os.environ.get(name) for name in _ENVIRONMENT},
                      "recompile_limit": torch._dynamo.config.recompile_limit}
            for name, value in environment_defaults().items():
                os.environ.setdefault(name, value)
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        _holders += 1
        return inductor_cache_dir()


def release() -> None:
    """One holder fewer; the last one puts back the settings as they were before the first `hold`."""
    global _holders, _saved
    with _lock:
        if _holders == 0:
            return
        _holders -= 1
        if _holders or _saved is None:
            return
        for name, value in _saved["environment"].items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        torch._dynamo.config.recompile_limit = _saved["recompile_limit"]
        _saved = None


# Python's thread switch interval while a background compile runs (default 5 ms). Each torch op releases the GIL;
# with a compiling thread holding it in between, the calling thread waited up to the interval per op: 200 small
# linear layers took 1.2 ms alone and 706.8 ms beside a busy thread at 5 ms, 65.1 ms at 1 ms, 8.7 ms at 0.05 ms
# (`python3 benchmarks/runtime/switch_interval.py`, the 2-core CPU machine, 2026-12-03).
BACKGROUND_SWITCH_INTERVAL = 5e-5


class _BackgroundProcessState:
    """What the process needs while any background compile runs, held by each one and put back after the last.

    1. The patches torch.fx makes during a trace act in the tracing thread only. `torch.fx.Tracer.trace` (which
       AOTAutograd's and inductor's `make_fx` use) replaces `torch.nn.Module.__call__` and `__getattr__`
       process-wide for the length of the trace; a module called meanwhile from another thread (the calls that run
       eagerly while the compile runs) then went through the tracer and failed ("NameError: module is not installed
       as a submodule"; H200, torch 2.11, SD1.5 in the background, 2026-12-02). Here torch.fx's patcher wraps what
       it installs so that other threads keep the method they had.
    2. A short thread switch interval (`BACKGROUND_SWITCH_INTERVAL`), so the eager calls are not held up at every
       op by the compiling thread's Python.
    3. No CUDA graph is captured (`accel.capture.pause_capture`): a capture in one thread fails when another
       launches kernels meanwhile.
    While it is held (`busy`), no component switches to its compiled code (`BackgroundCompile.use_compiled`).
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._holders = 0
        self._original = None
        self._interval: float | None = None

    def acquire(self) -> None:
        with self._lock:
            self._holders += 1
            pause_capture()
            if self._holders == 1:
                self._install()
                self._interval = sys.getswitchinterval()
                sys.setswitchinterval(min(self._interval, BACKGROUND_SWITCH_INTERVAL))

    def busy(self) -> bool:
        """Whether a background compile runs anywhere in the process."""
        return self._holders > 0

    def release(self) -> None:
        with self._lock:
            self._holders -= 1
            resume_capture()
            if self._holders == 0:
                if self._original is not None:
                    torch.fx._symbolic_trace._Patcher.patch_method = self._original
                    self._original = None
                if self._interval is not None:
                    sys.setswitchinterval(self._interval)
                    self._interval = None

    def _install(self) -> None:
        patcher = getattr(getattr(torch.fx, "_symbolic_trace", None), "_Patcher", None)
        original = getattr(patcher, "patch_method", None)
        if original is None:  # another torch: its tracer patches differently, left as it is
            logger.info("accel: torch.fx has no _Patcher.patch_method here; background compiles trace unguarded")
            return

        def patch_method(patcher_self, cls, name, new_fn, deduplicate=True):
            owner, kept = threading.get_ident(), getattr(cls, name)

            @functools.wraps(new_fn)
            def in_tracing_thread(*args, **kwargs):
                if threading.get_ident() == owner:
                    return new_fn(*args, **kwargs)
                return kept(*args, **kwargs)

            return original(patcher_self, cls, name, in_tracing_thread, deduplicate)

        self._original = original
        patcher.patch_method = patch_method


background_process_state = _BackgroundProcessState()
