"""`make_scheduler`: a sampler name plus a step schedule, as a scheduler any diffusers pipeline takes;
`sample`: the same sampler as a pure function.

Both check their arguments against the sampler table (`samplers.registry`), whose names and check
this module re-exports, so that callers (`accel.sampler.SamplerConfig`) validate against one table.
"""

from __future__ import annotations

from .flow import is_flow_config
from .registry import SAMPLER_NAMES, SAMPLERS, SCHEDULE_NAMES, check_sampler_args, resolve_schedule, run_sampler
from .scheduler import FlowSamplerScheduler, SamplerScheduler
from .tuned import load_tuned_schedule

__all__ = ["SAMPLER_NAMES", "SAMPLERS", "SCHEDULE_NAMES", "check_sampler_args", "make_scheduler", "sample"]

_DEFAULT_BACKEND = "samplers"


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
            timestep spacing, zero-SNR rescaling. None means Stable Diffusion's schedule. A
            flow-matching scheduler (FlowMatch Euler / Heun, DPM-Solver or UniPC with
            `use_flow_sigmas`: SD3, Flux, Sana) gives a `FlowSamplerScheduler` on its flow schedule
            (its shift and dynamic shifting); there the schedules are "default" (the sigmas diffusers'
            flow scheduler of the sampler's kind gives on that shift, see `FlowSamplerScheduler`),
            "explicit" (flow sigmas in [0, 1]) and "tuned" (files fitted on a flow model), and the
            samplers `samplers.registry.FLOW_SAMPLER_NAMES` (the others raise, saying why).
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
    flow = base is not None and is_flow_config(base)
    schedule = resolve_schedule(name, schedule)
    check_sampler_args(name, num_steps, schedule, options, flow=flow)
    if schedule == "tuned":
        tuned_name = options.pop("tuned")
        tuned = load_tuned_schedule(tuned_name, options.pop("model_dir", None))
        if tuned.flow != flow:
            raise ValueError(
                f"tuned schedule {str(tuned_name)!r} was fitted on a {'flow-matching' if tuned.flow else 'betas'} "
                f"model (sigmas in the {tuned.form} form); the base scheduler "
                f"{type(base).__name__ if base is not None else '(none: Stable Diffusion)'} is "
                f"{'flow-matching' if flow else 'a betas schedule'}"
            )
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
            check_sampler_args(name, num_steps, schedule, options, flow=flow)
    options.pop("model_dir", None)
    backend = options.pop("backend", _DEFAULT_BACKEND)
    if backend == "diffusers":
        # imported here: diffusers' scheduler classes take seconds to import and only this backend runs them
        from .diffusers_schedulers import make_diffusers_scheduler

        if schedule == "explicit":
            raise ValueError("schedule='explicit' is only supported by backend='samplers'")
        return make_diffusers_scheduler(name, schedule, base, options, flow=flow)
    adapter = FlowSamplerScheduler if flow else SamplerScheduler
    return adapter.from_base(base, sampler=name, schedule=schedule, num_steps=num_steps, options=options)


def sample(name: str, denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, generator=None,
           noise_sampler=None, flow: bool = False, **options):
    """Run sampler `name` as a pure function: `denoiser(x, sigma, **extra_args) -> x0` over
    `sigmas` (descending; VE scale, so `x` starts as `noise * sigmas[0]`; with `flow=True` flow
    sigmas in [0, 1] and `x` in the flow form, starting as the noise at sigma 1, for a
    `samplers.flow.FlowDenoiser`). Same options as `make_scheduler` (schedule options excepted)."""
    check_sampler_args(name, None, "default", options, flow=flow)
    return run_sampler(name, denoiser, x, sigmas, options, extra_args=extra_args, callback=callback, disable=disable,
                       generator=generator, noise_sampler=noise_sampler, flow=flow)
