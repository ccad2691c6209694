"""``block_sparse_attention``: attention over the (query-block, key-block) tiles a block mask selects.

    out = block_sparse_attention(q, k, v, block_mask, block_size=128)

Tokens are split into query blocks of bq and key blocks of bk (the last ones partial); each query
row attends with an ordinary softmax to the keys of the tiles its block selected. Cost and memory
grow with the number of selected tiles, not with Nq·Nk, and the op is differentiable w.r.t. q, k
and v, so students train with it (Video-BLADE, Efficient-vDiT, sliding-tile attention).

A query block that selects no key block has output 0 and passes no gradient to q, k or v (a
softmax over nothing is undefined; zero is what a residual branch can ignore).

``block_mask`` is a bool tensor [B or 1, H or 1, ceil(Nq/bq), ceil(Nk/bk)] or a prebuilt
``BlockLayout`` (``kdlib.kernels.block_layout``): build the layout once per step and pass it to
every layer, so the mask→index conversion is paid once. Masks come from
``kdlib.kernels.masks`` (tile windows for video grids, adaptive content-aware selection).

Backends: ``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; fp16/bf16/fp32,
head dims ≤ 256, block sizes multiples of 16) and ``reference`` (plain PyTorch, materialises
Nq×Nk; any dtype). Chosen by ``backend=``, else ``KDLIB_BLOCK_SPARSE_ATTENTION_BACKEND``, else the
best available; falling back to the reference prints a one-time notice.
"""

from __future__ import annotations

import math

import torch

from kdlib.kernels._checks import check_attention_inputs
from kdlib.kernels._dispatch import can_run_triton, notice_once, requested_backend
from kdlib.kernels.block_layout import BlockLayout, block_layout
from kdlib.kernels.reference.block_sparse_attention import block_sparse_attention_reference

OP = "block_sparse_attention"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ALL_DTYPES = (*TRITON_DTYPES, torch.float64)
TRITON_MAX_HEAD_DIM = 256
TRITON_BLOCK_MULTIPLE = 16
DEFAULT_BLOCK_SIZE = 128


class _BlockSparseAttention(torch.autograd.Function):
    """Triton forward; backward recomputes P per tile from the saved row log-sum-exp."""

    @staticmethod
    def forward(ctx, q, k, v, kv_count, kv_index, q_count, q_index, block_size, scale, interpreted):
        from kdlib.kernels.triton import block_sparse_attention as kernels

        out, lse2 = kernels.forward(q, k, v, kv_count, kv_index, block_size, scale, interpreted=interpreted)
        ctx.save_for_backward(q, k, v, out, lse2, kv_count, kv_index, q_count, q_index)
        ctx.block_size, ctx.scale, ctx.interpreted = block_size, scale, interpreted
        return out

    @staticmethod
    def backward(ctx, grad_out):
        from kdlib.kernels.triton import block_sparse_attention as kernels

        q, k, v, out, lse2, kv_count, kv_index, q_count, q_index = ctx.saved_tensors
        dq, dk, dv = kernels.backward(
            grad_out,
            q,
            k,
            v,
            out,
            lse2,
            kv_count,
            kv_index,
            q_count,
            q_index,
            ctx.block_size,
            ctx.scale,
            interpreted=ctx.interpreted,
        )
        return dq, dk, dv, None, None, None, None, None, None, None


def _layout_for(block_mask, block_size, q: torch.Tensor) -> BlockLayout:
    if isinstance(block_mask, BlockLayout):
        layout = block_mask
        if block_size is not None and block_layout_size(block_size) != layout.block_size:
            raise ValueError(
                f"{OP}: block_size {block_size} does not match the layout's {layout.block_size}; "
                "drop block_size or rebuild the layout with it"
            )
        if layout.kv_count.device != q.device:
            raise ValueError(f"{OP}: the layout is on {layout.kv_count.device} but q is on {q.device}")
        return layout
    if not isinstance(block_mask, torch.Tensor):
        raise TypeError(f"{OP}: block_mask must be a bool tensor or a BlockLayout, got {type(block_mask).__name__}")
    if block_mask.device != q.device:
        raise ValueError(
            f"{OP}: block_mask is on {block_mask.device} but q is on {q.device}; move it with .to(q.device)"
        )
    return block_layout(block_mask, DEFAULT_BLOCK_SIZE if block_size is None else block_size)


def block_layout_size(block_size) -> tuple[int, int]:
    """An int or (bq, bk) as a pair."""
    return (block_size, block_size) if isinstance(block_size, int) else tuple(block_size)


def _triton_unsupported(q: torch.Tensor, block_size: tuple[int, int]) -> str | None:
    """Why the Triton kernels cannot take these inputs, or None if they can."""
    if q.shape[-1] > TRITON_MAX_HEAD_DIM:
        return f"head dim {q.shape[-1]} is above the kernels' {TRITON_MAX_HEAD_DIM}"
    if q.dtype not in TRITON_DTYPES:
        return f"dtype {str(q.dtype).replace('torch.', '')} is not one of float16, bfloat16, float32"
    if any(b % TRITON_BLOCK_MULTIPLE for b in block_size):
        return f"block_size {block_size} is not a multiple of {TRITON_BLOCK_MULTIPLE}"
    if not can_run_triton(q.device):
        return f"Triton cannot run on {q.device} (set TRITON_INTERPRET=1 for CPU tensors)"
    return None


def layout_to_mask(layout: BlockLayout) -> torch.Tensor:
    """The bool block mask [Bm, Hm, Mq, Mk] a layout was built from."""
    slots = torch.arange(layout.kv_index.shape[-1], device=layout.kv_index.device)
    used = slots < layout.kv_count.unsqueeze(-1)
    # scatter_add, not scatter: unused slots point at block 0 and must not overwrite a real entry.
    hits = torch.zeros(layout.kv_index.shape, dtype=torch.int32, device=layout.kv_index.device)
    return hits.scatter_add_(-1, layout.kv_index.long(), used.int()) > 0


def block_sparse_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_mask: torch.Tensor | BlockLayout,
    *,
    block_size: int | tuple[int, int] | None = None,
    scale: float | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Block-sparse attention. q: [B, H, Nq, D]; k, v: [B, H, Nk, D], one dtype and device.

    ``block_mask``: bool [B or 1, H or 1, ceil(Nq/bq), ceil(Nk/bk)], or a ``BlockLayout`` built
    from one. ``block_size``: int or (bq, bk), default 128 (a layout carries its own).
    ``scale`` (> 0) defaults to 1/sqrt(D). Returns [B, H, Nq, D] in the inputs' dtype; rows of query
    blocks that select nothing are 0.
    """
    check_attention_inputs(OP, {"q": q}, {"k": k, "v": v}, ALL_DTYPES)
    layout = _layout_for(block_mask, block_size, q)
    bsz, heads, n_q, d = q.shape
    layout.check_compatible(n_q, k.shape[2], bsz, heads, OP)
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    if not (math.isfinite(scale) and scale > 0):
        # The kernels take each row's max before scaling, which needs scale > 0.
        raise ValueError(f"{OP}: scale must be a positive finite number, got {scale}; the default is 1/sqrt(D)")

    choice = requested_backend(OP, backend)
    why_not = _triton_unsupported(q, layout.block_size)
    if choice == "triton" and why_not is not None:
        raise ValueError(f"{OP}: backend 'triton' was requested but {why_not}")
    if choice in ("cuda", "native", "torch"):
        raise ValueError(f"{OP}: no {choice!r} backend; use 'triton' or 'reference'")
    if choice is None and why_not is not None:
        notice_once(f"{OP}: using the materialising reference ({why_not}); memory grows as Nq·Nk")
        choice = "reference"
    if choice == "reference":
        mask = block_mask if isinstance(block_mask, torch.Tensor) else layout_to_mask(layout)
        return block_sparse_attention_reference(q, k, v, mask, layout.block_size, scale=scale)
    return _BlockSparseAttention.apply(
        q,
        k,
        v,
        layout.kv_count,
        layout.kv_index,
        layout.q_count,
        layout.q_index,
        layout.block_size,
        scale,
        q.device.type == "cpu",
    )


__all__ = ["block_sparse_attention", "layout_to_mask"]
