"""Fused EMA update over every parameter tensor of a model.

``ema_update_(ema, params, decay)`` does, in place and for every pair,
``ema[i] = decay * ema[i] + (1 - decay) * params[i]`` with the exact semantics of
``torch._foreach_lerp_(ema, params, 1 - decay)`` (that call is the reference and the fallback).
fp16/bf16 tensors are computed in fp32.

Backends: ``native`` is ``kdlib._C`` (a threaded C++ loop over all tensors on CPU, a multi-tensor
CUDA kernel on GPU); ``torch`` (alias ``reference``) is ``torch._foreach_lerp_``. Pick one with
``backend=`` or ``KDLIB_EMA_UPDATE_BACKEND``; by default the native op runs on a device where
``benchmarks/ema_update.py`` measured it faster (see benchmarks/RESULTS.md), else torch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from kdlib import _ext
from kdlib.kernels._checks import check_tensor
from kdlib.kernels._dispatch import requested_backend

OP = "ema_update_"
_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)

# Device types where the native op beat torch._foreach_lerp_ in benchmarks/ema_update.py
# (figures in benchmarks/RESULTS.md, "EMA update"); elsewhere torch runs by default.
_NATIVE_WINS = {"cpu": True, "cuda": True}


def ema_update_(
    ema: Sequence[torch.Tensor],
    params: Sequence[torch.Tensor],
    decay: float,
    *,
    backend: str | None = None,
) -> None:
    """In place: ``ema[i] = decay * ema[i] + (1 - decay) * params[i]`` for every i.

    ema, params: equally long sequences of tensors; ``ema[i]`` and ``params[i]`` share shape,
    dtype (float32/float64/float16/bfloat16) and device. Any shapes, any mix of dtypes across
    pairs; non-contiguous tensors are handled (one op each). decay: in [0, 1].
    No autograd graph is recorded (params may require grad).
    """
    decay = float(decay)
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"{OP}: decay must be in [0, 1], got {decay}")
    ema, params = list(ema), list(params)
    if len(ema) != len(params):
        raise ValueError(f"{OP}: got {len(ema)} ema tensors but {len(params)} params; the lists must pair up")
    if not ema:
        return
    check_tensor(OP, "ema[0]", ema[0])
    if _choose_backend(backend, ema[0].device) == "native":
        try:
            problem = _ext.native().ema_update_(ema, params, 1.0 - decay)
        except TypeError:  # a non-tensor in the lists: pybind's message does not say which
            _explain(ema, params)
            raise
        if problem is not None:  # (error class name, message): nothing was updated
            _explain(ema, params)
            kind, message = problem
            raise (TypeError if kind == "TypeError" else ValueError)(message)
    else:
        _torch_update(ema, params, 1.0 - decay)


def _choose_backend(backend: str | None, device: torch.device) -> str:
    """'native' or 'torch' for tensors on ``device``; raises if an explicit choice cannot run."""
    native_ok = _ext.has_cuda_ops() if device.type == "cuda" else _ext.native() is not None
    choice = requested_backend("ema_update", backend)
    if choice is None:
        if device.type not in _NATIVE_WINS:
            return "torch"
        if not native_ok:
            _ext.notice_missing(f"the fused EMA update on {device.type}")
            return "torch"
        return "native" if _NATIVE_WINS[device.type] else "torch"
    if choice in ("torch", "reference"):
        return "torch"
    if choice == "cuda" and device.type != "cuda":
        raise ValueError(f"{OP}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if choice in ("native", "cuda"):
        if device.type not in _NATIVE_WINS or not native_ok:
            why = _ext.load_error() or "built without CUDA kernels"
            raise RuntimeError(f"{OP}: the native backend cannot run on {device} ({why}); {_ext.BUILD_HINT}")
        return "native"
    raise ValueError(f"{OP}: backend {choice!r} is not implemented; use 'native', 'torch' or 'reference'")


def _torch_update(ema: list[torch.Tensor], params: list[torch.Tensor], weight: float) -> None:
    # lerp_ would broadcast a mismatched shape instead of failing, so shapes are checked up front;
    # dtype/device mismatches make torch raise, and then _explain names the offending pair.
    try:
        same_shapes = [e.shape for e in ema] == [p.shape for p in params]
    except AttributeError:  # a non-tensor in the lists
        same_shapes = False
    if not same_shapes:
        _explain(ema, params)
    try:
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, weight)
    except (RuntimeError, TypeError):
        _explain(ema, params)
        raise


def _explain(ema: list[torch.Tensor], params: list[torch.Tensor]) -> None:
    """Raises the error that names the first bad pair (index, both shapes/dtypes/devices)."""
    for i, (e, p) in enumerate(zip(ema, params)):
        check_tensor(OP, f"ema[{i}]", e, dtypes=_DTYPES)
        check_tensor(OP, f"params[{i}]", p, dtypes=_DTYPES)
        if e.shape != p.shape:
            raise ValueError(
                f"{OP}: ema[{i}] has shape {tuple(e.shape)} but params[{i}] has shape {tuple(p.shape)}; "
                "each EMA tensor must match its parameter"
            )
        if e.dtype != p.dtype:
            raise TypeError(f"{OP}: ema[{i}] has dtype {e.dtype} but params[{i}] has dtype {p.dtype}")
        if e.device != p.device:
            raise ValueError(f"{OP}: ema[{i}] is on {e.device} but params[{i}] is on {p.device}")
