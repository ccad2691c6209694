"""ReparameterisedNet: a network of one parameterisation seen through another is exact, and its
time derivative under torch.func.jvp matches finite differences (what sCM relies on)."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.reparam import ReparameterisedNet


class PairOracle(nn.Module):
    """The exact prediction of ``param`` for one fixed pair (x0, ε): every state x_t of that pair
    maps back to it, so the converted prediction must be the destination's exact target."""

    def __init__(self, param, x0, eps):
        super().__init__()
        self.param, self.x0, self.eps = param, x0, eps

    def forward(self, x_in, t_in):
        x_t, t = self.param.state_from_model_input(x_in, t_in)
        return self.param.from_x0_eps(x_t, self.x0, self.eps, t)


@pytest.mark.parametrize("src", ["fm", "edm", "vp-eps", "vp-v"])
@pytest.mark.parametrize("dst", ["trigflow", "fm", "edm"])
def test_conversion_is_exact_for_every_pair(src, dst):
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    eps = torch.randn(5, 3, 4, generator=g, dtype=torch.float64)
    p_src, p_dst = get_parameterisation(src), get_parameterisation(dst)
    net = ReparameterisedNet(PairOracle(p_src, x0, eps), p_src, p_dst)
    # interior times of the destination (EDM from 0.01 so that VP's t_min is not crossed)
    lo, hi = (0.05, 20.0) if dst == "edm" else (0.05 * p_dst.t_max, 0.9 * p_dst.t_max)
    t = torch.linspace(lo, hi, 5, dtype=torch.float64)
    x_t = p_dst.add_noise(x0, eps, t)
    pred = p_dst.predict(net, x_t, t)
    want = p_dst.from_x0_eps(x_t, x0, eps, t)
    assert torch.allclose(pred, want, rtol=1e-7, atol=1e-8), (pred - want).abs().max()
    assert net.parameterisation == dst


def test_pure_noise_end_of_trigflow_is_finite():
    """At t = π/2 (α = 0) σ/α is infinite; the wrapper stays finite and near the exact value."""
    fm, tf = get_parameterisation("fm"), get_parameterisation("trigflow")
    x0, eps = torch.randn(2, 6, dtype=torch.float64), torch.randn(2, 6, dtype=torch.float64)
    net = ReparameterisedNet(PairOracle(fm, x0, eps), fm, tf)
    t = torch.full((2,), math.pi / 2, dtype=torch.float64)
    x_t = tf.add_noise(x0, eps, t)
    pred = tf.predict(net, x_t, t)
    assert torch.isfinite(pred).all()
    assert torch.allclose(pred, tf.from_x0_eps(x_t, x0, eps, t), atol=1e-4)


def test_time_derivative_through_the_wrapper_matches_finite_differences():
    fm, tf = get_parameterisation("fm"), get_parameterisation("trigflow")
    torch.manual_seed(0)
    inner = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 4)).double()

    class Velocity(nn.Module):
        def forward(self, x, t):
            return inner(torch.cat([x, t[:, None]], dim=1))

    net = ReparameterisedNet(Velocity(), fm, tf)
    x = torch.randn(3, 4, dtype=torch.float64)
    t = torch.tensor([0.2, 0.8, 1.4], dtype=torch.float64)
    tx, tt = torch.randn_like(x), torch.ones_like(t)
    _, tangent = torch.func.jvp(lambda a, b: net(a, b), (x, t), (tx, tt))
    h = 1e-6
    fd = (net(x + h * tx, t + h * tt) - net(x - h * tx, t - h * tt)) / (2 * h)
    assert torch.allclose(tangent, fd, rtol=1e-5, atol=1e-7)


def test_a_destination_without_an_inverse_model_input_is_refused():
    class Opaque:
        name = "opaque"

    with pytest.raises(TypeError, match="cannot invert"):
        ReparameterisedNet(nn.Identity(), get_parameterisation("fm"), Opaque())
