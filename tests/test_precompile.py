"""Parallel precompilation of regional compilation: distinct block calls are found, compiled by worker
processes into the on-disk inductor cache, and the caller's own compile then only reads that cache."""

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers.models.resnet import ResnetBlock2D
from tiny import run

import accel

from accel.runtime.precompile import (Job, Precompile, Workers, _shapes_only, _split, call_key, compiled_before,
                                     default_workers, record_calls)


class Tower(torch.nn.Module):
    """Three resnet blocks, two of them the same shape: two distinct compiled graphs."""

    def __init__(self):
        super().__init__()
        self.blocks = torch.nn.ModuleList([
            ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4),
            ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4),
            ResnetBlock2D(in_channels=8, out_channels=4, temb_channels=16, groups=4),
        ])

    def forward(self, x, temb):
        for block in self.blocks:
            x = block(x, temb)
        return x


class AttentionTower(torch.nn.Module):
    """Three transformer blocks, two of them the same width, their attention pinned to one SDPA kernel (the runtime's
    `attention=` hook on every attention module): two distinct compiled graphs that trace the pin."""

    def __init__(self):
        super().__init__()
        from diffusers.hooks import HookRegistry
        from diffusers.models.attention import BasicTransformerBlock

        from accel.runtime.attention import _HOOK, SDPABackendHook, attention_modules

        self.blocks = torch.nn.ModuleList([BasicTransformerBlock(8, 2, 4), BasicTransformerBlock(8, 2, 4)])
        self.widen = torch.nn.Linear(8, 16)
        self.last = BasicTransformerBlock(16, 2, 8)
        for module in attention_modules(self):
            HookRegistry.check_if_exists_or_initialize(module).register_hook(SDPABackendHook("math"), _HOOK)

    def forward(self, x, temb=None):
        for block in self.blocks:
            x = block(x)
        return self.last(self.widen(x))


def test_record_calls_keeps_one_call_per_distinct_block():
    torch.manual_seed(0)
    tower = Tower()
    x, temb = torch.randn(1, 8, 6, 6), torch.randn(1, 16)
    jobs = record_calls(list(tower.blocks), lambda: tower(x, temb))
    assert [job.region for job in jobs] == [tower.blocks[0], tower.blocks[2]]
    assert jobs[1].args[0].shape == (1, 8, 6, 6) and jobs[1].args[1] is temb
    # a different input shape is a different graph
    assert call_key(tower.blocks[0], (torch.randn(1, 8, 4, 4), temb), {}) != call_key(tower.blocks[0], (x, temb), {})
    assert not any(block._forward_pre_hooks for block in tower.blocks)  # recording hooks are gone


def test_shapes_only_copy_holds_no_weights_and_leaves_the_block_alone():
    block = ResnetBlock2D(in_channels=8, out_channels=4, temb_channels=16, groups=4)
    before = {k: v.clone() for k, v in block.state_dict().items()}
    copy = _shapes_only(block)
    assert all(p.device.type == "meta" for p in copy.parameters())
    assert [(n, p.shape, p.requires_grad) for n, p in copy.named_parameters()] == \
        [(n, p.shape, p.requires_grad) for n, p in block.named_parameters()]
    assert all(torch.equal(v, before[k]) and v.device.type == "cpu" for k, v in block.state_dict().items())


def test_shapes_only_leaves_out_the_blocks_own_torch_hooks_when_asked():
    """A forward's compile (a background compile's worker) copies the module without the torch hooks on the module
    itself: they run around `forward`, and an accelerated denoiser's (the session's call planner) reach what does not
    pickle."""
    import io
    from types import MappingProxyType

    class Planner:
        options = None

        def hook(self, module, args):
            return None

    planner = Planner()
    planner.options = MappingProxyType({})  # what a SamplerConfig holds
    block = ResnetBlock2D(in_channels=8, out_channels=4, temb_channels=16, groups=4)
    block.register_forward_pre_hook(planner.hook)
    with pytest.raises(TypeError, match="mappingproxy"):
        _shapes_only(block)  # a module's compile (regional) traces its hooks: they travel with it
    copy = _shapes_only(block, own_hooks=False)
    torch.save(copy, io.BytesIO())
    assert not copy._forward_pre_hooks and len(block._forward_pre_hooks) == 1


def test_split_deals_from_the_last_block_called():
    jobs = [Job(torch.nn.Identity(), (index,), {}) for index in range(5)]
    assert [[j.args[0] for j in part] for part in _split(jobs, 2)] == [[4, 2, 0], [3, 1]]
    assert len(_split(jobs, 8)) == 5  # never an empty worker


def _sleeper(tmp_path) -> Workers:
    workers = Workers.__new__(Workers)
    workers.folder, workers.count = tmp_path, 1
    command = [sys.executable, "-c", "import sys, time; sys.stdin.readline(); time.sleep(60)"]
    workers.processes = [(0, tmp_path / "worker-0.log", subprocess.Popen(command, stdin=subprocess.PIPE, text=True))]
    return workers


def test_finish_stops_running_workers_and_marks_a_compiled_set(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4)
    jobs = [Job(block, (torch.randn(1, 8, size, size), torch.randn(1, 16)), {}) for size in (4, 2)]
    assert Precompile(jobs, None, {}).report["skipped"] == "no workers"
    monkeypatch.setattr(Workers, "submit", lambda self, parts, kwargs: None)  # keep the sleeper busy
    run = Precompile(jobs, _sleeper(tmp_path), {})
    assert run.report["skipped"] is None and run.report["workers"] == 1
    report = run.finish(compiled=True)
    assert report["stopped"] == 1 and report["failed"] == [] and run.marker.exists()
    warm = Precompile(jobs, _sleeper(tmp_path), {})  # the same set again: nothing to compile, the worker goes
    assert warm.report["skipped"] == "compiled before (warm cache)" and warm.workers.processes == []
    assert compiled_before([block], {}) and not compiled_before([block], {"dynamic": True})
    assert default_workers() in (0, *range(2, 9))


_CHILD = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    sys.path.insert(0, sys.argv[1])
    from test_precompile import AttentionTower, Tower
    from accel.runtime.compile import REGIONAL_COMPILE_DEFAULTS, apply_compile, precompile_report
    from accel.runtime.precompile import Precompile, Workers, record_calls
    from torch._dynamo.utils import counters
    torch.manual_seed(0)
    pinned = len(sys.argv) > 3
    tower = (AttentionTower() if pinned else Tower()).eval()
    x, temb = (torch.randn(1, 5, 8), None) if pinned else (torch.randn(1, 8, 6, 6), torch.randn(1, 16))
    regions = [*tower.blocks, tower.last] if pinned else list(tower.blocks)
    with torch.no_grad():
        eager = tower(x, temb)
        if sys.argv[2] == "cold":  # let the workers finish first, so that every graph the caller needs is cached
            workers = Workers(2, ["diffusers.models.attention" if pinned else "diffusers.models.resnet"])
            Precompile(record_calls(regions, lambda: tower(x, temb)), workers, dict(REGIONAL_COMPILE_DEFAULTS))
            workers.wait()
            assert workers.stop() == ([], 0)
        apply_compile(tower, "regional", workers=2)
        out = tower(x, temb)
    print("RESULT " + json.dumps({"report": precompile_report(tower), "inductor": dict(counters["inductor"]),
                                  "close": bool(torch.allclose(out, eager, atol=1e-5))}))
""")


def _compile_in_fresh_process(cache: Path, mode: str, pinned: bool = False) -> dict:
    env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=str(cache), TORCHINDUCTOR_COMPILE_THREADS="1",
               PYTHONPATH=os.pathsep.join([str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]))
    done = subprocess.run([sys.executable, "-c", _CHILD, str(Path(__file__).parent), mode, *(["pinned"] if pinned else [])], env=env,
                          capture_output=True, text=True, timeout=600)
    line = next((l for l in done.stdout.splitlines() if l.startswith("RESULT ")), None)
    assert line, done.stderr[-3000:]
    return json.loads(line[7:])


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on CPU")
def test_workers_fill_the_cache_the_caller_reads(tmp_path):
    """Cold: two workers compile the two distinct blocks; the caller's compile reads both from the cache.
    Warm (a new process on that cache): no worker starts."""
    cold = _compile_in_fresh_process(tmp_path / "cache", "cold")
    assert cold["close"]
    assert cold["report"]["jobs"] == 2 and cold["report"]["workers"] == 2 and cold["report"]["failed"] == []
    assert cold["inductor"].get("fxgraph_cache_hit", 0) >= 2 and cold["inductor"].get("fxgraph_cache_miss", 0) == 0
    assert list((tmp_path / "cache" / "accel-precompiled").iterdir())  # the marker of a compiled set
    warm = _compile_in_fresh_process(tmp_path / "cache", "warm")
    assert warm["report"]["skipped"] == "compiled before (warm cache)" and warm["close"]


@pytest.mark.skipif(not (shutil.which("g++") or shutil.which("c++")), reason="inductor needs a C++ compiler on CPU")
def test_workers_compile_blocks_with_a_pinned_attention_kernel_as_the_caller_does(tmp_path):
    """The pinned SDPA kernel's hooks (closures, which do not pickle) are taken off the workers' copies and put back
    there: the workers' graphs are the caller's, which reads all of them from the cache."""
    cold = _compile_in_fresh_process(tmp_path / "cache", "cold", pinned=True)
    assert cold["close"]
    assert cold["report"]["jobs"] == 2 and cold["report"]["workers"] == 2 and cold["report"]["failed"] == []
    assert cold["inductor"].get("fxgraph_cache_hit", 0) >= 2 and cold["inductor"].get("fxgraph_cache_miss", 0) == 0


@pytest.mark.parametrize("cache", [
    accel.DeepCacheConfig(cache_interval=2),
    accel.EncoderPropagationConfig(),
    accel.BlockCacheConfig(threshold=0.5),
], ids=["deepcache", "encoder-propagation", "block-cache"])
def test_recording_forward_leaves_caches_as_one_call(sd_pipe, cache, monkeypatch):
    """The first call runs the UNet once more, eagerly, to record the blocks: a cache that keeps state
    across steps must give the same images as without that extra run (compiled regions run eagerly here)."""
    from accel.runtime import compile as compile_mod

    started = []

    class NoWorkers:
        def __init__(self, count, modules):
            started.append(count)
            self.processes, self.folder, self.count = [], None, 0

        def stop(self):
            return [], 0

    monkeypatch.setattr(compile_mod, "Workers", NoWorkers)
    accel.accelerate(sd_pipe, accel.AccelConfig(cache=cache))
    expected = run(sd_pipe, steps=4)
    accel.restore(sd_pipe)
    accel.accelerate(sd_pipe, accel.AccelConfig(cache=cache, runtime=accel.RuntimeConfig(compile="regional",
                                                                                         compile_workers=2)))
    with torch.compiler.set_stance("force_eager"):
        out = run(sd_pipe, steps=4)
    report = compile_mod.precompile_report(sd_pipe.unet)
    accel.restore(sd_pipe)
    assert started == [2] and report["skipped"] == "no workers" and report["jobs"] >= 2  # the recording ran
    np.testing.assert_array_equal(out, expected)


def test_stopping_a_worker_the_server_has_not_forked_yet_does_not_wait_for_its_imports(tmp_path, monkeypatch):
    """`restore()` or the interpreter's exit right after `accelerate()`: the fork server still imports (seconds), so
    the stop returns at once and the server kills the worker as it forks it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "cache"))  # a server of its own
    workers = Workers(1, ["diffusers.models.resnet"])
    block = ResnetBlock2D(in_channels=8, out_channels=8, temb_channels=16, groups=4)
    workers.submit([[Job(block, (torch.randn(1, 8, 4, 4), torch.randn(1, 16)), {})]], {})
    child = workers.processes[0][2]
    assert child.pid is None  # the server is importing torch: nothing forked yet
    began = time.monotonic()
    assert workers.stop() == ([], 1)
    assert time.monotonic() - began < 2.0
    assert child.wait(timeout=120) == -9  # forked once the imports ended, then killed
    workers.server.close()


def test_the_server_keeps_bytecode_in_the_suite_cache_only_where_none_is_written_or_installed(tmp_path, monkeypatch):
    from accel.runtime import process

    monkeypatch.setattr(process, "bytecode_cache_dir", lambda: tmp_path / "pycache")
    fake_torch = tmp_path / "site" / "torch" / "__init__.py"
    fake_torch.parent.mkdir(parents=True)
    fake_torch.write_text("")
    monkeypatch.setattr(torch, "__file__", str(fake_torch))
    told = {"PYTHONDONTWRITEBYTECODE": "1", "PATH": "/bin"}
    # torch installed without bytecode, none written: the server reads and writes it in the suite's cache
    assert process.bytecode_environment(told) == {"PATH": "/bin", "PYTHONPYCACHEPREFIX": str(tmp_path / "pycache")}
    # a Python that writes bytecode beside the sources, or a prefix the user chose: as they are
    assert process.bytecode_environment({"PATH": "/bin"}) == {"PATH": "/bin"}
    own = {**told, "PYTHONPYCACHEPREFIX": "/elsewhere"}
    assert process.bytecode_environment(own) == own
    # bytecode installed beside torch's sources: read there, nothing written
    import importlib.util

    compiled = Path(importlib.util.cache_from_source(str(fake_torch)))
    compiled.parent.mkdir()
    compiled.write_bytes(b"")
    assert process.bytecode_environment(told) == told
