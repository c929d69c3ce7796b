"""UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling").

UniP-p is a multistep predictor of order p; UniC corrects each step with the denoiser call the
next step makes anyway, raising the order to p + 1 at no extra cost. B(h) is `h` (bh1) or
`e^h - 1` (bh2). Data-prediction form, as in diffusers' `UniPCMultistepScheduler(predict_x0=True)`,
written in the VE sigma parameterisation, or with `flow=True` in the flow-matching one (alpha =
1 - sigma, as `UniPCMultistepScheduler(use_flow_sigmas=True)`), where the outputs are weighted by
`alpha_t`. The corrector's and higher-order weights need a finite lambda at every node, so a flow
schedule that starts at sigma 1 (lambda = -inf) starts at 1 - 1e-6 instead, as diffusers' does.
"""

from __future__ import annotations

import math

import torch

from ._loop import Steps, as_floats, drive, half_log_snr, signal_scales

VARIANTS = ("bh1", "bh2")
# diffusers' UniPCMultistepScheduler moves a first flow sigma of 1 this far down
FLOW_START_OFFSET = 1e-6


def _coefficients(rks: list[float], h: float, order: int, variant: str):
    """(R, b, B(h), h*phi_1) of the UniPC linear system for nodes `rks` (the last one is 1)."""
    hh = -h
    h_phi_1 = math.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1
    factorial = 1
    B_h = hh if variant == "bh1" else math.expm1(hh)
    R, b = [], []
    for k in range(1, order + 1):
        R.append([r ** (k - 1) for r in rks])
        b.append(h_phi_k * factorial / B_h)
        factorial *= k + 1
        h_phi_k = h_phi_k / hh - 1 / factorial
    return torch.tensor(R, dtype=torch.float64), torch.tensor(b, dtype=torch.float64), B_h, h_phi_1


def _differences(ms, lams, h, order):
    m0 = ms[-1]
    rks, D1s = [], []
    for k in range(1, order):
        rk = (lams[-(k + 1)] - lams[-1]) / h
        rks.append(rk)
        D1s.append((ms[-(k + 1)] - m0) / rk)
    return rks + [1.0], D1s


def unipc_predict(x, s0, t, lam_t, a_t, ms, lams, order, variant):
    """UniP-order step from (x, s0) to t (at lambda `lam_t`, signal scale `a_t`) with outputs `ms` at
    lambdas `lams` (latest last)."""
    if t == 0:
        return ms[-1]
    h = lam_t - lams[-1]
    rks, D1s = _differences(ms, lams, h, order)
    R, b, B_h, h_phi_1 = _coefficients(rks, h, order, variant)
    x_t = (t / s0) * x - a_t * h_phi_1 * ms[-1]
    if D1s:
        rhos = [0.5] if order == 2 else torch.linalg.solve(R[:-1, :-1], b[:-1]).tolist()
        x_t = x_t - a_t * B_h * sum(rho * d for rho, d in zip(rhos, D1s))
    return x_t


def unipc_correct(x_last, s_last, s, lam_s, a_s, ms, lams, m_new, order, variant):
    """UniC: redo the step from (x_last, s_last) to s (at lambda `lam_s`, signal scale `a_s`), now
    using the output `m_new` at s."""
    h = lam_s - lams[-1]
    rks, D1s = _differences(ms, lams, h, order)
    R, b, B_h, h_phi_1 = _coefficients(rks, h, order, variant)
    rhos = [0.5] if order == 1 else torch.linalg.solve(R, b).tolist()
    x_t = (s / s_last) * x_last - a_s * h_phi_1 * ms[-1]
    corr = sum((rho * d for rho, d in zip(rhos[:-1], D1s)), 0.0)
    return x_t - a_s * B_h * (corr + rhos[-1] * (m_new - ms[-1]))


def unipc_steps(x, sigmas, order: int = 2, variant: str = "bh1", use_corrector: bool = True,
                lower_order_final: bool = True, orders=None, flow: bool = False) -> Steps:
    """`orders` (optional) gives each step's predictor order (a tuned schedule's, S^3); a run
    that starts part-way (img2img) takes the orders of the schedule's last steps. `flow=True`:
    `sigmas` and `x` in the flow-matching form."""
    if order not in (1, 2, 3):
        raise ValueError(f"order={order!r} is not supported; valid choices: (1, 2, 3)")
    if variant not in VARIANTS:
        raise ValueError(f"variant={variant!r} is not supported; valid choices: {VARIANTS}")
    sig = as_floats(sigmas)
    if flow and abs(sig[0] - 1) < FLOW_START_OFFSET:
        sig[0] -= FLOW_START_OFFSET
    alphas = signal_scales(sig, flow)
    lam = [half_log_snr(a, s) for a, s in zip(alphas, sig)]
    n = len(sig) - 1
    if orders is not None:
        orders = [int(o) for o in orders]
        if len(orders) < n or any(o not in (1, 2, 3) for o in orders):
            raise ValueError(f"orders must give one order in (1, 2, 3) per step ({n}), got {orders}")
        orders, order = orders[len(orders) - n:], max(orders)
    ms, lams = [], []
    x_last, last_order = None, None
    for i in range(n):
        s, t = sig[i], sig[i + 1]
        x, denoised = yield x, s, i
        if use_corrector and x_last is not None:
            x = unipc_correct(x_last, sig[i - 1], s, lam[i], alphas[i], ms, lams, denoised, last_order, variant)
        ms, lams = (ms + [denoised])[-order:], (lams + [lam[i]])[-order:]
        if orders is not None:
            this_order = orders[i]
        else:
            this_order = min(order, n - i) if lower_order_final else order
        this_order = 1 if t == 0 and not lower_order_final else min(this_order, len(ms))
        x_last, last_order = x, this_order
        x = unipc_predict(x, s, t, lam[i + 1], alphas[i + 1], ms, lams, this_order, variant)
    return x


def sample_unipc(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, order=2, variant="bh1",
                 use_corrector=True, lower_order_final=True, orders=None, flow=False):
    """UniPC (UniP-order predictor, UniC corrector unless `use_corrector=False`)."""
    return drive(unipc_steps(x, sigmas, order, variant, use_corrector, lower_order_final, orders, flow), denoiser, x,
                 extra_args=extra_args, callback=callback, disable=disable, total=len(sigmas) - 1)
