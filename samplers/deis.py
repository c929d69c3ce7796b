"""DEIS (Zhang & Chen 2023, "Fast Sampling of Diffusion Models with Exponential Integrator").

The log-rho multistep variant (diffusers' `DEISMultistepScheduler`): the noise prediction is
extrapolated by a Lagrange polynomial in log(rho), rho = sigma_vp / alpha (the VE sigma), and
integrated exactly against d rho.
"""

from __future__ import annotations

import math

from ._loop import Steps, as_floats, drive, step_order


def _ind2(t, b, c):
    # Integrate[(log(t) - log(c)) / (log(b) - log(c)), {t}]
    return t * (-math.log(c) + math.log(t) - 1) / (math.log(b) - math.log(c))


def _ind3(t, b, c, d):
    lt, lc, ld, lb = math.log(t), math.log(c), math.log(d), math.log(b)
    numerator = t * (lc * (ld - lt + 1) - ld * lt + ld + lt**2 - 2 * lt + 2)
    return numerator / ((lb - lc) * (lb - ld))


def deis_steps(x, sigmas, order: int = 2, lower_order_final: bool = True) -> Steps:
    if order not in (1, 2, 3):
        raise ValueError(f"order={order!r} is not supported; valid choices: (1, 2, 3)")
    sig = as_floats(sigmas)
    n = len(sig) - 1
    eps, rhos = [], []
    for i in range(n):
        s, t = sig[i], sig[i + 1]
        x, denoised = yield x, s, i
        eps, rhos = (eps + [(x - denoised) / s])[-order:], (rhos + [s])[-order:]
        k = step_order(order, len(eps), i, n, t, lower_order_final)
        if k == 1:
            x = x - (s - t) * eps[-1]
        elif k == 2:
            s0, s1 = rhos[-1], rhos[-2]
            coef1 = _ind2(t, s0, s1) - _ind2(s0, s0, s1)
            coef2 = _ind2(t, s1, s0) - _ind2(s0, s1, s0)
            x = x + coef1 * eps[-1] + coef2 * eps[-2]
        else:
            s0, s1, s2 = rhos[-1], rhos[-2], rhos[-3]
            coef1 = _ind3(t, s0, s1, s2) - _ind3(s0, s0, s1, s2)
            coef2 = _ind3(t, s1, s2, s0) - _ind3(s0, s1, s2, s0)
            coef3 = _ind3(t, s2, s0, s1) - _ind3(s0, s2, s0, s1)
            x = x + coef1 * eps[-1] + coef2 * eps[-2] + coef3 * eps[-3]
    return x


def sample_deis(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, order=2,
                lower_order_final=True):
    """DEIS, log-rho multistep of the given order (1-3)."""
    return drive(deis_steps(x, sigmas, order, lower_order_final), denoiser, x, extra_args=extra_args,
                 callback=callback, disable=disable, total=len(sigmas) - 1)
