"""Samplers on a Gaussian toy whose PF-ODE solution is known exactly.

Data x0 ~ N(μ, s²) per element. Then x_t ~ N(α·μ, α²s² + σ²), the exact denoiser is
E[x0|x_t] = μ + α·s²/(α²s² + σ²)·(x_t − α·μ), and the PF-ODE maps x_T to x0 by keeping the
z-score: x0 = μ + s·(x_T − α_T·μ)/√(α_T²s² + σ_T²).
"""

from __future__ import annotations

import math

import pytest
import torch

from kdlib.diffusion import samplers
from kdlib.diffusion.guidance import drop_condition, guided_prediction, null_condition
from kdlib.diffusion.param import get_parameterisation

MU, S = 0.7, 0.5


def exact_net(param):
    """A perfect prediction network for the Gaussian toy, in ``param``'s prediction type."""

    def net(x_in, t_in):
        x, t = x_in, t_in
        if param.name == "trigflow":
            x = x_in * param.sigma_data
        if param.name == "edm":
            t = torch.exp(4 * t_in)
            x = x_in * torch.sqrt(t**2 + param.sigma_data**2).reshape(-1, 1)
        alpha, sigma = (v.reshape(-1, 1) for v in param.alpha_sigma(t))
        var = alpha**2 * S**2 + sigma**2
        x0 = MU + alpha * S**2 / var * (x - alpha * MU)
        eps = sigma / var * (x - alpha * MU)
        return param.from_x0_eps(x, x0, eps, t)

    return net


def endpoint_error(param, sampler, steps, noise):
    times = param.timesteps(steps)
    x_t = float(param.alpha_sigma(times[:1].double())[1]) * noise
    a_T, s_T = (float(v) for v in param.alpha_sigma(times[:1].double()))
    exact = MU + S * (x_t - a_T * MU) / math.sqrt(a_T**2 * S**2 + s_T**2)
    out = samplers.sample(exact_net(param), param, noise, steps, sampler)
    return (out - exact).abs().max().item()


@pytest.mark.parametrize("sampler,order,name,n", [
    ("euler", 1, "fm", 32), ("euler", 1, "trigflow", 32), ("euler", 1, "edm", 32), ("euler", 1, "vp-v", 32),
    ("ddim", 1, "fm", 32), ("ddim", 1, "trigflow", 32), ("ddim", 1, "edm", 32), ("ddim", 1, "vp-v", 32),
    ("heun", 2, "fm", 32), ("heun", 2, "trigflow", 16), ("heun", 2, "edm", 32),
])
def test_error_falls_at_expected_order(sampler, order, name, n):
    param = get_parameterisation(name)
    noise = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).reshape(-1, 1)
    e1, e2 = endpoint_error(param, sampler, n, noise), endpoint_error(param, sampler, 2 * n, noise)
    assert e2 < e1 < 0.15
    assert math.log2(e1 / e2) == pytest.approx(order, abs=0.3), (e1, e2)


@pytest.mark.parametrize("name", ["fm", "trigflow", "edm"])
def test_dpm_solver_2m_beats_first_order(name):
    # Its first and last steps are first order (infinite log-SNR step at pure noise / at t = 0),
    # so on these short grids the clean second-order rate does not show; it still wins by 5x+.
    param = get_parameterisation(name)
    noise = torch.linspace(-2.5, 2.5, 11, dtype=torch.float64).reshape(-1, 1)
    errors = [endpoint_error(param, "dpm++2m", n, noise) for n in (16, 32, 64)]
    assert errors[2] < errors[1] < errors[0]
    assert errors[2] * 5 < endpoint_error(param, "ddim", 64, noise)


def test_sde_sampler_matches_target_distribution():
    param = get_parameterisation("fm")
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(20000, 1, generator=g, dtype=torch.float64)
    out = samplers.sample(exact_net(param), param, noise, 200, "sde", eta=1.0, generator=g)
    assert out.mean().item() == pytest.approx(MU, abs=0.02)
    assert out.std().item() == pytest.approx(S, abs=0.02)
    # η = 0 is deterministic DDIM: the same as the "ddim" sampler
    torch.testing.assert_close(samplers.sample(exact_net(param), param, noise[:5], 8, "sde", eta=0.0),
                               samplers.sample(exact_net(param), param, noise[:5], 8, "ddim"))


def test_unknown_sampler_and_bad_steps():
    param = get_parameterisation("fm")
    with pytest.raises(ValueError, match="dpm"):
        samplers.sample(exact_net(param), param, torch.zeros(1, 1), 4, "plms")
    with pytest.raises(ValueError, match="steps"):
        samplers.sample(exact_net(param), param, torch.zeros(1, 1), 0, "euler")


def test_classifier_free_guidance(seeded):
    def net(x, t, y):
        # conditional: y-dependent shift; unconditional (y = -1): none
        return x * 2 + (y >= 0).to(x.dtype).reshape(-1, 1) * (y.to(x.dtype).reshape(-1, 1) + 1)

    x = torch.randn(4, 3, generator=seeded)
    t = torch.rand(4, generator=seeded)
    cond = {"y": torch.tensor([0, 1, 2, 3])}
    c, u = net(x, t, **cond), net(x, t, **null_condition(cond))
    torch.testing.assert_close(guided_prediction(net, x, t, cond, 1.0), c)
    torch.testing.assert_close(guided_prediction(net, x, t, cond, 0.0), u)
    torch.testing.assert_close(guided_prediction(net, x, t, cond, 3.0), u + 3 * (c - u))
    emb = {"e": torch.ones(4, 2)}
    assert null_condition(emb)["e"].abs().sum() == 0
    dropped = drop_condition(cond, 1.0)["y"]
    assert torch.all(dropped == -1)
    assert torch.equal(drop_condition(cond, 0.0)["y"], cond["y"])


# -- the schedule kept in tensors (no host reads) -------------------------------------------------
def _host_float_sample(net, param, noise, steps, sampler, generator=None):
    """The samplers as they were before the schedule moved into 0-dim tensors: every α, σ, time
    and step size read into a Python float (a host sync per step on a GPU; no value on fakes)."""
    denoise = samplers.make_denoiser(net, param)
    times = param.timesteps(steps, device=noise.device)

    def scalars(t):
        alpha, sigma = param.alpha_sigma(t.to(torch.float64))
        return float(alpha), float(sigma)

    def time(t, x):
        return torch.full((x.shape[0],), float(t), device=x.device, dtype=x.dtype)

    def slope(x, t):
        x0, eps = denoise(x, time(t, x))
        d_alpha, d_sigma = param.alpha_sigma_dt(t.to(torch.float64).reshape(1))
        return float(d_alpha) * x0 + float(d_sigma) * eps

    x = scalars(times[0])[1] * noise
    x0_prev, h_prev = None, None
    for t, s in zip(times[:-1], times[1:]):
        if sampler == "euler":
            x = x + float(s - t) * slope(x, t)
        elif sampler == "heun":
            d = slope(x, t)
            x = x + float(s - t) * 0.5 * (d + slope(x + float(s - t) * d, s))
        elif sampler == "dpm++2m":
            x0, _ = denoise(x, time(t, x))
            (a_t, s_t), (a_s, s_s) = scalars(t), scalars(s)
            lam_t = torch.log(torch.tensor(a_t / s_t, dtype=torch.float64))
            lam_s = torch.log(torch.tensor(a_s / s_s if s_s > 0 else float("inf"), dtype=torch.float64))
            h = float(lam_s - lam_t)
            d = x0
            if x0_prev is not None and abs(h) != float("inf") and abs(h_prev) != float("inf"):
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (s_s / s_t) * x - a_s * float(torch.expm1(torch.tensor(-h, dtype=torch.float64))) * d
            x0_prev, h_prev = x0, h
        else:
            x0, eps = denoise(x, time(t, x))
            x = samplers.ddim_step(param, x0, eps, t, s, eta=1.0 if sampler == "sde" else 0.0, generator=generator)
    return x


@pytest.mark.parametrize("name", ["fm", "trigflow", "edm", "vp-v", "ddpm-eps"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_samplers_give_the_numbers_of_the_host_float_schedule(name, dtype):
    """Bit for bit, every sampler, in every dtype (bf16 too: the 0-dim factors come second in
    each product, where the CPU kernels take them as the same scalar a Python float was)."""
    param = get_parameterisation(name)
    noise = torch.randn(64, 3, generator=torch.Generator().manual_seed(0)).to(dtype)
    for sampler in samplers.SAMPLERS:
        for steps in (1, 2, 7):
            want = _host_float_sample(exact_net(param), param, noise, steps, sampler,
                                      generator=torch.Generator().manual_seed(1))
            got = samplers.sample(exact_net(param), param, noise, steps, sampler,
                                  generator=torch.Generator().manual_seed(1))
            assert torch.equal(got, want), (sampler, steps)


@pytest.mark.parametrize("name", ["fm", "trigflow", "edm", "vp-v", "ddpm-eps"])
def test_samplers_read_no_tensor_values(name):
    """Under FakeTensorMode (the --dry-run estimator's tensors) any read of a value raises: every
    sampler, and the discrete DDPM schedule's table lookup, must run without one."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    param = get_parameterisation(name)
    with FakeTensorMode(allow_non_fake_inputs=True):  # the DDPM table is a real tensor built earlier
        noise = torch.randn(4, 3)
        for sampler in samplers.SAMPLERS:
            assert samplers.sample(exact_net(param), param, noise, 3, sampler).shape == (4, 3)
