"""TrigFlow conversions, the sCM tangent/loss, and a tiny sCM run whose loss goes down."""

from __future__ import annotations

import math

import torch

from kdlib.diffusion import trigflow
from kdlib.methods.scm import SCM, SCMConfig, f_and_time_derivative, normalize_tangent, scm_loss
from kdlib.nn import DiT, DiTConfig


def test_rotation_round_trips(seeded):
    x0 = torch.randn(4, 3, 5, generator=seeded, dtype=torch.float64)
    z = torch.randn(4, 3, 5, generator=seeded, dtype=torch.float64)
    t = torch.rand(4, generator=seeded, dtype=torch.float64) * 1.4 + 0.05
    x_t = trigflow.add_noise(x0, z, t)
    v = trigflow.velocity(x0, z, t)
    torch.testing.assert_close(trigflow.x0_from_velocity(x_t, v, t), x0)
    torch.testing.assert_close(trigflow.noise_from_velocity(x_t, v, t), z)
    torch.testing.assert_close(trigflow.velocity_from_x0(x_t, x0, t), v)
    torch.testing.assert_close(trigflow.velocity_from_noise(x_t, z, t), v)
    # v is the time derivative of x_t
    _, dxdt = torch.func.jvp(lambda tt: trigflow.add_noise(x0, z, tt), (t,), (torch.ones_like(t),))
    torch.testing.assert_close(dxdt, v)


def test_alpha_sigma_mapping(seeded):
    sigma_d = 0.5
    x0, eps = torch.randn(3, 7, generator=seeded, dtype=torch.float64), torch.randn(3, 7, generator=seeded,
                                                                                   dtype=torch.float64)
    s = torch.tensor([0.1, 0.5, 0.9], dtype=torch.float64)  # flow matching: x = (1-s)x0 + s·eps
    t, c = trigflow.from_alpha_sigma(1 - s, s, sigma_d)
    x = (1 - s)[:, None] * x0 + s[:, None] * eps
    torch.testing.assert_close(c[:, None] * x, trigflow.add_noise(x0, sigma_d * eps, t))
    alpha, sigma = trigflow.to_alpha_sigma(t, sigma_d)
    torch.testing.assert_close(sigma / alpha, s / (1 - s))  # the same noise-to-signal ratio
    t_edm, c_edm = trigflow.from_alpha_sigma(torch.ones(1), torch.tensor([sigma_d]), sigma_d)
    assert math.isclose(t_edm.item(), math.pi / 4, rel_tol=1e-6) and math.isclose(c_edm.item(), 2**-0.5,
                                                                                    rel_tol=1e-6)


def test_sample_time_range_and_consistency_fn(seeded):
    t = trigflow.sample_time(1000, generator=seeded)
    assert (t > 0).all() and (t < math.pi / 2).all() and 0.2 < t.median() < 1.2
    x0, z = torch.randn(2, 4, generator=seeded), torch.randn(2, 4, generator=seeded)
    t = torch.tensor([0.3, 1.1])
    exact_f = trigflow.velocity(x0, z, t) / 0.5  # the exact F-prediction for σ_d = 0.5
    torch.testing.assert_close(trigflow.consistency_fn(trigflow.add_noise(x0, z, t), t, exact_f, 0.5), x0)


def test_time_derivative_matches_finite_difference(seeded):
    sigma_d = 0.5

    def net(x, t):
        return torch.tanh(x * (1 + t[:, None])) + torch.sin(3 * t)[:, None]

    x_t = torch.randn(3, 6, generator=seeded, dtype=torch.float64)
    dxt_dt = torch.randn(3, 6, generator=seeded, dtype=torch.float64)
    t = torch.tensor([0.2, 0.7, 1.3], dtype=torch.float64)
    f, cs_df = f_and_time_derivative(net, x_t, t, dxt_dt, sigma_d)
    h = 1e-6

    def along(eps):
        return net((x_t + eps * dxt_dt) / sigma_d, t + eps)

    df_dt = (along(h) - along(-h)) / (2 * h)
    expected = sigma_d * (torch.cos(t) * torch.sin(t))[:, None] * df_dt
    torch.testing.assert_close(cs_df, expected, rtol=1e-6, atol=1e-8)
    torch.testing.assert_close(f, net(x_t / sigma_d, t))


def test_normalized_tangent_and_zero_loss_at_the_fixed_point(seeded):
    g = torch.randn(3, 2, 4, generator=seeded) * torch.tensor([0.01, 1.0, 100.0])[:, None, None]
    norms = normalize_tangent(g, 0.1).flatten(1).norm(dim=1)
    assert norms[2] > 0.99 and norms[0] < 0.5 and (norms < 1).all()

    # The exact F for a point mass at x0 = 0: F = v/σ_d = cos(t)·z/σ_d with z = x_t/sin(t).
    sigma_d = 0.5

    def exact(x, t):  # x = x_t / σ_d
        return trigflow.expand(1 / torch.tan(t), x) * x

    x0 = torch.zeros(4, 3)
    z = sigma_d * torch.randn(4, 3, generator=seeded)
    t = torch.tensor([0.3, 0.6, 0.9, 1.2])
    x_t = trigflow.add_noise(x0, z, t)
    dxt_dt = sigma_d * exact(x_t / sigma_d, t)
    loss, stats = scm_loss(exact, x0, z, t, dxt_dt, r=1.0, sigma_d=sigma_d)
    assert stats["tangent_norm"] < 1e-5 and loss.item() < 1e-10


def test_scm_distillation_makes_the_student_consistent(monkeypatch):
    """sCD from an exact teacher (data = a point mass at 0, so F_pre(x, t) = x / tan t) with a
    student = teacher + a randomly initialised tiny DiT: training must remove the perturbation,
    shrinking ‖g‖ (zero exactly at consistency). The reference JVP backend keeps it fast on CPU."""
    monkeypatch.setenv("KDLIB_ATTENTION_JVP_BACKEND", "reference")
    torch.manual_seed(0)
    dit = DiT(DiTConfig(in_channels=1, patch_size=2, hidden=32, depth=1, heads=1, time_scale=1.0))
    with torch.no_grad():
        for p in dit.parameters():
            p.normal_(0, 0.1)

    def teacher(x, t):
        return trigflow.expand(1 / torch.tan(t), x) * x

    def student(x, t):
        return teacher(x, t) + dit(x, t)

    method = SCM(student, teacher, SCMConfig(tangent_warmup=0))
    opt = torch.optim.Adam(dit.parameters(), lr=3e-3)
    x0 = torch.zeros(16, 1, 4, 4)

    def tangent_norm():
        return method.loss(x0, 0, generator=torch.Generator().manual_seed(1))[1]["tangent_norm"]

    first = tangent_norm()
    assert first > 0.1
    for step in range(15):
        method.train_step(opt, x0, step, generator=torch.Generator().manual_seed(100 + step))
    assert tangent_norm() < 0.3 * first
