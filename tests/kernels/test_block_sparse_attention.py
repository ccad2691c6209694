"""block_sparse_attention against a float64 masked-dense reference: outputs and gradients.

CPU (Triton interpreter): fp32/fp16 over densities {0, 0.1, 0.5, 0.9, 1}, odd N, partial blocks,
per-head and broadcast masks, empty rows, inputs ×1 and ×16. GPU (gpu-marked): bf16/fp16/fp32,
head dims 64/80/96/128. Tolerance: the kernel's error is at most 3× that of the same reference run
in the inputs' dtype (plus a small floor for fp32, where both are near rounding).
"""

from __future__ import annotations

import math

import pytest
import torch

import kdlib.kernels.triton.block_sparse_attention as triton_impl
from kdlib.kernels.block_layout import block_layout
from kdlib.kernels.block_sparse_attention import block_sparse_attention, layout_to_mask
from kdlib.kernels.reference.block_sparse_attention import block_sparse_attention_reference

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
FLOOR = {torch.float32: 2e-6, torch.float16: 0.0, torch.bfloat16: 0.0}


@pytest.fixture
def poisoned(monkeypatch):
    """Kernel outputs start as NaN: any element the kernels fail to write fails the test."""
    def alloc(shape, dtype, device):
        return torch.full(shape, float("nan"), dtype=dtype, device=device)

    monkeypatch.setattr(triton_impl, "_alloc", alloc)


def random_mask(bm, hm, mq, mk, density, seed, empty_row=False):
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(bm, hm, mq, mk, generator=g) < density
    if empty_row and mq > 1:
        mask[..., 1, :] = False  # a query block that selects nothing
    return mask.to(DEVICE)


def make_inputs(b, h, nq, nk, d, magnitude, seed):
    g = torch.Generator(device=DEVICE).manual_seed(seed)
    q = magnitude * torch.randn(b, h, nq, d, generator=g, device=DEVICE, dtype=torch.float64)
    k = magnitude * torch.randn(b, h, nk, d, generator=g, device=DEVICE, dtype=torch.float64)
    v = torch.randn(b, h, nk, d, generator=g, device=DEVICE, dtype=torch.float64)
    grad = torch.randn(b, h, nq, d, generator=g, device=DEVICE, dtype=torch.float64)
    return q, k, v, grad


def rel_err(x, ref):
    denom = ref.norm().item()
    diff = (x.double() - ref).norm().item()
    return diff if denom == 0 else diff / denom


def outputs_and_grads(fn, q, k, v, grad, dtype):
    leaves = [t.detach().to(dtype).clone().requires_grad_() for t in (q, k, v)]
    out = fn(*leaves)
    out.backward(grad.to(dtype))
    return out.detach(), [t.grad for t in leaves]


def check_case(b, h, nq, nk, d, block_size, mask, magnitude, dtype, seed=0):
    q, k, v, grad = make_inputs(b, h, nq, nk, d, magnitude, seed)
    bs = block_size if isinstance(block_size, tuple) else (block_size, block_size)

    def ours(a, b_, c):
        return block_sparse_attention(a, b_, c, mask, block_size=block_size, backend="triton")

    def reference(a, b_, c):
        return block_sparse_attention_reference(a, b_, c, mask, bs)

    ref_out, ref_grads = outputs_and_grads(reference, q, k, v, grad, torch.float64)
    same_out, same_grads = outputs_and_grads(reference, q, k, v, grad, dtype)
    out, grads = outputs_and_grads(ours, q, k, v, grad, dtype)
    assert out.dtype == dtype and out.shape == (b, h, nq, d)
    for name, mine, theirs, want in zip(
        ("out", "dq", "dk", "dv"), [out, *grads], [same_out, *same_grads], [ref_out, *ref_grads]
    ):
        assert torch.isfinite(mine).all(), f"{name} has non-finite values"
        err, err_torch = rel_err(mine, want), rel_err(theirs, want)
        bound = 3 * err_torch if err_torch == err_torch else 1e-2  # torch's own may overflow to NaN
        assert err <= max(bound, FLOOR[dtype] * magnitude**2), (
            f"{name}: error {err:.3g} vs reference in {dtype} {err_torch:.3g}"
        )
    return out, grads


CPU_CASES = [  # (B, H, Nq, Nk, D, block_size, mask leading dims, density, magnitude, empty row)
    (1, 2, 77, 100, 64, 32, (1, 2), 0.5, 1.0, True),  # per-head mask, partial blocks, an empty row
    (2, 2, 96, 96, 80, 32, (1, 1), 0.1, 1.0, False),  # broadcast mask, even N
    (2, 1, 65, 65, 96, (32, 16), (2, 1), 0.9, 1.0, False),  # per-batch mask, bq ≠ bk
    (1, 2, 50, 81, 128, 16, (1, 2), 1.0, 1.0, False),  # full mask == dense attention
    (1, 1, 47, 47, 64, (16, 48), (1, 1), 0.5, 16.0, True),  # ×16 logits, 48-token key blocks
    (1, 2, 33, 130, 64, 32, (1, 2), 0.0, 1.0, False),  # nothing selected: zeros, zero gradients
]


# Open gap: with ×16 logits in fp32 our dQ error is ~5× that of torch's fp32 reference
# (8.6e-3 vs 1.7e-3); strict, so the mark fails once the kernel meets the 3× bound.
XFAIL_FP32_X16 = pytest.mark.xfail(strict=True, reason="fp32 ×16 logits: dq error 5× torch's")


def case_id(c):
    return f"N{c[2]}x{c[3]}-D{c[4]}-bs{c[5]}-p{c[7]}-m{c[8]}"


CPU_PARAMS = [
    pytest.param(c, d, id=f"{case_id(c)}-{str(d)[6:]}",
                 marks=[XFAIL_FP32_X16] if (d == torch.float32 and c[8] > 1) else [])
    for c in CPU_CASES for d in (torch.float32, torch.float16)
]


@pytest.mark.parametrize("case,dtype", CPU_PARAMS)
def test_matches_float64_reference(case, dtype, poisoned):
    return _check_cpu_case(case, dtype)


def _check_cpu_case(case, dtype):
    b, h, nq, nk, d, block_size, (bm, hm), density, magnitude, empty = case
    bq, bk = block_size if isinstance(block_size, tuple) else (block_size, block_size)
    mask = random_mask(bm, hm, math.ceil(nq / bq), math.ceil(nk / bk), density, seed=nq + nk, empty_row=empty)
    out, (dq, dk, dv) = check_case(b, h, nq, nk, d, block_size, mask, magnitude, dtype)
    token_rows = mask.any(-1).repeat_interleave(bq, dim=-1)[..., :nq].expand(b, h, nq)
    assert (out[~token_rows] == 0).all() and (dq[~token_rows] == 0).all()
    token_cols = mask.any(-2).repeat_interleave(bk, dim=-1)[..., :nk].expand(b, h, nk)
    assert (dk[~token_cols] == 0).all() and (dv[~token_cols] == 0).all()
    if mask.any():
        assert out.abs().sum() > 0


def test_layout_reuse_equals_mask(seeded):
    mask = random_mask(1, 2, 3, 4, 0.5, seed=3)
    q, k, v, _ = make_inputs(1, 2, 90, 120, 64, 1.0, seed=1)
    q, k, v = (t.float() for t in (q, k, v))
    layout = block_layout(mask, 32)
    from_layout = block_sparse_attention(q, k, v, layout, backend="triton")
    from_mask = block_sparse_attention(q, k, v, mask, block_size=32, backend="triton")
    assert torch.equal(from_layout, from_mask)
    assert torch.equal(layout_to_mask(layout), mask)
    via_reference = block_sparse_attention(q, k, v, layout, backend="reference")
    torch.testing.assert_close(via_reference, from_mask, rtol=1e-5, atol=1e-5)


def test_full_mask_is_dense_attention():
    q, k, v, _ = make_inputs(2, 2, 70, 70, 64, 1.0, seed=2)
    q, k, v = (t.float() for t in (q, k, v))
    mask = torch.ones(1, 1, 3, 3, dtype=torch.bool, device=DEVICE)
    out = block_sparse_attention(q, k, v, mask, block_size=32, backend="triton")
    torch.testing.assert_close(out, torch.nn.functional.scaled_dot_product_attention(q, k, v), rtol=1e-5, atol=1e-5)


def _stride_two(t: torch.Tensor) -> torch.Tensor:
    """The same values as an fp32 view with stride 2 over D (NaN in the gaps)."""
    wide = torch.full((*t.shape[:-1], 2 * t.shape[-1]), float("nan"), dtype=torch.float32, device=t.device)
    wide[..., ::2] = t
    return wide[..., ::2]


@pytest.mark.parametrize("layout", ["contiguous", "strided"])
def test_tma_and_pointer_paths(layout, poisoned):
    """Contiguous inputs of a TMA head dim take the TMA-descriptor loads (sm90+, and the
    interpreter); a non-unit stride over D takes the masked-pointer loads. Both must match the
    reference, with partial blocks."""
    q, k, v, grad = make_inputs(1, 2, 70, 90, 96, 1.0, seed=4)  # D=96: padded to 128 inside
    to_input = (lambda t: t.float()) if layout == "contiguous" else _stride_two
    leaves = [to_input(t).detach().requires_grad_() for t in (q, k, v)]
    tma_capable = DEVICE == "cpu" or torch.cuda.get_device_capability()[0] >= 9
    _, use_tma = triton_impl._walked(leaves[1:], 32, 128, interpreted=DEVICE == "cpu")
    assert use_tma == (layout == "contiguous" and tma_capable)
    mask = random_mask(1, 2, 3, 3, 0.6, seed=5)
    out = block_sparse_attention(*leaves, mask, block_size=32, backend="triton")
    out.backward(to_input(grad))
    ref_leaves = [t.detach().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention_reference(*ref_leaves, mask, (32, 32))
    ref.backward(grad)
    for mine, want in zip([out, *(t.grad for t in leaves)], [ref, *(t.grad for t in ref_leaves)]):
        torch.testing.assert_close(mine.double(), want, rtol=1e-4, atol=1e-4)


def test_errors_name_the_problem():
    q = torch.randn(1, 2, 100, 64, device=DEVICE)
    good = torch.ones(1, 2, 4, 4, dtype=torch.bool, device=DEVICE)
    with pytest.raises(ValueError, match="query blocks"):
        block_sparse_attention(q, q, q, torch.ones(1, 2, 3, 4, dtype=torch.bool, device=DEVICE), block_size=32)
    with pytest.raises(ValueError, match="block"):
        block_sparse_attention(q, q, q, good, block_size=64)  # 100 tokens in 64-blocks is 2, not 4
    with pytest.raises(TypeError, match="bool"):
        block_sparse_attention(q, q, q, good.float(), block_size=32)
    with pytest.raises(TypeError, match="dtype"):
        block_sparse_attention(q, q.half(), q, good, block_size=32)
    with pytest.raises(ValueError, match="shape"):
        block_sparse_attention(q, q[:, :1], q, good, block_size=32)
    with pytest.raises(ValueError, match="heads|head"):
        block_sparse_attention(q, q, q, torch.ones(1, 3, 4, 4, dtype=torch.bool, device=DEVICE), block_size=32)
    with pytest.raises(ValueError, match="does not match the layout"):
        block_sparse_attention(q, q, q, block_layout(good, 32), block_size=16)
    with pytest.raises(ValueError, match="multiple of 16"):
        block_sparse_attention(q, q, q, torch.ones(1, 1, 10, 10, dtype=torch.bool, device=DEVICE),
                               block_size=10, backend="triton")
    with pytest.raises(ValueError, match="device|on "):
        block_sparse_attention(q, q, q, good.to("meta"), block_size=32)
    for bad_scale in (0.0, -0.125, float("nan")):
        with pytest.raises(ValueError, match="scale must be a positive"):
            block_sparse_attention(q, q, q, good, block_size=32, scale=bad_scale)


# ---------------------------------------------------------------------------------------- GPU

GPU_CASES = [  # (B, H, Nq, Nk, D, block_size, mask dims, density, magnitude, empty row)
    (2, 4, 1000, 1000, 64, 128, (1, 4), 0.1, 1.0, True),
    (1, 4, 1537, 1537, 80, 64, (1, 1), 0.5, 1.0, False),
    (1, 2, 2048, 1999, 96, (128, 64), (1, 2), 0.9, 1.0, True),
    (1, 4, 1531, 1531, 128, 128, (1, 4), 0.0, 1.0, False),
    (2, 2, 1024, 1024, 128, 128, (2, 2), 1.0, 1.0, False),
    (1, 2, 777, 777, 128, 64, (1, 2), 0.5, 16.0, True),
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("case", GPU_CASES, ids=lambda c: f"N{c[2]}x{c[3]}-D{c[4]}-bs{c[5]}-p{c[7]}-m{c[8]}")
def test_gpu_matches_float64_reference(case, dtype, poisoned):
    b, h, nq, nk, d, block_size, (bm, hm), density, magnitude, empty = case
    bq, bk = block_size if isinstance(block_size, tuple) else (block_size, block_size)
    mask = random_mask(bm, hm, math.ceil(nq / bq), math.ceil(nk / bk), density, seed=nq + nk, empty_row=empty)
    check_case(b, h, nq, nk, d, block_size, mask, magnitude, dtype)
