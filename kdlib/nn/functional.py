"""The single attention entry point of kdlib's models.

``attention(q, k, v)`` is ``F.scaled_dot_product_attention`` for ordinary forward and backward
passes (flash / cuDNN / efficient kernels, full speed). Under forward-mode AD — inside
``torch.func.jvp`` or with ``torch.autograd.forward_ad`` dual tensors — PyTorch's fused SDPA
backends have no JVP rule and the math backend materialises N×N, so there it runs an
``autograd.Function`` whose ``jvp`` calls the fused ``kdlib.kernels.attention_jvp``: a model built
from kdlib blocks gets dF/dt at flash speed and O(N) memory with no change to its code.

Gradients: the primal output of that Function has the usual SDPA gradient. The tangent it returns
has none: a backward pass that reaches it raises a RuntimeError instead of silently treating it
as a constant. sCM and rCM stop the gradient of dF/dt (``.detach()`` it), which is the supported
use.

With ``block_mask=`` the same entry point runs block-sparse attention over the selected tiles, so
a model switches between dense and sparse attention by passing a mask.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd import forward_ad

from kdlib.kernels.attention_jvp import attention_jvp
from kdlib.kernels.block_layout import BlockLayout
from kdlib.kernels.block_sparse_attention import block_sparse_attention
from kdlib.kernels.reference.attention_jvp import materialized_attention

TANGENT_BACKWARD_ERROR = (
    "kdlib.nn.functional.attention: backward through the forward-mode tangent (the JVP output) is "
    "not supported. Stop its gradient with .detach(), as sCM/rCM do for dF/dt, or use "
    "materialized_attention if you really need second-order terms."
)


def _has_tangent(t: torch.Tensor) -> bool:
    """True for a dual tensor (torch.func.jvp wraps its inputs the same way)."""
    return forward_ad.unpack_dual(t).tangent is not None


class _TangentGuard(torch.autograd.Function):
    """Identity on the tangent whose backward raises: the fused kernel records no graph."""

    @staticmethod
    def forward(tangent: torch.Tensor, *dependencies: torch.Tensor) -> torch.Tensor:
        return tangent.view_as(tangent)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        pass

    @staticmethod
    def backward(ctx, *grads):
        raise RuntimeError(TANGENT_BACKWARD_ERROR)


class _AttentionWithJVP(torch.autograd.Function):
    """SDPA forward, SDPA gradient for backward, fused kernel for the forward-mode tangent."""

    @staticmethod
    def forward(q, k, v, scale, causal):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)

    @staticmethod
    def setup_context(ctx, inputs, output) -> None:
        q, k, v, scale, causal = inputs
        ctx.scale, ctx.causal = scale, causal
        ctx.save_for_backward(q, k, v)
        ctx.save_for_forward(q, k, v)

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v = ctx.saved_tensors
        with torch.enable_grad():
            inputs = [t.detach().requires_grad_(need) for t, need in zip((q, k, v), ctx.needs_input_grad)]
            out = F.scaled_dot_product_attention(*inputs, is_causal=ctx.causal, scale=ctx.scale)
            wanted = [t for t in inputs if t.requires_grad]
            grads = iter(torch.autograd.grad(out, wanted, grad_out))
        return (*(next(grads) if t.requires_grad else None for t in inputs), None, None)

    @staticmethod
    def jvp(ctx, tq, tk, tv, _tscale, _tcausal):
        q, k, v = ctx.saved_tensors
        tq, tk, tv = (torch.zeros_like(x) if t is None else t for x, t in zip((q, k, v), (tq, tk, tv)))
        # The kernel wants one dtype: tangents can arrive in another (e.g. fp32 under bf16 weights).
        tq, tk, tv = (t.to(q.dtype) for t in (tq, tk, tv))
        _, tangent = attention_jvp(q, k, v, tq, tk, tv, scale=ctx.scale, causal=ctx.causal)
        if torch.is_grad_enabled():
            # Recorded only when something outside depends on parameters that require grad.
            tangent = _TangentGuard.apply(tangent, q, k, v, tq, tk, tv)
        return tangent


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    block_mask: torch.Tensor | BlockLayout | None = None,
    block_size: int | tuple[int, int] | None = None,
) -> torch.Tensor:
    """Scaled-dot-product attention. q: [B, H, Nq, D]; k, v: [B, H, Nk, D] -> [B, H, Nq, D].

    ``scale`` defaults to 1/sqrt(D); ``causal`` is SDPA's ``is_causal`` (top-left aligned: query i
    sees keys j ≤ i). Supports ``torch.func.jvp`` / dual tensors through the fused JVP kernel.

    ``block_mask`` (bool [B or 1, H or 1, ceil(Nq/bq), ceil(Nk/bk)], or a ``BlockLayout`` built
    once per step) switches to block-sparse attention over the selected tiles
    (``kdlib.kernels.block_sparse_attention``; ``block_size`` int or (bq, bk), default 128).
    """
    if block_mask is not None:
        if causal:
            raise ValueError(
                "attention: causal=True with a block_mask is not supported; put the causal pattern in the "
                "block mask (e.g. block_mask.tril()), which keeps whole diagonal blocks"
            )
        if any(_has_tangent(t) for t in (q, k, v)):
            raise NotImplementedError(
                "attention: forward-mode AD (torch.func.jvp) through block-sparse attention is not supported; "
                "call the model without block_mask for the JVP (sCM/rCM tangents), or use dense attention"
            )
        return block_sparse_attention(q, k, v, block_mask, block_size=block_size, scale=scale)
    if block_size is not None:
        raise ValueError("attention: block_size is only used with a block_mask")
    if any(_has_tangent(t) for t in (q, k, v)):
        return _AttentionWithJVP.apply(q, k, v, scale, causal)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)


__all__ = ["attention", "materialized_attention", "TANGENT_BACKWARD_ERROR"]
