"""Flow matching (Lipman et al. 2023, "Flow Matching for Generative Modeling"; rectified flow, Liu et al.
2023) as Stable Diffusion 3 (Esser et al. 2024), Flux and Sana sample it: the denoiser form and the step
schedules.

A flow-matching model sees `x = (1 - s) * x0 + s * noise` at the flow sigma `s` in [0, 1] and predicts the
velocity `v = noise - x0`, so its denoiser is `D(x, s) = x - s * v`. The probability-flow ODE
`dx/ds = (x - D) / s` has the same form as the VE one, so Euler, Heun and the linear multistep samplers run
on flow states and sigmas unchanged (Euler is diffusers' `FlowMatchEulerDiscreteScheduler`, Heun its
`FlowMatchHeunDiscreteScheduler`), and the exponential integrators (DPM-Solver++, UniPC, OLSS) take the
signal scale alpha = 1 - s (`samplers._loop.signal_scales`), whose log-SNR is -inf at s = 1.

A schedule is n sigmas evenly spaced in the unshifted sigma as diffusers' flow schedulers space them
(`FLOW_SPACINGS`), then shifted, `shift * s / (1 + (shift - 1) * s)` (SD3's static shift) or, with dynamic
shifting (Flux), `e^mu / (e^mu + 1 / s - 1)` with `mu` from the image's token count (`calculate_shift`, as
the pipelines compute it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace
from typing import ClassVar

import numpy as np
import torch

from .denoiser import _append_dims, sigma_per_sample
from .schedules import append_zero

# How a scheduler spaces its n unshifted sigmas: FlowMatch Euler / Heun from 1 to their own (shifted)
# sigma_min; DPMSolverMultistep (use_flow_sigmas) from 1 - 1/N in n + 1 points without the last (0); UniPC
# (use_flow_sigmas) from 1 to 1/N in n + 1 points without the last.
FLOW_SPACINGS = ("flow_match", "dpm_solver", "unipc")
TIME_SHIFT_TYPES = ("exponential", "linear")
# base scheduler flags that reshape the sigmas in ways these schedules do not
_UNSUPPORTED_FLAGS = ("invert_sigmas", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas")


def calculate_shift(image_seq_len: int, base_seq_len: int = 256, max_seq_len: int = 4096, base_shift: float = 0.5,
                    max_shift: float = 1.15) -> float:
    """The dynamic shift `mu` of an image of `image_seq_len` tokens: linear in the token count, as the SD3
    and Flux pipelines compute it from the scheduler config's `base_image_seq_len`, `max_image_seq_len`,
    `base_shift` and `max_shift`."""
    slope = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    return image_seq_len * slope + base_shift - slope * base_seq_len


def is_flow_config(config) -> bool:
    """Whether a scheduler (or its config) samples a flow-matching model: diffusers' FlowMatch schedulers
    (a `shift` and no betas), the DPM-Solver / UniPC schedulers with `use_flow_sigmas`, and
    `FlowSamplerScheduler`."""
    config = dict(getattr(config, "config", config) or {})
    return bool(config.get("use_flow_sigmas")) or ("beta_schedule" not in config and "shift" in config)


@dataclass(frozen=True)
class FlowSchedule:
    """A flow-matching model's step schedules: its scheduler's spacing and shift, and `mu` where the
    shift is dynamic (None: given per call). The counterpart of `NoiseSchedule` for `samplers.tuned`."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    shift_terminal: float | None = None
    spacing: str = "flow_match"
    mu: float | None = None
    flow: ClassVar[bool] = True

    def __post_init__(self):
        if self.spacing not in FLOW_SPACINGS:
            raise ValueError(f"spacing={self.spacing!r} is not supported; valid choices: {FLOW_SPACINGS}")
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type={self.time_shift_type!r} is not supported; valid choices: "
                             f"{TIME_SHIFT_TYPES}")

    @classmethod
    def from_config(cls, config, mu: float | None = None) -> "FlowSchedule":
        """The schedule of a flow-matching scheduler's config (FlowMatch Euler / Heun, DPM-Solver or
        UniPC with `use_flow_sigmas`, `FlowSamplerScheduler`)."""
        config = dict(getattr(config, "config", config))
        name = config.get("_class_name", "a flow-matching scheduler")
        for flag in _UNSUPPORTED_FLAGS:
            if config.get(flag):
                raise ValueError(f"{name} has {flag}=True, which reshapes its sigmas; the flow samplers take the "
                                 "evenly spaced, shifted ones: pass schedule='explicit' with sigmas=[...] instead")
        unipc = "disable_corrector" in config  # UniPC's config is the one with a corrector
        spacing = "flow_match" if not config.get("use_flow_sigmas") else "unipc" if unipc else "dpm_solver"
        known = {f.name for f in fields(cls)}
        values = {k: v for k, v in config.items() if k in known and k not in ("spacing", "mu")}
        if "shift" not in config and "flow_shift" in config:
            values["shift"] = config["flow_shift"]
        return cls(**values, spacing=spacing, mu=mu)

    def with_spacing(self, spacing: str) -> "FlowSchedule":
        """The same model's schedule spaced as another scheduler spaces it."""
        return replace(self, spacing=spacing)

    def _shifted(self, unshifted: np.ndarray, mu: float | None) -> np.ndarray:
        if self.use_dynamic_shifting:
            if mu is None:
                raise ValueError("mu must be passed when use_dynamic_shifting is set (the pipeline computes it from "
                                 "the image size: samplers.flow.calculate_shift)")
            scale = math.exp(mu) if self.time_shift_type == "exponential" else mu
            shifted = scale / (scale + (1 / unshifted - 1))
        else:
            shifted = self.shift * unshifted / (1 + (self.shift - 1) * unshifted)
        if self.shift_terminal:
            # stretched so that the last sigma is shift_terminal (LTX-Video's schedule, as diffusers does it)
            shifted = 1 - (1 - shifted) / ((1 - shifted[-1]) / (1 - self.shift_terminal))
        return shifted

    def sigmas(self, n: int, *, mu: float | None = None, sigmas=None) -> torch.Tensor:
        """The scheduler's n sigmas, shifted, then 0 (float64). `sigmas`: unshifted ones to shift instead (as a
        pipeline passes them, e.g. Flux's `linspace(1, 1 / n, n)`); `mu` defaults to this schedule's."""
        mu = self.mu if mu is None else mu
        N = self.num_train_timesteps
        if sigmas is not None:
            unshifted = np.asarray([float(s) for s in sigmas], dtype=np.float64)
        elif n is None or isinstance(n, bool) or int(n) != n or n < 1:
            raise ValueError(f"the number of steps must be a positive int, got {n!r}")
        elif self.spacing == "flow_match":
            # from 1 to the scheduler's own sigma_min: 1/N, shifted once already where the shift is static
            last = 1 / N if self.use_dynamic_shifting else self.shift / N / (1 + (self.shift - 1) / N)
            unshifted = np.linspace(N, last * N, int(n)) / N
        elif self.spacing == "dpm_solver":
            unshifted = (1 - np.linspace(1, 1 / N, int(n) + 1))[::-1][:-1]
        else:
            unshifted = np.linspace(1, 1 / N, int(n) + 1)[:-1]
        if unshifted.ndim != 1 or len(unshifted) < 1 or (unshifted <= 0).any() or (unshifted > 1).any():
            raise ValueError(f"flow sigmas must lie in (0, 1], got {unshifted.tolist()}")
        return append_zero(torch.from_numpy(self._shifted(unshifted, mu).copy()))

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas(1)[0])

    @property
    def sigma_min(self) -> float:
        """The last sigma before 0 of a schedule of num_train_timesteps steps."""
        return float(self.sigmas(self.num_train_timesteps)[-2])

    def sigma_to_t(self, sigma) -> torch.Tensor:
        """The timestep of a flow sigma in the scheduler's scale (what its `timesteps` hold)."""
        return torch.as_tensor(sigma, dtype=torch.float64) * self.num_train_timesteps

    def t_to_sigma(self, t) -> torch.Tensor:
        return torch.as_tensor(t, dtype=torch.float64) / self.num_train_timesteps


class FlowDenoiser:
    """Wrap a flow-matching transformer (velocity prediction) as `denoiser(x, sigma, **cond) -> x0`,
    `x0 = x - sigma * v`, for the samplers run with `flow=True`.

    Args:
        transformer: called as `transformer(hidden_states=x, timestep=sigma * timestep_scale, **cond,
            return_dict=False)[0]` (SD3, Flux, Sana transformers).
        timestep_scale: what the pipeline feeds the transformer per unit of sigma: the scheduler's
            `num_train_timesteps` (1000) for SD3; 1 for Flux, whose pipeline divides the timesteps by 1000;
            1000 times `transformer.config.timestep_scale` for Sana.
        schedule: the model's `FlowSchedule` (for `samplers.tuned`), if known.
    """

    flow = True

    def __init__(self, transformer, *, timestep_scale: float = 1000.0, schedule: FlowSchedule | None = None):
        self.transformer = transformer
        self.timestep_scale = timestep_scale
        self.schedule = schedule

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = sigma_per_sample(sigma, x)
        # the timesteps a pipeline feeds come from the scheduler's float32 list
        timestep = (sigma.detach() * self.timestep_scale).to(torch.float32)
        dtype = getattr(self.transformer, "dtype", x.dtype)
        v = self.transformer(hidden_states=x.to(dtype), timestep=timestep, **cond, return_dict=False)[0].to(x.dtype)
        return x - _append_dims(sigma, x.dim()) * v
