"""The block cache on DiT pipelines (PixArt-Alpha, SD3, Flux), its device-side decision, and which configs DiTs take.

Tolerance: as in test_cache.py, tiny random models; a cached run stays within 0.1 (max abs, images in [0, 1])
of the baseline while differing from it. The device-side decision (what a CUDA graph replays) is checked on
the CPU through its eager form, which runs both branches and selects with `torch.where`: it must give the
host-side decision's output and counts.
"""

import logging

import numpy as np
import pytest
import torch
from diffusers import PixArtSigmaPipeline
from diffusers.hooks import HookRegistry, ModelHook
from tiny import run, tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sd3_pipeline

import accel
from accel import AccelConfig, RuntimeConfig, SamplerConfig
from accel.cache import BlockCacheConfig, DeepCacheConfig, apply_block_cache, get_block_cache
from accel.cache.block_cache import (
    BLEND,
    HOOK_NAME,
    BlockCache,
    conditional_nodes_supported,
    consecutive_after,
    denoiser_layout,
    relative_l1,
    should_compute,
)
from accel.runtime import get_cuda_graph_hook
from accel.session import get_session

TOLERANCE = 0.1
STEPS = 8
# builder, call arguments, a threshold at which the tiny model caches some steps but not all
PIPELINES = {
    "pixart": (tiny_pixart_pipeline, {"use_resolution_binning": False, "clean_caption": False}, 0.3),
    "pixart_sigma": (lambda tmp: tiny_pixart_pipeline(tmp, pipeline_class=PixArtSigmaPipeline),
                     {"use_resolution_binning": False, "clean_caption": False}, 0.3),
    "sd3": (tiny_sd3_pipeline, {}, 0.3),
    "flux": (tiny_flux_pipeline, {"max_sequence_length": 16}, 0.5),
}


def _build(which, tmp_path):
    build, kwargs, threshold = PIPELINES[which]
    return build(tmp_path), kwargs, threshold


def _leaf_calls(modules):
    """Calls of every leaf module under each module: a skipped block calls none of its leaves."""
    counts = [0] * len(modules)
    handles = []
    for i, module in enumerate(modules):
        for leaf in module.modules():
            if not list(leaf.children()):
                handles.append(leaf.register_forward_hook(lambda *_, i=i: counts.__setitem__(i, counts[i] + 1)))
    return counts, handles


@pytest.mark.parametrize("which", ["pixart", "pixart_sigma", "sd3", "flux"])
def test_three_passes_and_remaining_blocks_skipped(which, tmp_path):
    pipe, kwargs, threshold = _build(which, tmp_path)
    layout = denoiser_layout(pipe)
    blocks = [layout.head, *layout.rest, layout.tail]
    assert len(layout.rest) >= 2
    counts, handles = _leaf_calls(blocks)
    before = run(pipe, steps=STEPS, **kwargs)
    per_call = [c // STEPS for c in counts]  # one transformer call per step: CFG (if any) runs as one batch
    assert all(per_call)
    counts[:] = [0] * len(counts)

    accel.accelerate(pipe, AccelConfig(cache=BlockCacheConfig(threshold=threshold)))
    cached = run(pipe, steps=STEPS, **kwargs)
    full, skipped = get_block_cache(pipe).state.counts()
    assert skipped >= 2 and full >= 2 and full + skipped == STEPS
    assert counts[0] == per_call[0] * STEPS  # the first block runs on every step
    assert counts[1:] == [c * full for c in per_call[1:]]  # the others on full steps only
    assert not np.array_equal(cached, before) and np.abs(cached - before).max() < TOLERANCE
    assert np.array_equal(run(pipe, steps=STEPS, **kwargs), cached)  # state is reset per call
    accel.restore(pipe)

    accel.accelerate(pipe, AccelConfig(cache=BlockCacheConfig(threshold=0.0)))
    assert np.array_equal(run(pipe, steps=STEPS, **kwargs), before)  # a zero threshold never skips
    accel.restore(pipe)
    for handle in handles:
        handle.remove()
    assert np.array_equal(run(pipe, steps=STEPS, **kwargs), before)
    assert all(HOOK_NAME not in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}) for m in pipe.transformer.modules())


def _sd3_inputs(transformer, seed):
    g = torch.Generator().manual_seed(seed)
    config = transformer.config
    return dict(hidden_states=torch.randn(1, config.in_channels, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 5, config.joint_attention_dim, generator=g),
                pooled_projections=torch.randn(1, config.pooled_projection_dim, generator=g),
                timestep=torch.tensor([500.0]))


def test_cond_and_uncond_calls_keep_their_own_state(tmp_path):
    """A pipeline calling the transformer twice per step (cond, then uncond) keeps one cache per call."""
    pipe = tiny_sd3_pipeline(tmp_path)
    accel.accelerate(pipe, AccelConfig(cache=BlockCacheConfig(threshold=0.5)))
    session, transformer = get_session(pipe), pipe.transformer
    cond, uncond = _sd3_inputs(transformer, 1), _sd3_inputs(transformer, 2)
    with torch.no_grad():
        session.begin_call(4)
        full_c, full_u = transformer(**cond).sample, transformer(**uncond).sample
        session.step_index = 1  # same inputs again: each call must give back its own output
        cached_c, cached_u = transformer(**cond).sample, transformer(**uncond).sample
        assert get_block_cache(pipe).state.counts() == (2, 2)
        moved = transformer(**{**cond, "hidden_states": cond["hidden_states"] + 1}).sample  # a big change: full
        session.end_call()
    torch.testing.assert_close(cached_c, full_c, rtol=0, atol=1e-5)
    torch.testing.assert_close(cached_u, full_u, rtol=0, atol=1e-5)
    assert not torch.allclose(full_c, full_u) and not torch.allclose(moved, full_c)
    assert get_block_cache(pipe).state.counts() == (3, 2)


def test_decision_functions():
    old = torch.tensor([1.0, -1.0, 2.0, 0.0])
    assert relative_l1(old + 0.5, old).item() == pytest.approx(0.5)
    assert relative_l1(old, old).item() == 0.0
    change, zero = torch.tensor(0.05), torch.tensor(0, dtype=torch.int32)
    assert not should_compute(change, zero, False, 0.1, None)
    assert should_compute(change, zero, False, 0.05, None)  # not below the threshold
    assert should_compute(change, zero, torch.tensor(True), 0.1, None)  # forced (warm-up, first call)
    assert should_compute(torch.tensor(float("nan")), zero, False, 0.1, None)
    assert should_compute(change, torch.tensor(2, dtype=torch.int32), False, 0.1, 2)
    assert not should_compute(change, torch.tensor(1, dtype=torch.int32), False, 0.1, 2)
    assert consecutive_after(torch.tensor(3), torch.tensor(True)).item() == 0
    assert consecutive_after(torch.tensor(3), torch.tensor(False)).item() == 4


class _RunThrice(ModelHook):
    """Execute each call three times, as the CUDA-graph hook does on first use (two warm-ups, then capture)."""

    def new_forward(self, module, *args, **kwargs):
        for _ in range(2):
            self.fn_ref.original_forward(*args, **kwargs)
        return self.fn_ref.original_forward(*args, **kwargs)


@pytest.mark.parametrize("which", ["pixart", "sd"])
def test_device_decision_matches_the_host_decision(which, tmp_path, request, monkeypatch):
    """The decision a graph would replay, run eagerly (both branches, `torch.where`), executed three times
    per call: the same output and counts as deciding on the host once per call."""
    if which == "sd":
        pipe, kwargs, threshold = request.getfixturevalue("sd_pipe"), {}, 0.5
    else:
        pipe, kwargs, threshold = _build(which, tmp_path)
    config = AccelConfig(cache=BlockCacheConfig(threshold=threshold, max_consecutive_cached=2))
    accel.accelerate(pipe, config)
    host = run(pipe, steps=STEPS, **kwargs)
    host_counts = get_block_cache(pipe).state.counts()
    accel.restore(pipe)
    assert host_counts[1] >= 2

    monkeypatch.setattr(BlockCache, "_device_path", lambda self, graph, sample: True)
    accel.accelerate(pipe, config)
    denoiser = get_block_cache(pipe).denoiser
    HookRegistry.check_if_exists_or_initialize(denoiser).register_hook(_RunThrice(), "test.run_thrice")
    for _ in range(2):  # the second call starts from the state the first one left
        device = run(pipe, steps=STEPS, **kwargs)
        assert get_block_cache(pipe).state.execution == BLEND
        assert get_block_cache(pipe).state.counts() == host_counts
        np.testing.assert_allclose(device, host, rtol=0, atol=1e-6)
    denoiser._diffusers_hook.remove_hook("test.run_thrice", recurse=False)
    accel.restore(pipe)


def test_graphs_without_conditional_nodes_take_the_per_block_path_with_one_log_line(sd_pipe, monkeypatch, caplog):
    """The per-block path (tests/test_block_cache_graphs.py) with the real `capture_graph`, which fails on the
    CPU: every block says so once and runs eagerly, giving the host path's output."""
    config = BlockCacheConfig(threshold=0.5)
    accel.accelerate(sd_pipe, AccelConfig(cache=config))
    host = run(sd_pipe, steps=STEPS)
    accel.restore(sd_pipe)

    monkeypatch.setattr(BlockCache, "_replayable", staticmethod(lambda sample: True))  # as if on a GPU
    accel.accelerate(sd_pipe, AccelConfig(cache=config, runtime=RuntimeConfig(cuda_graph=True)))
    cache = get_block_cache(sd_pipe)
    with caplog.at_level(logging.WARNING):
        cache.conditional_nodes = False  # what an older torch reports
        outs = [run(sd_pipe, steps=STEPS) for _ in range(2)]
    lines = [r.message for r in caplog.records if "block cache cannot decide inside a CUDA graph" in r.message]
    assert len(lines) == 1 and "no CUDA-graph conditional nodes" in lines[0] and "per-block CUDA graphs" in lines[0]
    assert not any("CUDA graphs need the inputs" in r.message for r in caplog.records)  # the graph hook was told: eager
    assert get_session(sd_pipe).planner(sd_pipe.unet).current.eager
    failed = sorted(r.message.split(" failed")[0].rsplit(" ", 1)[1] for r in caplog.records if "capture of the block" in r.message)
    assert failed == sorted(name for (name, _), entry in cache.block_graphs.graphs.items() if entry is None)
    assert failed == ["down_blocks.0", "down_blocks.1", "mid_block", "up_blocks.0", "up_blocks.1"]  # once each
    for out in outs:
        np.testing.assert_allclose(out, host, rtol=0, atol=1e-6)


def test_a_call_the_graph_hook_ran_eagerly_turns_the_device_decision_off(sd_pipe, monkeypatch, caplog):
    """Capture failed (or the hook ran eagerly for another reason): from the next call on, decide on the host."""
    config = BlockCacheConfig(threshold=0.5)
    accel.accelerate(sd_pipe, AccelConfig(cache=config))
    host = run(sd_pipe, steps=STEPS)
    accel.restore(sd_pipe)

    monkeypatch.setattr(BlockCache, "_replayable", staticmethod(lambda sample: True))
    accel.accelerate(sd_pipe, AccelConfig(cache=config, runtime=RuntimeConfig(cuda_graph=True)))
    cache = get_block_cache(sd_pipe)
    cache.conditional_nodes = True  # as on a GPU; the CPU graph hook then runs the call eagerly
    with caplog.at_level(logging.WARNING):
        out = run(sd_pipe, steps=STEPS)
    assert not cache.conditional_nodes and cache.state.execution is None  # decided on the host after call 1
    assert sum("block cache cannot decide inside a CUDA graph" in r.message for r in caplog.records) == 1
    np.testing.assert_allclose(out, host, rtol=0, atol=1e-6)


def test_legacy_callback_advances_the_step_index(tmp_path):
    """PixArt-Alpha reports steps through `callback` / `callback_steps`; the user's callback keeps its cadence."""
    pipe, kwargs, threshold = _build("pixart", tmp_path)
    seen = []
    accel.accelerate(pipe, AccelConfig(cache=BlockCacheConfig(threshold=threshold)))
    run(pipe, steps=6, callback=lambda step, t, latents: seen.append(step), callback_steps=3, **kwargs)
    assert seen == [0, 3]
    full, cached = get_block_cache(pipe).state.counts()
    assert full + cached == 6 and cached >= 1  # without a step index every call would be a new, full slot


def test_dit_pipelines_take_the_block_cache_runtime_and_a_compatible_sampler_only(tmp_path):
    pixart, kwargs, threshold = _build("pixart", tmp_path / "pixart")
    accepted = "the accepted configs are: SamplerConfig, BlockCacheConfig, RuntimeConfig"
    with pytest.raises(accel.UnsupportedPipelineError, match=f"DeepCacheConfig needs a pipeline with a UNet2DConditionModel.*PixArtAlphaPipeline has a DiT .*{accepted}"):
        accel.accelerate(pixart, AccelConfig(cache=DeepCacheConfig(), runtime=RuntimeConfig(cuda_graph=True)))
    assert not accel.is_accelerated(pixart)

    before = run(pixart, steps=6, **kwargs)
    scheduler = pixart.scheduler
    accel.accelerate(pixart, AccelConfig(sampler=SamplerConfig("dpmpp_2m", num_steps=6), cache=BlockCacheConfig(threshold=threshold)))
    out = run(pixart, steps=None, **kwargs)
    assert np.isfinite(out).all() and get_block_cache(pixart).state.cached_calls >= 1
    with pytest.raises(RuntimeError, match="already applied"):
        apply_block_cache(pixart, BlockCacheConfig())
    accel.restore(pixart)
    assert pixart.scheduler is scheduler and np.array_equal(run(pixart, steps=6, **kwargs), before)

    sd3, _, _ = _build("sd3", tmp_path / "sd3")
    with pytest.raises(ValueError, match="sampler 'deis' does not run on a flow-matching schedule"):
        accel.accelerate(sd3, AccelConfig(sampler=SamplerConfig("deis")))
    assert not accel.is_accelerated(sd3)

    class NoBlocks:
        transformer = torch.nn.Linear(1, 1)

    with pytest.raises(accel.UnsupportedPipelineError, match="NoBlocks is not supported .*transformer of type Linear without transformer_blocks"):
        accel.accelerate(NoBlocks())


@pytest.mark.gpu
def test_dit_block_cache_under_cuda_graphs_matches_eager_on_gpu(tmp_path):
    """PixArt's transformer captured by the graph hook (applied directly: RuntimeConfig needs a UNet)."""
    from accel.runtime import apply_cuda_graph, remove_cuda_graph

    pipe, kwargs, threshold = _build("pixart", tmp_path)
    pipe = pipe.to("cuda")
    config = AccelConfig(cache=BlockCacheConfig(threshold=threshold))
    accel.accelerate(pipe, config)
    eager = run(pipe, steps=STEPS, **kwargs)
    eager_counts = get_block_cache(pipe).state.counts()
    hook = apply_cuda_graph(pipe.transformer)
    graphed = [run(pipe, steps=STEPS, **kwargs) for _ in range(2)]  # capture, then replays only
    counts = get_block_cache(pipe).state.counts()
    captured = {key[1] for key, graph in hook.graphs.items() if graph is not None}
    remove_cuda_graph(pipe.transformer)
    accel.restore(pipe)
    if not conditional_nodes_supported():  # torch 2.11: per-block graphs, decided on the host
        assert counts == eager_counts and eager_counts[1] >= 1 and not captured
        for out in graphed:
            np.testing.assert_allclose(out, eager, rtol=0, atol=2e-3)
        pytest.skip(f"torch {torch.__version__} has no CUDA-graph conditional nodes: checked the per-block graph path only")
    assert get_block_cache(pipe) is None and (("block_cache", 0),) in captured
    assert counts == eager_counts and eager_counts[1] >= 1
    for out in graphed:
        np.testing.assert_allclose(out, eager, rtol=0, atol=2e-3)
