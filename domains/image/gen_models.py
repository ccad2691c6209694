"""Networks of the generative image recipes, sized for CPU: a residual MLP denoiser with
adaLN time/class conditioning (teacher and consistency student share it), and the small CNN whose
features define FD-digits."""

from __future__ import annotations

import torch
from torch import nn

from kdlib.nn.embeddings import TimestepEmbedder


class ResidualBlock(nn.Module):
    """h + MLP(adaLN(h; c)); the output layer starts at zero so each block starts as identity."""

    def __init__(self, hidden: int, expansion: int = 2):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False)
        self.ada = nn.Linear(hidden, 2 * hidden)
        wide = expansion * hidden
        self.mlp = nn.Sequential(nn.Linear(hidden, wide), nn.SiLU(), nn.Linear(wide, hidden))
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.ada(c).chunk(2, dim=-1)
        return h + self.mlp(self.norm(h) * (1 + scale) + shift)


class MLPDenoiser(nn.Module):
    """net(x, t, y) -> prediction of x's shape. x: [B, C, H, W]; t: [B]; y: [B] labels, -1 (the
    null condition of ``kdlib.diffusion.guidance``) or None for unconditional.

    ``parameterisation`` records what it was trained for (checked by the methods)."""

    def __init__(self, shape: tuple[int, int, int] = (1, 28, 28), hidden: int = 384, blocks: int = 3,
                 num_classes: int = 10, parameterisation: str = "fm", time_scale: float = 1000.0):
        super().__init__()
        self.shape, self.num_classes, self.parameterisation = tuple(shape), num_classes, parameterisation
        dim = shape[0] * shape[1] * shape[2]
        self.inp = nn.Linear(dim, hidden)
        self.t_embed = TimestepEmbedder(hidden, scale=time_scale)
        self.y_embed = nn.Embedding(num_classes + 1, hidden)
        self.blocks = nn.ModuleList(ResidualBlock(hidden) for _ in range(blocks))
        self.out_norm = nn.LayerNorm(hidden)
        self.out = nn.Linear(hidden, dim)
        # A per-sample, time-dependent multiple of the input: predictions such as the velocity
        # ε − x0 = (x_t − x0)/t carry the full-dimensional noise, which a narrow hidden layer
        # cannot pass through; this skip path can.
        self.skip = nn.Linear(hidden, 1)
        for layer in (self.out, self.skip):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.shape:
            raise ValueError(f"MLPDenoiser: expected images of shape {self.shape}, got {tuple(x.shape[1:])}")
        if y is None:
            y = torch.full((x.shape[0],), -1, device=x.device, dtype=torch.long)
        labels = torch.where(y < 0, torch.full_like(y, self.num_classes), y)
        c = torch.nn.functional.silu(self.t_embed(t) + self.y_embed(labels))
        h = self.inp(x.flatten(1))
        for block in self.blocks:
            h = block(h, c)
        skip = self.skip(c).reshape(-1, *([1] * (x.dim() - 1)))
        return self.out(self.out_norm(h)).reshape(x.shape) + skip * x


class DigitFeatureNet(nn.Module):
    """The FD-digits feature extractor: a small CNN classifier. x: [B, 1, 28, 28] in [-1, 1] ->
    logits [B, 10]; ``features(x)`` -> [B, feature_dim], the penultimate activations."""

    def __init__(self, feature_dim: int = 64):
        super().__init__()
        self.conv = nn.Sequential(
            nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Flatten(), nn.Linear(32 * 7 * 7, feature_dim), nn.ReLU(),
        )
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))
