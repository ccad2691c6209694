"""attention_jvp against torch.func.jvp of float64 materialised attention.

CPU (Triton interpreter): fp32/fp16, small odd shapes plus N=999/1000 in fp32. GPU (gpu-marked):
bf16/fp16/fp32 over the issue's grid. Tolerance: the kernel's error must be at most twice that of
torch.func.jvp over materialised attention run in the same dtype (plus a tiny floor for fp32).
"""

from __future__ import annotations

import pytest
import torch

import kdlib.kernels
import kdlib.kernels.triton.attention_jvp as triton_impl
from kdlib.kernels.attention_jvp import attention_jvp
from kdlib.kernels.reference.attention_jvp import attention_jvp_reference, materialized_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float32: 1e-5, torch.float16: 0.0, torch.bfloat16: 0.0}


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel outputs start as NaN: any element the kernel fails to write fails the test."""
    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_impl, "_alloc", alloc)


def make_inputs(b, h, nq, nk, d, dtype, magnitude=1.0, seed=0):
    g = torch.Generator(device=DEVICE).manual_seed(seed)

    def rand(n, m=1.0):
        return (m * torch.randn(b, h, n, d, generator=g, device=DEVICE, dtype=torch.float64)).to(dtype)

    # Scaling q, k (and their tangents) by 16 drives the logits far past fp16's range.
    m = magnitude
    return rand(nq, m), rand(nk, m), rand(nk), rand(nq, m), rand(nk, m), rand(nk)


def torch_jvp(q, k, v, tq, tk, tv, causal):
    def f(a, b, c):
        return materialized_attention(a, b, c, causal=causal)

    return torch.func.jvp(f, (q, k, v), (tq, tk, tv))


def rel_err(x, ref):
    return ((x.double() - ref).norm() / ref.norm()).item()


def check_case(b, h, nq, nk, d, causal, magnitude=1.0, *, dtype):
    inputs = make_inputs(b, h, nq, nk, d, dtype, magnitude)
    ref_o, ref_t = torch_jvp(*(x.double() for x in inputs), causal)
    out, tangent, lse = attention_jvp(*inputs, causal=causal, return_lse=True, backend="triton")
    assert out.dtype == dtype and tangent.dtype == dtype and out.shape == (b, h, nq, d)
    assert torch.isfinite(out).all() and torch.isfinite(tangent).all() and torch.isfinite(lse).all()

    same_o, same_t = torch_jvp(*inputs, causal)  # what torch gives in this dtype
    for name, ours, theirs, ref in (("out", out, same_o, ref_o), ("tangent", tangent, same_t, ref_t)):
        err, err_torch = rel_err(ours, ref), rel_err(theirs, ref)
        bound = 2 * err_torch if err_torch == err_torch else 1e-2  # torch's own may overflow to NaN
        # fp32 logits of size ~256·m² carry rounding ∝ their size in every implementation.
        floor = FLOOR[dtype] * magnitude
        assert err <= max(bound, floor), f"{name}: error {err:.3g} vs torch {dtype} {err_torch:.3g}"
    _, _, ref_lse = attention_jvp_reference(*(x.double() for x in inputs), causal=causal)
    assert rel_err(lse, ref_lse) < 1e-5


CPU_CASES = [  # (B, H, Nq, Nk, D, causal, magnitude)
    (1, 2, 33, 33, 64, False, 1.0),
    (2, 1, 77, 130, 80, True, 1.0),
    (1, 2, 130, 50, 128, True, 1.0),
    (1, 1, 65, 97, 32, False, 1.0),
    (1, 1, 47, 47, 96, True, 16.0),
    (1, 2, 64, 100, 64, False, 16.0),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CPU_CASES, ids=lambda c: "x".join(map(str, c)))
def test_matches_float64_jvp(case, dtype, poisoned):
    check_case(*case, dtype=dtype)


@pytest.mark.parametrize("nq,nk,d,causal", [(999, 1000, 64, True), (1000, 999, 80, False)])
def test_odd_long_sequences_fp32(nq, nk, d, causal, poisoned):
    check_case(1, 1, nq, nk, d, causal, dtype=torch.float32)


def test_package_export_and_reference_backend():
    inputs = make_inputs(1, 2, 20, 31, 40, torch.float64)
    out, tangent = kdlib.kernels.attention_jvp(*inputs, causal=True, backend="reference")
    ref_o, ref_t = torch_jvp(*inputs, True)
    assert rel_err(out, ref_o) < 1e-12 and rel_err(tangent, ref_t) < 1e-12


def test_causal_is_top_left_like_sdpa():
    q, k, v = make_inputs(1, 1, 9, 5, 32, torch.float64)[:3]
    sdpa = torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    assert rel_err(materialized_attention(q, k, v, causal=True), sdpa) < 1e-12


def test_bad_inputs_raise_clear_errors():
    q, k, v, tq, tk, tv = make_inputs(1, 2, 16, 24, 32, torch.float32)
    with pytest.raises(ValueError, match=r"tk must have shape \(1, 2, 24, 32\).*got \(1, 2, 16, 32\)"):
        attention_jvp(q, k, v, tq, tq, tv)
    with pytest.raises(ValueError, match="q must have 4 dims, got shape"):
        attention_jvp(q[0], k, v, tq, tk, tv)
    with pytest.raises(TypeError, match="share one dtype.*tv float16"):
        attention_jvp(q, k, v, tq, tk, tv.half())
    with pytest.raises(TypeError, match="q has dtype int64"):
        attention_jvp(q.long(), k, v, tq, tk, tv)
    small = make_inputs(1, 1, 8, 8, 16, torch.float32)
    with pytest.raises(ValueError, match="head dim 16 is outside the kernel's 32..256"):
        attention_jvp(*small, backend="triton")
    big = make_inputs(1, 1, 8, 8, 264, torch.float32)
    with pytest.raises(ValueError, match="head dim 264 is outside"):
        attention_jvp(*big, backend="triton")
    with pytest.raises(ValueError, match="unknown backend"):
        attention_jvp(q, k, v, tq, tk, tv, backend="fast")


def test_strided_inputs():
    """[B, N, H, D] storage seen through a transpose, as models produce it."""
    q, k, v, tq, tk, tv = (x.transpose(1, 2).contiguous().transpose(1, 2)
                           for x in make_inputs(2, 3, 40, 33, 64, torch.float32))
    out, tangent = attention_jvp(q, k, v, tq, tk, tv, backend="triton")
    ref_o, ref_t = torch_jvp(*(x.double() for x in (q, k, v, tq, tk, tv)), False)
    assert rel_err(out, ref_o) < 1e-5 and rel_err(tangent, ref_t) < 1e-5


GPU_CASES = [
    (b, h, nq, nk, d, causal, m)
    for (b, h, nq, nk) in [(2, 3, 999, 999), (1, 4, 1000, 1000), (1, 2, 1000, 999), (2, 2, 257, 1500),
                           (1, 2, 1500, 130)]
    for d in (64, 80, 128)
    for causal in (False, True)
    for m in (1.0, 16.0)
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32],
                         ids=["bf16", "fp16", "fp32"])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: "x".join(map(str, c)))
def test_gpu_matches_float64_jvp(case, dtype, poisoned):
    check_case(*case, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("d", [32, 96, 256])
def test_gpu_other_head_dims(d, dtype, poisoned):
    check_case(1, 2, 700, 900, d, True, dtype=dtype)
