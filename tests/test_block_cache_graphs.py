"""The block cache under CUDA graphs on a torch without conditional nodes: per-block graphs decided on the host.

The CPU cannot capture, so these tests put a stand-in for `capture_graph` into the cache: it "captures" by
running the block once into static output buffers and "replays" by running it again from the static input
buffers into the same output buffers, as a CUDA graph does. They check the control flow: which blocks run
from graphs on full and cached calls, the same output and decisions as the eager host path, per-block
fallback when a capture fails. The `gpu` tests at the end check the same against real graphs.
"""

import functools
import logging

import numpy as np
import pytest
import torch
from tiny import run, tiny_pixart_pipeline
from torch.utils import _pytree as pytree

import accel
from accel import AccelConfig, RuntimeConfig
from accel.cache import BlockCacheConfig, get_block_cache
from accel.cache.block_cache import CALL_GRAPHS, PER_BLOCK_GRAPHS, BlockCache
from accel.capture import _Graph, signature_key
from accel.runtime import apply_cuda_graph, cuda_graph, get_cuda_graph_hook, remove_cuda_graph
from accel.session import planner_of

STEPS = 8
PIXART_KWARGS = {"use_resolution_binning": False, "clean_caption": False}


class _RerunGraph:
    """A CPU stand-in for a captured torch.cuda.CUDAGraph: `replay` reruns the block from the static inputs and
    overwrites the static output in place, as a replay overwrites the graph's output buffers."""

    def __init__(self, fn, static_inputs, spec, static_output):
        self.fn, self.static_inputs, self.spec, self.static_output = fn, static_inputs, spec, static_output
        self.replays = 0

    def replay(self):
        self.replays += 1
        new = self.fn(pytree.tree_unflatten(self.static_inputs, self.spec))
        for static, value in zip(pytree.tree_leaves(self.static_output), pytree.tree_leaves(new)):
            static.copy_(value)


class _FakeCapture:
    """`capture_graph`'s signature; records every capture, and raises on the captures numbered in `fail`."""

    def __init__(self, fail=()):
        self.fail, self.calls, self.pools = set(fail), 0, []

    def __call__(self, fn, leaves, spec, device, *, warmup_iters=2, pool=None):
        self.calls += 1
        self.pools.append(pool)
        if self.calls in self.fail:
            raise RuntimeError("operation not permitted when stream is capturing")
        static_inputs = [leaf.to(device).clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves]
        static_output = fn(pytree.tree_unflatten(static_inputs, spec))
        graph = _RerunGraph(fn, static_inputs, spec, static_output)
        return _Graph(graph, static_inputs, static_output, pool if pool is not None else object())


def _pipeline(which, request, tmp_path):
    if which == "sd":
        return request.getfixturevalue("sd_pipe"), {}, 0.5
    return tiny_pixart_pipeline(tmp_path), PIXART_KWARGS, 0.3


def _accelerate_with_graphs(pipe, config):
    """The block cache with the graph hook on the denoiser (RuntimeConfig for a UNet; directly on a DiT, which
    RuntimeConfig refuses), on a torch without conditional nodes, capturing with a stand-in."""
    if getattr(pipe, "unet", None) is not None:
        accel.accelerate(pipe, AccelConfig(cache=config, runtime=RuntimeConfig(cuda_graph=True)))
    else:
        accel.accelerate(pipe, AccelConfig(cache=config))
        apply_cuda_graph(pipe.transformer)
    cache = get_block_cache(pipe)
    cache.conditional_nodes = False  # what torch 2.11 reports
    capture = _FakeCapture()
    cache.block_graphs.capture = capture
    return cache, capture


def _restore(pipe):
    if getattr(pipe, "unet", None) is None:
        remove_cuda_graph(pipe.transformer)
    accel.restore(pipe)


def _replays(cache):
    """Replays per block name, summed over its signatures."""
    counts = {}
    for (name, _), entry in cache.block_graphs.graphs.items():
        counts[name] = counts.get(name, 0) + entry.graph.replays
    return counts


@pytest.mark.parametrize("which", ["sd", "pixart"])
def test_per_block_graphs_replay_the_head_always_and_the_rest_on_full_calls(which, request, tmp_path, monkeypatch, caplog):
    pipe, kwargs, threshold = _pipeline(which, request, tmp_path)
    before = run(pipe, steps=STEPS, **kwargs)
    config = BlockCacheConfig(threshold=threshold, max_consecutive_cached=2)
    accel.accelerate(pipe, AccelConfig(cache=config))
    host = run(pipe, steps=STEPS, **kwargs)
    host_counts = get_block_cache(pipe).state.counts()
    accel.restore(pipe)
    full, cached = host_counts
    assert full >= 2 and cached >= 2

    monkeypatch.setattr(BlockCache, "_replayable", staticmethod(lambda sample: True))  # as if on a GPU
    cache, capture = _accelerate_with_graphs(pipe, config)
    layout, denoiser = cache.layout, cache.denoiser
    kept = []  # a block output a caller keeps must survive the next replays of that block's graph
    handle = layout.head.register_forward_hook(lambda m, a, out: kept.append((out, pytree.tree_map(torch.clone, out))))
    with caplog.at_level(logging.WARNING):
        outs = [run(pipe, steps=STEPS, **kwargs) for _ in range(2)]
    handle.remove()

    names = {id(m): n for n, m in denoiser.named_modules()}
    head, rest, tail = names[id(layout.head)], [names[id(m)] for m in layout.rest], names[id(layout.tail)]
    assert sorted(cache.block_graphs.captured()) == sorted([head, *rest, tail])  # one graph per block, captured once
    assert capture.calls == 2 + len(rest) and len({id(p) for p in capture.pools[1:]}) == 1  # one shared pool
    assert _replays(cache) == {head: 2 * STEPS, tail: 2 * full, **{name: 2 * full for name in rest}}
    assert cache.state.counts() == host_counts and cache.graph_path == PER_BLOCK_GRAPHS
    for out in outs:
        np.testing.assert_allclose(out, host, rtol=0, atol=1e-6)
    assert len(kept) == 2 * STEPS and all(
        all(torch.equal(a, b) for a, b in zip(pytree.tree_leaves(out), pytree.tree_leaves(copy))) for out, copy in kept)
    hook = get_cuda_graph_hook(denoiser)
    assert planner_of(denoiser).current.eager and not hook.graphs  # the whole call is never captured
    lines = [r.message for r in caplog.records if "block cache cannot decide inside a CUDA graph" in r.message]
    assert len(lines) == 1 and "no CUDA-graph conditional nodes" in lines[0] and "per-block CUDA graphs" in lines[0]
    assert not any("capture of the block" in r.message for r in caplog.records)

    _restore(pipe)
    assert not cache.block_graphs.graphs and cache.block_graphs.pool is None  # removing the cache drops its graphs
    assert np.array_equal(run(pipe, steps=STEPS, **kwargs), before)


def test_per_block_graphs_replay_a_dits_first_and_last_blocks_on_every_call(tmp_path, monkeypatch):
    """DBCache's first and last blocks replay their graphs on every call, the cached ones on full calls only (and
    the forecast, outside any graph, gives the eager output)."""
    pipe, kwargs = tiny_pixart_pipeline(tmp_path), PIXART_KWARGS
    config = BlockCacheConfig(threshold=0.3, first_blocks=2, last_blocks=1, taylor_order=1)
    accel.accelerate(pipe, AccelConfig(cache=config))
    host = run(pipe, steps=STEPS, **kwargs)
    host_counts = get_block_cache(pipe).state.counts()
    accel.restore(pipe)
    full, cached = host_counts
    assert cached >= 2

    monkeypatch.setattr(BlockCache, "_replayable", staticmethod(lambda sample: True))
    cache, capture = _accelerate_with_graphs(pipe, config)
    outs = [run(pipe, steps=STEPS, **kwargs) for _ in range(2)]
    layout, names = cache.layout, {id(m): n for n, m in cache.denoiser.named_modules()}
    always = [names[id(m)] for m in (*layout.lead, layout.head, *layout.trail)]
    skipped = [names[id(m)] for m in (*layout.rest, layout.tail)]
    replays, counts = _replays(cache), cache.state.counts()
    _restore(pipe)

    assert always == ["transformer_blocks.0", "transformer_blocks.1", "transformer_blocks.3"]
    assert replays == {**{name: 2 * STEPS for name in always}, **{name: 2 * full for name in skipped}}
    assert capture.calls == 4 and counts == host_counts
    for out in outs:
        np.testing.assert_allclose(out, host, rtol=0, atol=1e-6)


class _WarmCapture(_FakeCapture):
    """`_FakeCapture` with `capture_graph`'s warm-up runs: a call executes warmup_iters + 1 times on first use."""

    def __call__(self, fn, leaves, spec, device, *, warmup_iters=2, pool=None):
        for _ in range(warmup_iters):
            fn(pytree.tree_unflatten([leaf.clone() if isinstance(leaf, torch.Tensor) else leaf for leaf in leaves], spec))
        return super().__call__(fn, leaves, spec, device, warmup_iters=warmup_iters, pool=pool)


@pytest.mark.parametrize("which, taylor_order, full", [("sd", None, 3), ("pixart", 1, 4)])
def test_a_fixed_schedule_is_captured_whole_one_graph_per_decision(which, taylor_order, full, request, tmp_path, monkeypatch):
    """No decision waits for the head: the graph hook captures each call whole (here on the CPU, with a stand-in
    capture that also runs the warm-ups), one graph per slot and full / cached decision, and the output and
    counts are the eager run's."""
    pipe, kwargs, _ = _pipeline(which, request, tmp_path)
    config = BlockCacheConfig(threshold=None, cache_interval=3, taylor_order=taylor_order)
    accel.accelerate(pipe, AccelConfig(cache=config))
    eager = run(pipe, steps=STEPS, **kwargs)
    eager_counts = get_block_cache(pipe).state.counts()
    accel.restore(pipe)
    assert eager_counts == (full, STEPS - full)  # full at 0, 3, 6 (and 1: a first-order forecast needs two)

    capture = _WarmCapture()
    monkeypatch.setattr(cuda_graph, "capture_graph", capture)
    monkeypatch.setattr(cuda_graph, "signature_key", functools.partial(signature_key, device_type="cpu"))
    monkeypatch.setattr(BlockCache, "_replayable", staticmethod(lambda sample: True))
    cache, per_block = _accelerate_with_graphs(pipe, config)
    outs = [run(pipe, steps=STEPS, **kwargs) for _ in range(2)]
    hook, counts = get_cuda_graph_hook(cache.denoiser), cache.state.counts()
    branches = sorted(key[1] for key in hook.graphs)
    replays = sorted(entry.graph.replays for entry in hook.graphs.values())
    eager_plan = planner_of(cache.denoiser).current.eager
    _restore(pipe)

    assert branches == [(("block_cache", ("cached", 0)),), (("block_cache", ("full", 0)),)] and capture.calls == 2
    assert replays == sorted([2 * full, 2 * (STEPS - full)])  # every call replays, the first right after its capture
    assert not eager_plan and cache.graph_path == CALL_GRAPHS and per_block.calls == 0
    assert counts == eager_counts
    for out in outs:
        np.testing.assert_allclose(out, eager, rtol=0, atol=1e-6)


def test_a_block_whose_capture_fails_runs_eagerly_and_the_others_replay(sd_pipe, monkeypatch, caplog):
    config = BlockCacheConfig(threshold=0.5)
    accel.accelerate(sd_pipe, AccelConfig(cache=config))
    host = run(sd_pipe, steps=STEPS)
    full, cached = get_block_cache(sd_pipe).state.counts()
    accel.restore(sd_pipe)

    monkeypatch.setattr(BlockCache, "_replayable", staticmethod(lambda sample: True))
    cache, _ = _accelerate_with_graphs(sd_pipe, config)
    cache.block_graphs.capture = capture = _FakeCapture(fail={3})  # head, rest[0], then rest[1] (the mid block) fails
    calls = []
    handle = sd_pipe.unet.mid_block.resnets[0].conv1.register_forward_hook(lambda *_: calls.append(1))
    with caplog.at_level(logging.WARNING):
        outs = [run(sd_pipe, steps=STEPS) for _ in range(2)]
    handle.remove()
    graphs = {name: entry for (name, _), entry in cache.block_graphs.graphs.items()}
    failed = [r.message for r in caplog.records if "capture of the block" in r.message]
    _restore(sd_pipe)

    assert graphs["mid_block"] is None and capture.calls == 5  # not tried again on later calls
    assert all(graphs[name] is not None for name in ("down_blocks.0", "down_blocks.1", "up_blocks.0", "up_blocks.1"))
    assert graphs["up_blocks.0"].graph.replays == 2 * full  # the blocks after the failed one still replay
    assert len(calls) == 2 * full  # the mid block ran eagerly, on full calls only
    assert len(failed) == 1 and "mid_block failed (RuntimeError" in failed[0] and "runs eagerly" in failed[0]
    for out in outs:
        np.testing.assert_allclose(out, host, rtol=0, atol=1e-6)


def test_no_graph_hook_or_host_inputs_keep_the_plain_eager_path(sd_pipe, monkeypatch):
    """Per-block graphs only where the graph hook would have captured the call."""
    accel.accelerate(sd_pipe, AccelConfig(cache=BlockCacheConfig(threshold=0.5)))
    cache = get_block_cache(sd_pipe)
    cache.block_graphs.capture = capture = _FakeCapture()
    monkeypatch.setattr(BlockCache, "_replayable", staticmethod(lambda sample: True))
    run(sd_pipe, steps=3)  # no graph hook
    accel.restore(sd_pipe)
    assert capture.calls == 0 and cache.graph_path is None
    monkeypatch.undo()

    accel.accelerate(sd_pipe, AccelConfig(cache=BlockCacheConfig(threshold=0.5), runtime=RuntimeConfig(cuda_graph=True)))
    cache = get_block_cache(sd_pipe)
    cache.block_graphs.capture = capture = _FakeCapture()
    run(sd_pipe, steps=3)  # CPU inputs: the graph hook would not capture
    accel.restore(sd_pipe)
    assert capture.calls == 0 and cache.graph_path is None


def _gpu_pipeline(which, request, tmp_path):
    pipe, kwargs, threshold = _pipeline(which, request, tmp_path)
    return pipe.to("cuda"), kwargs, threshold


@pytest.mark.gpu
@pytest.mark.parametrize("which", ["sd", "pixart"])
def test_per_block_graphs_match_the_eager_block_cache_on_gpu(which, request, tmp_path, monkeypatch, caplog):
    """Real per-block graphs (forced even where conditional nodes exist): the eager block cache's output and
    decisions; the second run replays only (the first block on every call, the others on full calls), and a
    device counter inside the second block shows it executed on full calls only."""
    pipe, kwargs, threshold = _gpu_pipeline(which, request, tmp_path)
    before = run(pipe, steps=STEPS, **kwargs)
    runtime = RuntimeConfig(dtype="float16") if which == "sd" else None
    config = BlockCacheConfig(threshold=threshold)
    accel.accelerate(pipe, AccelConfig(cache=config, runtime=runtime))
    eager = run(pipe, steps=STEPS, **kwargs)
    eager_counts = get_block_cache(pipe).state.counts()
    accel.restore(pipe)
    full, cached = eager_counts
    assert cached >= 1

    if which == "sd":
        accel.accelerate(pipe, AccelConfig(cache=config, runtime=RuntimeConfig(dtype="float16", cuda_graph=True)))
    else:
        accel.accelerate(pipe, AccelConfig(cache=config))
        apply_cuda_graph(pipe.transformer)
    cache = get_block_cache(pipe)
    cache.conditional_nodes = False  # the per-block path, whatever this torch supports
    executed = torch.zeros((), dtype=torch.int64, device="cuda")
    leaf = next(m for m in cache.layout.rest[0].modules() if not list(m.children()))
    def count(*_):  # recorded into that block's graph; returns None, so the leaf's output stays its own
        executed.add_(1)

    handle = leaf.register_forward_hook(count)
    with caplog.at_level(logging.WARNING):
        first = run(pipe, steps=STEPS, **kwargs)  # captures every block, then replays
    first_counts = cache.state.counts()
    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), replay(self))[1])
    executed.zero_()
    second = run(pipe, steps=STEPS, **kwargs)
    second_counts = cache.state.counts()
    leaf_runs = executed.item()
    handle.remove()
    captured, whole = cache.block_graphs.captured(), dict(get_cuda_graph_hook(cache.denoiser).graphs)
    _restore(pipe)

    assert not any("capture of the block" in r.message or "capture failed" in r.message for r in caplog.records)
    assert len(captured) == len(cache.layout.rest) + 2 and not whole
    assert first_counts == second_counts == eager_counts
    assert len(replays) == STEPS + full * (len(cache.layout.rest) + 1)
    assert leaf_runs == full < STEPS  # replays of the second block's graph, on full calls only
    np.testing.assert_allclose(first, eager, rtol=0, atol=5e-3)
    np.testing.assert_allclose(second, eager, rtol=0, atol=5e-3)
    assert np.array_equal(run(pipe, steps=STEPS, **kwargs), before)
