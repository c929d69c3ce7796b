"""The session's plan of each denoiser call, technique state on the session, conflicts, process settings."""

import inspect
import os

import pytest
import torch
from tiny import run

import accel
from accel import AccelConfig, DeepCacheConfig, EncoderPropagationConfig, LCMLoRAConfig, RuntimeConfig, SamplerConfig
from accel.session import get_session, planner_of


def test_one_plan_per_call_with_every_decision_and_the_graph_key(sd_pipe):
    """Each UNet call is planned once: its step, slot and DeepCache decision, which make its graph key part."""
    accel.accelerate(sd_pipe, AccelConfig(cache=DeepCacheConfig(cache_interval=2)))
    planner = planner_of(sd_pipe.unet)
    plans = []
    handle = sd_pipe.unet.register_forward_pre_hook(lambda m, a: plans.append(planner.current))  # after the planner's
    run(sd_pipe, steps=4)
    handle.remove()
    assert [p.step for p in plans] == [0, 1, 2, 3] and {p.slot for p in plans} == {0}
    assert [p.decisions["deepcache"][0] for p in plans] == ["full", "cached", "full", "cached"]
    assert all(p.key == (("deepcache", p.decisions["deepcache"]),) and not p.eager for p in plans)
    accel.restore(sd_pipe)
    assert planner_of(sd_pipe.unet) is None and not sd_pipe.unet._forward_pre_hooks


def test_arguments_are_bound_once_per_call(sd_pipe, monkeypatch):
    """No hook binds a UNet call's arguments with inspect: the session binds them once, by name."""
    calls = []
    original = inspect.Signature.bind

    def counted(self, *args, **kwargs):
        calls.append(self)
        return original(self, *args, **kwargs)

    config = AccelConfig(cache=EncoderPropagationConfig(key_steps=(0, 2), parallel_decode=True),
                         runtime=RuntimeConfig(cuda_graph=True))
    with pytest.raises(ValueError, match="parallel_decode"):  # a conflict, refused before anything is applied
        accel.accelerate(sd_pipe, config)
    assert not accel.is_accelerated(sd_pipe)
    accel.accelerate(sd_pipe, AccelConfig(cache=DeepCacheConfig(cache_interval=2), runtime=RuntimeConfig(cuda_graph=True)))
    monkeypatch.setattr(inspect.Signature, "bind", counted)
    run(sd_pipe, steps=3)
    monkeypatch.undo()
    accel.restore(sd_pipe)
    assert calls == []


def test_state_lives_on_the_session_and_nothing_is_left_on_the_modules(sd_pipe):
    runtime = RuntimeConfig(attention="sdpa", fuse_qkv=True, channels_last=True, cuda_graph=True)
    accel.accelerate(sd_pipe, AccelConfig(sampler=SamplerConfig("dpmpp_2m", num_steps=3),
                                          cache=DeepCacheConfig(), runtime=runtime))
    session = get_session(sd_pipe)
    assert set(session.state) == {"sampler", "deepcache", "runtime"}
    assert [k for k in sd_pipe.__dict__ if k.startswith("_accel")] == ["_accel_session"]
    assert not [k for k in sd_pipe.unet.__dict__ if k.startswith("_accel")]
    accel.restore(sd_pipe)
    assert not [k for k in sd_pipe.__dict__ if k.startswith("_accel")]


def test_lcm_lora_next_to_a_sampler_is_refused_before_anything_changes(sd_pipe, tmp_path):
    (tmp_path / "pytorch_lora_weights.safetensors").write_bytes(b"")
    scheduler = sd_pipe.scheduler
    config = AccelConfig(model=LCMLoRAConfig(str(tmp_path)), sampler=SamplerConfig("dpmpp_2m"))
    with pytest.raises(ValueError, match="LCMLoRAConfig sets the sampler .* leave AccelConfig.sampler as None"):
        accel.accelerate(sd_pipe, config)
    assert not accel.is_accelerated(sd_pipe) and sd_pipe.scheduler is scheduler


def test_restore_puts_back_the_process_settings_compile_changed(sd_pipe, monkeypatch):
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    limit = torch._dynamo.config.recompile_limit
    accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(compile="regional", compile_workers=0)))
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"].endswith("inductor") and torch._dynamo.config.recompile_limit >= 64
    accel.restore(sd_pipe)
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ and torch._dynamo.config.recompile_limit == limit


def test_prior_noise_adds_the_initial_latent_from_its_step_on(sd_pipe):
    """z_t <- z_t + scale * z_T at the start of every step from `prior_noise_from` on, z_T being the pipeline's
    own initial latent; a user's step-end callback sees the injected latent."""
    seen = []

    def callback(pipe, step, timestep, kwargs):
        seen.append(kwargs["latents"].clone())
        return kwargs

    latents = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1))
    base = dict(prompt="a", num_inference_steps=4, height=32, width=32, output_type="latent", latents=latents.clone())
    accel.accelerate(sd_pipe, AccelConfig(cache=EncoderPropagationConfig(key_interval=1)))
    sd_pipe(**base, callback_on_step_end=callback)
    accel.restore(sd_pipe)
    plain, seen[:] = list(seen), []
    accel.accelerate(sd_pipe, AccelConfig(cache=EncoderPropagationConfig(key_interval=1, prior_noise=0.5,
                                                                         prior_noise_from=0.5)))
    sd_pipe(**base, callback_on_step_end=callback)
    accel.restore(sd_pipe)
    assert torch.equal(seen[0], plain[0])  # the step after 0 is before half the steps: nothing added
    torch.testing.assert_close(seen[1], plain[1] + 0.5 * latents, rtol=0, atol=1e-6)  # step 2 starts injected
    assert not torch.allclose(seen[2], plain[2]) and len(seen) == 4
