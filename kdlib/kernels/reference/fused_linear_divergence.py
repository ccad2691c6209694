"""Reference (the specification) for the teacher–student logit divergences and the fused LM-head op.

Every divergence is computed per row over the last (vocabulary) dim, in float32 (float64 stays
float64), on distributions softened by the temperature T:

    p_s = softmax(student_logits / T),   p_t = softmax(teacher_logits / T)

Kinds (sums run over the vocabulary):

    fkl       KL(p_t ‖ p_s) = Σ p_t (log p_t − log p_s)
    rkl       KL(p_s ‖ p_t) = Σ p_s (log p_s − log p_t)
    jsd       JSD_β = β KL(p_t ‖ m) + (1 − β) KL(p_s ‖ m),   m = β p_t + (1 − β) p_s
              (GKD's generalized JSD). JSD_β / β → fkl as β → 0 and JSD_β / (1 − β) → rkl as β → 1;
              the endpoints are *defined* as those limits: β = 0 is exactly fkl, β = 1 exactly rkl.
              β = 0.5 is the symmetric JSD, bounded by log 2.
    tvd       ½ Σ |p_t − p_s|   (in [0, 1])
    skew_fkl  KL(p_t ‖ α p_t + (1 − α) p_s)   (DistiLLM; α = 0 is fkl, α = 1 is 0)
    skew_rkl  KL(p_s ‖ α p_s + (1 − α) p_t)   (α = 0 is rkl, α = 1 is 0)
    symkl     fkl + rkl   (Jeffreys divergence)
    f         D_f(p_t ‖ p_s) = Σ p_s f(p_t / p_s) with a named generator f:
                kl          f(u) = u log u                          → fkl
                reverse_kl  f(u) = −log u                           → rkl
                js          f(u) = ½[u log u − (u + 1) log((u + 1)/2)] → jsd at β = 0.5
                hellinger   f(u) = (√u − 1)²                        → Σ (√p_t − √p_s)²  (in [0, 2])
                chi2        f(u) = (u − 1)²  (Pearson)              → Σ (p_t − p_s)² / p_s

Terms with a zero probability in front contribute exactly zero (0 log 0 = 0).
"""

from __future__ import annotations

import math

import torch

KINDS = ("fkl", "rkl", "jsd", "tvd", "skew_fkl", "skew_rkl", "symkl", "f")
GENERATORS = ("kl", "reverse_kl", "js", "hellinger", "chi2")


def _weighted_log_ratio(p: torch.Tensor, log_p: torch.Tensor, log_q: torch.Tensor) -> torch.Tensor:
    """p · (log p − log q), with 0 where p == 0 (so −inf logits of masked columns give 0, not NaN)."""
    return torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))


def _log_mix(log_a: torch.Tensor, log_b: torch.Tensor, w: float) -> torch.Tensor:
    """log(w · a + (1 − w) · b) for 0 < w < 1, computed in log space (no underflow to log 0)."""
    return torch.logaddexp(log_a + math.log(w), log_b + math.log1p(-w))


def validate_options(kind: str, beta: float, alpha: float, generator: str | None) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown divergence kind {kind!r}; choose one of {KINDS}")
    if kind == "jsd" and not 0.0 <= beta <= 1.0:
        raise ValueError(f"jsd: beta must be in [0, 1], got {beta}")
    if kind in ("skew_fkl", "skew_rkl") and not 0.0 <= alpha <= 1.0:
        raise ValueError(f"{kind}: alpha must be in [0, 1], got {alpha}")
    if kind == "f" and generator not in GENERATORS:
        raise ValueError(f"kind='f' needs generator= one of {GENERATORS}, got {generator!r}")
    if kind != "f" and generator is not None:
        raise ValueError(f"generator={generator!r} is only used with kind='f', not {kind!r}")


def real_vocab(student_v: int, teacher_v: int, vocab_size: int | None, op: str = "divergence") -> int:
    """Number of real tokens shared by student and teacher; raises on a real vocabulary mismatch."""
    if vocab_size is None:
        if student_v != teacher_v:
            raise ValueError(
                f"{op}: student vocab {student_v} != teacher vocab {teacher_v}. If the extra columns are "
                f"padding, pass vocab_size=<number of real tokens> (they then get probability zero); "
                f"otherwise the vocabularies do not match and cannot be compared token by token")
        return student_v
    if not 0 < vocab_size <= min(student_v, teacher_v):
        raise ValueError(f"{op}: vocab_size={vocab_size} must be in [1, min(student vocab {student_v}, "
                         f"teacher vocab {teacher_v})]")
    return vocab_size


def divergence_terms(log_ps: torch.Tensor, log_pt: torch.Tensor, kind: str, *, beta: float = 0.5,
                     alpha: float = 0.1, generator: str | None = None) -> torch.Tensor:
    """Per-element terms whose sum over the last dim is the divergence.

    log_ps, log_pt: [..., V] log-probabilities of student and teacher (already softened).
    Returns [..., V].
    """
    ps, pt = log_ps.exp(), log_pt.exp()
    if kind == "f":
        kind, beta = {"kl": ("fkl", beta), "reverse_kl": ("rkl", beta), "js": ("jsd", 0.5)}.get(
            generator, (kind, beta))
    if kind == "fkl" or (kind == "jsd" and beta == 0.0) or (kind == "skew_fkl" and alpha == 0.0):
        return _weighted_log_ratio(pt, log_pt, log_ps)
    if kind == "rkl" or (kind == "jsd" and beta == 1.0) or (kind == "skew_rkl" and alpha == 0.0):
        return _weighted_log_ratio(ps, log_ps, log_pt)
    if kind == "jsd":
        log_m = _log_mix(log_pt, log_ps, beta)
        return (beta * _weighted_log_ratio(pt, log_pt, log_m)
                + (1 - beta) * _weighted_log_ratio(ps, log_ps, log_m))
    if kind == "tvd":
        return 0.5 * (pt - ps).abs()
    if kind == "skew_fkl":
        return _weighted_log_ratio(pt, log_pt, log_pt if alpha == 1.0 else _log_mix(log_pt, log_ps, alpha))
    if kind == "skew_rkl":
        return _weighted_log_ratio(ps, log_ps, log_ps if alpha == 1.0 else _log_mix(log_ps, log_pt, alpha))
    if kind == "symkl":
        return _weighted_log_ratio(pt, log_pt, log_ps) + _weighted_log_ratio(ps, log_ps, log_pt)
    if generator == "hellinger":
        return ((0.5 * log_pt).exp() - (0.5 * log_ps).exp()) ** 2
    if generator == "chi2":
        return ps * torch.expm1(log_pt - log_ps) ** 2
    raise ValueError(f"unknown divergence kind {kind!r} / generator {generator!r}")


def row_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str, *,
                   temperature: float = 1.0, beta: float = 0.5, alpha: float = 0.1,
                   generator: str | None = None) -> torch.Tensor:
    """The divergence of each row: logits [..., V] (same shape) -> [...] in float32 (or float64)."""
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    log_ps = torch.log_softmax(student_logits.to(dtype) / temperature, dim=-1)
    log_pt = torch.log_softmax(teacher_logits.to(dtype) / temperature, dim=-1)
    terms = divergence_terms(log_ps, log_pt, kind, beta=beta, alpha=alpha, generator=generator)
    return terms.sum(dim=-1)


def fused_linear_divergence_reference(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    kind: str = "fkl",
    beta: float = 0.5,
    alpha: float = 0.1,
    generator: str | None = None,
    temperature: float = 1.0,
    t2_scaling: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    reduction: str = "mean",
) -> torch.Tensor:
    """Materialises both logit matrices [N, V] and applies the definition (see
    ``kdlib.kernels.fused_linear_divergence`` for the argument conventions). Differentiable by autograd.
    """
    vocab = real_vocab(student_weight.shape[0], teacher_weight.shape[0], vocab_size,
                       "fused_linear_divergence")
    s = student_hidden @ student_weight[:vocab].T
    t = teacher_hidden @ teacher_weight[:vocab].T
    if student_bias is not None:
        s = s + student_bias[:vocab]
    if teacher_bias is not None:
        t = t + teacher_bias[:vocab]
    rows = row_divergence(s, t, kind, temperature=temperature, beta=beta, alpha=alpha, generator=generator)
    if t2_scaling:
        rows = rows * temperature**2
    valid = torch.ones_like(rows, dtype=torch.bool) if labels is None else labels != ignore_index
    if hard_weight != 0.0:
        if labels is None:
            raise ValueError("fused_linear_divergence: hard_weight != 0 needs labels")
        log_p = torch.log_softmax(s.to(rows.dtype), dim=-1)
        safe = torch.where(valid, labels, torch.zeros_like(labels))
        rows = rows - hard_weight * log_p.gather(-1, safe[:, None]).squeeze(-1)
    rows = torch.where(valid, rows, torch.zeros_like(rows))
    if reduction == "sum":
        return rows.sum()
    if reduction == "mean":
        return rows.sum() / valid.sum().clamp_min(1)
    if reduction == "batchmean":
        return rows.sum() / rows.shape[0]
    raise ValueError(f"fused_linear_divergence: reduction must be 'mean', 'sum' or 'batchmean', "
                     f"got {reduction!r}")
