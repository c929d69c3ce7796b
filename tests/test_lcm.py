"""LCM and LCM-LoRA: the sampler against diffusers' LCMScheduler, one distillation step, the LoRA's
save/load round trip, resume, the CLI, and `accelerate` / `restore` with an LCM-LoRA. CPU, tiny
random components, no network."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import LCMScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from PIL import Image
from tiny import run, tiny_sd_pipeline, tiny_sdxl_pipeline

import accel
import samplers
from distill.data import CaptionedImages, encode_captions, encode_latents
from distill.lcm import LCMDistillConfig, LCMDistiller, distill_lcm
from samplers.denoiser import UNetDenoiser
from samplers.lcm import lcm_timesteps

TOL = 1e-4
LINEAR = dict(beta_start=0.0001, beta_end=0.02, beta_schedule="linear")


def _unet(dtype=torch.float32):
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32, norm_num_groups=32,
    ).eval().to(dtype)


def _inputs(dtype):
    g = torch.Generator().manual_seed(1)
    return torch.randn(1, 3, 32, generator=g, dtype=dtype), torch.randn(1, 4, 8, 8, generator=g, dtype=dtype)


def _lcm_loop(scheduler, unet, ehs, noise, seed=3):
    x, generator = noise, torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet(x, t, encoder_hidden_states=ehs).sample
            x = scheduler.step(out, t, x, generator=generator).prev_sample
    return x


def _loss_after_one_step(distiller, batch) -> bool:
    """Whether one training step lowers the distillation loss on this fixed batch."""
    with torch.no_grad():
        before = distiller.loss(batch).item()
    distiller.train_step(batch)
    with torch.no_grad():
        return distiller.loss(batch).item() < before


@pytest.mark.parametrize("n,original", [(1, 50), (4, 50), (8, 50), (3, 20), (50, 50)])
def test_lcm_timesteps_are_lcm_schedulers(n, original):
    reference = LCMScheduler(original_inference_steps=original)
    reference.set_timesteps(n)
    assert lcm_timesteps(n, 1000, original).tolist() == reference.timesteps.tolist()


@pytest.mark.parametrize("scaling,original,n", [(10.0, 50, 4), (0.1, 20, 8)])
def test_pure_lcm_sampler_matches_lcm_scheduler(scaling, original, n):
    unet = _unet(torch.float64)
    ehs, noise = _inputs(torch.float64)
    reference = LCMScheduler(**LINEAR, timestep_scaling=scaling, original_inference_steps=original)
    reference.set_timesteps(n)
    expected = _lcm_loop(reference, unet, ehs, noise)

    schedule = samplers.make_scheduler("lcm", base=reference).noise_schedule
    sigmas = samplers.get_sigmas("lcm", n, schedule, original_inference_steps=original)
    alpha = float((1 + sigmas[0] ** 2) ** -0.5)
    generator = torch.Generator().manual_seed(3)

    def run_ours(timestep_scaling):
        generator.manual_seed(3)
        with torch.no_grad():
            return samplers.sample_lcm(
                UNetDenoiser(unet, reference), noise / alpha, sigmas, extra_args={"encoder_hidden_states": ehs},
                disable=True, timestep_scaling=timestep_scaling,
                # LCMScheduler draws its noise in the sample's dtype (float64 here)
                noise_sampler=lambda s, s_next: torch.randn(noise.shape, generator=generator, dtype=torch.float64),
            )

    ours = run_ours(scaling)
    assert torch.allclose(ours, expected, atol=TOL, rtol=0)
    assert (run_ours(scaling * 1000) - expected).abs().max() > 10 * TOL or scaling == 10.0
    assert expected.abs().max() > 1.0


def test_lcm_adapter_matches_lcm_scheduler_in_a_sampling_loop():
    unet = _unet()
    ehs, noise = _inputs(torch.float32)
    reference = LCMScheduler(**LINEAR, prediction_type="v_prediction", timestep_scaling=0.1)
    reference.set_timesteps(6)
    ours = samplers.make_scheduler("lcm", base=reference, timestep_scaling=0.1)
    ours.set_timesteps(6)
    assert ours.config.schedule == "lcm" and torch.equal(ours.timesteps, reference.timesteps.float())
    expected = _lcm_loop(reference, unet, ehs, noise)
    assert torch.allclose(_lcm_loop(ours, unet, ehs, noise), expected, atol=TOL, rtol=0)
    # other seeds give other re-noising: the generator reaches the sampler
    ours.set_timesteps(6)
    assert (_lcm_loop(ours, unet, ehs, noise, seed=4) - expected).abs().max() > 1e-2
    diffusers_backend = samplers.make_scheduler("lcm", base=reference, backend="diffusers", timestep_scaling=0.1)
    assert isinstance(diffusers_backend, LCMScheduler) and diffusers_backend.config.timestep_scaling == 0.1


def test_lcm_schedule_arguments_are_checked():
    with pytest.raises(ValueError, match="pass schedule='lcm'"):
        samplers.make_scheduler("ddim", original_inference_steps=20)
    with pytest.raises(ValueError, match="exceeds original_inference_steps"):
        samplers.make_scheduler("lcm", num_steps=30, original_inference_steps=20)
    with pytest.raises(ValueError, match="1 to original_inference_steps=50"):
        samplers.make_scheduler("lcm").set_timesteps(60)


# ---------------------------------------------------------------- distillation
def _data(n=4):
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return CaptionedImages(images, ("a photo of a horse", "a ship"), torch.tensor([[i % 2] for i in range(n)]))


@pytest.mark.parametrize("variant,lr", [("lora", 1e-3), ("full", 1e-5)])
def test_one_distillation_step_lowers_the_loss_on_a_fixed_batch(tmp_path, variant, lr):
    pipe = tiny_sd_pipeline(tmp_path)
    config = LCMDistillConfig(variant=variant, batch_size=4, lora_rank=4, learning_rate=lr, warmup_steps=1,
                              guidance_range=(2.0, 6.0))
    distiller = LCMDistiller(pipe, config)
    latents = encode_latents(pipe.vae, _data())
    batch = distiller.draw_batch(latents, encode_captions(pipe.text_encoder, pipe.tokenizer, latents.captions), 0)
    assert _loss_after_one_step(distiller, batch)  # one step lowers the loss on a fixed batch
    if variant == "full":
        # the guidance embedding starts at zero (student == teacher) and learns
        assert distiller.student.config.time_cond_proj_dim == config.guidance_embed_dim
        assert distiller.student.time_embedding.cond_proj.weight.abs().max() > 0


def test_lora_saves_resumes_and_loads_into_a_fresh_pipeline(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path / "teacher")
    config = LCMDistillConfig(batch_size=2, lora_rank=4, learning_rate=1e-2, warmup_steps=1, max_steps=2,
                              checkpoint_every=500)
    first = distill_lcm(pipe, _data(), tmp_path / "out", config, disable_progress=True)
    assert first["steps"] == 2 and (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()
    resumed = distill_lcm(pipe, _data(), tmp_path / "out", LCMDistillConfig(**{**config.__dict__, "max_steps": 3}),
                          disable_progress=True)
    assert resumed["steps"] == 3 and resumed["steps_this_run"] == 1
    assert json.loads((tmp_path / "out" / "lcm_distill.json").read_text())["steps"] == 3

    fresh = tiny_sd_pipeline(tmp_path / "fresh")
    before = run(fresh, steps=2, guidance_scale=1.0)
    fresh.load_lora_weights(str(tmp_path / "out"))
    loaded = {name: p for name, p in fresh.unet.named_parameters() if "lora_" in name}
    from safetensors.torch import load_file

    saved = load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")
    assert len(loaded) == len(saved) > 0  # every adapted layer loads, attention included
    assert any("attn1.to_q" in name for name in loaded)
    assert not torch.allclose(torch.from_numpy(run(fresh, steps=2, guidance_scale=1.0)), torch.from_numpy(before), atol=1e-4)


def test_full_student_saves_a_pipeline_that_embeds_guidance(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    distiller = LCMDistiller(pipe, LCMDistillConfig(variant="full", guidance_embed_dim=32))
    folder = distiller.save(tmp_path / "out")
    student = StableDiffusionPipeline.from_pretrained(folder)
    student.set_progress_bar_config(disable=True)
    assert isinstance(student.scheduler, LCMScheduler) and student.unet.config.time_cond_proj_dim == 32
    # a zero guidance projection: the student is the teacher, whatever the embedded scale
    out = run(student, steps=2, guidance_scale=3.0)
    assert torch.equal(torch.from_numpy(out), torch.from_numpy(run(student, steps=2, guidance_scale=8.0)))


@pytest.mark.parametrize("variant,lr", [("lora", 1e-3), ("full", 1e-5)])
def test_one_sdxl_distillation_step_lowers_the_loss_on_a_fixed_batch(tmp_path, variant, lr):
    from accel.conditioning import encode_conditioning

    pipe = tiny_sdxl_pipeline(tmp_path)
    config = LCMDistillConfig(variant=variant, batch_size=2, lora_rank=4, learning_rate=lr, warmup_steps=1,
                              guidance_range=(2.0, 6.0), guidance_embed_dim=32)
    distiller = LCMDistiller(pipe, config)
    latents = encode_latents(pipe.vae, _data(2))
    conditioning = encode_conditioning(pipe, latents.captions, resolution=32)
    with pytest.raises(ValueError, match="needs pooled text embeds and time ids"):
        distiller.draw_batch(latents, conditioning.encoder_hidden_states, 0)
    batch = distiller.draw_batch(latents, conditioning, 0)
    assert batch["uncond"].text_embeds.abs().max() == 0  # SDXL's zeroed unconditional embedding
    assert batch["cond"].time_ids.tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    assert _loss_after_one_step(distiller, batch)  # one step lowers the loss on a fixed batch
    if variant == "full":
        student = StableDiffusionXLPipeline.from_pretrained(distiller.save(tmp_path / "out"))
        assert student.unet.config.time_cond_proj_dim == 32 and isinstance(student.scheduler, LCMScheduler)
        assert student.unet.time_embedding.cond_proj.weight.abs().max() > 0


def test_sdxl_lora_loads_into_a_fresh_sdxl_pipeline(tmp_path):
    pipe = tiny_sdxl_pipeline(tmp_path / "teacher")
    config = LCMDistillConfig(batch_size=2, lora_rank=4, learning_rate=1e-2, warmup_steps=1, max_steps=1)
    summary = distill_lcm(pipe, _data(2), tmp_path / "out", config, disable_progress=True)
    assert summary["steps"] == 1 and summary["loss_first"] > 0
    fresh = tiny_sdxl_pipeline(tmp_path / "fresh")
    before = run(fresh, steps=2, guidance_scale=1.0)
    fresh.load_lora_weights(str(tmp_path / "out"))
    from safetensors.torch import load_file

    loaded = [n for n, _ in fresh.unet.named_parameters() if "lora_" in n]
    assert len(loaded) == len(load_file(tmp_path / "out" / "pytorch_lora_weights.safetensors")) > 0
    assert any("attn2.to_k.lora_A" in n for n in loaded)  # every adapted layer loads, cross-attention included
    assert abs(run(fresh, steps=2, guidance_scale=1.0) - before).max() > 1e-4


def test_distill_config_rejects_bad_values():
    with pytest.raises(ValueError, match="valid choices: 'lora', 'full'"):
        LCMDistillConfig(variant="half")
    with pytest.raises(ValueError, match="valid choices: 'ddim'"):
        LCMDistillConfig(solver="rk4")
    with pytest.raises(ValueError, match="1 <= low <= high"):
        LCMDistillConfig(guidance_range=(8.0, 2.0))


def test_cli_distill_lcm_on_a_caption_folder(tmp_path):
    from apps.cli import main

    pipe = tiny_sd_pipeline(tmp_path)
    pipe.save_pretrained(tmp_path / "teacher")
    (tmp_path / "data").mkdir()
    for i in range(2):
        Image.new("RGB", (40, 36), (60 * i, 90, 200)).save(tmp_path / "data" / f"{i}.png")
        (tmp_path / "data" / f"{i}.txt").write_text("a photo of a horse\n")
    code = main(["distill-lcm", "--teacher", str(tmp_path / "teacher"), "--data", str(tmp_path / "data"), "--out",
                 str(tmp_path / "out"), "--lora-rank", "2", "--steps", "1", "--batch-size", "2", "--device", "cpu"])
    assert code == 0 and (tmp_path / "out" / "pytorch_lora_weights.safetensors").is_file()


# ---------------------------------------------------------------- the AccelConfig entry
@pytest.fixture
def lora_folder(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path / "teacher")
    distiller = LCMDistiller(pipe, LCMDistillConfig(lora_rank=4))
    with torch.no_grad():  # a LoRA that changes the output
        for name, p in distiller.student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    distiller.save(tmp_path / "lora")
    return tmp_path / "lora"


def _lora_layers(pipe):
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in pipe.unet.modules() if isinstance(m, BaseTunerLayer)]


@pytest.mark.parametrize("fuse", [True, False])
def test_accelerate_with_lcm_lora_then_restore_is_bit_identical(sd_pipe, lora_folder, fuse):
    baseline = run(sd_pipe, steps=4, guidance_scale=1.0)
    weights = {k: v.clone() for k, v in sd_pipe.unet.state_dict().items()}
    scheduler = sd_pipe.scheduler

    accel.accelerate(sd_pipe, accel.AccelConfig(model=accel.LCMLoRAConfig(path=lora_folder, fuse=fuse)))
    assert sd_pipe.scheduler.config.sampler == "lcm" and sd_pipe.unet.peft_config
    layers = _lora_layers(sd_pipe)
    assert layers and all(layer.merged == fuse for layer in layers)
    steps = []
    enabled = run(sd_pipe, steps=None, callback_on_step_end=lambda p, i, t, kw: steps.append(int(t)) or kw)
    assert steps == [999, 759, 499, 259]  # 4 LCM steps by default
    assert abs(enabled - baseline).max() > 1e-3
    assert [c["technique"] for c in accel.changes(sd_pipe)] == ["lcm_lora"]

    accel.restore(sd_pipe)
    assert sd_pipe.scheduler is scheduler and not getattr(sd_pipe.unet, "peft_config", None)
    restored = sd_pipe.unet.state_dict()
    assert restored.keys() == weights.keys() and all(torch.equal(restored[k], weights[k]) for k in weights)
    assert (run(sd_pipe, steps=4, guidance_scale=1.0) == baseline).all()


def test_fused_lcm_lora_matches_the_unfused_one(sd_pipe, lora_folder):
    outputs = {}
    for fuse in (False, True):
        accel.accelerate(sd_pipe, accel.AccelConfig(model=accel.LCMLoRAConfig(path=lora_folder, fuse=fuse,
                                                                               lora_scale=0.7)))
        outputs[fuse] = run(sd_pipe, steps=None)
        accel.restore(sd_pipe)
    # fusing only reorders float32 sums; a lora_scale of 0.7 is applied once, not twice
    assert abs(outputs[True] - outputs[False]).max() < 1e-4
    assert abs(outputs[True]).max() > 0.1


def test_lcm_lora_next_to_a_user_lora_stays_unfused_and_leaves_it_working(sd_pipe, lora_folder):
    sd_pipe.load_lora_weights(str(lora_folder), adapter_name="style")
    with_style = run(sd_pipe, steps=4, guidance_scale=1.0)
    weights = {k: v.clone() for k, v in sd_pipe.unet.state_dict().items()}
    with pytest.warns(UserWarning, match="left unfused"):
        accel.accelerate(sd_pipe, accel.AccelConfig(model=accel.LCMLoRAConfig(path=lora_folder)))
    assert not any(layer.merged for layer in _lora_layers(sd_pipe))
    assert sorted(sd_pipe.get_active_adapters()) == ["lcm", "style"]
    accel.restore(sd_pipe)
    assert sd_pipe.get_active_adapters() == ["style"]
    restored = sd_pipe.unet.state_dict()
    assert restored.keys() == weights.keys() and all(torch.equal(restored[k], weights[k]) for k in weights)
    assert (run(sd_pipe, steps=4, guidance_scale=1.0) == with_style).all()


def test_lcm_lora_config_errors(sd_pipe, lora_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        accel.LCMLoRAConfig(path=tmp_path / "missing")
    (tmp_path / "lora.bin").write_bytes(b"0")
    with pytest.raises(ValueError, match="only safetensors"):
        accel.LCMLoRAConfig(path=tmp_path / "lora.bin")
    with pytest.raises(ValueError, match="exceeds original_inference_steps"):
        accel.LCMLoRAConfig(path=lora_folder, num_steps=60)
    with pytest.raises(ValueError, match="fuse must be True or False"):
        accel.LCMLoRAConfig(path=lora_folder, fuse="yes")
    config = accel.AccelConfig(model=accel.LCMLoRAConfig(path=lora_folder), sampler=accel.SamplerConfig("ddim"))
    scheduler = sd_pipe.scheduler
    with pytest.raises(ValueError, match="leave AccelConfig.sampler as None"):
        accel.accelerate(sd_pipe, config)
    assert not accel.is_accelerated(sd_pipe) and sd_pipe.scheduler is scheduler


def _user_lora(pipe, folder):
    """A user's LoRA on the attention queries only (fewer layers than the LCM-LoRA adapts)."""
    import copy

    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    unet = copy.deepcopy(pipe.unet)
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q"]), adapter_name="style")
    with torch.no_grad():
        for name, p in unet.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2, generator=torch.Generator().manual_seed(1))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet, adapter_name="style"))
    return folder


def test_a_user_lora_keeps_its_weight_while_the_lcm_lora_is_applied(sd_pipe, lora_folder, tmp_path):
    sd_pipe.load_lora_weights(str(_user_lora(sd_pipe, tmp_path / "style")), adapter_name="style")
    sd_pipe.set_adapters(["style"], adapter_weights=[0.5])
    scales = [dict(layer.scaling) for layer in _lora_layers(sd_pipe)]
    with pytest.warns(UserWarning, match="left unfused"):
        accel.accelerate(sd_pipe, accel.AccelConfig(model=accel.LCMLoRAConfig(path=lora_folder)))
    during = [layer.scaling.get("style") for layer in _lora_layers(sd_pipe) if "style" in layer.scaling]
    accel.restore(sd_pipe)
    assert during == [s["style"] for s in scales if "style" in s] and during  # 0.5 of alpha / r, not 1
    assert [dict(layer.scaling) for layer in _lora_layers(sd_pipe)] == scales


def test_restore_keeps_a_loaded_but_inactive_user_lora(sd_pipe, lora_folder, tmp_path):
    sd_pipe.load_lora_weights(str(_user_lora(sd_pipe, tmp_path / "style")), adapter_name="style")
    sd_pipe.unet.set_adapters([])  # the user's LoRA stays loaded, with no adapter active
    baseline = run(sd_pipe, steps=4, guidance_scale=1.0)
    weights = {k: v.clone() for k, v in sd_pipe.unet.state_dict().items()}
    accel.accelerate(sd_pipe, accel.AccelConfig(model=accel.LCMLoRAConfig(path=lora_folder)))
    assert sd_pipe.get_active_adapters() == ["lcm"]
    assert abs(run(sd_pipe, steps=4, guidance_scale=1.0) - baseline).max() > 1e-3
    accel.restore(sd_pipe)
    assert sd_pipe.get_list_adapters() == {"unet": ["style"]} and sd_pipe.get_active_adapters() == []
    restored = sd_pipe.unet.state_dict()
    assert restored.keys() == weights.keys() and all(torch.equal(restored[k], weights[k]) for k in weights)
    assert (run(sd_pipe, steps=4, guidance_scale=1.0) == baseline).all()
    sd_pipe.unet.set_adapters(["style"])  # and the user's LoRA still works when switched on
    assert abs(run(sd_pipe, steps=4, guidance_scale=1.0) - baseline).max() > 1e-3
