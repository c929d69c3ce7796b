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
