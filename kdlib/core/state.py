"""Flattening training state (optimizer, RNG) into safetensors tensors plus JSON metadata.

torch's own ``state_dict`` of an optimizer is a nested mix of tensors and Python values; saving it
with ``torch.save`` would need pickle to load. Here tensors go to the safetensors file under
prefixed keys and everything else to JSON, and the two are put back together on load.
"""

from __future__ import annotations

import random
import zlib
from typing import Any

import numpy as np
import torch


def prefixed(prefix: str, tensors: dict[str, Any]) -> dict[str, Any]:
    """``tensors`` under checkpoint keys ``prefix + name``."""
    return {f"{prefix}{k}": v for k, v in tensors.items()}


def unprefixed(tensors: dict[str, Any], prefix: str, device: torch.device | str | None = None) -> dict[str, Any]:
    """The entries of ``tensors`` whose key starts with ``prefix``, by the rest of the key (moved to
    ``device`` when given): ``prefixed``'s inverse."""
    return {k[len(prefix):]: v if device is None else v.to(device) for k, v in tensors.items() if k.startswith(prefix)}


def flatten_state(prefix: str, state: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """Move every tensor of a nested dict/list into ``tensors`` (key ``prefix/path``), return the
    JSON-able skeleton with ``{"__tensor__": key}`` placeholders."""
    if isinstance(state, torch.Tensor):
        tensors[prefix] = state
        return {"__tensor__": prefix}
    if isinstance(state, dict):
        # Pairs, not a JSON object: optimizer states are keyed by int parameter ids, which JSON
        # object keys would turn into strings.
        return {"__dict__": [[k, flatten_state(f"{prefix}/{k}", v, tensors)] for k, v in state.items()]}
    if isinstance(state, list | tuple):
        return {"__list__": [flatten_state(f"{prefix}/{i}", v, tensors) for i, v in enumerate(state)]}
    return state


def unflatten_state(skeleton: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {k: unflatten_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [unflatten_state(v, tensors) for v in skeleton["__list__"]]
    return skeleton


def torch_rng_tensors(prefix: str) -> dict[str, torch.Tensor]:
    """This process's torch generators as ``{prefix}torch`` (CPU) and ``{prefix}cuda/<i>`` (each
    CUDA device). Under torchrun each rank has its own streams (see ``seed_rank``), so a checkpoint
    keeps one such set per rank."""
    states = {f"{prefix}torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            states[f"{prefix}cuda/{i}"] = s
    return states


def restore_torch_rng(tensors: dict[str, torch.Tensor], prefix: str) -> bool:
    """Put back the generators ``torch_rng_tensors(prefix)`` saved; False if there are none. CUDA
    states are restored only onto the same number of devices."""
    if f"{prefix}torch" not in tensors:
        return False
    torch.set_rng_state(tensors[f"{prefix}torch"])
    cuda, i = [], 0
    while f"{prefix}cuda/{i}" in tensors:
        cuda.append(tensors[f"{prefix}cuda/{i}"])
        i += 1
    if torch.cuda.is_available() and cuda and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    return True


def capture_rng(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """The state of every random number generator a run uses: torch (CPU and each CUDA device),
    numpy's global generator and Python's ``random``."""
    tensors.update(torch_rng_tensors("rng/"))
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    tensors["rng/numpy"] = torch.from_numpy(np.asarray(keys, dtype=np.uint32).astype(np.int64))
    py_version, py_state, py_gauss = random.getstate()
    return {
        "numpy": {"kind": kind, "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": py_version, "state": list(py_state), "gauss": py_gauss},
        "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0,
    }


def seed_rank(seed: int, rank: int, stage: str) -> None:
    """Give rank ``rank`` > 0 its own torch stream for a stage (rank 0 keeps the stream a single
    process would have, so one-process runs are unchanged). Without this every rank would draw the
    same noise, times and generator inputs, and N GPUs would train on one GPU's worth of random
    draws. Python's ``random`` and numpy stay shared: methods draw step-level choices that every rank
    must agree on (which timestep index, which phase) from ``random``."""
    if rank > 0:
        torch.manual_seed((seed * 1_000_003 + rank * 7_919 + zlib.crc32(stage.encode())) % 2**63)


def restore_rng(meta: dict[str, Any], tensors: dict[str, torch.Tensor]) -> None:
    restore_torch_rng(tensors, "rng/")
    n = meta["numpy"]
    keys = tensors["rng/numpy"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached"]))
    p = meta["python"]
    random.setstate((p["version"], tuple(p["state"]), p["gauss"]))
