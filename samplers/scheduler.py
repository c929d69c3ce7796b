"""`SamplerScheduler`: any sampler of this package as a diffusers scheduler.

A thin adapter in the manner of k-diffusion's wrappers: the maths stays in the solver generators
(`samplers._loop`), which the adapter advances by one denoiser call per `step()`. Pipelines keep
their latents in the VP scale (`init_noise_sigma = 1`, `scale_model_input` is the identity, and
`add_noise` is DDPM's), so text-to-image, img2img (strength), inpaint, ControlNet and SDXL
pipelines run unchanged; the adapter converts to the VE sigma form at its boundary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ._loop import trace, zero_noise
from .denoiser import PREDICTION_TYPES, NoiseSchedule, alpha_from_sigma, dynamic_threshold, model_output_to_x0
from .registry import SAMPLERS, check_sampler_args, resolve_schedule, solver_steps
from .schedules import get_sigmas

# Entries of a base scheduler's config that describe the model's noise schedule
NOISE_CONFIG_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "prediction_type",
    "timestep_spacing",
    "steps_offset",
    "rescale_betas_zero_snr",
)


@dataclass
class SamplerSchedulerOutput(SchedulerOutput):
    """`prev_sample` (VP scale, for the next model call) and the x0 the step used."""

    pred_original_sample: torch.Tensor | None = None


class SamplerScheduler(SchedulerMixin, ConfigMixin):
    """Run sampler `sampler` with step schedule `schedule` inside any diffusers pipeline.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas,
        rescale_betas_zero_snr: the model's noise schedule (copied from the pipeline's scheduler).
        prediction_type: "epsilon", "v_prediction" or "sample".
        timestep_spacing, steps_offset: used by `schedule="default"`.
        sampler: one of `samplers.SAMPLER_NAMES`.
        schedule: one of `samplers.SCHEDULE_NAMES`.
        num_steps: steps when `set_timesteps` gets none.
        sampler_options: the sampler's options (see `samplers.make_scheduler`).
    """

    config_name = "scheduler_config.json"
    _compatibles = []

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas=None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "linspace",
        steps_offset: int = 1,
        rescale_betas_zero_snr: bool = False,
        clip_sample: bool = False,
        sampler: str = "dpmpp_2m",
        schedule: str = "default",
        num_steps: int | None = None,
        sampler_options: dict | None = None,
    ):
        options = dict(sampler_options or {})
        options.pop("backend", None)
        check_sampler_args(sampler, num_steps, schedule, options)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r} is not supported; valid choices: {PREDICTION_TYPES}")
        if clip_sample:
            raise ValueError("clip_sample=True is not supported; use the option thresholding=True")
        self.options = options
        self.noise_schedule = NoiseSchedule.from_config(self.config)
        self.order = SAMPLERS[sampler].calls_per_step
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._plan: list[tuple[float, int]] = []
        self._schedule_sigmas = None
        self._begin_index = None
        self._reset()

    @classmethod
    def from_base(cls, base=None, *, sampler: str, schedule: str = "default", num_steps=None, options=None):
        """An adapter on `base`'s noise schedule (None: Stable Diffusion's)."""
        config = {}
        if base is not None:
            base_config = base.config if hasattr(base, "config") else base
            # like `from_config` across scheduler classes: entries the base left at its class
            # default take this class's default (SD 1.x's PNDM config gives "linspace" spacing)
            defaults = set(base_config.get("_use_default_values", ()))
            config = {k: base_config[k] for k in NOISE_CONFIG_KEYS if k in base_config and k not in defaults}
        return cls(
            **config, sampler=sampler, schedule=schedule, num_steps=num_steps, sampler_options=dict(options or {})
        )

    # state of one run, reset by `set_timesteps`
    def _reset(self):
        self._step_index = None
        self._start_index = None
        self._solver = None
        self._generator = None

    @property
    def step_index(self):
        return self._step_index

    @property
    def begin_index(self):
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0):
        """Start at `timesteps[begin_index]` (img2img): called by pipelines before the loop."""
        self._begin_index = begin_index

    def __len__(self):
        return self.config.num_train_timesteps

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, timesteps=None, sigmas=None):
        """Build the schedule and the list of model calls the sampler makes on it."""
        options = dict(self.options)
        schedule = resolve_schedule(self.config.sampler, self.config.schedule)
        if timesteps is not None or sigmas is not None:
            schedule = "explicit"
            options["timesteps"] = None if timesteps is None else [float(t) for t in timesteps]
            options["sigmas"] = None if sigmas is None else [float(s) for s in sigmas]
            num_inference_steps = None
        n = num_inference_steps if num_inference_steps is not None else self.config.num_steps
        if schedule == "explicit":
            explicit = options.get("timesteps") if options.get("timesteps") is not None else options.get("sigmas")
            length = len(explicit) - (1 if options.get("sigmas") is not None and float(explicit[-1]) == 0 else 0)
            if num_inference_steps is not None and num_inference_steps != length:
                raise ValueError(
                    f"this scheduler has an explicit schedule of {length} steps; call the pipeline with "
                    f"num_inference_steps={length}, not {num_inference_steps}"
                )
        elif n is None or isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {n!r}")
        schedule_sigmas = get_sigmas(
            schedule,
            None if n is None else int(n),
            self.noise_schedule,
            timestep_spacing=self.config.timestep_spacing,
            steps_offset=self.config.steps_offset,
            rho=options.get("rho", 7.0),
            timesteps=options.get("timesteps"),
            sigmas=options.get("sigmas"),
            original_inference_steps=options.get("original_inference_steps", 50),
        )
        self._schedule_sigmas = schedule_sigmas
        self._plan = self._trace(schedule_sigmas, begin=True)
        eval_sigmas = torch.tensor([sigma for sigma, _ in self._plan], dtype=torch.float64)
        self.timesteps = self.noise_schedule.sigma_to_t(eval_sigmas).to(device=device, dtype=torch.float32)
        self.sigmas = schedule_sigmas.to(torch.float32)
        self.num_inference_steps = len(schedule_sigmas) - 1
        self._begin_index = None
        self._reset()

    def _trace(self, sigmas, begin):
        probe = torch.zeros(1, dtype=torch.float64)
        return trace(solver_steps(self.config.sampler, probe, sigmas, self.options, noise_sampler=zero_noise,
                                  begin=begin, noise_schedule=self.noise_schedule))

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _sigma_for_timesteps(self, timesteps) -> torch.Tensor:
        t = torch.as_tensor(timesteps).detach().to("cpu", torch.float64).reshape(-1)
        sigma = self.noise_schedule.t_to_sigma(t)
        if self.timesteps is not None:
            # a timestep of this run's plan maps to its exact sigma
            planned = self.timesteps.detach().to("cpu", torch.float64)
            plan_sigmas = torch.tensor([s for s, _ in self._plan], dtype=torch.float64)
            match = t[:, None] == planned[None, :]
            hit = match.any(dim=1)
            sigma = torch.where(hit, plan_sigmas[match.float().argmax(dim=1)], sigma)
        return sigma

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """DDPM forward noising `alpha * x0 + sigma_vp * noise` at train timesteps `timesteps`."""
        sigma = self._sigma_for_timesteps(timesteps)
        alpha = alpha_from_sigma(sigma)
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        work = original_samples.dtype if original_samples.dtype in (torch.float32, torch.float64) else torch.float32
        alpha = alpha.reshape(shape).to(original_samples.device, work)
        sigma_vp = (sigma * alpha_from_sigma(sigma)).reshape(shape).to(original_samples.device, work)
        return (alpha * original_samples.to(work) + sigma_vp * noise.to(work)).to(original_samples.dtype)

    def _start(self, sample: torch.Tensor):
        """Begin the run at `begin_index`: skip to the next step start, then start the solver."""
        begin = self._begin_index or 0
        start = begin
        while start < len(self._plan) and start > 0 and self._plan[start][1] == self._plan[start - 1][1]:
            start += 1  # a call inside a multi-call step (PNDM's warm-up) is passed over unchanged
        self._step_index = begin
        self._start_index = start

    def _noise_sampler(self, sample):
        def sample_noise(sigma, sigma_next):
            return randn_tensor(sample.shape, generator=self._generator, device=sample.device, dtype=torch.float32)

        return sample_noise

    def step(
        self,
        model_output: torch.Tensor,
        timestep,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ):
        """Advance the sampler by one model call; `prev_sample` is the input of the next call."""
        if self.timesteps is None:
            raise ValueError("call set_timesteps before step")
        if self._step_index is None:
            self._start(sample)
        index = self._step_index
        if index >= len(self._plan):
            raise ValueError(f"step called {index + 1} times, but this schedule makes {len(self._plan)} model calls")
        self._step_index += 1
        if index < self._start_index:
            return SamplerSchedulerOutput(prev_sample=sample) if return_dict else (sample,)
        # half-precision pipelines: the solver state is float32, like diffusers' schedulers
        work_dtype = sample.dtype if sample.dtype in (torch.float32, torch.float64) else torch.float32
        x_vp = sample.to(work_dtype)
        sigma, _ = self._plan[index]
        alpha = alpha_from_sigma(sigma)
        x = x_vp / alpha
        x0 = model_output_to_x0(model_output.to(work_dtype), x_vp, alpha, sigma * alpha, self.config.prediction_type)
        if self.options.get("thresholding", False):
            x0 = dynamic_threshold(
                x0, self.options.get("dynamic_thresholding_ratio", 0.995), self.options.get("sample_max_value", 1.0)
            )
        self._generator = generator
        if self._solver is None:
            first_step = self._plan[index][1]
            sigmas = self._schedule_sigmas[first_step:]
            begin = index == 0
            if not begin and len(self._trace(sigmas, begin=False)) != len(self._plan) - index:
                raise RuntimeError("the sampler's calls from this begin_index do not match the pipeline's timesteps")
            self._solver = solver_steps(self.config.sampler, x, sigmas, self.options,
                                        noise_sampler=self._noise_sampler(x), begin=begin,
                                        noise_schedule=self.noise_schedule)
            next(self._solver)
        try:
            x_next, sigma_next, _ = self._solver.send((x, x0))
        except StopIteration as stop:
            x_next, sigma_next = stop.value, float(self._schedule_sigmas[-1])
            self._solver = None
        prev_sample = (x_next * alpha_from_sigma(sigma_next)).to(sample.dtype)
        if not return_dict:
            return (prev_sample,)
        return SamplerSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0.to(sample.dtype))
