"""The CIFAR-10 classifier of the quality harness: a ResNet-9 (Page, 2018, "How to train your ResNet").

It scores prompt adherence (share of generated images classified as the prompted class) and gives
the features for the Frechet distance (its pooled penultimate layer, ``features(x)``). Inputs are
images in [0, 1], shape ``(N, 3, 32, 32)``; the module normalises them itself.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

CLASSIFIER_DIR = Path(__file__).resolve().parents[1] / "models" / "cifar10-classifier"
WEIGHTS_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

# Per-channel statistics of the CIFAR-10 training set.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)


def conv_bn(in_channels: int, out_channels: int, pool: bool = False) -> nn.Sequential:
    layers = [
        nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False),
        nn.BatchNorm2d(out_channels),
        nn.ReLU(inplace=True),
    ]
    if pool:
        layers.append(nn.MaxPool2d(2))
    return nn.Sequential(*layers)


class Residual(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.body = nn.Sequential(conv_bn(channels, channels), conv_bn(channels, channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class CifarResNet(nn.Module):
    """ResNet-9: prep, (conv, pool, residual), (conv, pool), (conv, pool, residual), pool, linear."""

    def __init__(self, widths: tuple[int, int, int, int] = (40, 80, 160, 320), num_classes: int = 10):
        super().__init__()
        self.config = {"widths": list(widths), "num_classes": num_classes}
        w0, w1, w2, w3 = widths
        self.register_buffer("mean", torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(CIFAR10_STD).view(1, 3, 1, 1), persistent=False)
        self.body = nn.Sequential(
            conv_bn(3, w0),
            conv_bn(w0, w1, pool=True),
            Residual(w1),
            conv_bn(w1, w2, pool=True),
            conv_bn(w2, w3, pool=True),
            Residual(w3),
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
        )
        self.head = nn.Linear(w3, num_classes, bias=False)
        # Scaling the logits down (as in Page's recipe) makes training with label smoothing stable.
        self.logit_scale = 0.125

    @property
    def feature_dim(self) -> int:
        return self.head.in_features

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """Penultimate features ``(N, feature_dim)`` of images in [0, 1]."""
        return self.body((x - self.mean) / self.std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Class logits ``(N, num_classes)`` of images in [0, 1]."""
        return self.head(self.features(x)) * self.logit_scale


def save_classifier(model: CifarResNet, out_dir: str | Path, *, metadata: dict | None = None) -> None:
    """Write ``model.safetensors`` (fp16) and ``config.json`` (architecture plus ``metadata``)."""
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().to("cpu", torch.float16 if v.is_floating_point() else v.dtype).contiguous() for k, v in model.state_dict().items()}
    save_file(state, out_dir / WEIGHTS_NAME)
    config = dict(model.config, architecture="CifarResNet", input="RGB in [0, 1], 32x32", **(metadata or {}))
    (out_dir / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")


def load_classifier(path: str | Path | None = None, device: str | torch.device = "cpu") -> CifarResNet:
    """The shipped classifier (or one saved by ``save_classifier`` at ``path``), float32, in eval mode."""
    from safetensors.torch import load_file

    path = Path(path) if path is not None else CLASSIFIER_DIR
    config = json.loads((path / CONFIG_NAME).read_text())
    model = CifarResNet(widths=tuple(config["widths"]), num_classes=config["num_classes"])
    state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(path / WEIGHTS_NAME).items()}
    model.load_state_dict(state)
    return model.to(device).eval()
