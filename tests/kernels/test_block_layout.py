"""block_layout and select_blocks: both backends against the reference, the reference against
brute-force Python definitions, the native bindings' error reports, and (gpu-marked) the CUDA
kernels, also captured in a CUDA graph.

Masks: densities {0, 0.1, 0.5, 0.9, 1}, broadcast dims, expanded / transposed / sliced views, odd
sizes, Mk and Mq up to 2048 (4096 on GPU). Scores: ratio and mass mode, float32 / float16 /
bfloat16, ties (-0.0 with +0.0), -inf and all -inf rows, Mq != Mk. Mass mode is compared exactly;
the data keep prefix masses far from keep * total (no float64 rounding ties).
"""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch

from kdlib import _ext
from kdlib.kernels.block_layout import block_layout, select_blocks
from kdlib.kernels.reference.block_layout import layout_reference, ratio_count, select_blocks_reference

OPS = ("block_layout", "select_blocks")
# The dispatcher module (kdlib.kernels re-exports its function under the same name).
dispatch = importlib.import_module("kdlib.kernels.block_layout")


def _native_missing() -> str | None:
    """Why the native layout ops cannot run here, or None."""
    mod = _ext.native()
    if mod is None:
        return f"kdlib._C is not built ({_ext.load_error()}); {_ext.BUILD_HINT}"
    missing = [op for op in OPS if not hasattr(mod, op)]
    if missing:
        return f"kdlib._C was built before {', '.join(missing)} existed; rebuild it: {_ext.BUILD_HINT}"
    return None


needs_native = pytest.mark.skipif(_native_missing() is not None, reason=str(_native_missing()))
needs_cuda_ops = pytest.mark.skipif(
    _native_missing() is not None or not _ext.has_cuda_ops(),
    reason="kdlib._C has no CUDA layout ops (not built, a CPU torch, or no nvcc)",
)
BACKENDS = ["reference", pytest.param("native", marks=needs_native)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DENSITIES = [0.0, 0.1, 0.5, 0.9, 1.0]


# ---------------------------------------------------------------------------------------------
# helpers


def random_mask(shape, density, seed, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return (torch.rand(shape, generator=g) < density).to(device)


def random_scores(shape, seed, dtype=torch.float32, device="cpu", ties=False, neg_inf=False):
    """Scores of `dtype`. ties: small integers with zeros of both signs; neg_inf: some -inf
    entries and one all -inf row."""
    g = torch.Generator().manual_seed(seed)
    if ties:
        s = torch.randint(-2, 3, shape, generator=g).float()
        flip = torch.rand(shape, generator=g) < 0.5
        s = torch.where((s == 0) & flip, torch.full_like(s, -0.0), s)
    else:
        s = 2.0 * torch.randn(shape, generator=g)
    if neg_inf:
        s[torch.rand(shape, generator=g) < 0.2] = float("-inf")
        s[..., 0, :] = float("-inf")
    return s.to(dtype).to(device)


def brute_layout(mask):
    """The layout by its definition, with Python loops (small masks only)."""
    bm, hm, mq, mk = mask.shape
    kv_count = torch.zeros(bm, hm, mq, dtype=torch.int32)
    kv_index = torch.zeros(bm, hm, mq, mk, dtype=torch.int32)
    q_count = torch.zeros(bm, hm, mk, dtype=torch.int32)
    q_index = torch.zeros(bm, hm, mk, mq, dtype=torch.int32)
    rows = mask.cpu().tolist()
    for b, h in ((b, h) for b in range(bm) for h in range(hm)):
        for i in range(mq):
            cols = [j for j in range(mk) if rows[b][h][i][j]]
            kv_count[b, h, i] = len(cols)
            kv_index[b, h, i, : len(cols)] = torch.tensor(cols, dtype=torch.int32)
        for j in range(mk):
            qs = [i for i in range(mq) if rows[b][h][i][j]]
            q_count[b, h, j] = len(qs)
            q_index[b, h, j, : len(qs)] = torch.tensor(qs, dtype=torch.int32)
    return kv_count, kv_index, q_count, q_index


def brute_select(scores, keep, mode, keep_diagonal):
    """select_blocks by its definition, with Python floats (small inputs only)."""
    s = scores.float().cpu()
    b_, h_, mq, mk = s.shape
    out = torch.zeros(s.shape, dtype=torch.bool)
    for b in range(b_):
        for h in range(h_):
            for i in range(mq):
                row = s[b, h, i].tolist()
                order = sorted(range(mk), key=lambda j: (-row[j], j))  # -0.0 == 0.0: ties by column
                if mode == "ratio":
                    kept = order[: ratio_count(keep, mk)]
                else:
                    top = max(max(row), -1.7976931348623157e308)
                    e = [math.exp(v - top) for v in row]
                    total, before, kept = sum(e), 0.0, []
                    for rank, j in enumerate(order):
                        if rank == 0 or before < keep * total:
                            kept.append(j)
                        before += e[j]
                for j in kept:
                    out[b, h, i, j] = True
                if keep_diagonal and i < mk:
                    out[b, h, i, i] = True
    return out


def assert_layout_equal(layout, want, device):
    got = (layout.kv_count, layout.kv_index, layout.q_count, layout.q_index)
    for name, g, w in zip(("kv_count", "kv_index", "q_count", "q_index"), got, want):
        assert g.dtype == torch.int32 and g.is_contiguous() and g.device.type == torch.device(device).type, name
        assert torch.equal(g.cpu(), w.cpu()), name


def poison_cpu_allocator(shape, dtype=torch.int32, copies=4):
    """Free a few blocks the size of the outputs, full of junk, so that fresh outputs which reuse
    them show any element a kernel forgot to write (best effort: the allocator decides)."""
    junk = [torch.full(shape, 0x5A5A5A5A, dtype=dtype) for _ in range(copies)]
    del junk


# ---------------------------------------------------------------------------------------------
# block_layout

LAYOUT_SHAPES = [(1, 1, 1, 1), (2, 3, 37, 53), (1, 4, 64, 64), (3, 1, 5, 130), (1, 2, 130, 7)]


@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", [(1, 1, 1, 1), (2, 3, 9, 13), (1, 2, 7, 70)])
def test_reference_layout_matches_brute_force(shape, density):
    mask = random_mask(shape, density, seed=1)
    assert_layout_equal(block_layout(mask, backend="reference"), brute_layout(mask), "cpu")


@needs_native
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize("shape", LAYOUT_SHAPES)
def test_native_layout_matches_reference(shape, density):
    mask = random_mask(shape, density, seed=2)
    poison_cpu_allocator(shape)
    assert_layout_equal(block_layout(mask, backend="native"), layout_reference(mask), "cpu")


def strided_masks(seed, device="cpu"):
    """Views a layout must read in place: (name, mask)."""
    base = random_mask((2, 3, 40, 72), 0.3, seed, device)
    row = random_mask((1, 1, 40, 1), 0.5, seed + 1, device)
    col = random_mask((1, 1, 1, 72), 0.5, seed + 2, device)
    return [
        ("expanded batch/heads", base[:1, :1].expand(4, 5, 40, 72)),
        ("expanded along Mk (stride 0)", row.expand(2, 3, 40, 72)),
        ("expanded along Mq (stride 0)", col.expand(2, 3, 40, 72)),
        ("transposed", base.transpose(-1, -2)),
        ("heads/batch permuted", base.permute(1, 0, 2, 3)),
        ("column step 2", base[..., ::2]),
        ("row step 3, offset", base[:, 1:, 1::3, 5:]),
        ("last dim not innermost", base.permute(0, 1, 3, 2).contiguous().permute(0, 1, 3, 2)),
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_layout_reads_strided_and_expanded_masks(backend):
    for name, mask in strided_masks(seed=3):
        assert not mask.is_contiguous(), name
        want = layout_reference(mask.contiguous())
        assert_layout_equal(block_layout(mask, backend=backend), want, "cpu")


@needs_native
@pytest.mark.parametrize("shape", [(1, 2, 3, 2048), (1, 1, 2048, 5), (1, 1, 300, 2048)])
def test_native_layout_large_block_counts(shape):
    mask = random_mask(shape, 0.1, seed=4)
    assert_layout_equal(block_layout(mask, backend="native"), layout_reference(mask), "cpu")


@needs_native
def test_native_layout_same_with_one_and_two_threads():
    mask = random_mask((2, 8, 256, 192), 0.2, seed=5)  # large enough to be split over threads
    want = layout_reference(mask)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            assert_layout_equal(block_layout(mask, backend="native"), want, "cpu")
    finally:
        torch.set_num_threads(threads)


def test_layout_carries_block_size_and_density():
    mask = random_mask((1, 2, 6, 10), 0.5, seed=6)
    layout = block_layout(mask, (64, 32))
    assert layout.block_size == (64, 32) and layout.num_q_blocks == 6 and layout.num_k_blocks == 10
    assert layout.density() == pytest.approx(mask.float().mean().item())


# ---------------------------------------------------------------------------------------------
# select_blocks

RATIO_KEEPS = [0.05, 0.3, 0.77, 1.0]
MASS_KEEPS = [0.1, 0.5, 0.9, 1.0]


def keeps(mode):
    return RATIO_KEEPS if mode == "ratio" else MASS_KEEPS


@pytest.mark.parametrize("mode", ["ratio", "mass"])
@pytest.mark.parametrize("case", ["plain", "ties", "neg_inf"])
@pytest.mark.parametrize("shape", [(1, 2, 5, 9), (2, 1, 11, 4), (1, 1, 1, 1)])
def test_reference_select_matches_brute_force(shape, case, mode):
    scores = random_scores(shape, seed=7, ties=case == "ties", neg_inf=case == "neg_inf" and shape[2] > 1)
    for keep in keeps(mode):
        if case == "neg_inf" and keep == 1.0 and mode == "mass":
            continue  # -inf blocks sit exactly at keep * total: a float64 rounding tie
        for diag in (True, False):
            want = brute_select(scores, keep, mode, diag)
            assert torch.equal(select_blocks(scores, keep, mode=mode, keep_diagonal=diag, backend="reference"), want)


@needs_native
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["ratio", "mass"])
@pytest.mark.parametrize("case", ["plain", "ties", "neg_inf"])
@pytest.mark.parametrize("shape", [(2, 3, 17, 17), (1, 2, 7, 19), (1, 2, 19, 7), (1, 1, 1, 5), (1, 1, 4, 1)])
def test_native_select_matches_reference(shape, case, mode, dtype):
    scores = random_scores(shape, seed=8, dtype=dtype, ties=case == "ties", neg_inf=case == "neg_inf")
    for keep in keeps(mode):
        if case == "neg_inf" and keep == 1.0 and mode == "mass":
            continue  # a float64 rounding tie, see the reference
        for diag in (True, False):
            want = select_blocks_reference(scores, keep, mode=mode, keep_diagonal=diag)
            got = select_blocks(scores, keep, mode=mode, keep_diagonal=diag, backend="native")
            assert got.dtype == torch.bool and got.shape == scores.shape and got.is_contiguous()
            assert torch.equal(got, want), (keep, diag)


@needs_native
@pytest.mark.parametrize("mode", ["ratio", "mass"])
def test_native_select_large_rows_and_threads(mode):
    scores = random_scores((1, 2, 40, 2048), seed=9)
    threads = torch.get_num_threads()
    try:
        for n in (1, 2):
            torch.set_num_threads(n)
            for keep in (0.02, 0.5):
                want = select_blocks_reference(scores, keep, mode=mode)
                assert torch.equal(select_blocks(scores, keep, mode=mode, backend="native"), want)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_reads_strided_and_expanded_scores(backend):
    base = random_scores((2, 3, 24, 40), seed=10)
    views = [
        base[:1, :1].expand(2, 4, 24, 40),
        base.transpose(-1, -2),
        base[..., ::3],
        base.permute(1, 0, 2, 3)[:, :, 2:, 1:],
        torch._neg_view(base),  # a lazily negated view: its memory holds -scores
    ]
    for view in views:
        for mode in ("ratio", "mass"):
            want = select_blocks_reference(view.contiguous(), 0.3, mode=mode)
            assert torch.equal(select_blocks(view, 0.3, mode=mode, backend=backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_select_known_rows(backend):
    # Row 0: ties between +0.0 and -0.0 go to the lower column; row 1: -inf never wins a slot.
    s = torch.tensor([[-0.0, 0.0, -1.0, 0.0], [float("-inf"), 3.0, float("-inf"), 1.0]]).view(1, 1, 2, 4)
    got = select_blocks(s, 0.5, mode="ratio", keep_diagonal=False, backend=backend)
    assert got.view(2, 4).tolist() == [[True, True, False, False], [False, True, False, True]]
    # Mass: softmax of (0, log 3) is (0.25, 0.75): keep 0.7 keeps only the top block, 0.8 both.
    s = torch.tensor([0.0, math.log(3.0)]).view(1, 1, 1, 2)
    assert select_blocks(s, 0.7, mode="mass", keep_diagonal=False, backend=backend).view(2).tolist() == [False, True]
    assert select_blocks(s, 0.8, mode="mass", keep_diagonal=False, backend=backend).view(2).tolist() == [True, True]
    # ... and the diagonal is added on top: row 0 keeps column 0.
    assert select_blocks(s, 0.7, mode="mass", backend=backend).view(2).tolist() == [True, True]


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_inputs_say_what_is_wrong(backend):
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    with pytest.raises(TypeError, match=r"block_layout: block_mask has dtype float32.*mask\.bool\(\)"):
        block_layout(mask.float(), backend=backend)
    with pytest.raises(ValueError, match=r"block_layout: block_mask must have 4 dims.*\(4, 4\)"):
        block_layout(mask[0, 0], backend=backend)
    with pytest.raises(ValueError, match=r"block_layout: block_mask has an empty dim"):
        block_layout(mask[:, :, :0], backend=backend)
    with pytest.raises(TypeError, match="block_layout: block_mask must be a torch.Tensor"):
        block_layout([[True]], backend=backend)
    scores = torch.randn(1, 2, 3, 5)
    with pytest.raises(TypeError, match="select_blocks: scores has dtype float64; supported"):
        select_blocks(scores.double(), 0.5, backend=backend)
    with pytest.raises(ValueError, match="select_blocks: scores must have 4 dims"):
        select_blocks(scores[0], 0.5, backend=backend)
    with pytest.raises(ValueError, match="select_blocks: scores has an empty dim"):
        select_blocks(scores[..., :0], 0.5, backend=backend)
    for keep in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"select_blocks: keep must be in \(0, 1\]"):
            select_blocks(scores, keep, backend=backend)
    with pytest.raises(ValueError, match="select_blocks: unknown mode 'topk'"):
        select_blocks(scores, 0.5, mode="topk", backend=backend)
    scores[0, 1, 2, 3] = float("nan")
    with pytest.raises(ValueError, match="select_blocks: scores contain NaN"):
        select_blocks(scores, 0.5, backend=backend)


@needs_native
def test_native_bindings_report_problems_themselves():
    # Called directly, past the Python checks: each problem comes back as (class, message), None.
    mod = _ext.native()
    mask = torch.ones(1, 1, 4, 4, dtype=torch.bool)
    scores = torch.randn(1, 2, 3, 5)
    cases = [
        (mod.block_layout(mask.to(torch.uint8)), "TypeError", "block_layout: block_mask has dtype uint8"),
        (mod.block_layout(mask[0]), "ValueError", "block_layout: block_mask must have 4 dims"),
        (mod.block_layout(mask[..., :0]), "ValueError", "block_layout: block_mask has an empty dim"),
        (
            mod.select_blocks(scores.double(), 0.5, "ratio", True),
            "TypeError",
            "select_blocks: scores has dtype float64",
        ),
        (mod.select_blocks(scores.long(), 0.5, "ratio", True), "TypeError", "select_blocks: scores has dtype int64"),
        (mod.select_blocks(scores[0], 0.5, "ratio", True), "ValueError", "select_blocks: scores must have 4 dims"),
        (mod.select_blocks(scores[:0], 0.5, "ratio", True), "ValueError", "select_blocks: scores has an empty dim"),
        (mod.select_blocks(scores, 1.01, "mass", True), "ValueError", "select_blocks: keep must be in (0, 1]"),
        (mod.select_blocks(scores, 0.0, "ratio", True), "ValueError", "select_blocks: keep must be in (0, 1]"),
        (mod.select_blocks(scores, float("nan"), "ratio", True), "ValueError", "select_blocks: keep must be in"),
        (mod.select_blocks(scores, 0.5, "topk", True), "ValueError", "select_blocks: unknown mode 'topk'"),
    ]
    nan_scores = scores.clone()
    nan_scores[0, 0, 1, 4] = float("nan")
    for mode in ("ratio", "mass"):
        cases.append(
            (mod.select_blocks(nan_scores, 0.5, mode, True), "ValueError", "select_blocks: scores contain NaN")
        )
    for (problem, result), kind, start in cases:
        assert result is None and problem is not None, start
        assert problem[0] == kind and problem[1].startswith(start), (problem, start)
    problem, result = mod.block_layout(mask)
    assert problem is None and len(result) == 4


def test_env_var_and_argument_pick_the_backend(monkeypatch):
    mask = random_mask((1, 1, 5, 6), 0.5, seed=11)
    monkeypatch.setenv("KDLIB_BLOCK_LAYOUT_BACKEND", "reference")
    assert_layout_equal(block_layout(mask), layout_reference(mask), "cpu")
    monkeypatch.setenv("KDLIB_BLOCK_LAYOUT_BACKEND", "fast")
    with pytest.raises(ValueError, match="KDLIB_BLOCK_LAYOUT_BACKEND"):
        block_layout(mask)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        select_blocks(torch.randn(1, 1, 2, 2), 0.5, backend="cuda")


def test_without_extension_falls_back_with_one_notice(monkeypatch):
    monkeypatch.setattr(_ext, "native", lambda: None)
    monkeypatch.setattr(_ext, "has_cuda_ops", lambda: False)
    _ext.notice_missing.cache_clear()
    mask = random_mask((1, 2, 5, 6), 0.5, seed=12)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        block_layout(mask)
        block_layout(mask)
    notices = [w for w in caught if "block_layout on cpu" in str(w.message)]
    assert len(notices) == 1 and "pip install" in str(notices[0].message)
    with pytest.raises(RuntimeError, match="native backend cannot run"):
        select_blocks(torch.randn(1, 1, 2, 2), 0.5, backend="native")
    _ext.notice_missing.cache_clear()


@needs_native
def test_default_backend_is_native_on_cpu():
    assert dispatch._choose_backend("block_layout", None, torch.device("cpu")) == "native"
    assert dispatch._choose_backend("select_blocks", None, torch.device("cpu")) == "native"


# ---------------------------------------------------------------------------------------------
# CUDA


def poison_cuda_cache(*shapes_dtypes):
    """Fill blocks of the caching allocator with junk and free them: outputs of those sizes are
    then likely carved from junk, so an element a kernel forgets to write shows."""
    junk = [torch.full(shape, 0x5A, dtype=torch.uint8, device="cuda").view(dtype) for shape, dtype in shapes_dtypes]
    del junk


@pytest.mark.gpu
@needs_cuda_ops
@pytest.mark.parametrize("density", DENSITIES)
@pytest.mark.parametrize(
    "shape", [(1, 1, 1, 1), (2, 3, 37, 53), (1, 16, 256, 256), (1, 2, 300, 31), (1, 1, 4096, 4096), (1, 1, 9, 4097)]
)
def test_cuda_layout_matches_reference(shape, density):
    mask = random_mask(shape, density, seed=20, device="cuda")
    bm, hm, mq, mk = shape
    poison_cuda_cache(((bm, hm, mq, mk * 4), torch.int32), ((bm, hm, mk, mq * 4), torch.int32))
    layout = block_layout(mask)  # the default backend on CUDA is the native one
    assert_layout_equal(layout, layout_reference(mask), "cuda")


@pytest.mark.gpu
@needs_cuda_ops
def test_cuda_layout_reads_strided_and_expanded_masks():
    for _, mask in strided_masks(seed=21, device="cuda"):
        assert_layout_equal(block_layout(mask, backend="cuda"), layout_reference(mask.contiguous()), "cuda")


@pytest.mark.gpu
@needs_cuda_ops
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mode", ["ratio", "mass"])
@pytest.mark.parametrize("case", ["plain", "ties", "neg_inf"])
@pytest.mark.parametrize(
    # Mk 4097: padded to 8192 keys (64 KiB of shared memory, opt-in); 20000: the counting path.
    "shape",
    [
        (1, 1, 1, 1),
        (2, 3, 17, 33),
        (1, 16, 256, 256),
        (1, 2, 7, 1000),
        (1, 2, 1000, 7),
        (1, 1, 5, 4097),
        (1, 1, 2, 20000),
    ],
)
def test_cuda_select_matches_reference(shape, case, mode, dtype):
    scores = random_scores(shape, seed=22, dtype=dtype, device="cuda", ties=case == "ties", neg_inf=case == "neg_inf")
    for keep in keeps(mode):
        if case == "neg_inf" and keep == 1.0 and mode == "mass":
            continue  # a float64 rounding tie, see the reference
        for diag in (True, False):
            poison_cuda_cache((shape, torch.bool))
            want = select_blocks_reference(scores, keep, mode=mode, keep_diagonal=diag)
            got = select_blocks(scores, keep, mode=mode, keep_diagonal=diag)
            assert got.is_cuda and got.dtype == torch.bool and got.is_contiguous()
            assert torch.equal(got, want), (keep, diag)


@pytest.mark.gpu
@needs_cuda_ops
def test_cuda_select_reads_strided_scores():
    base = random_scores((2, 3, 24, 40), seed=23, device="cuda")
    for view in (base[:1, :1].expand(2, 4, 24, 40), base.transpose(-1, -2), base[..., ::3].to(torch.bfloat16)):
        for mode in ("ratio", "mass"):
            want = select_blocks_reference(view.contiguous(), 0.3, mode=mode)
            assert torch.equal(select_blocks(view, 0.3, mode=mode), want)


@pytest.mark.gpu
@needs_cuda_ops
@pytest.mark.parametrize("mk", [256, 4097])
def test_cuda_graph_capture_then_replay_on_new_contents(mk):
    mq = 200
    static_mask = random_mask((1, 4, mq, mk), 0.1, seed=24, device="cuda")
    static_scores = random_scores((1, 4, mq, mk), seed=25, device="cuda")

    def step():
        return (
            block_layout(static_mask),
            select_blocks(static_scores, 0.2, mode="ratio"),
            select_blocks(static_scores, 0.6, mode="mass", keep_diagonal=False),
        )

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up outside the capture, as torch.cuda.graphs asks
        step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        layout, ratio, mass = step()

    for seed in (26, 27):
        static_mask.copy_(random_mask(static_mask.shape, 0.3, seed=seed, device="cuda"))
        static_scores.copy_(random_scores(static_scores.shape, seed=seed + 100, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert_layout_equal(layout, layout_reference(static_mask), "cuda")
        assert torch.equal(ratio, select_blocks_reference(static_scores, 0.2, mode="ratio"))
        assert torch.equal(mass, select_blocks_reference(static_scores, 0.6, mode="mass", keep_diagonal=False))
