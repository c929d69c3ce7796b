"""Sampler names -> the solver generators and pure functions that implement them."""

from __future__ import annotations

from functools import partial

from .deis import deis_steps, sample_deis
from .dpm_solver import (
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
from .lcm import lcm_steps, sample_lcm
from .olss_solver import olss_steps, sample_olss
from .pndm import ipndm_steps, pndm_steps, sample_ipndm, sample_pndm
from .unipc import sample_unipc, unipc_steps

# name -> pure function `sample_x(denoiser, x, sigmas, *, extra_args, callback, disable, ...)`
SAMPLER_FUNCTIONS = {
    "ddim": sample_ddim,
    "euler": sample_euler,
    "heun": sample_heun,
    "dpm_solver_1": partial(sample_dpm_solver_singlestep, order=1),
    "dpm_solver_2": partial(sample_dpm_solver_singlestep, order=2),
    "dpm_solver_3": partial(sample_dpm_solver_singlestep, order=3),
    "dpm_solver_2m": partial(sample_dpm_solver_multistep, order=2),
    "dpm_solver_3m": partial(sample_dpm_solver_multistep, order=3),
    "dpmpp_2m": sample_dpmpp_2m,
    "dpmpp_3m": sample_dpmpp_3m,
    "dpmpp_2s": sample_dpmpp_2s,
    "dpmpp_sde": sample_dpmpp_sde,
    "dpmpp_2m_sde": sample_dpmpp_2m_sde,
    "unipc_bh1": partial(sample_unipc, variant="bh1"),
    "unipc_bh2": partial(sample_unipc, variant="bh2"),
    "deis": sample_deis,
    "pndm": sample_pndm,
    "ipndm": sample_ipndm,
    "lcm": sample_lcm,
    "olss": sample_olss,
}

# Options that only shape the schedule or the model output, never the solver's update
SCHEDULE_OPTIONS = (
    "timesteps",
    "sigmas",
    "tuned",
    "model_dir",
    "rho",
    "thresholding",
    "dynamic_thresholding_ratio",
    "sample_max_value",
    "backend",
    "original_inference_steps",
)


def solver_steps(name: str, x, sigmas, options: dict, *, noise_sampler=None, generator=None, begin: bool = True,
                 noise_schedule=None):
    """The solver generator of sampler `name` (see `samplers._loop`) with its options.

    `noise_schedule` (a `NoiseSchedule`) is for samplers that need train timesteps (LCM's
    boundary condition).

    `begin=False` marks a run that starts part-way (img2img): solvers whose warm-up costs extra
    denoiser calls (PNDM) warm up with lower-order steps instead, so every step costs the same.
    """
    o = {k: v for k, v in options.items() if k not in SCHEDULE_OPTIONS}
    lof = o.get("lower_order_final", True)
    solver_type = o.get("solver_type", "midpoint")
    noise = {"noise_sampler": noise_sampler, "generator": generator}
    if name == "ddim":
        return ddim_steps(x, sigmas, o.get("eta", 0.0), **noise)
    if name == "euler":
        return euler_steps(x, sigmas)
    if name == "heun":
        return heun_steps(x, sigmas)
    if name.startswith("dpm_solver_") and name[-1] != "m":
        return dpm_solver_singlestep_steps(x, sigmas, int(name[-1]), False, solver_type, lof)
    if name in ("dpm_solver_2m", "dpm_solver_3m", "dpmpp_2m", "dpmpp_3m"):
        return dpm_solver_multistep_steps(x, sigmas, int(name[-2]), name.startswith("dpmpp"), solver_type, lof,
                                          o.get("diffusers_3m", False))
    if name == "dpmpp_2s":
        return dpm_solver_singlestep_steps(x, sigmas, 2, True, solver_type, lof)
    if name == "dpmpp_sde":
        return dpmpp_sde_steps(x, sigmas, o.get("eta", 1.0), o.get("r", 0.5), **noise)
    if name == "dpmpp_2m_sde":
        return dpmpp_2m_sde_steps(x, sigmas, o.get("eta", 1.0), solver_type, lof, **noise)
    if name in ("unipc_bh1", "unipc_bh2"):
        return unipc_steps(x, sigmas, o.get("order", 2), name[-3:], o.get("use_corrector", True), lof, o.get("orders"))
    if name == "deis":
        return deis_steps(x, sigmas, o.get("order", 2), lof)
    if name == "pndm":
        return pndm_steps(x, sigmas, pseudo_warmup=begin)
    if name == "ipndm":
        return ipndm_steps(x, sigmas, o.get("order", 4))
    if name == "lcm":
        return lcm_steps(x, sigmas, **noise, timestep_scaling=o.get("timestep_scaling", 10.0),
                         noise_schedule=noise_schedule)
    if name == "olss":
        return olss_steps(x, sigmas, o.get("coefficients"), begin=begin)
    raise ValueError(f"sampler {name!r} is not supported; valid choices: {tuple(SAMPLER_FUNCTIONS)}")
