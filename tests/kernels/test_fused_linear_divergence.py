"""The fused LM-head divergence against the materialised definition (kdlib.objectives.divergence and
cross_entropy on full logits): loss and gradients w.r.t. student hidden, weight and bias."""

import pytest
import torch

from kdlib.kernels.fused_linear_divergence import fused_linear_divergence
from kdlib.objectives import cross_entropy, divergence

KINDS = [("fkl", {}), ("rkl", {}), ("jsd", {"beta": 0.3}), ("jsd", {"beta": 0.0}), ("tvd", {}),
         ("skew_fkl", {"alpha": 0.2}), ("skew_rkl", {"alpha": 0.2}), ("symkl", {}),
         ("f", {"generator": "hellinger"}), ("f", {"generator": "chi2"}), ("f", {"generator": "js"})]
IDS = [k + "-" + "-".join(f"{a}{b}" for a, b in kw.items()) for k, kw in KINDS]


def _problem(n, h, v, *, ht=None, pad=0, dtype=torch.float32, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    ht = ht or h

    def rnd(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device=device, dtype=dtype)

    p = dict(
        student_hidden=rnd(n, h), student_weight=rnd(v, h, scale=h**-0.5 * 2),
        teacher_hidden=rnd(n, ht), teacher_weight=rnd(v + pad, ht, scale=ht**-0.5 * 3),
        student_bias=rnd(v, scale=0.5), teacher_bias=rnd(v + pad, scale=0.5),
    )
    if pad:  # padding columns with large logits: any leaked probability mass would show
        p["teacher_bias"][v:] = 30.0
    labels = torch.randint(0, v, (n,), generator=g)
    labels[torch.rand(n, generator=g) < 0.2] = -100
    p["labels"] = labels.to(device)
    for k in ("student_hidden", "student_weight", "student_bias"):
        p[k].requires_grad_(True)
    return p


def _materialised(p, kind, kw, temperature, hard_weight, vocab):
    """The definition: full logits, the objectives' divergence + cross-entropy, mean over kept tokens."""
    f64 = {k: (v.double() if v.is_floating_point() else v) for k, v in p.items()}
    s = f64["student_hidden"] @ f64["student_weight"].T + f64["student_bias"]
    t = f64["teacher_hidden"] @ f64["teacher_weight"].T + f64["teacher_bias"]
    keep = p["labels"] != -100
    loss = divergence(s, t, kind, temperature=temperature, mask=keep, vocab_size=vocab, **kw)
    if hard_weight:
        loss = loss + hard_weight * cross_entropy(s, p["labels"])
    return loss


def _grads(loss, p):
    names = ("student_hidden", "student_weight", "student_bias")
    return [x.detach().double() for x in torch.autograd.grad(loss, [p[k] for k in names])]


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


def _check(p, kind, kw, *, backend, tol, temperature=1.7, hard_weight=0.4, vocab=None, chunk_size=None):
    want = _materialised(p, kind, kw, temperature, hard_weight, vocab)
    want_g = _grads(want, p)
    got = fused_linear_divergence(
        p["student_hidden"], p["student_weight"], p["teacher_hidden"], p["teacher_weight"], kind=kind,
        temperature=temperature, labels=p["labels"], hard_weight=hard_weight, student_bias=p["student_bias"],
        teacher_bias=p["teacher_bias"], vocab_size=vocab, chunk_size=chunk_size, backend=backend, **kw)
    assert got.dtype == torch.float32 and got.dim() == 0
    assert abs(float(got.detach()) - float(want.detach())) <= tol * abs(float(want.detach()))
    for g, w in zip(_grads(got, p), want_g):
        assert torch.isfinite(g).all() and _rel(g, w) < tol, (_rel(g, w), tol)


@pytest.mark.parametrize(("kind", "kw"), KINDS, ids=IDS)
def test_torch_backend_matches_definition_odd_sizes(kind, kw):
    p = _problem(423, 167, 1423, ht=131, pad=13)
    _check(p, kind, kw, backend="torch", tol=1e-4, vocab=1423, chunk_size=100)


@pytest.mark.parametrize(("kind", "kw"), KINDS, ids=IDS)
def test_triton_interpreter_matches_definition(kind, kw):
    p = _problem(37, 23, 301, ht=19, pad=5, seed=1)
    _check(p, kind, kw, backend="triton", tol=1e-4, vocab=301, chunk_size=16)


def test_triton_interpreter_fp16_and_temperature_one():
    p = _problem(21, 32, 257, dtype=torch.float16, seed=2)
    _check(p, "jsd", {"beta": 0.5}, backend="triton", tol=2e-2, temperature=1.0)


def test_reductions_grad_output_and_no_labels():
    p = _problem(50, 16, 97, seed=3)
    args = [p[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    s = p["student_hidden"].double() @ p["student_weight"].double().T
    t = p["teacher_hidden"].double() @ p["teacher_weight"].double().T
    for reduction, want in (("sum", divergence(s, t, "rkl", reduction="sum")),
                            ("batchmean", divergence(s, t, "rkl", reduction="batchmean"))):
        got = fused_linear_divergence(*args, kind="rkl", reduction=reduction, chunk_size=7, backend="torch")
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=0)
    got = fused_linear_divergence(*args, kind="rkl", backend="torch")
    want = divergence(s, t, "rkl")
    g_got = torch.autograd.grad(3.0 * got, p["student_hidden"])[0].double()
    g_want = torch.autograd.grad(3.0 * want, p["student_hidden"])[0]
    assert _rel(g_got, g_want) < 1e-5


def test_padded_teacher_vocab_rule_and_bad_inputs():
    p = _problem(8, 6, 11, pad=3)
    args = [p[k] for k in ("student_hidden", "student_weight", "teacher_hidden", "teacher_weight")]
    with pytest.raises(ValueError, match=r"student vocab 11 != teacher vocab 14"):
        fused_linear_divergence(*args)
    with pytest.raises(ValueError, match=r"student_hidden \[N, H\] = \(8, 6\).*\(11, 5\)"):
        fused_linear_divergence(args[0], args[1][:, :5], *args[2:], vocab_size=11)
    with pytest.raises(ValueError, match=r"teacher_hidden has 7 tokens, student_hidden 8"):
        fused_linear_divergence(*args[:2], args[2][:7], args[3], vocab_size=11)
    with pytest.raises(TypeError, match=r"student_hidden float32, student_weight float64"):
        fused_linear_divergence(args[0], args[1].double(), *args[2:], vocab_size=11)
    with pytest.raises(ValueError, match=r"on one device.*teacher_weight on meta"):
        fused_linear_divergence(*args[:3], args[3].to("meta"), vocab_size=11)
    with pytest.raises(ValueError, match=r"labels has shape \(7,\), expected \(8,\)"):
        fused_linear_divergence(*args, vocab_size=11, labels=p["labels"][:7])
    with pytest.raises(ValueError, match=r"student_bias has shape \(10,\), expected \(11,\)"):
        fused_linear_divergence(*args, vocab_size=11, student_bias=p["student_bias"][:10])
    with pytest.raises(ValueError, match=r"needs labels"):
        fused_linear_divergence(*args, vocab_size=11, hard_weight=0.5)


@pytest.mark.gpu
@pytest.mark.parametrize(("kind", "kw"), KINDS, ids=IDS)
def test_gpu_bf16_matches_definition(kind, kw):
    p = _problem(1031, 256, 5003, ht=384, pad=61, dtype=torch.bfloat16, seed=4, device="cuda")
    # χ² weighs errors by p_t / p_s, so bf16 rounding of the logits shows up more than elsewhere.
    tol = 5e-2 if kw.get("generator") == "chi2" else 2e-2
    _check(p, kind, kw, backend="triton", tol=tol, vocab=5003, chunk_size=256)


@pytest.mark.gpu
def test_gpu_fp32_tight_and_default_backend():
    p = _problem(777, 128, 3001, seed=5, device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    _check(p, "jsd", {"beta": 0.5}, backend=None, tol=1e-4)
