"""`make_scheduler`: a sampler name plus a step schedule, as a scheduler any diffusers pipeline takes.

The names, the schedules and the options each sampler accepts live here, so that callers
(`accel.sampler.SamplerConfig`) validate against one table.
"""

from __future__ import annotations

from typing import Any

from .dpm_solver import SOLVER_TYPES
from .registry import COMMON_OPTIONS, SAMPLER_NAMES, SAMPLERS, SamplerSpec, sampler_spec

SCHEDULE_NAMES: tuple[str, ...] = (
    "default",
    "linspace",
    "leading",
    "trailing",
    "karras",
    "exponential",
    "logsnr",
    "explicit",
    "tuned",
    "lcm",
)
BACKENDS = ("samplers", "diffusers")
_DEFAULT_BACKEND = "samplers"


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


def resolve_schedule(name: str, schedule: str) -> str:
    """The schedule a sampler runs: "default" is the sampler's own default schedule (LCM's for
    "lcm"; uniform in t, resolved by `get_sigmas`, for every other sampler)."""
    return sampler_spec(name).default_schedule if schedule == "default" else schedule


def check_sampler_args(name: str, num_steps, schedule: str, options: dict[str, Any]) -> SamplerSpec:
    """Raise `ValueError` (listing the valid choices) for a bad name, step count, schedule or option."""
    spec = sampler_spec(name)
    if schedule not in SCHEDULE_NAMES:
        raise ValueError(f"schedule {schedule!r} is not supported; valid choices: {_choices(SCHEDULE_NAMES)}")
    original = options.get("original_inference_steps")
    if original is not None:
        if resolve_schedule(name, schedule) != "lcm":
            raise ValueError("the option 'original_inference_steps' shapes the LCM schedule; pass schedule='lcm' with it")
        if isinstance(original, bool) or not isinstance(original, int) or original < 1:
            raise ValueError(f"original_inference_steps must be a positive int, got {original!r}")
        if num_steps is not None and num_steps > original:
            raise ValueError(f"num_steps={num_steps} exceeds original_inference_steps={original}: the LCM schedule "
                             "takes its steps from the distillation schedule")
    if num_steps is not None and (isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1):
        raise ValueError(f"num_steps must be a positive int or None, got {num_steps!r}")
    valid = ("order",) + COMMON_OPTIONS + tuple(spec.options)
    for key in options:
        if key not in valid:
            raise ValueError(f"option {key!r} is not supported by sampler {name!r}; valid choices: {_choices(valid)}")
    order = options.get("order", spec.default_order)
    if order not in spec.orders:
        raise ValueError(
            f"order={order!r} is not supported by sampler {name!r}; valid choices: {_choices(spec.orders)}"
        )
    if options.get("orders") is not None:
        orders = options["orders"]
        per_step = list(orders) if isinstance(orders, (list, tuple)) else None
        if not per_step or any(isinstance(o, bool) or o not in spec.orders for o in per_step):
            raise ValueError(f"orders={orders!r} must list one order per step, each one of {_choices(spec.orders)}")
        if num_steps is not None and len(per_step) != num_steps:
            raise ValueError(f"orders gives {len(per_step)} per-step orders for num_steps={num_steps}")
    if options.get("coefficients") is not None:
        from .olss_solver import check_coefficients

        check_coefficients(options["coefficients"], num_steps)
    if options.get("backend", "samplers") not in BACKENDS:
        raise ValueError(f"backend={options['backend']!r} is not supported; valid choices: {_choices(BACKENDS)}")
    if options.get("solver_type", "midpoint") not in SOLVER_TYPES:
        raise ValueError(
            f"solver_type={options['solver_type']!r} is not supported; valid choices: {_choices(SOLVER_TYPES)}"
        )
    explicit = [k for k in ("timesteps", "sigmas") if options.get(k) is not None]
    if schedule == "explicit" and len(explicit) != 1:
        raise ValueError("schedule='explicit' needs exactly one of the options 'timesteps' or 'sigmas'")
    if schedule == "tuned" and options.get("tuned") is None:
        raise ValueError("schedule='tuned' needs the option tuned=<name or JSON path> (and model_dir=<dir> for a name)")
    if schedule != "tuned" and options.get("tuned") is not None:
        raise ValueError("the option 'tuned' gives a tuned schedule; pass schedule='tuned' with it")
    if schedule != "explicit" and explicit:
        raise ValueError(f"options {explicit} give an explicit schedule; pass schedule='explicit' with them")
    if explicit:
        values = list(options[explicit[0]])
        if len(values) < 1:
            raise ValueError(f"option {explicit[0]!r} must hold at least one value")
        steps = len(values) - (1 if explicit[0] == "sigmas" and len(values) > 1 and float(values[-1]) == 0 else 0)
        if num_steps is not None and num_steps != steps:
            raise ValueError(f"num_steps={num_steps} disagrees with the {steps} steps of the explicit {explicit[0]}")
    return spec


def make_scheduler(name: str, *, num_steps: int | None = None, schedule: str = "default", base=None, **options):
    """A diffusers scheduler running sampler `name` on `base`'s noise schedule.

    Args:
        name: one of `SAMPLER_NAMES`.
        num_steps: default number of steps when a pipeline calls `set_timesteps(None)`; the
            pipeline's own `num_inference_steps` wins otherwise (and must equal the length of an
            explicit or tuned schedule).
        schedule: one of `SCHEDULE_NAMES`. "default" is uniform in t with `base`'s
            `timestep_spacing` where its config sets one explicitly, else "linspace": the steps
            diffusers' own `from_config(base.config)` would give (SD 1.x's PNDM config gives
            "linspace"); for "lcm" it is "lcm": `LCMScheduler`'s timesteps, evenly spaced
            entries of the distillation schedule of `original_inference_steps` (default 50)
            steps (see `samplers.lcm.lcm_timesteps`). "explicit" takes the option
            `timesteps=[...]` (descending train timesteps) or `sigmas=[...]` (descending; a trailing 0 is added when missing).
            "tuned" takes `tuned=<name>` with `model_dir=<dir>` or `tuned=<json path>`
            (see `samplers.tuned`); a file with fitted coefficients runs with sampler "olss" only.
        base: the pipeline's current scheduler; its config gives betas, prediction type,
            timestep spacing, zero-SNR rescaling. None means Stable Diffusion's schedule.
        options: `order` (UniPC, DEIS: 1-3; iPNDM: 1-4), `eta` (DDIM, SDE samplers),
            `use_corrector` (UniPC), `lower_order_final`, `solver_type` ("midpoint"/"heun"),
            `r` (dpmpp_sde), `coefficients` (olss: one row per step, see `samplers.olss`),
            `diffusers_3m` (3M as diffusers computes it), `rho` (Karras),
            `timestep_scaling` (LCM's boundary condition, default 10), `original_inference_steps`
            (the "lcm" schedule),
            `thresholding`, `dynamic_thresholding_ratio`, `sample_max_value` (pixel models),
            and `backend`: "samplers" (the default, a `SamplerScheduler`) or "diffusers"
            (diffusers' own scheduler class for the name, where there is one).

    Raises:
        ValueError: an unknown name, schedule or option, or an impossible value, listing the
            valid choices.
    """
    options = dict(options)
    schedule = resolve_schedule(name, schedule)
    check_sampler_args(name, num_steps, schedule, options)
    if schedule == "tuned":
        from .tuned import load_tuned_schedule

        tuned_name = options.pop("tuned")
        tuned = load_tuned_schedule(tuned_name, options.pop("model_dir", None))
        if num_steps is not None and num_steps != tuned.num_steps:
            raise ValueError(f"num_steps={num_steps} disagrees with the tuned schedule's {tuned.num_steps} steps")
        if (tuned.coefficients is not None) != (name == "olss"):
            raise ValueError(
                f"sampler {name!r} cannot run tuned schedule {str(tuned_name)!r}: sampler 'olss' runs the files with "
                f"fitted coefficients and only those (this one is for {tuned.sampler!r}, "
                f"{'with' if tuned.coefficients is not None else 'without'} coefficients)"
            )
        schedule, options["sigmas"] = "explicit", list(tuned.sigmas)
        num_steps = tuned.num_steps
        if name == tuned.sampler:  # the options and per-step orders it was searched with, unless overridden
            searched = dict(tuned.sampler_options, **({} if tuned.orders is None else {"orders": list(tuned.orders)}))
            if tuned.coefficients is not None:
                searched["coefficients"] = tuned.coefficients
            options = dict(searched, **options)
            check_sampler_args(name, num_steps, schedule, options)
    options.pop("model_dir", None)
    backend = options.pop("backend", _DEFAULT_BACKEND)
    if backend == "diffusers":
        from .diffusers_schedulers import make_diffusers_scheduler

        if schedule == "explicit":
            raise ValueError("schedule='explicit' is only supported by backend='samplers'")
        return make_diffusers_scheduler(name, schedule, base, options)
    from .scheduler import SamplerScheduler

    return SamplerScheduler.from_base(base, sampler=name, schedule=schedule, num_steps=num_steps, options=options)


def sample(name: str, denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, generator=None,
           noise_sampler=None, **options):
    """Run sampler `name` as a pure function: `denoiser(x, sigma, **extra_args) -> x0` over
    `sigmas` (descending; VE scale, so `x` starts as `noise * sigmas[0]`). Same options as
    `make_scheduler` (schedule options excepted)."""
    from ._loop import drive
    from .registry import solver_steps

    check_sampler_args(name, None, "default", options)
    steps = solver_steps(name, x, sigmas, options, noise_sampler=noise_sampler, generator=generator,
                         noise_schedule=getattr(denoiser, "schedule", None))
    return drive(steps, denoiser, x, extra_args=extra_args, callback=callback, disable=disable)
