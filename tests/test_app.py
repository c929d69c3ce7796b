"""The Gradio app's functions on a tiny pipeline: inputs to configs, the comparison, the plot's data."""

import json
import math
import threading

import numpy as np
import pytest
import torch

import accel
from apps import pareto
from apps.gradio_app import (
    KEEP_SAMPLER,
    ComparisonApp,
    Controls,
    InputError,
    generate_outputs,
    generate_steps,
    numbers_markdown,
    prompted_class,
)
from apps.loading import GPU_ONLY_NOTE
from tiny import tiny_sd_pipeline, tiny_unet


@pytest.fixture
def app(tmp_path):
    return ComparisonApp(tiny_sd_pipeline(tmp_path), model_name="tiny", model_dir=tmp_path, warmup=False)


@pytest.fixture(scope="module")
def checks_app(tmp_path_factory):
    """One app for the tests that only check inputs and build configs (nothing is generated)."""
    tmp = tmp_path_factory.mktemp("checks")
    return ComparisonApp(tiny_sd_pipeline(tmp), model_name="tiny", model_dir=tmp, warmup=False)


def controls(**kwargs) -> Controls:
    """Tiny and quick: 3 baseline steps at the tiny model's native 32x32, nothing accelerated unless asked."""
    kwargs.setdefault("prompt", "a photo of a horse")
    kwargs.setdefault("steps", 3)
    kwargs.setdefault("guidance", 5.0)
    return Controls(**kwargs)


def plain_call(pipe, steps: int, seed: int = 0, prompt: str = "a photo of a horse", guidance: float = 5.0) -> np.ndarray:
    """The pipeline called directly, quantised to uint8 as the app shows it."""
    images = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance, height=32, width=32, output_type="pt",
                  generator=torch.Generator("cpu").manual_seed(seed)).images
    return (images[0].clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()


def test_size_limits_follow_the_model(app):
    # tiny model: VAE factor 2, UNet sample_size 16, two levels
    assert (app.native_size, app.size_multiple, app.min_size, app.max_size) == (32, 8, 8, 64)


def test_compare_runs_baseline_then_accelerated_then_restores(app):
    c = controls(sampler=KEEP_SAMPLER, cache="deepcache", cache_interval=2, steps=4)
    result = app.compare(c)

    assert result.config == accel.AccelConfig(cache=accel.DeepCacheConfig(cache_interval=2))
    assert np.array_equal(np.asarray(result.baseline), plain_call(app.pipe, 4))
    assert not accel.is_accelerated(app.pipe)
    accel.accelerate(app.pipe, result.config)
    direct = plain_call(app.pipe, 4)
    accel.restore(app.pipe)
    assert np.array_equal(np.asarray(result.accelerated), direct)
    assert not np.array_equal(np.asarray(result.accelerated), np.asarray(result.baseline))
    assert math.isfinite(result.psnr_db) and result.ssim < 1.0
    assert result.speedup == pytest.approx(result.baseline_s / result.accelerated_s)
    # restored: the next plain call is bit-identical to the baseline again
    assert np.array_equal(plain_call(app.pipe, 4), np.asarray(result.baseline))
    table = numbers_markdown(result)
    assert f"{result.psnr_db:.2f} dB" in table and f"{result.speedup:.2f}x" in table and "DeepCache(cache_interval=2)" in table


def test_nothing_accelerated_is_identical(app):
    result = app.compare(controls(sampler=KEEP_SAMPLER))
    assert result.config == accel.AccelConfig()
    assert math.isinf(result.psnr_db) and result.ssim == pytest.approx(1.0)
    assert any("nothing is accelerated" in note for note in result.notes)
    assert "**identical**" in numbers_markdown(result)


def test_sampler_controls_set_steps_and_report_progress(app):
    reports = []
    result = app.compare(controls(sampler="dpmpp_2m", sampler_steps=2, schedule="karras"),
                         progress=lambda fraction, text: reports.append((fraction, text)))
    assert result.config.sampler == accel.SamplerConfig("dpmpp_2m", num_steps=2, schedule="karras")
    assert (result.baseline_steps, result.accelerated_steps) == (3, 2)
    texts = [text for _, text in reports]
    assert texts == ["baseline: step 1 of 3", "baseline: step 2 of 3", "baseline: step 3 of 3",
                     "accelerated: step 1 of 2", "accelerated: step 2 of 2", "done"]
    fractions = [f for f, _ in reports]
    assert fractions == sorted(fractions) and fractions[-1] == 1.0


def test_schedule_without_sampler_is_left_out_with_a_note(checks_app):
    config, notes = checks_app.build_config(controls(sampler=KEEP_SAMPLER, schedule="karras"), baseline_steps=3)
    assert config.sampler is None and any("the model's own scheduler ran unchanged" in note for note in notes)


def test_sampler_without_steps_takes_the_baseline_steps(app):
    config, _ = app.build_config(controls(sampler="euler"), baseline_steps=7)
    assert config.sampler == accel.SamplerConfig("euler", num_steps=7)


@pytest.mark.parametrize("cache, expected", [
    ("deepcache", accel.DeepCacheConfig(cache_interval=3)),
    ("encoder_propagation", accel.EncoderPropagationConfig(key_interval=3)),
    ("block_cache", accel.BlockCacheConfig(threshold=0.2, max_consecutive_cached=2)),
])
def test_cache_controls(checks_app, cache, expected):
    config, _ = checks_app.build_config(controls(cache=cache, cache_interval=3, block_cache_threshold=0.2), baseline_steps=10)
    assert config.cache == expected and config.sampler is None


@pytest.mark.parametrize("change, message", [
    (dict(prompt=""), "the prompt is empty"),
    (dict(prompt="   "), "the prompt is empty"),
    (dict(steps=0), "steps=0 is out of range; accepted: 1 to 200"),
    (dict(steps=500), "steps=500 is out of range; accepted: 1 to 200"),
    (dict(steps=2.5), "not a whole number"),
    (dict(sampler="euler", sampler_steps=201), "sampler steps=201 is out of range"),
    (dict(height=30), "height=30 is a size this model cannot take; accepted: multiples of 8 from 8 to 64"),
    (dict(width=128), "width=128 is a size this model cannot take"),
    (dict(seed=-1), "seed=-1 is out of range"),
    (dict(guidance="lots"), "guidance='lots' is not a number"),
    (dict(guidance=99), "guidance=99.0 is out of range"),
    (dict(sampler="warp"), "sampler 'warp' is unknown; accepted: ddim, euler"),
    (dict(sampler="euler", schedule="tuned"), "schedule 'tuned' needs a tuned schedule"),
    (dict(sampler="euler", schedule="tuned", tuned_schedule="absent"), "tuned schedule: no usable file or folder at that path"),
    (dict(cache="magic"), "cache 'magic' is unknown; accepted: none, deepcache"),
    (dict(cache="deepcache", cache_interval=0), "cache interval=0 is out of range"),
    (dict(compile="max"), "compile 'max' is unknown; accepted: off, regional, full"),
    (dict(preset="ludicrous"), "preset 'ludicrous' is unknown; accepted: quality, balanced, fast"),
    (dict(pruned_unet="/nonexistent/unet", lcm_lora="/nonexistent/lora.safetensors"), "one model change at a time"),
    (dict(pruned_unet="/nonexistent/unet"), "pruned UNet: no usable file or folder at that path; accepted: a folder"),
])
def test_bad_input_is_answered_with_a_message(checks_app, change, message):
    with pytest.raises(InputError) as err:
        checks_app.compare(controls(**change))
    assert message in str(err.value)


def _server_paths(tmp_path):
    """Paths a visitor might probe: missing, an existing file, an empty folder, an unreadable name."""
    (tmp_path / "notes.txt").write_text("not weights")
    (tmp_path / "empty").mkdir()
    return ["/nonexistent/x", str(tmp_path / "notes.txt"), str(tmp_path / "empty"), "/etc/passwd", "/root", "\0bad"]


@pytest.mark.parametrize("field", ["pruned_unet", "lcm_lora", "tuned_schedule"])
def test_path_fields_do_not_reveal_which_server_paths_exist(checks_app, tmp_path, field):
    extra = dict(sampler="euler", schedule="tuned") if field == "tuned_schedule" else {}
    messages = set()
    for path in _server_paths(tmp_path):
        with pytest.raises(InputError) as err:
            checks_app.build_config(controls(**extra, **{field: path}), baseline_steps=3)
        messages.add(str(err.value))
    assert len(messages) == 1, messages  # the same answer for a missing path, a file, a folder, a system path
    (message,) = messages
    assert "no usable file or folder at that path; accepted:" in message and str(tmp_path) not in message


def test_config_that_cannot_apply_is_an_input_error(app, monkeypatch):
    # no control reaches DeepCache's branch; a config that fails in apply must still come back as a message
    bad = accel.AccelConfig(cache=accel.DeepCacheConfig(cache_interval=2, cache_branch=50))
    monkeypatch.setattr(app, "build_config", lambda c, steps: (bad, []))
    with pytest.raises(InputError, match="cannot be applied to tiny: .*cache_branch"):
        app.compare(controls())
    assert not accel.is_accelerated(app.pipe)


def test_gpu_only_runtime_is_left_out_on_cpu_with_a_note(app):
    config, notes = app.build_config(controls(sampler=KEEP_SAMPLER, compile="full", cuda_graph=True), baseline_steps=3)
    assert config.runtime is None and GPU_ONLY_NOTE.format(device="cpu") in notes
    config, notes = app.build_config(controls(sampler=KEEP_SAMPLER, compile="full", channels_last=True), baseline_steps=3)
    assert config.runtime == accel.RuntimeConfig(channels_last=True)
    config, notes = app.build_config(controls(preset="fast"), baseline_steps=3)
    preset = accel.get_preset("fast")
    assert config.sampler == preset.sampler
    assert (config.runtime.compile, config.runtime.cuda_graph, config.runtime.channels_last) == (None, False, True)
    assert any("preset 'fast'" in note for note in notes) and GPU_ONLY_NOTE.format(device="cpu") in notes


def test_tuned_schedule_by_name(app, tmp_path):
    import samplers

    sigmas = samplers.get_sigmas_karras(2, 0.1, 10.0).tolist()
    tuned = samplers.TunedSchedule(sampler="dpmpp_2m", num_steps=2, sigmas=sigmas, timesteps=[900.0, 300.0])
    samplers.save_tuned_schedule(tuned, tmp_path, "mine")
    assert app.tuned_schedule_names() == ["mine"]
    result = app.compare(controls(sampler="dpmpp_2m", sampler_steps=5, schedule="tuned", tuned_schedule="mine"))
    assert result.config.sampler == accel.SamplerConfig("dpmpp_2m", num_steps=2, schedule="tuned",
                                                        options={"tuned": "mine", "model_dir": str(tmp_path)})
    assert result.accelerated_steps == 2 and "steps set to the tuned schedule's 2" in result.notes


def test_concurrent_requests_both_complete_as_if_alone(app):
    requests = [controls(seed=1, cache="deepcache", cache_interval=2, sampler=KEEP_SAMPLER),
                controls(seed=2, sampler="euler", sampler_steps=2)]
    alone = [app.compare(c) for c in requests]
    results, errors = [None, None], []

    def worker(i):
        try:
            results[i] = app.compare(requests[i])
        except Exception as err:  # reported below: a crash in either thread fails the test
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors and all(r is not None for r in results)
    for got, want in zip(results, alone):
        assert np.array_equal(np.asarray(got.baseline), np.asarray(want.baseline))
        assert np.array_equal(np.asarray(got.accelerated), np.asarray(want.accelerated))
    assert not accel.is_accelerated(app.pipe)


def test_prompted_class():
    classes = ("airplane", "automobile", "horse", "ship")
    assert prompted_class("A photo of a Horse", classes) == "horse"
    assert prompted_class("two ships at sea", classes) == "ship"
    assert prompted_class("a horse on a ship", classes) is None
    assert prompted_class("a seahorse", classes) is None


def _write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))


def test_pareto_points_from_benchmark_json(tmp_path):
    _write(tmp_path / "sd15.json", {"meta": {"device": "NVIDIA H100 80GB HBM3"}, "results": [
        {"config": "stock", "speedup": 1.0, "psnr_db": None, "ssim": 1.0},
        {"config": "graph", "speedup": 2.5, "psnr_db": None, "ssim": 1.0},
        {"config": "deepcache", "speedup": 3.0, "psnr_db": 40.0, "ssim": 0.99},
        {"config": "worse", "speedup": 2.0, "psnr_db": 35.0, "ssim": 0.98},
        {"config": "no-speedup", "psnr_db": 35.0},
    ]})
    _write(tmp_path / "q" / "quality.json", {"meta": {"device": "cpu"}, "rows": [
        {"config": "baseline (dpmpp_2m 20 steps)", "seconds": 10.0},
        {"config": "fast", "speedup": 2.7, "psnr_db": 32.7, "ssim": 0.97},
    ]})
    _write(tmp_path / "e" / "eval.json", {"device": "cpu", "preset": "fast", "baseline": {},
                                          "accelerated": {"speedup": 1.5, "psnr_db": float("inf")}})
    _write(tmp_path / "samplers.json", {"rows": [{"label": "dpmpp_2m", "steps": 5, "psnr_db": 25.0}]})
    (tmp_path / "broken.json").write_text("{not json")
    _write(tmp_path / "list.json", [1, 2, 3])

    points = {(p.series, p.config): p for p in pareto.load_points(tmp_path)}
    assert set(points) == {("sd15 (H100)", "stock"), ("sd15 (H100)", "graph"), ("sd15 (H100)", "deepcache"),
                           ("sd15 (H100)", "worse"), ("q (cpu)", "baseline (dpmpp_2m 20 steps)"),
                           ("q (cpu)", "fast"), ("e (cpu)", "fast")}
    graph = points[("sd15 (H100)", "graph")]
    assert graph.identical and graph.psnr_db == pareto.PSNR_CAP_DB and graph.on_front
    assert not points[("sd15 (H100)", "stock")].on_front  # graph is as faithful and faster
    assert points[("sd15 (H100)", "deepcache")].on_front
    assert not points[("sd15 (H100)", "worse")].on_front
    assert points[("q (cpu)", "baseline (dpmpp_2m 20 steps)")].speedup == 1.0
    assert points[("e (cpu)", "fast")].identical
    table = pareto.front_table(list(points.values()))
    assert ["sd15 (H100)", "graph", 2.5, "identical"] in table and ["sd15 (H100)", "worse", 2.0, 35.0] not in table
    assert list(pareto.frame(list(points.values())).columns) == list(pareto.Point.__dataclass_fields__)
    assert pareto.load_points(tmp_path / "absent") == []


def test_generate_outputs_add_the_run_as_a_live_point(app):
    measured = [pareto.Point("set", "a", 2.0, 30.0)]
    c = controls(sampler=KEEP_SAMPLER, cache="deepcache", cache_interval=2)
    *_, table, plot_frame, front, live = generate_outputs(app, c, measured, [])
    assert [p.series for p in live] == ["this run (cpu)"]
    *_, plot_frame, front, live = generate_outputs(app, c, measured, live)
    assert [p.series for p in live] == ["earlier runs (this session) (cpu)", "this run (cpu)"]
    assert list(plot_frame["series"]) == ["set", "earlier runs (this session) (cpu)", "this run (cpu)"]
    assert plot_frame["speedup"].iloc[-1] == pytest.approx(live[-1].speedup)
    # before the second run the earlier-runs series has no point yet: a row the plot does not draw
    first_frame = generate_outputs(app, c, measured, [])[3]
    assert list(first_frame["series"]) == ["set", "this run (cpu)", "earlier runs (this session) (cpu)"]
    assert first_frame["speedup"].isna().tolist() == [False, False, True]
    assert any(row[0] == "this run (cpu)" for row in front)
    assert "speed-up" in table


def test_every_measurement_set_gets_its_own_colour():
    points = [pareto.Point(f"set {i:02d} (H100)", "c", 1.0 + i, 30.0) for i in range(40)]
    colors = pareto.color_map(points, "cpu")
    measured = [colors[p.series] for p in points]
    assert len(set(measured)) == len(points)  # none repeats, past the palette's length too
    assert pareto.LIVE_COLOR not in measured and pareto.EARLIER_COLOR not in measured
    assert colors["this run (cpu)"] == pareto.LIVE_COLOR


def test_legend_lists_the_live_run_first_and_every_set():
    points = [pareto.Point(f"a long measurement set name {i} (H100)", "c", 2.0, 30.0) for i in range(12)]
    points.append(pareto.Point("<b>odd</b>", "c", 2.0, 30.0))
    html = pareto.legend_html(points, "cpu")
    colors = pareto.color_map(points, "cpu")
    names = ["this run (cpu)", "earlier runs (this session) (cpu)", *sorted({p.series for p in points})]
    positions = [html.index(f"background:{colors[name]}") for name in names]
    assert positions == sorted(positions)  # the live run first, then earlier runs, then the sets in order
    assert "&lt;b&gt;odd&lt;/b&gt;" in html and "<b>odd</b>" not in html


def test_plot_legend_sits_below_the_plot(app, tmp_path):
    gr = pytest.importorskip("gradio")
    from apps import gradio_app

    _write(tmp_path / "sd15" / "r.json", {"meta": {"device": "H100"}, "results": [
        {"config": "stock", "speedup": 1.0, "psnr_db": None}, {"config": "graph", "speedup": 2.0, "psnr_db": 40.0}]})
    demo = gradio_app.build_app(app, results_dir=tmp_path)
    (plot,) = [b for b in demo.blocks.values() if isinstance(b, gr.ScatterPlot)]
    # gradio draws its legend in one row that runs off the plot's right edge; it is off, and the page's own wraps
    assert plot.colors_in_legend == []
    (legend,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "pareto-legend"]
    assert "this run (cpu)" in legend.value and "sd15 (H100)" in legend.value


def test_page_builds_and_answers_bad_input_with_a_message(app, tmp_path, monkeypatch):
    gr = pytest.importorskip("gradio")
    from apps import gradio_app

    launched = {}
    monkeypatch.setattr(gr.Blocks, "launch", lambda self, **kwargs: launched.update(kwargs))
    demo = gradio_app.launch(app, port=None, results_dir=tmp_path)
    assert launched["server_name"] == "127.0.0.1" and launched["show_error"] is False
    (generate,) = [fn for fn in demo.fns.values() if fn.api_name == "generate"]
    assert generate.concurrency_limit == 1 and generate.queue
    *kept, status = list(generate.fn(*Controls("").__dict__.values(), []))[-1]  # the handler yields as it goes
    assert kept == [gr.skip()] * 6  # the previous outputs stay
    assert "Cannot generate:** the prompt is empty" in status and "previous run" not in status
    (outputs,) = list(generate.fn(*controls(steps=1).__dict__.values(), []))  # nothing compiles: one update
    assert outputs[-1] == "" and outputs[2].startswith("| | baseline | accelerated |")
    *kept, status = list(generate.fn(*Controls("a cat", height=36).__dict__.values(), outputs[-2]))[-1]
    assert kept == [gr.skip()] * 6 and "height=36" in status and "from the previous run" in status


def test_cli_app_defaults_to_localhost():
    from apps.cli import build_parser

    args = build_parser().parse_args(["app"])
    assert (args.host, args.port, args.model) == ("127.0.0.1", 7860, None)
    assert build_parser().parse_args(["app", "--host", "0.0.0.0"]).host == "0.0.0.0"


def test_lcm_lora_wiring(app, tmp_path):
    (tmp_path / "lora.bin").write_bytes(b"")
    with pytest.raises(InputError, match="LCM-LoRA: no usable .*safetensors"):
        app.build_config(controls(lcm_lora=str(tmp_path / "lora.bin")), baseline_steps=3)
    weights = _tiny_lcm_lora(app.pipe, tmp_path / "lora")
    config, notes = app.build_config(controls(lcm_lora=str(weights), sampler="dpmpp_2m", sampler_steps=9), baseline_steps=3)
    assert config == accel.AccelConfig(model=accel.LCMLoRAConfig(path=str(weights)))
    result = app.compare(controls(lcm_lora=str(weights), sampler="dpmpp_2m"))
    assert result.accelerated_steps == config.model.num_steps and any("LCM-LoRA samples with LCM" in n for n in result.notes)
    assert np.array_equal(plain_call(app.pipe, 3), np.asarray(result.baseline))  # the LoRA is gone again


def _tiny_lcm_lora(pipe, folder):
    """A random LoRA on the tiny UNet's attention projections, saved as safetensors."""
    from diffusers import StableDiffusionPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    unet = tiny_unet()
    unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"], init_lora_weights=False))
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet),
                                              safe_serialization=True)
    return folder / "pytorch_lora_weights.safetensors"


def test_pruned_unet_wiring(app, tmp_path):
    (tmp_path / "pickled").mkdir()
    (tmp_path / "pickled" / "config.json").write_text("{}")
    (tmp_path / "pickled" / "diffusion_pytorch_model.bin").write_bytes(b"")
    with pytest.raises(InputError, match="only safetensors weights are loaded"):
        app.build_config(controls(pruned_unet=str(tmp_path / "pickled")), baseline_steps=3)
    torch.manual_seed(1)
    student = tiny_unet()
    with torch.no_grad():  # other weights than the pipeline's UNet, same architecture
        for param in student.parameters():
            param.add_(0.01 * torch.randn_like(param))
    student.save_pretrained(tmp_path / "student", safe_serialization=True)
    result = app.compare(controls(pruned_unet=str(tmp_path / "student"), sampler=KEEP_SAMPLER))
    assert result.config == accel.AccelConfig(model=accel.UNetSwapConfig(path=str(tmp_path / "student")))
    assert math.isfinite(result.psnr_db)  # another UNet ran
    assert np.array_equal(plain_call(app.pipe, 3), np.asarray(result.baseline))  # and the original is back


def test_a_compiled_config_shows_its_first_image_while_compiling_in_the_background(app, monkeypatch, caplog):
    """With torch.compile (full), the app compiles in the background: the first accelerated image comes before the
    compile ends (eager), the page's handler shows it at once, and the latency is timed on the compiled code. (On a
    CPU the app drops the compile as GPU-only; kept here, with dynamo's eager backend for speed.)"""
    import logging

    from apps import gradio_app

    monkeypatch.setattr(gradio_app, "without_gpu_only_runtime", lambda config, device: (config, None))
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compile_(*a, **{**k, "backend": "eager"}))
    c = controls(sampler=KEEP_SAMPLER, compile="full", steps=3)
    try:
        with caplog.at_level(logging.INFO, logger="accel"):
            steps = list(generate_steps(app, c, [], []))
    finally:
        torch._dynamo.reset()
    assert [kind for kind, _ in steps] == ["first", "done"]
    (base_first, accel_first, first_numbers), done = steps[0][1], steps[1][1]
    assert "first image, eager" in first_numbers and "Compiling in the background" in first_numbers
    assert np.array_equal(np.asarray(base_first), np.asarray(done[0]))
    np.testing.assert_allclose(np.asarray(accel_first, dtype=float), np.asarray(done[1], dtype=float), atol=1)
    assert "switches to its compiled code" in caplog.text  # the timed call ran the compiled code
    assert "first image (eager, compiling in the background)" in done[2] and "compiled code running after" in done[2]
    assert "compile_background=True" in done[2] and gradio_app.BACKGROUND_NOTE in done[2]
    assert not accel.is_accelerated(app.pipe)
    assert np.array_equal(plain_call(app.pipe, 3), np.asarray(done[0]))  # restored exactly


def test_a_failed_background_compile_is_said_next_to_the_eager_timing(app, monkeypatch):
    """Where the background compile fails, the module keeps running eagerly: the page's numbers say that the
    latency is the eager path's instead of passing it off as the compiled one."""
    from apps import gradio_app

    def failing_backend(gm, example_inputs):
        raise RuntimeError("no compiler here")

    monkeypatch.setattr(gradio_app, "without_gpu_only_runtime", lambda config, device: (config, None))
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compile_(*a, **{**k, "backend": failing_backend}))
    try:
        result = app.compare(controls(sampler=KEEP_SAMPLER, compile="full", steps=3))
    finally:
        torch._dynamo.reset()
    assert gradio_app.COMPILE_FAILED_NOTE in result.notes and result.compiled_after_s is None
    assert result.first_image_s is not None and "compiled code running after" not in numbers_markdown(result)
    assert not accel.is_accelerated(app.pipe)


def test_a_cache_with_a_compile_compiles_in_the_call_and_says_so(app, monkeypatch):
    """DeepCache's hooks sit inside the UNet, which then compiles in its first call, not in the background: no first
    image is shown early and the numbers do not call that call eager."""
    from apps import gradio_app

    monkeypatch.setattr(gradio_app, "without_gpu_only_runtime", lambda config, device: (config, None))
    compile_ = torch.compile
    monkeypatch.setattr(torch, "compile", lambda *a, **k: compile_(*a, **{**k, "backend": "eager"}))
    c = controls(sampler=KEEP_SAMPLER, compile="full", cache="deepcache", cache_interval=2, steps=4)
    try:
        steps = list(app.compare_steps(c))
    finally:
        torch._dynamo.reset()
    assert [kind for kind, _ in steps] == ["done"]
    result = steps[0][1]
    assert gradio_app.COMPILED_IN_THE_CALL_NOTE in result.notes and result.first_image_s is None
    assert result.first_call_s is not None and "first call (compile / capture)" in numbers_markdown(result)
    assert not accel.is_accelerated(app.pipe)
