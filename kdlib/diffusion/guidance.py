"""Classifier-free guidance (Ho & Salimans 2022) and the "null" condition it needs.

A condition is a dict of tensors whose first dimension is the batch. Its null value is declared
here once, for every domain: integer tensors (class labels, token ids) become -1, float tensors
(embeddings, observations) become zeros. Networks must read label -1 / a zero embedding as "no
condition"; training drops the condition per sample with ``drop_condition`` so they learn it.
"""

from __future__ import annotations

import torch


def null_condition(cond: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The unconditional counterpart of ``cond`` (same shapes)."""
    return {k: torch.full_like(v, -1) if not v.is_floating_point() else torch.zeros_like(v) for k, v in cond.items()}


def labels_with_null(y: torch.Tensor | None, batch: int, null_index: int, device=None) -> torch.Tensor:
    """Class labels [B] (long) for a network whose label table has its "no class" row at
    ``null_index``: kdlib's null label (< 0), and no labels at all (y None), map to that row."""
    if y is None:
        return torch.full((batch,), null_index, device=device, dtype=torch.long)
    return torch.where(y < 0, torch.full_like(y, null_index), y).long()


def drop_condition(cond: dict[str, torch.Tensor], p: float,
                   generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
    """Replace each sample's whole condition by the null one with probability ``p``."""
    if p <= 0 or not cond:
        return cond
    b = next(iter(cond.values())).shape[0]
    device = next(iter(cond.values())).device
    drop = torch.rand(b, device=device, generator=generator) < p
    null = null_condition(cond)
    return {k: torch.where(drop.reshape(b, *([1] * (v.dim() - 1))), null[k], v) for k, v in cond.items()}


def guided_prediction(net, x: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor],
                      scale: float | torch.Tensor) -> torch.Tensor:
    """uncond + scale·(cond − uncond) of ``net(x, t, **cond)``: scale 1 is the conditional
    prediction, 0 the unconditional one. One batched call of size 2B. Any prediction type works:
    every conversion between predictions is affine in the prediction for a fixed (x_t, t).
    ``scale``: a number, or one scale per sample, [B] (SNOOPI's random scales)."""
    if not cond or (not torch.is_tensor(scale) and scale == 1.0):
        return net(x, t, **cond)
    both = {k: torch.cat([v, n]) for (k, v), n in zip(cond.items(), null_condition(cond).values())}
    pred_c, pred_u = net(torch.cat([x, x]), torch.cat([t, t]), **both).chunk(2)
    if torch.is_tensor(scale):
        scale = scale.to(pred_c.dtype).reshape(-1, *([1] * (pred_c.dim() - 1)))
    return pred_u + scale * (pred_c - pred_u)
