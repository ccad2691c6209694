"""A small DiT (Peebles & Xie 2023) that kdlib's image and video domains share.

    x: [B, C, *S] --patchify--> tokens [B, N, C·∏p] --linear + sin-cos positions--> [B, N, hidden]
    --depth × DiTBlock(adaLN-zero on the time/class embedding)--> final adaLN + linear
    --unpatchify--> [B, C_out, *S]

``spatial_dims`` picks the input rank (2: images [B, C, H, W]; 3: videos [B, C, T, H, W]); each
spatial size must be a multiple of its patch size. Attention goes through
``kdlib.nn.functional.attention``, so ``torch.func.jvp(model, (x, t), (tx, tt))`` runs the fused
JVP kernel with no change here. ``attention="materialized"`` swaps in plain softmax attention
(the baseline, and the float64 check in the tests).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from kdlib.kernels.block_layout import BlockLayout, block_layout
from kdlib.nn.embeddings import TimestepEmbedder, sincos_position_embedding
from kdlib.nn.functional import attention, materialized_attention

ATTENTION_IMPLS = {"kdlib": attention, "materialized": materialized_attention}


@dataclass
class DiTConfig:
    in_channels: int = 4
    out_channels: int | None = None  # None: same as in_channels
    spatial_dims: int = 2
    patch_size: int | tuple[int, ...] = 2
    hidden: int = 384
    depth: int = 6
    heads: int = 6
    mlp_ratio: float = 4.0
    num_classes: int = 0  # 0: unconditional; else labels 0..n-1 and n as the null label (CFG)
    time_scale: float = 1000.0  # see TimestepEmbedder
    qk_norm: bool = True  # RMS-normalised queries/keys keep attention logits bounded (sCM stability)
    attention: str = "kdlib"

    def patch(self) -> tuple[int, ...]:
        p = self.patch_size
        return (p,) * self.spatial_dims if isinstance(p, int) else tuple(p)


def patchify(x: torch.Tensor, patch: tuple[int, ...]) -> tuple[torch.Tensor, tuple[int, ...]]:
    """x: [B, C, *S] -> (tokens [B, ∏(S/p), C·∏p], grid S/p). Tokens are row-major over the grid."""
    b, c, *sizes = x.shape
    if len(sizes) != len(patch) or any(s % p for s, p in zip(sizes, patch)):
        raise ValueError(f"patchify: spatial shape {tuple(sizes)} is not a multiple of patch size {patch}")
    grid = tuple(s // p for s, p in zip(sizes, patch))
    n = len(patch)
    split = [b, c] + [d for g, p in zip(grid, patch) for d in (g, p)]
    # [B, C, g1, p1, g2, p2, ...] -> [B, g1, g2, ..., C, p1, p2, ...]
    order = [0, *range(2, 2 + 2 * n, 2), 1, *range(3, 3 + 2 * n, 2)]
    tokens = x.reshape(split).permute(order).reshape(b, math.prod(grid), c * math.prod(patch))
    return tokens, grid


def unpatchify(tokens: torch.Tensor, grid: tuple[int, ...], patch: tuple[int, ...]) -> torch.Tensor:
    """tokens [B, ∏grid, C·∏p] -> [B, C, *(grid·p)]; the inverse of ``patchify``."""
    b = tokens.shape[0]
    n = len(grid)
    c = tokens.shape[-1] // math.prod(patch)
    x = tokens.reshape(b, *grid, c, *patch)
    # [B, g1, ..., gn, C, p1, ..., pn] -> [B, C, g1, p1, ..., gn, pn]
    order = [0, n + 1] + [d for i in range(n) for d in (1 + i, n + 2 + i)]
    return x.permute(order).reshape(b, c, *(g * p for g, p in zip(grid, patch)))


class LayerNorm(nn.Module):
    """LayerNorm without affine parameters, computed in fp32 and cast back.

    Written out rather than ``nn.LayerNorm``: on CUDA the fused bf16 kernel's forward-AD rule
    returns an fp32 tangent, which then clashes with bf16 weights under ``torch.func.jvp``.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.dim, self.eps = dim, eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        x32 = x32 - x32.mean(-1, keepdim=True)
        return (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm with a learned gain, computed in fp32 (same reason as ``LayerNorm``)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float()
        normed = (x32 * torch.rsqrt(x32.square().mean(-1, keepdim=True) + self.eps)).to(x.dtype)
        return normed * self.weight


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x: [B, N, hidden]; shift, scale: [B, hidden]."""
    return x * (1 + scale[:, None]) + shift[:, None]


class SelfAttention(nn.Module):
    """Multi-head self-attention on [B, N, hidden] through kdlib's attention entry point."""

    def __init__(self, hidden: int, heads: int, qk_norm: bool = True, impl: str = "kdlib"):
        super().__init__()
        if hidden % heads:
            raise ValueError(f"SelfAttention: hidden {hidden} is not divisible by heads {heads}")
        if impl not in ATTENTION_IMPLS:
            choices = list(ATTENTION_IMPLS)
            raise ValueError(f"SelfAttention: unknown attention {impl!r}; choose one of {choices}")
        self.heads, self.head_dim = heads, hidden // heads
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(hidden, hidden)
        self.attend = ATTENTION_IMPLS[impl]

    def forward(self, x: torch.Tensor, block_mask: BlockLayout | None = None) -> torch.Tensor:
        """x: [B, N, hidden]; block_mask: a BlockLayout over the N tokens (None: dense)."""
        b, n, hidden = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        if block_mask is not None:
            out = attention(q, k, v, block_mask=block_mask)
        else:
            out = self.attend(q, k, v)  # [B, heads, N, head_dim]
        return self.proj(out.transpose(1, 2).reshape(b, n, hidden))


class DiTBlock(nn.Module):
    """Pre-norm transformer block; attention and MLP branches are shifted, scaled and gated by the
    conditioning (adaLN-zero: the gates start at zero, so each block starts as the identity)."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True,
                 impl: str = "kdlib"):
        super().__init__()
        self.norm1 = LayerNorm(hidden)
        self.attn = SelfAttention(hidden, heads, qk_norm, impl)
        self.norm2 = LayerNorm(hidden)
        inner = int(hidden * mlp_ratio)
        self.mlp = nn.Sequential(
            nn.Linear(hidden, inner), nn.GELU(approximate="tanh"), nn.Linear(inner, hidden)
        )
        self.ada = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))
        nn.init.zeros_(self.ada[1].weight)
        nn.init.zeros_(self.ada[1].bias)

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, block_mask: BlockLayout | None = None
    ) -> torch.Tensor:
        """x: [B, N, hidden]; c: [B, hidden] (time + class embedding)."""
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(c).chunk(6, dim=-1)
        x = x + gate1[:, None] * self.attn(modulate(self.norm1(x), shift1, scale1), block_mask)
        return x + gate2[:, None] * self.mlp(modulate(self.norm2(x), shift2, scale2))


class DiT(nn.Module):
    """net(x, t, y) -> prediction of x's shape (the interface every generative method sees)."""

    def __init__(self, config: DiTConfig):
        super().__init__()
        self.config = cfg = config
        self.patch = cfg.patch()
        if len(self.patch) != cfg.spatial_dims:
            raise ValueError(
                f"DiT: patch_size {cfg.patch_size} does not match spatial_dims {cfg.spatial_dims}"
            )
        self.out_channels = cfg.out_channels or cfg.in_channels
        patch_volume = math.prod(self.patch)
        self.embed = nn.Linear(cfg.in_channels * patch_volume, cfg.hidden)
        self.t_embed = TimestepEmbedder(cfg.hidden, scale=cfg.time_scale)
        self.y_embed = nn.Embedding(cfg.num_classes + 1, cfg.hidden) if cfg.num_classes else None
        self.blocks = nn.ModuleList(
            DiTBlock(cfg.hidden, cfg.heads, cfg.mlp_ratio, cfg.qk_norm, cfg.attention)
            for _ in range(cfg.depth)
        )
        self.final_norm = LayerNorm(cfg.hidden)
        self.final_ada = nn.Sequential(nn.SiLU(), nn.Linear(cfg.hidden, 2 * cfg.hidden))
        self.final = nn.Linear(cfg.hidden, self.out_channels * patch_volume)
        for layer in (self.final_ada[1], self.final):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        self._positions: dict[tuple, torch.Tensor] = {}

    def positions(self, grid: tuple[int, ...], like: torch.Tensor) -> torch.Tensor:
        """[N, hidden] sin-cos embedding of the token grid, cached per grid, device and dtype."""
        key = (grid, like.device, like.dtype)
        if key not in self._positions:
            self._positions[key] = sincos_position_embedding(grid, self.config.hidden).to(like)
        return self._positions[key]

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor,
        y: torch.Tensor | None = None,
        block_mask: torch.Tensor | BlockLayout | None = None,
        block_size: int | tuple[int, int] = 128,
    ) -> torch.Tensor:
        """x: [B, C, *S]; t: [B] (float); y: [B] long labels (num_classes = null) or None.

        ``block_mask``: block-sparse self-attention over the patch tokens (raster order): a bool
        [B or 1, heads or 1, ceil(N/bq), ceil(N/bk)] tile mask (``block_size`` tokens per block)
        or a prebuilt BlockLayout. The layout is built once here and shared by every block.
        """
        tokens, grid = patchify(x, self.patch)
        if isinstance(block_mask, torch.Tensor):
            block_mask = block_layout(block_mask, block_size)
        h = self.embed(tokens)
        h = h + self.positions(grid, h)
        c = self.t_embed(t)
        if self.y_embed is not None:
            labels = y if y is not None else torch.full_like(t, self.config.num_classes, dtype=torch.long)
            c = c + self.y_embed(labels)
        for block in self.blocks:
            h = block(h, c, block_mask)
        shift, scale = self.final_ada(c).chunk(2, dim=-1)
        out = self.final(modulate(self.final_norm(h), shift, scale))
        return unpatchify(out, grid, self.patch)
