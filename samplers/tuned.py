"""Step schedules tuned to the model: search the N sigmas (and, for solvers that take them, the
solver order of each step) whose sampler output lies closest to a high-step reference solution,
for a few calibration inputs.

In the spirit of Align Your Steps (Sabour et al. 2024), OLSS (Duan et al. 2023), AutoDiffusion
(Li et al. 2023) and the S^3 solver-schedule search (Frankel et al. 2024), with the simplest
search that works on a handful of parameters: a derivative-free pattern search over the
log-sigmas of the interior steps (the first sigma stays at the model's sigma_max, the schedule
ends in 0), started from the best of a few standard schedules, alternating with a coordinate
search over the per-step orders. For the sampler "olss" (`samplers.olss`) every evaluated schedule
gets its own per-step coefficients, fitted by least squares against the reference trajectory at its
sigmas (N denoiser calls, like any evaluation), so sigmas and coefficients are searched together.
The distance is measured where the judge measures it: through
an optional `decode` (a latent model's VAE) and as the mean over inputs of the log squared error
(mean PSNR) rather than the pooled squared error, which the few worst inputs dominate.
The result is a small JSON file saved next to the model and reused by name through
`make_scheduler(..., schedule="tuned", tuned=name, model_dir=...)`. On a flow-matching model
(`samplers.flow`: a `FlowSchedule` and a `FlowDenoiser`) the search, the reference solve and the OLSS
fit run in the flow form, starting at the scheduler's first sigma (1) from its default schedule, and
the file records `form="flow"`, so that it is never run on a betas-schedule model, nor a "ve" file on
a flow model.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import torch

from .denoiser import NoiseSchedule, UNetDenoiser
from .flow import FlowDenoiser, FlowSchedule, calculate_shift, is_flow_config
from .olss import ReferenceTrajectory, fit_olss_coefficients
from .olss_solver import check_coefficients
from .registry import SAMPLERS, check_sampler_args, run_sampler
from .schedules import get_sigmas

TUNED_DIRNAME = "tuned_schedules"
OBJECTIVES = ("mse", "psnr")
SPACES = ("latent", "image")
# the form of a file's sigmas: VE sigmas of a betas-schedule model, or flow-matching sigmas in [0, 1]
FORMS = ("ve", "flow")


@dataclass
class TunedSchedule:
    """A searched schedule and what it cost: `sigmas` (descending, ending in 0), the train
    `timesteps` of its model calls' sigmas and, where searched, the solver order of each step.
    Files written before `orders` / `objective` / `space` existed load with their defaults."""

    sampler: str
    num_steps: int
    sigmas: list[float]
    timesteps: list[float]
    sampler_options: dict = field(default_factory=dict)
    init_schedule: str = "karras"
    reference: str = ""
    calibration_inputs: int = 0
    loss_init: float = math.nan
    loss_tuned: float = math.nan
    search_evaluations: int = 0
    search_denoiser_calls: int = 0
    search_seconds: float = 0.0
    model: str = ""
    # per-step solver orders (S^3); None: the sampler's own
    orders: list[int] | None = None
    # what `loss_*` measure: "mse" (pooled squared error) or "psnr" (mean over inputs of
    # 10 log10 of each input's squared error, i.e. minus the mean PSNR at data range 1), in `space`
    objective: str = "mse"
    space: str = "latent"
    # sampler "olss": one fitted row [a_i, b...] per step (`samplers.olss`) and how they were fitted
    coefficients: list[list[float]] | None = None
    coefficient_fit: dict = field(default_factory=dict)
    # "ve" or "flow" (`FORMS`); files written before flow models load as "ve"
    form: str = "ve"

    @property
    def flow(self) -> bool:
        return self.form == "flow"

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"form={self.form!r} is not supported; valid choices: {FORMS}")
        if self.flow and not all(0 <= s <= 1 for s in self.sigmas):
            raise ValueError(f"a flow-form tuned schedule holds sigmas in [0, 1], got {self.sigmas}")
        if self.coefficients is not None:
            if self.sampler != "olss":
                raise ValueError(f"this tuned schedule holds fitted coefficients, which only the sampler 'olss' "
                                 f"runs, but names sampler {self.sampler!r}")
            try:
                self.coefficients = check_coefficients(self.coefficients, self.num_steps)
            except ValueError as error:
                raise ValueError(f"tuned schedule of {self.num_steps} steps: {error}") from None

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TunedSchedule":
        data = json.loads(Path(path).read_text())
        known = set(cls.__dataclass_fields__)
        try:
            return cls(**{k: v for k, v in data.items() if k in known})
        except ValueError as error:
            raise ValueError(f"{path}: {error}") from None


def tuned_schedule_path(model_dir: str | os.PathLike, name: str) -> Path:
    """Where a tuned schedule named `name` lives for the model in `model_dir`."""
    return Path(model_dir) / TUNED_DIRNAME / f"{name}.json"


def save_tuned_schedule(tuned: TunedSchedule, model_dir: str | os.PathLike, name: str) -> Path:
    return tuned.save(tuned_schedule_path(model_dir, name))


def load_tuned_schedule(tuned: str | os.PathLike, model_dir: str | os.PathLike | None = None) -> TunedSchedule:
    """A tuned schedule from a JSON path, or by name from `model_dir/tuned_schedules/`."""
    candidates = [Path(tuned)]
    if model_dir is not None:
        candidates.insert(0, tuned_schedule_path(model_dir, str(tuned)))
    for path in candidates:
        if path.is_file():
            return TunedSchedule.load(path)
    available = []
    if model_dir is not None and (Path(model_dir) / TUNED_DIRNAME).is_dir():
        available = sorted(p.stem for p in (Path(model_dir) / TUNED_DIRNAME).glob("*.json"))
    raise ValueError(
        f"tuned schedule {str(tuned)!r} not found (looked in {[str(p) for p in candidates]}); "
        f"valid choices: {available}"
    )


def _per_input_error(y: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    return (y - reference).double().square().flatten(1).mean(1)


def _objective_value(objective: str, errors: torch.Tensor) -> float:
    if objective == "mse":
        return float(errors.mean())
    # mean of 10 log10(error): minus the mean PSNR (data range 1) that a per-image judge reports
    return float((10 * torch.log10(errors.clamp_min(1e-30))).mean())


def _order_choices(sampler: str, options: dict) -> tuple[int, ...]:
    """The per-step orders a search may give `sampler` (empty: it takes no per-step orders)."""
    spec = SAMPLERS[sampler]
    if "orders" not in spec.options:
        return ()
    return tuple(o for o in spec.orders if o <= options.get("order", spec.default_order) + 1)


def _default_orders(sampler: str, options: dict, num_steps: int) -> tuple[int, ...]:
    """The sampler's own per-step orders: lower order at the start (no history) and the end."""
    order = options.get("order", SAMPLERS[sampler].default_order)
    lof = options.get("lower_order_final", True)
    return tuple(min(order, i + 1, num_steps - i if lof else order) for i in range(num_steps))


def _check_search(sampler, num_steps, options, objective, space, init_schedule, init_sigmas, reference,
                  search_orders, noise_schedule, flow) -> tuple[list[str], list[float] | None, tuple[int, ...]]:
    """Raise `ValueError` for a search `tune_schedule` cannot run; else the names of the initial
    schedules ("given" for `init_sigmas`), `init_sigmas` as floats and the per-step orders to try."""
    check_sampler_args(sampler, num_steps, "default", options, flow=flow)
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2 for a schedule search, got {num_steps}")
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} is not supported; valid choices: {OBJECTIVES}")
    if space not in SPACES:
        raise ValueError(f"space={space!r} is not supported; valid choices: {SPACES}")
    inits = [init_schedule] if isinstance(init_schedule, str) else list(init_schedule)
    if not inits:
        raise ValueError("init_schedule must name at least one schedule")
    s_max, s_min = noise_schedule.sigma_max, noise_schedule.sigma_min
    if init_sigmas is not None:
        init_sigmas = [float(v) for v in init_sigmas]
        interior = init_sigmas[1:-1]
        if (len(init_sigmas) != num_steps + 1 or init_sigmas[-1] != 0 or abs(init_sigmas[0] / s_max - 1) > 1e-6
                or any(not s_min * (1 - 1e-9) <= v < u for u, v in zip(init_sigmas, interior))):
            raise ValueError(f"init_sigmas must hold {num_steps + 1} descending sigmas from sigma_max={s_max:.6g} "
                             f"to 0, the interior ones >= sigma_min={s_min:.6g}; got {init_sigmas}")
        inits = ["given"]
    if sampler == "olss" and reference is not None and not isinstance(reference, ReferenceTrajectory):
        raise ValueError("sampler 'olss' fits its coefficients to the reference at every sigma: pass a "
                         "samplers.olss.ReferenceTrajectory as `reference`, or None to solve one")
    if isinstance(reference, ReferenceTrajectory) and reference.flow != flow:
        raise ValueError(f"the reference trajectory was solved in the {'flow' if reference.flow else 've'} form, the "
                         f"noise schedule is {'flow-matching' if flow else 'a betas schedule'}")
    if "coefficients" in options:
        raise ValueError("the option 'coefficients' is what sampler 'olss' fits; leave it out of sampler_options")
    order_choices = _order_choices(sampler, options) if search_orders else ()
    if search_orders and not order_choices:
        with_orders = [name for name, spec in SAMPLERS.items() if "orders" in spec.options]
        raise ValueError(f"sampler {sampler!r} takes no per-step orders; search_orders=True needs one of {with_orders}")
    if "orders" in options:
        raise ValueError("the option 'orders' is what search_orders=True searches; leave it out of sampler_options")
    return inits, init_sigmas, order_choices


def _flow(noise_schedule) -> bool:
    return getattr(noise_schedule, "flow", False)


def reference_schedule(noise_schedule) -> str:
    """The schedule of the reference solve: Karras on a betas schedule, the scheduler's own on a flow one."""
    return "default" if _flow(noise_schedule) else "karras"


def _solve_reference(denoiser, x_T, noise_schedule, sampler: str, steps: int, extra_args: dict, trajectory: bool):
    """`sampler` on `steps` steps of `reference_schedule` from `x_T`: its final samples, or (`trajectory`,
    for OLSS's fit) the `ReferenceTrajectory` readable at every sigma."""
    flow = _flow(noise_schedule)
    sigmas = get_sigmas(reference_schedule(noise_schedule), steps, noise_schedule)
    if trajectory:
        return ReferenceTrajectory.solve(denoiser, x_T, sigmas, sampler=sampler, extra_args=extra_args, flow=flow)
    return run_sampler(sampler, denoiser, x_T, sigmas, extra_args=extra_args, disable=True, flow=flow)


class _CountedDenoiser:
    """The denoiser, counting its calls: the search's cost in the record."""

    def __init__(self, denoiser):
        self.denoiser, self.calls = denoiser, 0

    def __call__(self, x, sigma, **kwargs):
        self.calls += 1
        return self.denoiser(x, sigma, **kwargs)


def _schedule_key(log_interior: list[float], orders) -> tuple:
    return tuple(round(v, 12) for v in log_interior), orders


class _Objective:
    """The search's loss on a schedule: the distance of the sampler's final samples to the reference,
    after `decode`, memoised per schedule (interior log-sigmas and per-step orders). For sampler
    "olss" every schedule first gets its own coefficients, refitted to the reference trajectory."""

    def __init__(self, denoiser: _CountedDenoiser, x_T, s_max: float, sampler: str, options: dict, extra_args: dict,
                 objective: str, decode: Callable, reference, history: int | None, ridge: float, flow: bool):
        self.denoiser, self.x_T, self.s_max, self.flow = denoiser, x_T, s_max, flow
        self.sampler, self.options, self.extra_args = sampler, options, extra_args
        self.objective, self.decode = objective, decode
        self.olss, self.history, self.ridge = sampler == "olss", history, ridge
        self.trajectory = reference if self.olss else None
        self.target = decode(reference.final if self.olss else reference)
        self.evaluations = 0
        self.memo: dict[tuple, float] = {}
        self.fitted: dict[tuple, list[list[float]]] = {}

    def sigmas(self, log_interior: list[float]) -> torch.Tensor:
        return torch.tensor([self.s_max] + [math.exp(v) for v in log_interior] + [0.0], dtype=torch.float64)

    def distance(self, samples: torch.Tensor) -> float:
        return _objective_value(self.objective, _per_input_error(self.decode(samples), self.target))

    def refit(self, sigmas: torch.Tensor, key: tuple) -> torch.Tensor:
        """OLSS: fit the coefficients of `sigmas` (N denoiser calls) and return the fitted solver's samples."""
        fit = fit_olss_coefficients(self.denoiser, self.x_T, sigmas, self.trajectory, extra_args=self.extra_args,
                                    history=self.history, ridge=self.ridge)
        self.fitted[key] = fit.coefficients
        return fit.sample

    def __call__(self, log_interior: list[float], orders: tuple[int, ...] | None) -> float:
        key = _schedule_key(log_interior, orders)
        if key not in self.memo:
            self.evaluations += 1
            sigmas = self.sigmas(log_interior)
            if self.olss:
                out = self.refit(sigmas, key)
            else:
                run = dict(self.options, orders=list(orders)) if orders is not None else self.options
                out = run_sampler(self.sampler, self.denoiser, self.x_T, sigmas, run, extra_args=self.extra_args,
                                  disable=True, flow=self.flow)
            self.memo[key] = self.distance(out)
        return self.memo[key]

    def coefficients(self, log_interior: list[float], orders) -> list[list[float]] | None:
        return self.fitted[_schedule_key(log_interior, orders)] if self.olss else None


def _refine(loss: _Objective, u: list[float], orders, best: float, step: float, bounds: tuple[float, float],
            passes: int, min_step: float) -> tuple[list[float], float]:
    """Pattern search over the interior log-sigmas `u`: move one a fraction `step` of the way to its
    upper or lower neighbour (the bounds at the ends) where that lowers the loss; `step` halves after
    a pass that improves nothing, and the search stops below `min_step` or after `passes` passes."""
    lo_bound, hi_bound = bounds
    for _ in range(passes):
        improved = False
        for j in range(len(u)):
            upper = u[j - 1] if j > 0 else hi_bound
            lower = u[j + 1] if j + 1 < len(u) else lo_bound
            for target in (upper, lower):
                trial = list(u)
                trial[j] = u[j] + step * (target - u[j])
                value = loss(trial, orders)
                if value < best:
                    best, u, improved = value, trial, True
                    break
        if not improved:
            step /= 2
            if step < min_step:
                break
    return u, best


def _search(loss: _Objective, u: list[float], orders, order_choices: tuple[int, ...], rounds: int,
            bounds: tuple[float, float], passes: int, min_step: float):
    """One search from log-sigmas `u`: the sigmas, then the orders of the interior steps one at a
    time, in turn for up to `rounds` rounds. Returns (loss, log-sigmas, orders)."""
    best, step = loss(u, orders), 0.5
    num_steps = len(u) + 1  # u holds the interior sigmas
    for _ in range(rounds if order_choices else 1):
        u, best = _refine(loss, u, orders, best, step, bounds, passes, min_step)
        changed = False
        for i in range(1, num_steps - 1):  # the first step has no history, the last goes to 0
            for candidate in order_choices:
                trial = orders[:i] + (candidate,) + orders[i + 1:]
                if trial != orders and loss(u, trial) < best:
                    best, orders, changed = loss(u, trial), trial, True
        if not changed:
            break
        step = 0.25  # the sigmas are already close: a finer search around them
    return best, u, orders


def tune_schedule(
    denoiser,
    noise: torch.Tensor,
    noise_schedule: NoiseSchedule | FlowSchedule,
    *,
    sampler: str = "dpmpp_2m",
    num_steps: int = 8,
    extra_args: dict | None = None,
    init_schedule: str | Sequence[str] | None = None,
    reference: torch.Tensor | None = None,
    reference_sampler: str = "dpmpp_2m",
    reference_steps: int = 200,
    passes: int = 12,
    min_step: float = 0.02,
    sampler_options: dict | None = None,
    model: str = "",
    objective: str = "mse",
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    space: str = "latent",
    search_orders: bool = False,
    rounds: int = 2,
    init_sigmas: Sequence[float] | None = None,
    history: int | None = 3,
    ridge: float = 0.0,
) -> TunedSchedule:
    """Search `num_steps` sigmas for `sampler` minimising the distance of its final sample to the
    reference solution from the same starting noise.

    Args:
        denoiser: `denoiser(x, sigma, **extra_args) -> x0` (VE form, see `UNetDenoiser`; on a flow
            schedule the flow form, see `samplers.flow.FlowDenoiser`).
        noise: unit Gaussian noise, one calibration input per batch entry.
        noise_schedule: the model's (a `NoiseSchedule`, or a `FlowSchedule`: the search then runs
            in the flow form, on the sampler's default spacing, `FlowSamplerScheduler`); gives sigma_max
            (the fixed first sigma) and sigma_min.
        init_schedule: a schedule name (see `get_sigmas`) or several: one search starts from
            each (the loss has local minima) and the best result wins; `loss_init` is the
            loss of the first. None: "karras" on a betas schedule, "default" on a flow one.
        reference: the exact final samples if known; otherwise `reference_sampler` with
            `reference_steps` steps of `reference_schedule` computes them.
        passes: most passes over all interior sigmas per round; the trial move (a fraction of
            the gap to the neighbouring sigma) halves after a pass that improves nothing, and
            the round stops once it falls below `min_step`.
        objective: "mse" (squared error pooled over all inputs) or "psnr" (mean over inputs of
            10 log10 of each input's squared error: minus the mean PSNR at data range 1).
        decode: maps final samples into the space the distance is measured in (e.g. a VAE
            decoder to images in [0, 1]); None measures the samples themselves. `space` names
            that space in the saved record.
        search_orders: also search the solver order of each step (S^3), for samplers that take
            the option `orders` (UniPC); the orders and the sigmas are searched in turn for up
            to `rounds` rounds.
        init_sigmas: start from these sigmas (`num_steps + 1`, from sigma_max down to 0, e.g. a
            tuned schedule's) instead of `init_schedule`; `passes=0` keeps them as they are.
        history, ridge: for sampler "olss", the outputs each step combines and the pull towards
            DPM-Solver++(2M)'s coefficients (see `samplers.olss.fit_olss_coefficients`); its
            `reference` is a `ReferenceTrajectory` (None: solved as above), and `loss_init` is
            DPM-Solver++(2M)'s loss on the initial schedule.
    """
    options = dict(sampler_options or {})
    flow = _flow(noise_schedule)
    if flow:  # the sampler's own default sigmas (`FlowSamplerScheduler`): its first sigma stays fixed
        check_sampler_args(sampler, num_steps, "default", options, flow=True)
        noise_schedule = noise_schedule.with_spacing(SAMPLERS[sampler].flow_spacing)
    if init_schedule is None:
        init_schedule = reference_schedule(noise_schedule)
    inits, init_sigmas, order_choices = _check_search(sampler, num_steps, options, objective, space, init_schedule,
                                                      init_sigmas, reference, search_orders, noise_schedule, flow)
    extra_args = extra_args or {}
    start = time.perf_counter()
    s_max, s_min = noise_schedule.sigma_max, noise_schedule.sigma_min
    # unit noise at sigma_max: a flow state is the noise itself at sigma 1; VP unit noise in VE scale
    x_T = noise if flow else noise * math.sqrt(1 + s_max**2)
    counted = _CountedDenoiser(denoiser)
    olss = sampler == "olss"
    reference_label = ("given" if reference is not None else
                       f"{reference_sampler} x {reference_steps} {reference_schedule(noise_schedule)} steps")
    with torch.no_grad():
        if reference is None:
            reference = _solve_reference(counted, x_T, noise_schedule, reference_sampler, reference_steps, extra_args,
                                         trajectory=olss)
        loss = _Objective(counted, x_T, s_max, sampler, options, extra_args, objective, decode or (lambda y: y),
                          reference, history, ridge, flow)

        # a search from each initial schedule (the loss has local minima); the best one wins
        def initial(name: str) -> list[float]:
            init = init_sigmas if name == "given" else get_sigmas(name, num_steps, noise_schedule)
            return [math.log(float(s)) for s in init[1:-1]]

        default_orders = _default_orders(sampler, options, num_steps) if order_choices else None
        bounds = (math.log(s_min), math.log(s_max))
        results = [(*_search(loss, initial(name), default_orders, order_choices, rounds, bounds, passes, min_step),
                    name) for name in inits]
        if olss:  # the base solver, DPM-Solver++(2M), on the first initial schedule
            out = run_sampler("olss", counted, x_T, loss.sigmas(initial(inits[0])), extra_args=extra_args, disable=True,
                              flow=flow)
            loss_init = loss.distance(out)
        else:
            loss_init = loss(initial(inits[0]), default_orders)
        best, u, orders, init_name = min(results, key=lambda item: item[0])
    sigmas = loss.sigmas(u)
    return TunedSchedule(
        sampler=sampler,
        num_steps=num_steps,
        sigmas=sigmas.tolist(),
        timesteps=noise_schedule.sigma_to_t(sigmas[:-1]).tolist(),
        sampler_options=options,
        init_schedule=init_name,
        reference=reference_label,
        calibration_inputs=int(noise.shape[0]),
        loss_init=loss_init,
        loss_tuned=best,
        search_evaluations=loss.evaluations,
        search_denoiser_calls=counted.calls,
        search_seconds=time.perf_counter() - start,
        model=model,
        orders=None if orders is None else list(orders),
        objective=objective,
        space=space,
        coefficients=loss.coefficients(u, orders),
        coefficient_fit={"history": history, "ridge": ridge} if olss else {},
        form="flow" if flow else "ve",
    )


class CFGDenoiser:
    """Classifier-free guidance (Ho & Salimans 2022) around a denoiser: the conditional and
    unconditional branches run as one batch."""

    def __init__(self, denoiser, guidance_scale: float):
        self.denoiser = denoiser
        self.guidance_scale = guidance_scale

    def __call__(self, x, sigma, *, cond: dict, uncond: dict, **kwargs):
        if self.guidance_scale == 1.0:
            return self.denoiser(x, sigma, **cond, **kwargs)
        both = {k: torch.cat([uncond[k], cond[k]]) for k in cond}
        x0_uncond, x0_cond = self.denoiser(torch.cat([x, x]), torch.cat([sigma, sigma]), **both, **kwargs).chunk(2)
        return x0_uncond + self.guidance_scale * (x0_cond - x0_uncond)


def tune_pipeline_schedule(
    pipe,
    *,
    prompts: list[str] | None = None,
    prompt_embeds: torch.Tensor | None = None,
    negative_prompt_embeds: torch.Tensor | None = None,
    sampler: str = "dpmpp_2m",
    num_steps: int = 8,
    guidance_scale: float = 7.5,
    height: int | None = None,
    width: int | None = None,
    seed: int = 0,
    space: str = "latent",
    **search,
) -> TunedSchedule:
    """`tune_schedule` for a Stable Diffusion (1.x / 2.x) or Stable Diffusion 3 (flow matching) pipeline on
    calibration prompts (or, for SD, their embeddings), with classifier-free guidance as the pipeline
    would apply it.

    `space="image"` measures the distance on the decoded images in [0, 1], as a judge comparing
    the pipeline's images does; "latent" on the final latents."""
    if space not in SPACES:
        raise ValueError(f"space={space!r} is not supported; valid choices: {SPACES}")
    flow = is_flow_config(pipe.scheduler)
    if flow and not hasattr(pipe, "transformer") or not flow and not hasattr(pipe, "unet"):
        raise ValueError(f"tune_pipeline_schedule takes Stable Diffusion (UNet) and Stable Diffusion 3 pipelines, "
                         f"not {type(pipe).__name__}")
    setup = _sd3_problem if flow else _sd_problem
    denoiser, schedule, extra, shape, decode_latents = setup(pipe, prompts, prompt_embeds, negative_prompt_embeds,
                                                             guidance_scale, height, width)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    dtype = extra["cond"]["encoder_hidden_states"].dtype
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(pipe._execution_device, dtype)
    vae = pipe.vae

    def decode_images(latents):  # the final sigma is 0, where the VE and VP scales agree
        images = vae.decode(decode_latents(latents.to(vae.dtype))).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    decode = decode_images if space == "image" else None
    return tune_schedule(CFGDenoiser(denoiser, guidance_scale), noise, schedule, sampler=sampler, num_steps=num_steps,
                         extra_args=extra, model=str(getattr(pipe, "name_or_path", "") or ""), decode=decode,
                         space=space, **search)


def _sd_problem(pipe, prompts, prompt_embeds, negative_prompt_embeds, guidance_scale, height, width):
    """A Stable Diffusion pipeline's denoiser, noise schedule, conditioning, latent shape and latent decoding."""
    unet = pipe.unet
    if prompt_embeds is None:
        if not prompts:
            raise ValueError("give calibration `prompts` or `prompt_embeds`")
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompts, unet.device, 1, guidance_scale > 1.0, negative_prompt=[""] * len(prompts)
        )
    if negative_prompt_embeds is None:
        negative_prompt_embeds = torch.zeros_like(prompt_embeds)
    scale = getattr(pipe, "vae_scale_factor", 8)
    height = height or unet.config.sample_size * scale
    width = width or unet.config.sample_size * scale
    shape = (prompt_embeds.shape[0], unet.config.in_channels, height // scale, width // scale)
    denoiser = UNetDenoiser(unet, pipe.scheduler)
    extra = {"cond": {"encoder_hidden_states": prompt_embeds},
             "uncond": {"encoder_hidden_states": negative_prompt_embeds.to(prompt_embeds.dtype)}}
    return denoiser, denoiser.schedule, extra, shape, lambda latents: latents / pipe.vae.config.scaling_factor


def _sd3_problem(pipe, prompts, prompt_embeds, negative_prompt_embeds, guidance_scale, height, width):
    """A Stable Diffusion 3 pipeline's flow denoiser and schedule (with the pipeline's dynamic shift for the
    image size, where its scheduler shifts dynamically), conditioning, latent shape and latent decoding."""
    if prompt_embeds is not None or not prompts:
        raise ValueError("give calibration `prompts` (a flow pipeline's embeddings come with pooled ones)")
    transformer = pipe.transformer
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, None, None, device=pipe._execution_device, do_classifier_free_guidance=True,
        negative_prompt=[""] * len(prompts))
    scale = pipe.vae_scale_factor
    height = height or pipe.default_sample_size * scale
    width = width or pipe.default_sample_size * scale
    shape = (len(prompts), transformer.config.in_channels, height // scale, width // scale)
    config = pipe.scheduler.config
    mu = None
    if config.get("use_dynamic_shifting"):
        patch = transformer.config.patch_size
        mu = calculate_shift((shape[2] // patch) * (shape[3] // patch), config.get("base_image_seq_len", 256),
                             config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5),
                             config.get("max_shift", 1.16))
    schedule = FlowSchedule.from_config(config, mu=mu)
    denoiser = FlowDenoiser(transformer, timestep_scale=schedule.num_train_timesteps, schedule=schedule)
    extra = {"cond": {"encoder_hidden_states": embeds, "pooled_projections": pooled},
             "uncond": {"encoder_hidden_states": negative.to(embeds.dtype),
                        "pooled_projections": negative_pooled.to(pooled.dtype)}}
    vae = pipe.vae
    return denoiser, schedule, extra, shape, lambda latents: latents / vae.config.scaling_factor + vae.config.shift_factor
