"""``attention_jvp``: scaled-dot-product attention and its forward-mode tangent, in O(N) memory.

    out, tangent_out = attention_jvp(q, k, v, tq, tk, tv)

computes O = softmax(scale·Q Kᵀ) V and dO, its directional derivative along (tQ, tK, tV), in one
pass over K/V (see ``kdlib.kernels.triton.attention_jvp``). This is what ``torch.func.jvp`` over
attention needs, and what PyTorch's fused SDPA backends cannot do. Models get it without calling
it: ``kdlib.nn.functional.attention`` routes here under forward-mode AD.

Backends: ``triton`` (CUDA tensors, or CPU tensors under ``TRITON_INTERPRET=1``; fp16/bf16/fp32,
head dims 32..256) and ``reference`` (plain PyTorch, materialises N×N; any dtype and head dim).
Chosen by ``backend=``, else ``KDLIB_ATTENTION_JVP_BACKEND``, else the best available; falling
back to the reference prints a one-time notice.
"""

from __future__ import annotations

import math

import torch

from kdlib.kernels._checks import check_attention_inputs
from kdlib.kernels._dispatch import can_run_triton, notice_once, requested_backend
from kdlib.kernels.reference.attention_jvp import attention_jvp_reference

OP = "attention_jvp"
TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
ALL_DTYPES = (*TRITON_DTYPES, torch.float64)
TRITON_HEAD_DIMS = (32, 256)


def _run_triton(q, k, v, tq, tk, tv, scale: float, causal: bool):
    from kdlib.kernels.triton.attention_jvp import attention_jvp_triton

    return attention_jvp_triton(
        q, k, v, tq, tk, tv, scale=scale, causal=causal, interpreted=q.device.type == "cpu"
    )


def _is_functorch_wrapped(t: torch.Tensor) -> bool:
    """True inside torch.func transforms, where tensors are wrappers without real storage."""
    return torch._C._functorch.is_functorch_wrapped_tensor(t)


@torch.library.custom_op("kdlib::attention_jvp_triton", mutates_args=())
def _attention_jvp_triton_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, tq: torch.Tensor, tk: torch.Tensor, tv: torch.Tensor,
    scale: float, causal: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The Triton kernel as a custom op: the dispatcher unwraps torch.func's tensor wrappers (the
    kernel needs real storage) and torch.compile sees an opaque op with a known output shape."""
    return _run_triton(q, k, v, tq, tk, tv, scale, causal)


@_attention_jvp_triton_op.register_fake
def _(q, k, v, tq, tk, tv, scale, causal):
    lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
    return q.new_empty(q.shape), q.new_empty(q.shape), lse


def _triton_unsupported(q: torch.Tensor) -> str | None:
    """Why the Triton kernel cannot take these inputs, or None if it can."""
    d = q.shape[-1]
    lo, hi = TRITON_HEAD_DIMS
    if not lo <= d <= hi:
        return f"head dim {d} is outside the kernel's {lo}..{hi}"
    if q.dtype not in TRITON_DTYPES:
        return f"dtype {str(q.dtype).replace('torch.', '')} is not one of float16, bfloat16, float32"
    if not can_run_triton(q.device):
        return f"Triton cannot run on {q.device} (set TRITON_INTERPRET=1 for CPU tensors)"
    return None


def attention_jvp(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor,
    tk: torch.Tensor,
    tv: torch.Tensor,
    *,
    scale: float | None = None,
    causal: bool = False,
    return_lse: bool = False,
    backend: str | None = None,
):
    """Attention and its tangent.

    q, tq: [B, H, Nq, D]; k, v, tk, tv: [B, H, Nk, D]; Nq and Nk are free (cross-attention), all
    six share one dtype and device. ``scale`` defaults to 1/sqrt(D). ``causal`` is top-left
    aligned like ``F.scaled_dot_product_attention(is_causal=True)``: query i sees keys j ≤ i.

    Returns (out, tangent_out), both [B, H, Nq, D] in the inputs' dtype, plus lse: [B, H, Nq] in
    fp32 (natural log of the row sums of exp(scale·Q Kᵀ)) when ``return_lse``.
    """
    check_attention_inputs(OP, {"q": q, "tq": tq}, {"k": k, "v": v, "tk": tk, "tv": tv}, ALL_DTYPES)
    choice = requested_backend(OP, backend)
    why_not = _triton_unsupported(q)
    if choice == "triton" and why_not is not None:
        raise ValueError(f"{OP}: backend 'triton' was requested but {why_not}")
    if choice in ("cuda", "torch"):
        raise ValueError(f"{OP}: no {choice!r} backend; use 'triton' or 'reference'")
    if choice is None and why_not is not None:
        notice_once(f"{OP}: using the materialising reference ({why_not}); memory grows as N²")
        choice = "reference"

    if choice == "reference":
        out, tangent, lse = attention_jvp_reference(q, k, v, tq, tk, tv, scale=scale, causal=causal)
        lse = lse.float()
    else:
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
        inputs = (q, k, v, tq, tk, tv)
        if any(_is_functorch_wrapped(t) for t in inputs):
            out, tangent, lse = _attention_jvp_triton_op(*inputs, scale, causal)
        else:  # plain tensors: skip the custom op's dispatch overhead (~0.1 ms, visible at small N)
            out, tangent, lse = _run_triton(*inputs, scale, causal)
    return (out, tangent, lse) if return_lse else (out, tangent)


__all__ = ["attention_jvp"]
