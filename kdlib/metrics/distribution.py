"""Distances between two feature distributions: Fréchet distance (Heusel et al. 2017, the "FID"
formula) and the kernel distance (Bińkowski et al. 2018, "KID"). Features: [N, D] tensors."""

from __future__ import annotations

import torch


def _check(a: torch.Tensor, b: torch.Tensor, name: str) -> None:
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(
            f"{name}: expected two [N, D] feature tensors with equal D, got {tuple(a.shape)} and {tuple(b.shape)}"
        )
    if min(a.shape[0], b.shape[0]) < 2:
        raise ValueError(f"{name}: need at least 2 samples per set")


def frechet_distance(real: torch.Tensor, fake: torch.Tensor) -> float:
    """‖μ_r − μ_f‖² + Tr(C_r + C_f − 2(C_r C_f)^{1/2}) of Gaussians fitted to the features.

    Tr((C_r C_f)^{1/2}) = Σ √λ_i(C_r C_f): the eigenvalues of a product of two PSD matrices are
    real and ≥ 0, so no matrix square root is needed (float64 throughout)."""
    _check(real, fake, "frechet_distance")
    r, f = real.double(), fake.double()
    mu_r, mu_f = r.mean(0), f.mean(0)
    c_r, c_f = torch.cov(r.T).reshape(r.shape[1], -1), torch.cov(f.T).reshape(f.shape[1], -1)
    eig = torch.linalg.eigvals(c_r @ c_f).real.clamp(min=0)
    value = (mu_r - mu_f).pow(2).sum() + torch.trace(c_r) + torch.trace(c_f) - 2 * eig.sqrt().sum()
    return float(value.clamp(min=0))


def kernel_inception_distance(real: torch.Tensor, fake: torch.Tensor, subsets: int = 10,
                              subset_size: int = 500, seed: int = 0) -> float:
    """Unbiased MMD² with the cubic polynomial kernel k(x, y) = (x·y/D + 1)³, averaged over
    ``subsets`` random subsets of ``subset_size`` (capped by the smaller set)."""
    _check(real, fake, "kernel_inception_distance")
    r, f = real.double(), fake.double()
    m = min(subset_size, r.shape[0], f.shape[0])
    d = r.shape[1]
    g = torch.Generator().manual_seed(seed)
    total = 0.0
    for _ in range(subsets):
        x = r[torch.randperm(r.shape[0], generator=g)[:m]]
        y = f[torch.randperm(f.shape[0], generator=g)[:m]]
        kxx, kyy, kxy = ((a @ b.T / d + 1) ** 3 for a, b in ((x, x), (y, y), (x, y)))
        off = 1 - torch.eye(m, dtype=torch.float64)
        total += float((kxx * off).sum() / (m * (m - 1)) + (kyy * off).sum() / (m * (m - 1)) - 2 * kxy.mean())
    return total / subsets
