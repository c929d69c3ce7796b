"""Tuned schedules: the search's objectives and per-step orders (S^3), the JSON record, and the
scheduler honouring what was searched. Gaussian data (exact denoiser in closed form) and a tiny
random pipeline, on CPU."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler

import samplers
from samplers.denoiser import NoiseSchedule
from tiny import GaussianData, run, tiny_sd_pipeline

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
GAUSSIAN = GaussianData(32, seed=3)
MU, SD_DATA, gaussian_denoiser = GAUSSIAN.mu, GAUSSIAN.sd, GAUSSIAN.denoiser


def _problem(batch, seed):
    ns = NoiseSchedule.from_config(DDIMScheduler(**SD).config)
    noise, x_T = GAUSSIAN.start(batch, seed, ns.sigma_max)
    return ns, noise, x_T, GAUSSIAN.exact(x_T, 0.0, ns.sigma_max)


def _psnr_loss(out, exact):
    return float((10 * torch.log10((out - exact).square().mean(1))).mean())


def test_unipc_per_step_orders():
    ns, _, x_T, _ = _problem(2, seed=0)
    sigmas = samplers.get_sigmas("karras", 5, ns)

    def run(**options):
        return samplers.sample("unipc_bh2", gaussian_denoiser, x_T, sigmas, disable=True, **options)

    # the orders the sampler picks itself (order 2, lower order at the start and the end)
    assert torch.equal(run(orders=[1, 2, 2, 2, 1]), run(order=2))
    assert torch.equal(run(orders=[1] * 5), run(order=1))
    assert not torch.allclose(run(orders=[1, 2, 3, 3, 1]), run(order=2), rtol=0, atol=1e-9)
    # a run that starts part-way (img2img) takes the orders of the schedule's last steps
    tail = samplers.sample("unipc_bh2", gaussian_denoiser, x_T, sigmas[2:], disable=True, orders=[1, 1, 2, 3, 1])
    assert torch.equal(tail, samplers.sample("unipc_bh2", gaussian_denoiser, x_T, sigmas[2:], disable=True,
                                             orders=[2, 3, 1]))


@pytest.mark.parametrize(
    "options, match",
    [
        (dict(orders=[1, 2, 4, 2, 1]), "each one of 1, 2, 3"),
        (dict(orders=[1, 2, 2]), "3 per-step orders for num_steps=5"),
        (dict(orders=2), "must list one order per step"),
        (dict(orders=[1, True, 2, 2, 1]), "must list one order per step"),
    ],
)
def test_bad_per_step_orders(options, match):
    with pytest.raises(ValueError, match=match):
        samplers.make_scheduler("unipc_bh2", num_steps=5, **options)


def test_per_step_orders_only_for_samplers_that_take_them():
    with pytest.raises(ValueError, match="option 'orders' is not supported by sampler 'dpmpp_2m'"):
        samplers.make_scheduler("dpmpp_2m", num_steps=3, orders=[1, 2, 1])
    with pytest.raises(ValueError, match="not supported with backend='diffusers'"):
        samplers.make_scheduler("unipc_bh2", num_steps=3, orders=[1, 2, 1], backend="diffusers")


def test_search_with_psnr_objective_decode_and_orders():
    ns, noise, x_T, exact = _problem(6, seed=1)
    decoded = []

    def decode(y):  # a fixed linear "decoder": the distance is measured after it
        decoded.append(y.shape[0])
        return 0.5 * y[:, :16] - 0.25 * y[:, 16:]

    tuned = samplers.tune_schedule(gaussian_denoiser, noise, ns, sampler="unipc_bh2", num_steps=5, reference=exact,
                                   init_schedule=("linspace", "karras", "logsnr"), objective="psnr", decode=decode,
                                   space="image", search_orders=True, passes=4, sampler_options={"order": 2})
    assert decoded and len(decoded) == 1 + tuned.search_evaluations  # the reference once, each evaluation once
    assert tuned.objective == "psnr" and tuned.space == "image"
    assert len(tuned.orders) == 5 and tuned.orders[0] == 1 and tuned.orders[-1] == 1
    assert set(tuned.orders) <= {1, 2, 3}
    sigmas = torch.tensor(tuned.sigmas, dtype=torch.float64)
    out = samplers.sample("unipc_bh2", gaussian_denoiser, x_T, sigmas, disable=True, order=2, orders=tuned.orders)
    # the recorded loss is the mean over inputs of 10 log10 of each input's squared error, decoded
    assert tuned.loss_tuned == pytest.approx(_psnr_loss(decode(out), decode(exact)), abs=1e-9)
    assert tuned.loss_tuned < tuned.loss_init - 3  # dB
    # one search from each initial schedule: the best one wins
    single = {}
    for name in ("linspace", "karras", "logsnr"):
        single[name] = samplers.tune_schedule(gaussian_denoiser, noise, ns, sampler="unipc_bh2", num_steps=5,
                                              reference=exact, init_schedule=name, objective="psnr", decode=decode,
                                              search_orders=True, passes=4, sampler_options={"order": 2})
    assert tuned.init_schedule == min(single, key=lambda name: single[name].loss_tuned)
    assert tuned.loss_tuned == min(t.loss_tuned for t in single.values())
    run = samplers.sample("unipc_bh2", gaussian_denoiser, x_T, samplers.get_sigmas("linspace", 5, ns), disable=True)
    assert tuned.loss_init == pytest.approx(_psnr_loss(decode(run), decode(exact)), abs=1e-9)  # the first named


def test_psnr_objective_weighs_inputs_equally():
    """The pooled squared error and the mean log error pick different schedules when one input's
    error dominates the pool: the judge's per-image PSNR mean is the second."""
    ns, noise, _, _ = _problem(4, seed=2)
    sharp = (SD_DATA < 0.6).double()  # input 0 lies along the data's narrowest directions, 10x as far out
    noise = torch.cat([10 * noise[:1] * sharp, noise[1:] * (1 - sharp)])
    x_T = noise * math.sqrt(1 + ns.sigma_max**2)
    exact = MU + (x_T - MU) * (SD_DATA**2 / (SD_DATA**2 + ns.sigma_max**2)).sqrt()
    kwargs = dict(sampler="dpmpp_2m", num_steps=4, reference=exact, init_schedule=("linspace", "karras"))
    by_mse = samplers.tune_schedule(gaussian_denoiser, noise, ns, objective="mse", **kwargs)
    by_psnr = samplers.tune_schedule(gaussian_denoiser, noise, ns, objective="psnr", **kwargs)

    def losses(sigmas):
        out = samplers.sample("dpmpp_2m", gaussian_denoiser, x_T, torch.tensor(sigmas, dtype=torch.float64),
                              disable=True)
        return 10 * math.log10(float((out - exact).square().mean())), _psnr_loss(out, exact)

    assert losses(by_mse.sigmas)[0] < losses(by_psnr.sigmas)[0] - 0.1  # dB
    assert losses(by_psnr.sigmas)[1] < losses(by_mse.sigmas)[1] - 0.1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(objective="ssim"), "objective='ssim' is not supported; valid choices: \\('mse', 'psnr'\\)"),
        (dict(space="pixels"), "space='pixels' is not supported; valid choices"),
        (dict(search_orders=True), "sampler 'dpmpp_2m' takes no per-step orders; .*'unipc_bh2'"),
        (dict(init_schedule=()), "at least one schedule"),
        (dict(sampler="unipc_bh2", sampler_options={"orders": [1, 2, 1]}, num_steps=3), "leave it out"),
        (dict(num_steps=1), "at least 2"),
    ],
)
def test_search_rejects_bad_arguments(kwargs, match):
    ns, noise, _, exact = _problem(2, seed=3)
    with pytest.raises(ValueError, match=match):
        samplers.tune_schedule(gaussian_denoiser, noise, ns, reference=exact, **{"num_steps": 4, **kwargs})


def _record(**fields):
    fields = {"num_steps": 3, "sigmas": [14.6, 2.0, 0.3, 0.0], "timesteps": [999.0, 700.0, 300.0], **fields}
    return samplers.TunedSchedule(sampler="unipc_bh2", **fields)


def test_json_round_trip_and_files_without_the_new_fields(tmp_path):
    tuned = _record(orders=[1, 3, 1], objective="psnr", space="image", sampler_options={"order": 2}, loss_init=-20.5,
                    loss_tuned=-22.25, calibration_inputs=40)
    path = samplers.save_tuned_schedule(tuned, tmp_path, "u3")
    assert json.loads(path.read_text())["orders"] == [1, 3, 1]
    assert samplers.load_tuned_schedule("u3", tmp_path) == tuned
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("orders", "objective", "space")}
    (tmp_path / "old.json").write_text(json.dumps(old))
    loaded = samplers.TunedSchedule.load(tmp_path / "old.json")
    assert loaded.orders is None and loaded.objective == "mse" and loaded.space == "latent"


def test_scheduler_honours_the_searched_orders_and_options(tmp_path):
    pipe = tiny_sd_pipeline(tmp_path)
    sigmas = [14.6, 3.0, 1.1, 0.3, 0.0]
    samplers.save_tuned_schedule(_record(num_steps=4, sigmas=sigmas, timesteps=[999.0, 800.0, 600.0, 300.0],
                                         orders=[1, 3, 1, 1], sampler_options={"use_corrector": False}), tmp_path, "u4")
    base = pipe.scheduler

    def image(name, **options):
        pipe.scheduler = samplers.make_scheduler(name, base=base, **options)
        return run(pipe, steps=4, height=16, width=16)

    tuned = dict(schedule="tuned", tuned="u4", model_dir=tmp_path)
    explicit = dict(schedule="explicit", sigmas=sigmas)
    by_name = image("unipc_bh2", **tuned)
    assert abs(by_name - image("unipc_bh2", orders=[1, 3, 1, 1], use_corrector=False, **explicit)).max() < 1e-6
    assert abs(by_name - image("unipc_bh2", **explicit)).max() > 1e-4  # the orders and options change the image
    # options given to make_scheduler win over the searched ones
    overridden = image("unipc_bh2", orders=[1, 2, 2, 1], use_corrector=True, **tuned)
    assert abs(overridden - image("unipc_bh2", orders=[1, 2, 2, 1], **explicit)).max() < 1e-6
    # another sampler on the same sigmas takes none of them (UniPC's orders mean nothing to it)
    assert abs(image("dpmpp_2m", **tuned) - image("dpmpp_2m", **explicit)).max() < 1e-6
