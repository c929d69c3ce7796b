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
`make_scheduler(..., schedule="tuned", tuned=name, model_dir=...)`.
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
from .olss import ReferenceTrajectory, fit_olss_coefficients
from .olss_solver import check_coefficients
from .registry import SAMPLERS, check_sampler_args, run_sampler
from .schedules import get_sigmas

TUNED_DIRNAME = "tuned_schedules"
OBJECTIVES = ("mse", "psnr")
SPACES = ("latent", "image")


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

    def __post_init__(self):
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


def tune_schedule(
    denoiser,
    noise: torch.Tensor,
    noise_schedule: NoiseSchedule,
    *,
    sampler: str = "dpmpp_2m",
    num_steps: int = 8,
    extra_args: dict | None = None,
    init_schedule: str | Sequence[str] = "karras",
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
        denoiser: `denoiser(x, sigma, **extra_args) -> x0` (VE form, see `UNetDenoiser`).
        noise: unit Gaussian noise, one calibration input per batch entry.
        noise_schedule: the model's; gives sigma_max (the fixed first sigma) and sigma_min.
        init_schedule: a schedule name (see `get_sigmas`) or several: one search starts from
            each (the loss has local minima) and the best result wins; `loss_init` is the
            loss of the first.
        reference: the exact final samples if known; otherwise `reference_sampler` with
            `reference_steps` Karras steps computes them.
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
    check_sampler_args(sampler, num_steps, "default", options)
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
    olss = sampler == "olss"
    if olss and reference is not None and not isinstance(reference, ReferenceTrajectory):
        raise ValueError("sampler 'olss' fits its coefficients to the reference at every sigma: pass a "
                         "samplers.olss.ReferenceTrajectory as `reference`, or None to solve one")
    if "coefficients" in options:
        raise ValueError("the option 'coefficients' is what sampler 'olss' fits; leave it out of sampler_options")
    order_choices = _order_choices(sampler, options) if search_orders else ()
    if search_orders and not order_choices:
        with_orders = [name for name, spec in SAMPLERS.items() if "orders" in spec.options]
        raise ValueError(f"sampler {sampler!r} takes no per-step orders; search_orders=True needs one of {with_orders}")
    if "orders" in options:
        raise ValueError("the option 'orders' is what search_orders=True searches; leave it out of sampler_options")
    extra_args = extra_args or {}
    decode = decode or (lambda y: y)
    start = time.perf_counter()
    x_T = noise * math.sqrt(1 + s_max**2)  # VP unit noise at sigma_max, in VE scale
    calls = 0

    def counted(x, sigma, **kw):
        nonlocal calls
        calls += 1
        return denoiser(x, sigma, **kw)

    reference_label = "given" if reference is not None else f"{reference_sampler} x {reference_steps} karras steps"
    with torch.no_grad():
        if reference is None:
            ref_sigmas = get_sigmas("karras", reference_steps, noise_schedule)
            if olss:
                reference = ReferenceTrajectory.solve(counted, x_T, ref_sigmas, sampler=reference_sampler,
                                                      extra_args=extra_args)
            else:
                reference = run_sampler(reference_sampler, counted, x_T, ref_sigmas, extra_args=extra_args,
                                        disable=True)
        trajectory = reference if olss else None
        reference = decode(trajectory.final if olss else reference)

        evaluations = 0
        memo: dict[tuple, float] = {}
        fitted: dict[tuple, list[list[float]]] = {}

        def run_solver(sigmas: torch.Tensor, run: dict, key: tuple) -> torch.Tensor:
            if not olss:
                return run_sampler(sampler, counted, x_T, sigmas, run, extra_args=extra_args, disable=True)
            fit = fit_olss_coefficients(counted, x_T, sigmas, trajectory, extra_args=extra_args, history=history,
                                        ridge=ridge)
            fitted[key] = fit.coefficients
            return fit.sample

        def loss(log_interior: list[float], orders: tuple[int, ...] | None) -> float:
            nonlocal evaluations
            key = (tuple(round(v, 12) for v in log_interior), orders)
            if key not in memo:
                evaluations += 1
                sigmas = torch.tensor([s_max] + [math.exp(v) for v in log_interior] + [0.0], dtype=torch.float64)
                run = dict(options, orders=list(orders)) if orders is not None else options
                out = run_solver(sigmas, run, key)
                memo[key] = _objective_value(objective, _per_input_error(decode(out), reference))
            return memo[key]

        def refine(u: list[float], orders, best: float, step: float) -> tuple[list[float], float]:
            lo_bound, hi_bound = math.log(s_min), math.log(s_max)
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

        def default_orders() -> tuple[int, ...] | None:
            if not order_choices:
                return None
            # the sampler's own per-step orders: lower order at the start (no history) and the end
            order = options.get("order", SAMPLERS[sampler].default_order)
            lof = options.get("lower_order_final", True)
            return tuple(min(order, i + 1, num_steps - i if lof else order) for i in range(num_steps))

        def search(u: list[float], orders) -> tuple[float, list[float], tuple[int, ...] | None]:
            best, step = loss(u, orders), 0.5
            for _ in range(rounds if order_choices else 1):
                u, best = refine(u, orders, best, step)
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

        # a search from each initial schedule (the loss has local minima); the best one wins
        def initial(name: str) -> list[float]:
            init = init_sigmas if name == "given" else get_sigmas(name, num_steps, noise_schedule)
            return [math.log(float(s)) for s in init[1:-1]]

        results = []
        for name in inits:
            results.append((*search(initial(name), default_orders()), name))
        if olss:  # the base solver, DPM-Solver++(2M), on the first initial schedule
            first = torch.tensor([s_max] + [math.exp(v) for v in initial(inits[0])] + [0.0], dtype=torch.float64)
            out = run_sampler("olss", counted, x_T, first, extra_args=extra_args, disable=True)
            loss_init = _objective_value(objective, _per_input_error(decode(out), reference))
        else:
            loss_init = loss(initial(inits[0]), default_orders())
        best, u, orders, init_name = min(results, key=lambda item: item[0])
    sigmas = [s_max] + [math.exp(v) for v in u] + [0.0]
    timesteps = noise_schedule.sigma_to_t(torch.tensor(sigmas[:-1], dtype=torch.float64)).tolist()
    return TunedSchedule(
        sampler=sampler,
        num_steps=num_steps,
        sigmas=sigmas,
        timesteps=timesteps,
        sampler_options=options,
        init_schedule=init_name,
        reference=reference_label,
        calibration_inputs=int(noise.shape[0]),
        loss_init=loss_init,
        loss_tuned=best,
        search_evaluations=evaluations,
        search_denoiser_calls=calls,
        search_seconds=time.perf_counter() - start,
        model=model,
        orders=None if orders is None else list(orders),
        objective=objective,
        space=space,
        coefficients=fitted[(tuple(round(v, 12) for v in u), orders)] if olss else None,
        coefficient_fit={"history": history, "ridge": ridge} if olss else {},
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
    """`tune_schedule` for a Stable Diffusion (1.x / 2.x) pipeline on calibration prompts (or
    their embeddings), with classifier-free guidance as the pipeline would apply it.

    `space="image"` measures the distance on the decoded images in [0, 1], as a judge comparing
    the pipeline's images does; "latent" on the final latents."""
    if space not in SPACES:
        raise ValueError(f"space={space!r} is not supported; valid choices: {SPACES}")
    unet = pipe.unet
    device = unet.device
    if prompt_embeds is None:
        if not prompts:
            raise ValueError("give calibration `prompts` or `prompt_embeds`")
        prompt_embeds, negative_prompt_embeds = pipe.encode_prompt(
            prompts, device, 1, guidance_scale > 1.0, negative_prompt=[""] * len(prompts)
        )
    if negative_prompt_embeds is None:
        negative_prompt_embeds = torch.zeros_like(prompt_embeds)
    scale = getattr(pipe, "vae_scale_factor", 8)
    height = height or unet.config.sample_size * scale
    width = width or unet.config.sample_size * scale
    generator = torch.Generator(device="cpu").manual_seed(seed)
    shape = (prompt_embeds.shape[0], unet.config.in_channels, height // scale, width // scale)
    noise = torch.randn(shape, generator=generator, dtype=torch.float32).to(device, prompt_embeds.dtype)
    base = UNetDenoiser(unet, pipe.scheduler)
    denoiser = CFGDenoiser(base, guidance_scale)
    extra = {"cond": {"encoder_hidden_states": prompt_embeds},
             "uncond": {"encoder_hidden_states": negative_prompt_embeds.to(prompt_embeds.dtype)}}
    vae = pipe.vae

    def decode_images(latents):  # the final sigma is 0, where the VE and VP scales agree
        images = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor).sample
        return (images.float() / 2 + 0.5).clamp(0, 1)

    decode = decode_images if space == "image" else None
    return tune_schedule(denoiser, noise, base.schedule, sampler=sampler, num_steps=num_steps, extra_args=extra,
                         model=str(getattr(pipe, "name_or_path", "") or ""), decode=decode, space=space, **search)
