"""Segmented consistency (multistep CD): the boundary at every segment edge, edges on the training
grid, S-step sampling against the exact PF-ODE solution of a Gaussian toy, the sampler a student
carries, and the teacher solver step (sub-steps, SDE noise).

Gaussian toy: data x0 ~ N(μ, s²) per element, so x_t ~ N(α·μ, α²s² + σ²) and the PF-ODE keeps the
z-score z = (x_t − α·μ)/√(α²s² + σ²): its point at time e is α_e·μ + √(α_e²s² + σ_e²)·z.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlib.diffusion.consistency import (
    ConsistencyModel,
    discretisation,
    few_step_sample,
    segment_edges,
    segment_sample,
    solver_step,
)
from kdlib.diffusion.param import PARAMETERISATIONS, get_parameterisation
from tests.diffusion.nets import RandomNet

MU, S = 0.7, 0.5


def unwrap(param, x_in, t_in):
    """(x_t, t) from what ``param.model_input`` feeds a network."""
    if param.name == "edm":
        t = torch.exp(4 * t_in)
        return x_in * torch.sqrt(t**2 + param.sigma_data**2).reshape(-1, 1), t
    if param.name == "trigflow":
        return x_in * param.sigma_data, t_in
    return x_in, t_in


def ode_point(param, x, t, e):
    """The exact PF-ODE state at time e of the trajectory through (x, t). x: [B, D]; t, e: [B]."""
    a_t, s_t = (v.reshape(-1, 1) for v in param.alpha_sigma(t))
    a_e, s_e = (v.reshape(-1, 1) for v in param.alpha_sigma(e))
    z = (x - a_t * MU) / torch.sqrt(a_t**2 * S**2 + s_t**2)
    return a_e * MU + torch.sqrt(a_e**2 * S**2 + s_e**2) * z


class ExactSegmentNet(nn.Module):
    """The exact segmented consistency network of the toy for fixed edges: at (x_t, t) it predicts
    the (x̂0, ε̂) with α_t·x̂0 + σ_t·ε̂ = x_t and α_e·x̂0 + σ_e·ε̂ = x_e (exact), e the lower edge."""

    def __init__(self, param, edges):
        super().__init__()
        self.param, self.edges = param, edges

    def forward(self, x_in, t_in):
        param = self.param
        x, t = unwrap(param, x_in, t_in)
        # t comes back from EDM's log-time input with rounding: below an edge by a hair is the edge
        below = torch.searchsorted(self.edges, (t * (1 - 1e-9)).contiguous()) - 1
        e = self.edges[below.clamp(min=0)]
        x_e = ode_point(param, x, t, e)
        a_t, s_t = (v.reshape(-1, 1) for v in param.alpha_sigma(t))
        a_e, s_e = (v.reshape(-1, 1) for v in param.alpha_sigma(e))
        det = a_t * s_e - a_e * s_t
        x0, eps = (s_e * x - s_t * x_e) / det, (a_t * x_e - a_e * x) / det
        return param.from_x0_eps(x, x0, eps, t)


class GaussianDenoiser(nn.Module):
    """The exact denoiser E[x0 | x_t] of the toy, as a ``param`` prediction."""

    def __init__(self, param):
        super().__init__()
        self.param = param

    def forward(self, x_in, t_in):
        x, t = unwrap(self.param, x_in, t_in)
        alpha, sigma = (v.reshape(-1, 1) for v in self.param.alpha_sigma(t))
        var = alpha**2 * S**2 + sigma**2
        x0 = MU + alpha * S**2 / var * (x - alpha * MU)
        return self.param.from_x0_eps(x, x0, sigma / var * (x - alpha * MU), t)


@pytest.mark.parametrize("name", list(PARAMETERISATIONS))
def test_segment_boundary_holds_at_every_edge(name, seeded):
    param = get_parameterisation(name)
    model = ConsistencyModel(RandomNet(), param, boundary="cm")
    x = torch.randn(5, 6, generator=seeded, dtype=torch.float64)
    edges = segment_edges(param, 4)
    for e in edges:
        e = e.expand(5)
        torch.testing.assert_close(model(x, e, edge=e), x, rtol=1e-10, atol=1e-10)
    # between edges the network matters
    t = 0.5 * (edges[1] + edges[2])
    assert (model(x, t.expand(5), edge=edges[1].expand(5)) - x).abs().max() > 1e-3


@pytest.mark.parametrize("name", list(PARAMETERISATIONS))
def test_segment_edges_are_points_of_the_training_grid(name):
    param = get_parameterisation(name)
    edges = segment_edges(param, 4)
    assert edges[0] == pytest.approx(param.t_min) and edges[-1] == pytest.approx(param.t_max)
    torch.testing.assert_close(edges, discretisation(param, 12)[::3], rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", list(PARAMETERISATIONS))
@pytest.mark.parametrize("segments", [1, 3])
def test_segment_sampling_is_the_exact_ode_solution(name, segments):
    param = get_parameterisation(name)
    model = ConsistencyModel(ExactSegmentNet(param, segment_edges(param, segments)), param, boundary="cm")
    noise = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).reshape(-1, 1)
    t_max = torch.full((11,), param.t_max, dtype=torch.float64)
    x_max = param.alpha_sigma(t_max)[1].reshape(-1, 1) * noise
    exact = ode_point(param, x_max, t_max, torch.full_like(t_max, param.t_min))
    calls = []
    model.register_forward_hook(lambda m, args, kwargs, out: calls.append(float(args[1][0])), with_kwargs=True)
    out = segment_sample(model, param, noise, segments)
    torch.testing.assert_close(out, exact, rtol=1e-9, atol=1e-9)
    assert calls == pytest.approx(segment_edges(param, segments).flip(0)[:-1].tolist())
    # the same network sampled with edges it was not built for is off the trajectory
    assert (segment_sample(model, param, noise, segments + 1) - exact).abs().max() > 1e-3


def test_student_carries_its_sampler(seeded):
    param = get_parameterisation("fm")
    model = ConsistencyModel(RandomNet(), param)
    noise = torch.randn(4, 6, generator=seeded, dtype=torch.float64)
    draw = [few_step_sample(model, param, noise, 2, generator=torch.Generator().manual_seed(i)) for i in (0, 1)]
    assert (draw[0] - draw[1]).abs().max() > 1e-3  # Algorithm 1 re-noises: stochastic
    model.segments.fill_(2)
    reloaded = ConsistencyModel(RandomNet(), param)
    reloaded.load_state_dict(model.state_dict())  # the choice is saved with the weights
    assert int(reloaded.segments) == 2
    out = few_step_sample(reloaded, param, noise, 2, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out, segment_sample(model, param, noise, 2))


@pytest.mark.parametrize("name", ["fm", "edm", "vp-eps"])
def test_solver_substeps_converge_to_the_ode(name):
    param = get_parameterisation(name)
    net = GaussianDenoiser(param)
    x = torch.linspace(-2.0, 2.0, 9, dtype=torch.float64).reshape(-1, 1)
    grid = discretisation(param, 4)
    t, s = grid[3].expand(9), grid[1].expand(9)
    x_t = ode_point(param, x, torch.full_like(t, param.t_max), t)
    exact = ode_point(param, x_t, t, s)
    errors = [(solver_step(net, param, x_t, t, s, {}, substeps=m) - exact).abs().max().item() for m in (1, 4, 16)]
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] < 0.7 * errors[1], errors  # first order: ~4x per 4x sub-steps, asymptotically


def test_sde_step_keeps_the_marginal_and_forgets_the_noise():
    # Point-mass data at μ: ε̂ is exact, so x_s = α_s·μ + σ_s·(√(1−c²/σ_s²)·ε + c/σ_s·ξ).
    param = get_parameterisation("fm")

    def net(x, t):
        return (x - MU) / t.reshape(-1, 1)

    g = torch.Generator().manual_seed(0)
    eps = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    t, s = torch.full((20000,), 0.8, dtype=torch.float64), torch.full((20000,), 0.4, dtype=torch.float64)
    x_t = param.add_noise(torch.full_like(eps, MU), eps, t)
    corr = []
    for eta in (0.0, 0.5, 1.0):
        z = (solver_step(net, param, x_t, t, s, {}, eta=eta, substeps=2, generator=g) - 0.6 * MU) / 0.4
        assert z.std().item() == pytest.approx(1.0, abs=0.03)
        corr.append(torch.corrcoef(torch.cat([z, eps], 1).T)[0, 1].item())
    assert corr[0] == pytest.approx(1.0, abs=1e-9) and corr[0] > corr[1] + 0.05 > corr[2] + 0.1
