"""The `accel` CLI end to end on a tiny pipeline saved to a temporary folder."""

import shutil
import subprocess
import sys

import pytest
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


def test_generate_several_images(saved_pipe, tmp_path):
    out = tmp_path / "img.png"
    main(["generate", "--model", str(saved_pipe), "--prompt", "x", "--steps", "1", "--num-images", "2", "--out", str(out)])
    assert (tmp_path / "img-0.png").exists() and (tmp_path / "img-1.png").exists()


def test_missing_model_folder_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit, match="no model_index.json"):
        main(["generate", "--model", str(tmp_path / "empty"), "--prompt", "x"])


def test_unknown_preset_is_a_clear_error(saved_pipe, tmp_path):
    with pytest.raises(ValueError, match="valid presets"):
        main(["generate", "--model", str(saved_pipe), "--prompt", "x", "--preset", "warp", "--out", str(tmp_path / "a.png")])


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    names = [line.split()[0] for line in capsys.readouterr().out.splitlines()]
    assert names == ["quality", "balanced", "fast"]


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
