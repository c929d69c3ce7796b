"""FP8 / INT8 quantized denoisers on CPU (`ACCEL_QUANTIZE_CPU=1`, the reference kernels): the layer maths against
its dequantized form, three passes on UNet, SD3 and Flux pipelines, the skip set, LoRA, composition with caching,
compile and CUDA graphs, and the refusals; behind the gpu marker, the real kernels under CUDA graphs. GPU speed and
quality are measured by `benchmarks/quantize.py`.

Tolerance: the tiny denoisers have random weights; a quantized run must stay within 0.05 (FP8) / 0.02 (INT8) of the
16-bit output (max abs, images in [0, 1]) while differing from it. Measured: 0.020 / 0.006 (SD), 0.019 / 0.005 (SD3),
0.004 / 0.001 (Flux). Quantizing the 1x1 convolutions as well (residual shortcuts, attention projections in and out)
roughly triples the SD error: 0.065 / 0.023.
"""

from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny import run, tiny_flux_pipeline, tiny_sd3_pipeline

import accel
from accel import AccelConfig, DeepCacheConfig, RuntimeConfig, UnsupportedDeviceError
from accel.runtime import get_cuda_graph_hook, quantize_report
from accel.runtime.quantize import (
    CPU_SWITCH,
    FORMATS,
    QuantizedLayers,
    QuantizedLinear,
    QuantizedPointwiseConv,
    _output_dtype,
    quantize_rows,
)

TOLERANCE = {"fp8": 0.05, "int8": 0.02}
CONV_TOLERANCE = 0.1  # with the 1x1 convolutions too (SD, FP8): measured 0.065
PIPELINES = {"sd": None, "sd3": (tiny_sd3_pipeline, {}), "flux": (tiny_flux_pipeline, {"max_sequence_length": 16})}
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture
def cpu_kernels(monkeypatch):
    monkeypatch.setenv(CPU_SWITCH, "1")


def _pipeline(which, sd_pipe, tmp_path):
    if which == "sd":
        return sd_pipe, {}
    build, kwargs = PIPELINES[which]
    return build(tmp_path), kwargs


def _snapshot(net):
    return (dict(net.named_modules()), dict(net.named_parameters()),
            {k: v.clone() for k, v in net.state_dict().items()})


def _assert_untouched(net, snapshot):
    """The same module and parameter objects as before, with the same state dict values."""
    modules, parameters, state = snapshot
    now = dict(net.named_modules())
    assert now.keys() == modules.keys() and all(now[k] is modules[k] for k in modules)
    assert all(p is parameters[k] for k, p in net.named_parameters())
    current = net.state_dict()
    assert current.keys() == state.keys() and all(torch.equal(current[k], state[k]) for k in state)


@pytest.mark.parametrize("quantize", list(FORMATS))
@pytest.mark.parametrize("rows", [10, 40])  # INT8 pads fewer than 17 rows
def test_quantized_linear_is_its_dequantized_matmul(quantize, rows):
    torch.manual_seed(0)
    layer, fmt = torch.nn.Linear(64, 48), FORMATS[quantize]
    before = layer.weight.clone()
    quantized = QuantizedLinear(layer, fmt, torch.float32)
    x = torch.randn(2, rows // 2, 64)
    x_q, x_scale = quantize_rows(x.reshape(-1, 64), fmt)
    w_q, w_scale = quantize_rows(layer.weight, fmt)
    reference = (x_q.float() * x_scale) @ (w_q.float() * w_scale).t() + layer.bias
    out = quantized(x)
    assert out.shape == (2, rows // 2, 48) and quantized.qweight.dtype == fmt.dtype
    torch.testing.assert_close(out.reshape(-1, 48), reference.detach(), rtol=1e-5, atol=1e-5)
    exact = layer(x).detach()
    error = ((out - exact).norm() / exact.norm()).item()
    assert 0 < error < {"fp8": 0.06, "int8": 0.015}[quantize]  # measured 0.035 / 0.007
    assert torch.equal(layer.weight, before) and quantized.qweight.data_ptr() != layer.weight.data_ptr()


def test_zero_rows_stay_zero():
    quantized = QuantizedLinear(torch.nn.Linear(32, 16, bias=False), FORMATS["fp8"], torch.float32)
    assert torch.equal(quantized(torch.zeros(3, 32)), torch.zeros(3, 16))


@pytest.mark.parametrize("channels_last", [False, True])
def test_pointwise_convolution_as_a_matmul_over_pixels(channels_last):
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(32, 48, 1)
    assert QuantizedPointwiseConv.accepts(conv) and not QuantizedPointwiseConv.accepts(torch.nn.Conv2d(32, 48, 3))
    quantized = QuantizedPointwiseConv(conv, FORMATS["int8"], torch.float32)
    x = torch.randn(2, 32, 5, 6)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    out, exact = quantized(x), conv(x).detach()
    assert out.shape == exact.shape
    assert 0 < ((out - exact).norm() / exact.norm()).item() < 0.015


@pytest.mark.parametrize("quantize", list(FORMATS))
@pytest.mark.parametrize("which", list(PIPELINES))
def test_three_passes(which, quantize, sd_pipe, tmp_path, cpu_kernels):
    pipe, kwargs = _pipeline(which, sd_pipe, tmp_path)
    net = accel.pipelines.denoiser(pipe)
    before, snapshot = run(pipe, **kwargs), _snapshot(net)
    accel.accelerate(pipe, AccelConfig(runtime=RuntimeConfig(quantize=quantize)))
    report = quantize_report(pipe)
    kinds = {type(m) for m in net.modules()}
    out = run(pipe, **kwargs)
    accel.restore(pipe)
    assert QuantizedLinear in kinds and len(report["quantized"]) > len(report["skipped"]) > 0
    assert not np.array_equal(out, before) and np.abs(out - before).max() < TOLERANCE[quantize]
    assert quantize_report(pipe) is None
    _assert_untouched(net, snapshot)
    assert np.array_equal(run(pipe, **kwargs), before)


@pytest.mark.parametrize("which", ["sd", "flux"])
def test_default_skip_set_and_override(which, sd_pipe, tmp_path, cpu_kernels):
    pipe, _ = _pipeline(which, sd_pipe, tmp_path)
    net = accel.pipelines.denoiser(pipe)
    sensitive = {"sd": ["time_embedding.linear_1", "down_blocks.0.resnets.0.time_emb_proj"],
                 "flux": ["time_text_embed.timestep_embedder.linear_1", "x_embedder", "context_embedder", "proj_out",
                          "norm_out.linear", "transformer_blocks.0.norm1.linear", "single_transformer_blocks.0.norm.linear"]}
    kept = {name: net.get_submodule(name) for name in sensitive[which]}
    accel.accelerate(pipe, AccelConfig(runtime=RuntimeConfig(quantize="int8")))
    assert set(sensitive[which]) <= set(quantize_report(pipe)["skipped"])
    assert all(net.get_submodule(name) is layer for name, layer in kept.items())
    quantized = quantize_report(pipe)["quantized"]
    assert all(type(net.get_submodule(name)) is QuantizedLinear for name in quantized)
    assert not any("proj_out" == name or "time_emb" in name or "norm1.linear" in name for name in quantized)
    accel.restore(pipe)

    accel.accelerate(pipe, AccelConfig(runtime=RuntimeConfig(quantize="int8", quantize_skip=("*.to_q",))))
    report = quantize_report(pipe)
    assert set(sensitive[which]) <= set(report["quantized"])  # the override replaces the default set
    assert report["skipped"] and all(name.endswith(".to_q") for name in report["skipped"])
    assert all(type(net.get_submodule(name)) is torch.nn.Linear for name in report["skipped"])
    accel.restore(pipe)


def test_unaligned_layers_and_pointwise_convolutions(sd_pipe, cpu_kernels):
    net = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.Linear(32, 32), torch.nn.Conv2d(32, 16, 1))
    layers = QuantizedLayers(net, "fp8", skip=())
    assert layers.report["unaligned"] == ["0"] and layers.report["quantized"] == ["1"]
    assert type(net[0]) is torch.nn.Linear and type(net[2]) is torch.nn.Conv2d
    layers.remove()
    QuantizedLayers(net, "fp8", skip=(), convs=True)
    assert type(net[2]) is QuantizedPointwiseConv

    before = run(sd_pipe)
    accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(quantize="fp8", quantize_convs=True, channels_last=True)))
    convs = [n for n in quantize_report(sd_pipe)["quantized"] if type(sd_pipe.unet.get_submodule(n)) is QuantizedPointwiseConv]
    out = run(sd_pipe)
    accel.restore(sd_pipe)
    assert any(n.endswith("proj_in") for n in convs) and any(n.endswith("conv_shortcut") for n in convs)
    assert np.abs(out - before).max() < CONV_TOLERANCE
    assert np.array_equal(run(sd_pipe), before)


def test_narrow_layers_stay_in_16_bit(cpu_kernels):
    """`quantize_min_out_features`: layers with fewer outputs are left out and named; none left is an error, with
    nothing changed."""
    net = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Linear(64, 32), torch.nn.Linear(32, 16))
    layers = QuantizedLayers(net, "fp8", skip=(), min_out_features=64)
    assert layers.report["quantized"] == ["0"] and layers.report["narrow"] == ["1", "2"]
    assert type(net[0]) is QuantizedLinear and type(net[1]) is torch.nn.Linear
    layers.remove()
    with pytest.raises(ValueError, match=r"no layer to quantize in Sequential \(1 left out by the skip patterns; 2 "
                                         r"narrower than quantize_min_out_features=100\)"):
        QuantizedLayers(net, "fp8", skip=("0",), min_out_features=100)
    assert all(type(m) is torch.nn.Linear for m in net)
    with pytest.raises(ValueError, match="quantize_min_out_features must be None or an integer >= 0"):
        RuntimeConfig(quantize="fp8", quantize_min_out_features=-1)
    with pytest.raises(ValueError, match="apply to quantize='fp8' or 'int8'; quantize is None"):
        RuntimeConfig(quantize_min_out_features=3072)


def test_composes_with_deepcache(sd_pipe, cpu_kernels):
    before = run(sd_pipe, steps=4)
    accel.accelerate(sd_pipe, AccelConfig(cache=DeepCacheConfig(cache_interval=2)))
    cached = run(sd_pipe, steps=4)
    accel.restore(sd_pipe)
    accel.accelerate(sd_pipe, AccelConfig(cache=DeepCacheConfig(cache_interval=2), runtime=RuntimeConfig(quantize="fp8")))
    both = run(sd_pipe, steps=4)
    accel.restore(sd_pipe)
    assert not np.array_equal(both, cached) and np.abs(both - cached).max() < TOLERANCE["fp8"]
    assert np.array_equal(run(sd_pipe, steps=4), before)


@pytest.mark.parametrize("which", ["sd", "flux"])
def test_composes_with_compile_and_cuda_graphs(which, sd_pipe, tmp_path, cpu_kernels):
    """On the CPU graphs fall back to eager and compilation is held at eager: the quantized modules run inside
    both hooks and give exactly the quantized eager output."""
    pipe, kwargs = _pipeline(which, sd_pipe, tmp_path)
    before = run(pipe, **kwargs)
    accel.accelerate(pipe, AccelConfig(runtime=RuntimeConfig(quantize="fp8")))
    quantized = run(pipe, **kwargs)
    accel.restore(pipe)
    for compile_mode in ("full", "regional"):
        config = RuntimeConfig(quantize="fp8", fuse_qkv=True, attention="sdpa", compile=compile_mode,
                               **({"compile_workers": 0} if compile_mode == "regional" else {}), cuda_graph=True)
        accel.accelerate(pipe, AccelConfig(runtime=config))
        assert any(name.endswith("to_qkv") for name in quantize_report(pipe)["quantized"])  # fused first, then quantized
        with torch.compiler.set_stance("force_eager"):
            out = run(pipe, **kwargs)
        accel.restore(pipe)
        np.testing.assert_allclose(out, quantized, atol=1e-5)  # fused q/k/v: the same row scales, one matmul
    assert np.array_equal(run(pipe, **kwargs), before)


@pytest.mark.gpu
@pytest.mark.parametrize("quantize", list(FORMATS))
@pytest.mark.parametrize("which, dtype", [("sd", torch.float16), ("flux", torch.bfloat16)])
def test_quantized_denoiser_under_cuda_graphs_on_gpu(which, dtype, quantize, sd_pipe, tmp_path):
    """The real kernels at 16 bit: close to the 16-bit output, captured in graphs whose replays give the eager
    quantized output, and restored bit-identical."""
    pipe, kwargs = _pipeline(which, sd_pipe, tmp_path)
    pipe = pipe.to("cuda", dtype)
    before = run(pipe, **kwargs)
    accel.accelerate(pipe, AccelConfig(runtime=RuntimeConfig(quantize=quantize)))
    eager = run(pipe, **kwargs)
    accel.restore(pipe)
    accel.accelerate(pipe, AccelConfig(runtime=RuntimeConfig(quantize=quantize, cuda_graph=True)))
    graphed, again = run(pipe, **kwargs), run(pipe, **kwargs)
    graphs = get_cuda_graph_hook(accel.pipelines.denoiser(pipe)).graphs
    accel.restore(pipe)
    assert any(graph is not None for graph in graphs.values())
    assert not np.array_equal(eager, before) and np.abs(eager - before).max() < TOLERANCE[quantize]
    np.testing.assert_allclose(graphed, eager, atol=1e-3)
    assert np.array_equal(again, graphed)
    assert np.array_equal(run(pipe, **kwargs), before)


def test_torch_compile_traces_the_quantized_layers():
    """One real compile per format (inductor on the CPU, about 20 s): whole graph, same output as eager."""
    torch.manual_seed(0)
    layer, x = torch.nn.Linear(64, 48), torch.randn(2, 5, 64)
    for fmt in FORMATS.values():
        quantized = QuantizedLinear(layer, fmt, torch.float32)
        torch.testing.assert_close(torch.compile(quantized, fullgraph=True)(x), quantized(x))


def _add_lora(net, **options):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    net.add_adapter(peft.LoraConfig(r=4, lora_alpha=4, init_lora_weights=False, target_modules=LORA_TARGETS, **options))


def test_lora_loaded_before_keeps_its_adapters_in_16_bit(sd_pipe, cpu_kernels):
    accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(quantize="fp8")))
    quantized_plain = run(sd_pipe)
    accel.restore(sd_pipe)
    _add_lora(sd_pipe.unet)
    with_lora = run(sd_pipe)
    accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(quantize="fp8")))
    attention = sd_pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1
    assert type(attention.to_q.base_layer) is QuantizedLinear
    assert type(attention.to_q.lora_A["default"]) is torch.nn.Linear
    assert "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q" in quantize_report(sd_pipe)["quantized"]
    out = run(sd_pipe)
    accel.restore(sd_pipe)
    assert np.abs(out - with_lora).max() < TOLERANCE["fp8"] < np.abs(out - quantized_plain).max()  # the LoRA acts
    assert np.array_equal(run(sd_pipe), with_lora)


def test_lora_fused_before_quantizing(sd_pipe, cpu_kernels):
    _add_lora(sd_pipe.unet)
    sd_pipe.unet.fuse_lora()
    fused = run(sd_pipe)
    accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(quantize="int8")))
    out = run(sd_pipe)
    accel.restore(sd_pipe)
    assert not np.array_equal(out, fused) and np.abs(out - fused).max() < TOLERANCE["int8"]
    assert np.array_equal(run(sd_pipe), fused)


def test_dora_layers_stay_in_16_bit(sd_pipe, cpu_kernels):
    _add_lora(sd_pipe.unet, use_dora=True)
    with_dora = run(sd_pipe)
    accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(quantize="fp8")))
    variants = quantize_report(sd_pipe)["adapter_variant"]
    assert variants and all(type(sd_pipe.unet.get_submodule(n).base_layer) is torch.nn.Linear for n in variants)
    assert np.abs(run(sd_pipe) - with_dora).max() < TOLERANCE["fp8"]
    accel.restore(sd_pipe)
    assert np.array_equal(run(sd_pipe), with_dora)


def test_lora_loaded_after_quantizing_is_refused(sd_pipe, cpu_kernels):
    before = run(sd_pipe)
    accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(quantize="fp8")))
    with pytest.raises(ValueError, match=r"QuantizedLinear\(.*accel.restore\(pipe\) before loading or fusing a LoRA"):
        _add_lora(sd_pipe.unet)
    accel.restore(sd_pipe)
    assert np.array_equal(run(sd_pipe), before)


def test_lora_unloaded_while_quantized_restores_the_base_layers(sd_pipe, cpu_kernels):
    """peft puts the wrapped (quantized) layer where the LoRA layer was; restore finds it there."""
    before = run(sd_pipe)
    _add_lora(sd_pipe.unet)
    accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(quantize="fp8")))
    sd_pipe.unet.unload_lora()
    assert type(sd_pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn1.to_q) is QuantizedLinear
    accel.restore(sd_pipe)
    assert not any(isinstance(m, QuantizedLinear) for m in sd_pipe.unet.modules())
    assert np.array_equal(run(sd_pipe), before)


@pytest.mark.parametrize("quantize, needs", [("fp8", r"FP8 matmuls \(torch._scaled_mm\).*compute capability 8.9"),
                                             ("int8", r"INT8 matmuls \(torch._int_mm\).*compute capability 7.5")])
def test_cpu_without_the_switch_is_refused_before_any_change(quantize, needs, sd_pipe, monkeypatch):
    monkeypatch.delenv(CPU_SWITCH, raising=False)
    snapshot = _snapshot(sd_pipe.unet)
    with pytest.raises(UnsupportedDeviceError, match=f"{needs}.*the denoiser is on cpu.*{CPU_SWITCH}=1"):
        accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(quantize=quantize, attention="sdpa", fuse_qkv=True)))
    assert not accel.is_accelerated(sd_pipe)
    _assert_untouched(sd_pipe.unet, snapshot)


def test_gpu_without_fp8_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100")
    with pytest.raises(UnsupportedDeviceError, match="NVIDIA A100 has compute capability 8.0; use quantize='int8'"):
        _output_dtype(FORMATS["fp8"], torch.device("cuda", 0), torch.float16)


def test_invalid_settings_are_clear_errors():
    with pytest.raises(ValueError, match="RuntimeConfig.quantize='fp4' is not supported; valid choices: None, 'fp8', 'int8'"):
        RuntimeConfig(quantize="fp4")
    with pytest.raises(ValueError, match="apply to quantize='fp8' or 'int8'; quantize is None"):
        RuntimeConfig(quantize_skip=("proj_out",))
    with pytest.raises(ValueError, match="quantize_skip must be None .* or a tuple of module-name patterns"):
        RuntimeConfig(quantize="fp8", quantize_skip="proj_out")
    with pytest.raises(ValueError, match="quantize_convs must be True or False"):
        RuntimeConfig(quantize="fp8", quantize_convs="yes")
    assert RuntimeConfig(quantize="int8", quantize_skip=["a.*"]).quantize_skip == ("a.*",)


def test_quantized_presets(sd_pipe, tmp_path, monkeypatch):
    """NAME-fp8 / NAME-int8: the preset with its denoiser quantized, for either family; the plain names unchanged."""
    fast = accel.get_preset("fast")
    assert accel.get_preset("fast-fp8") == fast.replace(runtime=replace(fast.runtime, quantize="fp8"))
    assert fast.runtime.quantize is None and "fast-fp8" not in accel.preset_names()
    flux = accel.get_preset("fast-int8", tiny_flux_pipeline(tmp_path))
    assert flux.sampler is None and flux.cache is not None and flux.runtime.quantize == "int8"
    with pytest.raises(ValueError, match="unknown preset 'fast-fp4'; valid presets: .*each also as NAME-fp8 or NAME-int8"):
        accel.get_preset("fast-fp4")
    with pytest.raises(UnsupportedDeviceError, match="compute capability 8.9"):
        accel.accelerate(sd_pipe, preset="fast-fp8")
    assert not accel.is_accelerated(sd_pipe)

    before = run(sd_pipe)
    accel.accelerate(sd_pipe, preset="quality")
    quality = run(sd_pipe)
    accel.restore(sd_pipe)
    monkeypatch.setenv(CPU_SWITCH, "1")
    accel.accelerate(sd_pipe, preset="quality-fp8")  # the others compile: covered on the GPU by benchmarks/quantize.py
    out = run(sd_pipe)
    accel.restore(sd_pipe)
    assert not np.array_equal(out, quality) and np.abs(out - quality).max() < TOLERANCE["fp8"]
    assert np.array_equal(run(sd_pipe), before)
