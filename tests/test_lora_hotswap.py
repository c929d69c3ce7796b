"""LoRA hotswap under the compiled runtime (`RuntimeConfig(lora_hotswap=True)`, `accel.swap_lora`,
`accel.set_lora_scale`): no recompilation, the output of a fresh pipeline with the new LoRA, exact restore, and the
refusals. CPU: dynamo traces for real, into a counting backend that runs the graphs eagerly."""

import numpy as np
import pytest
import torch
from tiny import random_lora, run, tiny_sd_pipeline, tiny_sdxl_pipeline

import accel
from accel import AccelConfig, LCMLoRAConfig, RuntimeConfig

pytest.importorskip("peft")
ATTENTION = ["to_q", "to_k", "to_v", "to_out.0"]


@pytest.fixture
def compile_counter(monkeypatch):
    """Every torch.compile (and nn.Module.compile, which calls it) compiles into a backend that counts the graphs."""
    from torch._dynamo.testing import CompileCounter

    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda *args, **kwargs: compile_(*args, **{**kwargs, "backend": counter}))
    torch._dynamo.reset()
    yield counter
    torch._dynamo.reset()


def _save(pipe, state_dict, folder, rank, alpha):
    """A LoRA file whose metadata gives its alpha (scale alpha / rank)."""
    layers = {key.removeprefix("unet."): value for key, value in state_dict.items()}
    type(pipe).save_lora_weights(folder, unet_lora_layers=layers, unet_lora_adapter_metadata={
        "r": rank, "lora_alpha": alpha, "target_modules": sorted({k.split(".lora_")[0] for k in layers})})
    return str(folder)


def _fresh(tmp_path, lora, weight=1.0):
    pipe = tiny_sd_pipeline(tmp_path / "fresh")
    pipe.load_lora_weights(lora, adapter_name="style")
    if weight != 1.0:
        pipe.set_adapters(["style"], [weight])
    return run(pipe)


@pytest.mark.parametrize("mode", ["full", "regional"])
def test_swap_and_scale_change_compile_nothing_and_match_a_fresh_pipeline(sd_pipe, tmp_path, compile_counter, mode):
    lora_a = random_lora(sd_pipe.unet, rank=4, seed=1)
    lora_b = _save(sd_pipe, random_lora(sd_pipe.unet, rank=8, seed=2), tmp_path / "b", rank=8, alpha=4)
    sd_pipe.load_lora_weights(lora_a, adapter_name="style")
    with_a = run(sd_pipe)
    tensors = {k: v.clone() for k, v in sd_pipe.unet.state_dict().items()}
    workers = {"compile_workers": 0} if mode == "regional" else {}
    runtime = RuntimeConfig(compile=mode, lora_hotswap=True, lora_max_rank=8, **workers)
    accel.accelerate(sd_pipe, AccelConfig(runtime=runtime))
    np.testing.assert_allclose(run(sd_pipe), with_a, atol=1e-5)  # padded to rank 8, same output
    compiled = compile_counter.frame_count
    assert compiled >= 1

    accel.swap_lora(sd_pipe, lora_b)
    np.testing.assert_allclose(run(sd_pipe), _fresh(tmp_path, lora_b), atol=1e-5)
    accel.set_lora_scale(sd_pipe, 0.5)
    with_b_half = run(sd_pipe)
    np.testing.assert_allclose(with_b_half, _fresh(tmp_path, lora_b, weight=0.5), atol=1e-5)
    assert np.abs(with_b_half - with_a).max() > 1e-3  # the swap and the weight really changed the output
    assert compile_counter.frame_count == compiled  # and nothing compiled again

    accel.restore(sd_pipe)
    assert {k: v for k, v in sd_pipe.unet.state_dict().items()}.keys() == tensors.keys()
    assert all(torch.equal(v, tensors[k]) for k, v in sd_pipe.unet.state_dict().items())
    assert all(isinstance(layer.scaling["style"], float) for layer in _lora_layers(sd_pipe))
    assert np.array_equal(run(sd_pipe), with_a)


def test_sdxl_swap_compiles_nothing_and_matches_a_fresh_pipeline(tmp_path, compile_counter):
    """SDXL: the same under the full compile of the UNet (its added conditions: pooled text, time ids)."""
    pipe = tiny_sdxl_pipeline(tmp_path / "xl")
    lora_a, lora_b = random_lora(pipe.unet, rank=4, seed=1), random_lora(pipe.unet, rank=8, seed=2)
    pipe.load_lora_weights(lora_a, adapter_name="style")
    with_a = run(pipe)
    accel.accelerate(pipe, AccelConfig(runtime=RuntimeConfig(compile="full", lora_hotswap=True, lora_max_rank=8)))
    np.testing.assert_allclose(run(pipe), with_a, atol=1e-5)
    compiled = compile_counter.frame_count
    accel.swap_lora(pipe, lora_b)
    fresh = tiny_sdxl_pipeline(tmp_path / "fresh")
    fresh.load_lora_weights(lora_b, adapter_name="style")
    with_b = run(pipe)
    np.testing.assert_allclose(with_b, run(fresh), atol=1e-5)
    assert np.abs(with_b - with_a).max() > 1e-3 and compile_counter.frame_count == compiled
    accel.restore(pipe)
    assert np.array_equal(run(pipe), with_a)


def _lora_layers(pipe):
    from peft.tuners.lora import LoraLayer

    return [m for m in pipe.unet.modules() if isinstance(m, LoraLayer)]


def test_hotswap_refusals(sd_pipe, tmp_path):
    hotswap = AccelConfig(runtime=RuntimeConfig(lora_hotswap=True, lora_max_rank=4))
    with pytest.raises(ValueError, match="lora_max_rank applies to lora_hotswap=True"):
        RuntimeConfig(lora_max_rank=4)
    with pytest.raises(ValueError, match="positive integer"):
        RuntimeConfig(lora_hotswap=True, lora_max_rank=0)
    with pytest.raises(ValueError, match="has none: call pipe.load_lora_weights"):
        accel.accelerate(sd_pipe, hotswap)  # no LoRA to swap into
    assert not accel.is_accelerated(sd_pipe)

    lora_a = random_lora(sd_pipe.unet, rank=4, seed=1, targets=ATTENTION[:2])
    rank_8 = random_lora(sd_pipe.unet, rank=8, seed=2, targets=ATTENTION[:2])
    more_layers = random_lora(sd_pipe.unet, rank=2, seed=2, targets=ATTENTION[:3])
    sd_pipe.load_lora_weights(lora_a, adapter_name="style")
    with pytest.raises(accel.NotAcceleratedError, match="hotswap=True"):
        accel.swap_lora(sd_pipe, lora_a)
    accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(attention="sdpa")))
    with pytest.raises(RuntimeError, match="accelerated without RuntimeConfig\\(lora_hotswap=True\\)"):
        accel.set_lora_scale(sd_pipe, 0.5)  # compiled code and graphs made without it keep the LoRA as it was
    accel.restore(sd_pipe)

    with_a = run(sd_pipe)
    accel.accelerate(sd_pipe, hotswap)
    with pytest.raises(ValueError, match="rank 8, above RuntimeConfig.lora_max_rank=4"):
        accel.swap_lora(sd_pipe, rank_8)
    with pytest.raises(ValueError, match="adapts 12 layer\\(s\\) that LoRA 'style' did not"):
        accel.swap_lora(sd_pipe, more_layers)
    with pytest.raises(ValueError, match="also adapts text_encoder; hotswap swaps the unet's LoRA only"):
        accel.swap_lora(sd_pipe, {**lora_a, "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight":
                                  torch.zeros(4, 32)})
    with pytest.raises(ValueError, match="no weights for the unet"):
        accel.swap_lora(sd_pipe, {})
    with pytest.raises(ValueError, match="no swappable LoRA named 'other'"):
        accel.set_lora_scale(sd_pipe, 0.5, adapter_name="other")
    assert np.array_equal(run(sd_pipe), with_a)  # every refusal came before anything changed
    accel.restore(sd_pipe)

    sd_pipe.unet.compile()  # compiled before accelerate: too late to pad and to turn scales into tensors
    with pytest.raises(ValueError, match="before anything is compiled"):
        accel.accelerate(sd_pipe, hotswap)
    sd_pipe.unet._compiled_call_impl = None

    sd_pipe.unload_lora_weights()  # an LCM-LoRA fused into the weights is no LoRA one can swap
    lcm = _save(sd_pipe, random_lora(sd_pipe.unet, rank=4, seed=3), tmp_path / "lcm", rank=4, alpha=4)
    with pytest.raises(ValueError, match="fused into its weights.*LCMLoRAConfig\\(fuse=False\\)"):
        accel.accelerate(sd_pipe, AccelConfig(model=LCMLoRAConfig(lcm), runtime=hotswap.runtime))
    assert not accel.is_accelerated(sd_pipe) and not _lora_layers(sd_pipe)
