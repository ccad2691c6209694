"""Layout ops of block-sparse attention: a bool tile mask as CSR-style tile lists, and adaptive
(content-aware) block selection.

``block_layout(mask, block_size)`` is built once per step and reused by every layer: the forward
and dQ passes walk ``kv_index[..., i, :kv_count[..., i]]`` (the key blocks query block i selected,
ascending), the dK/dV pass walks the transpose ``q_index[..., j, :q_count[..., j]]``. Shapes are
fixed by the mask's shape (unused slots hold 0), so building a layout needs no host sync.

``select_blocks(scores, keep)`` is Video-BLADE's selection: per query-block row, the top blocks by
ratio or by softmax mass (``kdlib.kernels.masks.adaptive_block_mask`` scores and calls it).

Backends (``backend=`` or ``KDLIB_BLOCK_LAYOUT_BACKEND`` / ``KDLIB_SELECT_BLOCKS_BACKEND``):
``native`` is ``kdlib._C`` (threaded C++ on CPU; CUDA kernels that enqueue on the current stream
with no host sync, so both ops can be captured in a CUDA graph); ``reference`` (alias ``torch``)
is ``kdlib.kernels.reference.block_layout``, the specification. By default the native op runs where
the extension has it, else the reference with a one-time notice.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch

from kdlib import _ext
from kdlib.kernels._checks import check_tensor
from kdlib.kernels._dispatch import notice_once, requested_backend
from kdlib.kernels.reference.block_layout import layout_reference, select_blocks_reference

_MODES = ("ratio", "mass")
_SCORE_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@dataclass(frozen=True)
class BlockLayout:
    """CSR-style tile lists of a block mask, built once per step and reused by every layer.

    Bm/Hm are the mask's leading dims (1 = broadcast over batch/heads; never expanded here)."""

    kv_count: torch.Tensor  # int32 [Bm, Hm, Mq]: selected key blocks per query block
    kv_index: torch.Tensor  # int32 [Bm, Hm, Mq, Mk]: first kv_count[..., i] = those key blocks, ascending; rest 0
    q_count: torch.Tensor  # int32 [Bm, Hm, Mk]: the transpose, per key block (for the dK/dV pass)
    q_index: torch.Tensor  # int32 [Bm, Hm, Mk, Mq]: query blocks that selected key block j, ascending; rest 0
    block_size: tuple[int, int]  # (bq, bk) tokens per query block / key block

    @property
    def num_q_blocks(self) -> int:
        """Mq."""
        return self.kv_count.shape[-1]

    @property
    def num_k_blocks(self) -> int:
        """Mk."""
        return self.q_count.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.kv_count.device

    def density(self) -> float:
        """Selected tiles / all tiles of the mask, in [0, 1]. Syncs with the device (``.item()``):
        call it for logging, not inside a captured graph."""
        return self.kv_count.sum().item() / (self.kv_count.numel() * self.num_k_blocks)

    def check_compatible(self, n_q: int, n_k: int, batch: int, heads: int, op: str) -> None:
        """Raise a ValueError naming the mismatch if this layout cannot serve inputs of ``batch``
        x ``heads`` with n_q query and n_k key tokens. Metadata only: no sync."""
        bq, bk = self.block_size
        for what, n, b, m in (("query", n_q, bq, self.num_q_blocks), ("key", n_k, bk, self.num_k_blocks)):
            need = math.ceil(n / b)
            if need != m:
                raise ValueError(
                    f"{op}: block_mask has {m} {what} blocks but N{what[0]}={n} with block_size {b} needs {need}; "
                    "build the mask for this sequence length or pass the matching block_size"
                )
        bm, hm = self.kv_count.shape[:2]
        if bm not in (1, batch):
            raise ValueError(f"{op}: block_mask has batch dim {bm} but the inputs have batch {batch}; use 1 or {batch}")
        if hm not in (1, heads):
            raise ValueError(f"{op}: block_mask has {hm} heads but the inputs have {heads}; use 1 or {heads}")


def block_layout(
    block_mask: torch.Tensor, block_size: int | tuple[int, int] = 128, *, backend: str | None = None
) -> BlockLayout:
    """block_mask: bool [Bm, Hm, Mq, Mk] (True = the tile is computed; Bm/Hm may be 1) -> its
    BlockLayout: contiguous int32 tensors on the mask's device. block_size: bq = bk, or (bq, bk).
    Any strides (e.g. an expanded mask) are read in place."""
    op = "block_layout"
    check_tensor(op, "block_mask", block_mask)
    if block_mask.dtype != torch.bool:
        raise TypeError(
            f"{op}: block_mask has dtype {str(block_mask.dtype).replace('torch.', '')}; it must be bool "
            "(True = the tile is computed): use mask > 0 or mask.bool()"
        )
    if block_mask.dim() != 4:
        raise ValueError(f"{op}: block_mask must have 4 dims [Bm, Hm, Mq, Mk], got shape {tuple(block_mask.shape)}")
    if 0 in block_mask.shape:
        raise ValueError(f"{op}: block_mask has an empty dim: shape {tuple(block_mask.shape)}")
    pair = _block_pair(op, block_size)
    if _choose_backend(op, backend, block_mask.device) == "native":
        tensors = _call_native(op, block_mask)
    else:
        tensors = layout_reference(block_mask)
    return BlockLayout(*tensors, block_size=pair)


def select_blocks(
    scores: torch.Tensor,
    keep: float,
    *,
    mode: str = "ratio",
    keep_diagonal: bool = True,
    backend: str | None = None,
) -> torch.Tensor:
    """scores: float32/16/bf16 [B, H, Mq, Mk] block-pair logits, one query-block row each (taken in
    fp32) -> a fresh bool [B, H, Mq, Mk] mask.

    Blocks are ranked by score, higher first, ties to the lower column. ``mode="ratio"``: keep the
    ceil(keep * Mk) top blocks of each row (at least 1). ``mode="mass"``: with p = softmax(row),
    keep block j iff the p of the blocks ranked before it sums to < keep, i.e. the smallest top set
    whose mass reaches keep (computed in float64). keep: in (0, 1]. ``keep_diagonal``: also keep
    column i of row i (i < Mk). Exact rules: ``kdlib.kernels.reference.block_layout``.

    NaN scores raise a ValueError on CPU; on CUDA they are not checked (that would sync) and give
    unspecified selections, as does +inf. -inf is fine (never preferred over a finite score).
    """
    op = "select_blocks"
    check_tensor(op, "scores", scores, dtypes=_SCORE_DTYPES)
    if scores.dim() != 4:
        raise ValueError(f"{op}: scores must have 4 dims [B, H, Mq, Mk], got shape {tuple(scores.shape)}")
    if 0 in scores.shape:
        raise ValueError(f"{op}: scores has an empty dim: shape {tuple(scores.shape)}")
    if mode not in _MODES:
        raise ValueError(f"{op}: unknown mode {mode!r}; choose one of {_MODES}")
    if not isinstance(keep, numbers.Real) or not 0.0 < float(keep) <= 1.0:
        what = "a fraction of key blocks" if mode == "ratio" else "a fraction of softmax mass"
        raise ValueError(f"{op}: keep must be in (0, 1] ({what}), got {keep!r}")
    keep, keep_diagonal = float(keep), bool(keep_diagonal)
    if scores.device.type == "cpu" and torch.isnan(scores).any():
        raise ValueError(f"{op}: scores contain NaN; the selection would be unspecified")
    if _choose_backend(op, backend, scores.device) == "native":
        return _call_native(op, scores, keep, mode, keep_diagonal)
    return select_blocks_reference(scores, keep, mode=mode, keep_diagonal=keep_diagonal)


def _block_pair(op: str, block_size) -> tuple[int, int]:
    def ok(b) -> bool:
        return isinstance(b, numbers.Integral) and not isinstance(b, bool) and b > 0

    if ok(block_size):
        return int(block_size), int(block_size)
    if isinstance(block_size, (tuple, list)) and len(block_size) == 2 and all(ok(b) for b in block_size):
        return int(block_size[0]), int(block_size[1])
    raise ValueError(f"{op}: block_size must be a positive int or a pair (bq, bk) of them, got {block_size!r}")


def _native_has(op: str, device: torch.device) -> bool:
    mod = _ext.native()
    if mod is None or not hasattr(mod, op):
        return False
    return device.type == "cpu" or (device.type == "cuda" and _ext.has_cuda_ops())


def _choose_backend(op: str, backend: str | None, device: torch.device) -> str:
    """'native' or 'reference' for tensors on ``device``; raises if an explicit choice cannot run."""
    choice = requested_backend(op, backend)
    if choice is None:
        if _native_has(op, device):
            return "native"
        if device.type in ("cpu", "cuda"):
            if _ext.native() is None:
                _ext.notice_missing(f"{op} on {device.type}")
            else:  # loaded, but built before this op existed, or without CUDA kernels
                notice_once(f"kdlib._C has no {op} for {device.type}; using the PyTorch reference. {_ext.BUILD_HINT}")
        return "reference"
    if choice in ("reference", "torch"):
        return "reference"
    if choice == "cuda" and device.type != "cuda":
        raise ValueError(f"{op}: backend 'cuda' needs CUDA tensors, got tensors on {device}")
    if choice in ("native", "cuda"):
        if not _native_has(op, device):
            why = _ext.load_error() or f"this build has no {op} for {device.type}"
            raise RuntimeError(f"{op}: the native backend cannot run on {device} ({why}); {_ext.BUILD_HINT}")
        return "native"
    raise ValueError(f"{op}: backend {choice!r} is not implemented; use 'native', 'cuda' or 'reference'")


def _call_native(op: str, *args):
    """kdlib._C.<op>(*args): the bindings return (None, result) or ((error class, message), None)."""
    problem, result = getattr(_ext.native(), op)(*args)
    if problem is not None:
        kind, message = problem
        raise (TypeError if kind == "TypeError" else ValueError)(message)
    return result
