"""The process-wide settings compilation needs, held while an accelerated pipeline compiles and put back after.

Inductor's cache lives on disk so that a second process reuses the first one's compiled code
(`TORCHINDUCTOR_CACHE_DIR` and the FX-graph / autograd caches), and dynamo's recompile limit is raised because
regional compilation compiles one graph per block shape. These are process state, not pipeline state: they are
held while any pipeline with a compile step is accelerated and restored to what they were when the last one is
restored. What dynamo and inductor compiled stays in their in-memory caches (`torch._dynamo.reset()` drops it).
"""

from __future__ import annotations

import os
import threading
from pathlib import Path

import torch

# Regional compilation of the SD UNet compiles ~20 shapes of one block class; dynamo's default limit is 8.
RECOMPILE_LIMIT = 64
_ENVIRONMENT = ("TORCHINDUCTOR_CACHE_DIR", "TORCHINDUCTOR_FX_GRAPH_CACHE", "TORCHINDUCTOR_AUTOGRAD_CACHE")

_lock = threading.Lock()
_holders = 0
_saved: dict | None = None


def inductor_cache_dir() -> Path:
    """The on-disk inductor cache this suite compiles into: `$TORCHINDUCTOR_CACHE_DIR`, else a user cache folder."""
    return Path(os.environ.get("TORCHINDUCTOR_CACHE_DIR", Path.home() / ".cache" / "diffusion-accel" / "inductor"))


def hold() -> Path:
    """Set the compile settings (unless the user set them) for one more holder; returns the cache folder."""
    global _holders, _saved
    with _lock:
        if _holders == 0:
            _saved = {"environment": {name: os.environ.get(name) for name in _ENVIRONMENT},
                      "recompile_limit": torch._dynamo.config.recompile_limit}
            os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", str(inductor_cache_dir()))
            os.environ.setdefault("TORCHINDUCTOR_FX_GRAPH_CACHE", "1")
            os.environ.setdefault("TORCHINDUCTOR_AUTOGRAD_CACHE", "1")
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
