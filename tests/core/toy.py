"""A tiny classification problem and model for core tests (fast, deterministic)."""

from __future__ import annotations

import torch
from torch import nn

from kdlib.core.data import TensorDataset
from kdlib.core.run_config import TrainConfig


def toy_data(n: int = 256, features: int = 8, classes: int = 4, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, features, generator=g)
    w = torch.randn(features, classes, generator=g)
    return TensorDataset(x=x, y=(x @ w).argmax(-1))


def toy_model(features: int = 8, classes: int = 4, dropout: float = 0.1) -> nn.Module:
    return nn.Sequential(nn.Linear(features, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, classes))


def toy_train_config(**overrides) -> TrainConfig:
    base = dict(steps=40, batch_size=32, lr=0.01, checkpoint_every=10, log_every=5, progress=False, device="cpu")
    base.update(overrides)
    return TrainConfig(**base)
