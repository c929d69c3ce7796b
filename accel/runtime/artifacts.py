"""Portable compile artifacts: torch's own cache of compiled code (`torch.compiler.save_cache_artifacts` /
`load_cache_artifacts`, PyTorch's "mega cache"), saved after a compiled call and loaded before the next
process compiles, so that a new machine (or an emptied inductor cache) skips inductor's code generation.

Artifacts are stored one file per key: the model (its denoiser's config and weights' dtype), the runtime
config, the call's shapes (height, width, batch, guidance on or off), the torch version and the device.
Beside each file a small JSON holds the key's fields, so that a mismatch says which field differs. torch's
caches are content-addressed: loading artifacts that do not fit a compile costs time, never correctness.
On a GPU the artifacts carry the built Triton kernels; on a CPU they carry inductor's C++ kernel sources, which
each process still builds (measured: `benchmarks/runtime/cold_start.py --smoke`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
from pathlib import Path

import torch

from ..pipelines import denoiser
from . import aot
from .compile import aot_example, compile_pending, mark_artifacts_loaded, preload, want_example

logger = logging.getLogger(__name__)

KEY_VERSION = 2  # bump when the fields below change meaning
_WHOLE_FORWARDS = [False]  # within `saving_whole_forwards()`


@contextlib.contextmanager
def saving_whole_forwards():
    """Within it, a compile cache's save also writes each compiled module's whole compiled forward (`aot.py`), which a
    new process then runs without dynamo's trace: what `accel precompile` does. Off elsewhere: saving one traces and
    compiles the module again (SD1.5's UNet and decoder on the H200: up to 57 s), which a user's first call should not pay."""
    before, _WHOLE_FORWARDS[0] = _WHOLE_FORWARDS[0], True
    try:
        yield
    finally:
        _WHOLE_FORWARDS[0] = before


def model_fields(pipe) -> dict:
    """The denoiser's identity: its class, a hash of its config, its weights' dtype and the device's name."""
    net = denoiser(pipe)
    # Private entries (`_name_or_path`, `_diffusers_version`) say where the model came from, not what it is.
    config = json.dumps({k: v for k, v in net.config.items() if not k.startswith("_")}, sort_keys=True, default=str)
    param = next(net.parameters())
    device = param.device
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    return {"denoiser": type(net).__name__, "model_config": hashlib.sha256(config.encode()).hexdigest()[:16],
            "dtype": str(param.dtype).removeprefix("torch."), "device": name}


def call_shapes(arguments: dict) -> dict:
    """The shapes a pipeline call compiles for, from its arguments (None: the pipeline's default size)."""
    prompt = arguments.get("prompt")
    prompts = len(prompt) if isinstance(prompt, (list, tuple)) else 1
    guidance = arguments.get("guidance_scale")
    return {"height": arguments.get("height"), "width": arguments.get("width"),
            "batch": prompts * int(arguments.get("num_images_per_prompt") or 1),
            "guidance": guidance is not None and guidance > 1}


_ADDED_LATER = ("quantize_min_out_features", "compile_options")


def runtime_fields(config) -> str:
    """The runtime config as a key field. Where artifacts are kept is not part of what they hold, nor are CUDA
    graphs: they are captured anew in every process around the same compiled code, and `accel precompile` leaves
    them out off a GPU, where a preset keeps them (and runs eagerly). Nor is `compile_background`: where code compiles,
    not what it compiles (left out of the text, so keys saved before that field existed still match). Fields added
    since keys were first saved are left out while at their default, for the same reason."""
    config = dataclasses.replace(config, compile_cache=None, cuda_graph=False)
    fields = ", ".join(f"{f.name}={getattr(config, f.name)!r}" for f in dataclasses.fields(config)
                       if f.repr and f.name != "compile_background"
                       and not (f.name in _ADDED_LATER and getattr(config, f.name) == f.default))
    return f"{type(config).__qualname__}({fields})"


def key_fields(model: dict, config, shapes: dict, torch_version: str | None = None) -> dict:
    """Everything a saved artifact set depends on, as one flat dict of JSON values."""
    return {"key_version": KEY_VERSION, **model, "runtime": runtime_fields(config), **shapes,
            "torch": torch.__version__ if torch_version is None else torch_version}


def default_size(pipe) -> int | None:
    """The height and width a call without them generates: the denoiser's sample size in pixels."""
    sample = getattr(denoiser(pipe).config, "sample_size", None)
    return sample * int(getattr(pipe, "vae_scale_factor", 8)) if isinstance(sample, int) else None


def key_for(pipe, config, arguments: dict) -> dict:
    """The key fields of `pipe` under runtime `config` for a call with these arguments (height, width, prompt...)."""
    shapes = call_shapes(arguments)
    for side in ("height", "width"):  # the default size and the same size given are one key
        shapes[side] = shapes[side] if shapes[side] is not None else default_size(pipe)
    return key_fields(model_fields(pipe), config, shapes)


def key_digest(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


def _paths(directory: Path, fields: dict) -> tuple[Path, Path]:
    digest = key_digest(fields)
    return directory / f"{digest}.bin", directory / f"{digest}.json"


def _mismatch(directory: Path, fields: dict) -> str:
    """Why nothing in `directory` matches: the fields that differ from the closest saved key."""
    saved = []
    for path in sorted(directory.glob("*.json")) if directory.is_dir() else ():
        try:
            saved.append(json.loads(path.read_text()))
        except (OSError, ValueError):
            continue
    if not saved:
        return f"none saved in {directory}"
    differences = [[k for k in sorted(fields.keys() | other.keys()) if fields.get(k) != other.get(k)] for other in saved]
    closest, other = min(zip(differences, saved), key=lambda d: len(d[0]))
    return "; ".join(f"{k} differs (saved {other.get(k)!r}, here {fields.get(k)!r})" for k in closest)


def save_artifacts(fields: dict, directory) -> Path | None:
    """Write what this process compiled so far under `fields`' key; None (and a log line) when it compiled nothing."""
    directory = Path(directory)
    saved = torch.compiler.save_cache_artifacts()
    if saved is None or not saved[0]:
        logger.info("accel: no compile artifacts to save (nothing was compiled in this process)")
        return None
    blob, json_path = _paths(directory, fields)
    directory.mkdir(parents=True, exist_ok=True)
    for path, data in ((blob, saved[0]), (json_path, (json.dumps(fields, indent=1) + "\n").encode())):
        partial = path.with_name(path.name + ".partial")
        partial.write_bytes(data)
        partial.replace(path)  # atomic: a reader never sees half a file
    logger.info("accel: saved compile artifacts to %s (%.1f MB)", blob, len(saved[0]) / 1e6)
    return blob


def load_artifacts(fields: dict, directory) -> bool:
    """Load the artifacts saved under `fields`' key into torch's caches, before compiling; says so in one log
    line, or why none matched (then compilation runs as without them)."""
    directory = Path(directory)
    blob, _ = _paths(directory, fields)
    if not blob.is_file():
        logger.info("accel: no matching artifacts: %s", _mismatch(directory, fields))
        return False
    try:
        # None: torch could not read the bytes (it logs why); a damaged or foreign file compiles as if there were none
        problem = None if torch.compiler.load_cache_artifacts(blob.read_bytes()) is not None else "torch could not read it"
    except Exception as err:
        problem = f"{type(err).__name__}: {err}"
    if problem is not None:
        logger.warning("accel: no matching artifacts: could not load %s (%s)", blob, problem)
        return False
    logger.info("accel: loaded compile artifacts from %s", blob)
    return True


class ArtifactCache:
    """`RuntimeConfig(compile_cache=...)` on an accelerated pipeline: at the start of each call with shapes not seen
    before, load the matching artifacts; at the end of such a call, completed and compiled without them, save. Where
    `compiled` (the modules the runtime compiles) compile in the background, the save waits for the end of the first
    call after their compiles are over; a pipeline restored before that saves nothing."""

    def __init__(self, pipe, config, session, compiled=()):
        self.pipe, self.config, self.session = pipe, config, session
        self.directory = Path(config.compile_cache)
        self.compiled = list(compiled)
        self.seen: set[str] = set()
        self.pending: dict | None = None  # the key of this call's shapes, to save at its end
        self.unsaved: list[dict] = []  # keys whose compiles still run in the background
        self.saved: list[Path] = []
        self.loaded: list[str] = []  # the files loaded
        session.add_call_listener(self.begin)
        session.add_call_end_listener(self.end)

    def begin(self, session) -> None:
        fields = key_for(self.pipe, self.config, session.call_arguments)
        digest = key_digest(fields)
        self.pending = None
        if digest in self.seen:
            return
        self.seen.add(digest)
        whole = self._load_whole(digest)
        if load_artifacts(fields, self.directory):
            self.loaded.append(str(_paths(self.directory, fields)[0]))
            for module in self.compiled:
                mark_artifacts_loaded(module)
        elif not whole:
            self.pending = fields
            if _WHOLE_FORWARDS[0]:
                for module in self.compiled:  # its inputs in this call, to save its whole compiled forward at the end
                    want_example(module)

    def _load_whole(self, digest: str) -> bool:
        """Hand each compiled module its whole compiled forward saved under this key (`aot.py`), where there is one;
        whether every compiled module got one."""
        got = 0
        for module in self.compiled:
            path = aot.path_for(self.directory, digest, module)
            loaded = aot.load(path)
            if loaded is not None and preload(module, loaded[1], loaded[0]):
                self.loaded.append(str(path))
                got += 1
        if got:
            logger.info("accel: loaded %d saved compiled forward(s) of %d compiled module(s): no trace for those",
                        got, len(self.compiled))
        return bool(self.compiled) and got == len(self.compiled)

    def end(self, session, completed: bool) -> None:
        fields, self.pending = self.pending, None
        if fields is None and not self.unsaved:
            return  # most calls: shapes seen before, nothing waiting to be saved
        compiling = any(compile_pending(module) for module in self.compiled)
        if self.unsaved and not compiling:
            unsaved, self.unsaved = self.unsaved, []
            for saved in unsaved:
                self._save(saved)
        if fields is None:
            return
        if not completed:
            self.seen.discard(key_digest(fields))  # a failed call compiled part: the next one tries again
        elif compiling:
            self.unsaved.append(fields)
            logger.info("accel: compile artifacts will be saved once the background compile is over")
        else:
            self._save(fields)

    def _save(self, fields: dict) -> None:
        path = save_artifacts(fields, self.directory)
        if path is not None:
            self.saved.append(path)
        digest = key_digest(fields)
        for module in self.compiled:  # and each module's whole compiled forward, where torch can save one
            found = aot_example(module)
            if found is None:
                continue
            hook, (args, kwargs) = found
            whole = aot.path_for(self.directory, digest, module)
            with torch.no_grad():  # as a pipeline calls its modules
                if aot.save(module, args, kwargs, whole, hook.compile_kwargs):
                    self.saved.append(whole)

    def remove(self) -> None:
        if self.unsaved:
            logger.info("accel: restored before the background compile was over: its compile artifacts (%d shape(s)) "
                        "were not saved to %s", len(self.unsaved), self.directory)
        self.session.remove_call_listener(self.begin)
        self.session.remove_call_end_listener(self.end)
