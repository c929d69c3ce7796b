"""Patch and CFG parallelism: one process (pass-through, restore), then 2 and 3 gloo processes.

The multi-process cases fork workers (the parent has already imported torch and diffusers), each
running the tiny SD pipeline, fp32, 4 DDIM steps at 32x32 (a 16x16 latent in units of 2 rows):
3 processes split it 6/6/4 rows. Every worker computes the single-process result itself first.
"""

from pathlib import Path

import numpy as np
import pytest
import torch

import accel
from accel.parallel import PatchParallelConfig, get_patch_parallel, split_rows
from gloo import error_text as _error, spawn
from tiny import run, tiny_sd3_pipeline, tiny_sd_pipeline

STEPS = 4
# Asynchronous steps see the other patches one step stale; on the tiny random UNet after 1
# warm-up step of 4 the images (values in [0, 1]) stay within this of the synchronous ones
# (measured: 0.027-0.029 max abs, 42-45 dB, with 2 and 3 processes).
ASYNC_MAX_ABS = 0.06
ASYNC_MIN_PSNR = 35.0


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1.0 / mse)


# ---- one process -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="tiles"), r"mode='tiles' is not supported; valid choices: 'patch', 'cfg', 'patch\+cfg'"),
        (dict(warmup_steps=-1), r"warmup_steps=-1 is not supported; valid: an int >= 0"),
        (dict(sync="yes"), r"sync='yes' is not supported"),
        (dict(partial_conditioning=0.0), r"partial_conditioning=0.0 is not supported; valid: None or a fraction"),
        (dict(partial_conditioning=0.5, mode="cfg"), r"needs a patch mode"),
        (dict(group="world"), r"group='world' is not supported"),
    ],
)
def test_config_rejects_bad_values(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PatchParallelConfig(**kwargs)


def test_rows_split_in_units_evenly_with_a_short_last_band():
    assert split_rows(16, 2, 3) == [(0, 6), (6, 12), (12, 16)]
    assert split_rows(15, 2, 3) == [(0, 6), (6, 12), (12, 15)]
    assert split_rows(256, 4, 2) == [(0, 128), (128, 256)]
    with pytest.raises(ValueError, match=r"latent 4 rows high \(32 px\) over 3 patches.*units of 2 latent rows.*"
                                         r"smallest accepted height at world size 3 is 5 latent rows"):
        split_rows(4, 2, 3, pixels_per_row=8)


@pytest.mark.parametrize("mode", ["patch", "cfg", "patch+cfg"])
def test_one_process_is_a_pass_through_and_restores_exactly(sd_pipe, mode):
    baseline = run(sd_pipe, steps=2)
    state = {k: v.clone() for k, v in sd_pipe.unet.state_dict().items()}
    accel.accelerate(sd_pipe, accel.AccelConfig(parallel=PatchParallelConfig(mode=mode)))
    wrapped = [k for k in sd_pipe.unet.state_dict() if ".module." in k]
    assert bool(wrapped) == ("patch" in mode)  # the layers really were wrapped
    np.testing.assert_array_equal(run(sd_pipe, steps=2), baseline)
    accel.restore(sd_pipe)
    np.testing.assert_array_equal(run(sd_pipe, steps=2), baseline)
    restored = sd_pipe.unet.state_dict()
    assert list(restored) == list(state)
    assert all(torch.equal(restored[k], v) for k, v in state.items())


def test_launcher_without_process_group_is_a_clear_error(sd_pipe, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(RuntimeError, match=r"WORLD_SIZE=2.*torch.distributed is not initialized.*init_process_group"):
        accel.accelerate(sd_pipe, accel.AccelConfig(parallel=PatchParallelConfig()))
    assert not accel.is_accelerated(sd_pipe)


# ---- several processes -------------------------------------------------------------------------


def _unet_inputs(height: int, width: int):
    g = torch.Generator().manual_seed(1)
    return torch.randn(2, 4, height, width, generator=g), torch.randn(2, 77, 32, generator=g)


def _unet_call(pipe, sample, context):
    with torch.no_grad():
        return pipe.unet(sample, 10, context).sample.numpy()


def _control_residuals(pipe, sample, context):
    """ControlNet residuals (a ControlNet made from the UNet, fixed seed) for a UNet call on `sample`."""
    from diffusers import ControlNetModel

    torch.manual_seed(0)
    controlnet = ControlNetModel.from_unet(pipe.unet)
    for param in controlnet.parameters():  # from_unet zero-initialises the output convs: make them count
        torch.nn.init.normal_(param, std=0.05) if param.dim() > 1 else None
    image = torch.rand(sample.shape[0], 3, sample.shape[2] * 8, sample.shape[3] * 8)
    with torch.no_grad():
        down, mid = controlnet(sample, 10, context, controlnet_cond=image, return_dict=False)
    return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid}


def _control_call(pipe, sample, context, residuals):
    with torch.no_grad():
        return pipe.unet(sample, 10, context, **residuals).sample.numpy()


def _worker_cases(rank: int, world: int, tmp: Path) -> dict:
    pipe = tiny_sd_pipeline(tmp / f"pipe{rank}")
    inputs = {"even": _unet_inputs(16, 16), "remainder": _unet_inputs(15, 12)}
    out = {"baseline": run(pipe, steps=STEPS)}
    for name, (sample, context) in inputs.items():
        out[f"unet_{name}_single"] = _unet_call(pipe, sample, context)
    control = _control_residuals(pipe, *inputs["remainder"])
    out["unet_control_single"] = _control_call(pipe, *inputs["remainder"], control)
    state = {k: v.clone() for k, v in pipe.unet.state_dict().items()}

    def with_config(config, fn):
        accel.accelerate(pipe, accel.AccelConfig(parallel=config))
        try:
            return fn()
        finally:
            accel.restore(pipe)

    def patched(tag, config):
        def calls():
            for name, (sample, context) in inputs.items():
                out[f"unet_{name}_{tag}"] = _unet_call(pipe, sample, context)
            out[f"unet_control_{tag}"] = _control_call(pipe, *inputs["remainder"], control)
            out[f"image_{tag}"] = run(pipe, steps=STEPS)
            stats = get_patch_parallel(pipe).comm.read_stats()
            for key in ("sync_calls", "async_calls", "bytes_sent"):
                out[f"{key}_{tag}"] = np.array(stats[key])
        with_config(config, calls)

    patched("sync", PatchParallelConfig(sync=True))
    out["image_restored"] = run(pipe, steps=STEPS)
    restored = pipe.unet.state_dict()
    out["state_identical"] = np.array(list(restored) == list(state) and all(torch.equal(restored[k], v) for k, v in state.items()))
    patched("async", PatchParallelConfig(warmup_steps=1))
    _graph_cases(pipe, out)
    _lora_cases(tmp / f"lora{rank}", inputs["remainder"], out)
    patched("pcpp", PatchParallelConfig(sync=True, partial_conditioning=0.5))
    if world == 2:
        out["image_cfg"] = with_config(PatchParallelConfig(mode="cfg"), lambda: run(pipe, steps=STEPS))
    for mode in ("cfg", "patch+cfg"):
        out[f"error_{mode}"] = np.array(_error(lambda: with_config(PatchParallelConfig(mode=mode), lambda: None)))
    tiny_height = 2 if world == 2 else 4
    sample, context = _unet_inputs(tiny_height, 16)
    out["error_small"] = np.array(_error(lambda: with_config(PatchParallelConfig(), lambda: _unet_call(pipe, sample, context))))
    if world == 2:
        _dit_cases(tmp / f"sd3{rank}", out)
    return out


def _dit_cases(folder: Path, out: dict) -> None:
    """CFG parallelism on an SD3 transformer (its CFG batch split over the 2 ranks); the patch modes refused."""
    sd3 = tiny_sd3_pipeline(folder)
    out["sd3_single"] = run(sd3, steps=STEPS)
    accel.accelerate(sd3, accel.AccelConfig(parallel=PatchParallelConfig(mode="cfg")))
    try:
        out["sd3_cfg"] = run(sd3, steps=STEPS)
        out["sd3_cfg_bytes"] = np.array(get_patch_parallel(sd3).output_bytes)
    finally:
        accel.restore(sd3)
    out["sd3_restored"] = run(sd3, steps=STEPS)
    out["error_sd3_patch"] = np.array(_error(lambda: accel.accelerate(sd3, accel.AccelConfig(parallel=PatchParallelConfig()))))


def _lora_cases(folder: Path, inputs, out: dict) -> None:
    """A peft LoRA on the UNet's attention projections and 3x3 convs (unfused: its lora_A convs get
    halos too): synchronous patch parallelism equals one process."""
    from peft import LoraConfig

    pipe = tiny_sd_pipeline(folder)
    before = _unet_call(pipe, *inputs)
    torch.manual_seed(0)
    pipe.unet.add_adapter(LoraConfig(r=4, lora_alpha=4, init_lora_weights=False,
                                     target_modules=["to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2"]))
    out["unet_lora_single"] = _unet_call(pipe, *inputs)
    out["lora_changes_output"] = np.array(np.abs(out["unet_lora_single"] - before).max() > 1e-3)
    accel.accelerate(pipe, accel.AccelConfig(parallel=PatchParallelConfig(sync=True)))
    try:
        out["unet_lora_sync"] = _unet_call(pipe, *inputs)
    finally:
        accel.restore(pipe)


def _graph_cases(pipe, out: dict) -> None:
    """Patch parallelism under the CUDA-graph hook (on the CPU the hook runs every call eagerly): the
    tag each call puts into the graph key, two pipeline calls in a row."""
    from accel.parallel.patch import NAME
    from accel.runtime.cuda_graph import get_cuda_graph_hook

    config = accel.AccelConfig(parallel=PatchParallelConfig(warmup_steps=2), runtime=accel.RuntimeConfig(cuda_graph=True))
    accel.accelerate(pipe, config)
    tags = []
    planner = get_cuda_graph_hook(pipe.unet).planner
    handle = pipe.unet.register_forward_hook(  # what the graph key gets from each call's plan
        lambda module, args, output: tags.append(repr("eager" if planner.current.eager else planner.current.decisions[NAME])))
    try:
        out["image_graph_first"] = run(pipe, steps=STEPS)
        out["image_graph_second"] = run(pipe, steps=STEPS)
        stats = get_patch_parallel(pipe).comm.read_stats()
        out["graph_calls"] = np.array([stats["sync_calls"], stats["async_calls"]])
    finally:
        handle.remove()
        accel.restore(pipe)
    out["graph_tags"] = np.array(tags)
    out["graph_hook_after_restore"] = np.array(get_cuda_graph_hook(pipe.unet) is None and not pipe.unet._forward_pre_hooks)
    compiled = accel.AccelConfig(parallel=PatchParallelConfig(), runtime=accel.RuntimeConfig(compile="regional"))
    out["error_compile"] = np.array(_error(lambda: accel.accelerate(pipe, compiled)))


@pytest.fixture(scope="module", params=[2, 3], ids=["2proc", "3proc"])
def results(request, tmp_path_factory):
    world = request.param
    return world, spawn(_worker_cases, world, tmp_path_factory.mktemp(f"parallel{world}"))


def test_every_rank_ends_with_the_same_full_output(results):
    world, ranks = results
    for key in ("image_sync", "image_async", "unet_remainder_sync"):
        for other in ranks[1:]:
            np.testing.assert_array_equal(other[key], ranks[0][key])
    assert ranks[0]["unet_remainder_sync"].shape == (2, 4, 15, 12)


def test_synchronous_mode_equals_one_process(results):
    world, ranks = results
    out = ranks[0]
    # 16 rows over 3 ranks is 6/6/4; 15 rows leaves the last band 3 rows, not a whole unit.
    assert out["lora_changes_output"]
    for name in ("even", "remainder", "control", "lora"):  # control: ControlNet residuals cut to each band
        np.testing.assert_allclose(out[f"unet_{name}_sync"], out[f"unet_{name}_single"], atol=1e-4, rtol=0)
    assert np.abs(out["unet_control_single"] - out["unet_remainder_single"]).max() > 1e-3  # the residuals count
    np.testing.assert_allclose(out["image_sync"], out["baseline"], atol=1e-4, rtol=0)
    assert out["sync_calls_sync"] == 3 + STEPS and out["async_calls_sync"] == 0


def test_asynchronous_mode_stays_close_after_warmup(results):
    world, ranks = results
    out = ranks[0]
    assert out["async_calls_async"] == STEPS - 1  # warm-up 1: steps 1..3 used stale neighbours
    # Outside a pipeline loop there is no step index: UNet calls are synchronous, hence exact.
    np.testing.assert_allclose(out["unet_even_async"], out["unet_even_single"], atol=1e-4, rtol=0)
    difference = np.abs(out["image_async"] - out["image_sync"]).max()
    assert 0 < difference < ASYNC_MAX_ABS  # stale activations do change the result, a little
    assert psnr(out["image_async"], out["image_sync"]) > ASYNC_MIN_PSNR


def test_cuda_graph_keys_follow_each_calls_exchange_and_first_calls_run_eagerly(results):
    world, ranks = results
    out = ranks[0]
    slot = 0  # the session's slot of the call: index 0 in its step, one input shape
    first = ["'eager'", repr(("fresh", slot))]
    stale = repr(("stale", slot))
    fresh = first[1]
    # Call 1: the slot's first call registers its exchanges (eager), step 1 is a synchronous warm-up
    # step, steps 2.. are asynchronous. Call 2: the slot is laid out, so every call has a graph key.
    assert list(out["graph_tags"]) == first + [stale] * (STEPS - 2) + [fresh, fresh] + [stale] * (STEPS - 2)
    assert list(out["graph_calls"]) == [4, 2 * (STEPS - 2)]
    assert out["graph_hook_after_restore"]  # restore removed the graph hook and the planning pre-hook
    # Joining each call's all-gathers at its end (as a graph must) computes what the eager overlap does.
    np.testing.assert_array_equal(out["image_graph_first"], out["image_graph_second"])
    np.testing.assert_allclose(out["image_graph_first"], out["image_sync"], atol=ASYNC_MAX_ABS, rtol=0)
    assert "does not compose with torch.compile of the denoiser" in str(out["error_compile"])
    assert "RuntimeConfig(cuda_graph=True)" in str(out["error_compile"])


def test_partial_conditioning_cuts_traffic_and_approximates(results):
    world, ranks = results
    out = ranks[0]
    assert out["bytes_sent_pcpp"] < out["bytes_sent_sync"]
    difference = np.abs(out["image_pcpp"] - out["image_sync"]).max()
    assert 0 < difference < ASYNC_MAX_ABS


def test_restore_after_parallel_runs_is_bit_identical(results):
    world, ranks = results
    for out in ranks:
        np.testing.assert_array_equal(out["image_restored"], out["baseline"])
        assert out["state_identical"]


def test_cfg_parallel_equals_the_cfg_result_and_layout_errors_are_clear(results):
    world, ranks = results
    out = ranks[0]
    if world == 2:
        np.testing.assert_allclose(out["image_cfg"], out["baseline"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(out["sd3_cfg"], out["sd3_single"], atol=1e-5, rtol=0)  # a DiT's CFG batch too
        np.testing.assert_array_equal(out["sd3_restored"], out["sd3_single"])
        assert int(out["sd3_cfg_bytes"]) > 0
        assert "splits UNet feature maps into bands; StableDiffusion3Pipeline has a DiT transformer: use mode='cfg'" \
            in str(out["error_sd3_patch"])
        assert str(out["error_cfg"]) == ""
        assert "needs an even world size of at least 4" in str(out["error_patch+cfg"])
        assert "but the world size is 2" in str(out["error_patch+cfg"])
    else:
        assert "splits the CFG batch over 2 processes, but the world size is 3" in str(out["error_cfg"])
        assert "but the world size is 3" in str(out["error_patch+cfg"])


def test_too_small_resolution_is_a_clear_error(results):
    world, ranks = results
    message = str(ranks[0]["error_small"])
    rows = 2 if world == 2 else 4
    assert f"ValueError: patch parallelism cannot split a latent {rows} rows high" in message
    assert f"over {world} patches" in message and "units of 2 latent rows" in message
    assert f"smallest accepted height at world size {world} is {2 * (world - 1) + 1} latent rows" in message


def test_cli_generate_parallel_runs_as_one_process_without_a_launcher(sd_pipe, tmp_path):
    from apps.cli import main

    sd_pipe.save_pretrained(tmp_path / "tiny")
    out = tmp_path / "out.png"
    args = ["generate", "--model", str(tmp_path / "tiny"), "--prompt", "a cat", "--steps", "1", "--height", "32",
            "--width", "32", "--device", "cpu", "--out", str(out)]
    assert main(args + ["--parallel", "patch"]) == 0
    assert out.is_file()
    with pytest.raises(SystemExit, match=r"--parallel does not compose with torch.compile of the denoiser \(preset 'fast'"):
        main(args + ["--parallel", "cfg", "--preset", "fast"])
