"""Training data for distilled students: image-caption folders and the captioned CIFAR-10 set.

Both sources become one in-memory ``CaptionedImages``: uint8 images, a table of distinct caption texts, and
per image the indices of the captions that describe it (a caption folder gives one or more lines per image;
CIFAR-10 gives the embedded model's caption templates for the image's class). For speed the images can be
encoded once with the frozen autoencoder (``encode_latents``) and the captions once with the frozen text
encoder (``encode_captions``); a training step then draws latents and caption indices on the device with
``sample_latent_batch``, as ``apps/train_embedded.py`` trained the teacher.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass
class CaptionedImages(torch.utils.data.Dataset):
    """Images with captions: ``images`` uint8 ``(N, 3, H, W)``; ``captions`` the distinct texts;
    ``choices`` int64 ``(N, K)``, indices into ``captions`` that each describe image ``n``."""

    images: torch.Tensor
    captions: tuple[str, ...]
    choices: torch.Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.ndim != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (N, 3, H, W), got {self.images.dtype} {tuple(self.images.shape)}")
        if self.choices.ndim != 2 or self.choices.shape[0] != self.images.shape[0]:
            raise ValueError(f"choices must be (N, K) with N={self.images.shape[0]}, got {tuple(self.choices.shape)}")

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> dict:
        """``pixel_values`` in [-1, 1] and the image's first caption (for a ``DataLoader``)."""
        return {"pixel_values": to_model_range(self.images[index]), "caption": self.captions[int(self.choices[index, 0])]}


def to_model_range(images: torch.Tensor) -> torch.Tensor:
    """uint8 [0, 255] -> float [-1, 1], the range SD's autoencoder works in."""
    return images.float() / 127.5 - 1.0


def _load_image(path: Path, resolution: int) -> torch.Tensor:
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGB")
        # Resize the short side, then centre-crop a square, as diffusers' text-to-image example does.
        scale = resolution / min(image.size)
        size = (max(resolution, round(image.width * scale)), max(resolution, round(image.height * scale)))
        image = image.resize(size, Image.BICUBIC)
        left, top = (image.width - resolution) // 2, (image.height - resolution) // 2
        image = image.crop((left, top, left + resolution, top + resolution))
        return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8).view(resolution, resolution, 3).permute(2, 0, 1)


def image_caption_folder(root: str | os.PathLike, resolution: int) -> CaptionedImages:
    """Every image file under ``root`` with a same-stem ``.txt`` beside it; each non-empty line is a caption.

    Images without a caption file are skipped; a folder with none is an error. All images are held in memory,
    resized and centre-cropped to ``resolution``: meant for distillation sets of up to some ten thousand images.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image-caption folder {root} does not exist")
    images, captions, per_image = [], {}, []
    for path in sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS):
        caption_file = path.with_suffix(".txt")
        if not caption_file.is_file():
            continue
        lines = [line.strip() for line in caption_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not lines:
            continue
        images.append(_load_image(path, resolution))
        per_image.append([captions.setdefault(line, len(captions)) for line in lines])
    if not images:
        raise ValueError(f"no images with a same-stem .txt caption found under {root} (extensions {IMAGE_EXTENSIONS})")
    width = max(len(ids) for ids in per_image)
    # Pad by cycling an image's own captions, so a uniform draw over K columns stays within its captions.
    choices = torch.tensor([[ids[k % len(ids)] for k in range(width)] for ids in per_image], dtype=torch.int64)
    return CaptionedImages(torch.stack(images), tuple(captions), choices)


def cifar10_captioned(split: str = "train", root: str | os.PathLike | None = None, *, limit: int | None = None) -> CaptionedImages:
    """CIFAR-10 with the embedded model's caption templates ("a photo of a cat", "a blurry photo of a cat", ...)."""
    from accel.quality.cifar import load_cifar10

    return class_captioned(*load_cifar10(split, root, limit=limit))


def class_captioned(images: torch.Tensor, labels: torch.Tensor) -> CaptionedImages:
    """Images labelled with CIFAR-10 class indices, captioned by every template of their class."""
    from accel.embedded import CIFAR10_CLASSES, class_captions

    num_templates = len(class_captions(CIFAR10_CLASSES[0]))
    captions = tuple(text for name in CIFAR10_CLASSES for text in class_captions(name))
    choices = labels[:, None] * num_templates + torch.arange(num_templates)
    return CaptionedImages(images, captions, choices)


def load_captioned_images(source: str | os.PathLike, resolution: int | None = None, *, limit: int | None = None) -> CaptionedImages:
    """``"cifar10"`` / ``"cifar10:train"`` / ``"cifar10:test"`` (archives from ``ACCEL_CIFAR10_DIR``), or a caption folder."""
    text = str(source)
    if text == "cifar10" or text.startswith("cifar10:"):
        split = text.partition(":")[2] or "train"
        data = cifar10_captioned(split, limit=limit)
        if resolution not in (None, data.images.shape[-1]):
            raise ValueError(f"CIFAR-10 images are {data.images.shape[-1]}x{data.images.shape[-1]}; got resolution={resolution}")
        return data
    if resolution is None:
        raise ValueError("an image-caption folder needs a resolution (the pipeline's sample size times the VAE factor)")
    data = image_caption_folder(text, resolution)
    if limit is not None:
        data = CaptionedImages(data.images[:limit], data.captions, data.choices[:limit])
    return data


@dataclass
class LatentSet:
    """Autoencoder posteriors of a ``CaptionedImages``, already multiplied by ``scaling_factor``."""

    mean: torch.Tensor
    std: torch.Tensor
    choices: torch.Tensor
    captions: tuple[str, ...]


@torch.no_grad()
def encode_latents(vae, data: CaptionedImages, *, batch_size: int = 500, mirror: bool = True) -> LatentSet:
    """Posterior mean and std of every image (and of its mirror image when ``mirror``), on the VAE's device."""
    device, dtype = vae.device, vae.dtype
    means, stds = [], []
    for flip in (False, True) if mirror else (False,):
        for chunk in data.images.split(batch_size):
            x = to_model_range(chunk.to(device)).to(dtype)
            posterior = vae.encode(x.flip(3) if flip else x).latent_dist
            means.append(posterior.mean.float())
            stds.append(posterior.std.float())
    scale = vae.config.scaling_factor
    choices = data.choices.repeat(2 if mirror else 1, 1).to(device)
    return LatentSet(torch.cat(means) * scale, torch.cat(stds) * scale, choices, data.captions)


@torch.no_grad()
def encode_captions(text_encoder, tokenizer, captions: tuple[str, ...] | list[str], *, batch_size: int = 256) -> torch.Tensor:
    """Text-encoder hidden states of every caption and, last, of the empty caption (for classifier-free guidance).

    Tokenized as ``StableDiffusionPipeline`` does (padding to ``model_max_length``), so a student trained on
    these embeddings sees what it will see at inference.
    """
    texts = list(captions) + [""]
    hidden = []
    for start in range(0, len(texts), batch_size):
        ids = tokenizer(
            texts[start : start + batch_size],
            padding="max_length",
            max_length=tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        hidden.append(text_encoder(ids.to(text_encoder.device))[0])
    return torch.cat(hidden)


def sample_latent_batch(
    latents: LatentSet, batch_size: int, generator: torch.Generator, *, cfg_dropout: float = 0.1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``(x0, caption_index)``: a posterior sample per drawn image and one of its captions, the empty
    caption (index ``len(captions)``) with probability ``cfg_dropout``. All on the latents' device."""
    device = latents.mean.device
    index = torch.randint(0, latents.mean.shape[0], (batch_size,), device=device, generator=generator)
    x0 = latents.mean[index] + latents.std[index] * torch.randn(latents.mean[index].shape, device=device, generator=generator)
    column = torch.randint(0, latents.choices.shape[1], (batch_size,), device=device, generator=generator)
    caption = latents.choices[index, column]
    drop = torch.rand(batch_size, device=device, generator=generator) < cfg_dropout
    caption = torch.where(drop, torch.full_like(caption, len(latents.captions)), caption)
    return x0, caption
