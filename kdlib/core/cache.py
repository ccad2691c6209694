"""kdlib's on-disk cache: where it lives, and keyed tensor files that are written atomically and
refuse to be read for another key.

A cached file is a safetensors file whose metadata holds its key (a dict of strings: what the
tensors were made from, e.g. teacher, tokenizer and data fingerprints and the options). ``load_keyed``
returns the tensors only for exactly that key; a file made for another key is stale and an
unreadable one (truncated, foreign) is broken: both are warned about, naming what changed, and
None is returned so that the caller recomputes instead of training on someone else's outputs.
Used by the LLM teacher-signal cache (``kdlib.core.teacher_cache``) and the image domain's ODE pairs.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file


def cache_dir() -> Path:
    """``$KDLIB_CACHE_DIR``, default ``~/.cache/kdlib``."""
    return Path(os.environ.get("KDLIB_CACHE_DIR", Path.home() / ".cache" / "kdlib"))


def save_keyed(path: str | Path, tensors: dict[str, torch.Tensor], key: dict[str, str]) -> Path:
    """Write ``tensors`` with ``key`` to ``path``: under a temporary name of this process, then
    renamed, so a reader never sees half a file and two writers never share a temporary."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata={"key": json.dumps(key, sort_keys=True)})
    tmp.replace(path)
    return path


def load_keyed(path: str | Path, key: dict[str, str], what: str = "cache") -> dict[str, torch.Tensor] | None:
    """The tensors at ``path`` if it exists and was written for exactly ``key``; else None (missing:
    silently; stale or unreadable: with a warning that names ``what`` and the changed fields)."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            stored = json.loads((f.metadata() or {}).get("key", "{}"))
        if stored != key:
            changed = sorted(k for k in set(stored) | set(key) if stored.get(k) != key.get(k))
            warnings.warn(f"{what} {path} is stale ({', '.join(changed)} changed); recomputing it", stacklevel=3)
            return None
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file is recomputed, not fatal
        warnings.warn(f"{what} {path} is unreadable ({exc}); recomputing it", stacklevel=3)
        return None
