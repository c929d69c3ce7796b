"""`accel batch` on a tiny pipeline saved to disk: data parallel over gloo, resumable, manifest, errors."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from apps import batch_generate
from apps.batch_generate import ShardWriter, batches, generate, read_prompts, shard_path
from apps.cli import main
from tiny import tiny_sd_pipeline

REPO = Path(__file__).resolve().parents[1]
TINY = ["--steps", "1", "--height", "32", "--width", "32", "--device", "cpu", "--no-progress"]


@pytest.fixture(scope="module")
def saved_pipe(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("pipe")
    tiny_sd_pipeline(tmp).save_pretrained(tmp / "tiny")
    return tmp / "tiny"


def batch(*args) -> int:
    return main(["batch", *map(str, args)])


def manifest(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "manifest.jsonl").read_text().splitlines()]


def shard_records(out: Path) -> list[dict]:
    records = []
    for path in sorted(out.glob("manifest.rank*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                records.append(json.loads(line))
            except ValueError:
                pass
    return records


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


def subprocess_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_gloo_processes_make_the_same_images_as_one(saved_pipe, tmp_path):
    """Bit-identical where both runs use the same number of CPU threads (here 1: conftest, OMP_NUM_THREADS), as the
    README states; each item is made in the same batch of 2 whatever the world size."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\n\na green bird\na horse\na ship\na tree\n")
    one, two = tmp_path / "one", tmp_path / "two"
    assert batch(prompts, "--model", saved_pipe, "--out", one, "--batch-size", 2, *TINY) == 0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           "-m", "apps.cli", "batch", str(prompts), "--model", str(saved_pipe), "--out", str(two), "--batch-size", "2", *TINY]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "on 2 process(es)" in done.stdout and "1 CPU thread(s)" in done.stdout

    first, second = manifest(one), manifest(two)
    assert [r["index"] for r in first] == [r["index"] for r in second] == [0, 1, 2, 3, 4, 5]
    assert all(r["status"] == "ok" for r in first + second)
    assert {r["rank"] for r in second} == {0, 1}  # the work really was split
    assert [r["seed"] for r in second] == [0, 1, 2, 3, 4, 5]
    assert [r["batch_size"] for r in first] == [r["batch_size"] for r in second] == [2] * 6
    for r in first:
        np.testing.assert_array_equal(pixels(one / r["file"]), pixels(two / r["file"]))
    # Different seeds give different images, so equality above is not vacuous.
    assert not np.array_equal(pixels(one / first[0]["file"]), pixels(one / first[1]["file"]))


def test_killed_run_resumes_without_duplicates_or_gaps(saved_pipe, tmp_path):
    n = 40
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(n)))
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "apps.cli", "batch", str(prompts), "--model", str(saved_pipe), "--out", str(out), *TINY]
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    shard = shard_path(out, 0)
    try:
        deadline = time.monotonic() + 100
        while not (shard.exists() and '"ok"' in shard.read_text()):
            assert proc.poll() is None, "the run ended before it could be killed"
            assert time.monotonic() < deadline, "no item finished in time"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait()
    before = [r for r in shard_records(out) if r["status"] == "ok"]
    assert 1 <= len(before) < n, "the kill must land midway"
    # What a kill can leave: a manifest line cut short and an image never renamed into place.
    with open(shard, "a") as f:
        f.write('{"index": 39, "key": "x", "status": "ok", "fi')
    (out / f".{n - 1:06d}.png.tmp-99999").write_bytes(b"\x89PNG half")

    assert batch(prompts, "--model", saved_pipe, "--out", out, *TINY) == 0
    merged = manifest(out)
    assert [r["index"] for r in merged] == list(range(n))
    assert all(r["status"] == "ok" for r in merged)
    assert all(Image.open(out / r["file"]).size == (32, 32) for r in merged)
    ok_records = [r for r in shard_records(out) if r["status"] == "ok"]
    assert sorted(r["index"] for r in ok_records) == list(range(n))  # each item generated exactly once
    assert ok_records[: len(before)] == before  # the items done before the kill were skipped, not redone
    assert not list(out.glob(".*tmp*"))
    assert sorted(p.name for p in out.glob("*.png")) == [f"{i:06d}.png" for i in range(n)]


def test_resume_makes_again_an_image_cut_short(saved_pipe, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "out"
    assert batch(prompts, "--model", saved_pipe, "--out", out, *TINY) == 0
    whole = (out / "000001.png").read_bytes()
    (out / "000001.png").write_bytes(whole[: len(whole) // 2])  # marked ok in the manifest, but truncated
    assert batch(prompts, "--model", saved_pipe, "--out", out, *TINY) == 0
    assert (out / "000001.png").read_bytes() == whole
    assert sorted(r["index"] for r in shard_records(out) if r["status"] == "ok") == [0, 1, 1]


@pytest.mark.parametrize(
    "name, text, message",
    [
        ("p.jsonl", '{"prompt": "a cat"}\n\n{"prompt": "a dog",\n', r"line 3: not valid JSON"),
        ("p.jsonl", '{"prompt": "a cat"}\n{"prompt": "a dog", "steps": "many"}\n', r"line 2: steps must be an integer"),
        ("p.jsonl", '{"prompt": "a cat", "sead": 3}\n', r"line 1: unknown field 'sead'"),
        ("p.jsonl", '{"prompt": "a cat"}\n["a dog"]\n', r"line 2: expected a JSON object"),
        ("p.csv", "text,seed\na cat,1\n", r"line 1: the CSV header has no 'prompt' column"),
        ("p.csv", "prompt,seed\na cat,1\na dog,two\n", r"line 3: seed must be an integer"),
        ("p.csv", "prompt,seed\na cat,1,9\n", r"line 2: more cells than the header"),
        # the ranges of `accel generate` and of the flags below
        ("p.jsonl", '{"prompt": "a cat"}\n{"prompt": " "}\n', r"line 2: prompt is empty; accepted: any text"),
        ("p.jsonl", '{"prompt": "a cat", "steps": 0}\n', r"line 1: steps 0 is not a step count; accepted: a whole number"),
        ("p.jsonl", '{"prompt": "a cat", "guidance": -5}\n', r"line 1: guidance -5.0 is not a guidance scale; accepted"),
        ("p.csv", "prompt,height\na cat,33\n", r"line 2: height 33 is not an image size; accepted: a positive multiple of 8"),
        ("p.jsonl", '{"prompt": "a cat", "seed": -1}\n', r"line 1: seed -1 is out of range; accepted: 0 to 2\*\*64 - 1"),
    ],
)
def test_malformed_line_stops_the_run_before_any_work(tmp_path, name, text, message):
    prompts = tmp_path / name
    prompts.write_text(text)
    out = tmp_path / "out"
    with pytest.raises(SystemExit, match=message):
        batch(prompts, "--model", tmp_path / "never-loaded", "--out", out, *TINY)
    assert not out.exists()


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--steps", "0"], "--steps 0 is not a step count; accepted: a whole number of denoising steps >= 1"),
        (["--guidance", "-5"], "--guidance -5.0 is not a guidance scale; accepted: a number >= 0"),
        (["--height", "33"], "--height 33 is not an image size; accepted: a positive multiple of 8"),
        (["--width", "0"], "--width 0 is not an image size"),
        (["--seed", "-1"], "--seed -1 is out of range; accepted: 0 to 2**64 - 1"),
        (["--seed", str(2**64 - 1)], "p.txt: line 2: seed 18446744073709551615 + item index 1 = 18446744073709551616 "
                                     "is out of range"),
        (["--batch-size", "0"], "--batch-size 0 is too small; accepted: a whole number >= 1"),
    ],
)
def test_flags_are_checked_as_the_prompt_file_fields_are(tmp_path, flags, message):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\na dog\n")
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit:
        batch(prompts, "--model", tmp_path / "never-loaded", "--out", out, *TINY, *flags)
    assert str(exit.value.code).startswith("error: ") and message in str(exit.value.code)
    assert not out.exists()


def test_size_the_loaded_pipeline_cannot_take_stops_the_run_before_generation(saved_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr("apps.checks.size_multiple", lambda pipe: 16)  # as SD3: VAE factor 8, patch 2
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "width": 40}\n')
    with pytest.raises(SystemExit, match=r"p.jsonl: line 2: width 40 is not a size StableDiffusionPipeline takes; "
                                         r"accepted: a positive multiple of 16"):
        batch(prompts, "--model", saved_pipe, "--out", tmp_path / "out", "--steps", "1", "--device", "cpu")
    (tmp_path / "p.txt").write_text("a cat\n")
    with pytest.raises(SystemExit, match=r"--height 24 is not a size StableDiffusionPipeline takes"):
        batch(tmp_path / "p.txt", "--model", saved_pipe, "--out", tmp_path / "out", *TINY, "--height", "24")
    assert not list((tmp_path / "out").glob("*.png")) and not list((tmp_path / "out").glob("manifest*"))


def test_bad_input_is_a_clear_error(saved_pipe, tmp_path):
    good = tmp_path / "good.txt"
    good.write_text("a cat\n")
    (tmp_path / "empty.txt").write_text("\n  \n")
    (tmp_path / "a-file").write_text("")
    with pytest.raises(SystemExit, match="does not exist"):
        batch(tmp_path / "missing.txt", "--out", tmp_path / "out", *TINY)
    with pytest.raises(SystemExit, match="has no prompts"):
        batch(tmp_path / "empty.txt", "--out", tmp_path / "out", *TINY)
    with pytest.raises(SystemExit, match="unknown preset 'warp'; valid presets: quality"):
        batch(good, "--preset", "warp", "--out", tmp_path / "out", *TINY)
    with pytest.raises(SystemExit, match="is not writable"):
        batch(good, "--model", saved_pipe, "--out", tmp_path / "a-file" / "out", *TINY)


def test_compiling_preset_leaves_compile_out_on_cpu(saved_pipe, tmp_path, capsys, no_compile):
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    assert batch(prompts, "--model", saved_pipe, "--out", tmp_path / "out", "--preset", "balanced", *TINY) == 0
    assert manifest(tmp_path / "out")[0]["status"] == "ok"
    assert "so they were left out (preset 'balanced')" in capsys.readouterr().err


def test_failing_items_are_recorded_the_rest_complete_and_the_exit_status_says_so(saved_pipe, tmp_path, monkeypatch,
                                                                                    capsys):
    real = batch_generate._call

    def call(pipe, items):  # the real pipeline, failing on "boom" as it would on memory
        if any("boom" in item.prompt for item in items):
            raise RuntimeError("out of memory (simulated)")
        return real(pipe, items)

    monkeypatch.setattr(batch_generate, "_call", call)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(
        '{"prompt": "a cat"}\n'
        '{"prompt": "a boom"}\n'
        '{"prompt": "a bird", "seed": 7, "negative_prompt": "blurry"}\n'
    )
    out = tmp_path / "out"
    assert batch(prompts, "--model", saved_pipe, "--out", out, "--batch-size", 3, *TINY) == 1
    merged = manifest(out)
    assert [r["status"] for r in merged] == ["ok", "error", "ok"]
    assert "out of memory" in merged[1]["error"] and merged[1]["line"] == 2
    assert not (out / merged[1]["file"]).exists()
    assert [r["seed"] for r in merged] == [0, 1, 7] and merged[2]["negative_prompt"] == "blurry"
    assert all((out / r["file"]).is_file() for r in merged if r["status"] == "ok")
    assert "batch: 1 item(s) failed; exit status 1" in capsys.readouterr().err
    assert batch(prompts, "--model", saved_pipe, "--out", out, *TINY) == 1  # a re-run retries the failed item only

    every = tmp_path / "every.txt"
    every.write_text("boom one\nboom two\n")
    assert batch(every, "--model", saved_pipe, "--out", tmp_path / "none", *TINY) == 1
    assert [r["status"] for r in manifest(tmp_path / "none")] == ["error", "error"]


class FlakyPipe:
    """Stands in for a pipeline: raises on a batch holding "boom", returns NaN pixels for "nan"."""

    def __init__(self):
        self.calls = []

    def __call__(self, prompt, generator, **kwargs):
        self.calls.append(list(prompt))
        if "boom" in prompt:
            raise RuntimeError("CUDA out of memory (simulated)")
        images = np.stack([np.full((8, 8, 3), g.initial_seed() / 10, dtype=np.float32) for g in generator])
        images[[p == "nan" for p in prompt]] = np.nan
        return type("Output", (), {"images": images})()


def test_a_failing_batch_is_retried_item_by_item(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\nboom\nnan\nfour\n")
    items = read_prompts(prompts, steps=1)
    pipe, writer = FlakyPipe(), ShardWriter(shard_path(tmp_path, 0))
    stats = generate(pipe, batches(items, 4), tmp_path, writer)
    writer.close()
    records = {r["index"]: r for r in shard_records(tmp_path)}
    assert pipe.calls == [["one", "boom", "nan", "four"], ["one"], ["boom"], ["nan"], ["four"]]
    assert [records[i]["status"] for i in range(4)] == ["ok", "error", "error", "ok"]
    assert "out of memory" in records[1]["error"] and "NaN" in records[2]["error"]
    assert stats["ok"] == 2 and stats["error"] == 2
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["000000.png", "000003.png"]


def test_items_already_done_are_made_with_their_batch_but_not_written(tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("one\ntwo\nthree\n")
    pipe, writer = FlakyPipe(), ShardWriter(shard_path(tmp_path, 0))
    generate(pipe, batches(read_prompts(prompts, steps=1), 2), tmp_path, writer, done={0})
    writer.close()
    assert pipe.calls == [["one", "two"], ["three"]]
    assert [r["index"] for r in shard_records(tmp_path)] == [1, 2]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["000001.png", "000002.png"]


def test_a_size_far_over_the_models_own_needs_allow_large(saved_pipe, tmp_path, monkeypatch):
    monkeypatch.setattr("apps.checks.native_size", lambda pipe: 32)  # as the embedded model: limit 128
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a cat"}\n{"prompt": "a dog", "height": 256}\n')
    with pytest.raises(SystemExit, match=r"p.jsonl: line 2: height 256 is over 4x the 32 px this model makes; "
                                         r"accepted: up to 128, or pass --allow-large"):
        batch(prompts, "--model", saved_pipe, "--out", tmp_path / "out", *TINY)
    assert not list((tmp_path / "out").glob("*.png")) and not list((tmp_path / "out").glob("manifest*"))
    assert batch(prompts, "--model", saved_pipe, "--out", tmp_path / "out", *TINY, "--allow-large") == 0
    assert sorted(Image.open(f).height for f in (tmp_path / "out").glob("*.png")) == [32, 256]


def test_an_image_of_another_size_than_asked_is_an_error_not_a_record(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a", "height": 8, "width": 8}\n{"prompt": "b", "height": 16, "width": 8}\n')
    writer = ShardWriter(shard_path(tmp_path, 0))
    generate(FlakyPipe(), batches(read_prompts(prompts, steps=1), 1), tmp_path, writer)  # FlakyPipe makes 8x8
    writer.close()
    records = shard_records(tmp_path)
    assert [r["status"] for r in records] == ["ok", "error"]
    assert "made 8x8 pixels (height x width), not 16x8" in records[1]["error"]
    assert sorted(p.name for p in tmp_path.glob("*.png")) == ["000000.png"]


def test_seeds_follow_the_item_not_the_batch(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n{"prompt": "b", "steps": 4}\n{"prompt": "c", "seed": 42}\n{"prompt": "d"}\n')
    items = read_prompts(prompts, seed=100, steps=2)
    assert [i.seed for i in items] == [100, 101, 42, 103]
    assert [i.line for i in items] == [1, 2, 3, 4]
    assert [[i.index for i in b] for b in batches(items, 2)] == [[0, 2], [3], [1]]


def test_shape_batches_picks_one_batch_of_each_compiled_shape(tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"prompt": "a"}, {"prompt": "b"}, {"prompt": "c"},  # batch of 2, then a batch of 1 (a new batch size)
        {"prompt": "d", "height": 64}, {"prompt": "e", "guidance": 1.0}]) + "\n")
    items = read_prompts(prompts, seed=0, guidance=7.5, height=32, width=32)
    picked = batch_generate.shape_batches(batches(items, 2))
    shapes = [(b[0].height, len(b), b[0].guidance > 1) for b in picked]
    assert sorted(shapes) == sorted({(32, 2, True), (32, 1, True), (64, 1, True), (32, 1, False)})


def test_compiling_preset_keeps_its_artifacts_in_the_output_folder(saved_pipe, tmp_path, monkeypatch):
    """The artifacts go to OUT/.compile-artifacts, one set per shape, and a re-run loads them (torch.compile and the
    artifact calls stubbed: on a CPU the batch leaves compilation out, and the round trip is tests/test_compile_artifacts'
    job)."""
    import torch

    import accel
    import apps.loading

    saves, loads = [], []
    monkeypatch.setattr(torch, "compile", lambda fn, **kwargs: fn)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: saves.append(1) or (b"compiled", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loads.append(data) or "info")
    monkeypatch.setattr(apps.loading, "preset_config",
                        lambda preset, pipe, say=True: accel.AccelConfig(runtime=accel.RuntimeConfig(compile="full")))
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na ship\n")
    out = tmp_path / "out"
    limit = torch._dynamo.config.recompile_limit
    assert batch(prompts, "--model", saved_pipe, "--out", out, "--batch-size", 2, "--preset", "balanced", *TINY) == 0
    assert torch._dynamo.config.recompile_limit == limit  # restored at the end: the compile's settings went back
    assert len(saves) == 2 and loads == []  # batch sizes 2 and 1: two shapes
    assert len(list((out / batch_generate.ARTIFACTS).glob("*.bin"))) == 2
    for image in out.glob("*.png"):
        image.unlink()  # the re-run makes them again, loading what the first run saved
    assert batch(prompts, "--model", saved_pipe, "--out", out, "--batch-size", 2, "--preset", "balanced", *TINY) == 0
    assert len(loads) == 2 and len(saves) == 2
    assert batch_generate.shared_artifacts(None, out) is None
    kept = accel.AccelConfig(runtime=accel.RuntimeConfig(compile="full", compile_cache="/elsewhere"))
    assert batch_generate.shared_artifacts(kept, out) == kept


_PATCHES = '''
import os, torch
import accel, apps.loading
rank = os.environ.get("RANK", "0")
log = os.environ["ACCEL_TEST_LOG"]

def _note(what):
    with open(log, "a") as f:
        f.write(f"{rank} {what}\\n")

torch.compile = lambda fn, **kwargs: fn
torch.compiler.save_cache_artifacts = lambda: _note("save") or (b"compiled", None)
torch.compiler.load_cache_artifacts = lambda data: _note("load") or "info"
apps.loading.preset_config = lambda preset, pipe, say=True: accel.AccelConfig(runtime=accel.RuntimeConfig(compile="full"))
'''


def test_two_processes_share_one_artifact_set(saved_pipe, tmp_path):
    """Rank 0 compiles every pending shape and saves; rank 1 waits for it, then loads: nothing saved twice, no hang.
    (torch.compile and the artifact calls stubbed by a module the launcher imports in both processes.)"""
    site = tmp_path / "site"
    site.mkdir()
    (site / "accel_test_patches.py").write_text(_PATCHES)
    launcher = tmp_path / "launch.py"
    launcher.write_text("import accel_test_patches, sys\nfrom apps.cli import main\nsys.exit(main())\n")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\na blue dog\na ship\na tree\na horse\n")
    out, log = tmp_path / "out", tmp_path / "log.txt"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(free_port()),
           str(launcher), "batch", str(prompts), "--model", str(saved_pipe), "--out", str(out), "--batch-size", "2",
           "--preset", "balanced", *TINY]
    env = dict(subprocess_env(), PYTHONPATH=os.pathsep.join([str(site), str(REPO)]), ACCEL_TEST_LOG=str(log))
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=110)
    assert done.returncode == 0, done.stderr[-3000:]
    events = log.read_text().split("\n")
    # Batches (2, 2, 1) dealt to ranks 0, 1, 0: rank 0 saves sizes 2 and 1 ahead; rank 1 loads size 2
    assert sorted(e for e in events if e.startswith("0")) == ["0 save", "0 save"]
    assert [e for e in events if e.startswith("1")] == ["1 load"]
    assert len(list((out / batch_generate.ARTIFACTS).glob("*.bin"))) == 2
    assert all(r["status"] == "ok" for r in manifest(out)) and len(manifest(out)) == 5
