"""Step schedules: small functions returning descending sigmas that end in 0.

Uniform in t (linspace / leading / trailing spacing, Lin et al. 2024 Table 2), Karras et al.
2022 (rho = 7), exponential (uniform in log sigma), uniform in log-SNR (DPM-Solver's uniform
lambda, Lu et al. 2022), LCM's (Luo et al. 2023, `samplers.lcm.lcm_timesteps`), and explicit
timestep or sigma lists.
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .denoiser import NoiseSchedule

TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")


def append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros([1])])


def get_sigmas_karras(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device="cpu") -> torch.Tensor:
    """Karras et al. 2022: n sigmas uniform in sigma**(1/rho), then 0."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64, device=device)
    min_inv_rho, max_inv_rho = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    return append_zero((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho)


def get_sigmas_exponential(n: int, sigma_min: float, sigma_max: float, device="cpu") -> torch.Tensor:
    """n sigmas uniform in log(sigma), then 0."""
    return append_zero(
        torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64, device=device).exp()
    )


def get_sigmas_logsnr(n: int, sigma_min: float, sigma_max: float, device="cpu") -> torch.Tensor:
    """n sigmas uniform in log-SNR, then 0.

    log-SNR is `-2 log(sigma)` (VE sigma), so this is the exponential schedule: the same step
    points as DPM-Solver's uniform-lambda ("use_lu_lambdas") schedule.
    """
    log_snr = torch.linspace(-2 * math.log(sigma_max), -2 * math.log(sigma_min), n, dtype=torch.float64, device=device)
    return append_zero((-0.5 * log_snr).exp())


def get_timesteps_uniform(n: int, num_train_timesteps: int = 1000, spacing: str = "linspace", steps_offset: int = 0):
    """n descending train timesteps uniform in t (DPM-Solver's convention: t = 0 is never visited
    for "linspace"/"leading", since the last step goes to sigma = 0)."""
    if spacing == "linspace":
        t = np.linspace(0, num_train_timesteps - 1, n + 1).round()[::-1][:-1]
    elif spacing == "leading":
        step_ratio = num_train_timesteps // (n + 1)
        t = (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        step_ratio = num_train_timesteps / n
        t = np.arange(num_train_timesteps, 0, -step_ratio).round() - 1
    else:
        raise ValueError(f"timestep spacing {spacing!r} is not supported; valid choices: {TIMESTEP_SPACINGS}")
    t = np.clip(t, 0, num_train_timesteps - 1)
    return torch.from_numpy(t.astype(np.float64).copy())


def sigmas_from_timesteps(timesteps, noise_schedule: NoiseSchedule) -> torch.Tensor:
    """Sigmas at (possibly fractional) train timesteps, then 0."""
    timesteps = torch.as_tensor(np.asarray(timesteps, dtype=np.float64))
    return append_zero(noise_schedule.t_to_sigma(timesteps))


def explicit_sigmas(sigmas: Sequence[float]) -> torch.Tensor:
    """A user's descending sigmas, with a trailing 0 added when missing."""
    sigmas = torch.as_tensor(list(sigmas), dtype=torch.float64)
    if sigmas.dim() != 1 or len(sigmas) < 1 or bool((sigmas[1:] > sigmas[:-1]).any()) or bool((sigmas < 0).any()):
        raise ValueError(f"sigmas must be a descending list of non-negative numbers, got {sigmas.tolist()}")
    return sigmas if sigmas[-1] == 0 else append_zero(sigmas)


def get_sigmas(
    schedule: str,
    n: int | None,
    noise_schedule: NoiseSchedule,
    *,
    timestep_spacing: str = "linspace",
    steps_offset: int = 0,
    rho: float = 7.0,
    timesteps: Sequence[float] | None = None,
    sigmas: Sequence[float] | None = None,
    original_inference_steps: int = 50,
) -> torch.Tensor:
    """The sigmas (descending, ending in 0) of a named schedule on a model's noise schedule (a
    `NoiseSchedule`, or a `samplers.flow.FlowSchedule`: "default" is then its scheduler's shifted sigmas,
    "explicit" takes flow sigmas or timesteps `sigma * num_train_timesteps`)."""
    if getattr(noise_schedule, "flow", False):
        return _flow_sigmas(schedule, n, noise_schedule, timesteps, sigmas)
    if schedule == "explicit":
        if sigmas is not None:
            return explicit_sigmas(sigmas)
        t = np.asarray(list(timesteps), dtype=np.float64)
        last = noise_schedule.num_train_timesteps - 1
        if t.ndim != 1 or len(t) < 1 or (np.diff(t) >= 0).any() or t.min() < 0 or t.max() > last:
            raise ValueError(f"timesteps must be strictly descending train timesteps in [0, {last}], got {t.tolist()}")
        return sigmas_from_timesteps(t, noise_schedule)
    if n is None or n < 1:
        raise ValueError(f"the number of steps must be a positive int, got {n!r}")
    if schedule == "default":
        schedule = timestep_spacing if timestep_spacing in TIMESTEP_SPACINGS else "linspace"
    if schedule in TIMESTEP_SPACINGS:
        timesteps = get_timesteps_uniform(n, noise_schedule.num_train_timesteps, schedule, steps_offset)
        return sigmas_from_timesteps(timesteps, noise_schedule)
    if schedule == "lcm":
        from .lcm import lcm_timesteps

        timesteps = lcm_timesteps(n, noise_schedule.num_train_timesteps, original_inference_steps)
        return sigmas_from_timesteps(timesteps, noise_schedule)
    lo, hi = noise_schedule.sigma_min, noise_schedule.sigma_max
    if schedule == "karras":
        return get_sigmas_karras(n, lo, hi, rho)
    if schedule == "exponential":
        return get_sigmas_exponential(n, lo, hi)
    if schedule == "logsnr":
        return get_sigmas_logsnr(n, lo, hi)
    raise ValueError(
        f"schedule {schedule!r} is not supported; valid choices: 'default', 'linspace', 'leading', 'trailing',"
        " 'karras', 'exponential', 'logsnr', 'explicit', 'lcm'"
    )


def _flow_sigmas(schedule: str, n: int | None, flow_schedule, timesteps, sigmas) -> torch.Tensor:
    if schedule == "default":
        return flow_schedule.sigmas(n)
    if schedule != "explicit":
        raise ValueError(f"schedule {schedule!r} is not defined on a flow-matching schedule; valid choices: 'default', "
                         "'explicit'")
    if sigmas is None:
        sigmas = [float(t) / flow_schedule.num_train_timesteps for t in timesteps]
    explicit = explicit_sigmas(sigmas)
    if float(explicit[0]) > 1:
        raise ValueError(f"flow sigmas lie in [0, 1], got {explicit.tolist()}")
    return explicit
