"""Context parallelism through diffusers' own hooks: one process (pass-through, clear errors), then 2 gloo processes.

The 2-process cases fork workers (the parent has already imported torch and diffusers), each running the tiny
Flux pipeline, fp32, at 32x32 (64 image tokens, 16 text tokens) and a direct transformer call (16 + 8 tokens).
Every worker computes the single-process result itself first. On a CPU Ulysses attention runs (diffusers' "native"
backend); ring attention needs a backend returning the log-sum-exp, which no CPU backend of diffusers has, so its
clear refusal is what is tested.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import accel
from accel.parallel import ContextParallelConfig, PatchParallelConfig, apply_patch_parallel
from gloo import error_text as _error, spawn
from tiny import run, tiny_flux_pipeline, tiny_sd3_pipeline

FLUX = {"max_sequence_length": 16}
STEPS = 2
CACHE_STEPS = 4
# Ulysses attention computes the same sums as one process, in a different order only where the exchange reshapes.
TOLERANCE = 1e-5


# ---- one process -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(ulysses_degree=0), r"ulysses_degree=0 is not supported; valid: None \(the world size / ring_degree\) or an int >= 1"),
        (dict(ring_degree=None), r"ring_degree=None is not supported; valid: an int >= 1"),
        (dict(ring_degree=True), r"ring_degree=True is not supported"),
        (dict(attention_backend="fast"), r"attention_backend='fast' is not supported; valid choices: None, .*'native'"),
        (dict(cp_plan={}), r"cp_plan=\{\} is not supported; valid: None \(the model's _cp_plan\) or a non-empty dict"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ContextParallelConfig(**kwargs)


@pytest.fixture
def flux_pipe(tmp_path):
    return tiny_flux_pipeline(tmp_path)


def test_one_process_is_a_pass_through_and_restores_exactly(flux_pipe):
    baseline = run(flux_pipe, steps=STEPS, **FLUX)
    accel.accelerate(flux_pipe, accel.AccelConfig(parallel=ContextParallelConfig()))
    assert flux_pipe.transformer._parallel_config is None  # nothing to split over one process
    np.testing.assert_array_equal(run(flux_pipe, steps=STEPS, **FLUX), baseline)
    accel.restore(flux_pipe)
    np.testing.assert_array_equal(run(flux_pipe, steps=STEPS, **FLUX), baseline)


def test_degrees_without_a_process_group_are_a_clear_error(flux_pipe, monkeypatch):
    with pytest.raises(RuntimeError, match=r"over 2 processes .*ulysses_degree=2\) but torch.distributed is not initialized"):
        accel.accelerate(flux_pipe, accel.AccelConfig(parallel=ContextParallelConfig(ulysses_degree=2)))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2.*init_process_group"):
        accel.accelerate(flux_pipe, accel.AccelConfig(parallel=ContextParallelConfig()))
    assert not accel.is_accelerated(flux_pipe)


def test_diffusers_own_config_and_a_unet_are_refused_clearly(sd_pipe):
    from diffusers import ContextParallelConfig as DiffusersContextParallelConfig

    with pytest.raises(ValueError, match=r"got diffusers\..*ContextParallelConfig, not accel\.parallel\.context\.ContextParallelConfig"):
        accel.AccelConfig(parallel=DiffusersContextParallelConfig(ulysses_degree=2))
    with pytest.raises(accel.UnsupportedPipelineError, match=r"ContextParallelConfig needs a pipeline with a DiT"):
        accel.accelerate(sd_pipe, accel.AccelConfig(parallel=ContextParallelConfig()))


# ---- two processes -----------------------------------------------------------------------------


def _transformer_inputs(image_tokens: int = 16):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, image_tokens, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 8, 32, generator=g), pooled_projections=torch.randn(1, 32, generator=g),
                timestep=torch.tensor([0.5]), img_ids=torch.randn(image_tokens, 3, generator=g), txt_ids=torch.zeros(8, 3))


def _transformer_call(pipe, **inputs):
    with torch.no_grad():
        return pipe.transformer(**(inputs or _transformer_inputs()), return_dict=False)[0].numpy()


def _processor_fields(transformer) -> list:
    """Every attention processor's own attributes among those that context parallelism sets."""
    return sorted((name, key) for name, m in transformer.named_modules() if getattr(m, "processor", None) is not None
                  for key in vars(m.processor) if key in ("_parallel_config", "_attention_backend"))


def _worker_cases(rank: int, world: int, tmp: Path) -> dict:
    folder = tmp / f"rank{rank}"
    pipe = tiny_flux_pipeline(folder)
    out = {"baseline": run(pipe, steps=STEPS, **FLUX), "call_single": _transformer_call(pipe)}
    state = {k: v.clone() for k, v in pipe.transformer.state_dict().items()}
    fields = _processor_fields(pipe.transformer)

    def accelerated(config, fn):
        accel.accelerate(pipe, config)
        try:
            return fn()
        finally:
            accel.restore(pipe)

    ulysses = accel.AccelConfig(parallel=ContextParallelConfig())  # every process on Ulysses
    def ulysses_calls():
        tokens = []  # what the first block sees: this process's part of the image tokens
        handle = pipe.transformer.transformer_blocks[0].register_forward_pre_hook(
            lambda module, args, kwargs: tokens.append(kwargs["hidden_states"].shape[1]), with_kwargs=True)
        try:
            out["call_ulysses"] = _transformer_call(pipe)
        finally:
            handle.remove()
        out["block_tokens"] = np.array(tokens)
        out["image_ulysses"] = run(pipe, steps=STEPS, **FLUX)
        out["error_sequence"] = np.array(_error(lambda: _transformer_call(pipe, **_transformer_inputs(image_tokens=15))))
        out["error_patch_beside"] = np.array(_error(
            lambda: apply_patch_parallel(pipe, PatchParallelConfig(mode="cfg"))))
    accelerated(ulysses, ulysses_calls)
    out["image_restored"] = run(pipe, steps=STEPS, **FLUX)
    restored = pipe.transformer.state_dict()
    out["restored_exactly"] = np.array(
        list(restored) == list(state) and all(torch.equal(restored[k], v) for k, v in state.items())
        and pipe.transformer._parallel_config is None and "_parallel_config" not in vars(pipe.transformer)
        and _processor_fields(pipe.transformer) == fields
        and not any(getattr(m, "_diffusers_hook", None) and m._diffusers_hook.hooks for m in pipe.transformer.modules()))

    for name, config in {"ring": ContextParallelConfig(ring_degree=2),
                         "ring_native": ContextParallelConfig(ring_degree=2, attention_backend="native"),
                         "degrees": ContextParallelConfig(ring_degree=3),
                         "ulysses4": ContextParallelConfig(ulysses_degree=4)}.items():
        out[f"error_{name}"] = np.array(_error(lambda: accel.accelerate(pipe, accel.AccelConfig(parallel=config))))
    out["ring_left_nothing"] = np.array(not accel.is_accelerated(pipe) and pipe.transformer._parallel_config is None
                                        and _processor_fields(pipe.transformer) == fields)

    _block_cache_cases(pipe, out)
    _refused_models(pipe, folder, out)
    return out


def _block_cache_cases(pipe, out: dict) -> None:
    """A fixed-schedule block cache under Ulysses computes the same steps as one process's block cache."""
    fixed = accel.BlockCacheConfig(threshold=None, cache_interval=2)
    accel.accelerate(pipe, accel.AccelConfig(cache=fixed))
    try:
        out["cache_single"] = run(pipe, steps=CACHE_STEPS, **FLUX)
    finally:
        accel.restore(pipe)
    out["cache_uncached"] = run(pipe, steps=CACHE_STEPS, **FLUX)
    accel.accelerate(pipe, accel.AccelConfig(cache=fixed, parallel=ContextParallelConfig()))
    try:
        out["cache_ulysses"] = run(pipe, steps=CACHE_STEPS, **FLUX)
    finally:
        accel.restore(pipe)
    adaptive = accel.AccelConfig(cache=accel.BlockCacheConfig(threshold=0.1), parallel=ContextParallelConfig())
    out["error_adaptive_cache"] = np.array(_error(lambda: accel.accelerate(pipe, adaptive)))


def _refused_models(pipe, folder: Path, out: dict) -> None:
    """Heads Ulysses cannot share, and a DiT without a context-parallel plan."""
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    three_heads = FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=3,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]).eval()
    odd = type(pipe)(**{**pipe.components, "transformer": three_heads})
    out["error_heads"] = np.array(_error(lambda: accel.accelerate(odd, accel.AccelConfig(parallel=ContextParallelConfig()))))
    sd3 = tiny_sd3_pipeline(folder / "sd3", num_layers=1)
    out["error_no_plan"] = np.array(_error(lambda: accel.accelerate(sd3, accel.AccelConfig(parallel=ContextParallelConfig()))))


@pytest.fixture(scope="module")
def ranks(tmp_path_factory):
    return spawn(_worker_cases, 2, tmp_path_factory.mktemp("context_parallel"), timeout=120.0)


def test_ulysses_equals_one_process_on_every_rank(ranks):
    for out in ranks:
        assert list(out["block_tokens"]) == [8]  # each process ran its half of the 16 image tokens
        np.testing.assert_allclose(out["call_ulysses"], out["call_single"], atol=TOLERANCE, rtol=0)
        np.testing.assert_allclose(out["image_ulysses"], out["baseline"], atol=TOLERANCE, rtol=0)
    np.testing.assert_array_equal(ranks[1]["image_ulysses"], ranks[0]["image_ulysses"])


def test_restore_after_ulysses_is_bit_identical(ranks):
    for out in ranks:
        np.testing.assert_array_equal(out["image_restored"], out["baseline"])
        assert out["restored_exactly"]  # weights, the model's and processors' attributes, no hooks left


def test_ring_attention_is_refused_on_a_backend_without_log_sum_exp(ranks):
    out = ranks[0]
    for name in ("ring", "ring_native"):
        message = str(out[f"error_{name}"])
        assert "ValueError: ring attention (ring_degree=2) combines each process's partial attention by its " \
               "log-sum-exp, which the 'native' backend does not return" in message
        assert "On a CPU diffusers has none: use ulysses_degree instead" in message
    assert out["ring_left_nothing"]


def test_degrees_not_matching_the_world_size_are_clear(ranks):
    out = ranks[0]
    assert "ContextParallelConfig(ring_degree=3) must divide the world size 2" in str(out["error_degrees"])
    assert "ring_degree x ulysses_degree must equal the world size 2" in str(out["error_ulysses4"])
    assert "got 1 x 4 = 4" in str(out["error_ulysses4"])


def test_sequence_heads_and_models_without_a_plan_are_clear(ranks):
    out = ranks[0]
    assert "splits hidden_states (15 tokens along dim 1) over 2 processes, which does not divide it" in str(out["error_sequence"])
    assert "splits the 3 attention heads of FluxTransformer2DModel over ulysses_degree=2" in str(out["error_heads"])
    message = str(out["error_no_plan"])
    assert "UnsupportedPipelineError: context parallelism needs diffusers' context-parallel plan" in message
    assert "SD3Transformer2DModel (StableDiffusion3Pipeline) has none: give ContextParallelConfig(cp_plan=...)" in message
    assert "FluxTransformer2DModel" in message and "WanTransformer3DModel" in message
    assert "cannot run beside context parallelism" in str(out["error_patch_beside"])


def test_fixed_block_cache_composes_and_an_adaptive_one_is_refused(ranks):
    out = ranks[0]
    assert np.abs(out["cache_single"] - out["cache_uncached"]).max() > 1e-3  # the cache did skip blocks
    np.testing.assert_allclose(out["cache_ulysses"], out["cache_single"], atol=TOLERANCE, rtol=0)
    message = str(out["error_adaptive_cache"])
    assert "BlockCacheConfig(threshold=0.1) decides from the features it sees" in message
    assert "BlockCacheConfig(threshold=None, cache_interval=N)" in message
