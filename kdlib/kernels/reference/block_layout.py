"""Reference block-sparse layout ops in plain PyTorch: the specification of ``kdlib.kernels.block_layout``.

``layout_reference``: a bool tile mask -> CSR-style lists (per query block the ascending selected
key blocks, and the transpose per key block). ``select_blocks_reference``: Video-BLADE's per-row
selection of block pairs, by ratio or by cumulative softmax mass.

Ranking (both modes): higher score first, ties to the lower column; -0.0 ties with +0.0. Scores
are taken in fp32. Mass mode works in float64 on e_j = exp(s_j - max_row): keep column j iff it
is ranked first or the e-sum of the columns ranked before it is < keep * sum(e) — the softmax
mass rule, without rounding the probabilities to fp32 first. The native kernels sum in other
orders, so in mass mode they can differ from this only when a prefix mass is within float64
rounding (~1e-16 relative) of keep. Scores must be finite or -inf; NaN/+inf give unspecified
selections.
"""

from __future__ import annotations

import math

import torch


def ratio_count(keep: float, mk: int) -> int:
    """Blocks kept per row in ratio mode: ceil(keep * mk) clamped to [1, mk]. The 1e-9 slack
    absorbs the rounding of keep * mk (0.1 * 30 = 3.0000000000000004 keeps 3, not 4); the C++
    ops use the same formula (csrc/block_layout.cpp)."""
    return min(mk, max(1, math.ceil(keep * mk - 1e-9)))


def _rows_to_lists(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """mask: bool [..., M, K] -> count int32 [..., M], index int32 [..., M, K] (selected columns
    ascending first — a stable sort puts True before False in column order — the rest 0)."""
    count = mask.sum(-1, dtype=torch.int32)
    order = torch.argsort((~mask).to(torch.int8), dim=-1, stable=True).to(torch.int32)
    slots = torch.arange(mask.shape[-1], device=mask.device)
    index = torch.where(slots < count.unsqueeze(-1), order, torch.zeros_like(order))
    return count.contiguous(), index.contiguous()


def layout_reference(block_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """block_mask: bool [Bm, Hm, Mq, Mk] -> (kv_count [Bm, Hm, Mq], kv_index [Bm, Hm, Mq, Mk],
    q_count [Bm, Hm, Mk], q_index [Bm, Hm, Mk, Mq]), all int32, contiguous."""
    kv_count, kv_index = _rows_to_lists(block_mask)
    q_count, q_index = _rows_to_lists(block_mask.transpose(-1, -2))
    return kv_count, kv_index, q_count, q_index


def select_blocks_reference(
    scores: torch.Tensor, keep: float, *, mode: str = "ratio", keep_diagonal: bool = True
) -> torch.Tensor:
    """scores: float [B, H, Mq, Mk] -> bool [B, H, Mq, Mk]: per row, the top ratio_count(keep, Mk)
    blocks ("ratio") or the smallest top set whose softmax mass reaches ``keep`` ("mass"), ranked
    as in the module docstring; with ``keep_diagonal`` column i of row i (i < Mk) is always kept."""
    s = scores.float()
    mq, mk = s.shape[-2:]
    order = torch.argsort(-s, dim=-1, stable=True)  # descending, lower index first among ties
    if mode == "ratio":
        kept_sorted = torch.arange(mk, device=s.device) < ratio_count(keep, mk)
    else:
        s64 = s.double()
        # max clamped to the lowest double: an all -inf row gives e = 0 rather than NaN.
        e = torch.exp(s64 - s64.amax(-1, keepdim=True).clamp_min(torch.finfo(torch.float64).min))
        e_sorted = e.gather(-1, order)
        # e-mass of the blocks ranked earlier: the running sum, shifted by one (exact, unlike cumsum - e)
        before = torch.cumsum(e_sorted, dim=-1).roll(1, dims=-1)
        before[..., 0] = 0
        kept_sorted = (before < keep * e.sum(-1, keepdim=True)) | (torch.arange(mk, device=s.device) == 0)
    kept = torch.zeros(s.shape, dtype=torch.bool, device=s.device)
    kept.scatter_(-1, order, kept_sorted.expand_as(order))
    if keep_diagonal:
        n = min(mq, mk)
        i = torch.arange(n, device=s.device)
        kept[..., i, i] = True
    return kept
