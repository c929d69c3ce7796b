"""The loop shared by every sampler: a solver is written once, as a generator over its steps.

A solver generator `steps(x, sigmas, **options)` yields `(x, sigma, i)` each time it needs the
denoiser at `x`, `sigma` (for step `i`), receives `(x, denoised)` back (the caller may hand back
a changed `x`, as inpainting pipelines do) and returns the final sample. Its state lives in its
loop variables. `drive` runs it with a denoiser (the pure `sample_*` functions); the diffusers
adapter (`samplers.scheduler`) runs the same generator one model call per `step()`.
"""

from __future__ import annotations

import math
from typing import Callable, Generator

import torch
from tqdm.auto import tqdm

Steps = Generator[tuple[torch.Tensor, float, int], tuple[torch.Tensor, torch.Tensor], torch.Tensor]


def default_noise_sampler(x: torch.Tensor, generator: torch.Generator | None = None) -> Callable:
    """Fresh Gaussian noise per call; drawn in float32 like diffusers' `randn_tensor`."""

    def sample(sigma, sigma_next):
        return torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32).to(x.dtype)

    return sample


def drive(
    steps: Steps,
    denoiser,
    x: torch.Tensor,
    *,
    extra_args=None,
    callback=None,
    disable=None,
    total: int | None = None,
) -> torch.Tensor:
    """Run a solver generator with `denoiser(x, sigma, **extra_args) -> x0`."""
    extra_args = {} if extra_args is None else extra_args
    s_in = x.new_ones([x.shape[0]])
    request = next(steps)
    evals = 0
    with tqdm(total=total, disable=disable) as progress:
        while True:
            x, sigma, i = request
            denoised = denoiser(x, sigma * s_in, **extra_args)
            if callback is not None:
                callback({"x": x, "i": i, "eval": evals, "sigma": sigma, "denoised": denoised})
            evals += 1
            progress.update()
            try:
                request = steps.send((x, denoised))
            except StopIteration as stop:
                return stop.value


def trace(steps: Steps) -> list[tuple[float, int]]:
    """The (sigma, step index) of every denoiser call a solver makes, found by a dry run.

    The sigmas a solver visits depend on the schedule only, never on the model's outputs, so a
    run on a one-element zero tensor gives the plan that the adapter's `timesteps` list.
    """
    plan = []
    request = next(steps)
    while True:
        x, sigma, i = request
        plan.append((float(sigma), int(i)))
        try:
            request = steps.send((x, torch.zeros_like(x)))
        except StopIteration:
            return plan


def zero_noise(sigma, sigma_next):
    return 0.0


def signal_scales(sigmas: list[float], flow: bool = False) -> list[float]:
    """The signal scale alpha at each sigma: 1 in the VE form `x = x0 + sigma * noise`, and `1 - sigma`
    in the flow-matching form `x = (1 - sigma) * x0 + sigma * noise` (`samplers.flow`)."""
    return [1.0 - s for s in sigmas] if flow else [1.0] * len(sigmas)


def half_log_snr(alpha: float, sigma: float) -> float:
    """lambda = log(alpha / sigma), the time variable of the exponential integrators: -inf where the
    signal is gone (flow sigma 1), +inf at sigma 0. With alpha = 1 it is exactly `-log(sigma)`."""
    if alpha == 0:
        return -math.inf
    if sigma == 0:
        return math.inf
    return math.log(alpha) - math.log(sigma)


def as_floats(sigmas) -> list[float]:
    """Sigmas as host floats: the schedule is host data, so coefficients never sync a device."""
    if isinstance(sigmas, torch.Tensor):
        return [float(s) for s in sigmas.detach().to("cpu", torch.float64)]
    return [float(s) for s in sigmas]


def step_order(order: int, history: int, i: int, n: int, sigma_next: float, lower_order_final: bool = True) -> int:
    """The order a multistep solver uses at step `i` of `n`: at most `order`, at most the `history` of
    model outputs it has, first order into sigma 0, and (diffusers' `lower_order_final`: fewer than
    15 steps are stabler with a low order at the end) at most 1 on the last step and 2 on the one before."""
    k = min(order, history)
    if sigma_next == 0 or (lower_order_final and n < 15 and i == n - 1):
        return 1
    if lower_order_final and n < 15 and i == n - 2:
        return min(k, 2)
    return k
