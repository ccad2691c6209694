"""A fixed random float64 network net(x [B, 6], t [B]) -> [B, 6] for tests that must hold for any
weights (boundary conditions)."""

from __future__ import annotations

import torch
from torch import nn


class RandomNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 6, dtype=torch.float64))

    def forward(self, x, t):
        return torch.tanh(x @ self.w) + 3 * t.reshape(-1, 1).cos()
