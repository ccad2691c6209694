"""Tiny networks the method tests share: an exact point-mass teacher and a small trainable net.
States [B, ...]; times t [B]."""

from __future__ import annotations

import torch
from torch import nn

C = 0.3  # the point-mass data: every x0 is C


class PointMassVelocity(nn.Module):
    """The exact flow-matching velocity for data x0 = C, times ``scale``: u = scale·(x_t − C)/t
    (scale 1: its x̂0 is C everywhere). Its one parameter gets zero gradient, so an optimiser over
    it changes nothing."""

    parameterisation = "fm"

    def __init__(self, scale: float = 1.0):
        super().__init__()
        self.scale = scale
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        t = t.clamp(min=1e-6).reshape(-1, *([1] * (x.dim() - 1)))
        return self.scale * (x - C) / t + 0 * self.dummy


class TinyNet(nn.Module):
    """A small MLP velocity network of [B, dim] states, conditioned on t and an optional label y."""

    parameterisation = "fm"

    def __init__(self, dim: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim + 2, 64), nn.SiLU(), nn.Linear(64, dim))

    def forward(self, x, t, y=None):
        y = torch.zeros_like(t) if y is None else y.to(t.dtype)
        return self.net(torch.cat([x, t[:, None], y[:, None]], dim=1))


class PointMassResidual(nn.Module):
    """``PointMassVelocity`` plus a trainable MLP residual whose output layer starts at zero: at
    initialisation the exact point-mass teacher, and a copy of it (DMD's fake score) can learn."""

    parameterisation = "fm"

    def __init__(self, dim: int = 4):
        super().__init__()
        self.exact = PointMassVelocity()
        self.residual = TinyNet(dim)
        nn.init.zeros_(self.residual.net[2].weight)
        nn.init.zeros_(self.residual.net[2].bias)

    def forward(self, x, t, y=None):
        return self.exact(x, t) + self.residual(x, t, y)
