"""Load a pipeline for the programs (the embedded model by default, any local folder or Hub id), and the preset
configs they apply to it."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

GPU_ONLY_NOTE = "torch.compile and CUDA graphs need a CUDA GPU; this runs on {device}, so they were left out"


def default_model() -> Path:
    from accel.embedded import EMBEDDED_MODEL_DIR

    return Path(EMBEDDED_MODEL_DIR)


def pick_device(device: str = "auto") -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {device} was asked for but no CUDA device is available; use --device cpu")
    return device


def load_pipeline(model: str | os.PathLike | None, *, device: str = "auto", dtype: str | None = None):
    """`DiffusionPipeline.from_pretrained` with errors that say what is missing."""
    from diffusers import DiffusionPipeline

    from accel.embedded_dit import resolve_model

    model = resolve_model(model)  # the embedded DiT by name
    path = Path(model) if model is not None else default_model()
    local = path.exists() or model is None or str(model).startswith((".", "/", "~"))
    if local and not (path / "model_index.json").is_file():
        raise SystemExit(f"{path} is not a diffusers pipeline folder: no model_index.json in it")
    kwargs = {}
    if dtype is not None:
        kwargs["torch_dtype"] = getattr(torch, dtype)
    try:
        pipe = DiffusionPipeline.from_pretrained(str(path) if local else str(model), **kwargs)
    except OSError as err:
        raise SystemExit(f"could not load {model}: {err}") from None
    pipe.set_progress_bar_config(leave=False)
    return pipe.to(pick_device(device))


def without_gpu_only_runtime(config, device):
    """`config` without torch.compile and CUDA graphs unless `device` is a CUDA GPU, and a note saying so (None
    when nothing was left out): on a CPU, compiling costs a minute where an image takes a second."""
    from accel import RuntimeConfig

    runtime, device = config.runtime, torch.device(device)
    if runtime is None or device.type == "cuda" or not (runtime.compile or runtime.cuda_graph):
        return config, None
    runtime = runtime.without_compile(cuda_graph=False)
    return config.replace(runtime=None if runtime == RuntimeConfig() else runtime), GPU_ONLY_NOTE.format(device=device.type)


ONE_CALL_NOTE = ("one call: torch.compile would cost more than it saves, so the call runs without it (CUDA graphs of "
                 "the eager modules, where the preset has them), as the first image of a background compile does")


def without_compile(config):
    """`config` without torch.compile, and a note saying so (None when it had none): for a process that makes one
    call, where a compile only delays the image it is for. CUDA graphs stay: they capture in well under a second."""
    from accel import RuntimeConfig

    runtime = config.runtime
    if runtime is None or runtime.compile is None:
        return config, None
    runtime = runtime.without_compile()
    return config.replace(runtime=None if runtime == RuntimeConfig() else runtime), ONE_CALL_NOTE


def preset_config(preset: str | None, pipe, *, say: bool = True):
    """The preset's config for `pipe`'s family (None: nothing), without torch.compile and CUDA graphs off a CUDA GPU,
    which it says on stderr."""
    import accel

    config, note = without_gpu_only_runtime(accel.resolve_config(preset=preset, pipe=pipe), pipe.device)
    if note is not None and say:
        print(f"note: {note} (preset {preset!r})", file=sys.stderr)
    return config
