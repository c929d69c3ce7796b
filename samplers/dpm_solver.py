"""DPM-Solver (Lu et al. 2022, NeurIPS) and DPM-Solver++ (Lu et al. 2022, arXiv:2211.01095).

Exponential integrators of the probability-flow ODE in lambda = -log(sigma) (half the log-SNR):
noise-prediction form ("DPM-Solver") and data-prediction form ("DPM-Solver++"), singlestep and
multistep, orders 1-3, plus the SDE variants (2M SDE; the two-stage "DPM++ SDE" of k-diffusion).
Written in the VE sigma parameterisation, where `alpha_t` cancels from every update; the
coefficients match diffusers' `DPMSolverMultistepScheduler` / `DPMSolverSinglestepScheduler`.
Multistep DPM-Solver++ also runs in the flow-matching form (`flow=True`, alpha = 1 - sigma, as
`DPMSolverMultistepScheduler(use_flow_sigmas=True)`): the data-prediction update keeps the ratio
`sigma_t / sigma_s` and weights the outputs by `alpha_t`, so it stays finite where the flow schedule
starts (sigma 1, alpha 0, lambda = -inf), where the first step is DDIM's from pure noise.
"""

from __future__ import annotations

import math

from ._loop import Steps, as_floats, default_noise_sampler, drive, half_log_snr, signal_scales, step_order

SOLVER_TYPES = ("midpoint", "heun")


def _lam(sigma: float) -> float:
    """lambda of a VE sigma: -log(sigma) (+inf at 0)."""
    return half_log_snr(1.0, sigma)


def _check(order: int, orders, solver_type: str):
    if order not in orders:
        raise ValueError(f"order={order!r} is not supported; valid choices: {orders}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type={solver_type!r} is not supported; valid choices: {SOLVER_TYPES}")


def _first_order(x, s, t, m, h, predict_x0, a_t=1.0):
    """Update from (x, s) to t with output m; `h` = lambda_t - lambda_s, `a_t` the signal scale at t."""
    if predict_x0:
        return (t / s) * x - a_t * math.expm1(-h) * m if t > 0 else m
    return x - (s - t) * m  # sigma_t * (e^h - 1) = sigma_s - sigma_t, exact at sigma_t = 0


def _second_order(x, s_start, t, m_start, D1, h, predict_x0, solver_type, a_t=1.0):
    """Update from (x, s_start) with base output m_start and first difference D1."""
    if predict_x0:
        e = a_t * math.expm1(-h)
        x_t = (t / s_start) * x - e * m_start
        return x_t - 0.5 * e * D1 if solver_type == "midpoint" else x_t + a_t * (math.expm1(-h) / h + 1.0) * D1
    tE = t * math.expm1(h)
    x_t = x - tE * m_start
    return x_t - 0.5 * tE * D1 if solver_type == "midpoint" else x_t - t * (math.expm1(h) / h - 1.0) * D1


def _phi_terms(h, t, predict_x0, a_t=1.0):
    """Coefficients of D1 and D2 in the third-order update."""
    if predict_x0:
        e = math.expm1(-h)
        return a_t * (e / h + 1.0), -a_t * ((e + h) / h**2 - 0.5)
    E = math.expm1(h)
    return -t * (E / h - 1.0), -t * ((E - h) / h**2 - 0.5)


def dpm_solver_multistep_steps(
    x,
    sigmas,
    order: int = 2,
    predict_x0: bool = True,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    diffusers_3m: bool = False,
    flow: bool = False,
) -> Steps:
    """Multistep DPM-Solver(++) of order 1-3.

    The third-order step weights the second difference `D2 = h**2 * D''/2` by `2 * phi_3`,
    the Taylor coefficient, which makes it third order. diffusers (and the reference DPM-Solver
    code) weight it by `phi_3`, which leaves the method second order; `diffusers_3m=True`
    reproduces that step exactly. `flow=True`: `sigmas` and `x` in the flow-matching form
    (data prediction only). A history output at lambda = -inf (flow sigma 1) has no weight in
    the differences (their ratio r is infinite), which is the limit of the step as alpha -> 0.
    """
    _check(order, (1, 2, 3), solver_type)
    if flow and not predict_x0:
        raise ValueError("the flow-matching form is data prediction (DPM-Solver++) only: noise prediction divides "
                         "by alpha, which is 0 where a flow schedule starts")
    d2_weight = 1.0 if diffusers_3m else 2.0
    sig = as_floats(sigmas)
    alphas = signal_scales(sig, flow)
    lam = [half_log_snr(a, s) for a, s in zip(alphas, sig)]
    n = len(sig) - 1
    ms, lams = [], []
    for i in range(n):
        s, t, a_t = sig[i], sig[i + 1], alphas[i + 1]
        x, denoised = yield x, s, i
        m = denoised if predict_x0 else (x - denoised) / s
        ms, lams = (ms + [m])[-order:], (lams + [lam[i]])[-order:]
        h = lam[i + 1] - lams[-1]
        k = step_order(order, len(ms), i, n, t, lower_order_final)
        if k == 1:
            x = _first_order(x, s, t, m, h, predict_x0, a_t)
            continue
        r0 = (lams[-1] - lams[-2]) / h
        D1_0 = (ms[-1] - ms[-2]) / r0
        if k == 2:
            x = _second_order(x, s, t, ms[-1], D1_0, h, predict_x0, solver_type, a_t)
            continue
        r1 = (lams[-2] - lams[-3]) / h
        D1_1 = (ms[-2] - ms[-3]) / r1
        D1 = D1_0 + (r0 / (r0 + r1)) * (D1_0 - D1_1)
        D2 = (D1_0 - D1_1) / (r0 + r1)
        c1, c2 = _phi_terms(h, t, predict_x0, a_t)
        x = _first_order(x, s, t, ms[-1], h, predict_x0, a_t) + c1 * D1 + d2_weight * c2 * D2
    return x


def singlestep_order_list(n: int, order: int, lower_order_final: bool = True) -> list[int]:
    """Orders per step of singlestep DPM-Solver: blocks [1, 2, 3] (diffusers' `get_order_list`)."""
    if order == 1:
        return [1] * n
    if lower_order_final:
        if order == 3:
            if n % 3 == 0:
                return [1, 2, 3] * (n // 3 - 1) + [1, 2] + [1]
            return [1, 2, 3] * (n // 3) + ([1] if n % 3 == 1 else [1, 2])
        return [1, 2] * (n // 2 - 1) + [1, 1] if n % 2 == 0 else [1, 2] * (n // 2) + [1]
    block = [1, 2, 3] if order == 3 else [1, 2]
    return (block * (n // len(block) + 1))[:n]


def dpm_solver_singlestep_steps(
    x, sigmas, order: int = 2, predict_x0: bool = True, solver_type: str = "midpoint", lower_order_final: bool = True
) -> Steps:
    """Singlestep DPM-Solver whose intermediate points are the schedule's own sigmas: a block
    of k steps takes one order-k step from the block's first sigma (one denoiser call per sigma)."""
    _check(order, (1, 2, 3), solver_type)
    sig = as_floats(sigmas)
    n = len(sig) - 1
    orders = singlestep_order_list(n, order, lower_order_final)
    if sig[-1] == 0:
        orders[-1] = 1
    ms = []
    x_block = x
    for i in range(n):
        s0, t = sig[i], sig[i + 1]
        x, denoised = yield x, s0, i
        m = denoised if predict_x0 else (x - denoised) / s0
        ms = (ms + [m])[-order:]
        k = min(orders[i], len(ms))
        if k == 1:
            x_block = x
            x = _first_order(x, s0, t, m, _lam(t) - _lam(s0), predict_x0)
        elif k == 2:
            s1 = sig[i - 1]
            h = _lam(t) - _lam(s1)
            r0 = (_lam(s0) - _lam(s1)) / h
            x = _second_order(x_block, s1, t, ms[-2], (ms[-1] - ms[-2]) / r0, h, predict_x0, solver_type)
        else:
            s1, s2 = sig[i - 1], sig[i - 2]
            h = _lam(t) - _lam(s2)
            r0, r1 = (_lam(s0) - _lam(s2)) / h, (_lam(s1) - _lam(s2)) / h
            m0, m1, m2 = ms[-1], ms[-2], ms[-3]
            D1_0, D1_1 = (m1 - m2) / r1, (m0 - m2) / r0
            c1, c2 = _phi_terms(h, t, predict_x0)
            base = _first_order(x_block, s2, t, m2, h, predict_x0)
            if solver_type == "midpoint":
                x = base + c1 * D1_1
            else:
                D1 = (r0 * D1_0 - r1 * D1_1) / (r0 - r1)
                D2 = 2.0 * (D1_1 - D1_0) / (r0 - r1)
                x = base + c1 * D1 + c2 * D2
    return x


def dpmpp_2m_sde_steps(
    x,
    sigmas,
    eta: float = 1.0,
    solver_type: str = "midpoint",
    lower_order_final: bool = True,
    noise_sampler=None,
    generator=None,
) -> Steps:
    """DPM-Solver++(2M) SDE; eta = 1 is diffusers' "sde-dpmsolver++", eta = 0 is DPM-Solver++(2M)."""
    _check(2, (2,), solver_type)
    sig = as_floats(sigmas)
    n = len(sig) - 1
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    old_denoised, h_last = None, None
    for i in range(n):
        s, t = sig[i], sig[i + 1]
        x, denoised = yield x, s, i
        noise = noise_sampler(s, t) if eta > 0 else 0.0
        if t == 0:
            x = denoised
            continue
        h = _lam(t) - _lam(s)
        eta_h = eta * h
        x = (t / s) * math.exp(-eta_h) * x - math.expm1(-h - eta_h) * denoised
        first_order = old_denoised is None or (lower_order_final and n < 15 and i == n - 1)
        if not first_order:
            r = h_last / h
            c = -math.expm1(-h - eta_h)
            if solver_type == "heun":
                c = c / (-h - eta_h) + 1.0
            else:
                c = 0.5 * c
            x = x + c * (1 / r) * (denoised - old_denoised)
        if eta > 0:
            x = x + noise * t * math.sqrt(-math.expm1(-2 * eta_h))
        old_denoised, h_last = denoised, h
    return x


def _ancestral_step(sigma_from: float, sigma_to: float, eta: float) -> tuple[float, float]:
    if not eta:
        return sigma_to, 0.0
    sigma_up = min(sigma_to, eta * math.sqrt(sigma_to**2 * (sigma_from**2 - sigma_to**2) / sigma_from**2))
    return math.sqrt(sigma_to**2 - sigma_up**2), sigma_up


def dpmpp_sde_steps(x, sigmas, eta: float = 1.0, r: float = 0.5, noise_sampler=None, generator=None) -> Steps:
    """k-diffusion's DPM-Solver++ SDE: a stochastic two-stage step with its midpoint at
    lambda + r * h (two denoiser calls per step; the last step to 0 is one call)."""
    if not 0 < r < 1:
        raise ValueError(f"r must lie in (0, 1), got {r!r}")
    sig = as_floats(sigmas)
    noise_sampler = noise_sampler or default_noise_sampler(x, generator)
    fac = 1 / (2 * r)
    for i in range(len(sig) - 1):
        s, t = sig[i], sig[i + 1]
        x, denoised = yield x, s, i
        if t == 0:
            x = denoised
            continue
        h = _lam(t) - _lam(s)
        s_mid = math.exp(-(_lam(s) + h * r))
        sd, su = _ancestral_step(s, s_mid, eta)
        x_2 = (sd / s) * x - (sd / s - 1) * denoised
        if su:
            x_2 = x_2 + noise_sampler(s, s_mid) * su
        x_2, denoised_2 = yield x_2, s_mid, i
        sd, su = _ancestral_step(s, t, eta)
        denoised_d = (1 - fac) * denoised + fac * denoised_2
        x = (sd / s) * x - (sd / s - 1) * denoised_d
        if su:
            x = x + noise_sampler(s, t) * su
    return x


def _drive(steps, denoiser, x, sigmas, extra_args, callback, disable, per_step=1):
    return drive(steps, denoiser, x, extra_args=extra_args, callback=callback, disable=disable,
                 total=per_step * (len(sigmas) - 1))


def sample_dpm_solver_multistep(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, order=2,
                                predict_x0=False, solver_type="midpoint", lower_order_final=True, diffusers_3m=False):
    """Multistep DPM-Solver (noise prediction; `predict_x0=True` gives DPM-Solver++)."""
    return _drive(dpm_solver_multistep_steps(x, sigmas, order, predict_x0, solver_type, lower_order_final,
                                             diffusers_3m),
                  denoiser, x, sigmas, extra_args, callback, disable)


def sample_dpm_solver_singlestep(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, order=2,
                                 predict_x0=False, solver_type="midpoint", lower_order_final=True):
    """Singlestep DPM-Solver-1/2/3 (noise prediction; `predict_x0=True` gives DPM-Solver++(kS))."""
    return _drive(dpm_solver_singlestep_steps(x, sigmas, order, predict_x0, solver_type, lower_order_final),
                  denoiser, x, sigmas, extra_args, callback, disable)


def sample_dpmpp_2m(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, solver_type="midpoint",
                    lower_order_final=True, flow=False):
    """DPM-Solver++(2M) (`flow=True`: on a flow-matching schedule, see `samplers.flow`)."""
    return _drive(dpm_solver_multistep_steps(x, sigmas, 2, True, solver_type, lower_order_final, flow=flow),
                  denoiser, x, sigmas, extra_args, callback, disable)


def sample_dpmpp_3m(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, lower_order_final=True,
                    diffusers_3m=False, flow=False):
    """DPM-Solver++(3M) (third order; `diffusers_3m=True` for diffusers' second-order variant)."""
    return _drive(dpm_solver_multistep_steps(x, sigmas, 3, True, "midpoint", lower_order_final, diffusers_3m, flow),
                  denoiser, x, sigmas, extra_args, callback, disable)


def sample_dpmpp_2s(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, solver_type="midpoint",
                    lower_order_final=True):
    """DPM-Solver++(2S), singlestep."""
    return _drive(dpm_solver_singlestep_steps(x, sigmas, 2, True, solver_type, lower_order_final),
                  denoiser, x, sigmas, extra_args, callback, disable)


def sample_dpmpp_2m_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, eta=1.0,
                        solver_type="midpoint", lower_order_final=True, noise_sampler=None, generator=None):
    """DPM-Solver++(2M) SDE."""
    return _drive(dpmpp_2m_sde_steps(x, sigmas, eta, solver_type, lower_order_final, noise_sampler, generator),
                  denoiser, x, sigmas, extra_args, callback, disable)


def sample_dpmpp_sde(denoiser, x, sigmas, *, extra_args=None, callback=None, disable=None, eta=1.0, r=0.5,
                     noise_sampler=None, generator=None):
    """DPM-Solver++ SDE (k-diffusion's two-stage variant; Gaussian noise, not a Brownian tree)."""
    return _drive(dpmpp_sde_steps(x, sigmas, eta, r, noise_sampler, generator), denoiser, x, sigmas, extra_args,
                  callback, disable, per_step=2)
