"""Backend choice shared by every kernel dispatcher.

Order of precedence: the ``backend=`` argument, then the environment variable
``KDLIB_<OP>_BACKEND`` (e.g. ``KDLIB_ATTENTION_JVP_BACKEND=reference``), then the best backend
available for the tensors' device. Falling back from a fast backend prints a one-time notice;
an explicitly requested backend that cannot run raises instead of silently doing something else.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import warnings

import torch

BACKENDS = ("triton", "cuda", "native", "torch", "reference")


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def triton_interpreted() -> bool:
    """True when Triton kernels run through the CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def can_run_triton(device: torch.device) -> bool:
    """Triton runs on CUDA tensors, or on CPU tensors under the interpreter."""
    if not triton_available():
        return False
    return device.type == "cuda" or (device.type == "cpu" and triton_interpreted())


@functools.cache
def notice_once(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def requested_backend(op: str, backend: str | None) -> str | None:
    """The backend asked for by argument or by ``KDLIB_<OP>_BACKEND``, validated; None for auto."""
    env_name = f"KDLIB_{op.upper()}_BACKEND"
    choice = backend if backend is not None else os.environ.get(env_name)
    if choice in (None, "", "auto"):
        return None
    if choice not in BACKENDS:
        source = "backend=" if backend is not None else env_name
        raise ValueError(f"{op}: unknown backend {choice!r} (from {source}); choose one of {BACKENDS} or 'auto'")
    return choice
