"""The `accel` CLI end to end on a tiny pipeline saved to a temporary folder."""

import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

from apps.cli import main


@pytest.fixture
def saved_pipe(sd_pipe, tmp_path):
    sd_pipe.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


def test_generate_writes_image_and_reports_time(saved_pipe, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert main(["generate", "--model", str(saved_pipe), "--prompt", "a photo of a cat", "--steps", "2",
                 "--preset", "quality", "--out", str(out), "--device", "cpu"]) == 0
    assert Image.open(out).size == (32, 32)
    printed = capsys.readouterr().out
    assert "generated 1 image(s) in" in printed and "quality" in printed


def test_compiling_preset_leaves_compile_out_on_cpu_with_one_note(saved_pipe, tmp_path, capsys, no_compile):
    out = tmp_path / "img.png"
    assert main(["generate", "--model", str(saved_pipe), "--prompt", "a cat", "--preset", "fast", "--device", "cpu",
                 "--out", str(out)]) == 0
    assert Image.open(out).size == (32, 32)
    err = capsys.readouterr().err
    assert err.count("torch.compile and CUDA graphs need a CUDA GPU; this runs on cpu, so they were left out (preset 'fast')") == 1


def test_one_call_leaves_the_compile_out_and_keeps_the_rest():
    """`accel generate` makes one call: the compile, which only a later call would use, is left out with a note; the
    sampler, attention and CUDA graphs stay. `--compile` keeps it (on a GPU)."""
    import accel
    from apps.loading import without_compile

    balanced = accel.get_preset("balanced")
    config, note = without_compile(balanced)
    assert "torch.compile would cost more than it saves" in note
    assert config.runtime.compile is None and config.runtime.compile_components is None
    assert config.runtime.cuda_graph and config.runtime.attention == balanced.runtime.attention
    assert config.sampler == balanced.sampler
    quality = accel.get_preset("quality")
    assert without_compile(quality) == (quality, None)


def test_generate_several_images(saved_pipe, tmp_path):
    out = tmp_path / "img.png"
    main(["generate", "--model", str(saved_pipe), "--prompt", "x", "--steps", "1", "--num-images", "2", "--out", str(out)])
    assert (tmp_path / "img-0.png").exists() and (tmp_path / "img-1.png").exists()


def test_missing_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no model_index.json"):
        main(["generate", "--model", str(tmp_path / "empty"), "--prompt", "x"])


@pytest.mark.parametrize("flags, message", [
    (["--steps", "0"], "--steps 0 is not a step count; accepted: a whole number of denoising steps >= 1"),
    (["--steps", "-3"], "--steps -3 is not a step count"),
    (["--prompt", " \t"], "--prompt is empty; accepted: any text"),
    (["--guidance", "-5"], "--guidance -5.0 is not a guidance scale; accepted: a number >= 0"),
    (["--guidance", "nan"], "--guidance nan is not a guidance scale"),
    (["--height", "0"], "--height 0 is not an image size; accepted: a positive multiple of 8"),
    (["--width", "33"], "--width 33 is not an image size"),
    (["--seed", "99999999999999999999"], "--seed 99999999999999999999 is out of range; accepted: 0 to 2**64 - 1"),
    (["--seed", "-1"], "--seed -1 is out of range"),
    (["--num-images", "0"], "--num-images 0 is too small; accepted: a whole number >= 1"),
    (["--preset", "nosuch"], "unknown preset 'nosuch'; valid presets: quality, balanced, fast"),
    (["--out", "{tmp}"], "is a folder; accepted: a file name ending in an image extension"),
    (["--out", "{tmp}/image"], "has no image extension Pillow writes; accepted: a file name ending in"),
    (["--out", "{tmp}/a-file/image.png"], "its folder {tmp}/a-file is not writable"),
])
def test_bad_generate_input_is_one_line_before_the_model_loads(tmp_path, flags, message):
    """The model folder does not exist: a check made after loading would end on that instead."""
    (tmp_path / "a-file").write_text("")
    argv = ["generate", "--model", str(tmp_path / "never-loaded"), "--prompt", "a cat", "--out", str(tmp_path / "a.png")]
    with pytest.raises(SystemExit) as exit:
        main(argv + [flag.format(tmp=tmp_path) for flag in flags])
    text = str(exit.value.code)
    assert text.startswith("error: ") and message.format(tmp=tmp_path) in text and "\n" not in text
    assert sorted(tmp_path.iterdir()) == [tmp_path / "a-file"]  # nothing written


@pytest.mark.parametrize("flags, message", [
    (["--n", "0"], "--n 0 is too small; accepted: a whole number >= 1"),
    (["--steps", "-1"], "--steps -1 is not a step count"),
    (["--guidance", "-1"], "--guidance -1.0 is not a guidance scale"),
    (["--seed", str(2**64 - 1), "--n", "2"], "--seed 18446744073709551615 + --n 2 - 1 (the last image's seed) "
                                              "18446744073709551616 is out of range"),
    (["--preset", "nosuch"], "unknown preset 'nosuch'"),
    (["--out", "{tmp}/a-file"], "--out {tmp}/a-file is not writable"),
])
def test_bad_eval_input_is_one_line_before_the_model_loads(tmp_path, flags, message):
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit) as exit:
        main(["eval", "--model", str(tmp_path / "never-loaded"), "--out", str(tmp_path / "eval")]
             + [flag.format(tmp=tmp_path) for flag in flags])
    assert message.format(tmp=tmp_path) in str(exit.value.code)
    assert sorted(tmp_path.iterdir()) == [tmp_path / "a-file"]


def test_size_the_loaded_pipeline_cannot_take_ends_before_generation(saved_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr("apps.checks.size_multiple", lambda pipe: 16)  # as SD3: VAE factor 8, patch 2
    monkeypatch.setattr("diffusers.StableDiffusionPipeline.__call__", None)  # generating would raise a TypeError
    with pytest.raises(SystemExit, match="--height 40 is not a size StableDiffusionPipeline takes; accepted: a positive "
                                         "multiple of 16"):
        main(["generate", "--model", str(saved_pipe), "--prompt", "a cat", "--height", "40", "--out", str(tmp_path / "a.png")])
    assert not (tmp_path / "a.png").exists()


def test_size_far_beyond_the_model_needs_allow_large(saved_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr("diffusers.StableDiffusionPipeline.__call__", None)  # generating would raise a TypeError
    out = tmp_path / "a.png"
    with pytest.raises(SystemExit, match="--width 256 is over 4x the 32 px this model makes; accepted: up to 128, "
                                         "or pass --allow-large"):
        main(["generate", "--model", str(saved_pipe), "--prompt", "a cat", "--width", "256", "--out", str(out)])
    assert not out.exists()


@pytest.mark.parametrize("error", [torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 TiB"),
                                   RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 9")])
def test_out_of_memory_is_one_line(saved_pipe, tmp_path, monkeypatch, error):
    def call(self, *args, **kwargs):
        raise error

    monkeypatch.setattr("diffusers.StableDiffusionPipeline.__call__", call)
    out = tmp_path / "a.png"
    with pytest.raises(SystemExit, match="^error: out of memory on cpu generating 1 image\\(s\\) of 8192 x default px; "
                                         "use a smaller size or fewer --num-images$"):
        main(["generate", "--model", str(saved_pipe), "--prompt", "a cat", "--height", "8192", "--allow-large",
              "--device", "cpu", "--out", str(out)])
    assert not out.exists()


def test_size_multiple_follows_the_denoiser(sd_pipe):
    from types import SimpleNamespace

    from apps.checks import size_multiple

    assert size_multiple(sd_pipe) == 8  # diffusers' SD pipelines check for 8 whatever the VAE (here 2)
    sd3 = SimpleNamespace(vae_scale_factor=8, transformer=SimpleNamespace(config=SimpleNamespace(patch_size=2)))
    assert size_multiple(sd3) == 16

    class Packing(SimpleNamespace):  # Flux: 2x2 latent packing whatever the transformer's patch_size
        def _pack_latents(self):
            pass

    assert size_multiple(Packing(vae_scale_factor=8, transformer=SimpleNamespace(config=SimpleNamespace(patch_size=1)))) == 16


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    unet, flow = capsys.readouterr().out.split("\nflow-matching pipelines (SD3, Flux, Sana): the same names\n")
    for family in (unet, flow):
        assert [line.split()[0] for line in family.strip().splitlines()] == ["quality", "balanced", "fast"]
    assert "regional torch.compile" in flow and "DPM-Solver++" not in flow


@pytest.mark.skipif(shutil.which("accel") is None, reason="console script not installed (pip install -e .)")
def test_console_script_runs():
    done = subprocess.run(["accel", "presets"], capture_output=True, text=True, check=True)
    assert "balanced" in done.stdout


def test_module_entry_point():
    done = subprocess.run([sys.executable, "-m", "apps.cli", "presets"], capture_output=True, text=True, check=True)
    assert "fast" in done.stdout


def test_prune_then_distill_commands(saved_pipe, tmp_path):
    """`accel prune` writes a loadable smaller UNet and its report; `accel distill` retrains it and saves the student."""
    import numpy as np
    from diffusers import UNet2DConditionModel

    teacher = UNet2DConditionModel.from_pretrained(saved_pipe / "unet")
    pruned = tmp_path / "small"
    assert main(["prune", "--model", str(saved_pipe), "--method", "bk-small", "--device", "cpu", "--out", str(pruned)]) == 0
    student = UNet2DConditionModel.from_pretrained(pruned)
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert student.mid_block is None and count(student) < count(teacher)
    assert list(pruned.glob("pruning_report.*"))

    data = tmp_path / "captions"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red car", "a black cat", "a ship"]):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    out = tmp_path / "kd"
    assert main(["distill", "--teacher", str(saved_pipe), "--student", str(pruned), "--data", str(data), "--steps", "2",
                 "--batch-size", "2", "--device", "cpu", "--out", str(out)]) == 0
    trained = UNet2DConditionModel.from_pretrained(out / "unet")
    assert trained.config.block_out_channels == student.config.block_out_channels
    changed = any(not np.array_equal(a.detach().numpy(), b.detach().numpy())
                  for a, b in zip(trained.parameters(), student.parameters()))
    assert changed  # two optimizer steps moved the weights


def test_sdxl_prune_laptop_distill_and_distill_lcm_commands(sdxl_pipe, tmp_path):
    """The same commands on an SDXL pipeline: pooled text embeds and time ids reach calibration, KD and LCM."""
    import numpy as np
    import torch

    import pruning

    sdxl_pipe.save_pretrained(tmp_path / "sdxl")
    teacher, laptop = tmp_path / "sdxl", tmp_path / "laptop"
    assert main(["prune", "--model", str(teacher), "--method", "laptop", "--ratio", "0.2", "--calibration-prompts", "1",
                 "--calibration-timesteps", "2", "--device", "cpu", "--out", str(laptop)]) == 0
    student = pruning.load_unet(laptop)
    assert student.config.removed_blocks and student.config.addition_embed_type == "text_time"
    data = tmp_path / "captions"
    data.mkdir()
    rng = np.random.default_rng(0)
    for i, caption in enumerate(["a red car", "a ship"]):
        Image.fromarray((rng.random((32, 32, 3)) * 255).astype("uint8")).save(data / f"{i}.png")
        (data / f"{i}.txt").write_text(caption)
    assert main(["distill", "--teacher", str(teacher), "--student", str(laptop), "--data", str(data), "--steps", "1",
                 "--batch-size", "2", "--device", "cpu", "--out", str(tmp_path / "kd")]) == 0
    trained = pruning.load_unet(tmp_path / "kd" / "unet")
    assert any(not torch.equal(a, b) for a, b in zip(trained.state_dict().values(), student.state_dict().values()))
    assert main(["distill-lcm", "--teacher", str(teacher), "--data", str(data), "--out", str(tmp_path / "lcm"),
                 "--lora-rank", "2", "--steps", "1", "--batch-size", "2", "--gradient-checkpointing", "--device", "cpu"]) == 0
    assert (tmp_path / "lcm" / "pytorch_lora_weights.safetensors").is_file()


def test_eval_writes_its_report(saved_pipe, tmp_path, capsys, no_compile):
    """`accel eval` end to end: at 16x16 (a UNet config of 8x8 latents) no CIFAR-10 classifier applies, so it
    measures latency and fidelity to the baseline only; on a CPU the preset runs without torch.compile."""
    import json

    config = saved_pipe / "unet" / "config.json"
    config.write_text(json.dumps(dict(json.loads(config.read_text()), sample_size=8)))
    out = tmp_path / "eval"
    assert main(["eval", "--model", str(saved_pipe), "--preset", "balanced", "--n", "2", "--steps", "1",
                 "--batch-size", "2", "--device", "cpu", "--out", str(out)]) == 0
    result = json.loads((out / "eval.json").read_text())
    assert (result["n"], result["image_size"], result["preset"]) == (2, [16, 16], "balanced")
    assert "compile=None" in result["config"] and "cuda_graph=False" in result["config"]
    assert result["accelerated"]["ssim"] > 0 and "| balanced |" in (out / "eval.md").read_text()
    printed = capsys.readouterr()
    assert str(out / "eval.json") in printed.out and "so they were left out (preset 'balanced')" in printed.err


def test_transformers_torchvision_fallback_note_is_dropped():
    import logging

    import apps  # noqa: F401  (installs the filter)

    logger = logging.getLogger("transformers.utils.import_utils")
    seen = []
    handler = logging.Handler()
    handler.emit = lambda record: seen.append(record.getMessage())
    logger.addHandler(handler)
    try:
        logger.warning("`CLIPImageProcessor` requires torchvision (not installed); falling back to "
                       "`CLIPImageProcessorPil` for backward compatibility.")
        logger.warning("another note")
    finally:
        logger.removeHandler(handler)
    assert seen == ["another note"]
