"""Block-sparse flash attention, forward and backward (Triton).

The block mask is consumed as CSR-style tile lists (``kdlib.kernels.block_layout.BlockLayout``):
per query block the ascending list of selected key blocks (forward and dQ), per key block the
ascending list of query blocks that selected it (dK/dV). A program therefore walks only its
selected tiles; the cost is proportional to the mask's density, and no pass ever looks at an
unselected tile.

Kernel tiles are at most the mask's blocks: a program owns BLOCK_M query rows inside one query
block and walks each selected key block in BK // BLOCK_N sub-tiles (one flattened loop, which
Triton's software pipeliner handles like a dense one).

Forward: online softmax in fp32 with exp2 (log2 e folded into the scale); stores O and the row
log-sum-exp in log2 units (LSE2 = m + log2 l) for the backward. A query block with no selected
tile stores O = 0 and LSE2 = +inf, so any backward program that reads it gets P = 0.
Backward (FlashAttention-2 split, no atomics): delta = rowsum(dO∘O); a dK/dV program per key
tile walks the query tiles that selected it, a dQ program per query tile walks its key tiles,
both recomputing P = exp2(scale·log2e·QKᵀ − LSE2).

Head dims that are not powers of two are padded inside the kernel with masked loads (zeros leave
every dot product unchanged). Any Nq, Nk: the partial last key block is masked in the forward and
in dQ; the dK/dV rows of keys past Nk are never stored; query rows past Nq read LSE2 = +inf (P = 0).

Loads: on sm90+ at head dims in ``TMA_HEAD_DIMS`` the walked tiles (K/V in the forward and dQ, Q/dO
in dK/dV) come through TMA descriptors, which zero-fill past N and D as the masks do; elsewhere
masked pointers. Every tile loop reads its next listed block one iteration ahead (``_next_start``).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kdlib.kernels.triton._tma import descriptors, load_tile, tma_ready

LOG2E = 1.4426950408889634

# Tile configs for GPUs, per padded head dim: forward (BLOCK_M, BLOCK_N, warps, stages); dK/dV
# (BLOCK_N, BLOCK_M, warps, stages) — keys owned, queries walked; dQ (BLOCK_M, BLOCK_N, warps,
# stages). Tiles shrink to divide the mask's block size. D 64 and 128: the fastest of
# `scratch`-style sweeps on an H200 (bf16, N=32768, 10% random mask, 128-blocks; the raw timings
# are in benchmarks/results/block_sparse_sweep.jsonl; D=128's dK/dV and dQ tiles re-swept with TMA
# loads on 2026-12-04, benchmarks/RESULTS.md). D 16/32 reuse D 64's and D 256 keeps small tiles for
# shared memory: neither was swept.
FWD_CONFIGS = {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (128, 128, 8, 3),
               256: (64, 32, 4, 2)}
DKDV_CONFIGS = {16: (64, 32, 4, 1), 32: (64, 32, 4, 1), 64: (64, 32, 4, 1), 128: (64, 64, 4, 2),
                256: (64, 32, 4, 1)}
DQ_CONFIGS = {16: (64, 64, 4, 3), 32: (64, 64, 4, 3), 64: (64, 64, 4, 3), 128: (128, 64, 8, 3),
              256: (64, 32, 4, 1)}
# Head dims (padded) whose tiles load through TMA descriptors on sm90+: at D=128 (H200, bf16,
# N=32768, 128-blocks) the forward went from 19.56 to 16.23 ms at full density and from 1.97 to 1.77
# ms at 10%; at D=64 TMA was 5% slower (1.13 vs 1.18 ms at 10%), so D ≤ 64 keeps pointer loads.
TMA_HEAD_DIMS = (128,)
FP32_CONFIG = (64, 32, 4, 2)  # fp32 tiles take twice the shared memory
INTERPRETER_CONFIG = (32, 32, 1, 1)
MIN_TILE = 16  # tl.dot's smallest operand edge


@triton.jit
def _tile_list(COUNT, INDEX, scb, scl, scm, sib, sil, sim, n_heads, BLOCK: tl.constexpr, LAYOUT_BLOCK: tl.constexpr):
    """This program's (batch, head) and the tile list of the layout row its BLOCK rows fall in:
    (b, h, number of listed blocks, pointer to the first listed index)."""
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    row = (tl.program_id(0) * BLOCK) // LAYOUT_BLOCK
    count = tl.load(COUNT + b * scb + h * scl + row * scm)
    return b, h, count, INDEX + b * sib + h * sil + row * sim


@triton.jit
def _next_start(index_list, next_block, it, n_iter, SUBS: tl.constexpr, BLOCK: tl.constexpr, TILE: tl.constexpr):
    """First row of iteration ``it``'s tile, and the listed block of iteration it + 1, loaded one
    iteration ahead so that the tile loads do not wait on a dependent index load."""
    start = next_block.to(tl.int64) * BLOCK + (it % SUBS) * TILE
    return start, tl.load(index_list + tl.minimum(it + 1, n_iter - 1) // SUBS)


@triton.jit
def _rows_mask(rows_ok, d_ok, EVEN: tl.constexpr):
    """The pointer loads' mask of a tile: the head dim's padding, and rows past N unless EVEN."""
    if EVEN:
        mask = d_ok[None, :]
    else:
        mask = rows_ok[:, None] & d_ok[None, :]
    return mask


@triton.jit
def _key_value_tiles(K_DESC, V_DESC, k_ptrs, v_ptrs, skn, svn, b, h, start_n, offs_n, n_k, d_ok,
                     BLOCK_N: tl.constexpr, D_PAD: tl.constexpr, EVEN_K: tl.constexpr, USE_TMA: tl.constexpr):
    """(key_ok [BLOCK_N], k, v [BLOCK_N, D_PAD]) of the key tile from ``start_n`` (forward and dQ)."""
    key_ok = (start_n + offs_n) < n_k
    mask = _rows_mask(key_ok, d_ok, EVEN_K)
    row = start_n.to(tl.int32)  # TMA coordinates are int32
    k = load_tile(K_DESC, k_ptrs + start_n * skn, mask, b, h, row, BLOCK_N, D_PAD, USE_TMA)
    v = load_tile(V_DESC, v_ptrs + start_n * svn, mask, b, h, row, BLOCK_N, D_PAD, USE_TMA)
    return key_ok, k, v


@triton.jit
def _forward_kernel(
    Q, K, V, O, LSE, K_DESC, V_DESC,
    KV_COUNT, KV_INDEX,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sob, soh, son, sod,
    scb, sch, scm,
    sib, sih, sim,
    n_heads, n_q, n_k, head_dim, qk_scale,
    BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, count, index_row = _tile_list(KV_COUNT, KV_INDEX, scb, sch, scm, sib, sih, sim, n_heads, BLOCK_M, BQ)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < head_dim
    row_ok = offs_m < n_q
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd,
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    k_ptrs = K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    SUBS: tl.constexpr = BK // BLOCK_N
    # Ascending key blocks: the first sub-tile visited starts below Nk, so every row has seen a
    # valid key (m finite) before any fully masked sub-tile of a partial last block comes.
    n_iter = count * SUBS
    next_block = tl.load(index_row)  # every layout row has at least one entry (0 when empty)
    for it in range(0, n_iter):
        start_n, next_block = _next_start(index_row, next_block, it, n_iter, SUBS, BK, BLOCK_N)
        key_ok, k, v = _key_value_tiles(K_DESC, V_DESC, k_ptrs, v_ptrs, skn, svn, b, h, start_n, offs_n, n_k, d_ok,
                                        BLOCK_N, D_PAD, EVEN_K, USE_TMA)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)
        if not EVEN_K:
            s = tl.where(key_ok[None, :], s, float("-inf"))
        # Scale after the row max (qk_scale > 0), so that scaling and shifting are one FMA.
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        alpha = tl.math.exp2(m_i - m_new)
        p = tl.math.exp2(s * qk_scale - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new

    has_keys = l_i > 0.0
    inv_l = tl.where(has_keys, 1.0 / tl.where(has_keys, l_i, 1.0), 0.0)
    out = acc * inv_l[:, None]
    tl.store(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod,
             out.to(O.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    lse2 = tl.where(has_keys, m_i + tl.math.log2(tl.where(has_keys, l_i, 1.0)), float("inf"))
    tl.store(LSE + pid_bh.to(tl.int64) * n_q + offs_m, lse2, mask=row_ok)


@triton.jit
def _delta_kernel(
    O, DO, DELTA,
    sob, soh, son, sod,
    sdb, sdh, sdn, sdd,
    n_heads, n_q, head_dim,
    BLOCK_M: tl.constexpr, D_PAD: tl.constexpr,
):
    """delta[b, h, i] = Σ_d dO[b, h, i, d] · O[b, h, i, d] in fp32 (the softmax backward's row term)."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // n_heads).to(tl.int64)
    h = (pid_bh % n_heads).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    mask = (offs_m < n_q)[:, None] & (offs_d < head_dim)[None, :]
    o = tl.load(O + b * sob + h * soh + offs_m[:, None] * son + offs_d[None, :] * sod, mask=mask, other=0.0)
    do = tl.load(DO + b * sdb + h * sdh + offs_m[:, None] * sdn + offs_d[None, :] * sdd, mask=mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(DELTA + pid_bh.to(tl.int64) * n_q + offs_m, delta, mask=offs_m < n_q)


@triton.jit
def _dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, Q_DESC, DO_DESC,
    Q_COUNT, Q_INDEX,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod,
    sdkb, sdkh, sdkn, sdkd,
    sdvb, sdvh, sdvn, sdvd,
    scb, sch, scn,
    sib, sih, sin,
    n_heads, n_q, n_k, head_dim, sm_scale, qk_scale,
    BQ: tl.constexpr, BK: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
    D_PAD: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, count, index_col = _tile_list(Q_COUNT, Q_INDEX, scb, sch, scn, sib, sih, sin, n_heads, BLOCK_N, BK)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < head_dim
    key_ok = offs_n < n_k
    kv_mask = key_ok[:, None] & d_ok[None, :]
    k = tl.load(K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd, mask=kv_mask, other=0.0)
    v = tl.load(V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd, mask=kv_mask, other=0.0)
    q_ptrs = Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd
    do_ptrs = DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod
    row_stats = pid_bh.to(tl.int64) * n_q

    dk = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    dv = tl.zeros([BLOCK_N, D_PAD], tl.float32)
    SUBS: tl.constexpr = BQ // BLOCK_M
    n_iter = count * SUBS
    next_block = tl.load(index_col)
    for it in range(0, n_iter):
        start_m, next_block = _next_start(index_col, next_block, it, n_iter, SUBS, BQ, BLOCK_M)
        rows = start_m + offs_m
        row_ok = rows < n_q
        mask = _rows_mask(row_ok, d_ok, False)
        q = load_tile(Q_DESC, q_ptrs + start_m * sqn, mask, b, h, start_m.to(tl.int32), BLOCK_M, D_PAD, USE_TMA)
        do = load_tile(DO_DESC, do_ptrs + start_m * sdon, mask, b, h, start_m.to(tl.int32), BLOCK_M, D_PAD, USE_TMA)
        lse2 = tl.load(LSE + row_stats + rows, mask=row_ok, other=float("inf"))
        delta = tl.load(DELTA + row_stats + rows, mask=row_ok, other=0.0)
        # Transposed tiles ([keys, queries]) so dK, dV accumulate without transposing P.
        p_t = tl.math.exp2(tl.dot(k, tl.trans(q), input_precision=PRECISION) * qk_scale - lse2[None, :])
        dv = tl.dot(p_t.to(do.dtype), do, dv, input_precision=PRECISION)
        dp_t = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        ds_t = p_t * (dp_t - delta[None, :])
        dk = tl.dot(ds_t.to(q.dtype), q, dk, input_precision=PRECISION)

    dk = dk * sm_scale
    tl.store(DK + b * sdkb + h * sdkh + offs_n[:, None] * sdkn + offs_d[None, :] * sdkd,
             dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(DV + b * sdvb + h * sdvh + offs_n[:, None] * sdvn + offs_d[None, :] * sdvd,
             dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, K_DESC, V_DESC,
    KV_COUNT, KV_INDEX,
    sqb, sqh, sqn, sqd,
    skb, skh, skn, skd,
    svb, svh, svn, svd,
    sdob, sdoh, sdon, sdod,
    sdqb, sdqh, sdqn, sdqd,
    scb, sch, scm,
    sib, sih, sim,
    n_heads, n_q, n_k, head_dim, sm_scale, qk_scale,
    BQ: tl.constexpr, BK: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    D_PAD: tl.constexpr, EVEN_K: tl.constexpr, PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b, h, count, index_row = _tile_list(KV_COUNT, KV_INDEX, scb, sch, scm, sib, sih, sim, n_heads, BLOCK_M, BQ)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, D_PAD)
    d_ok = offs_d < head_dim
    row_ok = offs_m < n_q
    ld = row_ok[:, None] & d_ok[None, :]
    q = tl.load(Q + b * sqb + h * sqh + offs_m[:, None] * sqn + offs_d[None, :] * sqd, mask=ld, other=0.0)
    do = tl.load(DO + b * sdob + h * sdoh + offs_m[:, None] * sdon + offs_d[None, :] * sdod, mask=ld, other=0.0)
    row_stats = pid_bh.to(tl.int64) * n_q
    lse2 = tl.load(LSE + row_stats + offs_m, mask=row_ok, other=float("inf"))
    delta = tl.load(DELTA + row_stats + offs_m, mask=row_ok, other=0.0)
    k_ptrs = K + b * skb + h * skh + offs_n[:, None] * skn + offs_d[None, :] * skd
    v_ptrs = V + b * svb + h * svh + offs_n[:, None] * svn + offs_d[None, :] * svd

    dq = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    SUBS: tl.constexpr = BK // BLOCK_N
    n_iter = count * SUBS
    next_block = tl.load(index_row)  # every layout row has at least one entry (0 when empty)
    for it in range(0, n_iter):
        start_n, next_block = _next_start(index_row, next_block, it, n_iter, SUBS, BK, BLOCK_N)
        key_ok, k, v = _key_value_tiles(K_DESC, V_DESC, k_ptrs, v_ptrs, skn, svn, b, h, start_n, offs_n, n_k, d_ok,
                                        BLOCK_N, D_PAD, EVEN_K, USE_TMA)
        p = tl.math.exp2(tl.dot(q, tl.trans(k), input_precision=PRECISION) * qk_scale - lse2[:, None])
        if not EVEN_K:
            # A zero key scores 0, and exp2(0 − LSE2) may overflow when every real score is very
            # negative; inf·0 would then poison dQ.
            p = tl.where(key_ok[None, :], p, 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=PRECISION)

    dq = dq * sm_scale
    tl.store(DQ + b * sdqb + h * sdqh + offs_m[:, None] * sdqn + offs_d[None, :] * sdqd,
             dq.to(DQ.dtype.element_ty), mask=ld)


def _alloc(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """Output allocation; the tests replace it with a NaN-filled one to catch unwritten elements."""
    return torch.empty(shape, dtype=dtype, device=device)


def padded_head_dim(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def fit_tile(tile: int, block: int) -> int:
    """The largest power-of-two tile ≤ ``tile`` that divides ``block`` (a multiple of 16)."""
    while block % tile:
        tile //= 2
    return tile


def _config(table: dict, dtype: torch.dtype, d_pad: int, interpreted: bool, override):
    if override is not None:
        return override
    if interpreted:
        return INTERPRETER_CONFIG
    return FP32_CONFIG if dtype == torch.float32 else table[d_pad]


def _precision(dtype: torch.dtype):
    # fp32 inputs get true fp32 products, as torch's fp32 matmul (tf32 would cost ~3e-4).
    return "ieee" if dtype == torch.float32 else None


def _walked(tensors, rows: int, d_pad: int, interpreted: bool) -> tuple[list, bool]:
    """The operands a kernel walks tile by tile, as TMA descriptors where the head dim (``TMA_HEAD_DIMS``)
    and the tensors allow, else as themselves (pointer loads); and whether TMA is used."""
    if d_pad in TMA_HEAD_DIMS and tma_ready(tensors, interpreted=interpreted):
        return descriptors(tensors, rows, d_pad), True
    return list(tensors), False


def _layout_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """Strides of a [Bm, Hm, M(, ...)] layout tensor over (batch, head, block); 0 where broadcast."""
    return tuple(0 if t.shape[i] == 1 else t.stride(i) for i in range(3))


def forward(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_count: torch.Tensor, kv_index: torch.Tensor,
    block_size: tuple[int, int], scale: float, *, interpreted: bool = False, config=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """q: [B, H, Nq, D]; k, v: [B, H, Nk, D]; kv_count: int32 [Bm, Hm, Mq]; kv_index: int32
    [Bm, Hm, Mq, Mk]. Returns out [B, H, Nq, D] and lse2 [B, H, Nq] fp32 (log2 units; +inf on
    empty rows). ``config`` = (BLOCK_M, BLOCK_N, warps, stages) overrides the table (tuning)."""
    bsz, heads, n_q, d = q.shape
    n_k = k.shape[2]
    bq, bk = block_size
    d_pad = padded_head_dim(d)
    block_m, block_n, warps, stages = _config(FWD_CONFIGS, q.dtype, d_pad, interpreted, config)
    block_m, block_n = fit_tile(block_m, bq), fit_tile(block_n, bk)
    out = _alloc(q.shape, q.dtype, q.device)
    lse2 = _alloc((bsz, heads, n_q), torch.float32, q.device)
    grid = (triton.cdiv(n_q, block_m), bsz * heads)
    walked, use_tma = _walked((k, v), block_n, d_pad, interpreted)
    _forward_kernel[grid](
        q, k, v, out, lse2, *walked, kv_count, kv_index,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        *_layout_strides(kv_count), *_layout_strides(kv_index),
        heads, n_q, n_k, d, scale * LOG2E,
        BQ=bq, BK=bk, BLOCK_M=block_m, BLOCK_N=block_n, D_PAD=d_pad, EVEN_K=n_k % bk == 0,
        PRECISION=_precision(q.dtype), USE_TMA=use_tma, num_warps=warps, num_stages=stages,
    )
    return out, lse2


def backward(
    grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
    lse2: torch.Tensor, kv_count: torch.Tensor, kv_index: torch.Tensor, q_count: torch.Tensor,
    q_index: torch.Tensor, block_size: tuple[int, int], scale: float, *, interpreted: bool = False,
    dkdv_config=None, dq_config=None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gradients dq [B, H, Nq, D], dk, dv [B, H, Nk, D] of the forward above, given grad_out
    [B, H, Nq, D], its saved out and lse2, and both layouts (q_count: int32 [Bm, Hm, Mk],
    q_index: int32 [Bm, Hm, Mk, Mq] — the transpose, per key block)."""
    bsz, heads, n_q, d = q.shape
    n_k = k.shape[2]
    bq, bk = block_size
    d_pad = padded_head_dim(d)
    precision = _precision(q.dtype)
    qk_scale = scale * LOG2E

    delta = torch.empty((bsz, heads, n_q), dtype=torch.float32, device=q.device)
    delta_rows = 16 if interpreted else 64
    _delta_kernel[(triton.cdiv(n_q, delta_rows), bsz * heads)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, n_q, d,
        BLOCK_M=delta_rows, D_PAD=d_pad,
    )

    dk = _alloc(k.shape, k.dtype, k.device)
    dv = _alloc(v.shape, v.dtype, v.device)
    block_n1, block_m1, warps, stages = _config(DKDV_CONFIGS, q.dtype, d_pad, interpreted, dkdv_config)
    block_n1, block_m1 = fit_tile(block_n1, bk), fit_tile(block_m1, bq)
    walked, use_tma = _walked((q, grad_out), block_m1, d_pad, interpreted)
    _dkdv_kernel[(triton.cdiv(n_k, block_n1), bsz * heads)](
        q, k, v, grad_out, dk, dv, lse2, delta, *walked, q_count, q_index,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dk.stride(), *dv.stride(),
        *_layout_strides(q_count), *_layout_strides(q_index),
        heads, n_q, n_k, d, scale, qk_scale,
        BQ=bq, BK=bk, BLOCK_N=block_n1, BLOCK_M=block_m1, D_PAD=d_pad, PRECISION=precision,
        USE_TMA=use_tma, num_warps=warps, num_stages=stages,
    )

    dq = _alloc(q.shape, q.dtype, q.device)
    block_m2, block_n2, warps, stages = _config(DQ_CONFIGS, q.dtype, d_pad, interpreted, dq_config)
    block_m2, block_n2 = fit_tile(block_m2, bq), fit_tile(block_n2, bk)
    walked, use_tma = _walked((k, v), block_n2, d_pad, interpreted)
    _dq_kernel[(triton.cdiv(n_q, block_m2), bsz * heads)](
        q, k, v, grad_out, dq, lse2, delta, *walked, kv_count, kv_index,
        *q.stride(), *k.stride(), *v.stride(), *grad_out.stride(), *dq.stride(),
        *_layout_strides(kv_count), *_layout_strides(kv_index),
        heads, n_q, n_k, d, scale, qk_scale,
        BQ=bq, BK=bk, BLOCK_M=block_m2, BLOCK_N=block_n2, D_PAD=d_pad, EVEN_K=n_k % bk == 0,
        PRECISION=precision, USE_TMA=use_tma, num_warps=warps, num_stages=stages,
    )
    return dq, dk, dv
