"""samplers/ on flow-matching models (samplers.flow): each flow sampler against the matching diffusers
scheduler on a tiny SD3 transformer with the same sigmas (float32 and float64), the flow schedules (static
and dynamic shift, the pipeline's own sigmas), the adapter and SamplerConfig in SD3, Flux and Sana pipelines,
tuned schedules and OLSS fitted on an analytic flow problem, and what is refused. CPU, tiny random models.

diffusers' flow DPM-Solver and UniPC cast their timesteps to int64, so in a pipeline their model sees
floor(1000 s) while their solver steps from s; the references here feed 1000 s, as
FlowMatchEulerDiscreteScheduler does, so that only the solvers' maths are compared.
"""

from __future__ import annotations

import copy
import json
import math

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    SD3Transformer2DModel,
    StableDiffusion3Img2ImgPipeline,
    UniPCMultistepScheduler,
)

import accel
import samplers
from accel import AccelConfig, SamplerConfig
from samplers.flow import FlowDenoiser, FlowSchedule
from samplers.olss import ReferenceTrajectory, fit_olss_coefficients, half_log_snr, signal_scales
from tiny import FlowGaussianData, run, tiny_flux_pipeline, tiny_sana_inputs, tiny_sana_pipeline, tiny_sd3_pipeline

TOL = 1e-4
FLOW = dict(use_flow_sigmas=True, prediction_type="flow_prediction")


def _exact_timesteps(cls):
    """`cls` feeding its model `sigma * 1000` (float) instead of the int64 timesteps it keeps."""

    def set_timesteps(self, *args, **kwargs):
        cls.set_timesteps(self, *args, **kwargs)
        self.timesteps = self.sigmas[:-1].to(self.timesteps.device) * self.config.num_train_timesteps

    return type(f"Exact{cls.__name__}", (cls,), {"set_timesteps": set_timesteps})


ExactDPMSolver = _exact_timesteps(DPMSolverMultistepScheduler)
ExactUniPC = _exact_timesteps(UniPCMultistepScheduler)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=32, out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    g = torch.Generator().manual_seed(1)
    cond = {"encoder_hidden_states": torch.randn(1, 5, 32, generator=g),
            "pooled_projections": torch.randn(1, 32, generator=g)}
    noise = torch.randn(1, 4, 8, 8, generator=g)
    return {torch.float32: (transformer, cond, noise),
            torch.float64: (copy.deepcopy(transformer).double(), {k: v.double() for k, v in cond.items()},
                            noise.double())}


def _diffusers_loop(scheduler, transformer, cond, noise):
    """Model inputs and final sample of a plain loop; the model gets the timestep of the sigma the solver
    steps from (FlowMatch schedulers: their timesteps; DPM-Solver / UniPC: 1000 times their sigma)."""
    exact = isinstance(scheduler, (FlowMatchEulerDiscreteScheduler, FlowMatchHeunDiscreteScheduler,
                                   samplers.FlowSamplerScheduler))
    xs, x = [], noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            xs.append(x)
            index = scheduler.step_index or 0
            timestep = t if exact else scheduler.sigmas[index] * scheduler.config.num_train_timesteps
            v = transformer(hidden_states=x, timestep=timestep.float().reshape(1), **cond, return_dict=False)[0]
            x = scheduler.step(v, t, x).prev_sample.to(noise.dtype)
    return xs, x


# (case, diffusers scheduler, set_timesteps arguments, our sampler, our options)
AGREEMENT_CASES = [
    ("euler", lambda: FlowMatchEulerDiscreteScheduler(shift=3.0), {}, "euler", {}),
    ("euler_mu", lambda: FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True), {"mu": 0.9}, "euler", {}),
    ("heun", lambda: FlowMatchHeunDiscreteScheduler(shift=2.0), {}, "heun", {}),
    ("dpmpp_2m", lambda: DPMSolverMultistepScheduler(**FLOW, flow_shift=3.0), {}, "dpmpp_2m", {}),
    ("dpmpp_2m_heun", lambda: DPMSolverMultistepScheduler(**FLOW, flow_shift=3.0, solver_type="heun"), {}, "dpmpp_2m",
     {"solver_type": "heun"}),
    ("dpmpp_2m_mu", lambda: DPMSolverMultistepScheduler(**FLOW, use_dynamic_shifting=True), {"mu": 1.1}, "dpmpp_2m",
     {}),
    ("dpmpp_3m", lambda: DPMSolverMultistepScheduler(**FLOW, flow_shift=3.0, solver_order=3), {}, "dpmpp_3m",
     {"diffusers_3m": True}),
    # diffusers' last bh1 step into sigma 0 is NaN (B(h) = h is infinite there): the model inputs are compared
    ("unipc_bh1", lambda: UniPCMultistepScheduler(**FLOW, flow_shift=3.0, solver_type="bh1"), {}, "unipc_bh1", {}),
    ("unipc_bh2", lambda: UniPCMultistepScheduler(**FLOW, flow_shift=3.0), {}, "unipc_bh2", {}),
    ("unipc_bh2_order3", lambda: UniPCMultistepScheduler(**FLOW, flow_shift=3.0, solver_order=3), {}, "unipc_bh2",
     {"order": 3}),
    # the pipeline's own sigma list (Flux's linspace(1, 1/n, n)) with the dynamic shift: UniPC moves sigma 1 to
    # 1 - 1e-6, and so do we
    ("unipc_bh2_flux_sigmas", lambda: UniPCMultistepScheduler(**FLOW, use_dynamic_shifting=True),
     {"sigmas": np.linspace(1.0, 1 / 6, 6), "mu": 0.7}, "unipc_bh2", {}),
    ("euler_flux_sigmas", lambda: FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
     {"sigmas": np.linspace(1.0, 1 / 6, 6), "mu": 0.7}, "euler", {}),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("case,make,kwargs,name,options", AGREEMENT_CASES, ids=[c[0] for c in AGREEMENT_CASES])
def test_pure_flow_sampler_agrees_with_diffusers(case, make, kwargs, name, options, dtype, model):
    transformer, cond, noise = model[dtype]
    scheduler = make()
    scheduler.set_timesteps(None if "sigmas" in kwargs else 6, **kwargs)
    sigmas = torch.unique_consecutive(scheduler.sigmas.double())
    ref_xs, ref = _diffusers_loop(scheduler, transformer, cond, noise)
    xs = []
    with torch.no_grad():
        out = samplers.sample(name, FlowDenoiser(transformer), noise, sigmas, flow=True, extra_args=cond, disable=True,
                              callback=lambda d: xs.append(d["x"]), **options)
    assert len(xs) == len(ref_xs), "the two loops must call the model as often"
    for i, (ours, theirs) in enumerate(zip(xs, ref_xs)):
        assert (ours - theirs).abs().max() < TOL, f"model input {i} differs"
    assert ref_xs[-1].abs().max() > 1.0  # a non-trivial comparison
    if name == "unipc_bh1":
        assert torch.isnan(ref).all() and torch.isfinite(out).all()  # ours ends on the last x0, the limit
        return
    assert (out - ref).abs().max() < TOL


def test_flow_schedules_are_the_schedulers_own():
    """Static shift, dynamic shift (exponential, linear), shift_terminal, the pipeline's sigmas; the default
    sigmas of each sampler are those of diffusers' scheduler of its kind (FlowMatch, DPM-Solver and UniPC
    with use_flow_sigmas), on the base scheduler's shift, whichever kind the base is."""
    euler_mu = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)
    cases = [
        ("euler", FlowMatchEulerDiscreteScheduler(shift=3.0), None, {}),
        ("euler", euler_mu, None, {"mu": 1.3}),
        ("euler", FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, time_shift_type="linear"), None,
         {"mu": 0.6}),
        ("euler", FlowMatchEulerDiscreteScheduler(shift=2.0, shift_terminal=0.1), None, {}),
        ("dpmpp_2m", euler_mu, None, {"mu": 0.8, "sigmas": np.linspace(1, 0.2, 5)}),  # Flux passes its own
        ("heun", FlowMatchHeunDiscreteScheduler(shift=3.0), None, {}),
        ("dpmpp_2m", DPMSolverMultistepScheduler(**FLOW, flow_shift=3.0), None, {}),
        ("olss", DPMSolverMultistepScheduler(**FLOW, use_dynamic_shifting=True), None, {"mu": 0.9}),
        ("unipc_bh1", UniPCMultistepScheduler(**FLOW, flow_shift=2.0), None, {}),
        ("dpmpp_3m", FlowMatchEulerDiscreteScheduler(shift=3.0), DPMSolverMultistepScheduler(**FLOW, flow_shift=3.0),
         {}),
        ("unipc_bh2", euler_mu, UniPCMultistepScheduler(**FLOW, use_dynamic_shifting=True), {"mu": 0.5}),
        ("pndm", DPMSolverMultistepScheduler(**FLOW, flow_shift=2.0), FlowMatchEulerDiscreteScheduler(shift=2.0), {}),
    ]
    for name, base, reference, kwargs in cases:
        reference = reference or copy.deepcopy(base)
        reference.set_timesteps(None if "sigmas" in kwargs else 5, **kwargs)
        ours = samplers.make_scheduler(name, base=base)
        assert isinstance(ours, samplers.FlowSamplerScheduler)
        ours.set_timesteps(None if "sigmas" in kwargs else 5, **kwargs)
        expected = torch.unique_consecutive(reference.sigmas.double())
        if isinstance(reference, UniPCMultistepScheduler):
            expected[0] = 1.0  # diffusers' UniPC moves sigma 1 down by 1e-6; our UniPC does it, not the schedule
        assert torch.allclose(ours.sigmas.double(), expected, atol=1e-6, rtol=0), (name, type(base).__name__)
        assert torch.allclose(ours.timesteps[:1], ours.sigmas[:1] * 1000, rtol=1e-6)


def test_flow_samplers_converge_at_their_order_on_gaussian_data():
    data = FlowGaussianData(32, seed=0)

    def uniform_log_snr(n):  # away from sigma 0 and 1, so that the last step keeps the solver's order
        return torch.sigmoid(-torch.linspace(-4.0, 3.0, n + 1, dtype=torch.float64))

    def uniform_sigma(n):  # linear multistep in sigma
        return torch.linspace(0.95, 0.05, n + 1, dtype=torch.float64)

    def error(name, sigmas, **options):
        _, x = data.start(2, seed=1, sigma_max=float(sigmas[0]))
        out = samplers.sample(name, data.denoiser, x, sigmas, flow=True, disable=True, **options)
        return float((out - data.exact(x, float(sigmas[-1]), float(sigmas[0]))).abs().max())

    cases = [("euler", {}, 1, uniform_log_snr), ("ddim", {}, 1, uniform_log_snr), ("heun", {}, 2, uniform_log_snr),
             ("dpmpp_2m", {}, 2, uniform_log_snr), ("dpmpp_3m", {}, 3, uniform_log_snr),
             ("unipc_bh1", {"lower_order_final": False}, 3, uniform_log_snr),
             ("unipc_bh2", {"lower_order_final": False}, 3, uniform_log_snr), ("olss", {}, 2, uniform_log_snr),
             ("ipndm", {"order": 2}, 2, uniform_sigma), ("pndm", {}, 3, uniform_sigma)]
    for name, options, order, schedule in cases:
        coarse, fine = error(name, schedule(24), **options), error(name, schedule(48), **options)
        assert math.log2(coarse / fine) > order - 0.35, (name, math.log2(coarse / fine))


def test_flow_samplers_start_at_sigma_one():
    """From pure noise at s = 1 (FlowMatch's and Flux's schedules): the first step of every exponential
    integrator is DDIM's, x = s' * noise + (1 - s') * D, and DDIM there is flow Euler."""
    data = FlowGaussianData(16, seed=2)
    noise, x = data.start(3, seed=3)
    sigmas = FlowSchedule(shift=1.0).sigmas(8)
    exact = data.exact(x, 0.0)
    euler = samplers.sample("euler", data.denoiser, x, sigmas, flow=True, disable=True)
    assert (samplers.sample("ddim", data.denoiser, x, sigmas, flow=True, disable=True) - euler).abs().max() < 1e-12
    s1 = float(sigmas[1])
    first_step = s1 * x + (1 - s1) * data.denoiser(x, torch.ones(3, dtype=torch.float64))
    for name in ("dpmpp_2m", "dpmpp_3m", "olss", "unipc_bh2"):
        seen = []
        samplers.sample(name, data.denoiser, x, sigmas, flow=True, disable=True,
                        callback=lambda d: seen.append(d["x"]))
        tolerance = 1e-12 if name != "unipc_bh2" else 1e-4  # UniPC starts at 1 - 1e-6
        assert (seen[1] - first_step).abs().max() < tolerance, name
    for name in samplers.FLOW_SAMPLER_NAMES:  # and converge from there
        coarse, fine = (samplers.sample(name, data.denoiser, x, FlowSchedule().sigmas(n), flow=True, disable=True)
                        for n in (6, 48))
        assert torch.isfinite(fine).all() and (fine - exact).abs().max() < (coarse - exact).abs().max() / 5, name


# ---------------------------------------------------------------- the adapter
@pytest.mark.parametrize(
    "name,options,reference",
    [
        ("euler", {}, lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)),
        ("heun", {}, lambda: FlowMatchHeunDiscreteScheduler(shift=3.0)),
        ("dpmpp_2m", {}, lambda: DPMSolverMultistepScheduler(**FLOW, flow_shift=3.0)),
        ("dpmpp_3m", {"diffusers_3m": True}, lambda: DPMSolverMultistepScheduler(**FLOW, flow_shift=3.0, solver_order=3)),
        ("unipc_bh2", {}, lambda: UniPCMultistepScheduler(**FLOW, flow_shift=3.0)),
    ],
)
def test_adapter_agrees_with_diffusers_in_a_sampling_loop(name, options, reference, model):
    transformer, cond, noise = model[torch.float64]
    ref_scheduler = reference()
    ours = samplers.make_scheduler(name, base=ref_scheduler, **options)
    ref_scheduler.set_timesteps(7)
    ours.set_timesteps(7)
    assert ours.order == ref_scheduler.order and len(ours.timesteps) == len(ref_scheduler.timesteps)
    ref = _diffusers_loop(ref_scheduler, transformer, cond, noise)[1]
    out = _diffusers_loop(ours, transformer, cond, noise)[1]
    assert (out - ref).abs().max() < TOL and ref.abs().max() > 1.0


def _three_passes(pipe, baseline, config, **kwargs):
    """Baseline with `baseline` (the matching diffusers scheduler), `config` applied, restored."""
    pipe.scheduler = baseline
    before = run(pipe, steps=5, **kwargs)
    accel.accelerate(pipe, AccelConfig(sampler=config))
    assert isinstance(pipe.scheduler, samplers.FlowSamplerScheduler)
    ours = run(pipe, steps=5, **kwargs)
    accel.restore(pipe)
    assert pipe.scheduler is baseline and np.array_equal(run(pipe, steps=5, **kwargs), before)
    return before, ours


@pytest.mark.parametrize(
    "name,baseline",
    [
        ("euler", lambda: FlowMatchEulerDiscreteScheduler(shift=3.0)),
        ("euler", lambda: FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)),  # the pipeline's mu
        ("heun", lambda: FlowMatchHeunDiscreteScheduler(shift=3.0)),
        ("dpmpp_2m", lambda: ExactDPMSolver(**FLOW, flow_shift=3.0)),
        ("unipc_bh2", lambda: ExactUniPC(**FLOW, flow_shift=3.0)),
    ],
    ids=["euler", "euler_dynamic_shift", "heun", "dpmpp_2m", "unipc_bh2"],
)
def test_sampler_config_in_sd3_txt2img(name, baseline, tmp_path):
    pipe = tiny_sd3_pipeline(tmp_path, num_layers=2)
    before, ours = _three_passes(pipe, baseline(), SamplerConfig(name), guidance_scale=3.0)
    assert np.abs(ours - before).max() < TOL


def test_sampler_config_in_flux_txt2img_takes_the_pipelines_sigmas_and_mu(tmp_path):
    pipe = tiny_flux_pipeline(tmp_path)
    kwargs = dict(max_sequence_length=16, guidance_scale=3.0)
    before, ours = _three_passes(pipe, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                                 SamplerConfig("euler"), **kwargs)
    assert np.abs(ours - before).max() < TOL
    _, other = _three_passes(pipe, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                             SamplerConfig("dpmpp_2m"), **kwargs)
    assert np.isfinite(other).all() and np.abs(other - before).max() > 1e-3


def test_sampler_config_in_sd3_img2img(tmp_path):
    components = tiny_sd3_pipeline(tmp_path, num_layers=2).components
    pipe = StableDiffusion3Img2ImgPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    image = (torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32).sin() + 1) / 2
    kwargs = dict(image=image, strength=0.6, guidance_scale=3.0, height=None, width=None)
    for name, baseline in (("euler", FlowMatchEulerDiscreteScheduler(shift=3.0)),
                           ("heun", FlowMatchHeunDiscreteScheduler(shift=3.0))):
        before, ours = _three_passes(pipe, baseline, SamplerConfig(name), **kwargs)
        assert np.abs(ours - before).max() < TOL, name
    # OLSS with its default coefficients is DPM-Solver++(2M), started part-way too
    _, two_m = _three_passes(pipe, FlowMatchEulerDiscreteScheduler(shift=3.0), SamplerConfig("dpmpp_2m"), **kwargs)
    _, olss = _three_passes(pipe, FlowMatchEulerDiscreteScheduler(shift=3.0), SamplerConfig("olss"), **kwargs)
    assert np.abs(olss - two_m).max() < 1e-5 and np.abs(two_m - before).max() > 1e-3


def test_sampler_config_in_flux_img2img(tmp_path):
    from diffusers import FluxImg2ImgPipeline

    pipe = FluxImg2ImgPipeline(**tiny_flux_pipeline(tmp_path).components)
    pipe.set_progress_bar_config(disable=True)
    image = (torch.linspace(-1, 1, 3 * 32 * 32).reshape(1, 3, 32, 32).sin() + 1) / 2
    kwargs = dict(image=image, strength=0.6, max_sequence_length=16, guidance_scale=3.0, height=32, width=32)
    before, ours = _three_passes(pipe, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                                 SamplerConfig("euler"), **kwargs)
    assert np.abs(ours - before).max() < TOL
    _, other = _three_passes(pipe, FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True),
                             SamplerConfig("unipc_bh2"), **kwargs)
    assert np.isfinite(other).all() and np.abs(other - before).max() > 1e-3


def test_sampler_config_in_pixart_sigma_takes_the_betas_samplers(tmp_path):
    """PixArt-Sigma runs a betas (VP) schedule, not flow matching: SamplerConfig gives it the betas samplers, which
    agree with the diffusers scheduler it ships with, and restore gives that one back."""
    from diffusers import PixArtSigmaPipeline

    from tiny import tiny_pixart_pipeline

    pipe = tiny_pixart_pipeline(tmp_path, pipeline_class=PixArtSigmaPipeline)
    kwargs = dict(use_resolution_binning=False, clean_caption=False, guidance_scale=3.0)
    baseline = pipe.scheduler
    before = run(pipe, steps=5, **kwargs)
    accel.accelerate(pipe, AccelConfig(sampler=SamplerConfig("dpmpp_2m")))
    assert isinstance(pipe.scheduler, samplers.SamplerScheduler)
    ours = run(pipe, steps=5, **kwargs)
    accel.restore(pipe)
    assert pipe.scheduler is baseline and np.array_equal(run(pipe, steps=5, **kwargs), before)
    assert np.abs(ours - before).max() < 1e-3


def test_sampler_config_in_sana_txt2img():
    pipe = tiny_sana_pipeline(num_layers=2, scheduler=ExactDPMSolver(**FLOW, flow_shift=3.0))
    kwargs = tiny_sana_inputs()
    before, ours = _three_passes(pipe, pipe.scheduler, SamplerConfig("dpmpp_2m"), **kwargs)
    assert np.abs(ours - before).max() < TOL


def test_flow_adapter_config_round_trip_and_diffusers_backend(tmp_path):
    base = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_shift=0.4)
    scheduler = samplers.make_scheduler("unipc_bh2", num_steps=6, base=base, order=3)
    scheduler.save_pretrained(tmp_path)
    loaded = samplers.FlowSamplerScheduler.from_pretrained(tmp_path)
    assert dict(loaded.config) == dict(scheduler.config) and loaded.config.use_dynamic_shifting
    assert loaded.config.base_shift == 0.4 and loaded.config.sampler_options == {"order": 3}
    scheduler.set_timesteps(None, mu=0.5)
    loaded.set_timesteps(None, mu=0.5)
    assert len(scheduler.timesteps) == 6 and torch.equal(scheduler.timesteps, loaded.timesteps)
    with pytest.raises(ValueError, match="mu must be passed"):
        scheduler.set_timesteps(6)
    theirs = samplers.make_scheduler("dpmpp_2m", base=FlowMatchEulerDiscreteScheduler(shift=3.0), backend="diffusers")
    assert isinstance(theirs, DPMSolverMultistepScheduler) and theirs.config.use_flow_sigmas
    assert theirs.config.flow_shift == 3.0 and theirs.config.prediction_type == "flow_prediction"
    heun = samplers.make_scheduler("heun", base=DPMSolverMultistepScheduler(**FLOW, flow_shift=2.0), backend="diffusers")
    assert isinstance(heun, FlowMatchHeunDiscreteScheduler) and heun.config.shift == 2.0


# ---------------------------------------------------------------- tuned schedules and OLSS on a flow model
GAUSSIAN = FlowGaussianData(32, seed=4)
SCHEDULE = FlowSchedule(shift=3.0)


def test_olss_fit_beats_flow_euler_at_5_steps():
    _, x_cal = GAUSSIAN.start(8, seed=5)
    _, x_held = GAUSSIAN.start(8, seed=6)
    sigmas = SCHEDULE.sigmas(5)
    reference = ReferenceTrajectory.solve(GAUSSIAN.denoiser, x_cal, SCHEDULE.sigmas(200), flow=True)
    assert (reference.final - GAUSSIAN.exact(x_cal, 0.0)).abs().max() < 1e-2
    assert (reference.at(0.5) - GAUSSIAN.exact(x_cal, 0.5)).abs().max() < 1e-3
    fit = fit_olss_coefficients(GAUSSIAN.denoiser, x_cal, sigmas, reference)

    def held_mse(name, **options):
        out = samplers.sample(name, GAUSSIAN.denoiser, x_held, sigmas, flow=True, disable=True, **options)
        return float((out - GAUSSIAN.exact(x_held, 0.0)).square().mean())

    gain_db = 10 * math.log10(held_mse("euler") / held_mse("olss", coefficients=fit.coefficients))
    assert gain_db > 3.0
    # the default coefficients are DPM-Solver++(2M)'s in the flow form
    assert held_mse("olss") == pytest.approx(held_mse("dpmpp_2m"), rel=1e-12)


def test_reference_reads_a_sigma_one_rounding_step_below_its_grid_point():
    # A searched schedule can put a sigma within float rounding of a reference grid point, where the half log-SNR
    # of the two is the same float (the first GPU search at 8 steps divided by zero there).
    _, x_cal = GAUSSIAN.start(4, seed=5)
    sigmas = SCHEDULE.sigmas(200)
    reference = ReferenceTrajectory.solve(GAUSSIAN.denoiser, x_cal, sigmas, flow=True)
    below = [float(np.nextafter(s, 0)) for s in reference.sigmas]

    def lam(sigma):
        return half_log_snr(signal_scales([sigma], True)[0], sigma)

    k = next(j for j in range(1, len(sigmas) - 1) if lam(below[j]) == lam(reference.sigmas[j]))
    assert torch.equal(reference.at(below[k]), reference.states[k])


def test_tuned_flow_files_are_reused_by_name_and_never_cross_forms(tmp_path):
    noise, _ = GAUSSIAN.start(6, seed=7)
    tuned = samplers.tune_schedule(GAUSSIAN.denoiser, noise, SCHEDULE, sampler="olss", num_steps=4, passes=2,
                                   reference_steps=100, objective="psnr")
    # OLSS's default sigmas are DPM-Solver's with use_flow_sigmas, whose first is shifted 1 - 1/1000
    assert tuned.form == "flow" and tuned.sigmas[0] == pytest.approx(3 * 0.999 / (1 + 2 * 0.999)) and tuned.sigmas[-1] == 0
    assert tuned.loss_tuned < tuned.loss_init and tuned.reference == "dpmpp_2m x 100 default steps"
    assert tuned.timesteps == pytest.approx([s * 1000 for s in tuned.sigmas[:-1]])
    samplers.save_tuned_schedule(tuned, tmp_path, "olss-4")
    assert json.loads((tmp_path / "tuned_schedules" / "olss-4.json").read_text())["form"] == "flow"
    base = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler = samplers.make_scheduler("olss", schedule="tuned", tuned="olss-4", model_dir=tmp_path, base=base)
    scheduler.set_timesteps(4)
    assert torch.allclose(scheduler.sigmas.double(), torch.tensor(tuned.sigmas, dtype=torch.float64), rtol=1e-6)
    # the adapter runs the fitted rows, whose final samples are the searched loss away from the reference
    pure = samplers.sample("olss", GAUSSIAN.denoiser, noise, torch.tensor(tuned.sigmas, dtype=torch.float64),
                           flow=True, disable=True, coefficients=tuned.coefficients)
    reference_sigmas = SCHEDULE.with_spacing("dpm_solver").sigmas(100)  # the reference runs on the sampler's sigmas
    reference = samplers.sample("dpmpp_2m", GAUSSIAN.denoiser, noise, reference_sigmas, flow=True, disable=True)
    loss = float((10 * torch.log10((pure - reference).square().mean(1))).mean())
    assert loss == pytest.approx(tuned.loss_tuned, abs=1e-9)
    x = noise
    for t, s in zip(scheduler.timesteps, tuned.sigmas):
        s = torch.full((6,), s, dtype=torch.float64)
        x = scheduler.step((x - GAUSSIAN.denoiser(x, s)) / s[:, None], t, x).prev_sample
    assert (x - pure).abs().max() < 1e-12
    with pytest.raises(ValueError, match="fitted on a flow-matching model.*is a betas schedule"):
        samplers.make_scheduler("olss", schedule="tuned", tuned="olss-4", model_dir=tmp_path, base=DDIMScheduler())
    ve = samplers.TunedSchedule(sampler="dpmpp_2m", num_steps=2, sigmas=[14.6, 1.0, 0.0], timesteps=[999.0, 500.0])
    samplers.save_tuned_schedule(ve, tmp_path, "dpmpp_2m-2")
    with pytest.raises(ValueError, match="fitted on a betas model.*ve form.*is flow-matching"):
        samplers.make_scheduler("dpmpp_2m", schedule="tuned", tuned="dpmpp_2m-2", model_dir=tmp_path, base=base)


def test_tune_pipeline_schedule_on_a_tiny_sd3_pipeline(tmp_path):
    pipe = tiny_sd3_pipeline(tmp_path, num_layers=2)
    pipe.scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    tuned = samplers.tune_pipeline_schedule(pipe, prompts=["a photo of a horse", "a cat"], num_steps=3,
                                            guidance_scale=3.0, height=32, width=32, reference_steps=12, passes=1,
                                            space="image")
    assert tuned.form == "flow" and tuned.loss_tuned <= tuned.loss_init and tuned.calibration_inputs == 2
    pipe.scheduler = samplers.make_scheduler("dpmpp_2m", schedule="tuned", tuned=tuned.save(tmp_path / "t.json"),
                                             base=pipe.scheduler)
    image = run(pipe, steps=3, guidance_scale=3.0)
    assert image.shape == (1, 32, 32, 3) and np.isfinite(image).all()


# ---------------------------------------------------------------- what is refused
@pytest.mark.parametrize(
    "name,options,match",
    [
        ("deis", {}, "sampler 'deis' does not run on a flow-matching schedule: DEIS integrates"),
        ("dpm_solver_2m", {}, "noise prediction divides by alpha"),
        ("dpmpp_2s", {}, "singlestep"),
        ("dpmpp_2m_sde", {}, "VE / VP SDE"),
        ("lcm", {}, "LCM-distilled"),
        ("ddim", {"eta": 0.5}, "eta > 0 draws the noise of a VP"),
        ("dpmpp_2m", {"schedule": "karras"}, "schedule 'karras' is defined on a betas schedule"),
        ("dpmpp_2m", {"thresholding": True}, r"options \['thresholding'\]"),
        ("dpmpp_2m", {"backend": "diffusers", "order": 2, "solver_type": "heun"}, None),
        ("olss", {"backend": "diffusers"}, "no diffusers equivalent on a flow-matching model"),
    ],
)
def test_what_does_not_apply_to_flow_models_is_refused(name, options, match):
    base = FlowMatchEulerDiscreteScheduler(shift=3.0)
    if match is None:  # the diffusers backend takes the options it maps
        assert samplers.make_scheduler(name, base=base, **options).config.solver_type == "heun"
        return
    with pytest.raises(ValueError, match=match):
        samplers.make_scheduler(name, base=base, **options)


def test_sampler_config_on_a_flow_pipeline_refuses_by_name_and_leaves_it_untouched(tmp_path):
    pipe = tiny_sd3_pipeline(tmp_path, num_layers=2)
    scheduler = pipe.scheduler
    with pytest.raises(ValueError, match="sampler 'deis' does not run on a flow-matching schedule"):
        accel.accelerate(pipe, AccelConfig(sampler=SamplerConfig("deis")))
    assert not accel.is_accelerated(pipe) and pipe.scheduler is scheduler
    pipe.scheduler = EDMEulerScheduler()
    with pytest.raises(accel.UnsupportedPipelineError, match="EDMEulerScheduler, which has neither"):
        accel.accelerate(pipe, AccelConfig(sampler=SamplerConfig("euler")))
