"""The OLSS sampler: a solver with per-step coefficients (Duan et al. 2023, "Optimal Linear Subspace
Search: Learning to Construct Fast and High-Quality Schedulers for Diffusion Models").

Every step is a linear combination `x_{i+1} = a_i * x_i + sum_j b_{i,j} * D_j` of the current
state and the last few denoiser outputs (x0 predictions) `D_j`, in the VE sigma form of the other
samplers or (`flow=True`) the flow-matching one. DPM-Solver++(2M) is one member of this family
(`dpmpp_2m_coefficients`), so it is the default; `samplers.olss` fits the coefficients to a model.

A row of coefficients is `[a_i, b for D_{i-m+1}, ..., b for D_i]` (oldest output first); its
length says how many outputs `m` the step combines.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch

from ._loop import Steps, as_floats, drive, half_log_snr, signal_scales, step_order


def dpmpp_2m_coefficients(sigmas, lower_order_final: bool = True, flow: bool = False) -> list[list[float]]:
    """The rows of DPM-Solver++(2M) (midpoint) on `sigmas`: first order on the first step, into
    sigma 0 and (`lower_order_final`, fewer than 15 steps) on the last step, second order between;
    `flow=True` on a flow-matching schedule (the output weights scaled by alpha_t = 1 - t)."""
    sig = as_floats(sigmas)
    alphas = signal_scales(sig, flow)
    lam = [half_log_snr(a, s) for a, s in zip(alphas, sig)]
    n = len(sig) - 1
    rows = []
    for i in range(n):
        s, t = sig[i], sig[i + 1]
        if t == 0:
            rows.append([0.0, 1.0])
            continue
        e = alphas[i + 1] * math.expm1(lam[i] - lam[i + 1])
        if step_order(2, min(i + 1, 2), i, n, t, lower_order_final) == 1:
            rows.append([t / s, -e])
            continue
        r0 = (lam[i - 1] - lam[i]) / (lam[i] - lam[i + 1])
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


def olss_steps(x, sigmas, coefficients=None, begin: bool = True, flow: bool = False) -> Steps:
    """The coefficient solver as a solver generator (see `samplers._loop`).

    `coefficients=None` runs DPM-Solver++(2M)'s own. A run that starts part-way (`begin=False`,
    img2img) takes the rows of the schedule's last steps; a step whose row combines outputs from
    before the start takes DPM-Solver++(2M)'s step instead (first order on the first step).
    `flow=True`: `sigmas` and `x` in the flow-matching form (fitted rows are form-specific).
    """
    sig = as_floats(sigmas)
    n = len(sig) - 1
    base = dpmpp_2m_coefficients(sig, flow=flow)
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


def sample_olss(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, coefficients=None, flow=False):
    """OLSS: fitted per-step coefficients (None: DPM-Solver++(2M)'s) on `sigmas`."""
    return drive(olss_steps(x, sigmas, coefficients, flow=flow), denoiser, x, extra_args=extra_args, callback=callback,
                 disable=disable, total=len(sigmas) - 1)
