"""Reference block-sparse attention in plain PyTorch: the specification the kernels are tested against.

The block mask selects (query-block, key-block) tiles; query block i covers tokens
[i·bq, (i+1)·bq), key block j tokens [j·bk, (j+1)·bk), the last ones partial. Each query row
attends, with an ordinary softmax, to the keys of its selected tiles. A query block with no
selected tile has output 0 and passes no gradient (rather than the NaN of a softmax over nothing).

Materialises Nq×Nk scores: for tests and small shapes only.
"""

from __future__ import annotations

import math

import torch


def expand_block_mask(block_mask: torch.Tensor, block_size: tuple[int, int], n_q: int, n_k: int) -> torch.Tensor:
    """Bool [Bm, Hm, Mq, Mk] tile mask -> bool [Bm, Hm, Nq, Nk] token mask."""
    bq, bk = block_size
    return block_mask.repeat_interleave(bq, dim=-2)[..., :n_q, :].repeat_interleave(bk, dim=-1)[..., :n_k]


def block_sparse_attention_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor,
    block_size: tuple[int, int],
    *,
    scale: float | None = None,
) -> torch.Tensor:
    """q: [B, H, Nq, D]; k, v: [B, H, Nk, D]; block_mask: bool [B or 1, H or 1, Mq, Mk].

    Returns [B, H, Nq, D] in the inputs' dtype, differentiable w.r.t. q, k and v.
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    allowed = expand_block_mask(block_mask, block_size, q.shape[-2], k.shape[-2])
    row_has_keys = allowed.any(-1, keepdim=True)
    s = scale * (q @ k.transpose(-2, -1))
    # Empty rows get finite dummy scores (so softmax is defined) and are zeroed afterwards, which
    # also zeroes their gradient.
    s = s.masked_fill(~allowed, float("-inf")).masked_fill(~row_has_keys, 0.0)
    p = torch.softmax(s, dim=-1) * row_has_keys
    return p @ v


__all__ = ["block_sparse_attention_reference", "expand_block_mask"]
