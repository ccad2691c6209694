"""TMA descriptors for the Triton kernels' [B, H, N, D] operands (sm90+): built on the host, read
by ``load_tile`` in the kernels, which falls back to masked pointer loads."""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor


def tma_ready(tensors, *, interpreted: bool) -> bool:
    """Whether every tensor can be read through a TMA descriptor: sm90+ (or the Triton
    interpreter), a unit stride over the last dim, 16-byte aligned base and other strides. The
    kernels' pointer loads serve the rest (pre-Hopper GPUs, expanded or oddly strided inputs)."""
    if not interpreted:
        device = tensors[0].device
        if device.type != "cuda" or torch.cuda.get_device_capability(device)[0] < 9:
            return False
    for t in tensors:
        size = t.element_size()
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(st <= 0 or st * size % 16 for st in t.stride()[:-1]):
            return False
    return True


def descriptors(tensors, rows: int, d_pad: int) -> list[TensorDescriptor]:
    """[1, 1, rows, d_pad]-box descriptors of [B, H, N, D] tensors; loads past N or D read zero."""
    return [TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, d_pad]) for t in tensors]


@triton.jit
def load_tile(desc, ptrs, mask, b, h, start, ROWS: tl.constexpr, D_PAD: tl.constexpr, USE_TMA: tl.constexpr):
    """The [ROWS, D_PAD] tile of (b, h) from row ``start`` (int32): through the descriptor ``desc``
    of ``descriptors`` (rows past N and columns past D read as zero), else ``tl.load(ptrs, mask)``."""
    if USE_TMA:
        tile = desc.load([b.to(tl.int32), h.to(tl.int32), start, 0]).reshape(ROWS, D_PAD)
    else:
        tile = tl.load(ptrs, mask=mask, other=0.0)
    return tile
