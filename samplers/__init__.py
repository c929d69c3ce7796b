"""Fast ODE/SDE solvers for diffusion models as pure functions, their step schedules, and a
diffusers scheduler adapter (k-diffusion style: `sample_x(denoiser, x, sigmas, ...)`)."""

from .api import SAMPLER_NAMES, SAMPLERS, SCHEDULE_NAMES, check_sampler_args, make_scheduler, sample
from .deis import sample_deis
from .denoiser import NoiseSchedule, UNetDenoiser, dynamic_threshold, model_output_to_x0
from .dpm_solver import (
    sample_dpm_solver_multistep,
    sample_dpm_solver_singlestep,
    sample_dpmpp_2m,
    sample_dpmpp_2m_sde,
    sample_dpmpp_2s,
    sample_dpmpp_3m,
    sample_dpmpp_sde,
)
from .euler import sample_ddim, sample_euler, sample_heun
from .evaluate import format_table, psnr, sampler_table
from .flow import FlowDenoiser, FlowSchedule, calculate_shift, is_flow_config
from .lcm import sample_lcm
from .olss import ReferenceTrajectory, fit_olss_coefficients
from .olss_solver import dpmpp_2m_coefficients, sample_olss
from .pndm import sample_ipndm, sample_pndm
from .registry import FLOW_SAMPLER_NAMES, SAMPLER_FUNCTIONS
from .scheduler import FlowSamplerScheduler, SamplerScheduler
from .schedules import (
    get_sigmas,
    get_sigmas_exponential,
    get_sigmas_karras,
    get_sigmas_logsnr,
    get_timesteps_uniform,
    sigmas_from_timesteps,
)
from .tuned import (
    CFGDenoiser,
    TunedSchedule,
    load_tuned_schedule,
    save_tuned_schedule,
    tune_pipeline_schedule,
    tune_schedule,
    tuned_schedule_path,
)
from .unipc import sample_unipc

__all__ = [
    "CFGDenoiser",
    "TunedSchedule",
    "load_tuned_schedule",
    "save_tuned_schedule",
    "tune_pipeline_schedule",
    "tune_schedule",
    "tuned_schedule_path",
    "FLOW_SAMPLER_NAMES",
    "FlowDenoiser",
    "FlowSamplerScheduler",
    "FlowSchedule",
    "calculate_shift",
    "is_flow_config",
    "SAMPLER_FUNCTIONS",
    "SAMPLER_NAMES",
    "SAMPLERS",
    "SCHEDULE_NAMES",
    "NoiseSchedule",
    "SamplerScheduler",
    "UNetDenoiser",
    "check_sampler_args",
    "dynamic_threshold",
    "format_table",
    "psnr",
    "sampler_table",
    "get_sigmas",
    "get_sigmas_exponential",
    "get_sigmas_karras",
    "get_sigmas_logsnr",
    "get_timesteps_uniform",
    "make_scheduler",
    "model_output_to_x0",
    "sample",
    "sample_ddim",
    "sample_deis",
    "sample_dpm_solver_multistep",
    "sample_dpm_solver_singlestep",
    "sample_dpmpp_2m",
    "sample_dpmpp_2m_sde",
    "sample_dpmpp_2s",
    "sample_dpmpp_3m",
    "sample_dpmpp_sde",
    "sample_euler",
    "sample_heun",
    "sample_ipndm",
    "sample_lcm",
    "sample_olss",
    "ReferenceTrajectory",
    "dpmpp_2m_coefficients",
    "fit_olss_coefficients",
    "sample_pndm",
    "sample_unipc",
    "sigmas_from_timesteps",
]
