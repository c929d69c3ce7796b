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
from tiny import run, tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sana_inputs, tiny_sana_pipeline, tiny_sd3_pipeline

import accel
from accel import AccelConfig, RuntimeConfig, SamplerConfig
from accel.cache import BlockCacheConfig, DeepCacheConfig, apply_block_cache, block_cache, get_block_cache
from accel.cache.block_cache import (
    BLEND,
    HOOK_NAME,
    BlockCache,
    conditional_nodes_supported,
    consecutive_after,
    denoiser_layout,
    relative_l1,
    should_compute,
    taylor_weights,
)
from accel.runtime import get_cuda_graph_hook
from accel.session import get_session, planner_of

TOLERANCE = 0.1
STEPS = 8
# builder, call arguments, a threshold at which the tiny model caches some steps but not all
PIPELINES = {
    "pixart": (tiny_pixart_pipeline, {"use_resolution_binning": False, "clean_caption": False}, 0.3),
    "pixart_sigma": (lambda tmp: tiny_pixart_pipeline(tmp, pipeline_class=PixArtSigmaPipeline),
                     {"use_resolution_binning": False, "clean_caption": False}, 0.3),
    "sd3": (tiny_sd3_pipeline, {}, 0.3),
    "flux": (tiny_flux_pipeline, {"max_sequence_length": 16}, 0.5),
    "sana": (tiny_sana_pipeline, tiny_sana_inputs(), 0.1),
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


@pytest.mark.parametrize("which", ["pixart", "pixart_sigma", "sd3", "flux", "sana"])
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


# pipeline, first_blocks, last_blocks: every role of a block present (Flux: the first blocks dual-stream, the last
# single-stream)
DBCACHE = [("pixart", 2, 1), ("sd3", 1, 1), ("flux", 2, 1)]


@pytest.mark.parametrize("which, first, last", DBCACHE)
def test_first_and_last_blocks_run_on_every_call_three_passes(which, first, last, tmp_path):
    pipe, kwargs, threshold = _build(which, tmp_path)
    layout = denoiser_layout(pipe, first, last)
    always, cached_blocks = [*layout.lead, layout.head, *layout.trail], [*layout.rest, layout.tail]
    assert len(always) == first + last and len(layout.trail) == last
    counts, handles = _leaf_calls(always + cached_blocks)
    before = run(pipe, steps=STEPS, **kwargs)
    per_call = [c // STEPS for c in counts]
    counts[:] = [0] * len(counts)

    accel.accelerate(pipe, AccelConfig(cache=BlockCacheConfig(threshold=threshold, first_blocks=first, last_blocks=last)))
    cached = run(pipe, steps=STEPS, **kwargs)
    full, skipped = get_block_cache(pipe).state.counts()
    assert skipped >= 2 and full >= 2 and full + skipped == STEPS
    assert counts[:len(always)] == [c * STEPS for c in per_call[:len(always)]]  # the first and last blocks: every step
    assert counts[len(always):] == [c * full for c in per_call[len(always):]]  # the cached ones: full steps only
    _close_then_restored(pipe, kwargs, before, cached, handles)


def _close_then_restored(pipe, kwargs, before, cached, handles):
    """The enabled pass: close to the baseline yet different, the same again on the next call (state is reset per
    call). Then restored (and the test's hooks removed): bit-identical to the baseline, no hook of the cache left."""
    assert not np.array_equal(cached, before) and np.abs(cached - before).max() < TOLERANCE
    assert np.array_equal(run(pipe, steps=STEPS, **kwargs), cached)
    accel.restore(pipe)
    for handle in handles:
        handle.remove()
    assert np.array_equal(run(pipe, steps=STEPS, **kwargs), before)
    assert all(HOOK_NAME not in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}) for m in pipe.transformer.modules())


def test_the_decision_is_taken_from_the_residual_after_the_first_blocks(tmp_path, monkeypatch):
    """With first_blocks=2 the probe is the second block's output minus the first block's input."""
    pipe = tiny_sd3_pipeline(tmp_path)
    accel.accelerate(pipe, AccelConfig(cache=BlockCacheConfig(threshold=0.5, first_blocks=2, last_blocks=1)))
    session, transformer, layout = get_session(pipe), pipe.transformer, get_block_cache(pipe).layout
    seen, probes = {}, []
    handles = [transformer.transformer_blocks[0].register_forward_pre_hook(
                   lambda m, args, kwargs: seen.__setitem__("input", kwargs["hidden_states"]), with_kwargs=True),
               layout.head.register_forward_hook(lambda m, a, out: seen.__setitem__("head", layout.head_outputs.split(out)[0]))]
    measure = block_cache.relative_l1
    monkeypatch.setattr(block_cache, "relative_l1", lambda new, old: (probes.append(new), measure(new, old))[1])
    with torch.no_grad():
        session.begin_call(3)
        for step in range(3):  # step 0 is forced full, without measuring
            session.step_index = step
            transformer(**_sd3_inputs(transformer, step))
            assert len(probes) == step
            if probes:
                torch.testing.assert_close(probes[-1], seen["head"] - seen["input"], rtol=0, atol=0)
        session.end_call()
    assert layout.head is transformer.transformer_blocks[1]
    for handle in handles:
        handle.remove()
    accel.restore(pipe)


def test_first_and_last_blocks_need_a_dit_with_blocks_left_to_cache(sd_pipe, tmp_path):
    with pytest.raises(ValueError, match=r"first_blocks=2, last_blocks=0\) needs a DiT; on a UNet.*valid: first_blocks=1, last_blocks=0"):
        accel.accelerate(sd_pipe, AccelConfig(cache=BlockCacheConfig(first_blocks=2)))
    assert not accel.is_accelerated(sd_pipe)
    pixart, _, _ = _build("pixart", tmp_path)
    with pytest.raises(ValueError, match=r"leaves no block to cache in this PixArtTransformer2DModel of 4 blocks; "
                                         r"valid: first_blocks \+ last_blocks <= 3"):
        accel.accelerate(pixart, AccelConfig(cache=BlockCacheConfig(first_blocks=3, last_blocks=1)))
    assert not accel.is_accelerated(pixart)
    assert all(HOOK_NAME not in getattr(getattr(m, "_diffusers_hook", None), "hooks", {}) for m in pixart.transformer.modules())
    for field, value, valid in (("first_blocks", 0, "an int >= 1"), ("last_blocks", -1, "an int >= 0"), ("first_blocks", 1.5, "an int >= 1")):
        with pytest.raises(ValueError, match=f"BlockCacheConfig.{field}={value} is not supported; valid: {valid}"):
            BlockCacheConfig(**{field: value})


def _refuse(*args, **kwargs):
    raise AssertionError("a fixed schedule measures nothing")


@pytest.mark.parametrize("which", ["pixart", "flux"])
def test_fixed_schedule_three_passes_decided_from_the_step_index(which, tmp_path, monkeypatch):
    """threshold=None, cache_interval=3, warmup_steps=2: full steps 0, 1, 3, 6, decided in each call's plan; the
    threshold's measure (and its host sync) never runs."""
    pipe, kwargs, _ = _build(which, tmp_path)
    layout = denoiser_layout(pipe)
    counts, handles = _leaf_calls([layout.head, layout.tail])
    before = run(pipe, steps=STEPS, **kwargs)
    per_call = [c // STEPS for c in counts]
    counts[:] = [0] * len(counts)

    monkeypatch.setattr(block_cache, "relative_l1", _refuse)
    monkeypatch.setattr(block_cache, "should_compute", _refuse)
    accel.accelerate(pipe, AccelConfig(cache=BlockCacheConfig(threshold=None, cache_interval=3, warmup_steps=2)))
    planner, plans = planner_of(pipe.transformer), []
    handles.append(pipe.transformer.register_forward_pre_hook(lambda m, a: plans.append(planner.current)))
    cached = run(pipe, steps=STEPS, **kwargs)
    assert [p.decisions["block_cache"] for p in plans] == [
        (decision, 0) for decision in ("full", "full", "cached", "full", "cached", "cached", "full", "cached")]
    assert get_block_cache(pipe).state.counts() == (4, 4)
    assert counts == [per_call[0] * STEPS, per_call[1] * 4]
    _close_then_restored(pipe, kwargs, before, cached, handles)


def test_fixed_schedule_settings():
    valid = r"valid: a threshold \(adaptive\), or threshold=None with cache_interval=N"
    with pytest.raises(ValueError, match=rf"threshold=None, cache_interval=None\) is not supported; {valid}"):
        BlockCacheConfig(threshold=None)
    with pytest.raises(ValueError, match=rf"threshold=0.1, cache_interval=2\) is not supported; {valid}"):
        BlockCacheConfig(cache_interval=2)
    with pytest.raises(ValueError, match="cache_interval=0 is not supported; valid: None or an int >= 1"):
        BlockCacheConfig(threshold=None, cache_interval=0)
    with pytest.raises(ValueError, match="max_consecutive_cached is not supported with cache_interval.*valid: max_consecutive_cached=None"):
        BlockCacheConfig(threshold=None, cache_interval=2, max_consecutive_cached=1)
    with pytest.raises(ValueError, match="threshold=-1 is not supported; valid: a number >= 0, or None with cache_interval"):
        BlockCacheConfig(threshold=-1)


@pytest.mark.parametrize("which", ["pixart", "sd3", "flux"])
def test_taylor_forecast_three_passes_and_order_0_is_the_plain_re_add(which, tmp_path):
    pipe, kwargs, threshold = _build(which, tmp_path)
    before = run(pipe, steps=STEPS, **kwargs)
    outs, counts = {}, {}
    for order in (None, 0, 1):
        # At most 3 cached steps in a row: a full step after step 1 gives the forecast a slope clear of step 0.
        config = BlockCacheConfig(threshold=threshold, max_consecutive_cached=3, taylor_order=order)
        accel.accelerate(pipe, AccelConfig(cache=config))
        outs[order] = run(pipe, steps=STEPS, **kwargs)
        counts[order] = get_block_cache(pipe).state.counts()
        if order != 1:
            accel.restore(pipe)
    assert np.array_equal(outs[0], outs[None]) and counts[0] == counts[None]
    full, cached = counts[1]
    assert cached >= 2 and full >= 2  # the first two steps run fully: a first-order forecast needs two
    assert not np.array_equal(outs[1], outs[None])
    _close_then_restored(pipe, kwargs, before, outs[1], [])


def test_taylor_weights():
    assert taylor_weights(3, [], 0) == [1.0]
    assert taylor_weights(1, [1], 1) == [2.0, -1.0]  # r0 + (r0 - r1)
    assert taylor_weights(1, [2], 1) == [1.5, -0.5]  # the slope over a gap of two steps
    assert taylor_weights(1, [1, 1], 2) == [2.5, -2.0, 0.5]  # + (r0 - 2 r1 + r2) / 2
    # full steps 1, 2, 4, forecast at 5: D1 = (r0 - r1) / 2, D2 = (D1 - (r1 - r2) / 1) / 2, r0 + D1 + D2 / 2
    assert taylor_weights(1, [2, 1], 2) == [1.625, -0.875, 0.25]
    tensors = taylor_weights(torch.tensor(1.0), torch.tensor([2.0, 1.0]), 2)
    assert [w.item() for w in tensors] == [1.625, -0.875, 0.25]
    assert sum(taylor_weights(2.5, [3, 2, 1], 3)) == pytest.approx(1.0)  # a constant residual is forecast as itself


@pytest.mark.parametrize("order, weights", [
    (1, {3: {2: 2.0, 1: -1.0}, 5: {4: 1.5, 2: -0.5}, 7: {6: 1.5, 4: -0.5}}),
    (2, {3: {2: 2.0, 1: -1.0}, 5: {4: 1.625, 2: -0.875, 1: 0.25}, 7: {6: 1.625, 4: -0.75, 2: 0.125}}),
])
def test_taylor_forecast_per_slot_matches_the_hand_computed_extrapolation(order, weights, tmp_path):
    """SD3's transformer called twice a step (cond, uncond), full every second step once `order + 1` full steps
    are in: on each cached call the last block returns the first block's output plus the forecast residual,
    sum_j w_j (tail - head output at full step j), from that slot's own full steps (at step 3 of order 2, whose
    history reaches back to step 0, first order over steps 2 and 1)."""
    pipe = tiny_sd3_pipeline(tmp_path)
    accel.accelerate(pipe, AccelConfig(cache=BlockCacheConfig(threshold=None, cache_interval=2, taylor_order=order)))
    session, transformer, layout = get_session(pipe), pipe.transformer, get_block_cache(pipe).layout
    seen = {}
    handles = [layout.head.register_forward_hook(lambda m, a, out: seen.__setitem__("head", layout.head_outputs.split(out)[0])),
               layout.tail.register_forward_hook(lambda m, a, out: seen.__setitem__("tail", layout.tail_outputs.split(out)[0]))]
    residuals, tails, heads = {}, {}, {}
    with torch.no_grad():
        session.begin_call(STEPS)
        for step in range(STEPS):
            session.step_index = step
            for branch in (0, 1):
                transformer(**_sd3_inputs(transformer, 10 * step + branch))
                heads[branch, step], tails[branch, step] = seen["head"], seen["tail"]
                if step not in weights:
                    residuals[branch, step] = seen["tail"] - seen["head"]
        session.end_call()
    assert get_block_cache(pipe).state.counts() == (2 * (STEPS - 3), 2 * 3)
    for branch in (0, 1):
        for step, ws in weights.items():
            expected = heads[branch, step] + sum(w * residuals[branch, full] for full, w in ws.items())
            torch.testing.assert_close(tails[branch, step], expected, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(residuals[0, 2], residuals[1, 2])  # the two slots did keep different residuals
    for handle in handles:
        handle.remove()
    accel.restore(pipe)


@pytest.mark.parametrize("order, interval, exact, lower", [
    (1, 3, (4, 5, 7), {2: 1}),  # full steps 0, 1, 3, 6: step 2 re-adds step 1's residual
    (2, 2, (3, 5, 7), {}),  # full steps 0, 1, 2, 4, 6: step 3 first order over steps 2 and 1, exact on a line too
])
def test_taylor_forecast_is_exact_on_a_linear_residual_and_never_reads_step_0(order, interval, exact, lower, tmp_path):
    """The cached blocks' residual (hidden and encoder states) made linear in the step index from step 1 on and
    far off that line at step 0, as a trained DiT's is at pure noise (mini-sd3-cifar10: the slope from step 0 to
    1 forecasts step 2 worse than re-adding step 1's): TaylorSeer's backward differences give a line exactly at
    any order, so every cached step's forecast is the line once its full steps are clear of step 0, and one order
    lower over the full steps after it before that; step 0's residual enters none. Reading it cost the block
    cache 4 dB PSNR against Cache-DiT there (every 3, F1B1, first order)."""
    pipe = tiny_sd3_pipeline(tmp_path)
    transformer = pipe.transformer
    head, tail = transformer.transformer_blocks[0], transformer.transformer_blocks[2]
    g = torch.Generator().manual_seed(0)
    coefficients, seen = {}, {}

    def line(name, like, at):
        if name not in coefficients:
            coefficients[name] = [torch.randn(like.shape, generator=g) for _ in range(3)]
        offset, slope, wild = coefficients[name]
        return 1e3 * wild if at == 0 else offset + slope * at

    def tail_forward(*args, **kwargs):  # the block's output replaced: tail minus head output is the line
        encoder, hidden = seen["head"]
        return encoder + line("encoder", encoder, step), hidden + line("hidden", hidden, step)

    tail.forward = tail_forward  # before the cache wraps it: its hook keeps this as the block's forward
    handles = [head.register_forward_hook(lambda m, a, out: seen.__setitem__("head", out)),
               tail.register_forward_hook(lambda m, a, out: seen.__setitem__("tail", out))]
    accel.accelerate(pipe, AccelConfig(cache=BlockCacheConfig(threshold=None, cache_interval=interval, first_blocks=1,
                                                              last_blocks=1, taylor_order=order)))
    session, outputs = get_session(pipe), {}
    with torch.no_grad():
        session.begin_call(STEPS)
        for step in range(STEPS):
            session.step_index = step
            transformer(**_sd3_inputs(transformer, step))
            outputs[step] = [t - h for t, h in zip(seen["tail"], seen["head"])]
        session.end_call()
    assert get_block_cache(pipe).state.counts()[1] == len(exact) + len(lower)
    for leaf, name in enumerate(("encoder", "hidden")):
        like = outputs[0][leaf]
        for at in exact:
            torch.testing.assert_close(outputs[at][leaf], line(name, like, at), rtol=1e-5, atol=1e-4)
        for at, kept in lower.items():
            torch.testing.assert_close(outputs[at][leaf], line(name, like, kept), rtol=1e-5, atol=1e-4)
    for handle in handles:
        handle.remove()
    accel.restore(pipe)


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


@pytest.mark.parametrize("which, options", [("pixart", {}), ("sd", {}), ("flux", {"first_blocks": 2, "last_blocks": 1}),
                                            ("sd3", {"first_blocks": 2, "last_blocks": 1, "taylor_order": 1})])
def test_device_decision_matches_the_host_decision(which, options, tmp_path, request, monkeypatch):
    """The decision a graph would replay, run eagerly (both branches, `torch.where`), executed three times
    per call: the same output and counts as deciding on the host once per call."""
    if which == "sd":
        pipe, kwargs, threshold = request.getfixturevalue("sd_pipe"), {}, 0.5
    else:
        pipe, kwargs, threshold = _build(which, tmp_path)
    config = AccelConfig(cache=BlockCacheConfig(threshold=threshold, max_consecutive_cached=2, **options))
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


class _ReplayStandIn(ModelHook):
    """A whole-call CUDA graph on the CPU: the first call of each plan runs (the capture); later ones return its
    output without running any Python below, as a replay does (the device state keeps the captured call's values)."""

    def __init__(self, planner):
        super().__init__()
        self.planner, self.outputs = planner, {}

    def new_forward(self, module, *args, **kwargs):
        key = self.planner.current.key
        if key not in self.outputs:
            self.outputs[key] = self.fn_ref.original_forward(*args, **kwargs)
        return self.outputs[key]


def test_a_replayed_call_is_committed_by_its_plan(tmp_path, monkeypatch):
    """A replay runs none of the cache's hooks: the plan alone must stage the call's result for the next commit."""
    pipe = tiny_sd3_pipeline(tmp_path)
    monkeypatch.setattr(BlockCache, "_device_path", lambda self, graph, sample: True)
    accel.accelerate(pipe, AccelConfig(cache=BlockCacheConfig(threshold=0.5)))
    session, transformer = get_session(pipe), pipe.transformer
    HookRegistry.check_if_exists_or_initialize(transformer).register_hook(_ReplayStandIn(session.planner(transformer)),
                                                                         "test.replay")
    inputs = _sd3_inputs(transformer, 1)
    with torch.no_grad():
        session.begin_call(6)
        for step in range(6):
            session.step_index = step
            transformer(**inputs)
        session.end_call()
    assert sum(get_block_cache(pipe).state.counts()) == 6  # one captured call, five replays: each one committed
    transformer._diffusers_hook.remove_hook("test.replay", recurse=False)
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
    accepted = "the accepted configs are: SamplerConfig, BlockCacheConfig, PatchParallelConfig, ContextParallelConfig, RuntimeConfig"
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


@pytest.mark.gpu
@pytest.mark.parametrize("options", [
    {"threshold": None, "cache_interval": 3, "first_blocks": 2, "last_blocks": 1, "taylor_order": 1},
    {"first_blocks": 2, "last_blocks": 1, "taylor_order": 1},
], ids=["fixed-schedule", "threshold"])
def test_dit_options_under_cuda_graphs_match_eager_on_gpu(options, tmp_path):
    """DBCache's first / last blocks and the TaylorSeer forecast with PixArt's transformer captured by the graph
    hook: a fixed schedule as whole-call graphs, a threshold as conditional nodes (or per-block graphs on a torch
    without them); the eager output and counts, also on the second run (replays only)."""
    from accel.cache.block_cache import CALL_GRAPHS, CONDITIONAL_NODES, PER_BLOCK_GRAPHS
    from accel.runtime import apply_cuda_graph, remove_cuda_graph

    pipe, kwargs, threshold = _build("pixart", tmp_path)
    pipe = pipe.to("cuda")
    config = BlockCacheConfig(**{"threshold": threshold, **options})
    accel.accelerate(pipe, AccelConfig(cache=config))
    eager = run(pipe, steps=STEPS, **kwargs)
    eager_counts = get_block_cache(pipe).state.counts()
    apply_cuda_graph(pipe.transformer)
    graphed = []
    for _ in range(2):
        graphed.append(run(pipe, steps=STEPS, **kwargs))
        assert get_block_cache(pipe).state.counts() == eager_counts
    path = get_block_cache(pipe).graph_path
    remove_cuda_graph(pipe.transformer)
    accel.restore(pipe)
    expected = CALL_GRAPHS if config.threshold is None else CONDITIONAL_NODES if conditional_nodes_supported() else PER_BLOCK_GRAPHS
    assert path == expected and eager_counts[1] >= 1
    for out in graphed:
        np.testing.assert_allclose(out, eager, rtol=0, atol=2e-3)
