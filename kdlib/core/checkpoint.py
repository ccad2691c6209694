"""Checkpoints that never lose the user's work.

A checkpoint is a folder ``step-00000120/`` holding ``tensors.safetensors`` (every tensor: model,
EMA, optimizer state, RNG states) and ``meta.json`` (everything else, plus the SHA-256 of the
tensor file). It is written into ``step-00000120.tmp/``, each file fsynced, then the folder is
renamed into place and the parent fsynced: a crash leaves either the old set or the new one,
never a half-written checkpoint under a valid name. Loading verifies the checksum; a corrupt latest
checkpoint is reported and the previous one used. Nothing is unpickled: safetensors and JSON only.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

TENSORS = "tensors.safetensors"
META = "meta.json"
FORMAT_VERSION = 1


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, torn or corrupt."""


@dataclass
class Checkpoint:
    step: int
    path: Path
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any]


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def save_checkpoint(
    directory: str | Path, step: int, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, Any], *, keep: int = 3
) -> Path:
    """Atomically write checkpoint ``step`` under ``directory`` and prune to the newest ``keep``.

    Refuses tensors that are not finite: a NaN in a checkpoint would poison every resume.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    for name, t in tensors.items():
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"refusing to write checkpoint {step}: tensor {name!r} is not finite")
    final = directory / step_dir_name(step)
    tmp = directory / (step_dir_name(step) + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    # safetensors needs contiguous, non-shared CPU storage for every entry.
    flat = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    save_file(flat, str(tmp / TENSORS))
    _fsync_file(tmp / TENSORS)
    full_meta = {"format": FORMAT_VERSION, "step": step, "tensors_sha256": sha256(tmp / TENSORS), **meta}
    with open(tmp / META, "w") as f:
        json.dump(full_meta, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): replace it whole
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(directory)
    _prune(directory, keep)
    return final


def _prune(directory: Path, keep: int) -> None:
    steps = list_checkpoints(directory)
    for path in steps[:-keep] if keep > 0 else []:
        shutil.rmtree(path, ignore_errors=True)


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Completed checkpoint folders, oldest first (``.tmp`` leftovers of a crash are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step-") and p.suffix != ".tmp"]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def read_checkpoint(path: str | Path) -> Checkpoint:
    """Load one checkpoint folder, verifying its checksum; raises CheckpointError if damaged."""
    path = Path(path)
    try:
        meta = json.loads((path / META).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"checkpoint {path}: {META} is missing or unreadable ({exc})") from None
    expected = meta.get("tensors_sha256")
    if not (path / TENSORS).is_file():
        raise CheckpointError(f"checkpoint {path}: {TENSORS} is missing")
    actual = sha256(path / TENSORS)
    if actual != expected:
        raise CheckpointError(f"checkpoint {path}: checksum mismatch ({TENSORS} is corrupt or torn)")
    try:
        tensors = load_file(str(path / TENSORS))
    except Exception as exc:  # safetensors raises its own error types
        raise CheckpointError(f"checkpoint {path}: {TENSORS} cannot be read ({exc})") from None
    return Checkpoint(step=int(meta["step"]), path=path, tensors=tensors, meta=meta)


def latest_checkpoint(directory: str | Path) -> Checkpoint | None:
    """The newest loadable checkpoint; damaged newer ones are reported with a warning and skipped."""
    for path in reversed(list_checkpoints(directory)):
        try:
            return read_checkpoint(path)
        except CheckpointError as exc:
            warnings.warn(f"{exc}; falling back to the previous checkpoint", RuntimeWarning, stacklevel=2)
    return None


def save_weights(path: str | Path, module: torch.nn.Module, metadata: dict[str, str] | None = None) -> Path:
    """A module's state dict as one safetensors file, written atomically (temp, fsync, rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in module.state_dict().items()}
    save_file(state, str(tmp), metadata=metadata)
    _fsync_file(tmp)
    os.replace(tmp, path)
    _fsync_dir(path.parent)
    return path


def load_weights(module: torch.nn.Module, path: str | Path) -> torch.nn.Module:
    """Load a safetensors state dict into ``module``; a damaged file or mismatched keys raise
    CheckpointError naming the file and the problem."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"weights file not found: {path}")
    try:
        state = load_file(str(path))
    except Exception as exc:
        raise CheckpointError(f"weights file {path} cannot be read ({exc}); is it a safetensors file?") from None
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights file {path} does not fit the model: {exc}") from None
    return module
