"""Each sampler name mapped onto the matching diffusers scheduler (the reference implementations).

`make_diffusers_scheduler` is the `backend="diffusers"` path of `samplers.make_scheduler` and the
reference the agreement tests compare our pure-function samplers with.
"""

from __future__ import annotations

import inspect
from typing import Any

from diffusers import (
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    HeunDiscreteScheduler,
    LCMScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)

from .flow import FlowSchedule

# diffusers' noise-prediction DPM-Solver cannot step to sigma = 0
_NOISE = {"final_sigmas_type": "sigma_min"}

# name -> (scheduler class, fixed config entries)
DIFFUSERS_EQUIVALENT: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm_solver_1": (DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver", "solver_order": 1, **_NOISE}),
    "dpm_solver_2": (DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver", "solver_order": 2, **_NOISE}),
    "dpm_solver_3": (DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver", "solver_order": 3, **_NOISE}),
    "dpm_solver_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver", "solver_order": 2, **_NOISE}),
    "dpm_solver_3m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver", "solver_order": 3, **_NOISE}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_3m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "dpmpp_2s": (DPMSolverSinglestepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "unipc_bh1": (UniPCMultistepScheduler, {"solver_type": "bh1"}),
    "unipc_bh2": (UniPCMultistepScheduler, {"solver_type": "bh2"}),
    "deis": (DEISMultistepScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "lcm": (LCMScheduler, {}),
}

_FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}

# name -> (scheduler class, fixed config entries) on a flow-matching model
DIFFUSERS_FLOW_EQUIVALENT: dict[str, tuple[type, dict[str, Any]]] = {
    "euler": (FlowMatchEulerDiscreteScheduler, {}),
    "heun": (FlowMatchHeunDiscreteScheduler, {}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2, **_FLOW}),
    "dpmpp_3m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 3, **_FLOW}),
    "unipc_bh1": (UniPCMultistepScheduler, {"solver_type": "bh1", **_FLOW}),
    "unipc_bh2": (UniPCMultistepScheduler, {"solver_type": "bh2", **_FLOW}),
}

# schedule -> config entries; None where the scheduler class has no such switch
_SCHEDULE_CONFIG = {
    "default": {},
    "linspace": {"timestep_spacing": "linspace"},
    "leading": {"timestep_spacing": "leading"},
    "trailing": {"timestep_spacing": "trailing"},
    "karras": {"use_karras_sigmas": True},
    "exponential": {"use_exponential_sigmas": True},
    # uniform in log-SNR is uniform in log(sigma): exponential sigmas (DPM-Solver's lu lambdas too)
    "logsnr": {"use_exponential_sigmas": True},
    "lcm": {},  # LCMScheduler's own timesteps
}

# options passed straight into the diffusers config
_OPTION_TO_CONFIG = {
    "order": "solver_order",
    "thresholding": "thresholding",
    "dynamic_thresholding_ratio": "dynamic_thresholding_ratio",
    "sample_max_value": "sample_max_value",
    "lower_order_final": "lower_order_final",
    "solver_type": "solver_type",
    "timestep_scaling": "timestep_scaling",
    "original_inference_steps": "original_inference_steps",
}


def _flow_config(base, accepted: set[str]) -> dict[str, Any]:
    """A flow-matching base scheduler's schedule in the config entries that a flow scheduler class accepts."""
    schedule = FlowSchedule.from_config(base)
    config = dict(base.config)
    config.update(num_train_timesteps=schedule.num_train_timesteps, shift=schedule.shift, flow_shift=schedule.shift,
                  use_dynamic_shifting=schedule.use_dynamic_shifting, time_shift_type=schedule.time_shift_type)
    return {k: v for k, v in config.items() if k in accepted}


def make_diffusers_scheduler(name: str, schedule: str, base, options: dict[str, Any], flow: bool = False):
    """The diffusers scheduler equivalent to sampler `name` on `base`'s noise schedule (`flow`: its
    flow-matching one)."""
    table = DIFFUSERS_FLOW_EQUIVALENT if flow else DIFFUSERS_EQUIVALENT
    if name not in table:
        valid = ", ".join(repr(n) for n in table)
        raise ValueError(
            f"sampler {name!r} has no diffusers equivalent{' on a flow-matching model' if flow else ''}; valid "
            f"choices for backend='diffusers': {valid}"
        )
    if schedule == "lcm" and name != "lcm":
        raise ValueError("schedule='lcm' is only supported by backend='samplers' for samplers other than 'lcm'")
    cls, fixed = table[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
    config = _flow_config(base, accepted) if flow else dict(base.config) if base is not None else {}
    config.update(fixed)
    extra = dict(_SCHEDULE_CONFIG[schedule])
    for key, value in options.items():
        if key == "use_corrector":
            extra["disable_corrector"] = [] if value else list(range(10_000))
        elif key in _OPTION_TO_CONFIG:
            extra[_OPTION_TO_CONFIG[key]] = value
        else:
            raise ValueError(f"option {key!r} is not supported with backend='diffusers'; valid choices: "
                             + ", ".join(repr(k) for k in (*_OPTION_TO_CONFIG, "use_corrector")))
    for key in extra:
        if key not in accepted:
            raise ValueError(
                f"{cls.__name__} has no {key!r} (needed by schedule={schedule!r} / options); "
                "use the default backend, which supports every schedule"
            )
    config.update(extra)
    return cls.from_config(config)
