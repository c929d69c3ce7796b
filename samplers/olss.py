"""A solver with fitted per-step coefficients: OLSS (Duan et al. 2023, "Optimal Linear Subspace
Search: Learning to Construct Fast and High-Quality Schedulers for Diffusion Models").

Every step is a linear combination `x_{i+1} = a_i * x_i + sum_j b_{i,j} * D_j` of the current
state and the last few denoiser outputs (x0 predictions) `D_j`, in the VE sigma form of the other
samplers. DPM-Solver++(2M) is one member of this family (`dpmpp_2m_coefficients`), so it is the
default and the starting point; `fit_olss_coefficients` fits the coefficients step by step by
least squares against a high-step reference solution at the schedule's own sigmas, running the
fitted solver so far to produce `x_i` and the `D_j`, so that errors compound as at inference.

A row of coefficients is `[a_i, b for D_{i-m+1}, ..., b for D_i]` (oldest output first); its
length says how many outputs `m` the step combines.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from ._loop import Steps, as_floats, drive, step_order
from .dpm_solver import _lam, _second_order


def dpmpp_2m_coefficients(sigmas, lower_order_final: bool = True) -> list[list[float]]:
    """The rows of DPM-Solver++(2M) (midpoint) on `sigmas`: first order on the first step, into
    sigma 0 and (`lower_order_final`, fewer than 15 steps) on the last step, second order between."""
    sig = as_floats(sigmas)
    n = len(sig) - 1
    rows = []
    for i in range(n):
        s, t = sig[i], sig[i + 1]
        if t == 0:
            rows.append([0.0, 1.0])
            continue
        e = math.expm1(_lam(s) - _lam(t))
        if step_order(2, min(i + 1, 2), i, n, t, lower_order_final) == 1:
            rows.append([t / s, -e])
            continue
        r0 = (_lam(sig[i - 1]) - _lam(s)) / (_lam(s) - _lam(t))
        rows.append([t / s, 0.5 * e / r0, -e - 0.5 * e / r0])
    return rows


def check_coefficients(coefficients, num_steps: int | None = None) -> list[list[float]]:
    """`coefficients` as float rows, or `ValueError` saying what is wrong: one row per step, row i
    holding `a_i` and 1 to i + 1 output weights."""
    if isinstance(coefficients, (str, bytes)) or not isinstance(coefficients, Sequence) or not coefficients:
        raise ValueError(f"coefficients must list one row [a, b...] per step, got {coefficients!r}")
    rows = []
    for i, row in enumerate(coefficients):
        if isinstance(row, (str, bytes)) or not isinstance(row, Sequence) or not 2 <= len(row) <= i + 2:
            raise ValueError(f"coefficients row {i} must hold a and 1 to {i + 1} output weights "
                             f"(2 to {i + 2} numbers), got {row!r}")
        if any(isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) for v in row):
            raise ValueError(f"coefficients row {i} must hold finite numbers, got {row!r}")
        rows.append([float(v) for v in row])
    if num_steps is not None and len(rows) != num_steps:
        raise ValueError(f"coefficients were fitted for {len(rows)} steps, not num_steps={num_steps}")
    return rows


def _combine(row: Sequence[float], x: torch.Tensor, outputs: list[torch.Tensor]) -> torch.Tensor:
    out = row[0] * x
    for b, d in zip(row[1:], outputs[len(outputs) - (len(row) - 1):]):
        out = out + b * d
    return out


def olss_steps(x, sigmas, coefficients=None, begin: bool = True) -> Steps:
    """The coefficient solver as a solver generator (see `samplers._loop`).

    `coefficients=None` runs DPM-Solver++(2M)'s own. A run that starts part-way (`begin=False`,
    img2img) takes the rows of the schedule's last steps; a step whose row combines outputs from
    before the start takes DPM-Solver++(2M)'s step instead (first order on the first step).
    """
    sig = as_floats(sigmas)
    n = len(sig) - 1
    base = dpmpp_2m_coefficients(sig)
    rows = base
    if coefficients is not None:
        rows = check_coefficients(coefficients)
        if n > len(rows) or (begin and n != len(rows)):
            raise ValueError(f"the coefficients were fitted for {len(rows)} steps, but the schedule has {n}"
                             + ("" if begin else " remaining") + " steps")
        rows = rows[len(rows) - n:]
    outputs: list[torch.Tensor] = []
    for i in range(n):
        x, denoised = yield x, sig[i], i
        outputs = (outputs + [denoised])[-max(len(r) - 1 for r in rows):]
        row = rows[i] if len(rows[i]) - 1 <= i + 1 else base[i]
        x = _combine(row, x, outputs)
    return x


def sample_olss(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, coefficients=None):
    """OLSS: fitted per-step coefficients (None: DPM-Solver++(2M)'s) on `sigmas`."""
    return drive(olss_steps(x, sigmas, coefficients), denoiser, x, extra_args=extra_args, callback=callback,
                 disable=disable, total=len(sigmas) - 1)


class ReferenceTrajectory:
    """A high-step solution of the probability-flow ODE that can be read at any sigma: the states
    and denoiser outputs of a fine solve, and from the grid point just above a sigma one
    DPM-Solver++(2M) step to it (the step the fine solve itself would take there)."""

    def __init__(self, sigmas, states: list[torch.Tensor], outputs: list[torch.Tensor], final: torch.Tensor):
        self.sigmas = as_floats(sigmas)
        self.states, self.outputs, self.final = states, outputs, final

    @classmethod
    def solve(cls, denoiser, x, sigmas, *, sampler: str = "dpmpp_3m", extra_args=None) -> "ReferenceTrajectory":
        """Run `sampler` on `sigmas` (one denoiser call per sigma) and keep every state and output."""
        from .api import sample

        states, outputs, seen = [], [], []

        def keep(info):
            states.append(info["x"])
            outputs.append(info["denoised"])
            seen.append(float(info["sigma"]))

        final = sample(sampler, denoiser, x, sigmas, extra_args=extra_args, callback=keep, disable=True)
        grid = as_floats(sigmas)[:-1]
        if seen != grid:
            raise ValueError(f"reference sampler {sampler!r} calls the denoiser off its grid; use a multistep sampler")
        return cls(grid + [0.0], states, outputs, final)

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
        h = _lam(sigma) - _lam(s)
        if k == 0:
            return (sigma / s) * self.states[k] - math.expm1(-h) * self.outputs[k]
        r0 = (_lam(s) - _lam(grid[k - 1])) / h
        return _second_order(self.states[k], s, sigma, self.outputs[k], (self.outputs[k] - self.outputs[k - 1]) / r0,
                             h, True, "midpoint")


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
    base = dpmpp_2m_coefficients(sig)
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
