"""The compiled runtime and presets on DiT pipelines (PixArt, SD3, Flux): three passes per runtime step on CPU,
where CUDA graphs fall back to eager and compilation is held at eager (`torch.compiler.set_stance`)."""

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, PixArtSigmaPipeline
from tiny import run, tiny_flux_pipeline, tiny_pixart_pipeline, tiny_sana_inputs, tiny_sana_pipeline, tiny_sd3_pipeline

import accel
from accel import AccelConfig, BlockCacheConfig, RuntimeConfig
from accel.cache import get_block_cache
from accel.runtime import get_cuda_graph_hook
from accel.session import planner_of

PIPELINES = {
    "pixart_sigma": (lambda tmp: tiny_pixart_pipeline(tmp, pipeline_class=PixArtSigmaPipeline),
                     {"use_resolution_binning": False, "clean_caption": False}),
    "sd3": (tiny_sd3_pipeline, {}),
    "flux": (tiny_flux_pipeline, {"max_sequence_length": 16}),
}
SANA = (tiny_sana_pipeline, tiny_sana_inputs())
# Sana's published scheduler: DPM-Solver++ on flow sigmas, whose config keeps a betas field it does not use.
SANA_DPM = (lambda tmp: tiny_sana_pipeline(tmp, scheduler=DPMSolverMultistepScheduler(
    flow_shift=3.0, prediction_type="flow_prediction", use_flow_sigmas=True)), tiny_sana_inputs())
RUNTIMES = {
    "graphs": RuntimeConfig(cuda_graph=True, components=("denoiser", "vae", "text_encoder")),
    "flash-pin": RuntimeConfig(attention="flash"),
    "bfloat16": RuntimeConfig(dtype="bfloat16"),
    "regional": RuntimeConfig(compile="regional", compile_workers=0, cuda_graph=True),
}


@pytest.mark.parametrize("runtime", list(RUNTIMES))
@pytest.mark.parametrize("which", list(PIPELINES))
def test_runtime_round_trip_on_dits(which, runtime, tmp_path):
    build, kwargs = PIPELINES[which]
    pipe = build(tmp_path)
    before = run(pipe, steps=3, **kwargs)
    config = RUNTIMES[runtime]
    accel.accelerate(pipe, AccelConfig(runtime=config))
    if config.cuda_graph:
        assert get_cuda_graph_hook(pipe.transformer).planner is planner_of(pipe.transformer) is not None
    with torch.compiler.set_stance("force_eager"):  # the hooks and regions, not inductor's CPU compile time
        out = run(pipe, steps=3, **kwargs)
    if runtime == "regional":
        compiled = [m for m in pipe.transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]
        assert len(compiled) >= 2  # the repeated blocks
    accel.restore(pipe)
    if runtime == "bfloat16":
        assert np.abs(out - before).max() < 0.05 and pipe.transformer.dtype == torch.float32
    else:
        np.testing.assert_allclose(out, before, atol=1e-5)
    assert not [m for m in pipe.transformer.modules() if getattr(m, "_compiled_call_impl", None) is not None]
    assert np.array_equal(run(pipe, steps=3, **kwargs), before)


@pytest.mark.parametrize("which", list(PIPELINES))
def test_fused_qkv_on_dits(which, tmp_path):
    build, kwargs = PIPELINES[which]
    pipe = build(tmp_path)
    before, keys = run(pipe, steps=3, **kwargs), set(pipe.transformer.state_dict())
    accel.accelerate(pipe, AccelConfig(runtime=RuntimeConfig(attention="sdpa", fuse_qkv=True)))
    assert any(k.endswith("to_qkv.weight") for k in pipe.transformer.state_dict())
    np.testing.assert_allclose(run(pipe, steps=3, **kwargs), before, atol=1e-5)
    accel.restore(pipe)
    assert set(pipe.transformer.state_dict()) == keys and np.array_equal(run(pipe, steps=3, **kwargs), before)


def test_what_a_dit_runtime_refuses(tmp_path):
    flux = tiny_flux_pipeline(tmp_path)
    with pytest.raises(ValueError, match="attention='xformers'.*FluxTransformer2DModel keeps its own"):
        accel.accelerate(flux, AccelConfig(runtime=RuntimeConfig(attention="xformers")))
    with pytest.raises(accel.UnsupportedPipelineError, match="names 'unet', but the denoiser of FluxPipeline is a transformer"):
        accel.accelerate(flux, AccelConfig(runtime=RuntimeConfig(cuda_graph=True, components=("unet",))))
    assert not accel.is_accelerated(flux)


@pytest.mark.parametrize("name", ["balanced", "fast"])
@pytest.mark.parametrize("which", ["sd3", "flux", "sana", "sana_dpm"])
def test_presets_on_flow_matching_dits(which, name, tmp_path, monkeypatch):
    """A flow-matching pipeline keeps its own scheduler and gets the DiT runtime (regional compile, CUDA graphs of the
    transformer); "fast" adds the block cache on a fixed schedule. Applied as the preset is, then restored exactly."""
    from accel.runtime import compile as compile_module

    monkeypatch.setattr(compile_module, "default_workers", lambda: 0)  # no compile workers for an eager CPU run
    build, kwargs = {"sana": SANA, "sana_dpm": SANA_DPM}.get(which) or PIPELINES[which]
    pipe = build(tmp_path)
    steps = 6
    scheduler, before = pipe.scheduler, run(pipe, steps=steps, **kwargs)
    config = accel.resolve_config(preset=name, pipe=pipe)
    assert config.sampler is None and config.runtime.compile == "regional" and config.runtime.components == ("denoiser",)
    accel.accelerate(pipe, preset=name)
    with torch.compiler.set_stance("force_eager"):
        out = run(pipe, steps=steps, **kwargs)
    assert pipe.scheduler is scheduler and np.isfinite(out).all()
    assert get_cuda_graph_hook(pipe.transformer) is not None and get_cuda_graph_hook(pipe.vae.decoder) is None
    if name == "fast":
        # Full below the 2 warm-up steps and at every third step: 0, 1, 3; cached 2, 4, 5.
        assert config.cache.threshold is None and get_block_cache(pipe).state.counts() == (3, 3)
    else:
        assert get_block_cache(pipe) is None
        np.testing.assert_allclose(out, before, atol=1e-5)
    accel.restore(pipe)
    assert np.array_equal(run(pipe, steps=steps, **kwargs), before)
    assert accel.get_preset(name).sampler is not None  # UNet pipelines keep the sampler swap


def test_presets_without_the_components_a_pipeline_leaves_out(tmp_path, monkeypatch):
    """Flux with no VAE or text encoders (prompt embeddings in, latents out, as the benchmarks build it): every flow
    preset applies and restores, and so does a runtime naming the VAE and text encoders."""
    from accel.runtime import compile as compile_module

    monkeypatch.setattr(compile_module, "default_workers", lambda: 0)
    pipe = tiny_flux_pipeline(tmp_path)
    pipe.vae = pipe.text_encoder = pipe.text_encoder_2 = pipe.tokenizer = pipe.tokenizer_2 = None
    g = torch.Generator().manual_seed(0)
    kwargs = dict(prompt_embeds=torch.randn(1, 16, 32, generator=g), pooled_prompt_embeds=torch.randn(1, 32, generator=g),
                  height=32, width=32, output_type="latent", num_inference_steps=4)

    def latents():
        return pipe(generator=torch.Generator().manual_seed(0), **kwargs).images

    before = latents()
    everything = AccelConfig(runtime=RuntimeConfig(cuda_graph=True, components=("denoiser", "vae", "text_encoder")))
    for config in [*(accel.get_preset(name, pipe) for name in ("quality", "balanced", "fast")), everything]:
        accel.accelerate(pipe, config)
        with torch.compiler.set_stance("force_eager"):
            assert torch.isfinite(latents()).all()
        accel.restore(pipe)
        assert torch.equal(latents(), before)


def _compiled_anywhere(block: torch.nn.Module) -> bool:
    """Whether a compiled function or call is left on the block: as its call, its forward, or in its hook chain."""
    registry = getattr(block, "_diffusers_hook", None)
    functions = [block.__dict__.get("forward")]
    functions += [getattr(ref, attr) for ref in getattr(registry, "_fn_refs", ()) for attr in ("forward", "original_forward")]
    return block._compiled_call_impl is not None or any(hasattr(f, "_torchdynamo_orig_callable") for f in functions)


@pytest.fixture
def counting_compiler(monkeypatch):
    """Regional compilation through dynamo with a backend that counts the graphs and runs them as traced."""
    from torch._dynamo.testing import CompileCounter

    from accel.runtime import compile as compile_module

    counter = CompileCounter()
    monkeypatch.setitem(compile_module.REGIONAL_COMPILE_DEFAULTS, "backend", counter)
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


def test_regional_compile_under_the_block_cache_compiles_each_block_kind_once(tmp_path, counting_compiler):
    """The block cache's hooks stay outside the compiled blocks: traced into them, their per-block state made dynamo
    recompile once per block (and decision), which on Flux-dev's 57 blocks passed its recompile limit."""
    pipe, kwargs = tiny_flux_pipeline(tmp_path, num_single_layers=8), {"max_sequence_length": 16}
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    cache = BlockCacheConfig(threshold=None, cache_interval=2, warmup_steps=1)
    before = run(pipe, steps=5, **kwargs)
    accel.accelerate(pipe, AccelConfig(cache=cache))
    eager = run(pipe, steps=5, **kwargs)
    accel.restore(pipe)
    accel.accelerate(pipe, AccelConfig(cache=cache, runtime=RuntimeConfig(compile="regional", compile_workers=0)))
    out = run(pipe, steps=5, **kwargs)
    graphs = counting_compiler.frame_count
    assert all(_compiled_anywhere(b) for b in blocks) and get_block_cache(pipe).state.counts() == (3, 2)
    accel.restore(pipe)
    assert 2 <= graphs <= 4  # a dual- and a single-stream block (and the latter's input strides once more), not 10
    np.testing.assert_allclose(out, eager, atol=1e-5)
    assert not any(_compiled_anywhere(b) for b in blocks)
    assert np.array_equal(run(pipe, steps=5, **kwargs), before) and counting_compiler.frame_count == graphs


def test_a_hooked_block_is_uncompiled_whichever_is_removed_first(tmp_path, counting_compiler):
    from diffusers.hooks import HookRegistry, ModelHook

    from accel.runtime import apply_compile, remove_compile

    class Count(ModelHook):
        calls = 0

        def new_forward(self, module, *args, **kwargs):
            Count.calls += 1
            return self.fn_ref.original_forward(*args, **kwargs)

    pipe, kwargs = tiny_flux_pipeline(tmp_path), {"max_sequence_length": 16}
    blocks = [*pipe.transformer.transformer_blocks, *pipe.transformer.single_transformer_blocks]
    before = run(pipe, **kwargs)
    for hooks_first in (True, False):
        for block in blocks:
            HookRegistry.check_if_exists_or_initialize(block).register_hook(Count(), "test.count")
        torch._dynamo.reset()  # this round compiles anew
        apply_compile(pipe.transformer, "regional", workers=0)
        Count.calls, graphs = 0, counting_compiler.frame_count
        np.testing.assert_allclose(run(pipe, **kwargs), before, atol=1e-5)
        assert Count.calls == 2 * len(blocks) and counting_compiler.frame_count > graphs  # the hooks ran, eagerly
        if hooks_first:
            for block in blocks:
                block._diffusers_hook.remove_hook("test.count", recurse=False)
        remove_compile(pipe.transformer)
        if not hooks_first:
            for block in blocks:
                block._diffusers_hook.remove_hook("test.count", recurse=False)
        assert not any(_compiled_anywhere(b) for b in blocks)
        graphs = counting_compiler.frame_count
        assert np.array_equal(run(pipe, **kwargs), before) and counting_compiler.frame_count == graphs
