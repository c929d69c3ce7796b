"""The embedded DiT (mini-sd3-cifar10): size, the folder of shared files, plain-diffusers loading, generation,
the training script's step / resume / export, and the quality harness, the CLI and the app on it."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors.torch import load_file

from accel.embedded import EMBEDDED_MODEL_DIR
from accel.embedded_dit import (
    EMBEDDED_DIT_DIR,
    EMBEDDED_DIT_NAME,
    build_transformer,
    is_embedded_dit,
    resolve_model,
    save_pipeline,
)
from apps.cli import main as cli_main

SHIPPED = (EMBEDDED_DIT_DIR / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
TINY = {"width": 32, "depth": 2, "head_dim": 16}
LINKS = ("text_encoder/text_model.safetensors", "text_encoder_2", "tokenizer", "tokenizer_2",
         "vae/diffusion_pytorch_model.safetensors")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    """The shipped layout around a tiny random transformer."""
    torch.manual_seed(0)
    return save_pipeline(build_transformer(**TINY), tmp_path_factory.mktemp("dit") / "pipeline")


def load_plain(folder, caplog):
    """``DiffusionPipeline.from_pretrained`` with no arguments but offline, and no warning logged while loading."""
    import diffusers
    import transformers
    from diffusers import DiffusionPipeline

    diffusers.utils.logging.enable_propagation()
    transformers.utils.logging.enable_propagation()
    try:
        with caplog.at_level(logging.WARNING):
            pipe = DiffusionPipeline.from_pretrained(folder, local_files_only=True)
    finally:
        diffusers.utils.logging.disable_propagation()
        transformers.utils.logging.disable_propagation()
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING and "torchvision" not in r.getMessage()]
    assert not warnings, warnings
    pipe.set_progress_bar_config(disable=True)
    return pipe


def check_pipeline(pipe) -> None:
    """SD3 on the UNet model's CLIP encoder (pooled output unprojected), zeros from the T5 slot, 32x32 images."""
    from transformers import CLIPTextModel

    assert type(pipe).__name__ == "StableDiffusion3Pipeline"
    assert {module.dtype for module in (pipe.transformer, pipe.vae, pipe.text_encoder, pipe.text_encoder_3)} == {torch.float32}
    clip = CLIPTextModel.from_pretrained(EMBEDDED_MODEL_DIR / "text_encoder")
    ids = pipe.tokenizer(["a photo of a horse", ""], padding="max_length", return_tensors="pt").input_ids
    with torch.no_grad():
        ours, theirs = pipe.text_encoder_2(ids, output_hidden_states=True), clip(ids, output_hidden_states=True)
    torch.testing.assert_close(ours.text_embeds, theirs.pooler_output)
    torch.testing.assert_close(ours.hidden_states[-2], theirs.hidden_states[-2])
    _, _, pooled, _ = pipe.encode_prompt("a photo of a horse", None, None, do_classifier_free_guidance=False)
    embeds = pipe.encode_prompt("a photo of a horse", None, None, do_classifier_free_guidance=False)[0]
    assert embeds.shape == (1, 77 + 256, 512) and pooled.shape == (1, 512)
    assert not embeds[:, 77:].any()  # the T5 slot's 256 tokens
    images = pipe("a photo of a horse", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()


def test_transformer_is_a_patch_2_mmdit_within_the_size_budget():
    transformer = build_transformer()
    config = transformer.config
    assert (config.sample_size, config.patch_size, config.in_channels, config.out_channels) == (16, 2, 4, 4)
    assert config.joint_attention_dim == config.pooled_projection_dim == 512  # two 256-wide CLIP encoders
    assert sum(p.numel() for p in transformer.parameters()) * 2 <= 10e6  # fp16; the model's own files stay under 12 MB
    with torch.no_grad():
        out = transformer(torch.randn(2, 4, 16, 16), torch.randn(2, 333, 512), torch.randn(2, 512), torch.tensor([999.0, 1.0])).sample
    assert out.shape == (2, 4, 16, 16)


def test_folder_shares_the_unet_models_files_through_relative_links(tiny_folder):
    for name in LINKS:
        link = tiny_folder / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link)), name
    assert (tiny_folder / "vae/diffusion_pytorch_model.safetensors").samefile(EMBEDDED_MODEL_DIR / "vae/diffusion_pytorch_model.safetensors")
    assert (tiny_folder / "text_encoder/text_model.safetensors").samefile(EMBEDDED_MODEL_DIR / "text_encoder/model.safetensors")
    assert json.loads((tiny_folder / "vae/config.json").read_text())["shift_factor"] == 0.0
    projection = load_file(tiny_folder / "text_encoder/text_projection.safetensors")["text_projection.weight"]
    assert projection.dtype == torch.float16 and torch.equal(projection.float(), torch.eye(256))


def test_saved_folder_loads_with_plain_diffusers_and_generates(tiny_folder, caplog):
    check_pipeline(load_plain(tiny_folder, caplog))


def test_shipped_folder_links_stay_inside_the_models_folder():
    models = EMBEDDED_DIT_DIR.parent.resolve()
    for name in LINKS:
        link = EMBEDDED_DIT_DIR / name
        assert link.is_symlink() and not os.path.isabs(os.readlink(link)), name
        assert link.resolve().is_relative_to(models) and link.exists(), name
    own = [p for p in EMBEDDED_DIT_DIR.rglob("*") if p.is_file() and not any(q.is_symlink() for q in (p, *p.parents))]
    assert sum(p.stat().st_size for p in own) <= 12e6


@pytest.mark.skipif(not SHIPPED, reason="the DiT's trained transformer weights are not installed yet")
def test_shipped_folder_loads_with_plain_diffusers_and_generates(caplog):
    check_pipeline(load_plain(EMBEDDED_DIT_DIR, caplog))


def test_model_name_resolves_to_the_folder_once_trained():
    if SHIPPED:
        assert resolve_model(EMBEDDED_DIT_NAME) == EMBEDDED_DIT_DIR
    else:
        with pytest.raises(FileNotFoundError, match="has no trained transformer weights in.*train.sh"):
            resolve_model(EMBEDDED_DIT_NAME)
        with pytest.raises(SystemExit, match="error: the embedded DiT mini-sd3-cifar10 has no trained transformer weights"):
            cli_main(["generate", "--model", EMBEDDED_DIT_NAME, "--prompt", "a photo of a horse", "--out", "x.png"])
    assert resolve_model("some/hub-id") == "some/hub-id" and resolve_model(None) is None
    assert is_embedded_dit(EMBEDDED_DIT_NAME) and is_embedded_dit(str(EMBEDDED_DIT_DIR))
    assert not is_embedded_dit(None) and not is_embedded_dit(EMBEDDED_MODEL_DIR)


def test_training_target_is_what_the_scheduler_integrates():
    from accel.embedded_dit import build_scheduler
    from apps.train_embedded_dit import rectified_flow_pair

    generator = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 4, 16, 16, generator=generator), torch.randn(2, 4, 16, 16, generator=generator)
    noisy, velocity = rectified_flow_pair(x0, noise, torch.tensor(0.3))
    scheduler = build_scheduler()
    scheduler.set_timesteps(sigmas=[0.3])
    # The model sees sigma * 1000, as the training script passes it; one Euler step of the true velocity to sigma = 0
    # lands on the data.
    torch.testing.assert_close(scheduler.timesteps, torch.tensor([0.3 * scheduler.config.num_train_timesteps]))
    torch.testing.assert_close(scheduler.step(velocity, scheduler.timesteps[0], noisy).prev_sample, x0)


def test_training_step_resume_and_export(tmp_path):
    from diffusers import StableDiffusion3Pipeline

    from apps import train_embedded_dit

    tiny = ["--width", "32", "--depth", "2", "--head-dim", "16"]
    args = ["--synthetic", "8", "--batch-size", "4", "--seed", "0", "--checkpoint-every", "1"] + tiny
    first = train_embedded_dit.main(["--out", str(tmp_path / "run"), "--max-steps", "1"] + args)
    assert first["steps"] == 1
    assert json.loads((tmp_path / "run/transformer_checkpoint/state.json").read_text())["step"] == 1
    before = load_file(tmp_path / "run/transformer_checkpoint/transformer.safetensors")
    resumed = train_embedded_dit.main(["--out", str(tmp_path / "run"), "--max-steps", "2"] + args)
    assert resumed["steps"] == 2
    after = load_file(tmp_path / "run/transformer_checkpoint/transformer.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)
    # Two steps in one go give the weights of one step, a restart, and one more.
    train_embedded_dit.main(["--out", str(tmp_path / "fresh"), "--max-steps", "2"] + args)
    for key, value in load_file(tmp_path / "fresh/transformer_checkpoint/transformer.safetensors").items():
        torch.testing.assert_close(value, after[key])

    exported = tmp_path / "run/pipeline"
    weights = load_file(exported / "transformer/diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in weights.values()} == {torch.float16}
    pipe = StableDiffusion3Pipeline.from_pretrained(exported, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 32, 32)


def test_quality_harness_cli_and_app_take_the_dit(tiny_folder, tmp_path):
    from diffusers import DiffusionPipeline

    from accel.quality.classifier import CifarResNet
    from accel.quality.evaluate import evaluate, write_report
    from apps import cli
    from apps.gradio_app import ComparisonApp, Controls

    pipe = DiffusionPipeline.from_pretrained(tiny_folder, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    classifier = CifarResNet(widths=(8, 16, 16, 32)).eval()
    reference = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = evaluate(pipe, n=10, num_inference_steps=1, batch_size=5, classifier=classifier, reference_images=reference)
    assert (result["pipeline"], result["scheduler"], result["dtype"]) == ("StableDiffusion3Pipeline", "FlowMatchEulerDiscreteScheduler", "float32")
    assert 0 <= result["baseline"]["adherence"] <= 1 and result["baseline"]["frechet_distance"] >= 0
    assert "| baseline |" in write_report(result, tmp_path / "eval")[1].read_text()

    out = tmp_path / "horse.png"
    assert cli.main(["generate", "--model", str(tiny_folder), "--prompt", "a photo of a horse", "--steps", "2",
                     "--device", "cpu", "--out", str(out)]) == 0
    from PIL import Image

    assert Image.open(out).size == (32, 32)

    app = ComparisonApp(pipe, model_name="tiny DiT", warmup=False)
    assert (app.native_size, app.size_multiple, app.min_size, app.max_size) == (32, 8, 8, 64)
    comparison = app.compare(Controls(prompt="a photo of a horse", steps=2))
    assert comparison.baseline.size == (32, 32) and comparison.ssim == pytest.approx(1.0)


def test_text_encoder_check_accepts_the_shared_weights_and_refuses_random_ones(tiny_folder):
    from transformers import CLIPTextModelWithProjection

    from accel.embedded_dit import check_shared_text_encoder

    loaded = CLIPTextModelWithProjection.from_pretrained(tiny_folder / "text_encoder")
    check_shared_text_encoder(loaded)
    random = CLIPTextModelWithProjection(loaded.config)  # what transformers 5.17 gave: every CLIP weight initialised anew
    with pytest.raises(RuntimeError, match="did not load mini-sd-cifar10's CLIP weights.*write_canonical_clip_names"):
        check_shared_text_encoder(random)


def test_whitened_text_layers_train_on_whitened_inputs_and_fold_exactly():
    from apps.train_embedded_dit import WhitenedLinear, fold_text_layers, whiten_text_layers

    generator = torch.Generator().manual_seed(0)
    # Caption-like features: a large shared part, a small varying one, and the T5 slot's zero tokens after 6 tokens.
    tokens = 50 + torch.randn(6, 4, 64, generator=generator) * torch.logspace(0, -2, 64)
    prompt_embeds = torch.cat([tokens, torch.zeros(6, 3, 64)], dim=1)
    pooled = torch.randn(6, 64, generator=generator) + 20
    linear = torch.nn.Linear(64, 8)
    same = WhitenedLinear(linear, tokens)
    torch.testing.assert_close(same(prompt_embeds), linear(prompt_embeds), atol=1e-4, rtol=1e-4)
    whitened = (tokens.reshape(-1, 64) - same.mean) @ same.projection.T
    assert whitened.mean(0).abs().max() < 1e-3 and whitened.var(0).max() < 1.01  # centred, at most unit variance


    # On the transformer: taking the layers over keeps its function, a fresh start changes it, folding keeps that.
    torch.manual_seed(0)
    transformer = build_transformer(**TINY)
    context = torch.cat([50 + torch.randn(120, 5, 512, generator=generator) * 10, torch.zeros(120, 4, 512)], dim=1)
    pooled = 20 + torch.randn(600, 512, generator=generator)
    inputs = dict(hidden_states=torch.randn(3, 4, 16, 16, generator=generator), timestep=torch.tensor([100.0, 500.0, 900.0]),
                  encoder_hidden_states=context[:3], pooled_projections=pooled[:3])

    def run():
        with torch.no_grad():
            return transformer(**inputs).sample

    stock = run()
    whiten_text_layers(transformer, context, pooled, fresh=False)
    assert isinstance(transformer.context_embedder, WhitenedLinear)
    # Equal within float32 rounding through a map of condition number about 30 (the variance floor is 1e-3).
    torch.testing.assert_close(run(), stock, atol=2e-3, rtol=1e-2)
    whiten_text_layers(build_transformer(**TINY), context, pooled, fresh=True)  # builds from any transformer
    transformer.context_embedder.reset_parameters()
    fresh = run()
    assert not torch.allclose(fresh, stock, atol=1e-3)
    fold_text_layers(transformer)
    assert type(transformer.context_embedder) is torch.nn.Linear
    assert type(transformer.time_text_embed.text_embedder.linear_1) is torch.nn.Linear
    torch.testing.assert_close(run(), fresh, atol=2e-3, rtol=1e-2)


def test_whitened_training_exports_the_function_it_trained(tmp_path):
    from apps import train_embedded_dit

    result = train_embedded_dit.main(["--out", str(tmp_path / "run"), "--synthetic", "8", "--batch-size", "4", "--max-steps", "3",
                                      "--whiten-text", "--width", "32", "--depth", "2", "--head-dim", "16"])
    check = result["export_check_loss"]
    assert result["whiten_text"] and check["ema_folded"] == pytest.approx(check["ema"], rel=1e-3)
    assert check["saved_fp16"] == pytest.approx(check["ema"], rel=1e-2)


@pytest.mark.skipif(not SHIPPED, reason="the DiT's trained transformer weights are not installed yet")
def test_shipped_tuned_flow_solvers_run_by_name_and_restore(caplog):
    import accel
    import samplers
    from accel import AccelConfig, SamplerConfig

    for name in ("dpmpp_2m", "olss"):
        for steps in (5, 6, 8, 10):
            tuned = samplers.load_tuned_schedule(EMBEDDED_DIT_DIR / "tuned_schedules" / f"{name}-{steps}.json")
            assert tuned.num_steps == steps and (tuned.coefficients is not None) == (name == "olss")
    pipe = load_plain(EMBEDDED_DIT_DIR, caplog)

    def image():
        return pipe("a photo of a ship", num_inference_steps=8, guidance_scale=5.0, output_type="pt",
                    generator=torch.Generator().manual_seed(0)).images

    before = image()
    config = AccelConfig(sampler=SamplerConfig("olss", 8, schedule="tuned",
                                               options={"tuned": "olss-8", "model_dir": str(EMBEDDED_DIT_DIR)}))
    accel.accelerate(pipe, config)
    tuned_image = image()
    assert len(pipe.scheduler.timesteps) == 8 and not torch.equal(tuned_image, before)
    accel.restore(pipe)
    assert torch.equal(image(), before)


def test_shared_clip_file_uses_the_names_every_transformers_release_reads():
    from safetensors import safe_open
    from transformers import CLIPTextModel

    from accel.embedded import CLIP_PREFIX, clip_state_for

    with safe_open(EMBEDDED_MODEL_DIR / "text_encoder" / "model.safetensors", "pt") as f:
        names = list(f.keys())
    assert names and all(name.startswith(CLIP_PREFIX) for name in names)  # 5.17 read no other form into the DiT's class
    model = CLIPTextModel.from_pretrained(EMBEDDED_MODEL_DIR / "text_encoder")
    own = model.state_dict()
    for state in ({k.removeprefix(CLIP_PREFIX): v for k, v in own.items()}, {CLIP_PREFIX + k.removeprefix(CLIP_PREFIX): v
                                                                             for k, v in own.items()}):
        assert clip_state_for(model, state).keys() == own.keys()
    with pytest.raises(KeyError, match="'text_model.nope' is not a tensor of CLIPTextModel"):
        clip_state_for(model, {"text_model.nope": torch.zeros(1)})
