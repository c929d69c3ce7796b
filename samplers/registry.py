"""The sampler table: one `SamplerSpec` per sampler name, from which the rest of the package derives.

An entry holds the pure function (`sample_x`, k-diffusion style), how to build the sampler's solver
generator (`samplers._loop`) from a run's options, the orders and options it accepts, its denoiser
calls per step, whether it draws fresh noise and whether it runs on a flow-matching schedule
(`samplers.flow`). `check_sampler_args` validates a name, schedule and options against it, `solver_steps` builds a solver from it and `run_sampler` drives one over a
denoiser: the runner under `samplers.sample`, schedule tuning and OLSS fitting. Nothing parses a
sampler's name. The table imports only the solvers, so the scheduler adapter, tuning, fitting and
`samplers.api` all import it without a cycle.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Callable

from ._loop import Steps, drive
from .deis import deis_steps, sample_deis
from .dpm_solver import (
    SOLVER_TYPES,
    dpm_solver_multistep_steps,
    dpm_solver_singlestep_steps,
    dpmpp_2m_sde_steps,
    dpmpp_sde_steps,
    sample_dpm_solver_multistep,
    sample_dpm_solver_singlestep,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s,
    sample_dpmpp_3m,
    sample_dpmpp_sde,
)
from .euler import ddim_steps, euler_steps, heun_steps, sample_ddim, sample_euler, sample_heun
from .lcm import DEFAULT_TIMESTEP_SCALING, lcm_steps, sample_lcm
from .olss_solver import check_coefficients, olss_steps, sample_olss
from .pndm import ipndm_steps, pndm_steps, sample_ipndm, sample_pndm
from .unipc import sample_unipc, unipc_steps


@dataclass(frozen=True)
class SolverRun:
    """What a run hands a solver besides its options: where its noise comes from, whether it starts
    at the schedule's first step, the model's noise schedule (a `NoiseSchedule`, or None) and
    whether the sigmas and states are in the flow-matching form."""

    noise_sampler: Callable | None = None
    generator: Any = None
    # False for a run that starts part-way (img2img): solvers whose warm-up costs extra denoiser
    # calls (PNDM) warm up with lower-order steps instead, so every step costs the same
    begin: bool = True
    noise_schedule: Any = None
    flow: bool = False

    @property
    def noise(self) -> dict[str, Any]:
        return {"noise_sampler": self.noise_sampler, "generator": self.generator}


@dataclass(frozen=True)
class SamplerSpec:
    """One sampler: its pure function, how to build its solver generator, what it accepts, what a
    step costs.

    `steps(x, sigmas, order, options, run)` builds the solver generator from the run's `order`, the
    sampler's own `options` (defaults filled in; they are named as the generator's keyword arguments)
    and a `SolverRun`.
    """

    function: Callable
    steps: Callable[[Any, Any, int, dict[str, Any], SolverRun], Steps]
    orders: tuple[int, ...] = (1,)
    default_order: int = 1
    # the options only this sampler takes, with their defaults
    options: dict[str, Any] = field(default_factory=dict)
    # denoiser calls per step: pipelines read it as the scheduler's `order`
    calls_per_step: int = 1
    # it draws fresh noise: where it takes the option eta (DDIM, the SDE samplers) only when eta > 0
    stochastic: bool = False
    # the step schedule that schedule="default" stands for
    default_schedule: str = "default"
    # why it does not run on a flow-matching schedule (`samplers.flow`); None: it does, either because
    # its update only uses dx/dsigma = (x - D) / sigma, the same ODE in the flow form, or because its
    # generator takes the flow's signal scale (`flow=run.flow`)
    flow_refusal: str | None = None
    # how its default schedule on a flow-matching model spaces the sigmas (`samplers.flow.FLOW_SPACINGS`):
    # as diffusers' scheduler of its kind does (FlowMatch Euler / Heun, DPM-Solver or UniPC with flow sigmas)
    flow_spacing: str = "flow_match"

    def adds_noise(self, options: dict[str, Any]) -> bool:
        """Whether a run with `options` draws fresh noise, so that its result depends on the generator."""
        if not self.stochastic:
            return False
        return "eta" not in self.options or options.get("eta", self.options["eta"]) > 0


# Options every sampler takes: explicit timesteps / sigmas, Karras rho, x0 thresholding, backend.
# They shape the schedule or the model output, never the solver's update.
COMMON_OPTIONS = (
    "timesteps",
    "sigmas",
    "rho",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "backend",
    "tuned",
    "model_dir",
    "original_inference_steps",
)
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

# Schedules on a flow-matching model: its scheduler's own shifted sigmas, given sigmas, tuned files;
# the others are defined on a betas schedule's train timesteps or VE sigma range.
FLOW_SCHEDULE_NAMES = ("default", "explicit", "tuned")
# Common options that shape a betas schedule or a pixel model's x0
NOT_FLOW_OPTIONS = ("rho", "thresholding", "dynamic_thresholding_ratio", "sample_max_value", "original_inference_steps")

_NOISE_PREDICTION = ("noise prediction divides by alpha, which is 0 where a flow schedule starts (sigma 1); its "
                     "data-prediction form (dpmpp_2m, dpmpp_3m) runs")
_VP_NOISE = "the noise it draws follows the VE / VP SDE, which is not written for a flow-matching schedule"

_LOF = {"lower_order_final": True}
_DPM = {"lower_order_final": True, "solver_type": "midpoint"}
_DPM_3M = {"lower_order_final": True, "diffusers_3m": False}
_UNIPC = {"lower_order_final": True, "use_corrector": True, "orders": None}


def _dpm_solver(function, order: int, predict_x0: bool, options: dict[str, Any], singlestep=False) -> SamplerSpec:
    """A DPM-Solver (noise prediction) or DPM-Solver++ (data prediction) entry of a fixed order; the
    multistep DPM-Solver++ runs on flow-matching schedules too."""
    if singlestep:
        refusal = _NOISE_PREDICTION if not predict_x0 else (
            "its singlestep blocks are written for betas schedules only; the multistep dpmpp_2m / dpmpp_3m run")
        return SamplerSpec(function, lambda x, s, k, o, run: dpm_solver_singlestep_steps(x, s, k, predict_x0, **o),
                           orders=(order,), default_order=order, options=options, flow_refusal=refusal)
    return SamplerSpec(
        function, lambda x, s, k, o, run: dpm_solver_multistep_steps(x, s, k, predict_x0, **o, flow=run.flow),
        orders=(order,), default_order=order, options=options, flow_refusal=None if predict_x0 else _NOISE_PREDICTION,
        flow_spacing="dpm_solver",
    )


SAMPLERS: dict[str, SamplerSpec] = {
    "ddim": SamplerSpec(
        sample_ddim, lambda x, s, k, o, run: ddim_steps(x, s, **o, **run.noise),
        options={"eta": 0.0}, stochastic=True,
    ),
    "euler": SamplerSpec(sample_euler, lambda x, s, k, o, run: euler_steps(x, s)),
    "heun": SamplerSpec(
        sample_heun, lambda x, s, k, o, run: heun_steps(x, s),
        orders=(2,), default_order=2, calls_per_step=2,
    ),
    "dpm_solver_1": _dpm_solver(partial(sample_dpm_solver_singlestep, order=1), 1, False, _LOF, singlestep=True),
    "dpm_solver_2": _dpm_solver(partial(sample_dpm_solver_singlestep, order=2), 2, False, _DPM, singlestep=True),
    "dpm_solver_3": _dpm_solver(partial(sample_dpm_solver_singlestep, order=3), 3, False, _DPM, singlestep=True),
    "dpm_solver_2m": _dpm_solver(partial(sample_dpm_solver_multistep, order=2), 2, False, _DPM),
    "dpm_solver_3m": _dpm_solver(partial(sample_dpm_solver_multistep, order=3), 3, False, _DPM_3M),
    "dpmpp_2m": _dpm_solver(sample_dpmpp_2m, 2, True, _DPM),
    "dpmpp_3m": _dpm_solver(sample_dpmpp_3m, 3, True, _DPM_3M),
    "dpmpp_2s": _dpm_solver(sample_dpmpp_2s, 2, True, _DPM, singlestep=True),
    "dpmpp_sde": SamplerSpec(
        sample_dpmpp_sde, lambda x, s, k, o, run: dpmpp_sde_steps(x, s, **o, **run.noise),
        orders=(2,), default_order=2, options={"eta": 1.0, "r": 0.5}, calls_per_step=2, stochastic=True,
        flow_refusal=_VP_NOISE,
    ),
    "dpmpp_2m_sde": SamplerSpec(
        sample_dpmpp_2m_sde, lambda x, s, k, o, run: dpmpp_2m_sde_steps(x, s, **o, **run.noise),
        orders=(2,), default_order=2, options={"lower_order_final": True, "eta": 1.0, "solver_type": "midpoint"},
        stochastic=True, flow_refusal=_VP_NOISE,
    ),
    "unipc_bh1": SamplerSpec(
        partial(sample_unipc, variant="bh1"), lambda x, s, k, o, run: unipc_steps(x, s, k, "bh1", **o, flow=run.flow),
        orders=(1, 2, 3), default_order=2, options=_UNIPC, flow_spacing="unipc",
    ),
    "unipc_bh2": SamplerSpec(
        partial(sample_unipc, variant="bh2"), lambda x, s, k, o, run: unipc_steps(x, s, k, "bh2", **o, flow=run.flow),
        orders=(1, 2, 3), default_order=2, options=_UNIPC, flow_spacing="unipc",
    ),
    "deis": SamplerSpec(
        sample_deis, lambda x, s, k, o, run: deis_steps(x, s, k, **o),
        orders=(1, 2, 3), default_order=2, options=_LOF,
        flow_refusal="DEIS integrates the noise prediction in rho = sigma / alpha, infinite where a flow schedule "
                     "starts (sigma 1)",
    ),
    "pndm": SamplerSpec(
        sample_pndm, lambda x, s, k, o, run: pndm_steps(x, s, pseudo_warmup=run.begin),
        orders=(4,), default_order=4,
    ),
    "ipndm": SamplerSpec(
        sample_ipndm, lambda x, s, k, o, run: ipndm_steps(x, s, k),
        orders=(1, 2, 3, 4), default_order=4,
    ),
    # a consistency model is distilled on LCM's own timesteps, its default schedule
    "lcm": SamplerSpec(
        sample_lcm, lambda x, s, k, o, run: lcm_steps(x, s, **run.noise, **o, noise_schedule=run.noise_schedule),
        options={"timestep_scaling": DEFAULT_TIMESTEP_SCALING}, stochastic=True, default_schedule="lcm",
        flow_refusal="it samples LCM-distilled models on the train timesteps of a betas schedule",
    ),
    # DPM-Solver++(2M)'s family with fitted per-step coefficients (samplers.olss)
    "olss": SamplerSpec(
        sample_olss, lambda x, s, k, o, run: olss_steps(x, s, **o, begin=run.begin, flow=run.flow),
        orders=(2,), default_order=2, options={"coefficients": None}, flow_spacing="dpm_solver",
    ),
}
FLOW_SAMPLER_NAMES: tuple[str, ...] = tuple(name for name, spec in SAMPLERS.items() if spec.flow_refusal is None)

SAMPLER_NAMES: tuple[str, ...] = tuple(SAMPLERS)
# name -> pure function `sample_x(denoiser, x, sigmas, *, extra_args, callback, disable, ...)`
SAMPLER_FUNCTIONS: dict[str, Callable] = {name: spec.function for name, spec in SAMPLERS.items()}


def _choices(values) -> str:
    return ", ".join(repr(v) for v in values)


def sampler_spec(name: str) -> SamplerSpec:
    """The table's entry for `name`, or `ValueError` listing the valid names."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler {name!r} is not supported; valid choices: {_choices(SAMPLER_NAMES)}")
    return SAMPLERS[name]


def resolve_schedule(name: str, schedule: str) -> str:
    """The schedule a sampler runs: "default" is the sampler's own default schedule (LCM's for
    "lcm"; uniform in t, resolved by `get_sigmas`, for every other sampler)."""
    return sampler_spec(name).default_schedule if schedule == "default" else schedule


def check_flow_args(name: str, schedule: str, options: dict[str, Any]) -> None:
    """Raise `ValueError` saying why sampler `name` with `schedule` and `options` cannot run on a
    flow-matching schedule, if it cannot."""
    spec = sampler_spec(name)
    if spec.flow_refusal is not None:
        raise ValueError(f"sampler {name!r} does not run on a flow-matching schedule: {spec.flow_refusal}; "
                         f"samplers that do: {_choices(FLOW_SAMPLER_NAMES)}")
    if spec.adds_noise(options):
        raise ValueError(f"sampler {name!r} with eta > 0 draws the noise of a VP (DDPM) posterior, which is not "
                         f"written for a flow-matching schedule; eta=0 runs (DDIM is flow Euler there)")
    schedule = resolve_schedule(name, schedule)
    if schedule not in FLOW_SCHEDULE_NAMES:
        raise ValueError(f"schedule {schedule!r} is defined on a betas schedule, not on a flow-matching one; valid "
                         f"choices: {_choices(FLOW_SCHEDULE_NAMES)} ('default': the model's scheduler's shifted sigmas)")
    refused = [key for key in NOT_FLOW_OPTIONS if key in options]
    if refused:
        raise ValueError(f"options {refused} shape a betas schedule or a pixel model's x0 and do not apply on a "
                         "flow-matching schedule")


def check_sampler_args(name: str, num_steps, schedule: str, options: dict[str, Any], flow: bool = False) -> SamplerSpec:
    """Raise `ValueError` (listing the valid choices) for a bad name, step count, schedule or option;
    `flow=True` also for what does not run on a flow-matching schedule (`check_flow_args`)."""
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
    if flow:
        check_flow_args(name, schedule, options)
    return spec


def solver_steps(name: str, x, sigmas, options: dict, *, noise_sampler=None, generator=None, begin: bool = True,
                 noise_schedule=None, flow: bool = False) -> Steps:
    """The solver generator of sampler `name` (see `samplers._loop`) with its options; the options
    every sampler takes (`COMMON_OPTIONS`) are left to the schedule and the model wrapper.

    `noise_schedule` (a `NoiseSchedule`) is for samplers that need train timesteps (LCM's
    boundary condition); `begin=False` marks a run that starts part-way (see `SolverRun`);
    `flow=True`: `x` and `sigmas` are in the flow-matching form.
    """
    spec = sampler_spec(name)
    own = {k: options.get(k, default) for k, default in spec.options.items()}
    run = SolverRun(noise_sampler, generator, begin, noise_schedule, flow)
    return spec.steps(x, sigmas, options.get("order", spec.default_order), own, run)


def run_sampler(name: str, denoiser, x, sigmas, options: dict | None = None, *, extra_args=None, callback=None,
                disable=None, generator=None, noise_sampler=None, flow: bool = False):
    """Run sampler `name` with `options`, unchecked (see `check_sampler_args`): the runner under
    `samplers.sample`, and the one that schedule tuning and OLSS fitting call many times."""
    steps = solver_steps(name, x, sigmas, options or {}, noise_sampler=noise_sampler, generator=generator,
                         noise_schedule=getattr(denoiser, "schedule", None), flow=flow)
    return drive(steps, denoiser, x, extra_args=extra_args, callback=callback, disable=disable)
