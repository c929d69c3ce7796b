"""samplers/: agreement with diffusers' schedulers, convergence order, the scheduler adapter in
real tiny pipelines, and argument validation. CPU only, tiny random components, no network."""

from __future__ import annotations

import inspect
import math
import warnings

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDIMScheduler,
    DEISMultistepScheduler,
    DPMSolverMultistepScheduler,
    DPMSolverSinglestepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    PNDMScheduler,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UniPCMultistepScheduler,
)

import samplers
from samplers.denoiser import NoiseSchedule, UNetDenoiser
from samplers.schedules import get_sigmas_exponential
from tiny import GaussianData

# One intra-op thread for the tiny models: tests/conftest.py sets it for the whole suite.

SD = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
TOL = 1e-4


def _tiny_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=32,
        norm_num_groups=32,
    ).eval()


@pytest.fixture(scope="module")
def unet64():
    return _tiny_unet().double()


@pytest.fixture(scope="module")
def cond64():
    g = torch.Generator().manual_seed(1)
    return {
        "encoder_hidden_states": torch.randn(1, 3, 32, generator=g, dtype=torch.float64),
        "noise": torch.randn(1, 4, 8, 8, generator=g, dtype=torch.float64),
    }


def _alpha(sigma):
    return (1 + sigma**2) ** -0.5


def _diffusers_run(scheduler, unet, ehs, noise, generator=None):
    """Inputs of every model call and the final sample of a plain diffusers sampling loop."""
    xs, x = [], noise * scheduler.init_noise_sigma
    accepts_generator = "generator" in inspect.signature(scheduler.step).parameters
    kwargs = {"generator": generator} if generator is not None and accepts_generator else {}
    with torch.no_grad():
        for t in scheduler.timesteps:
            xs.append(x)
            out = unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=ehs).sample
            x = scheduler.step(out, t, x, **kwargs).prev_sample
    return xs, x


def _sigmas_at(scheduler, timesteps, final):
    ac = scheduler.alphas_cumprod.double()
    return torch.tensor([((1 - ac[int(t)]) / ac[int(t)]).sqrt().item() for t in timesteps] + [final])


# (case, diffusers scheduler factory, our sampler name, our options)
AGREEMENT_CASES = [
    ("ddim", lambda: DDIMScheduler(**SD, set_alpha_to_one=True, steps_offset=1, clip_sample=False), "ddim", {}),
    ("euler", lambda: EulerDiscreteScheduler(**SD, timestep_spacing="trailing"), "euler", {}),
    ("heun", lambda: HeunDiscreteScheduler(**SD, timestep_spacing="trailing"), "heun", {}),
    ("dpmpp_2m", lambda: DPMSolverMultistepScheduler(**SD), "dpmpp_2m", {}),
    (
        "dpmpp_2m_heun",
        lambda: DPMSolverMultistepScheduler(**SD, solver_type="heun"),
        "dpmpp_2m",
        {"solver_type": "heun"},
    ),
    ("dpmpp_3m", lambda: DPMSolverMultistepScheduler(**SD, solver_order=3), "dpmpp_3m", {"diffusers_3m": True}),
    (
        "dpm_solver_2m",
        lambda: DPMSolverMultistepScheduler(**SD, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"),
        "dpm_solver_2m",
        {},
    ),
    (
        "dpm_solver_3m",
        lambda: DPMSolverMultistepScheduler(
            **SD, algorithm_type="dpmsolver", solver_order=3, final_sigmas_type="sigma_min"
        ),
        "dpm_solver_3m",
        {"diffusers_3m": True},
    ),
    ("dpmpp_2s", lambda: DPMSolverSinglestepScheduler(**SD), "dpmpp_2s", {}),
    (
        "dpm_solver_3",
        lambda: DPMSolverSinglestepScheduler(
            **SD, solver_order=3, algorithm_type="dpmsolver", final_sigmas_type="sigma_min"
        ),
        "dpm_solver_3",
        {"lower_order_final": False},
    ),
    (
        "unipc_bh1",
        lambda: UniPCMultistepScheduler(**SD, solver_type="bh1", final_sigmas_type="sigma_min"),
        "unipc_bh1",
        {},
    ),
    ("unipc_bh2_order3", lambda: UniPCMultistepScheduler(**SD, solver_order=3), "unipc_bh2", {"order": 3}),
    (
        "unipc_bh2_no_corrector",
        lambda: UniPCMultistepScheduler(**SD, disable_corrector=list(range(100))),
        "unipc_bh2",
        {"use_corrector": False},
    ),
    ("deis", lambda: DEISMultistepScheduler(**SD), "deis", {}),
    ("deis_order3", lambda: DEISMultistepScheduler(**SD, solver_order=3), "deis", {"order": 3}),
    ("pndm", lambda: PNDMScheduler(**SD, skip_prk_steps=True, set_alpha_to_one=True, steps_offset=1), "pndm", {}),
]


@pytest.mark.parametrize("case,make,name,options", AGREEMENT_CASES, ids=[c[0] for c in AGREEMENT_CASES])
def test_pure_sampler_agrees_with_diffusers(case, make, name, options, unet64, cond64):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        scheduler = make()
        scheduler.set_timesteps(5)
    ve = case in ("euler", "heun")  # diffusers' Euler/Heun keep the sample in VE scale
    if case in ("ddim", "pndm"):
        sigmas = _sigmas_at(scheduler, sorted(set(scheduler.timesteps.tolist()), reverse=True), 0.0)
    else:
        sigmas = torch.unique_consecutive(scheduler.sigmas.double())
    ehs, noise = cond64["encoder_hidden_states"], cond64["noise"]
    ref_xs, ref = _diffusers_run(scheduler, unet64, ehs, noise)

    xs = []
    x_start = noise * scheduler.init_noise_sigma if ve else noise / _alpha(float(sigmas[0]))
    with torch.no_grad():
        x = samplers.sample(
            name,
            UNetDenoiser(unet64, scheduler),
            x_start,
            sigmas,
            extra_args={"encoder_hidden_states": ehs},
            callback=lambda d: xs.append(d["x"] if ve else d["x"] * _alpha(d["sigma"])),
            disable=True,
            **options,
        )
    x = x if ve else x * _alpha(float(sigmas[-1]))
    assert len(xs) == len(ref_xs), "the two loops must call the model at the same timesteps"
    for i, (ours, theirs) in enumerate(zip(xs, ref_xs)):
        assert torch.allclose(ours, theirs, atol=TOL, rtol=0), f"model input {i} differs"
    assert torch.allclose(x, ref, atol=TOL, rtol=0)
    assert ref.abs().max() > 1.0  # a non-trivial comparison


# ---------------------------------------------------------------- convergence order
# Gaussian data N(mu, diag(sd^2)): the exact denoiser and the exact probability-flow ODE solution
# x(s) = mu + (x(s0) - mu) * sqrt((sd^2 + s^2) / (sd^2 + s0^2)) are known in closed form.
GAUSSIAN = GaussianData(64, seed=0)
MU, SD_DATA, gaussian_denoiser = GAUSSIAN.mu, GAUSSIAN.sd, GAUSSIAN.denoiser


def _final_error(name, sigmas, **options):
    s_max, s_min = float(sigmas[0]), float(sigmas[-1])
    x0 = MU + torch.randn(1, 64, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * (
        SD_DATA**2 + s_max**2
    ).sqrt()
    exact = MU + (x0 - MU) * ((SD_DATA**2 + s_min**2) / (SD_DATA**2 + s_max**2)).sqrt()
    x = samplers.sample(name, gaussian_denoiser, x0, sigmas, disable=True, **options)
    return (x - exact).abs().max().item()


def _exponential(n):
    # ends at sigma_min, not 0, so that the last step keeps the solver's order
    return get_sigmas_exponential(n, 0.05, 1000.0)[:-1]


def _uniform_sigma(n):
    return torch.linspace(3.0, 0.5, n + 1, dtype=torch.float64)


# (name, options, expected global order, schedule, step counts)
ORDER_CASES = [
    ("euler", {}, 1, _exponential, (24, 48)),
    ("ddim", {}, 1, _exponential, (24, 48)),
    ("heun", {}, 2, _exponential, (24, 48)),
    ("dpm_solver_1", {}, 1, _exponential, (24, 48)),
    ("dpm_solver_2", {}, 2, _exponential, (24, 48)),
    ("dpm_solver_3", {}, 3, _exponential, (48, 96)),
    ("dpm_solver_2m", {}, 2, _exponential, (24, 48)),
    ("dpm_solver_3m", {}, 3, _exponential, (24, 48)),
    ("dpmpp_2m", {}, 2, _exponential, (48, 96)),
    ("dpmpp_3m", {}, 3, _exponential, (24, 48)),
    ("dpmpp_2s", {}, 2, _exponential, (48, 96)),
    ("dpmpp_2m_sde", {"eta": 0.0}, 2, _exponential, (48, 96)),
    # UniC raises UniP-p to order p + 1
    ("unipc_bh1", {"order": 1, "lower_order_final": False}, 2, _exponential, (24, 48)),
    ("unipc_bh1", {"order": 2, "lower_order_final": False}, 3, _exponential, (24, 48)),
    ("unipc_bh2", {"order": 3, "lower_order_final": False}, 3.5, _exponential, (48, 96)),
    ("unipc_bh2", {"order": 2, "use_corrector": False, "lower_order_final": False}, 2, _exponential, (48, 96)),
    ("deis", {"order": 1}, 1, _exponential, (24, 48)),
    ("deis", {"order": 2}, 2, _exponential, (24, 48)),
    ("deis", {"order": 3}, 3, _exponential, (24, 48)),
    # linear multistep in sigma: uniform sigma steps; PNDM's pseudo warm-up bounds it at 3, and
    # iPNDM's first-order warm-up at 2
    ("pndm", {}, 3, _uniform_sigma, (32, 64)),
    ("ipndm", {"order": 1}, 1, _uniform_sigma, (32, 64)),
    ("ipndm", {"order": 4}, 2, _uniform_sigma, (32, 64)),
]


@pytest.mark.parametrize(
    "name,options,order,schedule,steps", ORDER_CASES, ids=[f"{c[0]}-{c[1]}" for c in ORDER_CASES]
)
def test_convergence_order_on_gaussian_data(name, options, order, schedule, steps):
    coarse, fine = (_final_error(name, schedule(n), **options) for n in steps)
    slope = math.log(coarse / fine) / math.log(steps[1] / steps[0])
    assert slope > order - 0.35, f"{name}: observed order {slope:.2f}, expected {order}"


@pytest.mark.parametrize("predict_x0", [True, False])
def test_third_order_multistep_step_is_exact_for_quadratic_outputs(predict_x0):
    """A third-order step integrates model outputs quadratic in lambda exactly; diffusers' 3M
    step does not (its error falls as h**3, a second-order method)."""
    from samplers.dpm_solver import dpm_solver_multistep_steps

    a, b, c = 0.7, -0.3, 1.0

    def f(lam):
        return a * lam * lam + b * lam + c

    def antiderivative(lam):  # of e^lam * f (data prediction) or of e^-lam * f (noise prediction)
        if predict_x0:
            return math.exp(lam) * (a * lam * lam + (b - 2 * a) * lam + (c - b + 2 * a))
        return -math.exp(-lam) * (a * lam * lam + (b + 2 * a) * lam + (c + b + 2 * a))

    for h in (0.5, 0.25):
        lams = [0.2 - 2 * h, 0.2 - h, 0.2, 0.2 + h]
        sigmas = [math.exp(-lam) for lam in lams]
        x = torch.tensor([1.3], dtype=torch.float64)
        s, t = sigmas[2], sigmas[3]
        # data prediction: d(x / sigma) / d lambda = e^lambda * x0; noise: dx / d lambda = -e^-lambda * eps
        integral = antiderivative(lams[3]) - antiderivative(lams[2])
        for diffusers_3m, tolerance in ((False, 1e-12), (True, None)):
            steps = dpm_solver_multistep_steps(x, sigmas, order=3, predict_x0=predict_x0, lower_order_final=False,
                                               diffusers_3m=diffusers_3m)
            request = next(steps)
            for i in range(3):
                x_i, sigma, _ = request
                output = f(lams[i])
                # hand back the x0 whose model output (x0 or eps) is f(lambda)
                denoised = torch.full_like(x_i, output) if predict_x0 else x_i - sigma * output
                try:
                    request = steps.send((x_i, denoised))
                except StopIteration as stop:
                    final = stop.value
            exact = (t / s) * float(x_i) + t * integral if predict_x0 else float(x_i) - integral
            error = abs(float(final) - exact)
            if tolerance is not None:
                assert error < tolerance
            else:
                assert error > 1e-4


def test_third_order_multistep_fixes_diffusers_second_order_step():
    """diffusers' 3M weights its second difference by phi_3 and converges at order 2 only."""
    ours = [_final_error("dpmpp_3m", _exponential(n)) for n in (48, 96)]
    theirs = [_final_error("dpmpp_3m", _exponential(n), diffusers_3m=True) for n in (48, 96)]
    assert math.log2(theirs[0] / theirs[1]) < 2.5
    assert math.log2(ours[0] / ours[1]) > 2.65
    assert ours[1] < theirs[1] / 5


# ---------------------------------------------------------------- the adapter
def _adapter_run(scheduler, unet, ehs, noise, steps, generator=None):
    scheduler.set_timesteps(steps)
    return _diffusers_run(scheduler, unet, ehs, noise, generator)[1]


@pytest.mark.parametrize(
    "name,options,reference",
    [
        ("dpmpp_2m", {}, lambda: DPMSolverMultistepScheduler(**SD)),
        ("dpmpp_3m", {"diffusers_3m": True}, lambda: DPMSolverMultistepScheduler(**SD, solver_order=3)),
        ("unipc_bh2", {}, lambda: UniPCMultistepScheduler(**SD)),
        ("dpmpp_2s", {}, lambda: DPMSolverSinglestepScheduler(**SD, lower_order_final=True)),
        ("dpmpp_2m_sde", {}, lambda: DPMSolverMultistepScheduler(**SD, algorithm_type="sde-dpmsolver++")),
    ],
)
def test_adapter_agrees_with_diffusers_in_a_sampling_loop(name, options, reference, unet64, cond64):
    ref_scheduler = reference()
    ours = samplers.make_scheduler(name, base=ref_scheduler, **options)
    ehs, noise = cond64["encoder_hidden_states"], cond64["noise"]
    ref_scheduler.set_timesteps(7)
    ours.set_timesteps(7)
    assert torch.equal(ours.timesteps, ref_scheduler.timesteps.float())
    ref = _diffusers_run(ref_scheduler, unet64, ehs, noise, torch.Generator().manual_seed(3))[1]
    out = _diffusers_run(ours, unet64, ehs, noise, torch.Generator().manual_seed(3))[1]
    assert torch.allclose(out, ref, atol=TOL, rtol=0)


def test_adapter_runs_two_call_sampler_like_diffusers_heun(unet64, cond64):
    ref_scheduler = HeunDiscreteScheduler(**SD, timestep_spacing="trailing")
    ref_scheduler.set_timesteps(5)
    sigmas = torch.unique_consecutive(ref_scheduler.sigmas.double()).tolist()
    ours = samplers.make_scheduler("heun", schedule="explicit", sigmas=sigmas, base=ref_scheduler)
    ours.set_timesteps(5)
    assert ours.order == 2 and len(ours.timesteps) == len(ref_scheduler.timesteps)
    assert torch.allclose(ours.timesteps, ref_scheduler.timesteps.float(), atol=1e-3)
    ehs = cond64["encoder_hidden_states"]
    ref = _diffusers_run(ref_scheduler, unet64, ehs, cond64["noise"])[1]
    # diffusers' Heun starts from noise * sigma_max (VE); the adapter from VP noise
    out = _diffusers_run(ours, unet64, ehs, cond64["noise"] * ref_scheduler.init_noise_sigma * _alpha(sigmas[0]))[1]
    assert torch.allclose(out, ref, atol=TOL, rtol=0)


def test_adapter_state_resets_on_set_timesteps(unet64, cond64):
    scheduler = samplers.make_scheduler("dpmpp_3m", schedule="karras", base=DDIMScheduler(**SD))
    ehs, noise = cond64["encoder_hidden_states"], cond64["noise"]
    first = _adapter_run(scheduler, unet64, ehs, noise, 6)
    second = _adapter_run(scheduler, unet64, ehs, noise, 6)
    assert torch.equal(first, second)
    other = _adapter_run(scheduler, unet64, ehs, noise, 4)
    assert not torch.allclose(first, other, atol=1e-3)


def test_adapter_config_round_trip(tmp_path):
    base = DPMSolverMultistepScheduler(**SD, prediction_type="v_prediction", rescale_betas_zero_snr=True)
    scheduler = samplers.make_scheduler("unipc_bh2", num_steps=7, schedule="karras", base=base, order=3, rho=5.0)
    again = samplers.SamplerScheduler.from_config(scheduler.config)
    assert dict(again.config) == dict(scheduler.config)
    scheduler.save_pretrained(tmp_path)
    loaded = samplers.SamplerScheduler.from_pretrained(tmp_path)
    assert loaded.config.sampler == "unipc_bh2" and loaded.config.sampler_options == {"order": 3, "rho": 5.0}
    assert loaded.config.prediction_type == "v_prediction" and loaded.config.rescale_betas_zero_snr
    scheduler.set_timesteps(None)  # num_steps is the default
    loaded.set_timesteps(None)
    assert len(scheduler.timesteps) == 7 and torch.equal(scheduler.timesteps, loaded.timesteps)


def test_schedules_end_in_zero_and_descend():
    ns = NoiseSchedule.from_config(DDIMScheduler(**SD).config)
    for schedule in ("linspace", "leading", "trailing", "karras", "exponential", "logsnr"):
        sigmas = samplers.get_sigmas(schedule, 8, ns, steps_offset=1)
        assert len(sigmas) == 9 and sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all()), schedule
    exp = samplers.get_sigmas("exponential", 8, ns)
    assert torch.allclose(samplers.get_sigmas("logsnr", 8, ns), exp)
    log_ratios = (exp[:-2] / exp[1:-1]).log()
    assert torch.allclose(log_ratios, log_ratios[0].expand_as(log_ratios))  # uniform in log-SNR
    explicit = samplers.get_sigmas("explicit", None, ns, timesteps=[999, 500, 10])
    assert torch.allclose(ns.sigma_to_t(explicit[:-1]), torch.tensor([999.0, 500.0, 10.0], dtype=torch.float64))


def test_zero_snr_v_prediction_denoiser_matches_diffusers_ddim(unet64, cond64):
    config = dict(**SD, prediction_type="v_prediction", rescale_betas_zero_snr=True, timestep_spacing="trailing")
    ref_scheduler = DDIMScheduler(**config, clip_sample=False, set_alpha_to_one=True)
    ref_scheduler.set_timesteps(5)
    ours = samplers.make_scheduler("ddim", base=ref_scheduler, schedule="trailing")
    ours.set_timesteps(5)
    assert torch.equal(ours.timesteps, ref_scheduler.timesteps.float())
    ehs, noise = cond64["encoder_hidden_states"], cond64["noise"]
    ref = _diffusers_run(ref_scheduler, unet64, ehs, noise)[1]
    out = _diffusers_run(ours, unet64, ehs, noise)[1]
    # sigma_max is infinite; like diffusers' Euler the adapter floors alphas_cumprod at 2**-24
    assert torch.allclose(out, ref, atol=2e-3, rtol=0)


def test_thresholding_clamps_x0():
    sample = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    model_output = 5 * torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    x0 = {}
    for max_value in (None, 1.0, 1.5):
        options = {} if max_value is None else {"thresholding": True, "sample_max_value": max_value}
        scheduler = samplers.make_scheduler("dpmpp_2m", base=DDIMScheduler(**SD), **options)
        scheduler.set_timesteps(4)
        x0[max_value] = scheduler.step(model_output, scheduler.timesteps[0], sample).pred_original_sample
    assert x0[None].abs().max() > 2
    # with sample_max_value = 1, dynamic thresholding is clipping to [-1, 1]
    assert torch.allclose(x0[1.0], x0[None].clamp(-1, 1))
    # above it, the per-sample 99.5% quantile s (capped) clips to [-s, s] and rescales by 1 / s
    s = torch.quantile(x0[None].reshape(2, -1).abs(), 0.995, dim=1).clamp(1, 1.5)[:, None, None, None]
    assert torch.allclose(x0[1.5], x0[None].clamp(-s, s) / s)


@pytest.mark.parametrize("name", ["pndm", "heun", "dpmpp_sde", "dpmpp_3m", "dpm_solver_3"])
def test_adapter_begin_index_runs_every_remaining_call(name):
    scheduler = samplers.make_scheduler(name, base=DDIMScheduler(**SD))
    for begin in range(0, 6):
        scheduler.set_timesteps(6)
        scheduler.set_begin_index(begin * scheduler.order if name != "pndm" else begin)
        x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
        for t in scheduler.timesteps[scheduler.begin_index:]:
            x = scheduler.step(-0.1 * x, t, x).prev_sample
        assert torch.isfinite(x).all()
        with pytest.raises(ValueError, match="model calls"):
            scheduler.step(x, 0, x)


# ---------------------------------------------------------------- real pipelines
@pytest.fixture(scope="module")
def tiny_pipe_components():
    unet = _tiny_unet(0)
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=32,
    ).eval()
    scheduler = DDIMScheduler(**SD, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return dict(unet=unet, vae=vae, scheduler=scheduler, text_encoder=None, tokenizer=None, safety_checker=None,
                feature_extractor=None, requires_safety_checker=False)


def _embeds():
    g = torch.Generator().manual_seed(5)
    return dict(
        prompt_embeds=torch.randn(1, 3, 32, generator=g), negative_prompt_embeds=torch.randn(1, 3, 32, generator=g)
    )


def _txt2img(components, scheduler, steps=4):
    pipe = StableDiffusionPipeline(**components)
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe(**_embeds(), height=16, width=16, num_inference_steps=steps, guidance_scale=3.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def _img2img(components, scheduler, strength, steps=6):
    pipe = StableDiffusionImg2ImgPipeline(**components)
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    image = torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16).sin()
    return pipe(**_embeds(), image=image, strength=strength, num_inference_steps=steps, guidance_scale=3.0,
                output_type="np", generator=torch.Generator().manual_seed(0)).images


def test_adapter_in_stable_diffusion_pipeline(tiny_pipe_components):
    base = tiny_pipe_components["scheduler"]
    ref = _txt2img(tiny_pipe_components, DPMSolverMultistepScheduler.from_config(base.config))
    out = _txt2img(tiny_pipe_components, samplers.make_scheduler("dpmpp_2m", base=base))
    assert out.shape == ref.shape == (1, 16, 16, 3)
    assert abs(out - ref).max() < TOL
    other = _txt2img(tiny_pipe_components, samplers.make_scheduler("unipc_bh2", schedule="karras", base=base))
    assert abs(other - ref).max() > 10 * TOL  # a different solver and schedule change the image


def test_adapter_in_img2img_pipeline(tiny_pipe_components):
    base = tiny_pipe_components["scheduler"]
    ref = _img2img(tiny_pipe_components, DPMSolverMultistepScheduler.from_config(base.config), 0.6)
    out = _img2img(tiny_pipe_components, samplers.make_scheduler("dpmpp_2m", base=base), 0.6)
    assert abs(out - ref).max() < TOL
    weaker = _img2img(tiny_pipe_components, samplers.make_scheduler("dpmpp_2m", base=base), 0.3)
    assert abs(weaker - out).max() > 10 * TOL  # strength changes where the run begins


@pytest.mark.parametrize("name", ["heun", "pndm", "dpmpp_sde"])
def test_multi_call_samplers_in_img2img_pipeline(tiny_pipe_components, name):
    """Samplers that call the model more than once in some steps, started part-way."""
    base = tiny_pipe_components["scheduler"]
    image = _img2img(tiny_pipe_components, samplers.make_scheduler(name, base=base), 0.5, steps=4)
    assert image.shape == (1, 16, 16, 3) and (image >= 0).all() and (image <= 1).all()


def _run_pipe(pipe, scheduler, **kwargs):
    pipe.scheduler = scheduler
    pipe.set_progress_bar_config(disable=True)
    return pipe(**kwargs, num_inference_steps=5, guidance_scale=3.0, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


def _image():
    return torch.linspace(-1, 1, 3 * 16 * 16).reshape(1, 3, 16, 16).sin()


# OLSS with its default coefficients is DPM-Solver++ 2M: the same pipelines must give the same images.
TWO_M = ("dpmpp_2m", "olss")


@pytest.mark.parametrize("name", TWO_M)
def test_adapter_in_inpaint_pipeline(tiny_pipe_components, name):
    """A 4-channel UNet: the pipeline re-noises the kept region with `add_noise` every step and
    hands the blended latents back, so the adapter must take the sample it is given."""
    base = tiny_pipe_components["scheduler"]
    pipe = StableDiffusionInpaintPipeline(**tiny_pipe_components)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    kwargs = dict(**_embeds(), image=_image(), mask_image=mask, strength=0.7, height=16, width=16)
    ref = _run_pipe(pipe, DPMSolverMultistepScheduler.from_config(base.config), **kwargs)
    out = _run_pipe(pipe, samplers.make_scheduler(name, base=base), **kwargs)
    assert abs(out - ref).max() < TOL


@pytest.mark.parametrize("name", TWO_M)
def test_adapter_in_controlnet_pipeline(tiny_pipe_components, name):
    base = tiny_pipe_components["scheduler"]
    torch.manual_seed(0)
    controlnet = ControlNetModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        in_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        cross_attention_dim=32,
        conditioning_embedding_out_channels=(16, 32),
        norm_num_groups=32,
    ).eval()
    pipe = StableDiffusionControlNetPipeline(**tiny_pipe_components, controlnet=controlnet)
    kwargs = dict(**_embeds(), image=(_image() + 1) / 2, height=16, width=16)
    ref = _run_pipe(pipe, DPMSolverMultistepScheduler.from_config(base.config), **kwargs)
    out = _run_pipe(pipe, samplers.make_scheduler(name, base=base), **kwargs)
    assert abs(out - ref).max() < TOL


@pytest.mark.parametrize("name", TWO_M)
@pytest.mark.parametrize("denoising_end", [None, 0.5])
def test_adapter_in_sdxl_pipeline(tiny_pipe_components, denoising_end, name):
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64),
        layers_per_block=1,
        sample_size=8,
        in_channels=4,
        out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4),
        use_linear_projection=True,
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,  # 6 * 8 time ids + 32 pooled
        cross_attention_dim=64,
        norm_num_groups=32,
    ).eval()
    base = EulerDiscreteScheduler(**SD, steps_offset=1, timestep_spacing="leading")
    pipe = StableDiffusionXLPipeline(vae=tiny_pipe_components["vae"], text_encoder=None, text_encoder_2=None,
                                     tokenizer=None, tokenizer_2=None, unet=unet, scheduler=base)
    g = torch.Generator().manual_seed(5)
    kwargs = dict(
        prompt_embeds=torch.randn(1, 3, 64, generator=g),
        negative_prompt_embeds=torch.randn(1, 3, 64, generator=g),
        pooled_prompt_embeds=torch.randn(1, 32, generator=g),
        negative_pooled_prompt_embeds=torch.randn(1, 32, generator=g),
        height=16,
        width=16,
        denoising_end=denoising_end,
    )
    ref = _run_pipe(pipe, DPMSolverMultistepScheduler.from_config(base.config), **kwargs)
    out = _run_pipe(pipe, samplers.make_scheduler(name, base=base), **kwargs)
    assert abs(out - ref).max() < TOL


def test_make_scheduler_diffusers_backend(tiny_pipe_components):
    base = tiny_pipe_components["scheduler"]
    scheduler = samplers.make_scheduler("dpmpp_2m", schedule="karras", base=base, backend="diffusers")
    assert isinstance(scheduler, DPMSolverMultistepScheduler) and scheduler.config.use_karras_sigmas
    ours = samplers.make_scheduler("dpmpp_2m", schedule="karras", base=base)
    assert isinstance(ours, samplers.SamplerScheduler)


# ---------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(name="dpmpp_9m"), "valid choices: 'ddim', 'euler'"),
        (dict(name="unipc_bh2", order=4), "order=4 is not supported by sampler 'unipc_bh2'; valid choices: 1, 2, 3"),
        (dict(name="deis", order=4), "valid choices: 1, 2, 3"),
        (dict(name="dpmpp_2m", num_steps=0), "num_steps must be a positive int"),
        (dict(name="dpmpp_2m", schedule="cosine"), "valid choices: 'default', 'linspace'"),
        (dict(name="euler", eta=1.0), "valid choices: 'order', 'timesteps'"),
        (dict(name="dpmpp_2m", solver_type="rk4"), "valid choices: 'midpoint', 'heun'"),
        (dict(name="dpmpp_2m", backend="k-diffusion"), "valid choices: 'samplers', 'diffusers'"),
        (dict(name="dpmpp_2m", schedule="explicit"), "exactly one of the options 'timesteps' or 'sigmas'"),
        (dict(name="dpmpp_2m", timesteps=[999, 500]), "pass schedule='explicit'"),
        (dict(name="dpmpp_2m", schedule="explicit", timesteps=[999, 500], num_steps=3), "disagrees"),
    ],
)
def test_bad_arguments_raise_listing_valid_choices(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        samplers.make_scheduler(**kwargs)


def test_names_are_exported_for_config_validation():
    assert "dpmpp_2m" in samplers.SAMPLER_NAMES and "karras" in samplers.SCHEDULE_NAMES
    assert set(samplers.SAMPLER_NAMES) == set(samplers.SAMPLER_FUNCTIONS)
    for name in samplers.SAMPLER_NAMES:
        assert isinstance(samplers.make_scheduler(name), samplers.SamplerScheduler)


def test_bad_steps_and_explicit_mismatch_raise_at_set_timesteps():
    scheduler = samplers.make_scheduler("dpmpp_2m")
    with pytest.raises(ValueError, match="positive int"):
        scheduler.set_timesteps(0)
    explicit = samplers.make_scheduler("euler", schedule="explicit", timesteps=[999, 600, 300, 100])
    explicit.set_timesteps(4)
    assert len(explicit.timesteps) == 4
    with pytest.raises(ValueError, match="num_inference_steps=4"):
        explicit.set_timesteps(20)
    with pytest.raises(ValueError, match="descending"):
        samplers.make_scheduler("euler", schedule="explicit", timesteps=[100, 600]).set_timesteps(2)


# ---------------------------------------------------------------- tuned schedules
def _gaussian_problem(batch, seed):
    ns = NoiseSchedule.from_config(DDIMScheduler(**SD).config)
    noise, x_T = GAUSSIAN.start(batch, seed, ns.sigma_max)
    return ns, noise, x_T, GAUSSIAN.exact(x_T, 0.0, ns.sigma_max)


def test_tuned_schedule_beats_default_and_karras_on_held_out_inputs():
    ns, noise, _, exact = _gaussian_problem(8, seed=10)
    tuned = samplers.tune_schedule(gaussian_denoiser, noise, ns, sampler="dpmpp_2m", num_steps=5, reference=exact)
    assert tuned.loss_tuned < tuned.loss_init and tuned.search_denoiser_calls > 0
    sigmas = torch.tensor(tuned.sigmas, dtype=torch.float64)
    assert sigmas[-1] == 0 and bool((sigmas[1:] < sigmas[:-1]).all()) and len(sigmas) == 6
    _, _, x_T, exact = _gaussian_problem(8, seed=11)  # held-out calibration inputs

    def mse(s):
        return float(((samplers.sample("dpmpp_2m", gaussian_denoiser, x_T, s, disable=True) - exact) ** 2).mean())

    gain_db = 10 * math.log10(min(mse(samplers.get_sigmas(s, 5, ns)) for s in ("linspace", "karras")) / mse(sigmas))
    assert gain_db > 1.0


def test_tuned_schedule_saved_next_to_the_model_and_reused_by_name(tmp_path):
    ns, noise, _, exact = _gaussian_problem(4, seed=12)
    tuned = samplers.tune_schedule(gaussian_denoiser, noise, ns, sampler="unipc_bh2", num_steps=4, reference=exact,
                                   passes=3)
    path = samplers.save_tuned_schedule(tuned, tmp_path, "unipc4")
    assert path == tmp_path / "tuned_schedules" / "unipc4.json"
    assert samplers.TunedSchedule.load(path) == tuned
    scheduler = samplers.make_scheduler("unipc_bh2", schedule="tuned", tuned="unipc4", model_dir=tmp_path,
                                        base=DDIMScheduler(**SD))
    scheduler.set_timesteps(4)
    assert torch.allclose(scheduler.sigmas.double(), torch.tensor(tuned.sigmas, dtype=torch.float64), rtol=1e-6)
    assert torch.allclose(scheduler.timesteps.double(), torch.tensor(tuned.timesteps, dtype=torch.float64), atol=1e-3)
    with pytest.raises(ValueError, match="valid choices: \\['unipc4'\\]"):
        samplers.make_scheduler("unipc_bh2", schedule="tuned", tuned="missing", model_dir=tmp_path)
    with pytest.raises(ValueError, match="disagrees"):
        samplers.make_scheduler("unipc_bh2", schedule="tuned", tuned=str(path), num_steps=8)
    with pytest.raises(ValueError, match="needs the option tuned"):
        samplers.make_scheduler("unipc_bh2", schedule="tuned")


def test_tune_pipeline_schedule_on_a_tiny_pipeline(tiny_pipe_components, tmp_path):
    pipe = StableDiffusionPipeline(**tiny_pipe_components)
    tuned = samplers.tune_pipeline_schedule(pipe, **_embeds(), num_steps=3, guidance_scale=3.0, height=16, width=16,
                                            reference_steps=12, passes=2)
    assert tuned.loss_tuned <= tuned.loss_init and tuned.calibration_inputs == 1
    assert tuned.search_denoiser_calls >= 12 + 3 * tuned.search_evaluations
    scheduler = samplers.make_scheduler("dpmpp_2m", schedule="tuned", tuned=tuned.save(tmp_path / "t.json"),
                                        base=pipe.scheduler)
    image = _txt2img(tiny_pipe_components, scheduler, steps=3)
    assert image.shape == (1, 16, 16, 3)


def test_sampler_table_against_a_high_step_reference(tiny_pipe_components):
    from samplers.evaluate import format_table, sampler_table

    pipe = StableDiffusionPipeline(**tiny_pipe_components)
    pipe.set_progress_bar_config(disable=True)
    before = pipe.scheduler
    candidates = [("diffusers dpm++2m", "dpmpp_2m", "default", {"backend": "diffusers"}),
                  ("dpmpp_2m", "dpmpp_2m", "default", {}), ("heun", "heun", "karras", {})]
    rows = sampler_table(pipe, candidates=candidates, steps=(2, 8), reference_steps=40, **_embeds(),
                         guidance_scale=3.0, height=16, width=16)
    assert pipe.scheduler is before and len(rows) == 6
    by = {(r["label"], r["steps"]): r for r in rows}
    # the adapter and diffusers' scheduler give the same image, and more steps get closer
    assert abs(by[("dpmpp_2m", 8)]["psnr_db"] - by[("diffusers dpm++2m", 8)]["psnr_db"]) < 0.1
    assert by[("dpmpp_2m", 8)]["psnr_db"] > by[("dpmpp_2m", 2)]["psnr_db"] + 3
    assert by[("heun", 8)]["model_calls"] == 15
    table = format_table(rows)
    assert table.splitlines()[0] == "| sampler | 2 steps | 8 steps |" and len(table.splitlines()) == 5


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_model_output_to_x0_inverts_each_parameterisation(prediction_type):
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 4, generator=g, dtype=torch.float64), torch.randn(2, 4, generator=g, dtype=torch.float64)
    sigma = 3.0
    alpha = (1 + sigma**2) ** -0.5
    sigma_vp = sigma * alpha
    x_vp = alpha * x0 + sigma_vp * eps
    output = {"epsilon": eps, "v_prediction": alpha * eps - sigma_vp * x0, "sample": x0}[prediction_type]
    assert torch.allclose(samplers.model_output_to_x0(output, x_vp, alpha, sigma_vp, prediction_type), x0)
    with pytest.raises(ValueError, match="valid choices"):
        samplers.model_output_to_x0(output, x_vp, alpha, sigma_vp, "flow")


def test_every_pure_sampler_has_the_one_signature():
    for name, fn in samplers.SAMPLER_FUNCTIONS.items():
        params = inspect.signature(fn).parameters
        assert list(params)[:3] == ["denoiser", "x", "sigmas"], name
        for keyword in ("extra_args", "callback", "disable"):
            assert params[keyword].kind is inspect.Parameter.KEYWORD_ONLY, (name, keyword)
        # each runs on the Gaussian problem and ends at sigma = 0 with a finite sample
        x = MU + 10 * torch.randn(1, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        out = fn(gaussian_denoiser, x, samplers.get_sigmas_karras(6, 0.1, 10.0), disable=True)
        assert torch.isfinite(out).all() and (out - MU).abs().max() < 10, name


def test_the_table_says_which_samplers_add_noise():
    # caching must refuse the samplers that draw fresh noise: the flag has to match what each one does
    x = MU + 10 * torch.randn(1, 64, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    sigmas = samplers.get_sigmas_karras(4, 0.1, 10.0)
    for name, spec in samplers.SAMPLERS.items():
        for options in ({}, {"eta": 0.0}, {"eta": 0.5}) if "eta" in spec.options else ({},):
            a, b = (samplers.sample(name, gaussian_denoiser, x, sigmas, disable=True,
                                    generator=torch.Generator().manual_seed(seed), **options) for seed in (1, 2))
            assert torch.equal(a, b) != spec.adds_noise(options), (name, options)

def test_ddim_with_eta_agrees_with_diffusers(unet64, cond64):
    scheduler = DDIMScheduler(**SD, set_alpha_to_one=True, steps_offset=1, clip_sample=False)
    scheduler.set_timesteps(5)
    ehs, noise = cond64["encoder_hidden_states"], cond64["noise"]
    g = torch.Generator().manual_seed(7)
    x = noise
    with torch.no_grad():
        for t in scheduler.timesteps:
            out = unet64(x, t, encoder_hidden_states=ehs).sample
            x = scheduler.step(out, t, x, eta=0.7, generator=g).prev_sample
    sigmas = _sigmas_at(scheduler, scheduler.timesteps.tolist(), 0.0)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        ours = samplers.sample_ddim(
            UNetDenoiser(unet64, scheduler), noise / _alpha(float(sigmas[0])), sigmas,
            extra_args={"encoder_hidden_states": ehs}, disable=True, eta=0.7,
            noise_sampler=lambda s, s_next: torch.randn(noise.shape, generator=g, dtype=noise.dtype),
        )
    assert torch.allclose(ours, x, atol=TOL, rtol=0)
    with torch.no_grad():
        deterministic = samplers.sample_ddim(UNetDenoiser(unet64, scheduler), noise / _alpha(float(sigmas[0])),
                                             sigmas, extra_args={"encoder_hidden_states": ehs}, disable=True)
    assert (deterministic - x).abs().max() > 10 * TOL
