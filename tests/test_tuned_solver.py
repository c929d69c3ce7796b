"""OLSS, the coefficient solver (samplers.olss): DPM-Solver++(2M) as its default member, the
step-by-step least-squares fit against a reference trajectory, the tuned-schedule JSON record and
the scheduler adapter in tiny txt2img / img2img pipelines. Gaussian data (exact denoiser and ODE
solution in closed form) and a tiny random pipeline, on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionImg2ImgPipeline

import accel
import samplers
from accel import AccelConfig, SamplerConfig
from accel.embedded import EMBEDDED_MODEL_DIR
from samplers.denoiser import NoiseSchedule
from samplers.olss import ReferenceTrajectory, dpmpp_2m_coefficients, fit_olss_coefficients, olss_steps
from samplers._loop import drive
from tiny import GaussianData, run, tiny_sd_pipeline

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
GAUSSIAN = GaussianData(32, seed=5)
NS = NoiseSchedule.from_config(DDIMScheduler(**SD).config)


def _problem(batch, seed):
    return GAUSSIAN.start(batch, seed, NS.sigma_max)


def _exact(x_T, sigma):
    return GAUSSIAN.exact(x_T, sigma, NS.sigma_max)


@pytest.mark.parametrize("steps, schedule", [(2, "linspace"), (5, "linspace"), (8, "karras"), (16, "logsnr")])
def test_default_coefficients_are_dpmpp_2m(steps, schedule):
    _, x_T = _problem(4, seed=0)
    sigmas = samplers.get_sigmas(schedule, steps, NS)
    expected = samplers.sample("dpmpp_2m", GAUSSIAN.denoiser, x_T, sigmas, disable=True)
    out = samplers.sample("olss", GAUSSIAN.denoiser, x_T, sigmas, disable=True)
    assert (out - expected).abs().max() < 1e-12
    rows = dpmpp_2m_coefficients(sigmas)
    explicit = samplers.sample("olss", GAUSSIAN.denoiser, x_T, sigmas, disable=True, coefficients=rows)
    assert torch.equal(explicit, out)
    # the rows are not trivially first order: 2M combines two outputs on its interior steps
    assert [len(r) for r in rows][:2] == [2, 3 if steps > 2 else 2]
    other = [list(r) for r in rows]
    other[0][0] *= 1.01
    assert (samplers.sample("olss", GAUSSIAN.denoiser, x_T, sigmas, disable=True, coefficients=other)
            - out).abs().max() > 1e-6


def test_reference_trajectory_reads_the_solution_between_its_grid_points():
    _, x_T = _problem(3, seed=1)
    reference = ReferenceTrajectory.solve(GAUSSIAN.denoiser, x_T, samplers.get_sigmas("karras", 100, NS))
    for sigma in (NS.sigma_max, 7.3, 0.9, 0.11):
        assert (reference.at(sigma) - _exact(x_T, sigma)).abs().max() < 2e-3
    assert (reference.at(0.0) - _exact(x_T, 0.0)).abs().max() < 1e-2
    with pytest.raises(ValueError, match="above the reference's first sigma"):
        reference.at(2 * NS.sigma_max)


def test_fit_lowers_the_error_on_held_out_inputs():
    _, x_cal = _problem(8, seed=2)
    _, x_held = _problem(8, seed=3)
    sigmas = samplers.get_sigmas("linspace", 5, NS)
    reference = ReferenceTrajectory.solve(GAUSSIAN.denoiser, x_cal, samplers.get_sigmas("karras", 100, NS))

    def held_error(coefficients):
        out = samplers.sample("olss", GAUSSIAN.denoiser, x_held, sigmas, disable=True, coefficients=coefficients)
        return float((out - _exact(x_held, 0.0)).square().mean())

    base = held_error(None)
    fit = fit_olss_coefficients(GAUSSIAN.denoiser, x_cal, sigmas, reference, history=2)
    assert fit.denoiser_calls == 5 and len(fit.coefficients) == 5
    assert [len(r) for r in fit.coefficients] == [2, 3, 3, 3, 3]
    assert held_error(fit.coefficients) < base / 10
    # the fitted solver's own run on the calibration inputs is what the fit returns
    again = samplers.sample("olss", GAUSSIAN.denoiser, x_cal, sigmas, disable=True, coefficients=fit.coefficients)
    assert (again - fit.sample).abs().max() < 1e-10
    # a strong ridge pulls the rows back to DPM-Solver++(2M)'s
    pulled = fit_olss_coefficients(GAUSSIAN.denoiser, x_cal, sigmas, reference, history=2, ridge=1e6)
    assert held_error(pulled.coefficients) == pytest.approx(base, rel=1e-3)
    with pytest.raises(ValueError, match="history must be a positive int or None"):
        fit_olss_coefficients(GAUSSIAN.denoiser, x_cal, sigmas, reference, history=0)


def test_search_fits_coefficients_on_given_and_searched_sigmas(tmp_path):
    noise, x_T = _problem(6, seed=4)
    reference = ReferenceTrajectory.solve(GAUSSIAN.denoiser, x_T, samplers.get_sigmas("karras", 100, NS))
    start = samplers.get_sigmas("karras", 4, NS).tolist()
    kwargs = dict(sampler="olss", num_steps=4, reference=reference, objective="psnr", init_sigmas=start)
    fixed = samplers.tune_schedule(GAUSSIAN.denoiser, noise, NS, passes=0, **kwargs)
    assert fixed.sigmas == pytest.approx(start) and fixed.search_denoiser_calls == 2 * 4  # the fit, 2M's run
    assert fixed.coefficient_fit == {"history": 3, "ridge": 0.0} and len(fixed.coefficients) == 4
    base = samplers.sample("dpmpp_2m", GAUSSIAN.denoiser, x_T, torch.tensor(start, dtype=torch.float64), disable=True)
    psnr_loss = float((10 * torch.log10((base - reference.final).square().mean(1))).mean())
    assert fixed.loss_init == pytest.approx(psnr_loss, abs=1e-9)  # DPM-Solver++(2M) on the initial sigmas
    assert fixed.loss_tuned < fixed.loss_init - 1  # dB
    searched = samplers.tune_schedule(GAUSSIAN.denoiser, noise, NS, passes=3, **kwargs)
    assert searched.loss_tuned <= fixed.loss_tuned and searched.search_evaluations > 1
    out = samplers.sample("olss", GAUSSIAN.denoiser, x_T, torch.tensor(searched.sigmas, dtype=torch.float64),
                          disable=True, coefficients=searched.coefficients)
    assert float((10 * torch.log10((out - reference.final).square().mean(1))).mean()) == pytest.approx(
        searched.loss_tuned, abs=1e-9)
    path = samplers.save_tuned_schedule(searched, tmp_path, "olss-4")
    assert samplers.load_tuned_schedule("olss-4", tmp_path) == searched
    assert json.loads(path.read_text())["coefficients"] == searched.coefficients


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(reference="tensor"), "pass a samplers.olss.ReferenceTrajectory"),
        (dict(sampler_options={"coefficients": [[1.0, 0.0]] * 4}), "leave it out of sampler_options"),
        (dict(init_sigmas=[14.6, 1.0, 0.0]), "must hold 5 descending sigmas"),
    ],
)
def test_search_rejects_bad_arguments(kwargs, match):
    noise, x_T = _problem(2, seed=5)
    if kwargs.get("reference") == "tensor":
        kwargs["reference"] = x_T
    with pytest.raises(ValueError, match=match):
        samplers.tune_schedule(GAUSSIAN.denoiser, noise, NS, sampler="olss", num_steps=4, **kwargs)


def _olss_record(coefficients, num_steps=4, sampler="olss"):
    sigmas = [14.6, 3.0, 1.1, 0.3, 0.0][-(num_steps + 1):]
    return {"sampler": sampler, "num_steps": num_steps, "sigmas": sigmas, "timesteps": [999.0] * num_steps,
            "coefficients": coefficients}


FITTED = [[0.2, 0.8], [0.37, -0.3, 0.95], [0.4, 0.1, -0.2, 0.72], [0.0, 0.1, 0.9]]


@pytest.mark.parametrize(
    "record, match",
    [
        (_olss_record(FITTED[:3]), "fitted for 3 steps, not num_steps=4"),
        (_olss_record(FITTED, sampler="dpmpp_2m"), "only the sampler 'olss' runs"),
        (_olss_record([[0.2, 0.8, 0.1]] + FITTED[1:]), "row 0 must hold a and 1 to 1 output weights"),
        (_olss_record([[0.2, "x"]] + FITTED[1:]), "row 0 must hold finite numbers"),
    ],
)
def test_bad_coefficient_files_raise(tmp_path, record, match):
    (tmp_path / "bad.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match=match) as error:
        samplers.load_tuned_schedule(tmp_path / "bad.json")
    assert "bad.json" in str(error.value)


def test_make_scheduler_checks_coefficients_and_the_file_sampler(tmp_path):
    samplers.TunedSchedule(**_olss_record(FITTED)).save(tmp_path / "tuned_schedules" / "olss-4.json")
    samplers.TunedSchedule(**{**_olss_record(None), "sampler": "dpmpp_2m"}).save(
        tmp_path / "tuned_schedules" / "dpmpp_2m-4.json")
    with pytest.raises(ValueError, match="sampler 'dpmpp_2m' cannot run tuned schedule 'olss-4'"):
        samplers.make_scheduler("dpmpp_2m", schedule="tuned", tuned="olss-4", model_dir=tmp_path)
    with pytest.raises(ValueError, match="sampler 'olss' cannot run tuned schedule 'dpmpp_2m-4'.*without coefficients"):
        samplers.make_scheduler("olss", schedule="tuned", tuned="dpmpp_2m-4", model_dir=tmp_path)
    with pytest.raises(ValueError, match="num_steps=5 disagrees with the tuned schedule's 4 steps"):
        samplers.make_scheduler("olss", num_steps=5, schedule="tuned", tuned="olss-4", model_dir=tmp_path)
    with pytest.raises(ValueError, match="fitted for 4 steps, not num_steps=3"):
        samplers.make_scheduler("olss", num_steps=3, schedule="explicit", sigmas=[14.6, 1.0, 0.3, 0.0],
                                coefficients=FITTED)
    with pytest.raises(ValueError, match="option 'coefficients' is not supported by sampler 'dpmpp_2m'"):
        samplers.make_scheduler("dpmpp_2m", coefficients=FITTED)
    with pytest.raises(ValueError, match="'olss' has no diffusers equivalent"):
        samplers.make_scheduler("olss", backend="diffusers")
    # a schedule of another length, given at set_timesteps or at the pipeline call
    scheduler = samplers.make_scheduler("olss", coefficients=FITTED)
    with pytest.raises(ValueError, match="fitted for 4 steps, but the schedule has 6 steps"):
        scheduler.set_timesteps(6)


def test_adapter_in_txt2img_img2img_and_accelerate(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    base = pipe.scheduler
    sigmas = [14.6, 3.0, 1.1, 0.3, 0.0]
    samplers.TunedSchedule(**_olss_record(FITTED)).save(tmp_path / "tuned_schedules" / "olss-4.json")

    def image(name, **options):
        pipe.scheduler = samplers.make_scheduler(name, base=base, **options)
        return run(pipe, steps=4, height=16, width=16)

    explicit = dict(schedule="explicit", sigmas=sigmas)
    by_name = image("olss", schedule="tuned", tuned="olss-4", model_dir=tmp_path)
    assert abs(by_name - image("olss", coefficients=FITTED, **explicit)).max() < 1e-6
    plain = image("dpmpp_2m", **explicit)
    assert abs(image("olss", **explicit) - plain).max() < 1e-6  # the default coefficients are 2M's
    assert abs(by_name - plain).max() > 1e-3
    with pytest.raises(ValueError, match="num_inference_steps=4, not 6"):
        pipe.scheduler = samplers.make_scheduler("olss", base=base, schedule="tuned", tuned="olss-4",
                                                 model_dir=tmp_path)
        run(pipe, steps=6, height=16, width=16)

    # through accelerate's sampler entry, and restored
    pipe.scheduler = base
    config = AccelConfig(sampler=SamplerConfig("olss", schedule="tuned",
                                               options={"tuned": "olss-4", "model_dir": str(tmp_path)}))
    accel.accelerate(pipe, config)
    assert abs(run(pipe, steps=4, height=16, width=16) - by_name).max() < 1e-6
    accel.restore(pipe)
    assert pipe.scheduler is base

    # img2img, strength 0.5: the last 2 fitted rows; the first of them combines an output from before the
    # start, so that step is DPM-Solver++(2M)'s first-order one
    i2i = StableDiffusionImg2ImgPipeline(**pipe.components)
    i2i.set_progress_bar_config(disable=True)
    init = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16).sin()

    def img2img(name, **options):
        i2i.scheduler = samplers.make_scheduler(name, base=base, **options)
        return run(i2i, steps=4, image=init, strength=0.5, height=None, width=None)

    partial = img2img("olss", schedule="tuned", tuned="olss-4", model_dir=tmp_path)
    assert abs(img2img("olss", **explicit) - img2img("dpmpp_2m", **explicit)).max() < 1e-6
    assert abs(partial - img2img("dpmpp_2m", **explicit)).max() > 1e-4


def test_a_run_started_part_way_takes_the_last_rows():
    _, x = _problem(2, seed=6)
    sigmas = torch.tensor([14.6, 3.0, 1.1, 0.3, 0.0], dtype=torch.float64)
    out = drive(olss_steps(x, sigmas[2:], FITTED, begin=False), GAUSSIAN.denoiser, x, disable=True)
    s_in = x.new_ones([x.shape[0]])
    d2 = GAUSSIAN.denoiser(x, 1.1 * s_in)
    x3 = (0.3 / 1.1) * x - math.expm1(math.log(0.3) - math.log(1.1)) * d2  # 2M's first step from 1.1
    d3 = GAUSSIAN.denoiser(x3, 0.3 * s_in)
    assert (out - (FITTED[3][0] * x3 + FITTED[3][1] * d2 + FITTED[3][2] * d3)).abs().max() < 1e-12
    with pytest.raises(ValueError, match="fitted for 4 steps, but the schedule has 2 steps"):
        drive(olss_steps(x, sigmas[2:], FITTED), GAUSSIAN.denoiser, x, disable=True)


@pytest.mark.parametrize("name", sorted(p.stem for p in (EMBEDDED_MODEL_DIR / "tuned_schedules").glob("*.json")))
def test_schedules_shipped_with_the_embedded_model_build_their_schedulers(name):
    """Every file under the embedded model's tuned_schedules/ loads by name and drives its own sampler."""
    from diffusers import DPMSolverMultistepScheduler

    tuned = samplers.load_tuned_schedule(name, EMBEDDED_MODEL_DIR)
    base = DPMSolverMultistepScheduler.from_pretrained(EMBEDDED_MODEL_DIR, subfolder="scheduler")
    scheduler = samplers.make_scheduler(tuned.sampler, num_steps=tuned.num_steps, schedule="tuned", base=base,
                                        tuned=name, model_dir=EMBEDDED_MODEL_DIR)
    scheduler.set_timesteps(tuned.num_steps)
    assert len(scheduler.timesteps) == tuned.num_steps
    assert (tuned.coefficients is not None) == (tuned.sampler == "olss")
