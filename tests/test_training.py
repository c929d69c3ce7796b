"""One CPU step of each training script on tiny synthetic data, and a resume from its checkpoint."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from apps import train_classifier, train_embedded


def test_classifier_training_step_and_resume(tmp_path):
    args = ["--out", str(tmp_path), "--synthetic", "32", "--batch-size", "16", "--epochs", "2", "--widths", "8", "16", "16", "32", "--seed", "0"]
    first = train_classifier.main(args + ["--max-steps", "1"])
    assert first["steps"] == 1
    assert json.loads((tmp_path / "checkpoint" / "state.json").read_text()) == {"step": 1}
    resumed = train_classifier.main(args + ["--max-steps", "2"])
    assert resumed["steps"] == 2
    # Two steps in one go give the same weights as one step, a restart, and one more.
    fresh = tmp_path / "fresh"
    train_classifier.main(["--out", str(fresh)] + args[2:] + ["--max-steps", "2"])
    a = load_file(tmp_path / "checkpoint" / "model.safetensors")
    b = load_file(fresh / "checkpoint" / "model.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert (tmp_path / "model.safetensors").is_file() and (tmp_path / "config.json").is_file()


def test_embedded_training_stages_step_and_resume(tmp_path):
    common = ["--out", str(tmp_path), "--synthetic", "8", "--batch-size", "4", "--seed", "0", "--checkpoint-every", "1"]
    vae = train_embedded.main(["--stage", "vae", "--vae-channels", "32", "32", "--max-steps", "1"] + common)
    assert vae["steps"] == 1 and vae["scaling_factor"] > 0
    assert (tmp_path / "vae" / "config.json").is_file()

    tiny_unet = ["--unet-channels", "32", "64", "--layers-per-block", "1", "--text-layers", "1"]
    first = train_embedded.main(["--stage", "unet", "--max-steps", "1"] + tiny_unet + common)
    assert first["steps"] == 1
    before = load_file(tmp_path / "unet_checkpoint" / "unet.safetensors")
    resumed = train_embedded.main(["--stage", "unet", "--max-steps", "2"] + tiny_unet + common)
    assert resumed["steps"] == 2
    after = load_file(tmp_path / "unet_checkpoint" / "unet.safetensors")
    assert any(not torch.equal(before[k], after[k]) for k in before)

    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tmp_path / "pipeline", local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a photo of a cat", num_inference_steps=2, generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert image.shape == (1, 3, 32, 32)

    # The exported text encoder uses the names every transformers release reads into both CLIP classes, and a
    # second training starts from the export's weights (renamed to the model's own).
    from safetensors import safe_open

    with safe_open(tmp_path / "pipeline" / "text_encoder" / "model.safetensors", "pt") as f:
        assert all(name.startswith("text_model.") for name in f.keys())
    again = tmp_path / "again"
    (again / "vae").parent.mkdir()
    (again / "vae").symlink_to(tmp_path / "vae")
    again_args = ["--out", str(again)] + common[2:]
    train_embedded.main(["--stage", "unet", "--max-steps", "0", "--init-from", str(tmp_path / "pipeline")] + tiny_unet + again_args)
    exported = pipe.text_encoder.state_dict()
    reloaded = StableDiffusionPipeline.from_pretrained(again / "pipeline", local_files_only=True).text_encoder.state_dict()
    assert all(torch.equal(exported[k].float(), reloaded[k].float()) for k in exported)
