"""Optional access to the native extension ``kdlib._C``.

The extension is built by ``pip install -e . --no-build-isolation`` (see README). When it is
missing or fails to load, ``native()`` returns None and callers use their PyTorch path; the first
such fallback prints a one-time notice naming what is slower and how to build it.
"""

from __future__ import annotations

import functools
import warnings

BUILD_HINT = "build it with: pip install -e . --no-build-isolation  (needs a C++ compiler; nvcc for CUDA)"


@functools.lru_cache(maxsize=1)
def _load():
    import torch  # noqa: F401  (loads libc10/libtorch, which the extension links against)

    try:
        from kdlib import _C  # type: ignore[attr-defined]
    except Exception as exc:  # ImportError, or an ABI mismatch after a torch upgrade
        return None, f"{type(exc).__name__}: {exc}"
    return _C, None


def native():
    """The loaded ``kdlib._C`` module, or None if it is not built or cannot load."""
    return _load()[0]


def load_error() -> str | None:
    """Why ``kdlib._C`` could not be loaded (None when it loaded)."""
    return _load()[1]


def has_cuda_ops() -> bool:
    """True when the extension was compiled with its CUDA kernels."""
    mod = native()
    return bool(mod is not None and getattr(mod, "with_cuda", lambda: False)())


@functools.cache
def notice_missing(what: str) -> None:
    """Warn once per feature that the extension is missing and what runs instead."""
    warnings.warn(
        f"kdlib._C is not available ({load_error()}); {what} uses the PyTorch path. {BUILD_HINT}",
        RuntimeWarning,
        stacklevel=3,
    )


def describe() -> dict[str, object]:
    """What ``kdlib info`` reports about the extension: whether it loaded, from where, with CUDA
    kernels or not, its ops, and why it did not load."""
    mod = native()
    return {
        "loaded": mod is not None,
        "path": getattr(mod, "__file__", None),
        "with_cuda": has_cuda_ops(),
        "ops": sorted(name for name in dir(mod) if not name.startswith("_") and name != "with_cuda") if mod else [],
        "error": load_error(),
    }
