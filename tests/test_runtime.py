"""Compiled runtime on CPU: graph keying, eager fallback, hook removal; GPU cases behind a marker."""

import logging

import numpy as np
import pytest
import torch
from diffusers.hooks import HookRegistry
from tiny import run
from torch.utils import _pytree as pytree

import accel
from accel import AccelConfig, RuntimeConfig
from accel.runtime import apply_cuda_graph, get_cuda_graph_hook, remove_cuda_graph
from accel.runtime.attention import attention_modules
from accel.runtime.cuda_graph import signature_key


def _key(branch=None, **arguments):
    leaves, spec = pytree.tree_flatten(arguments)
    # Meta tensors stand in for CUDA ones: the key reads only structure, shape, dtype and device.
    return signature_key(leaves, spec, branch, device_type="meta")


def _t(*shape):
    return torch.empty(shape, device="meta")


def test_graph_key_ignores_values_but_not_shapes_constants_or_branch():
    a = _key(sample=_t(2, 4, 8, 8), timestep=_t(), cross_attention_kwargs={"scale": 1.0})
    assert a is not None and a == _key(sample=_t(2, 4, 8, 8), timestep=_t(), cross_attention_kwargs={"scale": 1.0})
    assert _key(sample=_t(1, 4, 8, 8), timestep=_t(), cross_attention_kwargs={"scale": 1.0}) != a
    assert _key(sample=_t(2, 4, 8, 8), timestep=_t(), cross_attention_kwargs={"scale": 0.5}) != a
    assert _key(sample=_t(2, 4, 8, 8), timestep=_t(), cross_attention_kwargs=None) != a
    assert _key("deep", sample=_t(2, 4, 8, 8), timestep=_t(), cross_attention_kwargs={"scale": 1.0}) != a


def test_graph_key_is_none_for_host_tensors():
    leaves, spec = pytree.tree_flatten({"sample": torch.zeros(2, 4, 8, 8), "timestep": torch.tensor(1.0)})
    assert signature_key(leaves, spec) is None


def test_cpu_falls_back_to_eager_with_one_log_line(sd_pipe, caplog):
    before = run(sd_pipe)
    hook = apply_cuda_graph(sd_pipe.unet)
    with caplog.at_level(logging.WARNING, logger="accel.runtime.cuda_graph"):
        out = run(sd_pipe)
    assert np.array_equal(out, before)
    assert hook.graphs == {}
    assert sum("running eagerly" in r.message for r in caplog.records) == 1
    remove_cuda_graph(sd_pipe.unet)
    assert get_cuda_graph_hook(sd_pipe.unet) is None


def test_cuda_graph_twice_raises(sd_pipe):
    apply_cuda_graph(sd_pipe.unet)
    with pytest.raises(RuntimeError, match="already enabled"):
        apply_cuda_graph(sd_pipe.unet)


def test_pinned_kernel_is_traced_into_the_compiled_graph(sd_pipe, monkeypatch):
    """Entered inside each attention module, the pin is part of the graph dynamo hands inductor (and so of its cache
    key): a graph compiled for another kernel cannot come back from a warm cache."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compile_(*a, **{**k, "backend": record}))
    torch._dynamo.reset()
    try:
        accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(attention="math", compile="full")))
        run(sd_pipe)
        pins = [n.args for gm in graphs for n in gm.graph.nodes
                if n.op == "call_function" and n.target is torch.nn.attention._backend_from_string]
        assert pins and pins[0] == ("MATH",)  # entered (the exit restores the kernels enabled before)
        accel.restore(sd_pipe)
    finally:
        torch._dynamo.reset()


def test_sdpa_backend_pin_round_trip(sd_pipe):
    before = run(sd_pipe)
    processors = {k: type(v) for k, v in sd_pipe.unet.attn_processors.items()}
    accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(attention="math", channels_last=True)))
    attentions = attention_modules(sd_pipe.unet)
    assert attentions and all("accel.sdpa_backend" in m._diffusers_hook.hooks for m in attentions)
    assert {m._diffusers_hook.get_hook("accel.sdpa_backend").backend for m in attentions} == {"math"}
    assert sd_pipe.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    np.testing.assert_allclose(run(sd_pipe), before, atol=1e-5)
    accel.restore(sd_pipe)
    assert not any("accel.sdpa_backend" in getattr(m, "_diffusers_hook", HookRegistry(m)).hooks for m in attentions)
    assert {k: type(v) for k, v in sd_pipe.unet.attn_processors.items()} == processors
    assert sd_pipe.unet.conv_in.weight.is_contiguous()
    assert np.array_equal(run(sd_pipe), before)


def test_xformers_missing_is_a_clear_error(sd_pipe):
    pytest.importorskip("torch")
    try:
        import xformers  # noqa: F401

        pytest.skip("xformers is installed here")
    except ImportError:
        pass
    with pytest.raises(ValueError, match="pip install"):
        accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(attention="xformers")))
    assert not accel.is_accelerated(sd_pipe)


def test_regional_compile_marks_blocks_and_restore_unmarks(sd_pipe):
    accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(compile="regional")))
    compiled = [m for m in sd_pipe.unet.modules() if m._compiled_call_impl is not None]
    kinds = {type(m).__name__ for m in compiled}
    assert "ResnetBlock2D" in kinds and "Transformer2DModel" in kinds
    accel.restore(sd_pipe)
    assert all(m._compiled_call_impl is None for m in sd_pipe.unet.modules())


@pytest.mark.gpu
def test_cuda_graph_matches_eager_on_gpu(sd_pipe):
    pipe = sd_pipe.to("cuda")
    before = run(pipe)
    accel.accelerate(pipe, AccelConfig(runtime=RuntimeConfig(cuda_graph=True)))
    out = run(pipe)
    assert len(get_cuda_graph_hook(pipe.unet).graphs) >= 1
    np.testing.assert_allclose(out, before, atol=1e-4)
    accel.restore(pipe)
    assert np.array_equal(run(pipe), before)


def test_fused_qkv_round_trip_restores_state_dict(sd_pipe):
    before = run(sd_pipe)
    keys = set(sd_pipe.unet.state_dict())
    accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(fuse_qkv=True)))
    assert any(k.endswith("to_qkv.weight") for k in sd_pipe.unet.state_dict())
    np.testing.assert_allclose(run(sd_pipe), before, atol=1e-5)
    accel.restore(sd_pipe)
    assert set(sd_pipe.unet.state_dict()) == keys
    assert np.array_equal(run(sd_pipe), before)


def test_graph_hook_passes_var_keywords_through(sdxl_pipe, monkeypatch):
    """SDXL asks its text encoders for output_hidden_states through **kwargs: they must arrive as keywords."""
    from accel.runtime import cuda_graph

    seen = []
    # Pretend every input is replayable so the hook takes its graph path up to capture, which then fails.
    monkeypatch.setattr(cuda_graph, "signature_key", lambda leaves, spec, branch=None: ("k", spec))
    monkeypatch.setattr(cuda_graph.CUDAGraphHook, "_capture", lambda self, fwd, leaves, spec, dev: seen.append(spec) or None)
    before = run(sdxl_pipe)
    accel.accelerate(sdxl_pipe, AccelConfig(runtime=RuntimeConfig(cuda_graph=True, components=("unet", "text_encoder"))))
    out = run(sdxl_pipe)
    accel.restore(sdxl_pipe)
    assert np.array_equal(out, before)
    assert any("output_hidden_states" in str(spec) and "'kwargs'" not in str(spec) for spec in seen)


def test_lora_loaded_before_acceleration_survives_round_trip(sd_pipe):
    """A LoRA loaded before accelerate stays active under the runtime and after restore."""
    peft = pytest.importorskip("peft")
    before_lora = run(sd_pipe)
    torch.manual_seed(0)
    sd_pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                             target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with_lora = run(sd_pipe)
    assert not np.allclose(with_lora, before_lora, atol=1e-3)  # the adapter really changes the output
    accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(attention="math", channels_last=True, cuda_graph=True)))
    np.testing.assert_allclose(run(sd_pipe), with_lora, atol=1e-4)
    accel.restore(sd_pipe)
    assert np.array_equal(run(sd_pipe), with_lora)


@pytest.mark.gpu
def test_lora_and_sdxl_conditioning_under_cuda_graphs_on_gpu(sdxl_pipe):
    """SDXL's added conditioning and a LoRA loaded first, through graphs of UNet and text encoders."""
    peft = pytest.importorskip("peft")
    pipe = sdxl_pipe.to("cuda")
    torch.manual_seed(0)
    pipe.unet.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=["to_q", "to_v"]))
    before = run(pipe)
    accel.accelerate(pipe, AccelConfig(runtime=RuntimeConfig(cuda_graph=True, components=("unet", "text_encoder"))))
    out = run(pipe)
    assert any(g is not None for g in get_cuda_graph_hook(pipe.unet).graphs.values())
    np.testing.assert_allclose(out, before, atol=1e-4)
    accel.restore(pipe)
    assert np.array_equal(run(pipe), before)


@pytest.mark.gpu
def test_controlnet_under_cuda_graphs_matches_eager_on_gpu(tmp_path):
    """ControlNet is captured beside the UNet; its residuals feed the UNet's graph."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    from PIL import Image
    from tiny import tiny_sd_pipeline

    base = tiny_sd_pipeline(tmp_path)
    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(base.unet, conditioning_embedding_out_channels=(16, 32)).eval()
    components = {k: v for k, v in base.components.items() if k != "image_encoder"}
    pipe = StableDiffusionControlNetPipeline(**components, controlnet=controlnet).to("cuda")
    pipe.set_progress_bar_config(disable=True)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    before = run(pipe, image=image)
    accel.accelerate(pipe, AccelConfig(runtime=RuntimeConfig(cuda_graph=True)))
    out = run(pipe, image=image)
    again = run(pipe, image=image)
    assert any(g is not None for g in get_cuda_graph_hook(pipe.controlnet).graphs.values())
    assert any(g is not None for g in get_cuda_graph_hook(pipe.unet).graphs.values())
    np.testing.assert_allclose(out, before, atol=1e-4)
    np.testing.assert_allclose(again, before, atol=1e-4)
    accel.restore(pipe)
    assert np.array_equal(run(pipe, image=image), before)


def test_compile_components_compile_some_and_graph_all(sd_pipe, monkeypatch):
    """The text encoder and the VAE decoder get CUDA graphs (eager on the CPU) without a compile."""
    from accel.runtime.compile import HOOK_NAME

    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compile_(*a, **{**k, "backend": "eager"}))
    before = run(sd_pipe)
    runtime = RuntimeConfig(compile="full", cuda_graph=True, components=("denoiser", "vae", "text_encoder"),
                            compile_components=("denoiser",))
    accel.accelerate(sd_pipe, AccelConfig(runtime=runtime))
    try:
        modules = {"unet": sd_pipe.unet, "vae": sd_pipe.vae.decoder, "text_encoder": sd_pipe.text_encoder}
        compiled = {name for name, m in modules.items()
                    if HOOK_NAME in getattr(getattr(m, "_diffusers_hook", None), "hooks", {})}
        assert compiled == {"unet"}
        assert all(get_cuda_graph_hook(m) is not None for m in modules.values())
        np.testing.assert_allclose(run(sd_pipe), before, atol=1e-5)
    finally:
        accel.restore(sd_pipe)
        torch._dynamo.reset()
    assert np.array_equal(run(sd_pipe), before)


def test_compile_components_refusals():
    with pytest.raises(ValueError, match="'vae', which is not in components=\\('denoiser',\\)"):
        RuntimeConfig(compile="full", compile_components=("vae",))
    with pytest.raises(ValueError, match="applies to compile='regional' or 'full'"):
        RuntimeConfig(compile_components=("denoiser",))
    with pytest.raises(ValueError, match="non-empty tuple"):
        RuntimeConfig(compile="full", compile_components="denoiser")


def test_compile_options_reach_each_compile_and_refuse_what_inductor_lacks(sd_pipe, monkeypatch):
    """`compile_options` are torch.compile's inductor `options` for the full and the regional compile (and for the
    whole forward a compile cache saves); names inductor does not have, wrong types and no compile are refused."""
    seen = []
    compile_ = torch.compile

    def compile_eager(*a, **k):
        seen.append(k.get("options"))
        return compile_(*a, **{**k, "backend": "eager"})

    monkeypatch.setattr(torch, "compile", compile_eager)
    monkeypatch.setattr(torch.nn.Module, "compile", lambda self, **k: seen.append(k.get("options")))
    options = {"pattern_matcher": False, "triton.autotune_pointwise": False}
    before = run(sd_pipe)
    for mode in ("full", "regional"):
        seen.clear()
        runtime = RuntimeConfig(compile=mode, compile_options=options, compile_workers=0 if mode == "regional" else None)
        assert runtime.compile_options == tuple(sorted(options.items()))
        accel.accelerate(sd_pipe, AccelConfig(runtime=runtime))
        try:
            np.testing.assert_allclose(run(sd_pipe), before, atol=1e-5)
        finally:
            accel.restore(sd_pipe)
            torch._dynamo.reset()
        assert seen and all(o == options for o in seen), (mode, seen)
    from accel.runtime import aot

    captured = {}
    monkeypatch.setattr(torch, "compile", lambda fn, **k: captured.update(k) or (_ for _ in ()).throw(ValueError("x")))
    with pytest.raises(ValueError):
        aot._aot_compile(sd_pipe.vae.decoder, (), {}, {"options": options})
    assert captured["options"] == {**options, "guard_filter_fn": torch.compiler.keep_tensor_guards_unsafe}
    assert accel.get_preset("balanced").runtime.compile_options  # the UNet presets' lean compile

    with pytest.raises(ValueError, match="'no_such_setting', which is not an inductor setting"):
        RuntimeConfig(compile="full", compile_options={"no_such_setting": 1})
    with pytest.raises(ValueError, match="is a bool"):
        RuntimeConfig(compile="full", compile_options={"pattern_matcher": "off"})
    with pytest.raises(ValueError, match="applies to compile='regional' or 'full'"):
        RuntimeConfig(compile_options={"pattern_matcher": False})
    with pytest.raises(ValueError, match="a dict of inductor settings"):
        RuntimeConfig(compile="full", compile_options=3)
