"""Quality harness: fidelity to a baseline (PSNR, SSIM), prompt adherence and Frechet distance on CIFAR-10.

``from accel.quality.evaluate import evaluate, write_report`` runs the whole harness on a pipeline.
Import-light: this package imports torch only; the classifier and the CIFAR-10 loader load on use.
"""

import importlib

from .frechet import feature_statistics, frechet_distance, frechet_distance_from_statistics
from .metrics import psnr, ssim

__all__ = [
    "feature_statistics",
    "frechet_distance",
    "frechet_distance_from_statistics",
    "load_cifar10",
    "load_classifier",
    "psnr",
    "ssim",
]

_LAZY = {"load_classifier": "classifier", "load_cifar10": "cifar"}


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_LAZY[name]}"), name)
