"""Fast ODE/SDE solvers for diffusion models as pure functions, their step schedules, and a
diffusers scheduler adapter (k-diffusion style: `sample_x(denoiser, x, sigmas, ...)`)."""

from .api import SAMPLER_NAMES, SAMPLERS, SCHEDULE_NAMES, check_sampler_args, make_scheduler

__all__ = ["SAMPLER_NAMES", "SAMPLERS", "SCHEDULE_NAMES", "check_sampler_args", "make_scheduler"]
