"""Reference attention JVP in plain PyTorch: the specification the fast kernels are tested against.

Materialises the N×N score matrix, so it is for tests and small shapes only.

With S = scale·Q Kᵀ, P = softmax(S) (row-wise), O = P V and tangents tQ, tK, tV:

    dS = scale·(tQ Kᵀ + Q tKᵀ)
    dP = P∘dS − P∘rowsum(P∘dS)
    dO = P tV + dP V = P tV + (P∘dS) V − rowsum(P∘dS)∘O

Causal masking is top-left aligned, as in ``F.scaled_dot_product_attention(is_causal=True)``:
query i sees keys j ≤ i, whatever Nq and Nk are (so with Nq > Nk the last rows see every key,
and with Nq < Nk the last keys are seen by nobody).
"""

from __future__ import annotations

import math

import torch


def causal_mask(nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """Bool [Nq, Nk], True where query i may attend key j (j ≤ i, top-left aligned as SDPA)."""
    return torch.ones(nq, nk, dtype=torch.bool, device=device).tril()


def attention_jvp_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor,
    tk: torch.Tensor,
    tv: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Attention output, its tangent and the row log-sum-exp, computed in the inputs' dtype.

    q, tq: [B, H, Nq, D]; k, tk, v, tv: [B, H, Nk, D].
    Returns out, tangent_out: [B, H, Nq, D] and lse: [B, H, Nq] (natural log, of the scaled scores).
    """
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * (q @ k.transpose(-2, -1))
    ds = scale * (tq @ k.transpose(-2, -1) + q @ tk.transpose(-2, -1))
    if causal:
        allowed = causal_mask(q.shape[-2], k.shape[-2], q.device)
        s = s.masked_fill(~allowed, float("-inf"))
        ds = ds.masked_fill(~allowed, 0.0)
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1))
    out = p @ v
    p_ds = p * ds
    tangent_out = p @ tv + p_ds @ v - p_ds.sum(-1, keepdim=True) * out
    return out, tangent_out, lse


def materialized_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, scale: float | None = None, causal: bool = False
) -> torch.Tensor:
    """softmax(scale·Q Kᵀ) V with the N×N matrix in memory; every op has forward-mode AD, so
    ``torch.func.jvp`` works through it (the baseline a user has today)."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    s = scale * (q @ k.transpose(-2, -1))
    if causal:
        s = s.masked_fill(~causal_mask(q.shape[-2], k.shape[-2], q.device), float("-inf"))
    return torch.softmax(s, dim=-1) @ v
