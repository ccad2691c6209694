"""A teacher's output signal, computed once and stored: top-k log-probabilities plus the tail mass.

Running a large teacher is the slow part of logit distillation on small hardware (a 135M LM
forwards a few hundred tokens per second on 2 CPU cores); a sweep of students over the same data
should pay it once. Per position the cache keeps the teacher's k most likely token ids, their
log-probabilities and the log of the mass of everything else (the tail):

    ids  [..., k] int64,   logp [..., k] float32,   tail [...] float32 = log(1 − Σ exp(logp))

A divergence then compares the two distributions coarse-grained to k + 1 buckets (the k teacher
tokens and one "everything else" bucket): the student's bucket log-probabilities are its own
log-softmax at ``ids`` and the logsumexp of the rest. Every divergence of
``kdlib.objectives.divergence`` applies unchanged to these [..., k + 1] distributions; by the data
processing inequality each is a lower bound of the full-vocabulary divergence, exact when the
teacher's tail mass is zero. Temperature T acts on the buckets (the tail bucket as one token), an
approximation of softening the full distribution.

The cache file (safetensors) carries a key (teacher, tokenizer and data fingerprints, k, format);
``load_signal`` returns None for a missing file and warns, naming the fields that changed, for a
stale one, so the caller recomputes instead of training on another teacher's outputs.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from pathlib import Path

import torch

from kdlib.core.cache import load_keyed, save_keyed
from kdlib.objectives import divergence

FORMAT = "topk-logp-tail/1"


def fingerprint(*parts: torch.Tensor | str | bytes | Path) -> str:
    """sha256 over tensors (dtype, shape, bytes), strings, bytes and files' contents, in order."""
    h = hashlib.sha256()
    for part in parts:
        if isinstance(part, torch.Tensor):
            t = part.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        elif isinstance(part, Path):
            with open(part, "rb") as f:
                for chunk in iter(lambda: f.read(1 << 24), b""):
                    h.update(chunk)
        else:
            h.update(part.encode() if isinstance(part, str) else part)
        h.update(b"\0")
    return h.hexdigest()


@torch.no_grad()
def topk_signal(logits_fn: Callable[[torch.Tensor], torch.Tensor], inputs: torch.Tensor, k: int,
                batch_size: int = 8, vocab_size: int | None = None) -> dict[str, torch.Tensor]:
    """Run ``logits_fn`` (inputs [b, ...] -> logits [b, ..., V]) over ``inputs`` [N, ...] in batches.

    Returns ``{"ids": [N, ..., k] int64, "logp": [N, ..., k] float32, "tail": [N, ...] float32}``;
    ``vocab_size``: only the first columns are real tokens (padded rows get probability zero)."""
    if k < 1:
        raise ValueError(f"top-k cache: k must be >= 1, got {k}")
    ids, logp, tail = [], [], []
    for start in range(0, inputs.shape[0], batch_size):
        logits = logits_fn(inputs[start:start + batch_size]).float()
        if vocab_size is not None:
            logits = logits[..., :vocab_size]
        lp = torch.log_softmax(logits, -1)
        top_lp, top_ids = lp.topk(k, dim=-1)
        # The tail's log-mass from the remaining log-probs directly (1 − Σp would cancel badly).
        rest = lp.scatter(-1, top_ids, float("-inf")).logsumexp(-1) if k < lp.shape[-1] \
            else torch.full(lp.shape[:-1], float("-inf"))
        ids.append(top_ids.cpu())
        logp.append(top_lp.cpu())
        tail.append(rest.cpu())
    return {"ids": torch.cat(ids), "logp": torch.cat(logp), "tail": torch.cat(tail)}


def save_signal(path: str | Path, signal: dict[str, torch.Tensor], key: dict[str, str]) -> Path:
    """Store ``signal`` for ``key`` (atomically, ``kdlib.core.cache``)."""
    return save_keyed(path, signal, {**key, "format": FORMAT})


def load_signal(path: str | Path, key: dict[str, str]) -> dict[str, torch.Tensor] | None:
    """The stored signal if ``path`` exists and was made for exactly ``key``; else None (stale: warned)."""
    return load_keyed(path, {**key, "format": FORMAT}, what="teacher cache")


def bucket_log_probs(student_logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Student logits [..., V] -> log-probabilities [..., k + 1] of the teacher's top-k ``ids`` [..., k]
    and of the tail (all other tokens), in float32."""
    lp = torch.log_softmax(student_logits.float(), -1)
    top = lp.gather(-1, ids)
    rest = lp.scatter(-1, ids, float("-inf")).logsumexp(-1, keepdim=True)
    return torch.cat([top, rest], -1)


def cached_divergence(student_logits: torch.Tensor, signal: dict[str, torch.Tensor], kind: str = "fkl", *,
                      temperature: float = 1.0, mask: torch.Tensor | None = None, t2_scaling: bool = False,
                      **options) -> torch.Tensor:
    """A divergence of ``kdlib.objectives.divergence`` between the teacher's cached signal (``ids``,
    ``logp`` [..., k], ``tail`` [...]) and the student's logits [..., V], on k + 1 buckets."""
    teacher = torch.cat([signal["logp"].float(), signal["tail"].float().unsqueeze(-1)], -1)
    # An all-in-top-k teacher has tail = -inf; a finite floor keeps log_softmax NaN-free there.
    teacher = teacher.clamp_min(-1e4)
    student = bucket_log_probs(student_logits, signal["ids"])
    return divergence(student, teacher, kind, temperature=temperature, mask=mask, t2_scaling=t2_scaling,
                      **options)
