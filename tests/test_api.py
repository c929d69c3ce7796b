"""accelerate / restore round trips, errors, presets and config validation on tiny pipelines."""

import numpy as np
import pytest
import torch
from tiny import run, tiny_sd_pipeline

import accel
from accel import AccelConfig, RuntimeConfig, SamplerConfig


def _cfg():
    return AccelConfig(
        sampler=SamplerConfig("dpmpp_2m", num_steps=3),
        runtime=RuntimeConfig(attention="math", channels_last=True),
    )


@pytest.mark.parametrize("which", ["sd", "sdxl"])
def test_round_trip_is_bit_identical(which, sd_pipe, sdxl_pipe):
    pipe = sd_pipe if which == "sd" else sdxl_pipe
    before = run(pipe, steps=3)
    scheduler = pipe.scheduler
    accel.accelerate(pipe, _cfg())
    assert accel.is_accelerated(pipe)
    accelerated = run(pipe, steps=None)  # the sampler's num_steps becomes the default
    assert pipe.scheduler is not scheduler
    assert not np.array_equal(accelerated, before)  # a different solver really ran
    accel.restore(pipe)
    assert pipe.scheduler is scheduler
    assert type(pipe).__mro__[1].__name__ != "AcceleratedCall"
    after = run(pipe, steps=3)
    assert np.array_equal(after, before)


def test_restore_returns_exact_class_and_config(sd_pipe):
    cls, config = type(sd_pipe), dict(sd_pipe.config)
    accel.accelerate(sd_pipe, _cfg())
    assert isinstance(sd_pipe, cls) and type(sd_pipe) is not cls
    assert type(sd_pipe).__name__ == cls.__name__  # save_pretrained writes the same _class_name
    accel.restore(sd_pipe)
    assert type(sd_pipe) is cls
    assert dict(sd_pipe.config) == config
    assert "_accel_session" not in sd_pipe.__dict__


def test_dtype_cast_is_undone_exactly(sd_pipe):
    before = run(sd_pipe)
    weights = {k: v.clone() for k, v in sd_pipe.unet.state_dict().items()}
    accel.accelerate(sd_pipe, AccelConfig(runtime=RuntimeConfig(dtype="bfloat16")))
    assert sd_pipe.unet.dtype == torch.bfloat16 and sd_pipe.text_encoder.dtype == torch.bfloat16
    accel.restore(sd_pipe)
    assert sd_pipe.unet.dtype == torch.float32
    for k, v in sd_pipe.unet.state_dict().items():
        assert torch.equal(v, weights[k]), k
    assert np.array_equal(run(sd_pipe), before)


def test_explicit_steps_win_over_preset_default(sd_pipe):
    accel.accelerate(sd_pipe, AccelConfig(sampler=SamplerConfig("dpmpp_2m", num_steps=4)))
    seen = []
    sd_pipe(prompt="a", num_inference_steps=2, height=32, width=32, output_type="np",
            callback_on_step_end=lambda p, i, t, kw: (seen.append(i), kw)[1])
    assert seen == [0, 1]
    seen.clear()
    sd_pipe(prompt="a", height=32, width=32, output_type="np",
            callback_on_step_end=lambda p, i, t, kw: (seen.append(i), kw)[1])
    assert seen == [0, 1, 2, 3]


def test_session_tracks_step_index_and_resets_each_call(sd_pipe):
    accel.accelerate(sd_pipe, AccelConfig())
    session = sd_pipe.__dict__["_accel_session"]
    starts, indices = [], []
    session.add_call_listener(lambda s: starts.append(s.num_inference_steps))
    sd_pipe.unet.register_forward_pre_hook(lambda m, a: indices.append(session.step_index))
    run(sd_pipe, steps=3)
    run(sd_pipe, steps=2)
    assert starts == [3, 2]
    assert indices == [0, 1, 2, 0, 1]
    assert session.step_index is None  # cleared once the call is over


def test_double_apply_raises(sd_pipe):
    accel.accelerate(sd_pipe, _cfg())
    with pytest.raises(accel.AlreadyAcceleratedError, match="restore"):
        accel.accelerate(sd_pipe, _cfg())


def test_restore_without_accelerate_raises(sd_pipe):
    with pytest.raises(accel.NotAcceleratedError):
        accel.restore(sd_pipe)


def test_unsupported_pipeline_names_its_class():
    class NotAPipeline:
        unet = torch.nn.Linear(1, 1)

    with pytest.raises(accel.UnsupportedPipelineError, match="NotAPipeline.*UNet2DConditionModel"):
        accel.accelerate(NotAPipeline())


def test_failed_apply_leaves_pipeline_untouched(sd_pipe, monkeypatch):
    import accel.runtime as runtime

    before = run(sd_pipe)
    scheduler = sd_pipe.scheduler

    def broken(module, mode, **kw):
        raise RuntimeError("compiler missing")

    monkeypatch.setattr(runtime, "apply_compile", broken)
    with pytest.raises(RuntimeError, match="compiler missing"):
        accel.accelerate(sd_pipe, AccelConfig(sampler=SamplerConfig("dpmpp_2m"), runtime=RuntimeConfig(compile="full")))
    assert not accel.is_accelerated(sd_pipe) and sd_pipe.scheduler is scheduler
    assert np.array_equal(run(sd_pipe), before)


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: RuntimeConfig(attention="fastest"), "'sdpa'"),
        (lambda: RuntimeConfig(compile="max"), "'regional'"),
        (lambda: RuntimeConfig(dtype="fp8"), "'bfloat16'"),
        (lambda: RuntimeConfig(cuda_graph="yes"), "True or False"),
        (lambda: RuntimeConfig(components=("unet", "scheduler")), "'text_encoder'"),
        (lambda: RuntimeConfig(components="unet"), "non-empty tuple"),
        (lambda: SamplerConfig("magic"), "'dpmpp_2m'"),
        (lambda: SamplerConfig("dpmpp_2m", num_steps=0), "positive"),
        (lambda: SamplerConfig("dpmpp_2m", schedule="wiggly"), "'karras'"),
        (lambda: SamplerConfig("dpmpp_2m", options={"order": 4}), "order"),
        (lambda: SamplerConfig("dpmpp_2m", options={"warp": 1}), "valid choices"),
        (lambda: AccelConfig(sampler=RuntimeConfig()), "accepted config types for 'sampler': SamplerConfig"),
    ],
)
def test_invalid_configs_name_valid_choices(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_config_does_not_alias_caller_options():
    options = {"order": 2}
    config = SamplerConfig("dpmpp_2m", options=options)
    options["order"] = 3
    assert config.options["order"] == 2


def test_presets_are_valid_and_listed():
    assert set(accel.preset_names()) >= {"quality", "balanced", "fast"}
    for name in accel.preset_names():
        assert isinstance(accel.get_preset(name), AccelConfig)
    with pytest.raises(ValueError, match="valid presets: quality"):
        accel.get_preset("ludicrous")


def test_preset_and_config_together_raise(sd_pipe):
    with pytest.raises(ValueError, match="either config or preset"):
        accel.accelerate(sd_pipe, AccelConfig(), preset="fast")


@pytest.mark.parametrize("name", ["quality", "balanced", "fast"])
def test_every_preset_round_trips_on_cpu(name, sd_pipe):
    before = run(sd_pipe)
    accel.accelerate(sd_pipe, preset=name)
    if name == "quality":  # the others torch.compile: minutes on a CPU; covered on the GPU
        out = run(sd_pipe)
        assert np.isfinite(out).all()
    accel.restore(sd_pipe)
    assert np.array_equal(run(sd_pipe), before)


def test_from_pretrained_loads_and_accelerates(sd_pipe, tmp_path):
    sd_pipe.save_pretrained(tmp_path / "pipe")
    pipe = accel.from_pretrained(str(tmp_path / "pipe"), config=_cfg())
    assert accel.is_accelerated(pipe)
    assert [c["technique"] for c in accel.changes(pipe)] == ["sampler", "runtime"]


def test_from_pretrained_without_config_is_not_accelerated(sd_pipe, tmp_path):
    sd_pipe.save_pretrained(tmp_path / "pipe")
    pipe = accel.from_pretrained(str(tmp_path / "pipe"))
    assert not accel.is_accelerated(pipe)
    accel.accelerate(pipe, preset="quality")  # raised AlreadyAcceleratedError when loading marked it accelerated
    assert accel.changes(pipe)


def test_from_pretrained_defaults_to_the_embedded_model():
    from accel.embedded import EMBEDDED_MODEL_DIR

    pipe = accel.from_pretrained()
    assert pipe.config._name_or_path == str(EMBEDDED_MODEL_DIR)
    assert not accel.is_accelerated(pipe)


def test_from_pipe_of_an_accelerated_pipeline_keeps_its_own_scheduler(sd_pipe):
    from diffusers import StableDiffusionPipeline

    scheduler, before = sd_pipe.scheduler, run(sd_pipe, steps=3)
    accel.accelerate(sd_pipe, _cfg())
    sibling = StableDiffusionPipeline.from_pipe(sd_pipe)
    assert sd_pipe.scheduler is not scheduler  # accel's sampler runs the accelerated pipeline
    assert sibling.scheduler is scheduler  # not the sampler, which restore(sd_pipe) cannot take back from it
    accel.restore(sd_pipe)
    assert np.array_equal(run(sibling, steps=3), before)


@pytest.mark.parametrize("kind", ["img2img", "inpaint"])
def test_img2img_and_inpaint_round_trip(kind, tmp_path):
    from diffusers import StableDiffusionImg2ImgPipeline, StableDiffusionInpaintPipeline
    from PIL import Image

    cls = StableDiffusionImg2ImgPipeline if kind == "img2img" else StableDiffusionInpaintPipeline
    pipe = tiny_sd_pipeline(tmp_path, cls)
    image = Image.fromarray((np.random.default_rng(0).random((32, 32, 3)) * 255).astype("uint8"))
    extra = {"image": image, "strength": 0.75}
    if kind == "inpaint":
        extra["mask_image"] = Image.new("L", (32, 32), 255)
    before = run(pipe, steps=4, **extra)
    accel.accelerate(pipe, _cfg())
    assert np.isfinite(run(pipe, steps=4, **extra)).all()
    accel.restore(pipe)
    assert np.array_equal(run(pipe, steps=4, **extra), before)
