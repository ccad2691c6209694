"""Input validation shared by the kernels: errors name the tensor, what was expected and what
was given, so a wrong shape, dtype or device is fixed from the message alone."""

from __future__ import annotations

from collections.abc import Iterable

import torch


def check_tensor(
    op: str,
    name: str,
    t: torch.Tensor,
    *,
    ndim: int | None = None,
    dtypes: Iterable[torch.dtype] | None = None,
) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if ndim is not None and t.dim() != ndim:
        raise ValueError(f"{op}: {name} must have {ndim} dims, got shape {tuple(t.shape)}")
    if dtypes is not None:
        allowed = tuple(dtypes)
        if t.dtype not in allowed:
            names = ", ".join(str(d).replace("torch.", "") for d in allowed)
            raise TypeError(f"{op}: {name} has dtype {str(t.dtype).replace('torch.', '')}; supported: {names}")


def check_same(op: str, tensors: dict[str, torch.Tensor], *, dtype: bool = True, device: bool = True) -> None:
    """All tensors share one device (and dtype, if asked); the error lists each tensor's."""
    items = list(tensors.items())
    if device and len({t.device for _, t in items}) > 1:
        listing = ", ".join(f"{n} on {t.device}" for n, t in items)
        raise ValueError(f"{op}: all inputs must be on one device, got {listing}")
    if dtype and len({t.dtype for _, t in items}) > 1:
        listing = ", ".join(f"{n} {str(t.dtype).replace('torch.', '')}" for n, t in items)
        raise TypeError(f"{op}: all inputs must share one dtype, got {listing}")


def check_attention_inputs(
    op: str, queries: dict[str, torch.Tensor], keys: dict[str, torch.Tensor], dtypes: Iterable[torch.dtype]
) -> None:
    """Attention operands: every tensor 4-D [B, H, N, D] of an allowed dtype, all on one device in
    one dtype; the query-side tensors shaped like the first of ``queries`` (q), the key-side ones
    [B, H, Nk, D] with B, H, D from q and Nk from the first of ``keys`` (k); N ≥ 1."""
    tensors = {**queries, **keys}
    for name, t in tensors.items():
        check_tensor(op, name, t, ndim=4, dtypes=dtypes)
    check_same(op, tensors)
    q, k = next(iter(queries.values())), next(iter(keys.values()))
    bsz, heads, n_q, d = q.shape
    n_k = k.shape[2]
    if n_q == 0 or n_k == 0:
        raise ValueError(f"{op}: sequence lengths must be ≥ 1, got q {tuple(q.shape)} and k {tuple(k.shape)}")
    for side, group, shape in (("Nq", queries, tuple(q.shape)), ("Nk", keys, (bsz, heads, n_k, d))):
        for name, t in group.items():
            if tuple(t.shape) != shape:
                raise ValueError(
                    f"{op}: {name} must have shape {shape} (B, H, {side}, D from q {tuple(q.shape)} and k "
                    f"{tuple(k.shape)}), got {tuple(t.shape)}"
                )
