"""PNDM (Liu et al. 2022, "Pseudo Numerical Methods for Diffusion Models on Manifolds") and
iPNDM (Zhang & Chen 2023, the improved warm-up of the DEIS paper).

Both apply the Adams-Bashforth combination of past noise predictions inside the DDIM transfer,
which in the VE sigma parameterisation is `x += (sigma_next - sigma) * eps`. PNDM's PLMS warms
up with a pseudo improved-Euler step (one extra denoiser call, as diffusers' PNDMScheduler with
`skip_prk_steps=True`); iPNDM warms up with lower-order Adams-Bashforth steps instead.
"""

from __future__ import annotations

from ._loop import Steps, as_floats, drive

# Adams-Bashforth weights, latest first
AB_COEFFICIENTS = {
    1: (1.0,),
    2: (3 / 2, -1 / 2),
    3: (23 / 12, -16 / 12, 5 / 12),
    4: (55 / 24, -59 / 24, 37 / 24, -9 / 24),
}


def _combine(eps_history):
    coeffs = AB_COEFFICIENTS[len(eps_history)]
    return sum(c * e for c, e in zip(coeffs, reversed(eps_history)))


def ipndm_steps(x, sigmas, order: int = 4) -> Steps:
    if order not in AB_COEFFICIENTS:
        raise ValueError(f"order={order!r} is not supported; valid choices: {tuple(AB_COEFFICIENTS)}")
    sig = as_floats(sigmas)
    eps = []
    for i in range(len(sig) - 1):
        x, denoised = yield x, sig[i], i
        eps = (eps + [(x - denoised) / sig[i]])[-order:]
        x = x + (sig[i + 1] - sig[i]) * _combine(eps)
    return x


def pndm_steps(x, sigmas, pseudo_warmup: bool = True) -> Steps:
    if not pseudo_warmup:
        return (yield from ipndm_steps(x, sigmas, 4))
    sig = as_floats(sigmas)
    n = len(sig) - 1
    eps = []
    for i in range(n):
        s, s_next = sig[i], sig[i + 1]
        x, denoised = yield x, s, i
        e = (x - denoised) / s
        if i == 0 and n > 1:
            # pseudo improved Euler: predict, evaluate at s_next, restart with the mean slope
            x_pred, denoised_pred = yield x + (s_next - s) * e, s_next, i
            e_pred = (x_pred - denoised_pred) / s_next
            eps = [e]
            x = x + (s_next - s) * (e + e_pred) / 2
            continue
        eps = (eps + [e])[-4:]
        x = x + (s_next - s) * _combine(eps)
    return x


def sample_pndm(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None):
    """PNDM's PLMS with the pseudo improved-Euler warm-up (n + 1 denoiser calls for n steps)."""
    return drive(pndm_steps(x, sigmas), denoiser, x, extra_args=extra_args, callback=callback, disable=disable,
                 total=len(sigmas))


def sample_ipndm(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, order=4):
    """iPNDM: Adams-Bashforth of the given order (1-4) on the noise prediction."""
    return drive(ipndm_steps(x, sigmas, order), denoiser, x, extra_args=extra_args, callback=callback,
                 disable=disable, total=len(sigmas) - 1)
