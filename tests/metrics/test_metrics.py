"""Fréchet distance, KID, precision/recall and diversity against closed forms and orderings."""

from __future__ import annotations

import pytest
import torch

from kdlib.metrics import diversity, frechet_distance, kernel_inception_distance, precision_recall


def test_frechet_distance_closed_form(seeded):
    # Diagonal covariances: FD = ‖Δμ‖² + Σ (s_r − s_f)².
    n, d = 20000, 4
    s_r, s_f = torch.tensor([1.0, 2.0, 0.5, 1.0]), torch.tensor([1.0, 1.0, 1.0, 3.0])
    mu = torch.tensor([0.5, 0.0, -1.0, 0.0])
    real = torch.randn(n, d, generator=seeded, dtype=torch.float64) * s_r
    fake = torch.randn(n, d, generator=seeded, dtype=torch.float64) * s_f + mu
    expected = float(mu.pow(2).sum() + (s_r - s_f).pow(2).sum())
    assert frechet_distance(real, fake) == pytest.approx(expected, rel=0.05)
    assert frechet_distance(real, real) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_matches_scipy_sqrtm(seeded):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    mix = torch.randn(6, 6, generator=seeded, dtype=torch.float64)
    real = torch.randn(300, 6, generator=seeded, dtype=torch.float64) @ mix
    fake = torch.randn(300, 6, generator=seeded, dtype=torch.float64)
    c_r, c_f = torch.cov(real.T).numpy(), torch.cov(fake.T).numpy()
    covmean = scipy_linalg.sqrtm(c_r @ c_f).real
    mu = (real.mean(0) - fake.mean(0)).numpy()
    ref = mu @ mu + c_r.trace() + c_f.trace() - 2 * covmean.trace()
    assert frechet_distance(real, fake) == pytest.approx(float(ref), rel=1e-6)


def test_kid_unbiased_near_zero_for_same_distribution_and_grows(seeded):
    a = torch.randn(1000, 8, generator=seeded)
    b = torch.randn(1000, 8, generator=seeded)
    shifted = torch.randn(1000, 8, generator=seeded) + 0.5
    same = kernel_inception_distance(a, b)
    assert abs(same) < 0.01
    assert kernel_inception_distance(a, shifted) > 10 * abs(same) + 0.01


def test_precision_recall_separate_fidelity_from_coverage(seeded):
    real = torch.randn(800, 2, generator=seeded)
    collapsed = 0.1 * torch.randn(800, 2, generator=seeded)  # faithful but covers little
    off = torch.randn(800, 2, generator=seeded) + 6.0  # neither
    p, r = precision_recall(real, real[torch.randperm(800, generator=seeded)])
    assert p == pytest.approx(1.0) and r == pytest.approx(1.0)
    p, r = precision_recall(real, collapsed)
    assert p > 0.95 and r < 0.5
    p, r = precision_recall(real, off)
    assert p < 0.05 and r < 0.05


def test_diversity_and_bad_inputs(seeded):
    x = torch.randn(500, 3, generator=seeded)
    assert diversity(2 * x) == pytest.approx(2 * diversity(x))
    assert diversity(torch.ones(10, 3)) == 0.0
    with pytest.raises(ValueError, match="equal D"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
