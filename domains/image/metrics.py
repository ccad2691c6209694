"""Classifier metrics on a held-out split."""

from __future__ import annotations

import torch

from kdlib.core.data import TensorDataset
from kdlib.objectives import cross_entropy


@torch.no_grad()
def classification_metrics(model: torch.nn.Module, split: TensorDataset, batch_size: int = 1024) -> dict[str, float]:
    """``accuracy`` (top-1) and ``nll`` (mean cross-entropy in nats) of ``model`` on ``split``."""
    correct, nll, n = 0, 0.0, len(split)
    dtype = next(model.parameters()).dtype  # a bf16 teacher (teacher.dtype) takes bf16 images
    for start in range(0, n, batch_size):
        batch = split.batch(torch.arange(start, min(n, start + batch_size)))
        logits = model(batch["x"].to(dtype)).float()
        correct += int((logits.argmax(-1) == batch["y"]).sum())
        nll += float(cross_entropy(logits, batch["y"], reduction="sum"))
    return {"accuracy": correct / n, "nll": nll / n}
