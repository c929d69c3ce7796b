"""Caching beside samplers that add fresh noise at every step: ancestral and SDE samplers, DDPM, LCM, DDIM with eta > 0.

A feature cache decides from, and reuses, how the denoiser's features change from step to step. A sampler that
draws new noise at every step puts that noise into the next step's input, so the change includes it: a threshold
measures the noise as well as the model's progress (fewer cached steps), and a reused or forecast feature carries
an earlier step's noise instead of this one's (lower quality), which TeaCache's users keep running into.

The caches warn, once per pipeline call, rather than refuse at `accelerate` time: the scheduler can be swapped
and `eta` is an argument of each call, both after `accelerate` has run, so only the call knows; and a cache with
such a sampler still runs correctly, only further from the uncached output than with a deterministic one.
"""

from __future__ import annotations

import inspect
import logging

import torch

logger = logging.getLogger(__name__)


def _always(scheduler, arguments) -> str:
    return type(scheduler).__name__


def _sde_algorithm(scheduler, arguments) -> str | None:
    algorithm = scheduler.config.get("algorithm_type", "")
    return f"{type(scheduler).__name__}(algorithm_type={algorithm!r})" if str(algorithm).startswith("sde-") else None


def _stochastic_sampling(scheduler, arguments) -> str | None:
    return f"{type(scheduler).__name__}(stochastic_sampling=True)" if scheduler.config.get("stochastic_sampling") else None


def _solver_draws_noise(scheduler, arguments) -> str | None:
    """This suite's samplers (`samplers.SamplerScheduler`): a dry run of the solver on the call's schedule (set by
    the time the denoiser is first called), with a zero denoiser, counting the noise it draws."""
    import samplers

    if scheduler.sigmas is None:
        return None
    drawn = []

    def noise_sampler(sigma, sigma_next):
        drawn.append(sigma_next)
        return 0.0

    samplers.sample(scheduler.config.sampler, lambda x, sigma: torch.zeros_like(x), torch.zeros(1, dtype=torch.float64),
                    scheduler.sigmas.double(), noise_sampler=noise_sampler, **scheduler.options)
    return f"the sampler {scheduler.config.sampler!r}" if drawn else None


# Scheduler class (by name, through the class's bases) -> a description if, with its config, it adds fresh noise
# at every step, else None.
NOISE_INJECTING = {
    "DDPMScheduler": _always,
    "DDPMParallelScheduler": _always,
    "DDPMWuerstchenScheduler": _always,
    "EulerAncestralDiscreteScheduler": _always,
    "KDPM2AncestralDiscreteScheduler": _always,
    "DPMSolverSDEScheduler": _always,
    "LCMScheduler": _always,
    "CMStochasticIterativeScheduler": _always,
    "DPMSolverMultistepScheduler": _sde_algorithm,
    "DPMSolverSinglestepScheduler": _sde_algorithm,
    "EDMDPMSolverMultistepScheduler": _sde_algorithm,
    "FlowMatchEulerDiscreteScheduler": _stochastic_sampling,
    "SamplerScheduler": _solver_draws_noise,
}


def noise_source(scheduler, arguments: dict) -> str | None:
    """What adds fresh noise at every step of a pipeline call with `arguments` (by name) on `scheduler`, or None."""
    if scheduler is None:
        return None
    for cls in type(scheduler).__mro__:
        check = NOISE_INJECTING.get(cls.__name__)
        if check is not None:
            source = check(scheduler, arguments)
            if source is not None:
                return source
            break
    # DDIM-type schedulers: the pipeline passes its `eta` argument to `scheduler.step`.
    eta = arguments.get("eta")
    if isinstance(eta, (int, float)) and eta > 0 and "eta" in inspect.signature(scheduler.step).parameters:
        return f"{type(scheduler).__name__} with eta={eta}"
    return None


class NoiseGuard:
    """A cache's check of the pipeline's sampler: at the first planned denoiser call of each pipeline call (the
    schedule is set by then), one warning if the sampler adds fresh noise at every step."""

    def __init__(self, pipe, session, technique: str):
        self.pipe, self.session, self.technique = pipe, session, technique
        self.checked = False
        session.add_call_listener(self._on_call)

    def _on_call(self, session) -> None:
        self.checked = False

    def check(self) -> None:
        if self.checked:
            return
        self.checked = True
        source = noise_source(getattr(self.pipe, "scheduler", None), self.session.call_arguments)
        if source is not None:
            logger.warning("accel: %s with %s, which adds fresh noise at every step: the step-to-step change the cache "
                           "decides from and reuses includes fresh noise; expect fewer cached steps or lower quality "
                           "than with a deterministic sampler (DDIM with eta=0, Euler, DPM-Solver++, UniPC, "
                           "flow-matching Euler)", self.technique, source)

    def remove(self) -> None:
        self.session.remove_call_listener(self._on_call)
