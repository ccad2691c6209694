"""Teacher samplers for any parameterisation: Euler and Heun on the probability-flow ODE, DDIM
with controllable stochasticity (η = 0: deterministic DDIM; η > 0: the SDE / ancestral sampler,
η = 1 is DDPM's posterior), and DPM-Solver++(2M).

All of them step a state along decreasing ``times`` (a [K+1] tensor, ``param.timesteps(K)``)
using a ``denoise(x_t, t) -> (x̂0, ε̂)`` function (``make_denoiser``: network + parameterisation +
classifier-free guidance). The probability-flow ODE of x_t = α(t)·x0 + σ(t)·ε is

    dx/dt = α'(t)·x̂0 + σ'(t)·ε̂.

- Euler, Heun (Karras et al. 2022, Alg. 1): on that ODE in the parameterisation's own time;
  orders 1 and 2.
- DDIM (Song et al. 2021, eq. 12): x_s = α_s·x̂0 + √(σ_s² − c²)·ε̂ + c·ξ with
  c = η·σ_s·√(1 − SNR_t/SNR_s), SNR = α²/σ²; first order.
- DPM-Solver++(2M) (Lu et al. 2022, Alg. 2): multistep in λ = log(α/σ) with x̂0 predictions;
  second order, first order at the first and last step.

States [B, ...] of any trailing shape. Each call of ``denoise`` is one network evaluation (NFE).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from kdlib.diffusion.guidance import guided_prediction
from kdlib.diffusion.param import Parameterisation

Denoise = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def make_denoiser(net, param: Parameterisation, cond: dict[str, torch.Tensor] | None = None,
                  guidance: float | torch.Tensor = 1.0) -> Denoise:
    """(x_t, t) -> (x̂0, ε̂) of ``net(model_input(x_t, t), **cond)``, guided by ``guidance`` (a
    number, or one scale per sample [B])."""
    cond = cond or {}

    def denoise(x: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x_in, t_in = param.model_input(x, t)
        pred = guided_prediction(net, x_in, t_in, cond, guidance)
        return param.to_x0_eps(x, pred, t)

    return denoise


def _alpha_sigma(param: Parameterisation, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """α, σ [] (float64) at a scalar time t []. The schedule stays in 0-dim tensors, never read
    into Python floats: no host sync per step on a GPU, and the --dry-run estimator's fake tensors
    have no values to read. As the second operand of a product with a state (``x * c``), a 0-dim
    tensor c gives exactly the numbers the Python float gave: the result keeps the state's dtype,
    and the CPU kernels take c as the same scalar (as the first operand, bf16 kernels would round
    it to bf16 first)."""
    return param.alpha_sigma(t.to(torch.float64))


def _time(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The scalar time t [] as the network's time input [B], in x's dtype and on its device."""
    return t.to(device=x.device, dtype=x.dtype).repeat(x.shape[0])


def _slope(param: Parameterisation, denoise: Denoise, x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx/dt [B, ...] of the PF-ODE at (x [B, ...], scalar t [])."""
    x0, eps = denoise(x, _time(t, x))
    d_alpha, d_sigma = param.alpha_sigma_dt(t.to(torch.float64).reshape(1))
    return x0 * d_alpha[0] + eps * d_sigma[0]


@torch.no_grad()
def euler(denoise: Denoise, param: Parameterisation, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    for t, s in zip(times[:-1], times[1:]):
        x = x + _slope(param, denoise, x, t) * (s - t)
    return x


@torch.no_grad()
def heun(denoise: Denoise, param: Parameterisation, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    for t, s in zip(times[:-1], times[1:]):
        d = _slope(param, denoise, x, t)
        x_euler = x + d * (s - t)
        x = x + (d + _slope(param, denoise, x_euler, s)) * ((s - t) * 0.5)
    return x


@torch.no_grad()
def ddim(denoise: Denoise, param: Parameterisation, x: torch.Tensor, times: torch.Tensor, eta: float = 0.0,
         generator: torch.Generator | None = None) -> torch.Tensor:
    for t, s in zip(times[:-1], times[1:]):
        x0, eps = denoise(x, _time(t, x))
        x = ddim_step(param, x0, eps, t, s, eta=eta, generator=generator)
    return x


def ddim_step(param: Parameterisation, x0: torch.Tensor, eps: torch.Tensor, t, s, eta: float = 0.0,
              generator: torch.Generator | None = None) -> torch.Tensor:
    """One DDIM update t -> s from the estimates (x̂0, ε̂) at t; t, s scalars or [B] tensors."""
    t = torch.as_tensor(t, dtype=torch.float64, device=x0.device).reshape(-1)
    s = torch.as_tensor(s, dtype=torch.float64, device=x0.device).reshape(-1)
    a_t, s_t = param.alpha_sigma(t)
    a_s, s_s = param.alpha_sigma(s)
    c = torch.zeros_like(s_s)
    if eta > 0:
        snr_ratio = torch.where(s_s > 0, (a_t * s_s / (s_t * a_s)) ** 2, torch.zeros_like(s_s))
        c = eta * s_s * torch.sqrt((1 - snr_ratio).clamp(min=0))
    shape = (-1, *([1] * (x0.dim() - 1)))
    a_s, keep, c = (v.to(x0.dtype).reshape(shape) for v in (a_s, torch.sqrt(s_s**2 - c**2), c))
    out = a_s * x0 + keep * eps
    if eta > 0:
        out = out + c * torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
    return out


@torch.no_grad()
def dpm_solver_2m(denoise: Denoise, param: Parameterisation, x: torch.Tensor, times: torch.Tensor) -> torch.Tensor:
    x0_prev, h_prev = None, None
    for t, s in zip(times[:-1], times[1:]):
        x0, _ = denoise(x, _time(t, x))
        a_t, s_t = _alpha_sigma(param, t)
        a_s, s_s = _alpha_sigma(param, s)
        # λ = log(α/σ): −inf at pure noise where α = 0 (fm, TrigFlow), +inf at σ = 0 (the last step).
        lam_t, lam_s = torch.log(a_t / s_t), torch.log(a_s / s_s)
        h = lam_s - lam_t
        d = x0
        if x0_prev is not None:
            # Second order only between two finite steps (first and last steps are first order),
            # chosen by torch.where rather than by reading h: the first-order case is c = 0.
            r = h_prev / h
            c = torch.where(torch.isfinite(h) & torch.isfinite(h_prev), 1 / (2 * r), 0.0)
            d = x0 * (1 + c) - x0_prev * c
        ratio = s_s / s_t
        x = x * ratio - d * (a_s * torch.expm1(-h))
        x0_prev, h_prev = x0, h
    return x


SAMPLERS = ("euler", "heun", "ddim", "sde", "dpm++2m")


@torch.no_grad()
def sample(net, param: Parameterisation, noise: torch.Tensor, steps: int, sampler: str = "euler",
           cond: dict[str, torch.Tensor] | None = None, guidance: float = 1.0, eta: float = 1.0,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """Samples from a prediction network: noise [B, ...] ~ N(0, I) scaled to t_max, ``steps``
    steps of ``sampler`` ("sde" is DDIM with noise level ``eta``). Heun costs 2 NFE per step."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {', '.join(SAMPLERS)}")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    denoise = make_denoiser(net, param, cond, guidance)
    times = param.timesteps(steps, device=noise.device)
    x = noise * _alpha_sigma(param, times[0])[1]
    if sampler == "euler":
        return euler(denoise, param, x, times)
    if sampler == "heun":
        return heun(denoise, param, x, times)
    if sampler == "dpm++2m":
        return dpm_solver_2m(denoise, param, x, times)
    return ddim(denoise, param, x, times, eta=eta if sampler == "sde" else 0.0, generator=generator)
