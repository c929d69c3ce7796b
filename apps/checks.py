"""Checks of what `accel generate`, `accel eval` and `accel batch` (its flags and its prompt file's fields
alike) are given, made before a model loads or an image is generated. Each raises `SettingError` with one
line saying what was wrong and what is accepted."""

from __future__ import annotations

import math
import os
from pathlib import Path

# torch.Generator.manual_seed takes 0 to 2**64 - 1; it also takes negatives, as aliases of seed + 2**64.
SEED_MAX = 2**64 - 1
# diffusers' Stable Diffusion pipelines refuse sizes that are not multiples of 8; a DiT can need a larger
# multiple, known once it is loaded (`size_multiple`).
SIZE_MULTIPLE = 8
# Sides beyond this many times the model's own take minutes a step on a CPU (512 px on the 32 px embedded model sat
# at step 0 for 170 s) and are far from what it was trained on; --allow-large lets them through.
LARGE_SIZE_FACTOR = 4


class SettingError(ValueError):
    """A setting that cannot run; the message says what was wrong and what is accepted."""


def check_setting(name: str, value, label: str | None = None):
    """`value` of the generation setting `name` (prompt, negative_prompt, seed, steps, guidance, height, width)
    where it is acceptable (None: the default); `label` names it in the message (default: `name`)."""
    label = label or name
    if name == "prompt":
        if not isinstance(value, str) or not value.strip():
            raise SettingError(f"{label} is empty; accepted: any text, e.g. 'a photo of a horse'")
    elif value is None or name == "negative_prompt":
        pass
    elif name == "seed" and not 0 <= value <= SEED_MAX:
        raise SettingError(f"{label} {value} is out of range; accepted: 0 to 2**64 - 1 ({SEED_MAX}), "
                           "the seeds torch.Generator takes")
    elif name == "steps" and value < 1:
        raise SettingError(f"{label} {value} is not a step count; accepted: a whole number of denoising steps >= 1")
    elif name == "guidance" and not (math.isfinite(value) and value >= 0):
        raise SettingError(f"{label} {value} is not a guidance scale; accepted: a number >= 0 "
                           "(at 1 or below, classifier-free guidance is off)")
    elif name in ("height", "width") and (value < 1 or value % SIZE_MULTIPLE):
        raise SettingError(f"{label} {value} is not an image size; accepted: a positive multiple of {SIZE_MULTIPLE}")
    return value


def check_args(args, names) -> None:
    """`check_setting` for each of `names` on parsed arguments, named by their flags."""
    for name in names:
        check_setting(name, getattr(args, name), f"--{name.replace('_', '-')}")


def check_at_least(label: str, value: int, low: int = 1) -> int:
    if value < low:
        raise SettingError(f"{label} {value} is too small; accepted: a whole number >= {low}")
    return value


def check_preset(name: str | None) -> None:
    if name is not None:
        import accel

        try:
            accel.get_preset(name)
        except ValueError as err:
            raise SettingError(str(err)) from None


def size_multiple(pipe) -> int:
    """What every height and width must be a multiple of for `pipe`: 8 for diffusers' UNet pipelines, the VAE's
    factor times the transformer's patch for a DiT (at least 2: Flux packs 2x2 latents), and never less than 8."""
    vae = int(getattr(pipe, "vae_scale_factor", 8))
    if getattr(pipe, "unet", None) is not None:
        return math.lcm(SIZE_MULTIPLE, vae)
    patch = int(getattr(pipe.transformer.config, "patch_size", 1) or 1)
    if hasattr(pipe, "_pack_latents"):
        patch = max(patch, 2)
    return math.lcm(SIZE_MULTIPLE, vae * patch)


def check_size_multiple(pipe, sizes: dict) -> None:
    """Every (label: size) of `sizes` a multiple of what `pipe` takes; None is the pipeline's default."""
    multiple = size_multiple(pipe)
    for label, value in sizes.items():
        if value is not None and value % multiple:
            raise SettingError(f"{label} {value} is not a size {type(pipe).__name__} takes; "
                               f"accepted: a positive multiple of {multiple}")


def native_size(pipe) -> int | None:
    """The image side `pipe`'s denoiser was configured for (its `sample_size` in pixels), None if it has none."""
    denoiser = getattr(pipe, "unet", None) or getattr(pipe, "transformer", None)
    sample_size = getattr(getattr(denoiser, "config", None), "sample_size", None)
    if not isinstance(sample_size, int):
        return None
    return sample_size * int(getattr(pipe, "vae_scale_factor", 8))


def check_size_limit(pipe, sizes: dict, allow_large: bool = False) -> None:
    """Every (label: size) of `sizes` at most LARGE_SIZE_FACTOR times `pipe`'s native side, unless `allow_large`."""
    native = native_size(pipe)
    if allow_large or native is None:
        return
    limit = LARGE_SIZE_FACTOR * native
    for label, value in sizes.items():
        if value is not None and value > limit:
            raise SettingError(f"{label} {value} is over {LARGE_SIZE_FACTOR}x the {native} px this model makes; "
                               f"accepted: up to {limit}, or pass --allow-large")


def check_writable_folder(folder: Path, label: str) -> None:
    """Create `folder` if needed and write (then remove) a probe file in it."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as err:
        raise SettingError(f"{label} {folder} is not writable: {err.strerror or err}") from None


def check_image_path(path: str | os.PathLike, label: str = "--out") -> Path:
    """A file name Pillow can write an image to, in a folder that is (or can be made) writable."""
    from PIL import Image

    path = Path(path)
    Image.init()
    writable = sorted(ext for ext, fmt in Image.registered_extensions().items() if fmt in Image.SAVE)
    accepted = "a file name ending in an image extension such as .png, .jpg or .webp"
    if path.is_dir():
        raise SettingError(f"{label} {path} is a folder; accepted: {accepted}")
    if path.suffix.lower() not in writable:
        raise SettingError(f"{label} {path} has no image extension Pillow writes; accepted: {accepted}")
    if path.exists() and not os.access(path, os.W_OK):
        raise SettingError(f"{label} {path} cannot be written: permission denied")
    check_writable_folder(path.parent, f"{label} {path}: its folder")
    return path
