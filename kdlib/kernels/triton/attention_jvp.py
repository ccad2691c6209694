"""Flash-attention forward plus its forward-mode tangent in one pass over K/V (Triton).

One program owns BLOCK_M query rows of one (batch, head). It walks the keys in blocks of BLOCK_N
with an online softmax and keeps, for its rows, in fp32 registers:

    acc_o = Σ_j p_ij v_j                   (→ O after dividing by l)
    acc_t = Σ_j p_ij tv_j + p_ij (ds_ij − c_i) v_j
    l     = Σ_j p_ij,   r = Σ_j (p∘ds)_ij

all rescaled by the same factor when the running max moves, and finalizes
dO = P tV + (P∘dS) V − rowsum(P∘dS)·O = acc_t / l − (r / l − c)·O. For fp16/fp32 the centre c
follows the running r / l (so the last term vanishes): with peaked softmax rows (large logits)
(P∘dS) V and rowsum(P∘dS)·O are both huge and cancel, which amplifies rounding. For bf16, c = 0:
centring costs ~10% of the time and bf16's own rounding of P∘dS dominates.

Six GEMMs per block (QKᵀ, tQ Kᵀ, Q tKᵀ, P V, P tV, (P∘dS) V), never an N×N tensor in memory.
The softmax uses exp2 with log2(e) folded into the score scale.

Head dims that are not powers of two are padded to the next one inside the kernel with masked
loads (zeros in the padding leave every dot product unchanged). Any Nq, Nk: the last key block is
masked, query rows past Nq are neither stored nor allowed to fault. On sm90+ the key-side tiles of
16-bit inputs (K, tK, V, tV) load through TMA descriptors instead of pointers where the head dim
(``TMA_CONFIGS``) and strides (``_tma.tma_ready``) allow; the descriptors zero-fill past Nk and
past D, as the masks do.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from kdlib.kernels.triton._tma import descriptors, load_tile, tma_ready

LOG2E = 1.4426950408889634

# (BLOCK_M, BLOCK_N, num_warps, num_stages) per padded head dim, for GPUs: 16-bit inputs from the
# sweep in benchmarks/attention_jvp.py (--sweep, H200, N=8192); fp32 tiles take twice the shared
# memory, so fewer/smaller stages.
GPU_CONFIGS: dict[int, tuple[int, int, int, int]] = {
    32: (64, 64, 4, 3),
    64: (64, 64, 4, 3),
    128: (128, 32, 8, 3),
    256: (64, 32, 4, 2),
}
# Without a causal mask, one more pipeline stage at D=128: 513-515 vs 483-496 TFLOP/s at N = 8k and
# 32k (H200, 2026-12-04); with one it lost (443 vs 446, 480 vs 496), so causal keeps the table's.
GPU_CONFIGS_NONCAUSAL: dict[int, tuple[int, int, int, int]] = {128: (128, 32, 8, 4)}
GPU_CONFIGS_FP32: dict[int, tuple[int, int, int, int]] = {
    32: (64, 64, 4, 2),
    64: (64, 64, 4, 2),
    128: (64, 32, 4, 2),
    256: (32, 32, 4, 1),
}
INTERPRETER_CONFIG = (64, 32, 1, 1)
# 16-bit inputs at these padded head dims load their K/V/tK/tV tiles through TMA descriptors on
# sm90+, with these tiles (H200, bf16, B=1, H=16; TFLOP/s against the pointer kernel of the same
# run, 2026-12-04): D=128 causal 500 vs 447 (N=8k), 509 vs 478 (16k); non-causal 549 vs 531 (8k),
# 513 vs 517 (16k); D=64 non-causal 539 vs 513, 535 vs 511; causal 467 vs 468, 490 vs 455.
TMA_CONFIGS: dict[int, tuple[int, int, int, int]] = {64: (64, 64, 4, 3), 128: (128, 64, 8, 2)}


@triton.jit
def _jvp_key_blocks(
    acc_o, acc_t, l_i, m_i, r_i, c_i,
    q, tq, k_ptrs, tk_ptrs, v_ptrs, tv_ptrs, k_desc, tk_desc, v_desc, tv_desc, b, h,
    stride_kn, stride_tkn, stride_vn, stride_tvn,
    offs_m, offs_n, d_ok, n_k, lo, hi, qk_scale, sm_scale,
    BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, MASK_KEYS: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, CENTER: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Fold keys [lo, hi) into the running state. MASK_KEYS: this range holds the last partial key
    block and/or the causal diagonal, so scores need a mask; elsewhere no mask is computed."""
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        if MASK_KEYS:
            ld_mask = (cols[:, None] < n_k) & d_ok[None, :]
        else:
            ld_mask = d_ok[None, :]
        k = load_tile(k_desc, k_ptrs + start_n * stride_kn, ld_mask, b, h, start_n, BLOCK_N, D_PAD, USE_TMA)
        tk = load_tile(tk_desc, tk_ptrs + start_n * stride_tkn, ld_mask, b, h, start_n, BLOCK_N, D_PAD, USE_TMA)
        v = load_tile(v_desc, v_ptrs + start_n * stride_vn, ld_mask, b, h, start_n, BLOCK_N, D_PAD, USE_TMA)
        tv = load_tile(tv_desc, tv_ptrs + start_n * stride_tvn, ld_mask, b, h, start_n, BLOCK_N, D_PAD, USE_TMA)

        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        ds = tl.dot(tq, tl.trans(k), input_precision=PRECISION)
        ds = tl.dot(q, tl.trans(tk), ds, input_precision=PRECISION)
        if MASK_KEYS:
            valid = cols[None, :] < n_k
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None])
            s = tl.where(valid, s, float("-inf"))

        # Every row sees key 0 in the first block it visits, so m_new is finite from then on.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        ds = ds * sm_scale

        l_new = l_i * alpha + tl.sum(p, 1)
        r_i = r_i * alpha + tl.sum(p * ds, 1)
        if CENTER:
            # acc_t holds Σ p·tv + Σ p·(ds − c)·v around the running mean c = r/l of dS under P:
            # with peaked softmax rows (large logits) Σ p·ds·v and rowsum(P∘dS)·O are both huge and
            # cancel, amplifying rounding. Moving the centre from c to c_new adds (c − c_new)·Σ p·v.
            c_new = r_i / l_new
            acc_t = (acc_t + (c_i - c_new)[:, None] * acc_o) * alpha[:, None]
            w = p * (ds - c_new[:, None])
        else:
            c_new = c_i
            acc_t = acc_t * alpha[:, None]
            w = p * ds
        acc_o = acc_o * alpha[:, None]
        p_lo = p.to(v.dtype)
        acc_o = tl.dot(p_lo, v, acc_o, input_precision=PRECISION)
        acc_t = tl.dot(p_lo, tv, acc_t, input_precision=PRECISION)
        acc_t = tl.dot(w.to(v.dtype), v, acc_t, input_precision=PRECISION)
        l_i, m_i, c_i = l_new, m_new, c_new
    return acc_o, acc_t, l_i, m_i, r_i, c_i


@triton.jit
def _attention_jvp_kernel(
    Q, K, V, TQ, TK, TV, O, TO, LSE, K_DESC, TK_DESC, V_DESC, TV_DESC,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    stqb, stqh, stqn, stqd,
    stkb, stkh, stkn, stkd,
    stvb, stvh, stvn, stvd,
    sob, soh, son, sod,
    stob, stoh, ston, stod,
    n_heads, n_q, n_k, head_dim, sm_scale,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, CAUSAL: tl.constexpr,
    PRECISION: tl.constexpr, CENTER: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < head_dim
    row_ok = offs_m < n_q

    q_mask = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=q_mask, other=0.0)
    tq = tl.load(
        TQ + b * stqb + h * stqh + offs_m[:, None] * stqn + offs_d[None, :] * stqd, mask=q_mask, other=0.0
    )
    k_ptrs = K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    tk_ptrs = TK + b * stkb + h * stkh + offs_n[:, None] * stkn + offs_d[None, :] * stkd
    v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd
    tv_ptrs = TV + b * stvb + h * stvh + offs_n[:, None] * stvn + offs_d[None, :] * stvd

    qk_scale = sm_scale * 1.4426950408889634
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    r_i = tl.zeros([BLOCK_M], tl.float32)
    c_i = tl.zeros([BLOCK_M], tl.float32)
    acc_o = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    acc_t = tl.zeros([BLOCK_M, D_PAD], tl.float32)

    # Keys every row of this block may see, in whole blocks: no mask needed there.
    if CAUSAL:
        hi = tl.minimum(n_k, (pid_m + 1) * BLOCK_M)
        full_end = (tl.minimum(pid_m * BLOCK_M, n_k) // BLOCK_N) * BLOCK_N
    else:
        hi = n_k
        full_end = (n_k // BLOCK_N) * BLOCK_N
    acc_o, acc_t, l_i, m_i, r_i, c_i = _jvp_key_blocks(
        acc_o, acc_t, l_i, m_i, r_i, c_i, q, tq, k_ptrs, tk_ptrs, v_ptrs, tv_ptrs,
        K_DESC, TK_DESC, V_DESC, TV_DESC, b, h,
        skn, stkn, svn, stvn, offs_m, offs_n, d_ok, n_k, 0, full_end, qk_scale, sm_scale,
        BLOCK_N, D_PAD, False, CAUSAL, PRECISION, CENTER, USE_TMA,
    )
    # The rest: the partial last block and/or the causal diagonal, masked.
    acc_o, acc_t, l_i, m_i, r_i, c_i = _jvp_key_blocks(
        acc_o, acc_t, l_i, m_i, r_i, c_i, q, tq, k_ptrs, tk_ptrs, v_ptrs, tv_ptrs,
        K_DESC, TK_DESC, V_DESC, TV_DESC, b, h,
        skn, stkn, svn, stvn, offs_m, offs_n, d_ok, n_k, full_end, hi, qk_scale, sm_scale,
        BLOCK_N, D_PAD, True, CAUSAL, PRECISION, CENTER, USE_TMA,
    )

    # dO = acc_t / l − (rowsum(P∘dS) − c)·O; centred, c = r / l already and the term vanishes.
    inv_l = 1.0 / l_i
    out = acc_o * inv_l[:, None]
    tangent = acc_t * inv_l[:, None] - (r_i * inv_l - c_i)[:, None] * out

    o_mask = row_ok[:, None] & d_ok[None, :]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=o_mask)
    tl.store(TO + b * stob + h * stoh + offs_m[:, None] * ston + offs_d[None, :] * stod,
             tangent.to(TO.dtype.element_ty), mask=o_mask)
    # Natural-log LSE of the scaled scores, as SDPA's flash backend reports it.
    tl.store(LSE + pid_bh.to(tl.int64) * n_q + offs_m, (m_i + tl.math.log2(l_i)) * 0.6931471805599453,
             mask=row_ok)


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation; the tests replace it with a NaN-filled one to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def padded_head_dim(d: int) -> int:
    return max(32, triton.next_power_of_2(d))


def attention_jvp_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    tq: torch.Tensor,
    tk: torch.Tensor,
    tv: torch.Tensor,
    *,
    scale: float | None,
    causal: bool,
    config: tuple[int, int, int, int] | None = None,
    interpreted: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q, tq: [B, H, Nq, D]; k, tk, v, tv: [B, H, Nk, D] (any strides, validated by the caller).

    Returns out, tangent_out: [B, H, Nq, D] in the inputs' dtype and lse: [B, H, Nq] fp32.
    ``config`` = (BLOCK_M, BLOCK_N, num_warps, num_stages) overrides the table (for tuning).
    """
    bsz, heads, n_q, d = q.shape
    n_k = k.shape[2]
    scale = 1.0 / math.sqrt(d) if scale is None else float(scale)
    d_pad = padded_head_dim(d)
    key_side = (k, tk, v, tv)
    use_tma = (d_pad in TMA_CONFIGS and q.dtype in (torch.float16, torch.bfloat16)
               and tma_ready(key_side, interpreted=interpreted))
    if config is None:
        if interpreted:
            config = INTERPRETER_CONFIG
        elif q.dtype == torch.float32:
            config = GPU_CONFIGS_FP32[d_pad]
        elif use_tma:
            config = TMA_CONFIGS[d_pad]
        else:
            config = GPU_CONFIGS[d_pad] if causal else GPU_CONFIGS_NONCAUSAL.get(d_pad, GPU_CONFIGS[d_pad])
    block_m, block_n, num_warps, num_stages = config
    key_args = descriptors(key_side, block_n, d_pad) if use_tma else key_side

    out = _alloc(q.shape, q.dtype, q.device)
    tangent = _alloc(q.shape, q.dtype, q.device)
    lse = _alloc((bsz, heads, n_q), torch.float32, q.device)
    grid = (triton.cdiv(n_q, block_m), bsz * heads)
    _attention_jvp_kernel[grid](
        q, k, v, tq, tk, tv, out, tangent, lse, *key_args,
        *q.stride(), *k.stride(), *v.stride(), *tq.stride(), *tk.stride(), *tv.stride(),
        *out.stride(), *tangent.stride(),
        heads, n_q, n_k, d, scale,
        BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, CAUSAL=causal,
        # fp32 inputs get true fp32 products (the tensor cores' tf32 would cost ~3e-4 accuracy).
        PRECISION="ieee" if q.dtype == torch.float32 else None,
        # Centring costs ~10% (H200, D=128); bf16's 8-bit products dominate its error anyway, so
        # only fp16/fp32 pay for it (see the module docstring).
        CENTER=q.dtype != torch.bfloat16, USE_TMA=use_tma,
        num_warps=num_warps, num_stages=num_stages,
    )
    return out, tangent, lse
