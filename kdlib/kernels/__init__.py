"""kdlib's kernels. Each op has a plain-PyTorch reference (the specification), a Triton and/or
native implementation, and a dispatcher that picks the best available backend.

Ops are imported lazily so that ``import kdlib.kernels`` stays cheap and never needs Triton.
"""

from __future__ import annotations

import importlib

_LAZY = {
    "ema_update_": "kdlib.kernels.ema",
    "attention_jvp": "kdlib.kernels.attention_jvp",
    "fused_linear_divergence": "kdlib.kernels.fused_linear_divergence",
    "block_sparse_attention": "kdlib.kernels.block_sparse_attention",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'kdlib.kernels' has no attribute {name!r}")
