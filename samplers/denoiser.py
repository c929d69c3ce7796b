"""The denoiser form `denoiser(x, sigma, **cond) -> x0` over a discrete VP noise schedule.

Karras et al. 2022 ("Elucidating the Design Space of Diffusion-Based Generative Models") write
every diffusion model as a denoiser of `x = x0 + sigma * noise`; a VP model (DDPM, Stable
Diffusion) sees `x * alpha` with `alpha = 1 / sqrt(1 + sigma**2)` and `sigma_vp = sigma * alpha`.
Zero-terminal-SNR schedules follow Lin et al. 2024 ("Common Diffusion Noise Schedules and Sample
Steps are Flawed").
"""

from __future__ import annotations

import inspect
import math

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# The last alphas_cumprod of a zero-SNR schedule is 0 (sigma = inf); diffusers' Euler uses this floor.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


class NoiseSchedule:
    """A discrete VP schedule as sigmas over train timesteps, with interpolation both ways.

    `sigma_to_t` and `t_to_sigma` are piecewise linear in log(sigma) (k-diffusion's
    `DiscreteSchedule`), so they invert each other exactly.
    """

    def __init__(self, alphas_cumprod: torch.Tensor):
        alphas_cumprod = alphas_cumprod.detach().to(torch.float64).cpu().clone()
        alphas_cumprod = alphas_cumprod.clamp(min=ZERO_SNR_ALPHA_CUMPROD)
        self.alphas_cumprod = alphas_cumprod
        self.sigmas = ((1 - alphas_cumprod) / alphas_cumprod).sqrt()
        self.log_sigmas = self.sigmas.log()

    @classmethod
    def from_config(cls, config) -> "NoiseSchedule":
        """The schedule of a diffusers scheduler config (betas, trained betas, zero-SNR rescale)."""
        from diffusers import DDPMScheduler

        accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
        kwargs = {k: v for k, v in dict(config).items() if k in accepted}
        kwargs.pop("prediction_type", None)
        kwargs.pop("timestep_spacing", None)
        ddpm = DDPMScheduler(**kwargs)
        return cls(ddpm.alphas_cumprod)

    @property
    def num_train_timesteps(self) -> int:
        return len(self.sigmas)

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        sigma = torch.as_tensor(sigma)
        sigma = sigma if sigma.is_floating_point() else sigma.double()
        log_sigmas = self.log_sigmas.to(sigma.device, sigma.dtype)
        log_sigma = sigma.clamp(min=1e-30).log()
        dists = log_sigma - log_sigmas[:, None] if sigma.dim() else log_sigma - log_sigmas
        if sigma.dim():
            low_idx = dists.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=len(log_sigmas) - 2)
        else:
            low_idx = dists.ge(0).cumsum(dim=0).argmax().clamp(max=len(log_sigmas) - 2)
        low, high = log_sigmas[low_idx], log_sigmas[low_idx + 1]
        w = ((low - log_sigma) / (low - high)).clamp(0, 1)
        t = (1 - w) * low_idx + w * (low_idx + 1)
        # sigmas made from integer train timesteps map back to exactly those integers
        rounded = t.round()
        return torch.where((t - rounded).abs() < 1e-3, rounded, t)

    def t_to_sigma(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t, dtype=torch.float64).clamp(0, self.num_train_timesteps - 1)
        log_sigmas = self.log_sigmas.to(t.device)
        low_idx = t.floor().long().clamp(max=self.num_train_timesteps - 2)
        w = t - low_idx
        return ((1 - w) * log_sigmas[low_idx] + w * log_sigmas[low_idx + 1]).exp()


def alpha_from_sigma(sigma):
    """VP signal scale for a VE sigma: `x_vp = x * alpha`."""
    if isinstance(sigma, torch.Tensor):
        return (1 + sigma**2).rsqrt()
    return 1.0 / math.sqrt(1.0 + sigma * sigma)


def model_output_to_x0(model_output, x_vp, alpha, sigma_vp, prediction_type: str):
    """The x0 a VP model predicts, from its output on the VP-scaled input."""
    if prediction_type == "epsilon":
        return (x_vp - sigma_vp * model_output) / alpha
    if prediction_type == "v_prediction":
        return alpha * x_vp - sigma_vp * model_output
    if prediction_type == "sample":
        return model_output
    raise ValueError(f"prediction_type={prediction_type!r} is not supported; valid choices: {PREDICTION_TYPES}")


def dynamic_threshold(x0: torch.Tensor, ratio: float = 0.995, max_value: float = 1.0) -> torch.Tensor:
    """Imagen's dynamic thresholding (Saharia et al. 2022) of a predicted x0, for pixel models."""
    dtype = x0.dtype
    flat = x0.float() if dtype not in (torch.float32, torch.float64) else x0
    flat = flat.reshape(x0.shape[0], -1)
    s = torch.quantile(flat.abs(), ratio, dim=1).clamp(min=1, max=max_value)[:, None]
    return (flat.clamp(-s, s) / s).reshape(x0.shape).to(dtype)


def _append_dims(t: torch.Tensor, ndim: int) -> torch.Tensor:
    return t.reshape(t.shape + (1,) * (ndim - t.dim()))


def sigma_per_sample(sigma, x: torch.Tensor) -> torch.Tensor:
    """`sigma` (a number or one per sample) as one value per sample of `x`, in `x`'s dtype."""
    sigma = torch.as_tensor(sigma, device=x.device, dtype=x.dtype)
    return sigma.expand(x.shape[0]) if sigma.dim() == 0 else sigma


class UNetDenoiser:
    """Wrap a diffusers UNet and its scheduler's noise schedule as `denoiser(x, sigma, **cond) -> x0`.

    Args:
        unet: any diffusers denoiser called as `unet(sample, timestep, **cond)`.
        scheduler: the pipeline's scheduler (or its config): betas, `prediction_type`,
            `rescale_betas_zero_snr`.
        prediction_type: overrides the scheduler's ("epsilon", "v_prediction", "sample").
        thresholding: apply dynamic thresholding to x0 (pixel-space models only).
    """

    def __init__(
        self,
        unet,
        scheduler,
        *,
        prediction_type: str | None = None,
        thresholding: bool = False,
        dynamic_thresholding_ratio: float = 0.995,
        sample_max_value: float = 1.0,
    ):
        config = getattr(scheduler, "config", scheduler)
        self.unet = unet
        self.schedule = NoiseSchedule.from_config(config)
        self.prediction_type = prediction_type or dict(config).get("prediction_type", "epsilon")
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(
                f"prediction_type={self.prediction_type!r} is not supported; valid choices: {PREDICTION_TYPES}"
            )
        self.thresholding = thresholding
        self.dynamic_thresholding_ratio = dynamic_thresholding_ratio
        self.sample_max_value = sample_max_value

    def __call__(self, x: torch.Tensor, sigma, **cond) -> torch.Tensor:
        sigma = sigma_per_sample(sigma, x)
        alpha = _append_dims((1 + sigma**2).rsqrt(), x.dim())
        sigma_vp = _append_dims(sigma, x.dim()) * alpha
        x_vp = x * alpha
        exact = torch.float64 if x.device.type in ("cpu", "cuda") else torch.float32  # MPS has no float64
        t = self.schedule.sigma_to_t(sigma.detach().to(exact)).to(torch.float32)
        dtype = getattr(self.unet, "dtype", x.dtype)
        out = self.unet(x_vp.to(dtype), t, **cond, return_dict=False)[0].to(x.dtype)
        x0 = model_output_to_x0(out, x_vp, alpha, sigma_vp, self.prediction_type)
        if self.thresholding:
            x0 = dynamic_threshold(x0, self.dynamic_thresholding_ratio, self.sample_max_value)
        return x0
