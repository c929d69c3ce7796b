"""The quality harness on tiny inputs: PSNR, SSIM, Frechet distance, the classifier, the CIFAR loader, evaluate."""

from __future__ import annotations

import io
import math
import tarfile

import numpy as np
import pytest
import torch

from accel.quality.cifar import CIFAR10_CLASSES, load_cifar10
from accel.quality.classifier import CifarResNet, load_classifier, save_classifier
from accel.quality.frechet import frechet_distance, frechet_distance_from_statistics
from accel.quality.metrics import psnr, ssim


def test_psnr_identical_is_inf():
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.isinf(psnr(x, x)).all()


def test_psnr_matches_formula_for_known_noise():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 16, 16, generator=g) * 0.8 + 0.1
    noise = torch.randn(x.shape, generator=g) * 0.05
    y = x + noise
    expected = 10 * torch.log10(1.0 / noise.double().square().flatten(1).mean(1))
    torch.testing.assert_close(psnr(x, y), expected)
    # A constant error of 0.1 on [0, 1] images is 20 dB; on [0, 255] images scaled alike, too.
    assert psnr(x, x + 0.1).sub(20.0).abs().max() < 1e-4
    assert psnr(x * 255, (x + 0.1) * 255, data_range=255.0).sub(20.0).abs().max() < 1e-4


def test_psnr_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="differ in shape"):
        psnr(torch.zeros(1, 3, 8, 8), torch.zeros(1, 3, 8, 9))


def test_ssim_identical_is_one_and_noise_lowers_it():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g)
    torch.testing.assert_close(ssim(x, x), torch.ones(2, dtype=torch.float64))
    noisy = (x + 0.2 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    slightly = (x + 0.02 * torch.randn(x.shape, generator=g)).clamp(0, 1)
    assert (ssim(x, noisy) < ssim(x, slightly)).all()
    assert (ssim(x, slightly) < 1).all()
    assert ssim(x[0], x[0]).shape == (1,)


def test_frechet_distance_identical_sets_is_zero():
    x = torch.randn(500, 6, generator=torch.Generator().manual_seed(0))
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_shifted_set_is_squared_shift():
    x = torch.randn(2000, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    shift = torch.tensor([1.0, -2.0, 0.5, 0.0, 3.0], dtype=torch.float64)
    # Same covariance, mean moved by `shift`: the distance is |shift|^2 exactly.
    assert frechet_distance(x, x + shift) == pytest.approx(float(shift.square().sum()), rel=1e-9)


def test_frechet_distance_of_gaussians_matches_closed_form():
    # Diagonal covariances: FD = |mu_a - mu_b|^2 + sum (sigma_a - sigma_b)^2 over standard deviations.
    mu_a, mu_b = torch.zeros(3), torch.tensor([1.0, 0.0, -1.0])
    std_a, std_b = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([2.0, 2.0, 1.0])
    expected = float((mu_a - mu_b).square().sum() + (std_a - std_b).square().sum())
    got = frechet_distance_from_statistics(mu_a, torch.diag(std_a**2), mu_b, torch.diag(std_b**2))
    assert got == pytest.approx(expected, rel=1e-12)
    # A full (rotated) covariance: invariant under rotating both sets together.
    q, _ = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))
    rotated = frechet_distance_from_statistics(q @ mu_a.double(), q @ torch.diag(std_a**2).double() @ q.T, q @ mu_b.double(), q @ torch.diag(std_b**2).double() @ q.T)
    assert rotated == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_of_samples_approaches_analytic_value():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(20000, 4, generator=g)
    b = torch.randn(20000, 4, generator=g) * 2 + 1
    # N(0, I) vs N(1, 4I) in 4 dimensions: 4 * 1^2 + 4 * (1 - 2)^2 = 8.
    assert frechet_distance(a, b) == pytest.approx(8.0, rel=0.05)


def test_classifier_shapes_and_round_trip(tmp_path):
    torch.manual_seed(0)
    model = CifarResNet(widths=(8, 16, 16, 32)).eval()
    x = torch.rand(3, 3, 32, 32)
    assert model(x).shape == (3, 10)
    assert model.features(x).shape == (3, model.feature_dim) == (3, 32)
    save_classifier(model, tmp_path, metadata={"note": "test"})
    loaded = load_classifier(tmp_path)
    assert not loaded.training
    # Weights are stored in fp16.
    torch.testing.assert_close(loaded(x), model(x), atol=2e-3, rtol=2e-3)


def test_shipped_classifier_loads():
    from accel.quality.classifier import CLASSIFIER_DIR

    if not (CLASSIFIER_DIR / "model.safetensors").is_file():
        pytest.skip("classifier weights not shipped yet")
    model = load_classifier()
    assert model(torch.rand(2, 3, 32, 32)).shape == (2, 10)


def _write_tiny_cifar(root, per_class: int = 2) -> np.ndarray:
    from PIL import Image

    rng = np.random.default_rng(0)
    pixels = np.zeros((len(CIFAR10_CLASSES), per_class, 32, 32, 3), dtype=np.uint8)
    with tarfile.open(root / "test.tar.gz", "w:gz") as archive:
        for label, name in enumerate(CIFAR10_CLASSES):
            for i in range(per_class):
                # Flat colours survive JPEG almost exactly.
                pixels[label, i] = rng.integers(0, 256, 3, dtype=np.uint8)
                buffer = io.BytesIO()
                Image.fromarray(pixels[label, i]).save(buffer, format="JPEG", quality=95)
                info = tarfile.TarInfo(f"test/{name}/{i:04d}.jpg")
                info.size = buffer.tell()
                buffer.seek(0)
                archive.addfile(info, buffer)
    return pixels


def test_load_cifar10_from_archive(tmp_path):
    pixels = _write_tiny_cifar(tmp_path)
    images, labels = load_cifar10("test", tmp_path, num_workers=1)
    assert images.dtype == torch.uint8 and images.shape == (20, 3, 32, 32)
    assert labels.tolist() == [k for k in range(10) for _ in range(2)]
    expected = torch.from_numpy(pixels.reshape(20, 32, 32, 3)).permute(0, 3, 1, 2).int()
    assert (images.int() - expected).abs().max() <= 3
    limited, _ = load_cifar10("test", tmp_path, num_workers=2, limit=5)
    assert torch.equal(limited, images[:5])
    with pytest.raises(ValueError, match="split"):
        load_cifar10("valid", tmp_path)


def _tiny_pipeline(latent_size: int = 16):
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from accel.embedded import EMBEDDED_MODEL_DIR

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=latent_size,
        block_out_channels=(32, 64),
        layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32,
        attention_head_dim=4,
    )
    vae = AutoencoderKL(
        block_out_channels=(32, 32),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        sample_size=2 * latent_size,
    )
    tokenizer = CLIPTokenizer.from_pretrained(EMBEDDED_MODEL_DIR / "tokenizer")
    vocab_size = len(tokenizer)
    text_config = CLIPTextConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=77,
        bos_token_id=vocab_size - 2,
        eos_token_id=vocab_size - 1,
        pad_token_id=vocab_size - 1,
    )
    pipe = StableDiffusionPipeline(
        vae=vae,
        text_encoder=CLIPTextModel(text_config),
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_evaluate_baseline_on_tiny_pipeline(tmp_path):
    from accel.quality.evaluate import evaluate, write_report

    pipe = _tiny_pipeline()
    classifier = CifarResNet(widths=(8, 16, 16, 32)).eval()
    reference = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = evaluate(pipe, n=10, num_inference_steps=1, batch_size=4, classifier=classifier, reference_images=reference, return_images=True)
    assert result["n"] == 10 and result["image_size"] == [32, 32]
    baseline = result["baseline"]
    assert 0.0 <= baseline["adherence"] <= 1.0
    assert set(baseline["adherence_per_class"]) == set(CIFAR10_CLASSES)
    assert math.isfinite(baseline["frechet_distance"]) and baseline["frechet_distance"] >= 0
    assert "accelerated" not in result
    # Same seeds, other batch size: the same images, up to float rounding across batch shapes.
    again = evaluate(pipe, n=10, num_inference_steps=1, batch_size=10, classifier=classifier, reference_images=reference, return_images=True)
    difference = (result["images"]["baseline"].int() - again["images"]["baseline"].int()).abs()
    assert difference.max() <= 1 and difference.float().mean() < 0.01
    json_path, md_path = write_report(result, tmp_path)
    assert '"adherence"' in json_path.read_text()
    assert "| baseline |" in md_path.read_text()


def test_evaluate_outside_cifar_domain_reports_latency_only(tmp_path):
    from accel.quality.evaluate import evaluate, write_report

    pipe = _tiny_pipeline(latent_size=8)  # 16x16 images: no classifier applies
    result = evaluate(pipe, n=3, num_inference_steps=1, batch_size=2, prompts=["a red square"], guidance_scale=1.0)
    assert result["image_size"] == [16, 16] and result["n"] == 3
    assert "adherence" not in result["baseline"] and "frechet_distance" not in result["baseline"]
    assert "real_vs_real_frechet_distance" not in result
    _, md_path = write_report(result, tmp_path)
    assert "| baseline |" in md_path.read_text()


def test_evaluate_accelerated_path_restores_the_pipeline(tmp_path):
    accel = pytest.importorskip("accel")
    from accel.quality.evaluate import evaluate, write_report

    pipe = _tiny_pipeline()
    classifier = CifarResNet(widths=(8, 16, 16, 32)).eval()
    reference = torch.randint(0, 256, (40, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    preset = accel.preset_names()[0]
    result = evaluate(pipe, preset=preset, n=10, num_inference_steps=2, batch_size=5, classifier=classifier, reference_images=reference)
    accelerated = result["accelerated"]
    assert result["preset"] == preset
    assert accelerated["psnr_db"] > 10 and 0 < accelerated["ssim"] <= 1
    assert accelerated["speedup"] > 0 and 0 <= accelerated["adherence"] <= 1
    assert not accel.is_accelerated(pipe)
    _, md_path = write_report(result, tmp_path)
    assert f"| {preset} |" in md_path.read_text()
