"""UNet swap: run the pipeline with a smaller UNet (a BK-SDM or LAPTOP-Diff student from ``pruning``).

The student replaces ``pipe.unet`` through ``pipe.register_modules``, as diffusers sets pipeline components, on
the original UNet's device and dtype; removal registers the original object again, so outputs are bit-identical
afterwards. Later techniques (sampler, caches, runtime) see the student: DeepCache reads the block layout from
it, so a student without a mid block caches through its skip connections (its deepest ``cache_branch`` is one
less than the teacher's).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


@dataclass(frozen=True)
class UNetSwapConfig:
    """path: a folder saved by ``pruning.save_unet`` / ``save_pretrained`` (safetensors), read by ``loader(path)``
    when applied - by default ``load_unet_folder``, which knows diffusers' ``UNet2DConditionModel`` (BK-SDM
    students); a LAPTOP-Diff student needs ``loader=pruning.load_unet``. Or unet: a ``UNet2DConditionModel``
    object. Either is moved to the pipeline's device and dtype when applied."""

    path: str | None = None
    unet: object | None = None
    # Not compared: configs naming one folder swap in the same student, whichever function reads it.
    loader: Callable | None = field(default=None, compare=False)

    def __post_init__(self):
        if (self.path is None) == (self.unet is None):
            raise ValueError("UNetSwapConfig needs exactly one of path (a saved UNet folder) or unet (a module)")
        if self.path is not None:
            folder = Path(self.path)
            if not (folder / "config.json").is_file():
                raise ValueError(f"UNetSwapConfig.path={str(self.path)!r} is not a saved UNet folder (no config.json); "
                                 "valid: a folder written by pruning.save_unet or UNet2DConditionModel.save_pretrained")
        else:
            from diffusers import UNet2DConditionModel

            if not isinstance(self.unet, UNet2DConditionModel):
                raise ValueError(f"UNetSwapConfig.unet must be a UNet2DConditionModel, got {type(self.unet).__name__}")
        if self.loader is not None and (self.path is None or not callable(self.loader)):
            raise ValueError("UNetSwapConfig.loader must be a function of path (e.g. pruning.load_unet), given with path")


def load_unet_folder(path, classes: tuple[type, ...] = (), **kwargs):
    """Load a saved UNet folder by the class its config names: diffusers' ``UNet2DConditionModel`` or one of
    ``classes`` (``pruning.load_unet`` adds its pruned class); safetensors weights only, never the Hub."""
    from diffusers import UNet2DConditionModel

    path = Path(path)
    config_path = path / "config.json"
    if not config_path.is_file():
        raise FileNotFoundError(f"{path} is not a saved UNet folder: {config_path} is missing")
    class_name = json.loads(config_path.read_text()).get("_class_name")
    by_name = {cls.__name__: cls for cls in (UNet2DConditionModel, *classes)}
    if class_name not in by_name:
        raise ValueError(f"{path} holds a {class_name}, not a UNet; accepted: {', '.join(by_name)}")
    if not any(path.glob("*.safetensors")):
        raise FileNotFoundError(f"{path} has no .safetensors weights (only safetensors are loaded)")
    return by_name[class_name].from_pretrained(path, use_safetensors=True, local_files_only=True, **kwargs)


def _check_compatible(student, teacher) -> None:
    def cross_dim(config):
        dim = config.cross_attention_dim
        return dim[0] if isinstance(dim, (list, tuple)) else dim

    checks = {
        "in_channels": (student.config.in_channels, teacher.config.in_channels),
        "out_channels": (student.config.out_channels, teacher.config.out_channels),
        "cross_attention_dim": (cross_dim(student.config), cross_dim(teacher.config)),
        "addition_embed_type": (student.config.addition_embed_type, teacher.config.addition_embed_type),
        "projection_class_embeddings_input_dim": (student.config.projection_class_embeddings_input_dim,
                                                  teacher.config.projection_class_embeddings_input_dim),
    }
    wrong = [f"{k}: student {s!r}, pipeline {t!r}" for k, (s, t) in checks.items() if s != t]
    if wrong:
        raise ValueError("the swapped-in UNet does not fit this pipeline (" + "; ".join(wrong) + ")")


class UNetSwap:
    """The applied swap: the pipeline's own UNet is kept and registered again by `remove()`."""

    def __init__(self, pipe, config: UNetSwapConfig, session):
        if config.unet is not None:
            student = config.unet
        else:
            student = (config.loader or load_unet_folder)(config.path)
        original = pipe.unet
        _check_compatible(student, original)
        if student.device != original.device:
            student = student.to(original.device)
        if student.dtype != original.dtype:
            student = student.to(original.dtype)
        student.eval()
        self.pipe, self.original = pipe, original
        pipe.register_modules(unet=student)

    def remove(self) -> None:
        self.pipe.register_modules(unet=self.original)
