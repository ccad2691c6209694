"""Logit divergences between a student and a teacher, with one stated convention for all of them.

Conventions (exact formulas for every kind in ``kdlib.kernels.reference.fused_linear_divergence``):

- logits ``[..., V]``; the divergence is taken over the last dim, per position, in float32 whatever
  the input dtype (float64 stays float64);
- temperature T softens both distributions: ``p = softmax(logits / T)``; the Hinton T² gradient-scale
  correction is applied only when ``t2_scaling=True``;
- "fkl" is KL(p_teacher ‖ p_student), "rkl" is KL(p_student ‖ p_teacher); "jsd" is the generalized JSD
  ``β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m)``, ``m = β p_t + (1 − β) p_s`` (β = 0 is fkl, β = 1 is rkl);
- padded vocabularies: ``vocab_size=K`` says only the first K columns are real tokens; the other
  columns of either side get probability exactly zero (never "zero logits"). Without it, student
  and teacher must have the same V, and a mismatch is an error naming both sizes;
- ``mask`` (bool, shape ``logits.shape[:-1]`` or broadcastable to it) drops positions: they
  contribute nothing to any reduction;
- ``reduction``: "mean" = sum / number of unmasked positions, "sum", "batchmean" = sum / size of the
  first dim (``torch.nn.functional.kl_div``'s convention), "none" = per position (masked → 0).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdlib.kernels.reference.fused_linear_divergence import real_vocab, row_divergence, validate_options

REDUCTIONS = ("mean", "sum", "batchmean", "none")


def reduce(values: torch.Tensor, mask: torch.Tensor | None, reduction: str) -> torch.Tensor:
    """Reduce per-position values [...] under an optional keep-mask, by the module's convention."""
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if mask is not None:
        keep = torch.broadcast_to(mask.to(torch.bool), values.shape)
        values = torch.where(keep, values, torch.zeros_like(values))
    if reduction == "none":
        return values
    if reduction == "sum":
        return values.sum()
    if reduction == "batchmean":
        return values.sum() / (values.shape[0] if values.dim() else 1)
    count = values.numel() if mask is None else keep.sum()
    return values.sum() / torch.as_tensor(count, device=values.device).clamp_min(1)


def divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    kind: str,
    *,
    temperature: float = 1.0,
    beta: float = 0.5,
    alpha: float = 0.1,
    mask: torch.Tensor | None = None,
    reduction: str = "mean",
    t2_scaling: bool = False,
    generator: str | None = None,
    vocab_size: int | None = None,
) -> torch.Tensor:
    """Divergence between student and teacher distributions over the last dim.

    student_logits: [..., V_s]; teacher_logits: [..., V_t] (same leading shape).
    kind: "fkl", "rkl", "jsd" (β), "tvd", "skew_fkl" / "skew_rkl" (α), "symkl", or "f" with
    ``generator`` in {"kl", "reverse_kl", "js", "hellinger", "chi2"}.
    Returns a scalar, or [...] for ``reduction="none"``; float32 (float64 for float64 inputs).
    Gradients flow to both inputs; detach the teacher yourself if it is frozen.
    """
    validate_options(kind, beta, alpha, generator)
    if temperature <= 0:
        raise ValueError(f"divergence: temperature must be > 0, got {temperature}")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(f"divergence: student_logits {tuple(student_logits.shape)} and teacher_logits "
                         f"{tuple(teacher_logits.shape)} differ before the vocabulary dim")
    vocab = real_vocab(student_logits.shape[-1], teacher_logits.shape[-1], vocab_size)
    rows = row_divergence(student_logits[..., :vocab], teacher_logits[..., :vocab], kind,
                          temperature=temperature, beta=beta, alpha=alpha, generator=generator)
    if t2_scaling:
        rows = rows * temperature**2
    return reduce(rows, mask, reduction)


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor, *, ignore_index: int = -100,
                  reduction: str = "mean") -> torch.Tensor:
    """Hard-label cross-entropy −log softmax(logits)[label], in float32.

    logits: [..., V]; labels: [...] integer class ids, ``ignore_index`` marks positions to skip.
    "mean" averages over non-ignored positions; "batchmean" divides the sum by the first dim.
    """
    if labels.shape != logits.shape[:-1]:
        raise ValueError(f"cross_entropy: labels shape {tuple(labels.shape)} must equal logits shape "
                         f"without the class dim, {tuple(logits.shape[:-1])}")
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    flat = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).to(dtype), labels.reshape(-1),
                           ignore_index=ignore_index, reduction="none").reshape(labels.shape)
    return reduce(flat, labels != ignore_index, reduction)


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    *,
    kind: str = "fkl",
    soft_weight: float = 1.0,
    hard_weight: float = 0.0,
    ignore_index: int = -100,
    **divergence_kwargs,
) -> torch.Tensor:
    """``soft_weight · divergence + hard_weight · cross_entropy`` ("mean" over non-ignored positions).

    Positions whose label is ``ignore_index`` are dropped from both terms.
    """
    mask = None if labels is None else labels != ignore_index
    loss = soft_weight * divergence(student_logits, teacher_logits, kind, mask=mask, **divergence_kwargs)
    if hard_weight:
        if labels is None:
            raise ValueError("kd_loss: hard_weight != 0 needs labels")
        vocab = divergence_kwargs.get("vocab_size") or student_logits.shape[-1]
        hard = cross_entropy(student_logits[..., :vocab], labels, ignore_index=ignore_index)
        loss = loss + hard_weight * hard
    return loss
