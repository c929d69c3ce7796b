"""Fitting the per-step coefficients of OLSS (Duan et al. 2023, "Optimal Linear Subspace Search:
Learning to Construct Fast and High-Quality Schedulers for Diffusion Models").

The solver, `x_{i+1} = a_i * x_i + sum_j b_{i,j} * D_j` with DPM-Solver++(2M) as its default member,
is the sampler "olss" (`samplers.olss_solver`, whose names this module re-exports).
`fit_olss_coefficients` fits the coefficients step by step by least squares against a high-step
reference solution (`ReferenceTrajectory`) at the schedule's own sigmas, running the fitted solver
so far to produce `x_i` and the `D_j`, so that errors compound as at inference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ._loop import as_floats, half_log_snr, signal_scales
from .dpm_solver import _second_order
from .olss_solver import _combine, check_coefficients, dpmpp_2m_coefficients, olss_steps, sample_olss
from .registry import run_sampler

__all__ = [
    "OLSSFit",
    "ReferenceTrajectory",
    "check_coefficients",
    "dpmpp_2m_coefficients",
    "fit_olss_coefficients",
    "olss_steps",
    "sample_olss",
]


class ReferenceTrajectory:
    """A high-step solution of the probability-flow ODE that can be read at any sigma: the states
    and denoiser outputs of a fine solve, and from the grid point just above a sigma one
    DPM-Solver++(2M) step to it (the step the fine solve itself would take there). `flow`: the
    sigmas and states are in the flow-matching form (`samplers.flow`)."""

    def __init__(self, sigmas, states: list[torch.Tensor], outputs: list[torch.Tensor], final: torch.Tensor,
                 flow: bool = False):
        self.sigmas = as_floats(sigmas)
        self.states, self.outputs, self.final, self.flow = states, outputs, final, flow

    @classmethod
    def solve(cls, denoiser, x, sigmas, *, sampler: str = "dpmpp_3m", extra_args=None,
              flow: bool = False) -> "ReferenceTrajectory":
        """Run `sampler` on `sigmas` (one denoiser call per sigma) and keep every state and output."""
        states, outputs, seen = [], [], []

        def keep(info):
            states.append(info["x"])
            outputs.append(info["denoised"])
            seen.append(float(info["sigma"]))

        final = run_sampler(sampler, denoiser, x, sigmas, extra_args=extra_args, callback=keep, disable=True,
                            flow=flow)
        grid = as_floats(sigmas)[:-1]
        if seen != grid:
            raise ValueError(f"reference sampler {sampler!r} calls the denoiser off its grid; use a multistep sampler")
        return cls(grid + [0.0], states, outputs, final, flow)

    def at(self, sigma: float) -> torch.Tensor:
        sigma = float(sigma)
        if sigma == 0:
            return self.final
        grid = self.sigmas[:-1]
        if sigma > grid[0]:
            raise ValueError(f"sigma={sigma} lies above the reference's first sigma {grid[0]}")
        k = max(j for j, s in enumerate(grid) if s >= sigma)
        s = grid[k]
        if s == sigma:
            return self.states[k]
        points = [grid[max(k - 1, 0)], s, sigma]
        alphas = signal_scales(points, self.flow)
        lam_before, lam_s, lam_t = (half_log_snr(a, v) for a, v in zip(alphas, points))
        h = lam_t - lam_s
        if h == 0:  # sigma lies within float rounding of the grid point (a searched schedule can land there)
            return self.states[k]
        if k == 0:
            return (sigma / s) * self.states[k] - alphas[2] * math.expm1(-h) * self.outputs[k]
        r0 = (lam_s - lam_before) / h
        return _second_order(self.states[k], s, sigma, self.outputs[k], (self.outputs[k] - self.outputs[k - 1]) / r0,
                             h, True, "midpoint", alphas[2])


@dataclass
class OLSSFit:
    """Fitted rows, the fitted solver's final sample on the calibration inputs, and the denoiser calls."""

    coefficients: list[list[float]]
    sample: torch.Tensor
    denoiser_calls: int


def _least_squares(features: list[torch.Tensor], target: torch.Tensor, ridge: float,
                   prior: list[float]) -> list[float]:
    """argmin_c mean((sum_k c_k F_k - target)^2) + ridge * |c - prior|^2, in float64."""
    flat = torch.stack([f.reshape(-1) for f in features]).double()
    y = target.reshape(-1).double()
    size = flat.shape[1]
    gram = flat @ flat.T / size
    rhs = flat @ y / size
    prior_t = torch.tensor(prior, dtype=torch.float64, device=gram.device)
    if ridge:
        gram = gram + ridge * torch.eye(len(features), dtype=torch.float64, device=gram.device)
        rhs = rhs + ridge * prior_t
    # lstsq on the small Gram matrix: the outputs of neighbouring steps are nearly collinear
    solution = torch.linalg.lstsq(gram.cpu(), rhs.cpu()[:, None], driver="gelsd").solution[:, 0]
    return [float(v) for v in solution]


def fit_olss_coefficients(denoiser, x, sigmas, reference: ReferenceTrajectory, *, extra_args=None,
                          history: int | None = 3, ridge: float = 0.0) -> OLSSFit:
    """Fit one row per step so that the step lands on the reference state at the next sigma.

    Args:
        denoiser: `denoiser(x, sigma, **extra_args) -> x0`.
        x: the calibration inputs at `sigmas[0]` (VE scale), the ones `reference` started from.
        sigmas: the schedule (descending, ending in 0); its steps are fitted one after another, each
            on the state and outputs of the fitted solver so far; the last step fits the final sample.
        history: how many of the latest denoiser outputs a step combines (None: all so far).
        ridge: weight of `|row - dpmpp_2m's row|^2` next to the mean squared error of the step.
    """
    if history is not None and (isinstance(history, bool) or not isinstance(history, int) or history < 1):
        raise ValueError(f"history must be a positive int or None (all outputs), got {history!r}")
    if not ridge >= 0:
        raise ValueError(f"ridge must be >= 0, got {ridge!r}")
    sig = as_floats(sigmas)
    n = len(sig) - 1
    base = dpmpp_2m_coefficients(sig, flow=reference.flow)
    extra_args = extra_args or {}
    s_in = x.new_ones([x.shape[0]])
    outputs, rows = [], []
    for i in range(n):
        outputs.append(denoiser(x, sig[i] * s_in, **extra_args))
        m = i + 1 if history is None else min(i + 1, history)
        weights = base[i][1:][-m:]  # dpmpp_2m's row over the same outputs, newest last
        prior = [base[i][0]] + [0.0] * (m - len(weights)) + weights
        row = _least_squares([x] + outputs[-m:], reference.at(sig[i + 1]), ridge, prior)
        rows.append(row)
        x = _combine(row, x, outputs)
    return OLSSFit(rows, x, n)
