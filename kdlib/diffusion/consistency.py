"""The consistency parameterisation and few-step consistency sampling (Song et al. 2023,
"Consistency Models"; Luo et al. 2023, LCM).

A consistency function maps any point (x_t, t) of a PF-ODE trajectory to its origin x0 and must
satisfy the boundary condition f(x, t_min) = x exactly, for any network weights. Built on a
``kdlib.diffusion.param`` parameterisation and a network ``net(x, t, **cond)``:

- ``boundary="param"``: f = x̂0(x_t, net) of the parameterisation. Exact for "fm" and "trigflow"
  (α(0) = 1, σ(0) = 0 and their x̂0 has no division by σ: f(x, 0) = x).
- ``boundary="cm"``: f = c_skip(t)·x_t + (1 − c_skip(t))·x̂0 with
  c_skip = σ_d² / ((r − r_min)² + σ_d²), r = σ(t)/α(t) (the paper's c_skip, eq. in §3, written in
  the noise-to-signal ratio so it applies to every parameterisation; c_skip(t_min) = 1).

Segmented consistency (multistep CD: Heek et al. 2024; MLCM, Xie et al. 2024; Hyper-SD's TSCD,
Ren et al. 2024): the time range is cut at S + 1 edges e_0 = t_min < ... < e_S = t_max and a point
(x_t, t) maps to the trajectory's point at the lower edge e of its segment, not to x0:

    f(x_t, t; e) = α(e)·x̂0 + σ(e)·ε̂,   (x̂0, ε̂) = the network's estimates at (x_t, t)

(a deterministic DDIM step t -> e with the student's estimates). f(x, e; e) = x at every edge for
any weights, because every parameterisation's (x̂0, ε̂) satisfy α(t)·x̂0 + σ(t)·ε̂ = x_t. Sampling
with S steps walks edge to edge (``segment_sample``); ``few_step_sample`` picks that sampler for a
model trained as segmented (``ConsistencyModel.segments`` > 0) and Algorithm 1 otherwise.

States [B, ...] of any trailing shape; t [B].
"""

from __future__ import annotations

import torch
from torch import nn

from kdlib.diffusion.guidance import guided_prediction
from kdlib.diffusion.param import Parameterisation, expand
from kdlib.diffusion.samplers import ddim_step

EXACT_BOUNDARY = ("fm", "trigflow")


class ConsistencyModel(nn.Module):
    """f(x_t, t, **cond) -> x0 estimate [B, ...]; ``net`` is the wrapped prediction network
    (initialise it from a teacher of the same parameterisation for distillation).

    ``f(x_t, t, edge=e, **cond)`` is the segmented consistency function (module docstring); e [B].
    ``f(x_t, t, prediction=True, **cond)`` is the wrapped network's own prediction (the velocity
    for fm): what flow-trained students (reflow) regress, asked through ``forward`` so that a
    DistributedDataParallel wrapper around the model still averages the gradients.
    ``f(x_in, t, net_tangents=(dx_in, dt), **cond)`` is ``network_jvp`` of the wrapped network:
    its own output at its own input (x_in, t) (x_t/σ_d for TrigFlow) and the forward-mode
    derivative along (dx_in, dt), what sCM trains on, asked through ``forward`` for the same reason
    (DDP cannot run inside a ``torch.func.jvp``; this way the jvp runs inside DDP's forward).
    The buffer ``segments`` (0: a plain consistency model) is set by segmented training; it is
    saved with the weights so that a reloaded student samples the way it was trained.
    """

    def __init__(self, net: nn.Module, param: Parameterisation, boundary: str | None = None, sigma_data: float = 0.5):
        super().__init__()
        boundary = boundary or ("param" if param.name in EXACT_BOUNDARY else "cm")
        if boundary not in ("param", "cm"):
            raise ValueError(f"ConsistencyModel: boundary must be 'param' or 'cm', got {boundary!r}")
        if boundary == "param" and param.name not in EXACT_BOUNDARY:
            raise ValueError(f"ConsistencyModel: {param.name!r} has no exact boundary of its own; use boundary='cm'")
        self.net, self.param, self.boundary, self.sigma_data = net, param, boundary, sigma_data
        self.register_buffer("segments", torch.zeros((), dtype=torch.long))

    def c_skip(self, t: torch.Tensor) -> torch.Tensor:
        r_min = self.param.ratio(torch.full_like(t, self.param.t_min))
        r = self.param.ratio(t)
        return self.sigma_data**2 / ((r - r_min) ** 2 + self.sigma_data**2)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, edge: torch.Tensor | None = None,
                prediction: bool = False, net_tangents: tuple[torch.Tensor, torch.Tensor] | None = None,
                **cond) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        if net_tangents is not None:
            return network_jvp(self.net, (x_t, t), net_tangents, **cond)
        pred = self.param.predict(self.net, x_t, t, **cond)
        if prediction:
            return pred
        x0, eps = self.param.to_x0_eps(x_t, pred, t)
        if edge is not None:
            return ddim_step(self.param, x0, eps, t, edge)
        if self.boundary == "param":
            return x0
        c = expand(self.c_skip(t), x_t)
        return c * x_t + (1 - c) * x0


def network_jvp(net: nn.Module, primals: tuple[torch.Tensor, torch.Tensor],
                tangents: tuple[torch.Tensor, torch.Tensor], **cond) -> tuple[torch.Tensor, torch.Tensor]:
    """(net(x, t, **cond), its forward-mode derivative along (dx, dt)) by ``torch.func.jvp``, with
    the graph of the first for a backward pass. primals (x [B, ...], t [B]) as the network is fed;
    tangents (dx, dt) of the same shapes."""

    def f(x: torch.Tensor, time: torch.Tensor) -> torch.Tensor:
        return net(x, time, **cond)

    return torch.func.jvp(f, primals, tangents)


@torch.no_grad()
def consistency_sample(model: nn.Module, param: Parameterisation, noise: torch.Tensor,
                       times: list[float] | tuple[float, ...], generator: torch.Generator | None = None,
                       **cond) -> torch.Tensor:
    """Multistep consistency sampling (Song et al. 2023, Algorithm 1): start from pure noise at
    ``times[0]``, map to x0 with ``model(x_t, t, **cond)``, re-noise to the next time, repeat.
    noise: [B, ...] ~ N(0, I); times: decreasing, in the parameterisation's range."""
    if not times:
        raise ValueError("consistency_sample: times must hold at least one time")
    if any(a <= b for a, b in zip(times, times[1:])):
        raise ValueError(f"consistency_sample: times must decrease, got {list(times)}")
    b = noise.shape[0]
    t = torch.full((b,), float(times[0]), device=noise.device, dtype=noise.dtype)
    alpha, sigma = param.alpha_sigma(t)
    # At t_max α may be 0 (fm) or ≪ σ (edm): the state is noise at the path's scale.
    x = expand(sigma, noise) * noise
    for i, t_val in enumerate(times):
        t = torch.full((b,), float(t_val), device=noise.device, dtype=noise.dtype)
        x0 = model(x, t, **cond)
        if i + 1 < len(times):
            fresh = torch.randn(noise.shape, device=noise.device, dtype=noise.dtype, generator=generator)
            x = param.add_noise(x0, fresh, torch.full_like(t, float(times[i + 1])))
    return x0


def default_times(param: Parameterisation, steps: int) -> list[float]:
    """``steps`` sampling times for a consistency model: t_max, then evenly spaced in the
    parameterisation's own sampling grid (e.g. 2 steps for fm: [1.0, 0.5])."""
    # On the CPU whatever the default device: these are host numbers (a method built under
    # torch.device("meta") for --dry-run could not read them back otherwise).
    grid = param.timesteps(steps, device="cpu")
    return [float(v) for v in grid[:-1]]


def discretisation(param: Parameterisation, n: int, device=None) -> torch.Tensor:
    """``n + 1`` boundary times of the consistency discretisation, ascending from t_min to t_max
    (the parameterisation's own sampling grid reversed: Karras ρ=7 for EDM, uniform for fm)."""
    return param.timesteps(n, device=device).flip(0)


def noise_ratio(param: Parameterisation, t: torch.Tensor, cap: float = 80.0) -> torch.Tensor:
    """σ/α capped at ``cap`` (EDM's σ_max): the EDM noise level of a time, finite at t_max even
    where α(t_max) = 0 (fm, trigflow)."""
    return param.ratio(t).clamp(max=cap).nan_to_num(cap)


def lognormal_interval_probs(param: Parameterisation, grid: torch.Tensor, p_mean: float = -1.1,
                             p_std: float = 2.0) -> torch.Tensor:
    """iCT's discrete log-normal proposal over the intervals [grid_i, grid_{i+1}] ([N] from [N+1]):
    p(i) ∝ erf((log σ_{i+1} − P_mean)/(√2 P_std)) − erf((log σ_i − P_mean)/(√2 P_std)), σ the
    EDM noise level (Song & Dhariwal 2023, §3.5; P_mean = −1.1, P_std = 2.0)."""
    log_sigma = torch.log(noise_ratio(param, grid.double()).clamp(min=1e-12))
    cdf = torch.erf((log_sigma - p_mean) / (2**0.5 * p_std))
    probs = (cdf[1:] - cdf[:-1]).clamp(min=0)
    return probs / probs.sum()


def ict_discretisation_steps(step: int, total_steps: int, s0: int = 10, s1: int = 1280) -> int:
    """iCT's exponential curriculum N(k) = min(s0·2^⌊k/K'⌋, s1) + 1 with
    K' = ⌊K / (log2⌊s1/s0⌋ + 1)⌋ (Song & Dhariwal 2023, eq. 7): the number of intervals at step k."""
    import math

    k_prime = max(1, math.floor(total_steps / (math.log2(s1 // s0) + 1)))
    return min(s0 * 2 ** (step // k_prime), s1) + 1


def solver_step(net, param: Parameterisation, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor,
                cond: dict[str, torch.Tensor], guidance: float | torch.Tensor = 1.0, eta: float = 0.0,
                substeps: int = 1, generator: torch.Generator | None = None) -> torch.Tensor:
    """A teacher's solver step x_t -> x_s of consistency distillation: ``substeps`` DDIM steps of
    ``net`` (CFG scale ``guidance``: a number, or one per sample [B]), evenly spaced in t. η = 0
    follows the PF-ODE (LCM's skipping step); η > 0 is the stochastic DDIM/SDE step with fresh
    noise at every sub-step (SCott).
    x_t: [B, ...]; t, s: [B] float64 times with s ≤ t. Costs ``substeps`` NFE (2× with guidance)."""
    # The end points are kept exact (not t + (s − t)·1) so one sub-step is CD's step bit for bit.
    times = [t, *(t + (s - t) * (j / substeps) for j in range(1, substeps)), s]
    x = x_t
    for a, b in zip(times[:-1], times[1:]):
        x_in, t_in = param.model_input(x, a.to(x.dtype))
        pred = guided_prediction(net, x_in, t_in, cond, guidance)
        x0, eps = param.to_x0_eps(x, pred.to(x.dtype), a.to(x.dtype))
        x = ddim_step(param, x0, eps, a, b, eta=eta, generator=generator)
    return x


def segment_edges(param: Parameterisation, segments: int, device=None) -> torch.Tensor:
    """The ``segments + 1`` segment edges, ascending from t_min to t_max: the consistency
    discretisation with ``segments`` intervals. Every grid is a monotone map of a uniform ramp, so
    when S divides N the edges are the points 0, N/S, 2N/S, ... of the N-interval grid."""
    return discretisation(param, segments, device=device)


@torch.no_grad()
def segment_sample(model: nn.Module, param: Parameterisation, noise: torch.Tensor, steps: int, **cond) -> torch.Tensor:
    """Deterministic segmented consistency sampling: start from pure noise at t_max and apply
    x ← f(x, e_{j+1}; e_j) from edge to edge of ``steps`` segments (``steps`` NFE), returning the
    state at t_min (x0 for fm/trigflow, α·x0 + σ·ε̂ with σ(t_min) ≪ 1 elsewhere, as in training).
    With ``steps`` = the S the model was trained with, each step is exactly a trained map.
    model: ``model(x, t, edge=e, **cond)`` (a ``ConsistencyModel``); noise: [B, ...] ~ N(0, I).
    Without gradients; ``segment_rollout`` is the same chain with them (a loss on the sample)."""
    return segment_rollout(model, param, noise, steps, **cond)


def segment_rollout(model: nn.Module, param: Parameterisation, noise: torch.Tensor, steps: int,
                    **cond) -> torch.Tensor:
    """``segment_sample``'s chain, differentiable: gradients flow through all ``steps`` calls."""
    if steps < 1:
        raise ValueError(f"segment_sample: steps must be >= 1, got {steps}")
    edges = segment_edges(param, steps, device=noise.device).flip(0).to(noise.dtype)
    b = noise.shape[0]
    x = expand(param.alpha_sigma(edges[:1])[1].expand(b), noise) * noise
    for t, e in zip(edges[:-1], edges[1:]):
        x = model(x, t.expand(b), edge=e.expand(b), **cond)
    return x


def few_step_sample(model: nn.Module, param: Parameterisation, noise: torch.Tensor, steps: int,
                    generator: torch.Generator | None = None, **cond) -> torch.Tensor:
    """A consistency model's own few-step sampler: ``segment_sample`` for a model trained as
    segmented (``model.segments`` > 0), else Algorithm 1 at ``default_times``. Domains call this
    so that how a student samples travels with the student, not with the domain."""
    if int(getattr(model, "segments", 0)) > 0:
        return segment_sample(model, param, noise, steps, **cond)
    return consistency_sample(model, param, noise, default_times(param, steps), generator=generator, **cond)
