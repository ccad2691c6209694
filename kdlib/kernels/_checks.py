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
