"""Triton kernel: divergence loss and its gradient w.r.t. the student logits, for one chunk of rows.

The matmuls around it (student and teacher logits, the gradients w.r.t. hidden and weight) go
through cuBLAS; this kernel is the memory-bound middle. One program owns one row (token) and
streams its V logits three times, in fp32 registers, never materialising an fp32 copy:

1. online max / sum-exp of the softened student and teacher logits (and of the raw student logits
   when the hard-label term needs softmax at T = 1 while T != 1);
2. Σ_j a_j, where a_j = ∂loss/∂log p_s,j (skipped for fkl, rkl and symkl, whose Σ a follows from
   pass 1's statistics);
3. the loss terms and the gradient ∂loss/∂z_j = (w / T) · (a_j − p_s,j Σ a), plus the hard-label
   term, written over the student logits in place (their last use).

Per-kind formulas for the terms and for a_j are in ``_terms`` and, for jsd, ``_row_terms``
(derived from the reference's definitions; see ``kdlib.kernels.reference.fused_linear_divergence``).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice

from kdlib.kernels._dispatch import triton_interpreted

# Kind codes: the reference's kinds after the endpoint rules are applied (see ``kind_code``).
FKL, RKL, JSD, TVD, SKEW_FKL, SKEW_RKL, SYMKL, HELLINGER, CHI2 = range(9)


def kind_code(kind: str, beta: float, alpha: float, generator: str | None) -> tuple[int, float]:
    """(kernel kind code, its mixing coefficient) for a validated kind / β / α / generator."""
    if kind == "f":
        return {"kl": (FKL, 0.0), "reverse_kl": (RKL, 0.0), "js": (JSD, 0.5),
                "hellinger": (HELLINGER, 0.0), "chi2": (CHI2, 0.0)}[generator]
    if kind == "jsd":
        return (FKL, 0.0) if beta == 0.0 else (RKL, 0.0) if beta == 1.0 else (JSD, beta)
    if kind in ("skew_fkl", "skew_rkl"):
        if alpha == 0.0:
            return (FKL if kind == "skew_fkl" else RKL), 0.0
        return (SKEW_FKL if kind == "skew_fkl" else SKEW_RKL), alpha
    return {"fkl": FKL, "rkl": RKL, "tvd": TVD, "symkl": SYMKL}[kind], 0.0


@triton.jit
def _logaddexp(a, b):
    hi = tl.maximum(a, b)
    return hi + tl.log(1.0 + tl.exp(tl.minimum(a, b) - hi))


@triton.jit
def _terms(ls, lt, c, log_c, log_1mc, KIND: tl.constexpr):
    """Per-element loss term and a = ∂loss/∂log p_s for log-probabilities ls (student), lt (teacher).
    jsd (KIND 2) is computed in ``_row_terms``."""
    ps = tl.exp(ls)
    pt = tl.exp(lt)
    if KIND == 0:  # fkl
        term = pt * (lt - ls)
        a = -pt
    elif KIND == 1:  # rkl
        term = ps * (ls - lt)
        a = ps * (ls - lt + 1.0)
    elif KIND == 3:  # tvd
        term = 0.5 * tl.abs(pt - ps)
        a = -0.5 * ps * tl.where(pt > ps, 1.0, tl.where(pt < ps, -1.0, 0.0))
    elif KIND == 4:  # skew_fkl, c = α:  m = α p_t + (1 − α) p_s
        lm = _logaddexp(lt + log_c, ls + log_1mc)
        term = pt * (lt - lm)
        a = -(1.0 - c) * tl.exp(lt + ls - lm)
    elif KIND == 5:  # skew_rkl, c = α:  m = α p_s + (1 − α) p_t
        lm = _logaddexp(ls + log_c, lt + log_1mc)
        term = ps * (ls - lm)
        a = ps * (ls - lm + 1.0) - c * tl.exp(2.0 * ls - lm)
    elif KIND == 6:  # symkl
        term = (pt - ps) * (lt - ls)
        a = ps * (ls - lt + 1.0) - pt
    elif KIND == 7:  # hellinger: (√p_t − √p_s)²
        d = tl.exp(0.5 * lt) - tl.exp(0.5 * ls)
        term = d * d
        a = ps - tl.exp(0.5 * (ls + lt))
    else:  # chi2 (Pearson): (p_t − p_s)² / p_s
        r = tl.exp(lt - ls) - 1.0
        term = ps * r * r
        a = ps - tl.exp(2.0 * lt - ls)
    return term, a, ps


_LN2 = tl.constexpr(math.log(2.0))
_LOG2E = tl.constexpr(1.0 / math.log(2.0))


@triton.jit
def _row_terms(z, y, inv_temp, lse_s, lse_t, c, log_c, log_1mc, KIND: tl.constexpr, FAST_LOG: tl.constexpr):
    """``_terms`` of raw logits z (student), y (teacher) given each row's log-sum-exp of z/T, y/T.

    jsd, the kind bound by special functions, is computed in base 2: exp2 and the hardware's
    approximate log2 (lg2.approx, relative error ~2⁻²², far below the bf16 logits' rounding) save a
    multiply per exp and libdevice's exact log. FAST_LOG is off under the interpreter."""
    if KIND == 2:  # c = β:  m = β p_t + (1 − β) p_s; ls2, lt2, lm2: log₂ of p_s, p_t, m
        ls2 = z * (inv_temp * _LOG2E) - lse_s * _LOG2E
        lt2 = y * (inv_temp * _LOG2E) - lse_t * _LOG2E
        ps = tl.exp2(ls2)
        pt = tl.exp2(lt2)
        # m in the probability domain (one log, not logaddexp's exp + log). It underflows only where
        # p_t and p_s do, and the clamp then keeps 0 · log m at 0 instead of NaN.
        mix = tl.maximum(c * pt + (1.0 - c) * ps, 1e-30)
        if FAST_LOG:
            lm2 = libdevice.fast_log2f(mix)
        else:
            lm2 = tl.log2(mix)
        a = ((1.0 - c) * _LN2) * ps * (ls2 - lm2)
        term = (c * _LN2) * pt * (lt2 - lm2) + a
    else:
        term, a, ps = _terms(z * inv_temp - lse_s, y * inv_temp - lse_t, c, log_c, log_1mc, KIND)
    return term, a, ps


@triton.jit
def _divergence_rows_kernel(
    S, T, LOSS, LABELS,
    stride_s, stride_t, V,
    inv_temp, c, log_c, log_1mc,
    soft_w, hard_w, grad_scale, ignore_index,
    KIND: tl.constexpr, HAS_LABELS: tl.constexpr, HARD: tl.constexpr, RAW_STATS: tl.constexpr,
    FAST_LOG: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    s_row = S + row * stride_s
    t_row = T + row * stride_t
    cols = tl.arange(0, BLOCK)

    valid = 1.0
    label = 0
    if HAS_LABELS:
        label = tl.load(LABELS + row).to(tl.int32)
        valid = tl.where(label == ignore_index, 0.0, 1.0)
        label = tl.where(label == ignore_index, 0, label)

    # Pass 1: online log-sum-exp of z/T (student), y/T (teacher) and, if needed, of raw z.
    m_s = -float("inf")
    d_s = 0.0
    m_t = -float("inf")
    d_t = 0.0
    m_r = -float("inf")
    d_r = 0.0
    x_st = 0.0  # rkl / symkl: Σ exp(z/T − m_s) · (z − y)/T, rescaled like d_s
    for start in range(0, V, BLOCK):
        idx = start + cols
        inb = idx < V
        z = tl.load(s_row + idx, mask=inb, other=-float("inf")).to(tl.float32)
        y = tl.load(t_row + idx, mask=inb, other=-float("inf")).to(tl.float32) * inv_temp
        zs = z * inv_temp
        new_m = tl.maximum(m_s, tl.max(zs, 0))
        e_s = tl.exp(zs - new_m)
        d_s = d_s * tl.exp(m_s - new_m) + tl.sum(e_s, 0)
        if KIND == 1 or KIND == 6:
            x_st = x_st * tl.exp(m_s - new_m) + tl.sum(tl.where(inb, e_s * (zs - y), 0.0), 0)
        m_s = new_m
        new_m = tl.maximum(m_t, tl.max(y, 0))
        d_t = d_t * tl.exp(m_t - new_m) + tl.sum(tl.exp(y - new_m), 0)
        m_t = new_m
        if RAW_STATS:
            new_m = tl.maximum(m_r, tl.max(z, 0))
            d_r = d_r * tl.exp(m_r - new_m) + tl.sum(tl.exp(z - new_m), 0)
            m_r = new_m
    lse_s = m_s + tl.log(d_s)
    lse_t = m_t + tl.log(d_t)
    lse_r = lse_s
    if RAW_STATS:
        lse_r = m_r + tl.log(d_r)

    # Σ a over the row. fkl: Σ −p_t = −1. rkl: Σ p_s (ls − lt + 1) = rkl + 1, and symkl: rkl, where
    # rkl = Σ p_s (z − y)/T − lse_s + lse_t comes from pass 1. Other kinds need pass 2.
    sum_a = -1.0
    if KIND == 1:
        sum_a = x_st / d_s - lse_s + lse_t + 1.0
    elif KIND == 6:
        sum_a = x_st / d_s - lse_s + lse_t
    elif KIND != 0:
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for start in range(0, V, BLOCK):
            idx = start + cols
            inb = idx < V
            z = tl.load(s_row + idx, mask=inb, other=0.0).to(tl.float32)
            y = tl.load(t_row + idx, mask=inb, other=0.0).to(tl.float32)
            _, a, _ = _row_terms(z, y, inv_temp, lse_s, lse_t, c, log_c, log_1mc, KIND, FAST_LOG)
            acc += tl.where(inb, a, 0.0)
        sum_a = tl.sum(acc, 0)

    # The label's logit is read before pass 3 overwrites the row with gradients.
    ce = 0.0
    if HARD:
        ce = lse_r - tl.load(s_row + label).to(tl.float32)

    # Pass 3: loss terms and ∂loss/∂z, written in place over the student logits.
    g_soft = grad_scale * soft_w * inv_temp * valid
    g_hard = grad_scale * hard_w * valid
    loss_acc = tl.zeros([BLOCK], dtype=tl.float32)
    for start in range(0, V, BLOCK):
        idx = start + cols
        inb = idx < V
        z = tl.load(s_row + idx, mask=inb, other=0.0).to(tl.float32)
        y = tl.load(t_row + idx, mask=inb, other=0.0).to(tl.float32)
        term, a, ps = _row_terms(z, y, inv_temp, lse_s, lse_t, c, log_c, log_1mc, KIND, FAST_LOG)
        loss_acc += tl.where(inb, term, 0.0)
        g = g_soft * (a - ps * sum_a)
        if HARD:
            p_raw = ps
            if RAW_STATS:
                p_raw = tl.exp(z - lse_r)
            g += g_hard * (p_raw - tl.where(idx == label, 1.0, 0.0))
        tl.store(s_row + idx, g.to(S.dtype.element_ty), mask=inb)
    tl.store(LOSS + row, valid * (soft_w * tl.sum(loss_acc, 0) + hard_w * ce))


def divergence_rows_(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    row_loss: torch.Tensor,
    labels: torch.Tensor | None,
    *,
    kind: int,
    coef: float,
    inv_temp: float,
    soft_w: float,
    hard_w: float,
    grad_scale: float,
    ignore_index: int,
    block: int | None = None,
    num_warps: int | None = None,
) -> None:
    """In place: student_logits [C, V] becomes ∂(grad_scale · Σ row_loss)/∂logits; row_loss [C] (fp32)
    receives ``valid · (soft_w · divergence + hard_w · cross-entropy)`` per row.

    teacher_logits: [C, V]; labels: [C] int64 or None (all rows valid, no hard term).
    """
    rows, vocab = student_logits.shape
    log_c = math.log(coef) if 0.0 < coef < 1.0 else 0.0
    log_1mc = math.log1p(-coef) if 0.0 < coef < 1.0 else 0.0
    hard = labels is not None and hard_w != 0.0
    block = block or min(4096, triton.next_power_of_2(vocab))
    num_warps = num_warps or (8 if block >= 2048 else 4)
    _divergence_rows_kernel[(rows,)](
        student_logits, teacher_logits, row_loss, labels if labels is not None else row_loss,
        student_logits.stride(0), teacher_logits.stride(0), vocab,
        inv_temp, coef, log_c, log_1mc,
        soft_w, hard_w, grad_scale, ignore_index,
        KIND=kind, HAS_LABELS=labels is not None, HARD=hard, RAW_STATS=hard and inv_temp != 1.0,
        FAST_LOG=not triton_interpreted(), BLOCK=block, num_warps=num_warps,
    )
