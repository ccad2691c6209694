"""Regression metrics between a prediction and a target, per sample, for generative distillation
(consistency training/distillation compares two network outputs with one of these).

Each function takes x, y: [B, ...] (same shape), measures the squared distance per sample over all
non-batch dims, r² = Σ (x − y)², maps it, and reduces over the batch ("mean", "sum" or "none" →
[B]). ``weight`` ([B], optional) multiplies each sample's value first (e.g. a time weighting λ(t)).
Computed in float32 (float64 stays float64).

    l2            r²
    pseudo_huber  sqrt(r² + c²) − c          (iCT; c defaults to 0.00054 · sqrt(d), d = values per sample)
    cauchy        log(1 + r² / (2 c²))       (sLCT's Cauchy loss)
"""

from __future__ import annotations

import math

import torch


def _squared_distance(x: torch.Tensor, y: torch.Tensor, name: str) -> torch.Tensor:
    if x.shape != y.shape:
        raise ValueError(f"{name}: prediction {tuple(x.shape)} and target {tuple(y.shape)} differ in shape")
    if x.dim() < 1:
        raise ValueError(f"{name}: inputs need a batch dim, got a scalar")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    return (x.to(dtype) - y.to(dtype)).pow(2).flatten(1).sum(1)


def _reduce(values: torch.Tensor, weight: torch.Tensor | None, reduction: str, name: str) -> torch.Tensor:
    if weight is not None:
        values = values * weight.to(values.dtype)
    if reduction == "mean":
        return values.mean()
    if reduction == "sum":
        return values.sum()
    if reduction == "none":
        return values
    raise ValueError(f"{name}: reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def ict_c(sample_shape: torch.Size | tuple[int, ...]) -> float:
    """iCT's pseudo-Huber constant c = 0.00054 · sqrt(d) for samples of this (non-batch) shape."""
    return 0.00054 * math.sqrt(math.prod(sample_shape))


def l2(x: torch.Tensor, y: torch.Tensor, *, weight: torch.Tensor | None = None,
       reduction: str = "mean") -> torch.Tensor:
    """Squared L2 distance per sample: Σ (x − y)² over the non-batch dims."""
    return _reduce(_squared_distance(x, y, "l2"), weight, reduction, "l2")


def pseudo_huber(x: torch.Tensor, y: torch.Tensor, c: float | None = None, *,
                 weight: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
    """sqrt(‖x − y‖² + c²) − c per sample: ≈ ‖x − y‖² / (2c) near 0, ≈ ‖x − y‖ − c far away."""
    c = ict_c(x.shape[1:]) if c is None else c
    if c <= 0:
        raise ValueError(f"pseudo_huber: c must be > 0, got {c}")
    r2 = _squared_distance(x, y, "pseudo_huber")
    return _reduce(torch.sqrt(r2 + c * c) - c, weight, reduction, "pseudo_huber")


def cauchy(x: torch.Tensor, y: torch.Tensor, c: float, *, weight: torch.Tensor | None = None,
           reduction: str = "mean") -> torch.Tensor:
    """log(1 + ‖x − y‖² / (2c²)) per sample: quadratic near 0, only logarithmic for outliers."""
    if c <= 0:
        raise ValueError(f"cauchy: c must be > 0, got {c}")
    r2 = _squared_distance(x, y, "cauchy")
    return _reduce(torch.log1p(r2 / (2 * c * c)), weight, reduction, "cauchy")
