"""Compiled forwards saved whole with torch's `aot_compile`, beside the portable compile artifacts.

The artifacts (`artifacts.py`) hold inductor's output, so a new process skips code generation, but it still runs
dynamo's trace of every compiled module: most of a warm first call (SD1.5's UNet on the H200: 8.54 s to the first
compiled call, SDXL's pipeline 34.0 s; `benchmarks/results/runtime/cold-start/`). `torch.compile(fn).aot_compile(
example_inputs)` packages the traced and compiled function with its guards; `torch.compiler.load_compiled_function`
gives it back in another process without a trace (the embedded UNet on the CPU: 2.75 s against 7.70 s,
`benchmarks/results/runtime/aot-compile/`). Both are experimental in torch; in torch 2.11 they sit behind
`torch._dynamo.config.enable_aot_compile`, off by default there.

What is saved is the module's own class forward for one input signature, the module passed in as an argument (its
weights are read at each call, not baked in). Its guards keep tensor metadata only (`keep_tensor_guards_unsafe`), so
the rest of the signature (argument structure, non-tensor values) is stored beside it and compared before every use:
a call that differs runs the usual compiled path. Only a compile hook that is the module's innermost hook uses it
(the class forward is then exactly what it compiles), and only in the foreground.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch
from torch.utils import _pytree as pytree

from ..capture import _constant_key

logger = logging.getLogger(__name__)

SUFFIX = ".aot"


def available() -> bool:
    """Whether this torch has aot_compile (switching it on where it sits behind dynamo's flag)."""
    config = torch._dynamo.config
    if not hasattr(torch.compiler, "load_compiled_function") or not hasattr(config, "enable_aot_compile"):
        return False
    config.enable_aot_compile = True
    return True


def class_forward(module, *args, **kwargs):
    """The function that is compiled and saved: module-level, so that it pickles by name (diffusers' decorated
    forwards do not), and the class's forward, beneath any hook."""
    return type(module).forward(module, *args, **kwargs)


def signature(args: tuple, kwargs: dict, strides: bool = True) -> str:
    """What the saved function's guards do not check: the arguments' structure, each tensor's shape, dtype and
    device (and strides, unless `strides` is False), and every other value. A digest, stored beside the function."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    parts = (str(spec), tuple((tuple(x.shape), str(x.dtype), str(x.device), x.stride() if strides else None)
                              if isinstance(x, torch.Tensor) else repr(_constant_key(x)) for x in leaves))
    return hashlib.sha256(repr(parts).encode()).hexdigest()[:32]


def path_for(directory: Path, digest: str, module: torch.nn.Module) -> Path:
    """Where the key `digest`'s compiled forward of `module` (named by class) is kept."""
    return Path(directory) / f"{digest}.{type(module).__name__}{SUFFIX}"


def save(module: torch.nn.Module, args: tuple, kwargs: dict, path: Path, compile_kwargs: dict) -> bool:
    """aot_compile `module`'s class forward for these example inputs and write it to `path` (with its signature
    beside it); False, with a log line, where torch cannot (no aot_compile, a graph break, an unpicklable value)."""
    if not available():
        return False
    kwargs_for_compile = {k: v for k, v in compile_kwargs.items() if k != "fullgraph"}
    try:
        try:
            compiled = _aot_compile(module, args, kwargs, kwargs_for_compile)
        except Exception as err:
            if not _restarts_to_tensorify(err):
                raise
            # Dynamo restarts its analysis to turn a Python float into a tensor, which aot_compile does not follow
            # (the SD VAE decoder on the H200, torch 2.11, fp16). Floats as constants instead: the signature beside
            # the saved function holds every non-tensor value, so a call with another float never uses it.
            logger.info("accel: %s's forward is compiled again for saving with floats as constants (%s)",
                        type(module).__name__, type(err).__name__)
            with torch._dynamo.config.patch(specialize_float=True):
                compiled = _aot_compile(module, args, kwargs, kwargs_for_compile)
        partial = path.with_name(path.name + ".partial")
        compiled.save_compiled_function(str(partial))
        partial.replace(path)
        path.with_suffix(".sig").write_text(signature(args, kwargs) + "\n")
    except Exception as err:  # an optimisation of the next process's start: this one's results stand
        logger.info("accel: %s's compiled forward was not saved whole (%s: %s); the artifacts alone serve it",
                    type(module).__name__, type(err).__name__, str(err).splitlines()[0][:200] if str(err) else "")
        return False
    logger.info("accel: saved %s's compiled forward to %s", type(module).__name__, path)
    return True


def _aot_compile(module: torch.nn.Module, args: tuple, kwargs: dict, compile_kwargs: dict):
    """The module's class forward compiled for these inputs, with the compile's own inductor settings."""
    compile_kwargs = dict(compile_kwargs)
    options = {**(compile_kwargs.pop("options", None) or {}),
               "guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}
    return torch.compile(class_forward, fullgraph=True, options=options, **compile_kwargs).aot_compile(
        ((module, *args), kwargs))


def _restarts_to_tensorify(err: BaseException) -> bool:
    """Whether `err` (or an error it was raised from) is dynamo's restart to tensorify a float scalar."""
    while err is not None:
        if "TensorifyScalarRestart" in type(err).__name__ or "TensorifyScalarRestart" in str(err):
            return True
        err = err.__cause__ or err.__context__
    return False


def load(path: Path):
    """(the compiled function, its signature digest) saved at `path`, or None (logged) where it cannot be loaded."""
    signature_path = path.with_suffix(".sig")
    if not path.is_file() or not signature_path.is_file() or not available():
        return None
    try:
        with open(path, "rb") as f:
            fn = torch.compiler.load_compiled_function(f)
    except Exception as err:
        logger.warning("accel: could not load the compiled forward %s (%s: %s); compiling as without it", path,
                       type(err).__name__, err)
        return None
    return fn, signature_path.read_text().strip()
