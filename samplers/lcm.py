"""Multistep consistency sampling for latent consistency models (Luo et al. 2023, "Latent
Consistency Models: Synthesizing High-Resolution Images with Few-Step Inference").

LCM sampling is not an ODE solver: at each step the consistency function `f(x, t)` maps the
sample straight to x0, and the next sample is that x0 noised afresh to the next timestep. The
consistency function is the model's x0 under the boundary condition of Song et al. 2023
("Consistency Models"), `f = c_skip(t) * x_t + c_out(t) * x0`, with `c_skip(0) = 1`, `c_out(0) = 0`
and `t` scaled by `timestep_scaling` as in diffusers' `LCMScheduler` (which this matches step for
step, noise draws included). The step schedule (`lcm_timesteps`) takes evenly spaced entries of
the distillation schedule: every k-th train timestep, k = num_train_timesteps //
original_inference_steps.
"""

from __future__ import annotations

import numpy as np
import torch

from ._loop import Steps, as_floats, default_noise_sampler, drive
from .denoiser import NoiseSchedule, alpha_from_sigma

SIGMA_DATA = 0.5
DEFAULT_TIMESTEP_SCALING = 10.0
DEFAULT_ORIGINAL_INFERENCE_STEPS = 50
# The schedule assumed when neither the caller nor the denoiser gives one: Stable Diffusion's.
_SD_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def lcm_timesteps(
    n: int, num_train_timesteps: int = 1000, original_inference_steps: int = DEFAULT_ORIGINAL_INFERENCE_STEPS
) -> torch.Tensor:
    """The n descending train timesteps `LCMScheduler.set_timesteps(n)` visits.

    The distillation schedule is `k - 1, 2k - 1, ..., original_inference_steps * k - 1`; the
    sampler takes n of its entries at evenly spaced indices, starting from the noisiest.
    """
    if not 1 <= original_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"original_inference_steps must be in [1, {num_train_timesteps}] (the train timesteps), "
            f"got {original_inference_steps!r}"
        )
    if not 1 <= n <= original_inference_steps:
        raise ValueError(
            f"an LCM schedule takes 1 to original_inference_steps={original_inference_steps} steps of the "
            f"distillation schedule, got {n!r} steps; raise original_inference_steps or take fewer steps"
        )
    k = num_train_timesteps // original_inference_steps
    origin = (np.arange(1, original_inference_steps + 1) * k - 1)[::-1]
    index = np.floor(np.linspace(0, original_inference_steps, num=n, endpoint=False)).astype(np.int64)
    return torch.from_numpy(origin[index].astype(np.float64).copy())


def lcm_boundary_scalings(timestep, timestep_scaling: float = DEFAULT_TIMESTEP_SCALING, sigma_data: float = SIGMA_DATA):
    """`(c_skip, c_out)` of the consistency boundary condition at train timestep(s) `timestep`."""
    scaled = timestep * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2) ** 0.5
    return c_skip, c_out


def lcm_steps(
    x,
    sigmas,
    noise_sampler=None,
    generator=None,
    timestep_scaling: float = DEFAULT_TIMESTEP_SCALING,
    noise_schedule: NoiseSchedule | None = None,
) -> Steps:
    sig = as_floats(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    noise_schedule = noise_schedule or NoiseSchedule.from_config(_SD_SCHEDULE)
    # train timesteps of the schedule, host floats: the scalings never sync a device
    t = noise_schedule.sigma_to_t(torch.tensor(sig[:-1], dtype=torch.float64)).tolist()
    for i in range(len(sig) - 1):
        x, denoised = yield x, sig[i], i
        c_skip, c_out = lcm_boundary_scalings(t[i], timestep_scaling)
        # the boundary condition acts on the VP-scale sample, as the model was distilled
        denoised = c_out * denoised + c_skip * alpha_from_sigma(sig[i]) * x
        x = denoised + sig[i + 1] * noise_sampler(sig[i], sig[i + 1]) if sig[i + 1] > 0 else denoised
    return x


def sample_lcm(
    denoiser,
    x,
    sigmas,
    *,
    extra_args=None,
    callback=None,
    disable=None,
    noise_sampler=None,
    generator=None,
    timestep_scaling: float = DEFAULT_TIMESTEP_SCALING,
    noise_schedule: NoiseSchedule | None = None,
):
    """LCM multistep sampling, one denoiser call per step.

    `noise_schedule` maps sigmas to the train timesteps of the boundary condition; by default the
    denoiser's own (`UNetDenoiser.schedule`), else Stable Diffusion's. With `timestep_scaling=10`
    the boundary condition changes x0 by less than 1e-5 relative for timesteps above 20.
    """
    noise_schedule = noise_schedule or getattr(denoiser, "schedule", None)
    steps = lcm_steps(x, sigmas, noise_sampler, generator, timestep_scaling, noise_schedule)
    return drive(steps, denoiser, x, extra_args=extra_args, callback=callback, disable=disable, total=len(sigmas) - 1)
