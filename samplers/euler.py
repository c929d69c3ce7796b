"""DDIM (Song et al. 2021), Euler and Heun (Karras et al. 2022, Algorithm 1 without churn).

In the sigma (VE) parameterisation deterministic DDIM is exactly the Euler step of the
probability-flow ODE `dx/dsigma = (x - D(x, sigma)) / sigma`.
"""

from __future__ import annotations

import math

from ._loop import Steps, as_floats, default_noise_sampler, drive


def euler_steps(x, sigmas) -> Steps:
    sig = as_floats(sigmas)
    for i in range(len(sig) - 1):
        x, denoised = yield x, sig[i], i
        d = (x - denoised) / sig[i]
        x = x + d * (sig[i + 1] - sig[i])
    return x


def ddim_steps(x, sigmas, eta: float = 0.0, noise_sampler=None, generator=None) -> Steps:
    sig = as_floats(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    for i in range(len(sig) - 1):
        s, s_next = sig[i], sig[i + 1]
        x, denoised = yield x, s, i
        eps = (x - denoised) / s
        if eta == 0 or s_next == 0:
            x = denoised + s_next * eps
            continue
        # the DDIM step with variance (eq. 12 of the paper), taken in VP form and scaled back
        a_t, a_prev = 1 / (1 + s * s), 1 / (1 + s_next * s_next)
        std = eta * math.sqrt((1 - a_prev) / (1 - a_t)) * math.sqrt(1 - a_t / a_prev)
        x_vp = math.sqrt(a_prev) * denoised + math.sqrt(max(1 - a_prev - std * std, 0.0)) * eps
        x = (x_vp + std * noise_sampler(s, s_next)) / math.sqrt(a_prev)
    return x


def heun_steps(x, sigmas) -> Steps:
    sig = as_floats(sigmas)
    for i in range(len(sig) - 1):
        x, denoised = yield x, sig[i], i
        d = (x - denoised) / sig[i]
        dt = sig[i + 1] - sig[i]
        if sig[i + 1] == 0:
            x = x + d * dt  # the last step to sigma = 0 is Euler
            continue
        x_2, denoised_2 = yield x + d * dt, sig[i + 1], i
        d_2 = (x_2 - denoised_2) / sig[i + 1]
        x = x + (d + d_2) / 2 * dt
    return x


def sample_euler(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None):
    """Euler steps of the probability-flow ODE (one denoiser call per step)."""
    return drive(euler_steps(x, sigmas), denoiser, x, extra_args=extra_args, callback=callback, disable=disable,
                 total=len(sigmas) - 1)


def sample_ddim(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, eta=0.0, noise_sampler=None,
                generator=None):
    """DDIM; `eta > 0` adds DDIM's stochastic term (eta = 1 is DDPM's ancestral sampling)."""
    return drive(ddim_steps(x, sigmas, eta, noise_sampler, generator), denoiser, x, extra_args=extra_args,
                 callback=callback, disable=disable, total=len(sigmas) - 1)


def sample_heun(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None):
    """Heun's second-order method (two denoiser calls per step, one on the last step to 0)."""
    return drive(heun_steps(x, sigmas), denoiser, x, extra_args=extra_args, callback=callback, disable=disable,
                 total=2 * (len(sigmas) - 1) - 1)
