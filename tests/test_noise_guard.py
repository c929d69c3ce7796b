"""The caches' guard against samplers that add fresh noise at every step: one warning per pipeline call, no refusal.

Which schedulers inject noise is checked on scheduler objects (diffusers' and this suite's `SamplerScheduler`,
whose solver is dry-run on the call's schedule); the warning itself on tiny pipelines.
"""

import logging

import numpy as np
import pytest
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from tiny import run, tiny_flux_pipeline

import accel
import samplers
from accel import AccelConfig
from accel.cache import BlockCacheConfig, DeepCacheConfig, EncoderPropagationConfig
from accel.cache._noise_guard import noise_source

WARNING = "adds fresh noise at every step: the step-to-step change the cache decides from and reuses includes fresh noise"


def _sampler(name, **options):
    scheduler = samplers.make_scheduler(name, **options)
    scheduler.set_timesteps(6)
    return scheduler


@pytest.mark.parametrize("scheduler, arguments, source", [
    (EulerAncestralDiscreteScheduler(), {}, "EulerAncestralDiscreteScheduler"),
    (DDPMScheduler(), {}, "DDPMScheduler"),
    (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), {},
     "DPMSolverMultistepScheduler(algorithm_type='sde-dpmsolver++')"),
    (FlowMatchEulerDiscreteScheduler(stochastic_sampling=True), {}, "FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)"),
    (DDIMScheduler(), {"eta": 0.5}, "DDIMScheduler with eta=0.5"),
    (_sampler("dpmpp_2m_sde"), {}, "the sampler 'dpmpp_2m_sde'"),
    (_sampler("ddim", eta=0.3), {}, "the sampler 'ddim'"),
    (_sampler("lcm"), {}, "the sampler 'lcm'"),
    (EulerDiscreteScheduler(), {"eta": 0.5}, None),  # its step takes no eta: the pipeline passes none
    (DPMSolverMultistepScheduler(), {}, None),
    (FlowMatchEulerDiscreteScheduler(), {}, None),
    (DDIMScheduler(), {"eta": 0.0}, None),
    (_sampler("dpmpp_2m_sde", eta=0.0), {}, None),
    (_sampler("dpmpp_2m"), {}, None),
    (samplers.make_scheduler("dpmpp_2m_sde"), {}, None),  # before set_timesteps: no schedule to dry-run yet
])
def test_noise_source(scheduler, arguments, source):
    assert noise_source(scheduler, arguments) == source


def _warnings(caplog) -> list[str]:
    return [r.message for r in caplog.records if WARNING in r.message]


@pytest.mark.parametrize("cache, name", [(DeepCacheConfig(cache_interval=2), "deepcache"),
                                         (EncoderPropagationConfig(), "encoder_propagation"),
                                         (BlockCacheConfig(threshold=0.5), "block_cache")])
def test_each_cache_warns_once_per_call_with_an_ancestral_sampler(cache, name, sd_pipe, caplog):
    sd_pipe.scheduler = EulerAncestralDiscreteScheduler.from_config(sd_pipe.scheduler.config)
    accel.accelerate(sd_pipe, AccelConfig(cache=cache))
    with caplog.at_level(logging.WARNING):
        outs = [run(sd_pipe, steps=4) for _ in range(2)]
    accel.restore(sd_pipe)
    lines = _warnings(caplog)
    assert len(lines) == 2 and all(line.startswith(f"accel: {name} with EulerAncestralDiscreteScheduler,") for line in lines)
    assert all(np.isfinite(out).all() for out in outs)  # warned, not refused


def test_ddim_warns_for_the_calls_with_eta_only_and_a_swapped_scheduler_is_seen(sd_pipe, caplog):
    accel.accelerate(sd_pipe, AccelConfig(cache=BlockCacheConfig(threshold=0.5)))
    with caplog.at_level(logging.WARNING):
        run(sd_pipe, steps=4)
        run(sd_pipe, steps=4, eta=0.5)
        assert [line.split(",")[0] for line in _warnings(caplog)] == ["accel: block_cache with DDIMScheduler with eta=0.5"]
        sd_pipe.scheduler = DPMSolverMultistepScheduler.from_config(sd_pipe.scheduler.config, algorithm_type="sde-dpmsolver++")
        run(sd_pipe, steps=4)
    accel.restore(sd_pipe)
    assert len(_warnings(caplog)) == 2 and "algorithm_type='sde-dpmsolver++'" in _warnings(caplog)[1]


def test_a_stochastic_sampler_from_sampler_config_warns(sd_pipe, caplog):
    accel.accelerate(sd_pipe, AccelConfig(sampler=accel.SamplerConfig("dpmpp_2m_sde"), cache=DeepCacheConfig()))
    with caplog.at_level(logging.WARNING):
        run(sd_pipe, steps=4)
    accel.restore(sd_pipe)
    assert [line.split(",")[0] for line in _warnings(caplog)] == ["accel: deepcache with the sampler 'dpmpp_2m_sde'"]


def test_flux_with_stochastic_flow_matching_warns_and_a_deterministic_one_does_not(tmp_path, caplog):
    pipe = tiny_flux_pipeline(tmp_path)
    accel.accelerate(pipe, AccelConfig(cache=BlockCacheConfig(threshold=None, cache_interval=2)))
    with caplog.at_level(logging.WARNING):
        run(pipe, steps=4, max_sequence_length=16)
        assert not _warnings(caplog)
        pipe.scheduler = FlowMatchEulerDiscreteScheduler(stochastic_sampling=True)
        run(pipe, steps=4, max_sequence_length=16)
    accel.restore(pipe)
    assert len(_warnings(caplog)) == 1 and "stochastic_sampling=True" in _warnings(caplog)[0]
