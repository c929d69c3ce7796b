"""Sampler swap: replace the pipeline's scheduler with a fast ODE solver from `samplers`.

Fewer network evaluations per image (DPM-Solver++, Lu et al. 2022; UniPC, Zhao et al. 2023):
the solver and its step schedule come from `samplers.make_scheduler`; `num_steps` becomes the
default `num_inference_steps` of every call that does not pass its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .errors import check_choice
from .session import get_session

_ORIGINAL = "_accel_original_scheduler"


@dataclass(frozen=True)
class SamplerConfig:
    name: str = "dpmpp_2m"
    num_steps: int | None = None
    schedule: str = "default"
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        import samplers

        check_choice("SamplerConfig.name", self.name, samplers.SAMPLER_NAMES)
        check_choice("SamplerConfig.schedule", self.schedule, samplers.SCHEDULE_NAMES)
        if self.num_steps is not None and (not isinstance(self.num_steps, int) or self.num_steps < 1):
            raise ValueError(f"SamplerConfig.num_steps must be a positive int or None, got {self.num_steps!r}")
        # A read-only copy: the caller's dict is never aliased or changed.
        object.__setattr__(self, "options", MappingProxyType(dict(self.options)))
        samplers.check_sampler_args(self.name, self.num_steps, self.schedule, dict(self.options))


def apply_sampler(pipe, config: SamplerConfig) -> None:
    import samplers

    if _ORIGINAL in pipe.__dict__:
        raise RuntimeError("a sampler is already applied to this pipeline; call remove_sampler first")
    scheduler = samplers.make_scheduler(
        config.name, num_steps=config.num_steps, schedule=config.schedule, base=pipe.scheduler, **config.options
    )
    pipe.__dict__[_ORIGINAL] = pipe.scheduler
    pipe.scheduler = scheduler
    session = get_session(pipe)
    if session is not None and config.num_steps is not None:
        session.call_defaults["num_inference_steps"] = config.num_steps


def remove_sampler(pipe) -> None:
    if _ORIGINAL not in pipe.__dict__:
        raise RuntimeError("no sampler was applied to this pipeline")
    pipe.scheduler = pipe.__dict__.pop(_ORIGINAL)
    session = get_session(pipe)
    if session is not None:
        session.call_defaults.pop("num_inference_steps", None)
