"""`SamplerScheduler` and `FlowSamplerScheduler`: any sampler of this package as a diffusers scheduler.

Thin adapters in the manner of k-diffusion's wrappers: the maths stays in the solver generators
(`samplers._loop`), which an adapter advances by one denoiser call per `step()`.

`SamplerScheduler` serves models on a betas (VP) schedule. Pipelines keep their latents in the VP
scale (`init_noise_sigma = 1`, `scale_model_input` is the identity, and `add_noise` is DDPM's), so
text-to-image, img2img (strength), inpaint, ControlNet and SDXL pipelines run unchanged; the adapter
converts to the VE sigma form at its boundary.

`FlowSamplerScheduler` serves flow-matching models (SD3, Flux, Sana; `samplers.flow`) with
`FlowMatchEulerDiscreteScheduler`'s interface: `set_timesteps(num_inference_steps, device, sigmas, mu,
timesteps)`, timesteps `sigma * num_train_timesteps`, `scale_noise` for img2img, the config entries the
pipelines read for the dynamic shift. Latents, sigmas and the solvers are all in the flow form.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin, SchedulerOutput
from diffusers.utils.torch_utils import randn_tensor

from ._loop import trace, zero_noise
from .denoiser import PREDICTION_TYPES, NoiseSchedule, alpha_from_sigma, dynamic_threshold, model_output_to_x0
from .flow import FlowSchedule
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
# Entries of a flow-matching base scheduler's config that `FlowSamplerScheduler` keeps: its schedule
# (`FlowSchedule`) and what the pipelines read to compute the dynamic shift mu
FLOW_CONFIG_KEYS = (
    "num_train_timesteps",
    "shift",
    "use_dynamic_shifting",
    "time_shift_type",
    "shift_terminal",
    "base_shift",
    "max_shift",
    "base_image_seq_len",
    "max_image_seq_len",
)


@dataclass
class SamplerSchedulerOutput(SchedulerOutput):
    """`prev_sample` (VP scale, for the next model call) and the x0 the step used."""

    pred_original_sample: torch.Tensor | None = None


class _SolverAdapter(SchedulerMixin, ConfigMixin):
    """What both adapters share: the plan of model calls a sampler makes on a schedule, and `step()`
    advancing its solver generator by one call. A subclass builds the schedule (`set_timesteps`) and
    converts between the pipeline's latents and model output and the solver's state and x0."""

    config_name = "scheduler_config.json"
    _compatibles = []
    # the solver state and sigmas are in the flow-matching form
    flow = False

    def _checked_options(self, sampler_options: dict | None) -> dict:
        options = dict(sampler_options or {})
        options.pop("backend", None)
        check_sampler_args(self.config.sampler, self.config.num_steps, self.config.schedule, options, flow=self.flow)
        return options

    def _setup(self, noise_schedule, options: dict):
        self.options = options
        self.noise_schedule = noise_schedule
        self.order = SAMPLERS[self.config.sampler].calls_per_step
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = None
        self.sigmas = None
        self._plan: list[tuple[float, int]] = []
        self._schedule_sigmas = None
        self._begin_index = None
        self._reset()

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

    def _set_plan(self, schedule_sigmas: torch.Tensor, device) -> None:
        """Take `schedule_sigmas` for the next run: the model calls the sampler makes on them and their timesteps."""
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
                                  begin=begin, noise_schedule=self.noise_schedule, flow=self.flow))

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

    def _solver_inputs(self, model_output: torch.Tensor, sample: torch.Tensor, sigma: float):
        """The solver's state and x0 at `sigma` from the pipeline's latents and model output (working dtype)."""
        raise NotImplementedError

    def _latents(self, x: torch.Tensor, sigma: float) -> torch.Tensor:
        """The pipeline's latents for the solver's state `x` at `sigma`."""
        raise NotImplementedError

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
        sigma, _ = self._plan[index]
        x, x0 = self._solver_inputs(model_output, sample, sigma)
        self._generator = generator
        if self._solver is None:
            first_step = self._plan[index][1]
            sigmas = self._schedule_sigmas[first_step:]
            begin = index == 0
            if not begin and len(self._trace(sigmas, begin=False)) != len(self._plan) - index:
                raise RuntimeError("the sampler's calls from this begin_index do not match the pipeline's timesteps")
            self._solver = solver_steps(self.config.sampler, x, sigmas, self.options,
                                        noise_sampler=self._noise_sampler(x), begin=begin,
                                        noise_schedule=self.noise_schedule, flow=self.flow)
            next(self._solver)
        try:
            x_next, sigma_next, _ = self._solver.send((x, x0))
        except StopIteration as stop:
            x_next, sigma_next = stop.value, float(self._schedule_sigmas[-1])
            self._solver = None
        prev_sample = self._latents(x_next, sigma_next).to(sample.dtype)
        if not return_dict:
            return (prev_sample,)
        return SamplerSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0.to(sample.dtype))


class SamplerScheduler(_SolverAdapter):
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
        options = self._checked_options(sampler_options)
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type={prediction_type!r} is not supported; valid choices: {PREDICTION_TYPES}")
        if clip_sample:
            raise ValueError("clip_sample=True is not supported; use the option thresholding=True")
        self._setup(NoiseSchedule.from_config(self.config), options)

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
        self._set_plan(schedule_sigmas, device)

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps) -> torch.Tensor:
        """DDPM forward noising `alpha * x0 + sigma_vp * noise` at train timesteps `timesteps`."""
        sigma = self._sigma_for_timesteps(timesteps)
        alpha = alpha_from_sigma(sigma)
        shape = (-1,) + (1,) * (original_samples.dim() - 1)
        work = original_samples.dtype if original_samples.dtype in (torch.float32, torch.float64) else torch.float32
        alpha = alpha.reshape(shape).to(original_samples.device, work)
        sigma_vp = (sigma * alpha_from_sigma(sigma)).reshape(shape).to(original_samples.device, work)
        return (alpha * original_samples.to(work) + sigma_vp * noise.to(work)).to(original_samples.dtype)

    def _solver_inputs(self, model_output, sample, sigma):
        # half-precision pipelines: the solver state is float32, like diffusers' schedulers
        work_dtype = sample.dtype if sample.dtype in (torch.float32, torch.float64) else torch.float32
        x_vp = sample.to(work_dtype)
        alpha = alpha_from_sigma(sigma)
        x0 = model_output_to_x0(model_output.to(work_dtype), x_vp, alpha, sigma * alpha, self.config.prediction_type)
        if self.options.get("thresholding", False):
            x0 = dynamic_threshold(
                x0, self.options.get("dynamic_thresholding_ratio", 0.995), self.options.get("sample_max_value", 1.0)
            )
        return x_vp / alpha, x0

    def _latents(self, x, sigma):
        return x * alpha_from_sigma(sigma)


class FlowSamplerScheduler(_SolverAdapter):
    """Run sampler `sampler` with step schedule `schedule` inside a flow-matching pipeline (SD3, Flux,
    Sana), where `FlowMatchEulerDiscreteScheduler` (or DPM-Solver / UniPC with `use_flow_sigmas`) ran.

    Args:
        num_train_timesteps, shift, use_dynamic_shifting, time_shift_type, shift_terminal: the model's
            flow schedule (copied from the pipeline's scheduler; see `samplers.flow.FlowSchedule`).
        base_shift, max_shift, base_image_seq_len, max_image_seq_len: read by the pipelines to compute
            the dynamic shift `mu`.
        sampler: one of `samplers.registry.FLOW_SAMPLER_NAMES`.
        schedule: "default" (the sigmas diffusers' scheduler of the sampler's kind gives on this shift:
            FlowMatch Euler's for Euler, Heun, DDIM, PNDM; DPM-Solver's with `use_flow_sigmas` for
            DPM-Solver++ and OLSS; UniPC's for UniPC) or "explicit" (the option `sigmas=[...]`, final flow
            sigmas, or `timesteps=[...]`, `sigma * num_train_timesteps`).
        num_steps: steps when `set_timesteps` gets none.
        sampler_options: the sampler's options (see `samplers.make_scheduler`).
    """

    flow = True

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        time_shift_type: str = "exponential",
        shift_terminal: float | None = None,
        base_shift: float = 0.5,
        max_shift: float = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        sampler: str = "dpmpp_2m",
        schedule: str = "default",
        num_steps: int | None = None,
        sampler_options: dict | None = None,
    ):
        options = self._checked_options(sampler_options)
        self._setup(FlowSchedule.from_config(self.config).with_spacing(SAMPLERS[sampler].flow_spacing), options)

    @classmethod
    def from_base(cls, base, *, sampler: str, schedule: str = "default", num_steps=None, options=None):
        """An adapter on the flow schedule of `base`, a flow-matching scheduler (or its config)."""
        base_config = dict(base.config if hasattr(base, "config") else base)
        schedule_of_base = FlowSchedule.from_config(base_config)  # raises for what it cannot reproduce
        config = {k: base_config[k] for k in FLOW_CONFIG_KEYS if k in base_config}
        config["shift"] = schedule_of_base.shift
        return cls(
            **config, sampler=sampler, schedule=schedule, num_steps=num_steps, sampler_options=dict(options or {})
        )

    def set_timesteps(self, num_inference_steps: int | None = None, device=None, sigmas=None, mu: float | None = None,
                      timesteps=None):
        """Build the schedule and the list of model calls the sampler makes on it.

        As in `FlowMatchEulerDiscreteScheduler`, `sigmas` (Flux's pipeline passes `linspace(1, 1 / n, n)`)
        and `timesteps` (`sigmas * num_train_timesteps`) are unshifted and go through the shift, `mu`
        being the dynamic one. An explicit (or tuned) schedule is final: the pipeline's sigmas and mu are
        not used then, only their count is checked.
        """
        given = None
        if sigmas is not None:
            given = [float(s) for s in sigmas]
        elif timesteps is not None:
            given = [float(t) / self.config.num_train_timesteps for t in timesteps]
        if num_inference_steps is not None and given is not None and num_inference_steps != len(given):
            raise ValueError(f"num_inference_steps={num_inference_steps} disagrees with the {len(given)} sigmas given")
        n = len(given) if given is not None else num_inference_steps
        if resolve_schedule(self.config.sampler, self.config.schedule) == "explicit":
            schedule_sigmas = get_sigmas("explicit", None, self.noise_schedule, timesteps=self.options.get("timesteps"),
                                         sigmas=self.options.get("sigmas"))
            length = len(schedule_sigmas) - 1
            if n is not None and n != length:
                raise ValueError(f"this scheduler has an explicit schedule of {length} steps; call the pipeline with "
                                 f"num_inference_steps={length}, not {n}")
        else:
            n = n if n is not None else self.config.num_steps
            if given is None and (n is None or isinstance(n, bool) or int(n) != n or n < 1):
                raise ValueError(f"num_inference_steps must be a positive int, got {n!r}")
            schedule_sigmas = self.noise_schedule.sigmas(n, mu=mu, sigmas=given)
        self._set_plan(schedule_sigmas, device)

    def scale_noise(self, sample: torch.Tensor, timestep, noise: torch.Tensor) -> torch.Tensor:
        """Flow matching's forward process `sigma * noise + (1 - sigma) * sample` (img2img): at the call the
        pipeline set with `set_begin_index` (or the run has reached), else at `timestep`."""
        index = self._step_index if self._step_index is not None else self._begin_index
        if index is not None:
            sigma = torch.full((sample.shape[0],), self._plan[index][0], dtype=torch.float64)
        else:
            sigma = self._sigma_for_timesteps(timestep).expand(sample.shape[0])
        sigma = sigma.reshape((-1,) + (1,) * (sample.dim() - 1)).to(sample.device, sample.dtype)
        return sigma * noise + (1.0 - sigma) * sample

    def _solver_inputs(self, model_output, sample, sigma):
        work_dtype = sample.dtype if sample.dtype in (torch.float32, torch.float64) else torch.float32
        x = sample.to(work_dtype)
        return x, x - sigma * model_output.to(work_dtype)

    def _latents(self, x, sigma):
        return x
