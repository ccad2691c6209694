"""ema_update_ against torch._foreach_lerp_ (the reference), on both backends and both devices."""

import warnings

import pytest
import torch

from kdlib import _ext
from kdlib.kernels import ema_update_

needs_native = pytest.mark.skipif(
    _ext.native() is None, reason=f"kdlib._C is not built ({_ext.load_error()}); {_ext.BUILD_HINT}"
)
needs_cuda_ops = pytest.mark.skipif(
    not _ext.has_cuda_ops(), reason="kdlib._C was built without its CUDA kernels (CPU torch or no nvcc)"
)

# Odd sizes: empty, one element, under / over a 16-byte vector, over a CUDA chunk (16384) and over
# the CPU single-thread grain (32768), so thread ranges and chunks end inside tensors.
SHAPES = [(0,), (1,), (7,), (3, 5), (33,), (129, 7), (1000,), (16385,), (70001,), (2, 0, 3), (40, 1999)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DECAYS = [0.0, 0.3, 0.5, 0.999, 1.0]


def _pairs(shapes, dtype, device="cpu", gen=None):
    ema = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    params = [torch.randn(s, generator=gen).to(device=device, dtype=dtype) for s in shapes]
    return ema, params


def _reference(ema, params, decay):
    out = [e.clone() for e in ema]
    torch._foreach_lerp_(out, params, 1.0 - decay)
    return out


def _assert_matches(got, want, decay):
    for i, (g, w) in enumerate(zip(got, want)):
        # Same formula and rounding as torch's lerp; an FMA may move a result by one ulp.
        torch.testing.assert_close(g, w, rtol=0, atol=_ulp(w.dtype), msg=lambda m, i=i: f"tensor {i}: {m}")


def _ulp(dtype):
    return {torch.float32: 1e-6, torch.float64: 1e-15, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}[dtype] * 4


def _check(backend, shapes, dtype, decay, device="cpu", gen=None):
    ema, params = _pairs(shapes, dtype, device, gen)
    want = _reference(ema, params, decay)
    before = [e.clone() for e in ema]
    ema_update_(ema, params, decay, backend=backend)
    _assert_matches(ema, want, decay)
    if 0.0 < decay < 1.0 and dtype in (torch.float32, torch.float64):
        # Guards against a skipped update matching a reference that also did nothing.
        assert not any(torch.equal(e, b) for e, b in zip(ema, before) if e.numel() > 0)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", DECAYS)
def test_native_cpu_matches_foreach_lerp(dtype, decay, seeded):
    _check("native", SHAPES, dtype, decay, gen=seeded)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_backend_matches_foreach_lerp(dtype, seeded):
    _check("torch", SHAPES, dtype, 0.9, gen=seeded)


@needs_native
def test_native_decay_endpoints_are_exact(seeded):
    ema, params = _pairs(SHAPES, torch.float32, gen=seeded)
    kept = [e.clone() for e in ema]
    ema_update_(ema, params, 1.0, backend="native")
    assert all(torch.equal(e, k) for e, k in zip(ema, kept))
    ema_update_(ema, params, 0.0, backend="native")
    assert all(torch.equal(e, p) for e, p in zip(ema, params))


@needs_native
def test_native_many_tensors_mixed_dtypes_and_threads(seeded):
    # Hundreds of small tensors next to a large one, mixed dtypes, run with 1 and 2 threads.
    shapes = [(int(n),) for n in torch.randint(1, 300, (300,), generator=seeded)] + [(200_003,)]
    dtypes = [DTYPES[i % len(DTYPES)] for i in range(len(shapes))]
    threads = torch.get_num_threads()
    try:
        for n_threads in (1, 2):
            torch.set_num_threads(n_threads)
            ema = [torch.randn(s, generator=seeded).to(d) for s, d in zip(shapes, dtypes)]
            params = [torch.randn(s, generator=seeded).to(d) for s, d in zip(shapes, dtypes)]
            want = _reference(ema, params, 0.99)
            ema_update_(ema, params, 0.99, backend="native")
            _assert_matches(ema, want, 0.99)
    finally:
        torch.set_num_threads(threads)


@needs_native
def test_native_strided_and_offset_tensors(seeded):
    a, b, c = (torch.randn(64, 33, generator=seeded) for _ in range(3))
    flat_e, flat_p = torch.randn(1001, generator=seeded), torch.randn(1001, generator=seeded)
    # transposed, row-strided, and contiguous but starting at an offset
    ema = [a[:, 1:].t(), b[::2], flat_e[1:]]
    params = [c.t()[1:], c[1::2], flat_p[:-1]]
    want = _reference(ema, params, 0.75)
    untouched = a[:, 0].clone(), b[1::2].clone(), flat_e[0].clone()
    ema_update_(ema, params, 0.75, backend="native")
    _assert_matches(ema, want, 0.75)
    assert torch.equal(a[:, 0], untouched[0]) and torch.equal(b[1::2], untouched[1])
    assert torch.equal(flat_e[0], untouched[2])


@needs_native
def test_native_bumps_version_and_records_no_graph(seeded):
    ema, params = _pairs([(5, 3), (17,)], torch.float32, gen=seeded)
    params = [p.requires_grad_() for p in params]
    versions = [e._version for e in ema]
    ema_update_(ema, params, 0.9, backend="native")
    assert all(e._version > v for e, v in zip(ema, versions))
    assert not any(e.requires_grad for e in ema)


@pytest.mark.parametrize("backend", ["native", "torch"])
def test_bad_inputs_name_the_pair(backend):
    if backend == "native" and _ext.native() is None:
        pytest.skip("kdlib._C is not built")
    a, b = torch.randn(3, 4), torch.randn(2)
    shape_error = r"ema\[1\] has shape [\[(]3, 4[\])] but params\[1\] has shape [\[(]4,?[\])]"
    with pytest.raises(ValueError, match=shape_error):
        ema_update_([b, a], [b.clone(), torch.randn(4)], 0.9, backend=backend)
    with pytest.raises(TypeError, match=r"ema\[0\].*float32.*params\[0\].*float16"):
        ema_update_([a], [a.half()], 0.9, backend=backend)
    with pytest.raises(TypeError, match=r"ema\[0\].*int64.*supported"):
        ints = torch.ones(3, dtype=torch.long)
        ema_update_([ints], [ints.clone()], 0.9, backend=backend)
    with pytest.raises(ValueError, match="2 ema tensors but 1 params"):
        ema_update_([a, a], [a], 0.9, backend=backend)
    with pytest.raises(TypeError, match=r"params\[1\] must be a torch.Tensor"):
        ema_update_([a, a], [a, 1.0], 0.9, backend=backend)
    for decay in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="decay must be in"):
            ema_update_([a], [a.clone()], decay, backend=backend)


def test_bad_backend_names():
    a = torch.randn(3)
    with pytest.raises(ValueError, match="unknown backend"):
        ema_update_([a], [a.clone()], 0.5, backend="fast")
    with pytest.raises(ValueError, match="not implemented"):
        ema_update_([a], [a.clone()], 0.5, backend="triton")
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        ema_update_([a], [a.clone()], 0.5, backend="cuda")


def test_without_extension_falls_back_with_one_notice(monkeypatch, seeded):
    monkeypatch.setattr(_ext, "native", lambda: None)
    monkeypatch.setattr(_ext, "has_cuda_ops", lambda: False)
    _ext.notice_missing.cache_clear()
    ema, params = _pairs([(9,), (4, 4)], torch.float32, gen=seeded)
    want = _reference(ema, params, 0.8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ema_update_(ema, params, 0.8)
        ema_update_([e.clone() for e in ema], params, 0.8)
    notices = [w for w in caught if "fused EMA update" in str(w.message)]
    assert len(notices) == 1 and "pip install" in str(notices[0].message)
    _assert_matches(ema, want, 0.8)
    with pytest.raises(RuntimeError, match="native backend cannot run"):
        ema_update_(ema, params, 0.8, backend="native")
    _ext.notice_missing.cache_clear()


def test_env_var_selects_backend(monkeypatch, seeded):
    monkeypatch.setenv("KDLIB_EMA_UPDATE_BACKEND", "reference")
    _check(None, [(5,), (0,), (300,)], torch.float32, 0.9, gen=seeded)
    monkeypatch.setenv("KDLIB_EMA_UPDATE_BACKEND", "nope")
    with pytest.raises(ValueError, match="KDLIB_EMA_UPDATE_BACKEND"):
        ema_update_([torch.randn(2)], [torch.randn(2)], 0.9)


@pytest.mark.gpu
@needs_cuda_ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("decay", [0.0, 0.3, 0.999, 1.0])
def test_cuda_op_matches_foreach_lerp(dtype, decay, seeded):
    # 300 tensors: more than one launch's table (128); sizes around the chunk and vector widths.
    shapes = SHAPES + [(int(n),) for n in torch.randint(1, 40_000, (290,), generator=seeded)] + [(3_000_017,)]
    _check("native", shapes, dtype, decay, device="cuda", gen=seeded)


@pytest.mark.gpu
@needs_cuda_ops
def test_cuda_op_unaligned_strided_and_poisoned(seeded):
    for dtype in (torch.float32, torch.bfloat16):
        flat_e, flat_p = (torch.randn(50_001, generator=seeded).to("cuda", dtype) for _ in range(2))
        mat_e = torch.randn(300, 257, generator=seeded).to("cuda", dtype)
        mat_p = torch.randn(257, 300, generator=seeded).to("cuda", dtype)
        # disjoint views: ema misaligned, then params misaligned (both take the scalar path), empty, transposed
        ema = [flat_e[1:25_001], flat_e[25_008:50_000], flat_e[:0], mat_e.t()]
        params = [flat_p[:25_000], flat_p[25_001:49_993], flat_p[:0], mat_p]
        want = _reference(ema, params, 0.95)
        ema_update_(ema, params, 0.95)  # default backend on CUDA
        _assert_matches(ema, want, 0.95)
        # decay 0 copies params: every element of the poisoned EMA must be written. (A NaN EMA would
        # stay NaN, as with torch's lerp: p - (p - e) * 0.)
        poisoned = torch.full((20_000,), 12345.0, device="cuda", dtype=dtype)
        fresh = torch.randn(20_000, generator=seeded).to("cuda", dtype)
        ema_update_([poisoned], [fresh], 0.0)
        assert torch.equal(poisoned, fresh)
    torch.cuda.synchronize()
