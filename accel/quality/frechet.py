"""Frechet distance between two feature sets (Heusel et al., 2017, the distance behind FID).

``FD = |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))`` for Gaussians fitted to each set.
Computed in float64 with symmetric eigendecompositions only, so no scipy: ``tr((S_a S_b)^(1/2))``
equals the sum of square roots of the eigenvalues of ``S_a^(1/2) S_b S_a^(1/2)``, which is symmetric.
"""

from __future__ import annotations

import torch


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``(D,)`` and unbiased covariance ``(D, D)`` of ``(N, D)`` features, float64."""
    if features.ndim != 2 or features.shape[0] < 2:
        raise ValueError(f"expected (N, D) features with N >= 2, got shape {tuple(features.shape)}")
    x = features.double()
    mu = x.mean(0)
    centred = x - mu
    return mu, centred.T @ centred / (x.shape[0] - 1)


def _psd_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    eigenvalues, eigenvectors = torch.linalg.eigh(matrix)
    return (eigenvectors * eigenvalues.clamp(min=0).sqrt()) @ eigenvectors.T


def frechet_distance_from_statistics(mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor, sigma_b: torch.Tensor) -> float:
    mu_a, sigma_a, mu_b, sigma_b = (t.double() for t in (mu_a, sigma_a, mu_b, sigma_b))
    sqrt_a = _psd_sqrt(sigma_a)
    middle = sqrt_a @ sigma_b @ sqrt_a
    trace_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    distance = (mu_a - mu_b).square().sum() + sigma_a.trace() + sigma_b.trace() - 2 * trace_sqrt
    return float(distance.clamp(min=0))


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to two ``(N, D)`` feature sets."""
    return frechet_distance_from_statistics(*feature_statistics(features_a), *feature_statistics(features_b))
