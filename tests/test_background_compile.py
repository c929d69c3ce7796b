"""Background compilation (`RuntimeConfig(compile_background=True)`): calls run eagerly while a thread compiles,
then switch to the compiled code. The backends here are torch.compile stand-ins: one that runs dynamo's graph as
traced and counts, one that waits for the test's say-so (so a call provably returns before the compile ends), one
that fails."""

import logging
import shutil
import sys
import threading
import time

import numpy as np
import pytest
import torch
from tiny import run

import accel
from accel.capture import capture_paused
from accel.runtime import background_compile_report
from accel.runtime import compile as compile_mod
from accel.runtime.compile import apply_compile, remove_compile
from accel.session import get_session


class Backend:
    """A torch.compile backend that runs the traced graph as it is; counts compiles and compiled runs; with
    `gate`, each compile waits until the gate is set; with `fail`, each compile raises."""

    def __init__(self, gate: threading.Event | None = None, fail: bool = False):
        self.gate, self.fail = gate, fail
        self.compiles = 0
        self.runs = 0

    def __call__(self, gm, example_inputs):
        if self.gate is not None:
            assert self.gate.wait(30), "the test never let the compile finish"
        if self.fail:
            raise RuntimeError("backend refused")
        self.compiles += 1

        def compiled(*args):
            self.runs += 1
            return gm.forward(*args)

        return compiled


class MLP(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 8)

    def forward(self, x, scale=1.0):
        return self.b(torch.nn.functional.gelu(self.a(x))) * scale


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _wait(module):
    background = compile_mod._hook(module).background
    if background.thread is not None:
        background.thread.join(30)
    assert not background.running()


def test_calls_run_eagerly_until_the_compile_ends_then_switch(caplog):
    net, x = MLP(), torch.randn(2, 8)
    with torch.no_grad():
        expected = net(x)
    gate = threading.Event()
    backend = Backend(gate)
    apply_compile(net, "full", background=True, backend=backend)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="accel"):
        first = net(x)  # returns while the compile waits on the gate
        assert background_compile_report(net)["running"] and capture_paused()
        second = net(x)
        assert backend.runs == 0
        gate.set()
        _wait(net)
        assert not capture_paused() and backend.compiles == 1 and backend.runs == 1  # the background run
        after = net(x)
        again = net(x)
    assert backend.runs == 3 and backend.compiles == 1  # switched, without compiling again in this thread
    assert sum("switches to its compiled code" in r.message for r in caplog.records) == 1
    for out in (first, second):
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    for out in (after, again):
        torch.testing.assert_close(out, expected)
    remove_compile(net)


def test_new_signature_compiles_in_the_background_too():
    net, backend = MLP(), Backend()
    apply_compile(net, "full", background=True, backend=backend)
    with torch.no_grad():
        net(torch.randn(2, 8))
        _wait(net)
        out = net(torch.randn(3, 8), scale=2.0)  # new shape and constant: eager, a second compile starts
        _wait(net)
        runs = backend.runs
        net(torch.randn(3, 8), scale=2.0)
    assert backend.runs == runs + 1 and background_compile_report(net)["compiled"] == 2
    assert out.shape == (3, 8)
    remove_compile(net)


def test_a_failed_compile_keeps_running_eagerly(caplog):
    net, x = MLP(), torch.randn(2, 8)
    with torch.no_grad():
        expected = net(x)
    apply_compile(net, "full", background=True, backend=Backend(fail=True))
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="accel"):
        net(x)
        _wait(net)
        outs = [net(x), net(x)]
    assert [r.levelno for r in caplog.records if "background compile" in r.message] == [logging.WARNING]
    assert "keep running eagerly" in caplog.text and background_compile_report(net)["failed"] == 1
    assert not capture_paused()
    for out in outs:
        torch.testing.assert_close(out, expected, rtol=0, atol=0)
    remove_compile(net)


@pytest.mark.parametrize("finishes", [True, False], ids=["joined", "detached"])
def test_restore_mid_compile(sd_pipe, monkeypatch, caplog, finishes):
    """`restore` while the UNet compiles: waits for it (a bounded join) or leaves the thread; restores exactly."""
    baseline = run(sd_pipe)
    gate = threading.Event()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=Backend(gate)))
    monkeypatch.setattr(compile_mod, "RESTORE_JOIN_SECONDS", 30 if finishes else 0.2)
    accel.accelerate(sd_pipe, accel.AccelConfig(runtime=accel.RuntimeConfig(compile="full", compile_background=True)))
    eager = run(sd_pipe)
    thread = compile_mod._hook(sd_pipe.unet).background.thread
    assert thread.is_alive()
    if finishes:
        threading.Timer(0.1, gate.set).start()  # once restore waits
    with caplog.at_level(logging.WARNING, logger="accel"):
        accel.restore(sd_pipe)
    assert ("left to finish on its own" in caplog.text) != finishes
    gate.set()
    thread.join(30)
    assert not thread.is_alive() and not capture_paused()
    assert "failed" not in caplog.text
    np.testing.assert_array_equal(eager, baseline)
    np.testing.assert_array_equal(run(sd_pipe), baseline)


def test_pipeline_switches_with_outputs_equal(sd_pipe, monkeypatch, caplog):
    """The tiny SD pipeline, denoiser, VAE decoder and text encoder compiled in the background: the first call
    is the eager image with no compile beside it, the calls after the switch run the compiled graphs (no compile in the calling thread)."""
    baseline = run(sd_pipe)
    gate, backend = threading.Event(), None
    real_compile = torch.compile

    wrapped_in_caller = []

    def compile_with_backend(fn, **kwargs):
        nonlocal backend
        # Making the wrapper imports dynamo and inductor: the compile thread does it, not the calls
        wrapped_in_caller.append(threading.current_thread() is threading.main_thread())
        backend = backend or Backend(gate)
        return real_compile(fn, backend=backend)

    monkeypatch.setattr(torch, "compile", compile_with_backend)
    config = accel.RuntimeConfig(compile="full", compile_background=True, cuda_graph=True,
                                 components=("denoiser", "vae", "text_encoder"))
    accel.accelerate(sd_pipe, accel.AccelConfig(runtime=config))
    modules = [sd_pipe.unet, sd_pipe.vae.decoder, sd_pipe.text_encoder]
    compiling = []

    def during(pipe, step, timestep, kwargs):
        compiling.append(any(background_compile_report(m)["running"] for m in modules))
        return kwargs

    with caplog.at_level(logging.INFO, logger="accel"):
        first = run(sd_pipe, callback_on_step_end=during)
        # The compiles wait for the end of the first call (no thread beside the first image), then all start.
        assert compiling and not any(compiling)
        assert backend.runs == 0 and all(background_compile_report(m)["running"] for m in modules)
        gate.set()
        for module in modules:
            _wait(module)
        compiles, runs = backend.compiles, backend.runs
        after = run(sd_pipe)
        assert backend.compiles == compiles and backend.runs > runs
    assert sum("switches to its compiled code" in r.message for r in caplog.records) == 3
    assert wrapped_in_caller == [False, False, False]
    accel.restore(sd_pipe)
    np.testing.assert_array_equal(first, baseline)
    np.testing.assert_allclose(after, baseline, atol=1e-5)
    np.testing.assert_array_equal(run(sd_pipe), baseline)


def test_channels_last_waits_for_the_first_call(sd_pipe, monkeypatch):
    """With the UNet compiled in the background, channels-last weights come at the end of the first call, before
    that compile traces: the first image runs on the weights as loaded (a fresh process's eager NHWC convolutions
    cost it), the compiled code gets the preset's layout. Restore gives the weights back exactly, whether or not the
    conversion happened."""
    baseline = run(sd_pipe)
    weights = {k: v.clone() for k, v in sd_pipe.unet.state_dict().items()}
    conv = sd_pipe.unet.conv_in.weight
    real_compile = torch.compile
    layouts = []

    class Recording(Backend):
        def __call__(self, gm, example_inputs):
            layouts.append(conv.is_contiguous(memory_format=torch.channels_last))
            return super().__call__(gm, example_inputs)

    backend = Recording()
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=backend))
    config = accel.RuntimeConfig(compile="full", compile_background=True, channels_last=True)
    accel.accelerate(sd_pipe, accel.AccelConfig(runtime=config))
    assert conv.is_contiguous()
    accel.restore(sd_pipe)  # before any call: nothing was converted, nothing waits for a call any more
    assert conv.is_contiguous() and get_session(sd_pipe) is None
    np.testing.assert_array_equal(run(sd_pipe), baseline)

    accel.accelerate(sd_pipe, accel.AccelConfig(runtime=config))
    during = []
    first = run(sd_pipe, callback_on_step_end=lambda p, i, t, kw: during.append(conv.is_contiguous()) or kw)
    assert during and all(during)
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    _wait(sd_pipe.unet)
    after = run(sd_pipe)
    assert layouts and all(layouts)  # every compile traced the NHWC weights
    accel.restore(sd_pipe)
    for key, value in sd_pipe.unet.state_dict().items():
        assert value.is_contiguous() and torch.equal(value, weights[key]), key
    np.testing.assert_array_equal(first, baseline)
    np.testing.assert_allclose(after, baseline, atol=1e-5)
    np.testing.assert_array_equal(run(sd_pipe), baseline)


def test_channels_last_without_a_background_unet_compile_is_immediate(sd_pipe):
    """The VAE alone compiled in the background: the UNet's graphs may capture at the first call, so its weights are
    converted at `accelerate`, as without the option."""
    config = accel.RuntimeConfig(compile="full", compile_background=True, channels_last=True,
                                 components=("denoiser", "vae"), compile_components=("vae",))
    accel.accelerate(sd_pipe, accel.AccelConfig(runtime=config))
    assert sd_pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    accel.restore(sd_pipe)
    assert sd_pipe.unet.conv_in.weight.is_contiguous()


def test_config_is_validated():
    with pytest.raises(ValueError, match="compile='full'"):
        accel.RuntimeConfig(compile="regional", compile_background=True)
    assert accel.RuntimeConfig(compile="full", compile_background=True, compile_cache="/tmp/x").compile_cache == "/tmp/x"
    with pytest.raises(ValueError, match="True or False"):
        accel.RuntimeConfig(compile="full", compile_background=1)


def test_hooks_inside_the_forward_compile_in_the_call(sd_pipe, monkeypatch):
    """A block cache keeps state in hooks on the UNet's blocks: its compile is not run a second time in a thread."""
    backend = Backend()
    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend=backend))
    config = accel.AccelConfig(cache=accel.BlockCacheConfig(threshold=0.5),
                               runtime=accel.RuntimeConfig(compile="full", compile_background=True))
    accel.accelerate(sd_pipe, config)
    run(sd_pipe)
    report = background_compile_report(sd_pipe.unet)
    accel.restore(sd_pipe)
    assert report["compiled"] == 0 and not report["running"] and backend.runs > 0  # compiled in the call


def _trace_in_a_thread():
    """torch.fx traces a module in a thread and holds the trace open until the returned event is set."""
    inside, leave, graphs = threading.Event(), threading.Event(), []

    class Held(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = torch.nn.Linear(4, 4)

        def forward(self, x):
            inside.set()
            assert leave.wait(30)
            return self.inner(x) + 1

    thread = threading.Thread(target=lambda: graphs.append(torch.fx.symbolic_trace(Held())), daemon=True)
    thread.start()
    assert inside.wait(30)
    return leave, thread, graphs


def test_eager_calls_in_another_thread_during_an_fx_trace():
    """The H200 failure: while a background compile traced (torch.fx patches nn.Module.__call__ process-wide), the
    pipeline's eager call in the main thread went through the tracer and raised NameError. With the guard that each
    background compile holds, the main thread's modules run as usual and the trace still records its leaf module."""
    model, x = MLP(), torch.randn(2, 8)
    expected = model(x)
    leave, thread, _ = _trace_in_a_thread()
    try:
        with pytest.raises(NameError, match="not installed as a submodule"):
            model(x)  # unguarded: what the main thread hit
    finally:
        leave.set()
        thread.join(30)

    compile_mod.background_process_state.acquire()
    try:
        leave, thread, graphs = _trace_in_a_thread()
        try:
            assert torch.equal(model(x), expected)
        finally:
            leave.set()
            thread.join(30)
        assert [n.target for n in graphs[0].graph.nodes if n.op == "call_module"] == ["inner"]
    finally:
        compile_mod.background_process_state.release()
    assert compile_mod.background_process_state._original is None
    assert torch.fx._symbolic_trace._Patcher.patch_method.__qualname__ == "_Patcher.patch_method"


def test_background_compile_holds_the_process_state():
    """The fx guard and the short switch interval are held from a background compile's start to its end, and put
    back after."""
    interval = sys.getswitchinterval()
    gate = threading.Event()
    model = MLP()
    apply_compile(model, "full", background=True, backend=Backend(gate=gate))
    with torch.no_grad():
        model(torch.randn(2, 8))
        assert compile_mod.background_process_state._holders == 1
        assert sys.getswitchinterval() == pytest.approx(compile_mod.BACKGROUND_SWITCH_INTERVAL)
        gate.set()
        _wait(model)
    assert compile_mod.background_process_state._holders == 0 and sys.getswitchinterval() == interval
    remove_compile(model)


def test_no_switch_while_another_component_compiles(caplog):
    """On the H200 the text encoder switched to its compiled code while the UNet's compile traced, and dynamo refused
    to run it (torch.fx's tracing flag is process-wide). A component whose compile is over keeps running eagerly
    until no other background compile runs, then switches."""
    first, second, x = MLP(), MLP(), torch.randn(2, 8)
    gate = threading.Event()
    quick, held = Backend(), Backend(gate=gate)
    apply_compile(first, "full", background=True, backend=quick)
    apply_compile(second, "full", background=True, backend=held)
    with torch.no_grad(), caplog.at_level(logging.INFO, logger="accel"):
        first(x)
        _wait(first)
        second(x)  # its compile now waits on the gate
        runs = quick.runs
        eager = first(x)
        assert quick.runs == runs and compile_mod.background_process_state.busy()
        gate.set()
        _wait(second)
        first(x)
        second(x)
    assert quick.runs == runs + 1 and held.runs == 2  # the background run, then the switched call
    assert sum("switches to its compiled code" in r.message for r in caplog.records) == 2
    torch.testing.assert_close(eager, first(x))
    remove_compile(first)
    remove_compile(second)


_EXIT_CHILD = """
import atexit, sys, tempfile, time
from pathlib import Path
# atexit runs the last registered first: registered before accel is imported, this runs after accel's handler
atexit.register(lambda: print("AT EXIT", background_compile_report(pipe.unet)["running"], flush=True))
sys.path[:0] = sys.argv[1:3]
from tiny import run, tiny_sd_pipeline
import accel
from accel.runtime import background_compile_report
pipe = tiny_sd_pipeline(Path(tempfile.mkdtemp()))
accel.accelerate(pipe, accel.AccelConfig(runtime=accel.RuntimeConfig(compile="full", compile_background=True)))
run(pipe)  # eager; the compile starts when the call ends
time.sleep(0.5)
print("RUNNING", background_compile_report(pipe.unet)["running"], flush=True)
"""


def test_a_process_exits_cleanly_while_a_background_compile_runs(tmp_path):
    """A script that makes one call and ends: the compile still running is interrupted and unwinds at exit, so the
    process ends at once and quietly, not after the compile, and not with a C++ 'terminate called' on the way out."""
    import subprocess
    from pathlib import Path

    tests = Path(__file__).parent
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-c", _EXIT_CHILD, str(tests.parent), str(tests)], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "RUNNING True" in done.stdout  # it did exit mid-compile
    assert "AT EXIT False" in done.stdout  # and the compile was over before the interpreter went down
    assert "terminate called" not in done.stderr and "Traceback" not in done.stderr, done.stderr[-2000:]
    assert time.perf_counter() - began < 120


_WORKER_CHILD = """
import json, sys, tempfile, time
from pathlib import Path
import torch
torch.set_num_threads(1)
sys.path[:0] = sys.argv[1:3]
from tiny import run, tiny_sd_pipeline
import accel
from accel.runtime import background_compile_report
from accel.runtime import compile as compile_mod
from torch._dynamo.utils import counters
pipe = tiny_sd_pipeline(Path(tempfile.mkdtemp()))
baseline = run(pipe)
# cuda_graph=True as the presets have it (eager on the CPU): its hook gives the UNet the session's call planner,
# whose pre-hook the worker's copy must leave out (on the H200 that copy failed for every preset's UNet)
runtime = accel.RuntimeConfig(compile="full", compile_background=True, compile_workers=1, cuda_graph=True)
compile_mod.WHOLE_AFTER_STAGES = "always"  # the second step too (by default only where a stage call found no code)
accel.accelerate(pipe, accel.AccelConfig(runtime=runtime))
first = run(pipe)
began = time.perf_counter()
staged_frames = None  # dynamo's graphs in this process once the stages serve the calls
while background_compile_report(pipe.unet)["running"] and time.perf_counter() - began < 500:
    run(pipe)
    if staged_frames is None and compile_mod._hook(pipe.unet).background.staged:
        staged_frames = counters["stats"].get("unique_graphs", 0)
after = run(pipe)
stages = [*pipe.unet.down_blocks, pipe.unet.mid_block, *pipe.unet.up_blocks]
staged = ["stages" if getattr(getattr(s, "_diffusers_hook", None), "hooks", {}).get(compile_mod.STAGE_HOOK_NAME)
          and s._diffusers_hook.hooks[compile_mod.STAGE_HOOK_NAME].fns else "none" for s in stages]
print("RESULT " + json.dumps({"report": background_compile_report(pipe.unet), "inductor": dict(counters["inductor"]),
                              "staged": staged,
                              "generation": compile_mod.compile_generation(pipe.unet), "staged_frames": staged_frames,
                              "first_equal": bool((first == baseline).all()),
                              "close": bool(abs(after - baseline).max() < 1e-4)}))
"""


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on CPU")
def test_worker_processes_compile_and_the_thread_reads_what_they_built(tmp_path):
    """`compile_workers=1`, the calls meanwhile not held up by a compiling thread's Python. First the UNet's stages
    (down, mid and up blocks) are each compiled whole in the worker and saved to files that this process loads without
    a trace. Then the whole forward, as for a module without stages: the worker compiles it into the shared inductor
    cache, and the thread's own compile finds every graph there (an FX graph cache hit, no inductor compile here). The
    first image is the eager one and the compiled output matches it."""
    import json
    import os
    import subprocess
    from pathlib import Path

    tests = Path(__file__).parent
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(tmp_path / "cache"), TORCHINDUCTOR_COMPILE_THREADS="1")
    done = subprocess.run([sys.executable, "-c", _WORKER_CHILD, str(tests.parent), str(tests)], env=env,
                          capture_output=True, text=True, timeout=900)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, done.stderr[-3000:]
    result = json.loads(line[7:])
    assert result["report"]["compiled"] == 1, result["report"]
    worker = result["report"]["workers"][0]
    assert worker["failed"] is None and worker["stages"] == 5, worker  # tiny UNet: 2 down, mid, 2 up
    assert result["staged"] == ["stages"] * 5  # every stage has its loaded code
    assert result["staged_frames"] == 0  # nothing traced here while the stages were built and loaded
    assert worker["own_forward_calls"] == 0  # the run after loading found compiled code for every stage call
    assert all(calls[1] == 0 for calls in result["report"]["stage_calls"].values()), result["report"]["stage_calls"]
    # then a second worker compiles the whole forward, which the thread traces and reads from the cache, and the
    # calls move to it (the CUDA-graph hook's cue: generation 1)
    whole = result["report"]["workers"][1]
    assert whole["whole"] and whole["failed"] is False, whole
    assert result["generation"] == 1
    assert result["inductor"].get("fxgraph_cache_hit", 0) >= 1
    assert result["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert result["first_equal"] and result["close"]


def test_compile_workers_with_background_is_zero_or_one():
    assert accel.RuntimeConfig(compile="full", compile_background=True, compile_workers=1).compile_workers == 1
    with pytest.raises(ValueError, match="0 or 1"):
        accel.RuntimeConfig(compile="full", compile_background=True, compile_workers=2)
    with pytest.raises(ValueError, match="compile_workers applies to compile='regional', or to 'full' with"):
        accel.RuntimeConfig(compile="full", compile_workers=1)


def test_a_stage_call_in_another_layout_runs_the_compiled_code_on_its_recorded_strides():
    """A compiled stage before it may hand a stage its input channels-last where the recording (every stage eager) had
    it contiguous, or with another stride on a size-1 dimension: the call gets the recorded strides (a copy, or a
    view) and the compiled code; a shape never recorded runs the stage's own forward."""
    from accel.runtime.compile import _restrided, _StageHook

    seen = []

    def compiled(module, x):
        seen.append(x.stride())
        return x * 2

    hook = _StageHook()
    example = torch.randn(1, 4, 3, 3)  # contiguous: (36, 9, 3, 1)
    hook.add(compiled, (example,), {})
    hook.fn_ref = type("Ref", (), {"original_forward": staticmethod(lambda x: x + 1)})()
    channels_last = example.contiguous(memory_format=torch.channels_last)
    with torch.no_grad():
        assert torch.equal(hook.new_forward(None, example), example * 2)
        assert torch.equal(hook.new_forward(None, channels_last), example * 2)
        other = torch.randn(1, 4, 5, 5)
        assert torch.equal(hook.new_forward(None, other), other + 1)
    assert seen == [(36, 9, 3, 1)] * 2 and hook.calls == [1, 1, 1]
    odd = torch.randn(4, 3, 3).unsqueeze(0).as_strided((1, 4, 3, 3), (7, 9, 3, 1))  # stride 7 on the size-1 batch
    (args, _), restrided = _restrided(((odd,), {}), [(36, 9, 3, 1)])
    view = args[0]
    assert view.stride() == (36, 9, 3, 1) and view.data_ptr() == odd.data_ptr() and torch.equal(view, odd)
    assert restrided


def test_the_workers_server_starts_ahead_only_where_stages_will_be_built(monkeypatch):
    started = []
    monkeypatch.setattr(compile_mod, "prestart", lambda modules: started.append(modules))
    module = MLP()
    apply_compile(module, "full", workers=1, background=True, stages=True)
    remove_compile(module)
    assert len(started) == 1 and MLP.__module__ in started[0]
    # artifacts kept (the runtime turns stages off): they load without a worker, so no server sits idle meanwhile
    apply_compile(module, "full", workers=1, background=True, stages=False)
    remove_compile(module)
    apply_compile(module, "full", workers=0, background=True, stages=True)
    remove_compile(module)
    assert len(started) == 1
