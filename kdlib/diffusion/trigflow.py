"""TrigFlow (Lu & Song 2024, "Simplifying, Stabilizing and Scaling Continuous-Time Consistency
Models"): one parameterisation that covers EDM and flow matching.

    x_t = cos(t)·x0 + sin(t)·z,   z ~ N(0, σ_d² I),   t ∈ [0, π/2]

The PF-ODE velocity is dx_t/dt = cos(t)·z − sin(t)·x0. The network is used as
σ_d·F(x_t/σ_d, t) ≈ dx_t/dt ("F-prediction"), and the consistency function is
f(x_t, t) = cos(t)·x_t − sin(t)·σ_d·F(x_t/σ_d, t), which is x0 when F is exact.

All functions take t as [B] and states of any shape [B, ...] (broadcast over trailing dims).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

T_MAX = math.pi / 2


def expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t: [B] -> [B, 1, ..., 1] broadcastable against ``like``: [B, ...]."""
    return t.reshape(t.shape[0], *([1] * (like.dim() - 1))).to(like.dtype)


def add_noise(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = cos(t)·x0 + sin(t)·z (z already carries the σ_d scale)."""
    return torch.cos(expand(t, x0)) * x0 + torch.sin(expand(t, x0)) * z


def velocity(x0: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """dx_t/dt = cos(t)·z − sin(t)·x0: the training target of σ_d·F."""
    return torch.cos(expand(t, x0)) * z - torch.sin(expand(t, x0)) * x0


def x0_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Inverse rotation: x0 = cos(t)·x_t − sin(t)·v."""
    return torch.cos(expand(t, x_t)) * x_t - torch.sin(expand(t, x_t)) * v


def noise_from_velocity(x_t: torch.Tensor, v: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """z = sin(t)·x_t + cos(t)·v."""
    return torch.sin(expand(t, x_t)) * x_t + torch.cos(expand(t, x_t)) * v


def velocity_from_x0(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v from an x0-prediction: v = (cos(t)·x_t − x0) / sin(t) (undefined at t = 0)."""
    return (torch.cos(expand(t, x_t)) * x_t - x0) / torch.sin(expand(t, x_t))


def velocity_from_noise(x_t: torch.Tensor, z: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """v from a noise-prediction (z with the σ_d scale): v = (z − sin(t)·x_t) / cos(t)."""
    return (z - torch.sin(expand(t, x_t)) * x_t) / torch.cos(expand(t, x_t))


def from_alpha_sigma(
    alpha: torch.Tensor, sigma: torch.Tensor, sigma_d: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Map a state x = α·x0 + σ·ε (ε ~ N(0, I): VP, EDM with α=1, flow matching with α=1−s, σ=s)
    to TrigFlow: returns (t, c) with c·x = cos(t)·x0 + sin(t)·σ_d·ε, i.e. tan t = σ / (σ_d·α)."""
    t = torch.atan2(sigma, sigma_d * alpha)
    return t, torch.cos(t) / alpha


def to_alpha_sigma(t: torch.Tensor, sigma_d: float) -> tuple[torch.Tensor, torch.Tensor]:
    """TrigFlow time -> (α, σ) with ε ~ N(0, I): α = cos(t), σ = σ_d·sin(t)."""
    return torch.cos(t), sigma_d * torch.sin(t)


def f_velocity(net: Callable[..., torch.Tensor], x_t: torch.Tensor, t: torch.Tensor, sigma_d: float,
               **cond) -> torch.Tensor:
    """The PF-ODE velocity σ_d·F(x_t/σ_d, t) of an F-prediction network ``net(x, t, **cond)``."""
    return sigma_d * net(x_t / sigma_d, t, **cond)


def consistency_fn(x_t: torch.Tensor, t: torch.Tensor, f_pred: torch.Tensor, sigma_d: float) -> torch.Tensor:
    """f(x_t, t) = cos(t)·x_t − sin(t)·σ_d·F: the x0 estimate of a consistency model."""
    return x0_from_velocity(x_t, sigma_d * f_pred, t)


def sample_time(batch: int, *, p_mean: float = -1.0, p_std: float = 1.4, sigma_d: float = 0.5,
                device=None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Training times t = arctan(e^τ / σ_d), τ ~ N(p_mean, p_std²) (sCM's log-normal proposal)."""
    tau = p_mean + p_std * torch.randn(batch, device=device, generator=generator)
    return torch.atan(torch.exp(tau) / sigma_d)


@torch.no_grad()
def consistency_sample(net: Callable[..., torch.Tensor], z: torch.Tensor, sigma_d: float,
                       times: tuple[float, ...] = (T_MAX,), generator: torch.Generator | None = None,
                       **cond) -> torch.Tensor:
    """Few-step consistency sampling. z: [B, ...] ~ N(0, I) (scaled by σ_d here); ``times`` from
    T_MAX down: denoise at each time, re-noise to the next one."""
    if not times:
        raise ValueError("consistency_sample: times must hold at least one time")
    x = sigma_d * z
    for i, t_val in enumerate(times):
        t = torch.full((z.shape[0],), t_val, device=z.device, dtype=z.dtype)
        x0 = consistency_fn(x, t, net(x / sigma_d, t, **cond), sigma_d)
        if i + 1 < len(times):
            noise = sigma_d * torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
            x = add_noise(x0, noise, torch.full_like(t, times[i + 1]))
    return x0
