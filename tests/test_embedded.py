"""The embedded mini Stable Diffusion: SD-like layout within budget, tokenizer, and the shipped folder."""

from __future__ import annotations

import json

import pytest
import torch

from accel.embedded import (
    CIFAR10_CLASSES,
    EMBEDDED_MODEL_DIR,
    VOCAB_SIZE,
    build_scheduler,
    build_text_encoder,
    build_unet,
    build_vae,
    caption,
    class_captions,
    eval_prompt,
    load_embedded_pipeline,
    unet_config,
)

SHIPPED = (EMBEDDED_MODEL_DIR / "model_index.json").is_file()


def test_unet_layout_is_stable_diffusion_like():
    config = unet_config()
    assert config["down_block_types"][0] == "CrossAttnDownBlock2D"
    assert config["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert config["up_block_types"][-1] == "CrossAttnUpBlock2D"
    assert len(config["down_block_types"]) == len(config["up_block_types"]) == len(config["block_out_channels"])


def test_components_fit_the_size_budget():
    count = lambda module: sum(p.numel() for p in module.parameters())  # noqa: E731
    total = count(build_unet()) + count(build_vae()) + count(build_text_encoder())
    assert total * 2 <= 40e6, f"{total} parameters do not fit 40 MB in fp16"


def test_vae_downsamples_by_two():
    vae = build_vae().eval()
    with torch.no_grad():
        latent = vae.encode(torch.zeros(1, 3, 32, 32)).latent_dist.mode()
    assert latent.shape == (1, 4, 16, 16)


def test_captions_use_the_right_article():
    assert caption("a photo of a {}", "airplane") == "a photo of an airplane"
    assert caption("a {}", "automobile") == "an automobile"
    assert caption("a photo of the {}", "airplane") == "a photo of the airplane"
    assert eval_prompt("horse") == "a photo of a horse"
    assert len(set(class_captions("cat"))) == len(class_captions("cat")) >= 4


def test_tokenizer_is_a_truncated_clip_bpe():
    from transformers import CLIPTokenizer

    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL_DIR / "tokenizer")
    assert len(tokenizer) == VOCAB_SIZE
    assert tokenizer.model_max_length == 77
    ids = tokenizer("a photo of a horse").input_ids
    assert ids[0] == tokenizer.bos_token_id == VOCAB_SIZE - 2 and ids[-1] == tokenizer.eos_token_id == VOCAB_SIZE - 1
    assert tokenizer.convert_ids_to_tokens(ids[1:-1]) == ["a</w>", "photo</w>", "of</w>", "a</w>", "horse</w>"]
    for name in CIFAR10_CLASSES:
        assert max(tokenizer(eval_prompt(name)).input_ids) < VOCAB_SIZE


def test_scheduler_config_loads_in_other_schedulers():
    from diffusers import DDIMScheduler, PNDMScheduler

    scheduler = build_scheduler()
    assert scheduler.config.prediction_type == "epsilon" and scheduler.config.num_train_timesteps == 1000
    for cls in (DDIMScheduler, PNDMScheduler):
        other = cls.from_config(scheduler.config)
        torch.testing.assert_close(other.alphas_cumprod, scheduler.alphas_cumprod)


@pytest.mark.skipif(not SHIPPED, reason="the embedded model's weights are not shipped yet")
def test_shipped_folder_is_fp16_and_within_budget():
    files = [p for p in EMBEDDED_MODEL_DIR.rglob("*") if p.is_file()]
    assert sum(p.stat().st_size for p in files) <= 40 * 1024 * 1024
    weights = [p for p in files if p.suffix == ".safetensors"]
    assert {p.parent.name for p in weights} == {"unet", "vae", "text_encoder"}
    from safetensors import safe_open

    for path in weights:
        with safe_open(path, "pt") as f:
            assert all(f.get_slice(k).get_dtype() == "F16" for k in f.keys())
    index = json.loads((EMBEDDED_MODEL_DIR / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"


@pytest.mark.skipif(not SHIPPED, reason="the embedded model's weights are not shipped yet")
def test_shipped_pipeline_generates_offline():
    from diffusers import StableDiffusionPipeline

    pipe = load_embedded_pipeline()
    assert pipe.unet.dtype == torch.float32 and pipe.safety_checker is None
    images = pipe("a photo of a horse", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert images.shape == (1, 3, 32, 32)
    assert torch.isfinite(images).all()
    # Plain diffusers, no arguments, also works and agrees.
    plain = StableDiffusionPipeline.from_pretrained(EMBEDDED_MODEL_DIR, local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    again = plain("a photo of a horse", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(again, images)
