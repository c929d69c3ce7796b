"""CIFAR-10 (Krizhevsky, 2009) from the project's JPEG archives, decoded into uint8 tensors.

The archives hold ``<split>/<class>/NNNN.jpg``; this module reads one into an ``(N, 3, 32, 32)``
uint8 tensor and an ``(N,)`` int64 label tensor, labels indexing ``CIFAR10_CLASSES``. Images come in
the archive's sorted path order, so a split always loads identically.
"""

from __future__ import annotations

import io
import os
import tarfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch

# Sorted order, as in the archives; the index is the label.
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

_REPO_ROOT = Path(__file__).resolve().parents[2]


def default_cifar10_dir() -> Path:
    """``$ACCEL_CIFAR10_DIR``, else ``.data/`` in the checkout (the device copy), else ``../shared/data/cifar10``."""
    if os.environ.get("ACCEL_CIFAR10_DIR"):
        return Path(os.environ["ACCEL_CIFAR10_DIR"])
    for candidate in (_REPO_ROOT / ".data", _REPO_ROOT.parent / "shared" / "data" / "cifar10"):
        if (candidate / "test.tar.gz").is_file():
            return candidate
    raise FileNotFoundError("CIFAR-10 archives not found: set ACCEL_CIFAR10_DIR to the folder holding test.tar.gz")


def _decode(blobs: list[bytes]) -> np.ndarray:
    from PIL import Image

    out = np.empty((len(blobs), 32, 32, 3), dtype=np.uint8)
    for i, blob in enumerate(blobs):
        with Image.open(io.BytesIO(blob)) as image:
            out[i] = np.asarray(image.convert("RGB"))
    return out


def load_cifar10(
    split: str = "test",
    root: str | os.PathLike | None = None,
    *,
    num_workers: int | None = None,
    limit: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Return ``(images, labels)``: uint8 ``(N, 3, 32, 32)`` and int64 ``(N,)``.

    ``limit`` keeps the first ``limit`` images of the sorted archive; ``num_workers`` processes decode
    the JPEGs (default: all cores, one process for small archives).
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be one of ['train', 'test'], got {split!r}")
    root = Path(root) if root is not None else default_cifar10_dir()
    entries = []
    with tarfile.open(root / f"{split}.tar.gz", "r:gz") as archive:
        for member in archive:
            parts = member.name.split("/")
            if not member.isfile() or len(parts) != 3 or parts[1] not in CIFAR10_CLASSES:
                continue
            entries.append((member.name, CIFAR10_CLASSES.index(parts[1]), archive.extractfile(member).read()))
    entries.sort(key=lambda entry: entry[0])
    if limit is not None:
        entries = entries[:limit]
    if not entries:
        raise ValueError(f"no images found in {root / f'{split}.tar.gz'}")
    blobs = [entry[2] for entry in entries]
    labels = torch.tensor([entry[1] for entry in entries], dtype=torch.int64)
    if num_workers is None:
        num_workers = (os.cpu_count() or 1) if len(blobs) > 2000 else 1
    if num_workers > 1:
        chunks = [blobs[i :: num_workers] for i in range(num_workers)]
        with ProcessPoolExecutor(num_workers) as pool:
            decoded = list(pool.map(_decode, chunks))
        images = np.empty((len(blobs), 32, 32, 3), dtype=np.uint8)
        for i, chunk in enumerate(decoded):
            images[i::num_workers] = chunk
    else:
        images = _decode(blobs)
    return torch.from_numpy(images).permute(0, 3, 1, 2).contiguous(), labels
