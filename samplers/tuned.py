"""Step schedules tuned to the model: search the N sigmas whose sampler output lies closest to a
high-step reference solution, for a few calibration inputs.

In the spirit of Align Your Steps (Sabour et al. 2024), OLSS (Duan et al. 2023), AutoDiffusion
(Li et al. 2023) and the S^3 solver-schedule search (Frankel et al. 2024), with the simplest
search that works on a handful of parameters: a derivative-free pattern search over the
log-sigmas of the interior steps (the first sigma stays at the model's sigma_max, the schedule
ends in 0). The result is a small JSON file saved next to the model and reused by name through
`make_scheduler(..., schedule="tuned", tuned=name, model_dir=...)`.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .api import check_sampler_args, sample
from .denoiser import NoiseSchedule, UNetDenoiser
from .schedules import get_sigmas

TUNED_DIRNAME = "tuned_schedules"


@dataclass
class TunedSchedule:
    """A searched schedule and what it cost: `sigmas` (descending, ending in 0) and the train
    `timesteps` of its model calls' sigmas."""

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

    def save(self, path: str | os.PathLike) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(asdict(self), indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> "TunedSchedule":
        data = json.loads(Path(path).read_text())
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in known})


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


def tune_schedule(
    denoiser,
    noise: torch.Tensor,
    noise_schedule: NoiseSchedule,
    *,
    sampler: str = "dpmpp_2m",
    num_steps: int = 8,
    extra_args: dict | None = None,
    init_schedule: str = "karras",
    reference: torch.Tensor | None = None,
    reference_sampler: str = "dpmpp_2m",
    reference_steps: int = 200,
    passes: int = 12,
    min_step: float = 0.02,
    sampler_options: dict | None = None,
    model: str = "",
) -> TunedSchedule:
    """Search `num_steps` sigmas for `sampler` minimising the mean squared distance of its final
    sample to the reference solution from the same starting noise.

    Args:
        denoiser: `denoiser(x, sigma, **extra_args) -> x0` (VE form, see `UNetDenoiser`).
        noise: unit Gaussian noise, one calibration input per batch entry.
        noise_schedule: the model's; gives sigma_max (the fixed first sigma) and sigma_min.
        reference: the exact final samples if known; otherwise `reference_sampler` with
            `reference_steps` Karras steps computes them.
        passes: most passes over all interior sigmas; the trial move (a fraction of the gap to
            the neighbouring sigma) halves after a pass that improves nothing, and the search
            stops once it falls below `min_step`.
    """
    options = dict(sampler_options or {})
    check_sampler_args(sampler, num_steps, "default", options)
    if num_steps < 2:
        raise ValueError(f"num_steps must be at least 2 for a schedule search, got {num_steps}")
    extra_args = extra_args or {}
    start = time.perf_counter()
    s_max, s_min = noise_schedule.sigma_max, noise_schedule.sigma_min
    x_T = noise * math.sqrt(1 + s_max**2)  # VP unit noise at sigma_max, in VE scale
    calls = 0

    def counted(x, sigma, **kw):
        nonlocal calls
        calls += 1
        return denoiser(x, sigma, **kw)

    with torch.no_grad():
        if reference is None:
            ref_sigmas = get_sigmas("karras", reference_steps, noise_schedule)
            reference = sample(reference_sampler, counted, x_T, ref_sigmas, extra_args=extra_args, disable=True)

        evaluations = 0

        def loss(log_interior: list[float]) -> float:
            nonlocal evaluations
            evaluations += 1
            sigmas = torch.tensor([s_max] + [math.exp(u) for u in log_interior] + [0.0], dtype=torch.float64)
            out = sample(sampler, counted, x_T, sigmas, extra_args=extra_args, disable=True, **options)
            return float(((out - reference) ** 2).mean())

        init = get_sigmas(init_schedule, num_steps, noise_schedule)
        u = [math.log(float(s)) for s in init[1:-1]]
        best = loss_init = loss(u)
        lo_bound, hi_bound = math.log(s_min), math.log(s_max)
        step = 0.5
        for _ in range(passes):
            improved = False
            for j in range(len(u)):
                upper = u[j - 1] if j > 0 else hi_bound
                lower = u[j + 1] if j + 1 < len(u) else lo_bound
                for target in (upper, lower):
                    trial = list(u)
                    trial[j] = u[j] + step * (target - u[j])
                    value = loss(trial)
                    if value < best:
                        best, u, improved = value, trial, True
                        break
            if not improved:
                step /= 2
                if step < min_step:
                    break
    sigmas = [s_max] + [math.exp(v) for v in u] + [0.0]
    timesteps = noise_schedule.sigma_to_t(torch.tensor(sigmas[:-1], dtype=torch.float64)).tolist()
    return TunedSchedule(
        sampler=sampler,
        num_steps=num_steps,
        sigmas=sigmas,
        timesteps=timesteps,
        sampler_options=options,
        init_schedule=init_schedule,
        reference=f"{reference_sampler} x {reference_steps} karras steps" if reference_steps else "given",
        calibration_inputs=int(noise.shape[0]),
        loss_init=loss_init,
        loss_tuned=best,
        search_evaluations=evaluations,
        search_denoiser_calls=calls,
        search_seconds=time.perf_counter() - start,
        model=model,
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
    **search,
) -> TunedSchedule:
    """`tune_schedule` for a Stable Diffusion (1.x / 2.x) pipeline on calibration prompts (or
    their embeddings), with classifier-free guidance as the pipeline would apply it."""
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
    return tune_schedule(denoiser, noise, base.schedule, sampler=sampler, num_steps=num_steps, extra_args=extra,
                         model=str(getattr(pipe, "name_or_path", "") or ""), **search)
