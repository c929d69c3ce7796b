"""Sampler swap: replace the pipeline's scheduler with a fast ODE solver from `samplers`.

Fewer network evaluations per image (DPM-Solver++, Lu et al. 2022; UniPC, Zhao et al. 2023):
the solver and its step schedule come from `samplers.make_scheduler`; `num_steps` becomes the
default `num_inference_steps` of every call that does not pass its own. On a flow-matching pipeline
(SD3, Flux, Sana) the same names run in the flow form (`samplers.flow`); a sampler, schedule or
option that does not apply there is refused when the config is applied, saying why.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any, Mapping

from .errors import check_choice


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


class SamplerSwap:
    """The applied sampler: the pipeline's own scheduler is kept and put back by `remove()`."""

    def __init__(self, pipe, config: SamplerConfig, session):
        import samplers

        scheduler = samplers.make_scheduler(
            config.name, num_steps=config.num_steps, schedule=config.schedule, base=pipe.scheduler, **config.options
        )
        self.pipe, self.session, self.original = pipe, session, pipe.scheduler
        pipe.scheduler = scheduler
        if config.num_steps is not None:
            session.call_defaults["num_inference_steps"] = config.num_steps

    def remove(self) -> None:
        self.pipe.scheduler = self.original
        self.session.call_defaults.pop("num_inference_steps", None)
