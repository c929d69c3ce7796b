"""Fidelity metrics between two batches of images: PSNR and SSIM (Wang et al., 2004).

Both take float tensors ``(N, C, H, W)`` (or ``(C, H, W)``) in [0, ``data_range``] and return one value
per image, shape ``(N,)``, in float64 arithmetic; the caller averages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _batched(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")
    if a.ndim == 3:
        a, b = a[None], b[None]
    if a.ndim != 4:
        raise ValueError(f"expected (N, C, H, W) or (C, H, W) images, got shape {tuple(a.shape)}")
    return a.double(), b.double()


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB, per image; ``inf`` where the images are identical."""
    a, b = _batched(a, b)
    mse = (a - b).square().flatten(1).mean(1)
    return 10.0 * torch.log10(data_range**2 / mse)


def _gaussian_window(size: int, sigma: float, channels: int, device, dtype) -> torch.Tensor:
    coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    g = g / g.sum()
    return (g[:, None] * g[None, :]).expand(channels, 1, size, size).contiguous()


def ssim(
    a: torch.Tensor,
    b: torch.Tensor,
    data_range: float = 1.0,
    *,
    window_size: int = 11,
    sigma: float = 1.5,
    k1: float = 0.01,
    k2: float = 0.03,
) -> torch.Tensor:
    """Structural similarity per image: a Gaussian window (11, 1.5) over each channel, valid positions only.

    The window shrinks to the image size for images smaller than 11 pixels.
    """
    a, b = _batched(a, b)
    channels = a.shape[1]
    window_size = min(window_size, a.shape[-1], a.shape[-2])
    window = _gaussian_window(window_size, sigma, channels, a.device, a.dtype)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, window, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2))
    return ssim_map.flatten(1).mean(1)
