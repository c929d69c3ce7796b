"""Feature caches on tiny SD / SDXL pipelines: three passes, skipped modules really skipped, state per call.

Tolerance: the tiny UNets have random weights, so cached features are not "nearly the same" in the
way a trained model's are; a cached run must stay within 0.1 (max abs, images in [0, 1]) of the
baseline while differing from it, and `cache_interval=1` must reproduce the baseline exactly.
"""

import numpy as np
import pytest
import torch
from tiny import run, tiny_sd_pipeline

import accel
from accel import AccelConfig, RuntimeConfig
from accel.cache import (
    BlockCacheConfig,
    DeepCacheConfig,
    EncoderPropagationConfig,
    apply_deepcache,
    full_steps,
    get_block_cache,
    get_deepcache,
    get_encoder_propagation,
    key_steps,
)
from accel.cache._reuse import skip_layout
from accel.cache.deepcache import deep_modules
from accel.session import get_session

TOLERANCE = 0.1


def _leaf_calls(modules):
    """Count calls of every leaf (conv, linear, norm) under each module: a cached module calls none."""
    counts = [0] * len(modules)
    handles = []
    for i, module in enumerate(modules):
        def bump(*_, i=i):
            counts[i] += 1
        if not list(module.children()):
            # A hooked leaf (conv_in) is still called when cached; count the convolution it would run.
            handles.append(_CountConvolution(module, bump))
            continue
        for leaf in module.modules():
            if not list(leaf.children()):
                handles.append(leaf.register_forward_hook(bump))
    return counts, handles


class _CountConvolution:
    def __init__(self, conv, bump):
        self.conv, original = conv, conv._conv_forward
        conv._conv_forward = lambda *args: (bump(), original(*args))[1]

    def remove(self):
        del self.conv._conv_forward


def _shallow_modules(unet):
    """What branch 0 computes: conv_in, the up layer reading skip 0, conv_out."""
    return [unet.conv_in, *skip_layout(unet).up[0], unet.conv_out]


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_deepcache_three_passes_and_deep_modules_skipped(which, sd_pipe, sdxl_pipe):
    pipe = sd_pipe if which == "sd" else sdxl_pipe
    deep, shallow = deep_modules(pipe.unet, 0), _shallow_modules(pipe.unet)
    counts, handles = _leaf_calls(deep + shallow)
    before = run(pipe, steps=6)
    per_call = [c // 6 for c in counts]  # one UNet call per step: CFG runs as one batch
    counts[:] = [0] * len(counts)

    accel.accelerate(pipe, AccelConfig(cache=DeepCacheConfig(cache_interval=3, cache_branch=0)))
    cached = run(pipe, steps=6)
    state = get_deepcache(pipe).state
    assert (state.full_calls, state.cached_calls) == (2, 4)  # full steps 0 and 3
    for i, module in enumerate(deep):
        assert counts[i] == per_call[i] * 2 > 0, type(module).__name__  # computed on the 2 full steps only
    for i in range(len(deep), len(counts)):
        assert counts[i] == per_call[i] * 6 > 0  # the shallow branch runs on every step
    assert not np.array_equal(cached, before)
    assert np.abs(cached - before).max() < TOLERANCE

    accel.restore(pipe)
    for handle in handles:
        handle.remove()
    assert np.array_equal(run(pipe, steps=6), before)
    assert all(not getattr(m, "_diffusers_hook", None) or not m._diffusers_hook.hooks for m in pipe.unet.modules())


def test_leaf_counter_sees_one_unet_call_per_step(sd_pipe):
    # `per_call` above assumes one UNet call per step; guard that assumption.
    counts, handles = _leaf_calls([sd_pipe.unet.conv_in])
    run(sd_pipe, steps=3)
    for handle in handles:
        handle.remove()
    assert counts == [3]


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_interval_one_is_exact_and_every_branch_runs(which, sd_pipe, sdxl_pipe):
    pipe = sd_pipe if which == "sd" else sdxl_pipe
    before = run(pipe, steps=4)
    accel.accelerate(pipe, AccelConfig(cache=DeepCacheConfig(cache_interval=1)))
    assert np.array_equal(run(pipe, steps=4), before)
    accel.restore(pipe)
    deepest = skip_layout(pipe.unet).num_skips - 1
    for branch in (0, deepest // 2, deepest):
        accel.accelerate(pipe, AccelConfig(cache=DeepCacheConfig(cache_interval=2, cache_branch=branch)))
        out = run(pipe, steps=4)
        accel.restore(pipe)
        assert np.abs(out - before).max() < TOLERANCE and not np.array_equal(out, before), branch


def _unet_inputs(pipe, seed, batch=1):
    g = torch.Generator().manual_seed(seed)
    unet = pipe.unet
    sample = torch.randn(batch, unet.config.in_channels, 4, 4, generator=g)
    context = torch.randn(batch, 7, unet.config.cross_attention_dim, generator=g)
    return sample, context


def _applied(pipe):
    return get_deepcache(pipe) or get_encoder_propagation(pipe) or get_block_cache(pipe)


@pytest.mark.parametrize("cache", [DeepCacheConfig(cache_interval=2), EncoderPropagationConfig(key_steps=(0, 2)),
                                   BlockCacheConfig(threshold=0.5)], ids=["deepcache", "encoder", "block"])
def test_cached_step_reuses_its_own_slot_for_cond_and_uncond(cache, sd_pipe):
    """A pipeline that calls the UNet twice per step (cond, then uncond) keeps two caches."""
    accel.accelerate(sd_pipe, AccelConfig(cache=cache))
    session = get_session(sd_pipe)
    (x_c, c_c), (x_u, c_u) = _unet_inputs(sd_pipe, 1), _unet_inputs(sd_pipe, 2)
    t = torch.tensor(500)
    with torch.no_grad():
        session.begin_call(4)
        full_c = sd_pipe.unet(x_c, t, c_c).sample
        full_u = sd_pipe.unet(x_u, t, c_u).sample
        session.step_index = 1  # a cached step: same inputs, so each branch must give back its own output
        cached_c = sd_pipe.unet(x_c, t, c_c).sample
        cached_u = sd_pipe.unet(x_u, t, c_u).sample
        state = _applied(sd_pipe).state
        assert (state.full_calls, state.cached_calls) == (2, 2)
        # With a new timestep the output changes: the uncached part really runs.
        moved = sd_pipe.unet(x_c + 1, t - 300, c_c).sample
        session.end_call()
    torch.testing.assert_close(cached_c, full_c, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached_u, full_u, rtol=0, atol=1e-6)
    assert not torch.allclose(full_c, full_u)
    assert not torch.allclose(moved, full_c)


def test_state_resets_every_call(sd_pipe):
    config = AccelConfig(cache=DeepCacheConfig(cache_interval=3, uniform=False))
    accel.accelerate(sd_pipe, config)
    first = run(sd_pipe, steps=5)
    assert np.array_equal(run(sd_pipe, steps=5), first)  # same features and schedule again
    hook = get_deepcache(sd_pipe).hooks[id(sd_pipe.unet.mid_block)]
    pointers = [b.data_ptr() for buffers, _ in hook.buffers.values() for b in buffers]
    other = run(sd_pipe, steps=9)  # the schedule follows this call's step count
    state = get_deepcache(sd_pipe).state
    assert state.full_calls == len(full_steps(9, config.cache)) and state.full_calls + state.cached_calls == 9
    assert [b.data_ptr() for buffers, _ in hook.buffers.values() for b in buffers] == pointers  # graphs stay valid
    accel.restore(sd_pipe)
    accel.accelerate(sd_pipe, config)
    assert np.array_equal(run(sd_pipe, steps=9), other)


def test_bad_settings_raise_clear_errors(sd_pipe):
    with pytest.raises(ValueError, match="cache_interval=0 .*valid: an int >= 1"):
        DeepCacheConfig(cache_interval=0)
    with pytest.raises(ValueError, match="valid choices: True, False"):
        DeepCacheConfig(uniform="yes")
    with pytest.raises(ValueError, match="cache_branch=-1"):
        DeepCacheConfig(cache_branch=-1)
    with pytest.raises(ValueError, match=r"cache_branch=6 is deeper than this UNet: it has 6 skip connections; valid cache_branch: 0\.\.5"):
        accel.accelerate(sd_pipe, AccelConfig(cache=DeepCacheConfig(cache_branch=6)))
    assert not accel.is_accelerated(sd_pipe)
    accel.accelerate(sd_pipe, AccelConfig(cache=DeepCacheConfig()))
    with pytest.raises(RuntimeError, match="already applied"):
        apply_deepcache(sd_pipe, DeepCacheConfig())


def test_nonuniform_schedule_is_denser_around_the_centre():
    config = DeepCacheConfig(cache_interval=3, uniform=False, center=0.3, power=1.4)
    steps = sorted(full_steps(50, config))
    assert steps[0] == 0 and len(steps) == 17 and len(set(steps)) == 17
    gaps = np.diff(steps)
    centre = int(np.argmin(np.abs(np.array(steps) - 15)))
    assert gaps[max(centre - 1, 0)] <= gaps[0] and gaps[min(centre, len(gaps) - 1)] < gaps[-1]
    assert sorted(full_steps(50, DeepCacheConfig(cache_interval=3))) == list(range(0, 50, 3))


def test_img2img_uses_the_steps_actually_run(tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    pipe = tiny_sd_pipeline(tmp_path, StableDiffusionImg2ImgPipeline)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    before = run(pipe, steps=8, image=image, strength=0.5)
    accel.accelerate(pipe, AccelConfig(cache=DeepCacheConfig(cache_interval=3)))
    out = run(pipe, steps=8, image=image, strength=0.5)
    state = get_deepcache(pipe).state
    assert (state.full_calls, state.cached_calls) == (2, 2)  # 4 steps run: full at 0 and 3
    assert np.abs(out - before).max() < TOLERANCE and not np.array_equal(out, before)
    accel.restore(pipe)
    assert np.array_equal(run(pipe, steps=8, image=image, strength=0.5), before)


def test_graph_hook_sees_the_branch_before_each_call(sd_pipe, monkeypatch):
    """With the runtime's CUDA-graph hook outside ours, each call is planned full or cached first."""
    from accel.runtime.cuda_graph import CUDAGraphHook

    seen = []
    original = CUDAGraphHook.new_forward

    def spy(self, module, *args, **kwargs):
        seen.append(self.planner.current.decisions["deepcache"])  # (mode, slot), part of the graph key
        return original(self, module, *args, **kwargs)

    monkeypatch.setattr(CUDAGraphHook, "new_forward", spy)
    before = run(sd_pipe, steps=5)
    accel.accelerate(sd_pipe, AccelConfig(cache=DeepCacheConfig(cache_interval=3), runtime=RuntimeConfig(cuda_graph=True)))
    out = run(sd_pipe, steps=5)
    modes = [decision[0] for decision in seen]
    assert modes == ["full", "cached", "cached", "full", "cached"]
    assert {decision[1] for decision in seen} == {0}
    accel.restore(sd_pipe)
    assert np.abs(out - before).max() < TOLERANCE
    assert np.array_equal(run(sd_pipe, steps=5), before)


@pytest.mark.gpu
def test_deepcache_with_cuda_graphs_matches_eager_on_gpu(sd_pipe):
    pipe = sd_pipe.to("cuda")
    accel.accelerate(pipe, AccelConfig(cache=DeepCacheConfig(cache_interval=3)))
    eager = run(pipe, steps=7)
    accel.restore(pipe)
    accel.accelerate(pipe, AccelConfig(cache=DeepCacheConfig(cache_interval=3), runtime=RuntimeConfig(cuda_graph=True)))
    graphed = run(pipe, steps=7)
    again = run(pipe, steps=7)  # replays: cached graphs read the buffers the full graph wrote
    graphs = dict(get_cuda_graph_hook_graphs(pipe))  # restore clears the hook's own dict
    accel.restore(pipe)
    assert {dict(key[1])["deepcache"][0] for key in graphs if graphs[key] is not None} == {"full", "cached"}
    np.testing.assert_allclose(graphed, eager, atol=1e-3)
    np.testing.assert_allclose(again, eager, atol=1e-3)


def get_cuda_graph_hook_graphs(pipe):
    from accel.runtime import get_cuda_graph_hook

    return get_cuda_graph_hook(pipe.unet).graphs


@pytest.mark.parametrize("peer", [False, True])
def test_bench_runs_cache_configs(peer, tmp_path, monkeypatch):
    from apps import bench, bench_archs

    if peer:
        pytest.importorskip("DeepCache")
    monkeypatch.setattr(bench_archs, "build_pipeline", lambda arch, **kw: tiny_sd_pipeline(tmp_path))
    monkeypatch.setitem(bench_archs.DEFAULT_SIZE, "sd15", 32)
    names = ["stock", "deepcache", "deepcache+graph"] if not peer else ["stock", "deepcache-pkg", "deepcache"]
    report = bench.run_benchmark("sd15", names, steps=6, scheduler="ddim", runs=1, warmup=1)
    rows = {r["config"]: r for r in report["results"]}
    assert rows["deepcache"]["psnr_db"] < 100  # cached: not identical to stock
    assert "DeepCacheConfig(cache_interval=3" in rows["deepcache"]["accel_config"]
    if peer:
        assert rows["deepcache-pkg"]["psnr_db"] < 100
    bench.write_report(report, tmp_path / "r")
    assert "| deepcache | 6 |" in (tmp_path / "r.md").read_text()


def test_bench_interleaves_eager_configs_round_by_round(tmp_path, monkeypatch):
    from apps import bench, bench_archs

    monkeypatch.setattr(bench_archs, "build_pipeline", lambda arch, **kw: tiny_sd_pipeline(tmp_path))
    monkeypatch.setitem(bench_archs.DEFAULT_SIZE, "sd15", 32)
    report = bench.run_benchmark("sd15", ["stock", "deepcache"], steps=6, scheduler="ddim", runs=3, warmup=1,
                                 interleave=True)
    rows = {r["config"]: r for r in report["results"]}
    assert len(rows["stock"]["times_s"]) == len(rows["deepcache"]["times_s"]) == 3
    paired = sorted(s / t for s, t in zip(rows["stock"]["times_s"], rows["deepcache"]["times_s"]))
    assert rows["deepcache"]["speedup"] == paired[1] and rows["deepcache"]["psnr_db"] < 100
    assert "interleaved round by round" in bench.markdown_table(report)
    with pytest.raises(SystemExit, match="compiled configs would recompile"):
        bench.run_benchmark("sd15", ["stock", "compiled"], steps=2, scheduler="ddim", runs=1, interleave=True)


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_encoder_propagation_three_passes_and_encoder_skipped(which, sd_pipe, sdxl_pipe):
    pipe = sd_pipe if which == "sd" else sdxl_pipe
    unet = pipe.unet
    encoder, decoder = [unet.conv_in, *unet.down_blocks, unet.mid_block], [*unet.up_blocks, unet.conv_out]
    counts, handles = _leaf_calls(encoder + decoder)
    before = run(pipe, steps=6)
    per_call = [c // 6 for c in counts]
    counts[:] = [0] * len(counts)

    accel.accelerate(pipe, AccelConfig(cache=EncoderPropagationConfig(key_steps=(0, 3))))
    cached = run(pipe, steps=6)
    state = get_encoder_propagation(pipe).state
    assert (state.full_calls, state.cached_calls) == (2, 4)
    assert counts[:len(encoder)] == [c * 2 for c in per_call[:len(encoder)]]  # key steps only
    assert counts[len(encoder):] == [c * 6 for c in per_call[len(encoder):]]  # the decoder runs every step
    assert all(per_call)
    assert not np.array_equal(cached, before)
    assert np.abs(cached - before).max() < TOLERANCE

    accel.restore(pipe)
    for handle in handles:
        handle.remove()
    assert np.array_equal(run(pipe, steps=6), before)


@pytest.mark.parametrize("steps, full", [(20, 10), (50, 25), (7, 4), (1, 1)])
def test_encoder_propagation_default_rule_scales_with_the_step_count(steps, full):
    # The calibrated default (benchmarks/results/encoder-propagation/): a key step every other step.
    keys = key_steps(steps, EncoderPropagationConfig())
    assert len(keys) == full and keys == frozenset(range(0, steps, 2))
    dense = key_steps(steps, EncoderPropagationConfig(key_interval=3, dense_fraction=0.5))
    assert set(range((steps + 1) // 2)) <= dense and len(dense) == (steps + 1) // 2 + len(range((steps + 1) // 2, steps, 3))
    assert key_steps(steps, EncoderPropagationConfig(key_steps=(3,))) == {0, 3}  # step 0 always runs the encoder


def test_encoder_propagation_default_key_steps_and_prior_noise(sd_pipe):
    before = run(sd_pipe, steps=6)
    accel.accelerate(sd_pipe, AccelConfig(cache=EncoderPropagationConfig()))
    plain = run(sd_pipe, steps=6)
    state = get_encoder_propagation(sd_pipe).state
    assert (state.full_calls, state.cached_calls) == (3, 3)  # key steps 0, 2, 4
    run(sd_pipe, steps=9)
    assert (state.full_calls, state.cached_calls) == (5, 4)  # the rule follows each call's step count
    accel.restore(sd_pipe)

    accel.accelerate(sd_pipe, AccelConfig(cache=EncoderPropagationConfig(prior_noise=0.05, prior_noise_from=0.5)))
    assert "step" not in sd_pipe.scheduler.__dict__  # injected at each step's end, the scheduler left alone
    injected = run(sd_pipe, steps=6)
    assert np.array_equal(run(sd_pipe, steps=6), injected)  # z_T is taken afresh every call
    accel.restore(sd_pipe)
    assert not get_session(sd_pipe) and "step" not in sd_pipe.scheduler.__dict__
    assert not np.array_equal(injected, plain) and np.abs(injected - plain).max() < TOLERANCE
    assert np.array_equal(run(sd_pipe, steps=6), before)


def test_encoder_propagation_bad_settings():
    with pytest.raises(ValueError, match=r"key_steps=\(\) is not supported; valid: None"):
        EncoderPropagationConfig(key_steps=())
    with pytest.raises(ValueError, match="key_steps"):
        EncoderPropagationConfig(key_steps=(0, -1))
    with pytest.raises(ValueError, match="prior_noise=-0.1"):
        EncoderPropagationConfig(prior_noise=-0.1)
    with pytest.raises(ValueError, match="valid choices: True, False"):
        EncoderPropagationConfig(include_mid_block=1)
    steps = [3, 0, 3]
    config = EncoderPropagationConfig(key_steps=steps)
    assert config.key_steps == (0, 3) and steps == [3, 0, 3]  # a normalised copy; the caller's list is untouched
    with pytest.raises(ValueError, match=r"key_interval=0 is not supported; valid: an int >= 1"):
        EncoderPropagationConfig(key_interval=0)
    with pytest.raises(ValueError, match=r"dense_fraction=1.5 is not supported; valid: a fraction in \[0, 1\]"):
        EncoderPropagationConfig(dense_fraction=1.5)
    with pytest.raises(ValueError, match=r"parallel_decode='yes' is not supported; valid choices: True, False"):
        EncoderPropagationConfig(parallel_decode="yes")


def _decoder_batches(unet):
    """Record the batch size of every call of the decoder's first block."""
    sizes = []
    handle = unet.up_blocks[0].register_forward_pre_hook(
        lambda module, args, kwargs: sizes.append(kwargs["hidden_states"].shape[0]), with_kwargs=True)
    return sizes, handle


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_encoder_propagation_parallel_decode_batches_the_steps_ahead(which, sd_pipe, sdxl_pipe):
    pipe = sd_pipe if which == "sd" else sdxl_pipe
    before = run(pipe, steps=7)
    sizes, handle = _decoder_batches(pipe.unet)
    encoder_calls, encoder_handles = _leaf_calls([pipe.unet.down_blocks[0]])
    accel.accelerate(pipe, AccelConfig(cache=EncoderPropagationConfig(key_steps=(0, 4))))
    sequential = run(pipe, steps=7)
    assert sizes == [2] * 7  # CFG: cond and uncond in one batch of 2, one decoder call per step
    accel.restore(pipe)
    sizes.clear()
    sequential_encoder_calls, encoder_calls[0] = encoder_calls[0], 0

    accel.accelerate(pipe, AccelConfig(cache=EncoderPropagationConfig(key_steps=(0, 4), parallel_decode=True)))
    parallel = run(pipe, steps=7)
    applied = get_encoder_propagation(pipe)
    # Key step 0, then steps 1-3 decoded as one batch; key step 4, then steps 5-6.
    assert sizes == [2, 3 * 2, 2, 2 * 2] and applied.decoder.batches == [3, 2]
    assert (applied.state.full_calls, applied.state.cached_calls) == (2, 5)
    assert encoder_calls[0] == sequential_encoder_calls > 0  # the batched decoders do not run the encoder
    assert not applied.decoder.decoded  # every prediction made ahead was used
    np.testing.assert_allclose(parallel, sequential, atol=1e-5)  # the same predictions, batched
    assert np.array_equal(run(pipe, steps=7), parallel)  # state per call
    accel.restore(pipe)
    handle.remove()
    for h in encoder_handles:
        h.remove()
    assert np.array_equal(run(pipe, steps=7), before)
    assert not pipe.unet._diffusers_hook.hooks


def test_encoder_propagation_parallel_decode_follows_img2img_and_a_mismatched_loop(tmp_path, caplog):
    from diffusers import StableDiffusionImg2ImgPipeline
    from PIL import Image

    pipe = tiny_sd_pipeline(tmp_path, StableDiffusionImg2ImgPipeline)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    config = EncoderPropagationConfig(key_steps=(0, 3))
    accel.accelerate(pipe, AccelConfig(cache=config))
    sequential = run(pipe, steps=12, image=image, strength=0.5)  # 6 steps run, from the middle of the schedule
    accel.restore(pipe)
    accel.accelerate(pipe, AccelConfig(cache=EncoderPropagationConfig(key_steps=(0, 3), parallel_decode=True)))
    parallel = run(pipe, steps=12, image=image, strength=0.5)
    assert get_encoder_propagation(pipe).decoder.batches == [2, 2]
    np.testing.assert_allclose(parallel, sequential, atol=1e-5)

    # A loop that does not pass scheduler.timesteps in order: the steps ahead are not decoded early.
    session = get_session(pipe)
    x, c = _unet_inputs(pipe, 1)
    with torch.no_grad():
        session.begin_call(4)
        pipe.scheduler.set_timesteps(4)
        key = pipe.unet(x, torch.tensor(999), c).sample  # not scheduler.timesteps[0]
        session.step_index = 1
        cached = pipe.unet(x, torch.tensor(999), c).sample
        session.end_call()
    decoder = get_encoder_propagation(pipe).decoder
    assert decoder.batches == [] and not decoder.enabled and "decodes sequentially" in caplog.text
    torch.testing.assert_close(cached, key, rtol=0, atol=1e-6)  # same inputs: the cached path gives the same output


def test_encoder_propagation_parallel_decode_refused_where_it_cannot_run(sd_pipe, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    with pytest.raises(ValueError, match="cannot run inside CUDA graphs or a fully compiled UNet"):
        accel.accelerate(sd_pipe, AccelConfig(cache=EncoderPropagationConfig(parallel_decode=True),
                                              runtime=RuntimeConfig(cuda_graph=True)))
    assert not accel.is_accelerated(sd_pipe)
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(sd_pipe.unet, conditioning_embedding_out_channels=(16, 32)).eval()
    pipe = StableDiffusionControlNetPipeline(**{k: v for k, v in sd_pipe.components.items() if k != "image_encoder"},
                                             controlnet=controlnet)
    with pytest.raises(accel.UnsupportedPipelineError, match="residuals come from each step's latent"):
        accel.accelerate(pipe, AccelConfig(cache=EncoderPropagationConfig(parallel_decode=True)))
    assert not accel.is_accelerated(pipe)
    assert not getattr(pipe.unet, "_diffusers_hook", None) or not pipe.unet._diffusers_hook.hooks


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_block_cache_three_passes_and_rest_skipped(which, sd_pipe, sdxl_pipe):
    pipe = sd_pipe if which == "sd" else sdxl_pipe
    unet = pipe.unet
    always = [unet.conv_in, unet.down_blocks[0], unet.conv_out]
    rest = [*unet.down_blocks[1:], unet.mid_block, *unet.up_blocks]
    counts, handles = _leaf_calls(always + rest)
    before = run(pipe, steps=8)
    per_call = [c // 8 for c in counts]
    counts[:] = [0] * len(counts)

    accel.accelerate(pipe, AccelConfig(cache=BlockCacheConfig(threshold=0.5)))
    cached = run(pipe, steps=8)
    state = get_block_cache(pipe).state
    assert state.cached_calls >= 2 and state.full_calls + state.cached_calls == 8
    assert counts[:len(always)] == [c * 8 for c in per_call[:len(always)]]
    assert counts[len(always):] == [c * state.full_calls for c in per_call[len(always):]]
    assert not np.array_equal(cached, before) and np.abs(cached - before).max() < TOLERANCE
    assert np.array_equal(run(pipe, steps=8), cached)  # per-call state: the same decisions again
    accel.restore(pipe)

    accel.accelerate(pipe, AccelConfig(cache=BlockCacheConfig(threshold=0.0)))
    assert np.array_equal(run(pipe, steps=8), before)  # never below a zero threshold: every step full
    accel.restore(pipe)
    for handle in handles:
        handle.remove()
    assert np.array_equal(run(pipe, steps=8), before)


def test_block_cache_bad_settings_and_consecutive_limit(sd_pipe):
    with pytest.raises(ValueError, match="threshold=-1 is not supported; valid: a number >= 0"):
        BlockCacheConfig(threshold=-1)
    with pytest.raises(ValueError, match="warmup_steps=0 is not supported; valid: an int >= 1"):
        BlockCacheConfig(warmup_steps=0)
    with pytest.raises(ValueError, match="max_consecutive_cached=0 is not supported; valid: None or an int >= 1"):
        BlockCacheConfig(max_consecutive_cached=0)
    with pytest.raises(ValueError, match="threshold=True"):
        BlockCacheConfig(threshold=True)
    accel.accelerate(sd_pipe, AccelConfig(cache=BlockCacheConfig(max_consecutive_cached=1, threshold=10.0)))
    run(sd_pipe, steps=6)
    state = get_block_cache(sd_pipe).state
    assert (state.full_calls, state.cached_calls) == (3, 3)  # full, cached, full, cached, ...


def test_deepcache_with_controlnet_residuals(tmp_path):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image

    base = tiny_sd_pipeline(tmp_path)
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32)).eval()
    pipe = StableDiffusionControlNetPipeline(**{k: v for k, v in base.components.items() if k != "image_encoder"},
                                             controlnet=controlnet)
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    before = run(pipe, steps=6, image=image)
    accel.accelerate(pipe, AccelConfig(cache=DeepCacheConfig(cache_interval=3)))
    out = run(pipe, steps=6, image=image)
    state = get_deepcache(pipe).state
    assert (state.full_calls, state.cached_calls) == (2, 4)
    assert np.abs(out - before).max() < TOLERANCE and not np.array_equal(out, before)
    accel.restore(pipe)
    assert np.array_equal(run(pipe, steps=6, image=image), before)


def test_deepcache_follows_a_swapped_sampler(sd_pipe):
    from accel import SamplerConfig

    accel.accelerate(sd_pipe, AccelConfig(sampler=SamplerConfig("dpmpp_2m", num_steps=6), cache=DeepCacheConfig(cache_interval=2)))
    out = run(sd_pipe, steps=None)
    state = get_deepcache(sd_pipe).state
    assert (state.full_calls, state.cached_calls) == (3, 3)
    assert np.isfinite(out).all()


def test_step_index_that_never_advances_turns_caching_off(sd_pipe, caplog):
    from accel.session import MAX_CALLS_PER_STEP

    accel.accelerate(sd_pipe, AccelConfig(cache=DeepCacheConfig(cache_interval=2)))
    session = get_session(sd_pipe)
    x, c = _unet_inputs(sd_pipe, 1)
    with torch.no_grad():
        session.begin_call(4)
        outs = [sd_pipe.unet(x, torch.tensor(500), c).sample for _ in range(MAX_CALLS_PER_STEP + 3)]
        session.end_call()
    state = get_deepcache(sd_pipe).state
    assert len(state.slots) == MAX_CALLS_PER_STEP and state.cached_calls == 0
    assert "step index is not advancing" in caplog.text
    assert all(torch.equal(o, outs[0]) for o in outs)


def test_block_cache_runs_under_the_graph_hook_on_cpu(sd_pipe):
    """Graphs and the block cache compose; on the CPU the call runs eagerly with the same decisions."""
    before = run(sd_pipe, steps=8)
    accel.accelerate(sd_pipe, AccelConfig(cache=BlockCacheConfig(threshold=0.5)))
    plain = run(sd_pipe, steps=8)
    accel.restore(sd_pipe)
    accel.accelerate(sd_pipe, AccelConfig(cache=BlockCacheConfig(threshold=0.5), runtime=RuntimeConfig(cuda_graph=True)))
    assert np.array_equal(run(sd_pipe, steps=8), plain)
    assert get_block_cache(sd_pipe).state.cached_calls >= 2
    assert get_session(sd_pipe).planner(sd_pipe.unet).current.eager  # host-side decisions: never captured
    accel.restore(sd_pipe)
    assert np.array_equal(run(sd_pipe, steps=8), before)


@pytest.mark.gpu
def test_block_cache_under_cuda_graphs_decides_on_the_gpu(sd_pipe, monkeypatch, caplog):
    """fp16 SD with graphs: the eager block cache's output and decisions, the skipped blocks really not
    executed on cached replays (a device counter inside the mid block), and no host sync in a UNet call.
    A torch without conditional nodes (2.11) checks the documented fallback instead, then skips."""
    from dataclasses import replace

    from accel.cache.block_cache import NAME, conditional_nodes_supported

    pipe = sd_pipe.to("cuda")
    before = run(pipe, steps=8)
    cache, runtime = BlockCacheConfig(threshold=0.5), RuntimeConfig(dtype="float16")
    accel.accelerate(pipe, AccelConfig(cache=cache, runtime=runtime))
    eager = run(pipe, steps=8)
    eager_counts = get_block_cache(pipe).state.counts()
    accel.restore(pipe)
    assert eager_counts[1] >= 1

    if not conditional_nodes_supported():
        accel.accelerate(pipe, AccelConfig(cache=cache, runtime=replace(runtime, cuda_graph=True)))
        with caplog.at_level("WARNING"):
            fallback = [run(pipe, steps=8) for _ in range(2)]
        counts = get_block_cache(pipe).state.counts()
        accel.restore(pipe)
        assert counts == eager_counts and caplog.text.count("no CUDA-graph conditional nodes") == 1
        for out in fallback:
            np.testing.assert_allclose(out, eager, rtol=0, atol=5e-3)
        assert np.array_equal(run(pipe, steps=8), before)
        pytest.skip(f"torch {torch.__version__} has no CUDA-graph conditional nodes: checked the eager fallback only")

    executed = torch.zeros((), dtype=torch.int64, device="cuda")

    def bump(*_):
        executed.add_(1)  # recorded into the graph: counts executions on the GPU, replays included

    hooks = [pipe.unet.mid_block.resnets[0].register_forward_hook(bump)]
    accel.accelerate(pipe, AccelConfig(cache=cache, runtime=replace(runtime, cuda_graph=True)))
    first = run(pipe, steps=8)  # warm-up runs (both branches eagerly), capture, replays
    first_counts = get_block_cache(pipe).state.counts()

    replays = []
    replay = torch.cuda.CUDAGraph.replay
    monkeypatch.setattr(torch.cuda.CUDAGraph, "replay", lambda self: (replays.append(1), replay(self))[1])
    hooks.append(pipe.unet.register_forward_pre_hook(lambda *_: torch.cuda.set_sync_debug_mode("error"), prepend=True))
    hooks.append(pipe.unet.register_forward_hook(lambda *_: torch.cuda.set_sync_debug_mode("default"), always_call=True))
    executed.zero_()
    try:
        second = run(pipe, steps=8)  # replays only; a host sync inside a UNet call raises
    finally:
        torch.cuda.set_sync_debug_mode("default")
    second_counts = get_block_cache(pipe).state.counts()
    captured = {key[1] for key, graph in get_cuda_graph_hook_graphs(pipe).items() if graph is not None}
    for hook in hooks:
        hook.remove()
    accel.restore(pipe)

    assert ((NAME, 0),) in captured  # keyed on the block cache's decision for slot 0
    assert first_counts == second_counts == eager_counts
    assert len(replays) == 8
    assert executed.item() == second_counts[0] < 8  # the mid block ran on full steps only
    np.testing.assert_allclose(first, eager, rtol=0, atol=5e-3)
    np.testing.assert_allclose(second, eager, rtol=0, atol=5e-3)
    assert np.array_equal(run(pipe, steps=8), before)


def _save_tiny_lora(folder):
    """A LoRA for `tiny_unet`'s attention projections, saved as diffusers saves LoRA weights (safetensors)."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict
    from tiny import tiny_unet

    unet = tiny_unet()
    torch.manual_seed(1)
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=layers)
    return folder


@pytest.mark.parametrize("cache", [DeepCacheConfig(cache_interval=3), EncoderPropagationConfig(key_steps=(0, 3)),
                                   BlockCacheConfig(threshold=0.5)], ids=["deepcache", "encoder", "block"])
def test_lora_loaded_with_load_lora_weights_composes_with_each_cache(cache, sd_pipe, tmp_path):
    pytest.importorskip("peft")
    base = run(sd_pipe, steps=6)
    sd_pipe.load_lora_weights(_save_tiny_lora(tmp_path / "lora"))
    lora = run(sd_pipe, steps=6)
    assert np.abs(lora - base).max() > 1e-2  # the adapter really changes the output

    accel.accelerate(sd_pipe, AccelConfig(cache=cache))
    cached = run(sd_pipe, steps=6)
    assert _applied(sd_pipe).state.cached_calls >= 1
    assert not np.array_equal(cached, lora) and np.abs(cached - lora).max() < TOLERANCE
    sd_pipe.disable_lora()
    cached_without_lora = run(sd_pipe, steps=6)
    sd_pipe.enable_lora()
    # The adapter stays active under the cache: the cached run is nearer the LoRA baseline than without it.
    assert np.abs(cached - lora).mean() < np.abs(cached_without_lora - lora).mean()
    accel.restore(sd_pipe)
    assert np.array_equal(run(sd_pipe, steps=6), lora)
