"""Multistep consistency sampling for latent consistency models (Luo et al. 2023, "Latent
Consistency Models"): denoise fully, then re-noise to the next sigma.

The LCM boundary condition (c_skip, c_out at the timestep scaling of `LCMScheduler`) is below
1e-5 for every timestep the sampler visits except t < 10, and is left out.
"""

from __future__ import annotations

from ._loop import Steps, as_floats, default_noise_sampler, drive


def lcm_steps(x, sigmas, noise_sampler=None, generator=None) -> Steps:
    sig = as_floats(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    for i in range(len(sig) - 1):
        x, denoised = yield x, sig[i], i
        x = denoised + sig[i + 1] * noise_sampler(sig[i], sig[i + 1]) if sig[i + 1] > 0 else denoised
    return x


def sample_lcm(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, noise_sampler=None,
               generator=None):
    """LCM multistep sampling (one denoiser call per step)."""
    return drive(lcm_steps(x, sigmas, noise_sampler, generator), denoiser, x, extra_args=extra_args,
                 callback=callback, disable=disable, total=len(sigmas) - 1)
