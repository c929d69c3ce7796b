"""Portable compile artifacts (`RuntimeConfig(compile_cache=...)`, `accel precompile`): the key, the mismatch
reasons, the load / save around pipeline calls, and a real round trip into an empty inductor cache."""

import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from tiny import run

import accel
from accel.runtime import aot, artifacts
from accel.runtime.artifacts import call_shapes, key_digest, key_fields, key_for, load_artifacts, runtime_fields, save_artifacts

@pytest.fixture
def saved_pipe(sd_pipe, tmp_path):
    sd_pipe.save_pretrained(tmp_path / "tiny")
    return tmp_path / "tiny"


MODEL = {"denoiser": "UNet2DConditionModel", "model_config": "abc", "dtype": "float16", "device": "NVIDIA H200"}
SHAPES = {"height": 512, "width": 512, "batch": 1, "guidance": True}
CONFIG = accel.RuntimeConfig(compile="full", cuda_graph=True)


def test_key_changes_with_torch_dtype_size_and_config():
    base = key_digest(key_fields(MODEL, CONFIG, SHAPES, "2.11.0"))
    assert base == key_digest(key_fields(MODEL, CONFIG, SHAPES, "2.11.0"))
    assert key_digest(key_fields(MODEL, CONFIG, SHAPES, "2.13.0")) != base
    assert key_digest(key_fields({**MODEL, "dtype": "bfloat16"}, CONFIG, SHAPES, "2.11.0")) != base
    assert key_digest(key_fields({**MODEL, "device": "cpu"}, CONFIG, SHAPES, "2.11.0")) != base
    assert key_digest(key_fields(MODEL, CONFIG, {**SHAPES, "height": 768}, "2.11.0")) != base
    assert key_digest(key_fields(MODEL, CONFIG, {**SHAPES, "batch": 2}, "2.11.0")) != base
    assert key_digest(key_fields(MODEL, accel.RuntimeConfig(compile="regional", cuda_graph=True), SHAPES, "2.11.0")) != base
    # where the artifacts are kept is not part of what they hold
    kept = accel.RuntimeConfig(compile="full", cuda_graph=True, compile_cache="/somewhere")
    assert key_digest(key_fields(MODEL, kept, SHAPES, "2.11.0")) == base
    # nor whether graphs capture the compiled code: `accel precompile` on a CPU leaves them out, a preset keeps them
    assert key_digest(key_fields(MODEL, accel.RuntimeConfig(compile="full"), SHAPES, "2.11.0")) == base
    # a field added since keys were first saved leaves them as they were at its default, and counts when set
    assert "quantize_min_out_features" not in runtime_fields(CONFIG)
    wide = accel.RuntimeConfig(compile="full", cuda_graph=True, quantize="fp8", quantize_min_out_features=3072)
    assert "quantize_min_out_features=3072" in runtime_fields(wide)


def test_key_follows_the_pipeline(sd_pipe):
    arguments = {"prompt": "a", "height": 32, "width": 32, "num_images_per_prompt": 1, "guidance_scale": 7.5}
    fields = key_for(sd_pipe, CONFIG, arguments)
    assert fields["dtype"] == "float32" and fields["device"] == "cpu" and fields["torch"] == torch.__version__
    assert call_shapes({**arguments, "prompt": ["a", "b"], "num_images_per_prompt": 2})["batch"] == 4
    assert not call_shapes({**arguments, "guidance_scale": 1.0})["guidance"]
    default = sd_pipe.unet.config.sample_size * sd_pipe.vae_scale_factor
    assert key_for(sd_pipe, CONFIG, {**arguments, "height": None, "width": None}) == \
        key_for(sd_pipe, CONFIG, {**arguments, "height": default, "width": default})
    sd_pipe.unet.register_to_config(_name_or_path="/another/folder")  # the same model, loaded from elsewhere
    assert key_for(sd_pipe, CONFIG, arguments) == fields
    sd_pipe.unet.to(torch.float16)
    assert key_for(sd_pipe, CONFIG, arguments)["dtype"] == "float16"
    sd_pipe.unet.register_to_config(cross_attention_dim=64)  # another model architecture
    assert key_for(sd_pipe, CONFIG, arguments)["model_config"] != fields["model_config"]


def test_compile_cache_is_validated():
    with pytest.raises(ValueError, match="compile is None"):
        accel.RuntimeConfig(compile_cache="/tmp/artifacts")
    with pytest.raises(ValueError, match="folder path"):
        accel.RuntimeConfig(compile="full", compile_cache=3)
    assert accel.RuntimeConfig(compile="full", compile_cache=Path("/tmp/a")).compile_cache == "/tmp/a"


def test_mismatch_logs_the_reason_and_falls_back(tmp_path, caplog, monkeypatch):
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled", None))
    loads = []
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loads.append(data) or "info")
    here = key_fields(MODEL, CONFIG, SHAPES)
    caplog.set_level(logging.INFO, logger=artifacts.__name__)
    assert not load_artifacts(here, tmp_path / "none")
    assert "no matching artifacts: none saved in" in caplog.text
    save_artifacts({**here, "torch": "2.11.0"}, tmp_path)
    caplog.clear()
    assert not load_artifacts(here, tmp_path) and loads == []
    assert f"no matching artifacts: torch differs (saved '2.11.0', here '{torch.__version__}')" in caplog.text
    save_artifacts(here, tmp_path)
    caplog.clear()
    assert load_artifacts(here, tmp_path) and loads == [b"compiled"]
    assert "loaded compile artifacts from" in caplog.text


def test_damaged_artifacts_fall_back(tmp_path, caplog, monkeypatch):
    here = key_fields(MODEL, CONFIG, SHAPES)
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"not a cache", None))
    save_artifacts(here, tmp_path)
    monkeypatch.undo()
    caplog.set_level(logging.INFO, logger=artifacts.__name__)
    assert not load_artifacts(here, tmp_path)  # torch's own loader refuses the bytes
    assert "no matching artifacts: could not load" in caplog.text


def test_accelerate_loads_before_the_first_call_and_saves_after(sd_pipe, tmp_path, caplog, monkeypatch):
    """Compiled code is stubbed (calls run eagerly): the first call of each new shape loads, else saves once."""
    tmp_path = tmp_path / "artifacts"
    saves, loads = [], []
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: saves.append(1) or (b"compiled", None))
    monkeypatch.setattr(torch.compiler, "load_cache_artifacts", lambda data: loads.append(data) or "info")
    caplog.set_level(logging.INFO, logger=artifacts.__name__)
    config = accel.AccelConfig(runtime=accel.RuntimeConfig(compile="full", compile_cache=str(tmp_path)))
    baseline = run(sd_pipe, height=32, width=32)
    accel.accelerate(sd_pipe, config)
    with torch.compiler.set_stance("force_eager"):
        run(sd_pipe, height=32, width=32)
        run(sd_pipe, height=32, width=32)  # shapes seen: nothing loaded or saved again
        assert len(saves) == 1 and loads == [] and len(list(tmp_path.glob("*.bin"))) == 1
        run(sd_pipe, height=40, width=32)  # new shapes: a second key
        assert len(saves) == 2 and len(list(tmp_path.glob("*.json"))) == 2
    fields = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert fields["width"] == 32 and fields["height"] in (32, 40) and fields["torch"] == torch.__version__
    accel.restore(sd_pipe)
    assert run(sd_pipe, height=32, width=32).tobytes() == baseline.tobytes()  # restored, nothing left behind
    assert len(saves) == 2 and loads == []
    accel.accelerate(sd_pipe, config)  # a later process: the saved artifacts load, nothing is saved
    with torch.compiler.set_stance("force_eager"):
        run(sd_pipe, height=32, width=32)
    accel.restore(sd_pipe)
    assert loads == [b"compiled"] and len(saves) == 2
    assert "loaded compile artifacts from" in caplog.text


def test_a_save_waits_for_the_background_compile_and_a_restore_before_it_says_so(sd_pipe, tmp_path, caplog,
                                                                                    monkeypatch):
    """The save of a shape whose compile runs in the background moves to a later call's end; restored first, one log
    line says the artifacts were not saved (the session stubbed: only the cache's own bookkeeping runs)."""
    from types import SimpleNamespace

    compiling = [True]
    monkeypatch.setattr(artifacts, "compile_pending", lambda module: compiling[0])
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled", None))
    caplog.set_level(logging.INFO, logger=artifacts.__name__)
    session = SimpleNamespace(call_arguments={"prompt": "a", "height": 32, "width": 32, "guidance_scale": 7.5},
                              add_call_listener=lambda fn: None, add_call_end_listener=lambda fn: None,
                              remove_call_listener=lambda fn: None, remove_call_end_listener=lambda fn: None)
    config = accel.RuntimeConfig(compile="full", compile_background=True, compile_cache=str(tmp_path / "a"))
    cache = artifacts.ArtifactCache(sd_pipe, config, session, compiled=[sd_pipe.unet])
    cache.begin(session)
    cache.end(session, True)  # the first call's end: the compile has only started
    assert cache.saved == [] and len(cache.unsaved) == 1 and "saved once the background compile is over" in caplog.text
    cache.end(session, True)  # still compiling
    assert cache.saved == []
    compiling[0] = False
    cache.end(session, True)  # the first call's end after it: saved
    assert len(cache.saved) == 1 and cache.unsaved == []
    compiling[0] = True
    session.call_arguments = {**session.call_arguments, "height": 40}
    cache.begin(session)
    cache.end(session, True)
    cache.remove()
    assert len(cache.saved) == 1 and "were not saved to" in caplog.text


def test_a_failed_call_saves_nothing(sd_pipe, tmp_path, monkeypatch):
    tmp_path = tmp_path / "artifacts"
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled", None))
    accel.accelerate(sd_pipe, accel.AccelConfig(runtime=accel.RuntimeConfig(compile="full", compile_cache=str(tmp_path))))
    with torch.compiler.set_stance("force_eager"), pytest.raises(ValueError):
        run(sd_pipe, height=33, width=32)  # diffusers refuses the size
    accel.restore(sd_pipe)
    assert not tmp_path.exists()


# A child process's start: the tiny pipeline (its folder argv[3]) and its eager output, then RUNTIME (a RuntimeConfig
# expression, with the artifacts folder argv[2]) applied.
_CHILD_START = textwrap.dedent("""
    import json, logging, sys, time, torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    logging.basicConfig(level=logging.INFO)
    import accel
    from accel.runtime import background_compile_report, compile_cache_report
    from tiny import tiny_sd_pipeline, run
    from torch._dynamo.utils import counters
    from pathlib import Path
    pipe = tiny_sd_pipeline(Path(sys.argv[3]))
    eager = run(pipe, steps=1, height=32, width=32)
    accel.accelerate(pipe, accel.AccelConfig(runtime=RUNTIME))
""")

_CHILD = _CHILD_START.replace("RUNTIME", 'accel.RuntimeConfig(compile="full", compile_cache=sys.argv[2])') + \
    textwrap.dedent("""
    from accel.runtime.artifacts import saving_whole_forwards
    with saving_whole_forwards():  # as `accel precompile` saves
        out = run(pipe, steps=1, height=32, width=32)
    again = run(pipe, steps=1, height=32, width=32)
    print("RESULT " + json.dumps({"inductor": dict(counters["inductor"]), "graphs": counters["stats"]["unique_graphs"],
                                  "report": compile_cache_report(pipe), "close": bool(abs(out - eager).max() < 1e-4),
                                  "again_equal": bool((again == out).all())}))
""")


def _fresh_process(tmp_path: Path, name: str, child: str = _CHILD) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / f"inductor-{name}"), TORCHINDUCTOR_COMPILE_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    (tmp_path / name).mkdir()
    done = subprocess.run([sys.executable, "-c", child, str(Path(__file__).parent), str(tmp_path / "artifacts"),
                           str(tmp_path / name)], env=env, capture_output=True, text=True, timeout=900)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, done.stderr[-3000:]
    return {**json.loads(line[7:]), "log": done.stderr}


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on CPU")
def test_artifacts_fill_an_empty_inductor_cache(tmp_path):
    """A process compiles the tiny UNet and saves its artifacts and its whole compiled forward (`aot.py`); a second
    one, on an empty inductor cache, loads the whole forward and runs it without tracing anything; a third, the whole
    forward deleted, loads the artifacts and compiles from them: inductor's graph cache hits, nothing generated anew."""
    first = _fresh_process(tmp_path, "first")
    assert first["close"] and first["inductor"].get("fxgraph_cache_miss", 0) >= 1, first
    assert "no matching artifacts: none saved in" in first["log"] and "saved compile artifacts to" in first["log"]
    wholes = sorted((tmp_path / "artifacts").glob("*.aot"))
    assert [p.name.split(".")[1] for p in wholes] == ["UNet2DConditionModel"], first["log"][-2000:]
    assert str(wholes[0]) in first["report"]["saved"]
    second = _fresh_process(tmp_path, "second")
    assert second["close"] and second["again_equal"] and "loaded 1 saved compiled forward(s)" in second["log"], \
        second["log"][-2000:]
    assert second["graphs"] == 0 and not second["inductor"].get("fxgraph_cache_miss")  # no trace, no compile
    assert str(wholes[0]) in second["report"]["loaded"] and second["report"]["saved"] == []
    wholes[0].unlink()
    third = _fresh_process(tmp_path, "third")
    assert third["close"] and "loaded compile artifacts from" in third["log"], third["log"][-2000:]
    assert third["inductor"].get("fxgraph_cache_hit", 0) >= 1 and third["inductor"].get("fxgraph_cache_miss", 0) == 0


_BACKGROUND_CHILD = _CHILD_START.replace("RUNTIME", 'accel.RuntimeConfig(compile="full", compile_background=True, '
                                                    'compile_workers=1, compile_cache=sys.argv[2])') + textwrap.dedent("""
    first = run(pipe, steps=1, height=32, width=32)
    after_first = compile_cache_report(pipe)
    began = time.perf_counter()
    while background_compile_report(pipe.unet)["running"] and time.perf_counter() - began < 600:
        run(pipe, steps=1, height=32, width=32)
    out = run(pipe, steps=1, height=32, width=32)  # the first call after the compile: the save
    print("RESULT " + json.dumps({"inductor": dict(counters["inductor"]), "after_first": after_first,
                                  "report": compile_cache_report(pipe),
                                  "compiled": background_compile_report(pipe.unet)["compiled"],
                                  "workers": background_compile_report(pipe.unet)["workers"],
                                  "first_equal": bool((first == eager).all()),
                                  "close": bool(abs(out - eager).max() < 1e-4)}))
""")


@pytest.mark.slow
@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on CPU")
def test_a_background_compile_loads_artifacts_and_saves_its_own_once_over(tmp_path):
    """`compile_background` with `compile_cache` (and a compile worker): a process saves nothing at the end of its
    first (eager) call, while the compile runs, and saves once it is over, the worker's graphs included (the thread
    read them from the cache); a second process on an empty inductor cache loads them at its first call and its
    background compile reads them in its thread, without a worker: graph cache hits, nothing generated anew."""
    first = _fresh_process(tmp_path, "first", _BACKGROUND_CHILD)
    assert first["first_equal"] and first["close"] and first["compiled"] == 1, first["log"][-2000:]
    assert first["after_first"] == {"loaded": [], "saved": []}
    assert len(first["report"]["saved"]) == 1 and first["workers"][0]["failed"] is False
    assert "saved once the background compile is over" in first["log"]
    second = _fresh_process(tmp_path, "second", _BACKGROUND_CHILD)
    assert second["first_equal"] and second["close"] and second["compiled"] == 1, second["log"][-2000:]
    assert len(second["after_first"]["loaded"]) == 1 and second["report"]["saved"] == [] and second["workers"] == []
    assert "from the artifacts just loaded, without a worker" in second["log"]
    assert second["inductor"].get("fxgraph_cache_hit", 0) >= 1 and second["inductor"].get("fxgraph_cache_miss", 0) == 0


def test_precompile_writes_one_artifact_set_per_size(saved_pipe, tmp_path, capsys, monkeypatch):
    """`accel precompile` on a CPU, its compiled code stubbed (calls run eagerly): one key per size."""
    from apps.cli import main

    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled", None))
    monkeypatch.setattr(aot, "available", lambda: False)  # a whole compiled forward would compile for real
    out = tmp_path / "artifacts"
    with torch.compiler.set_stance("force_eager"):
        assert main(["precompile", "--model", str(saved_pipe), "--preset", "balanced", "--device", "cpu",
                     "--sizes", "32x32,40x32", "--steps", "1", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    keys = sorted(json.loads(p.read_text())["height"] for p in out.glob("*.json"))
    assert keys == [32, 40] and len(list(out.glob("*.bin"))) == 2 and printed.count("wrote ") == 2
    assert all(json.loads(p.read_text())["runtime"].startswith("RuntimeConfig(") for p in out.glob("*.json"))


@pytest.mark.parametrize("flags, message", [
    (["--sizes", "32"], "--sizes item '32' is not a size"),
    (["--sizes", "32x30"], "--sizes 32x30: width 30 is not an image size"),
    (["--sizes", "32x32", "--preset", "nope"], "nope"),
])
def test_bad_precompile_input_is_one_line_before_the_model_loads(tmp_path, flags, message):
    from apps.cli import main

    argv = ["precompile", "--model", str(tmp_path / "never-loaded"), "--preset", "balanced", "--out", str(tmp_path / "a")]
    with pytest.raises(SystemExit) as exit_info:
        main(argv + flags)
    assert message in str(exit_info.value) and "error:" in str(exit_info.value)


def test_precompile_refuses_a_preset_that_compiles_nothing(saved_pipe, tmp_path):
    from apps.cli import main

    with pytest.raises(SystemExit, match="compiles nothing"):
        main(["precompile", "--model", str(saved_pipe), "--preset", "quality", "--device", "cpu", "--sizes", "32x32",
              "--out", str(tmp_path / "a")])


def test_whole_forward_signature_covers_what_its_guards_do_not():
    """A saved whole forward keeps tensor guards only: the rest of a call (structure, non-tensor values, strides)
    is its signature, compared before each use."""
    x = torch.zeros(2, 4, 8, 8)
    base = aot.signature((x, 1.0), {"return_dict": False})
    assert base == aot.signature((torch.ones(2, 4, 8, 8), 1.0), {"return_dict": False})  # values do not enter it
    for args, kwargs in [((x, 2.0), {"return_dict": False}), ((x, 1.0), {"return_dict": True}), ((x,), {}),
                         ((x.to(memory_format=torch.channels_last), 1.0), {"return_dict": False}),
                         ((torch.zeros(1, 4, 8, 8), 1.0), {"return_dict": False}),
                         ((x.half(), 1.0), {"return_dict": False})]:
        assert aot.signature(args, kwargs) != base, (args, kwargs)


def test_a_loaded_whole_forward_serves_only_its_signature(sd_pipe):
    """The compile hook runs a preloaded whole forward for calls of its signature and compiles as usual for others;
    a hook with another hook beneath it (not the class forward) takes none."""
    from accel.runtime.compile import _hook, preload

    accel.accelerate(sd_pipe, accel.AccelConfig(runtime=accel.RuntimeConfig(compile="full")))
    try:
        calls = []
        unet = sd_pipe.unet
        real = type(unet).forward

        def fake(module, *args, **kwargs):
            calls.append(len(args))
            return real(module, *args, **kwargs)

        sample, t, text = torch.randn(2, 4, 4, 4), torch.tensor(10), torch.randn(2, 7, unet.config.cross_attention_dim)
        assert preload(unet, aot.signature((sample, t, text), {"return_dict": False}), fake)
        with torch.no_grad():
            out = unet(sample, t, text, return_dict=False)
            assert calls == [3] and _hook(unet).first_call_seconds is not None
            with torch.compiler.set_stance("force_eager"):  # another signature: the usual compiled path
                unet(sample, t, encoder_hidden_states=text, return_dict=False)
            assert calls == [3]
            torch.testing.assert_close(out[0], real(unet, sample, t, text, return_dict=False)[0])
    finally:
        accel.restore(sd_pipe)


def test_whole_forwards_are_saved_only_where_asked(sd_pipe, tmp_path, monkeypatch):
    """A compile cache's save writes whole compiled forwards only within `saving_whole_forwards()` (what `accel
    precompile` runs): saving one compiles the module again, which a user's first call should not pay."""
    from accel.runtime.artifacts import saving_whole_forwards

    saved = []
    monkeypatch.setattr(aot, "save", lambda module, args, kwargs, path, options: saved.append(type(module).__name__))
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compile_(*a, **{**k, "backend": "eager"}))
    monkeypatch.setattr(torch.compiler, "save_cache_artifacts", lambda: (b"compiled", None))
    config = accel.RuntimeConfig(compile="full", compile_cache=str(tmp_path / "a"), components=("denoiser", "vae"))
    accel.accelerate(sd_pipe, accel.AccelConfig(runtime=config))
    try:
        run(sd_pipe, height=32, width=32)
        assert saved == [] and len(list((tmp_path / "a").glob("*.bin"))) == 1
        with saving_whole_forwards():
            run(sd_pipe, height=40, width=32)
        assert saved == ["UNet2DConditionModel", "Decoder"] and len(list((tmp_path / "a").glob("*.bin"))) == 2
    finally:
        accel.restore(sd_pipe)
        torch._dynamo.reset()


def test_a_whole_forward_that_restarts_to_tensorify_a_float_is_saved_with_floats_as_constants(tmp_path, monkeypatch):
    """Dynamo's restart to turn a Python float into a tensor escapes aot_compile (the SD VAE decoder on the H200): the
    save compiles again with `specialize_float`, and the function it writes runs; another error is not retried."""
    if not aot.available():
        pytest.skip("this torch has no aot_compile")

    class Scale(torch.nn.Module):
        def forward(self, x, factor):
            return x * factor + 1

    real, seen = aot._aot_compile, []

    class TensorifyScalarRestartAnalysis(Exception):
        pass

    def aot_compile(module, args, kwargs, compile_kwargs):
        seen.append(torch._dynamo.config.specialize_float)
        if not torch._dynamo.config.specialize_float:
            raise RuntimeError("backend failed") from TensorifyScalarRestartAnalysis()
        return real(module, args, kwargs, {**compile_kwargs, "backend": "eager"})

    monkeypatch.setattr(aot, "_aot_compile", aot_compile)
    module, x = Scale(), torch.randn(3)
    path = tmp_path / f"k{aot.SUFFIX}"
    assert aot.save(module, (x, 2.5), {}, path, {}) and seen == [False, True]
    fn, digest = aot.load(path)
    assert digest == aot.signature((x, 2.5), {})
    torch.testing.assert_close(fn(module, x, 2.5), x * 2.5 + 1)

    seen.clear()
    monkeypatch.setattr(aot, "_aot_compile", lambda *a: (seen.append(1), (_ for _ in ()).throw(ValueError("no")))[1])
    assert not aot.save(module, (x, 2.5), {}, tmp_path / f"other{aot.SUFFIX}", {}) and seen == [1]
    torch._dynamo.reset()
