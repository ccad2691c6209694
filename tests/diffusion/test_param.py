"""Parameterisations: noising, prediction round trips, exact conversions between them."""

from __future__ import annotations

import pytest
import torch

from kdlib.diffusion.param import (
    PARAMETERISATIONS,
    convert_prediction,
    convert_state,
    get_parameterisation,
)

NAMES = list(PARAMETERISATIONS)


def _times(param, n, g):
    lo, hi = param.t_min, param.t_max
    return lo + (hi - lo) * (0.05 + 0.9 * torch.rand(n, generator=g, dtype=torch.float64))


@pytest.mark.parametrize("name", NAMES)
def test_prediction_round_trip(name, seeded):
    param = get_parameterisation(name)
    x0 = torch.randn(5, 2, 3, 4, generator=seeded, dtype=torch.float64)
    eps = torch.randn(5, 2, 3, 4, generator=seeded, dtype=torch.float64)
    t = _times(param, 5, seeded)
    x_t = param.add_noise(x0, eps, t)
    pred = param.from_x0_eps(x_t, x0, eps, t)
    x0_back, eps_back = param.to_x0_eps(x_t, pred, t)
    torch.testing.assert_close(x0_back, x0)
    torch.testing.assert_close(eps_back, eps)
    # and the other way: any prediction maps to a consistent (x0, ε) with x_t = α·x0 + σ·ε
    other = torch.randn_like(x0)
    a, e = param.to_x0_eps(x_t, other, t)
    torch.testing.assert_close(param.add_noise(a, e, t), x_t)
    torch.testing.assert_close(param.from_x0_eps(x_t, a, e, t), other)


@pytest.mark.parametrize("name", NAMES)
def test_time_from_ratio_inverts_ratio(name, seeded):
    param = get_parameterisation(name)
    t = _times(param, 16, seeded)
    torch.testing.assert_close(param.time_from_ratio(param.ratio(t)), t)


def test_alpha_sigma_derivative_matches_finite_difference():
    for name in NAMES:
        param = get_parameterisation(name)
        t = torch.tensor([0.3 * param.t_max + 0.01], dtype=torch.float64)
        da, ds = param.alpha_sigma_dt(t)
        h = 1e-6
        (a1, s1), (a0, s0) = param.alpha_sigma(t + h), param.alpha_sigma(t - h)
        torch.testing.assert_close(da, (a1 - a0) / (2 * h), rtol=1e-5, atol=1e-8)
        torch.testing.assert_close(ds, (s1 - s0) / (2 * h), rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("src", NAMES)
@pytest.mark.parametrize("dst", NAMES)
def test_conversion_between_parameterisations(src, dst, seeded):
    p_src, p_dst = get_parameterisation(src), get_parameterisation(dst)
    x0 = torch.randn(4, 7, generator=seeded, dtype=torch.float64)
    eps = torch.randn(4, 7, generator=seeded, dtype=torch.float64)
    # times where both parameterisations reach the same noise level
    r = torch.tensor([0.05, 0.3, 1.0, 3.0], dtype=torch.float64)
    t = p_src.time_from_ratio(r)
    x_t = p_src.add_noise(x0, eps, t)
    pred = p_src.from_x0_eps(x_t, x0, eps, t)
    pred_dst, x_dst, t_dst = convert_prediction(pred, x_t, t, p_src, p_dst)
    # the converted state is the dst path's state for the same (x0, ε), and the prediction is exact
    torch.testing.assert_close(x_dst, p_dst.add_noise(x0, eps, t_dst))
    torch.testing.assert_close(pred_dst, p_dst.from_x0_eps(x_dst, x0, eps, t_dst))
    # and back
    x_back, t_back = convert_state(x_dst, t_dst, p_dst, p_src)
    torch.testing.assert_close(x_back, x_t)
    torch.testing.assert_close(t_back, t)


def test_unknown_name_lists_choices():
    with pytest.raises(ValueError, match="fm"):
        get_parameterisation("ddpm")


def test_edm_timesteps_follow_karras_schedule():
    steps = get_parameterisation("edm").timesteps(4)
    assert steps[0].item() == pytest.approx(80.0)
    assert steps[-1].item() == pytest.approx(0.002)
    assert torch.all(steps[1:] < steps[:-1])
