"""Fidelity and coverage of generated samples in feature space: improved precision/recall
(Kynkäänniemi et al. 2019) and a diversity score. Features: [N, D] tensors."""

from __future__ import annotations

import torch


def _knn_radius(x: torch.Tensor, k: int) -> torch.Tensor:
    """Distance from each row of x to its k-th nearest other row. [N, D] -> [N]."""
    dist = torch.cdist(x, x)
    return dist.kthvalue(k + 1, dim=1).values  # +1: the zero distance to itself


def _covered(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor) -> torch.Tensor:
    """Fraction of ``points`` inside at least one ball (centre, radius)."""
    return (torch.cdist(points, centres) <= radii[None, :]).any(dim=1).double().mean()


def precision_recall(real: torch.Tensor, fake: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Precision: share of fake samples inside the real manifold (union of k-NN balls of the real
    features); recall: share of real samples inside the fake manifold. Both in [0, 1]."""
    if real.shape[0] <= k or fake.shape[0] <= k:
        raise ValueError(f"precision_recall: need more than k={k} samples per set")
    r, f = real.double(), fake.double()
    precision = _covered(f, r, _knn_radius(r, k))
    recall = _covered(r, f, _knn_radius(f, k))
    return float(precision), float(recall)


def diversity(features: torch.Tensor) -> float:
    """Mean pairwise Euclidean distance between distinct samples' features. [N, D] -> float."""
    n = features.shape[0]
    if n < 2:
        raise ValueError("diversity: need at least 2 samples")
    dist = torch.cdist(features.double(), features.double())
    return float(dist.sum() / (n * (n - 1)))
