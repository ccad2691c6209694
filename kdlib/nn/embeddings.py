"""Embeddings shared by kdlib's models: sinusoidal timestep features and their MLP, and fixed
sin-cos position embeddings for token grids of any rank (image H×W, video T×H×W, ...)."""

from __future__ import annotations

import math

import torch
from torch import nn


def sinusoidal_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """t: [B] (any real values) -> [B, dim]: cos and sin of t at geometric frequencies.

    Smooth in t, so forward-mode AD through it gives a well-behaved dF/dt.
    """
    half = dim // 2
    dtype = torch.promote_types(t.dtype, torch.float32)  # float64 stays float64 (tests)
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=dtype) / half)
    args = t.to(dtype)[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """t: [B] -> [B, hidden]: sinusoidal features of ``scale·t`` through a two-layer MLP.

    ``scale`` maps the time range onto the frequencies: 1000 for t in [0, 1] (DiT's convention);
    sCM recommends a small one for TrigFlow times t in [0, π/2] to keep dF/dt tame.
    """

    def __init__(self, hidden: int, freq_dim: int = 256, scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        emb = sinusoidal_embedding(self.scale * t, self.freq_dim)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


def sincos_position_embedding(grid: tuple[int, ...], dim: int) -> torch.Tensor:
    """Fixed position embedding for a token grid of shape ``grid`` (row-major) -> [prod(grid), dim].

    Each axis gets an equal, even share of ``dim`` (the remainder is zero), filled with the
    sinusoidal features of its coordinate.
    """
    per_axis = (dim // len(grid)) // 2 * 2
    coords = torch.meshgrid(*(torch.arange(n, dtype=torch.float32) for n in grid), indexing="ij")
    parts = [sinusoidal_embedding(c.reshape(-1), per_axis) for c in coords]
    emb = torch.cat(parts, dim=-1)
    return torch.nn.functional.pad(emb, (0, dim - emb.shape[-1]))
