"""`make_scheduler`: a sampler name plus a step schedule, as a scheduler any diffusers pipeline takes.

The names, the schedules and the options each sampler accepts live here, so that callers
(`accel.sampler.SamplerConfig`) validate against one table.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class SamplerSpec:
    """What a sampler name accepts: the range of `order` and its own options."""

    orders: tuple[int, ...] = (1,)
    default_order: int = 1
    options: tuple[str, ...] = ()


# Options every sampler takes: explicit timesteps / sigmas, Karras rho, x0 thresholding, backend.
COMMON_OPTIONS = (
    "timesteps",
    "sigmas",
    "rho",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "backend",
)

_DPM = ("lower_order_final",)
SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(options=("eta",)),
    "euler": SamplerSpec(),
    "heun": SamplerSpec(orders=(2,), default_order=2),
    "dpm_solver_1": SamplerSpec(),
    "dpm_solver_2": SamplerSpec(orders=(2,), default_order=2, options=("solver_type",)),
    "dpm_solver_3": SamplerSpec(orders=(3,), default_order=3, options=("solver_type",)),
    "dpm_solver_2m": SamplerSpec(orders=(2,), default_order=2, options=_DPM + ("solver_type",)),
    "dpm_solver_3m": SamplerSpec(orders=(3,), default_order=3, options=_DPM),
    "dpmpp_2m": SamplerSpec(orders=(2,), default_order=2, options=_DPM + ("solver_type",)),
    "dpmpp_3m": SamplerSpec(orders=(3,), default_order=3, options=_DPM),
    "dpmpp_2s": SamplerSpec(orders=(2,), default_order=2, options=("solver_type",)),
    "dpmpp_sde": SamplerSpec(orders=(2,), default_order=2, options=("eta", "r")),
    "dpmpp_2m_sde": SamplerSpec(orders=(2,), default_order=2, options=_DPM + ("eta", "solver_type")),
    "unipc_bh1": SamplerSpec(orders=(1, 2, 3), default_order=2, options=_DPM + ("use_corrector",)),
    "unipc_bh2": SamplerSpec(orders=(1, 2, 3), default_order=2, options=_DPM + ("use_corrector",)),
    "deis": SamplerSpec(orders=(1, 2, 3), default_order=2, options=_DPM),
    "pndm": SamplerSpec(orders=(4,), default_order=4),
    "ipndm": SamplerSpec(orders=(1, 2, 3, 4), default_order=4),
    "lcm": SamplerSpec(),
}

SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
SCHEDULE_NAMES: tuple[str, ...] = (
    "default",
    "linspace",
    "leading",
    "trailing",
    "karras",
    "exponential",
    "logsnr",
    "explicit",
)
BACKENDS = ("samplers", "diffusers")
_DEFAULT_BACKEND = "diffusers"  # until the adapter lands
SOLVER_TYPES = ("midpoint", "heun")


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


def check_sampler_args(name: str, num_steps, schedule: str, options: dict[str, Any]) -> SamplerSpec:
    """Raise `ValueError` (listing the valid choices) for a bad name, step count, schedule or option."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not supported; valid choices: {_choices(SAMPLER_NAMES)}")
    spec = SAMPLERS[name]
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"schedule {schedule!r} is not supported; valid choices: {_choices(SCHEDULE_NAMES)}")
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_steps must be a positive int or None, got {num_steps!r}")
    valid = ("order",) + COMMON_OPTIONS + spec.options
    for key in options:
        if key not in valid:
            raise ValueError(f"option {key!r} is not supported by sampler {name!r}; valid choices: {_choices(valid)}")
    order = options.get("order", spec.default_order)
    if order not in spec.orders:
        raise ValueError(f"order={order!r} is not supported by sampler {name!r}; valid choices: {_choices(spec.orders)}")
    if options.get("backend", "samplers") not in BACKENDS:
        raise ValueError(f"backend={options['backend']!r} is not supported; valid choices: {_choices(BACKENDS)}")
    if options.get("solver_type", "midpoint") not in SOLVER_TYPES:
        raise ValueError(f"solver_type={options['solver_type']!r} is not supported; valid choices: {_choices(SOLVER_TYPES)}")
    explicit = [k for k in ("timesteps", "sigmas") if options.get(k) is not None]
    if schedule == "explicit" and len(explicit) != 1:
        raise ValueError("schedule='explicit' needs exactly one of the options 'timesteps' or 'sigmas'")
    if schedule != "explicit" and explicit:
        raise ValueError(f"options {explicit} give an explicit schedule; pass schedule='explicit' with them")
    if explicit:
        values = list(options[explicit[0]])
        if len(values) < 1:
            raise ValueError(f"option {explicit[0]!r} must hold at least one value")
        if num_steps is not None and num_steps != len(values):
            raise ValueError(f"num_steps={num_steps} disagrees with the {len(values)} explicit {explicit[0]}")
    return spec


def make_scheduler(name: str, *, num_steps: int | None = None, schedule: str = "default", base=None, **options):
    """A diffusers scheduler running sampler `name` on `base`'s noise schedule.

    Args:
        name: one of `SAMPLER_NAMES`.
        num_steps: default number of steps when a pipeline calls `set_timesteps(None)`; the
            pipeline's own `num_inference_steps` wins otherwise.
        schedule: one of `SCHEDULE_NAMES`; "default" follows `base.config.timestep_spacing`,
            "explicit" takes the option `timesteps=[...]` (train timesteps, descending) or
            `sigmas=[...]` (descending; a trailing 0 is added when missing).
        base: the pipeline's current scheduler; its config gives betas, prediction type,
            timestep spacing, zero-SNR rescaling. None means Stable Diffusion's schedule.
        options: `order`, `eta`, `use_corrector`, `lower_order_final`, `solver_type`, `r`,
            `rho`, `thresholding`, `dynamic_thresholding_ratio`, `sample_max_value`, and
            `backend` ("samplers", the default, or "diffusers" for diffusers' own scheduler).
    """
    options = dict(options)
    check_sampler_args(name, num_steps, schedule, options)
    backend = options.pop("backend", _DEFAULT_BACKEND)
    if backend == "diffusers":
        from .diffusers_schedulers import make_diffusers_scheduler

        if schedule == "explicit":
            raise ValueError("schedule='explicit' is only supported by backend='samplers'")
        return make_diffusers_scheduler(name, schedule, base, options)
    from .scheduler import SamplerScheduler

    return SamplerScheduler.from_base(base, sampler=name, schedule=schedule, num_steps=num_steps, options=options)
