"""kdlib.nn.functional.attention: SDPA in the plain path, the fused JVP kernel under forward AD."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import forward_ad

import kdlib.nn.functional as kfn
from kdlib.nn.functional import TANGENT_BACKWARD_ERROR, attention, materialized_attention


def rand(*shape, dtype=torch.float32, g=None):
    return torch.randn(*shape, dtype=dtype, generator=g)


@pytest.mark.parametrize("causal", [False, True])
def test_func_jvp_uses_fused_kernel_and_matches_materialized(causal, seeded, monkeypatch):
    calls = []
    real = kfn.attention_jvp
    monkeypatch.setattr(kfn, "attention_jvp", lambda *a, **k: calls.append(1) or real(*a, **k))
    primals = tuple(rand(2, 3, n, 40, g=seeded) for n in (37, 50, 50))
    tangents = tuple(rand(2, 3, n, 40, g=seeded) for n in (37, 50, 50))

    def ours(q, k, v):
        return attention(q, k, v, causal=causal)

    def theirs(q, k, v):
        return materialized_attention(q, k, v, causal=causal)

    out, tangent = torch.func.jvp(ours, primals, tangents)
    ref_out, ref_tangent = torch.func.jvp(theirs, primals, tangents)
    assert calls, "the fused JVP was not used"
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tangent, ref_tangent, rtol=1e-4, atol=1e-4)


def test_dual_tensors_and_missing_tangents(seeded):
    q, k, v = (rand(1, 2, 33, 32, g=seeded) for _ in range(3))
    tk = rand(1, 2, 33, 32, g=seeded)
    with forward_ad.dual_level():
        out = attention(q, forward_ad.make_dual(k, tk), v)  # q and v carry no tangent
        tangent = forward_ad.unpack_dual(out).tangent
    _, ref = torch.func.jvp(lambda k_: materialized_attention(q, k_, v), (k,), (tk,))
    torch.testing.assert_close(tangent, ref, rtol=1e-4, atol=1e-4)


def test_plain_path_is_sdpa_with_its_gradient(seeded):
    q, k, v = (rand(2, 2, 19, 32, g=seeded).requires_grad_() for _ in range(3))
    out = attention(q, k, v, causal=True)
    out.square().sum().backward()
    grads = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    materialized_attention(q, k, v, causal=True).square().sum().backward()
    for got, t in zip(grads, (q, k, v)):
        torch.testing.assert_close(got, t.grad, rtol=1e-4, atol=1e-5)


def test_primal_gradient_under_jvp_and_tangent_backward_raises(seeded):
    """sCM's pattern: one jvp, gradient through the primal, tangent detached."""
    x, tx = rand(2, 2, 24, 32, g=seeded), rand(2, 2, 24, 32, g=seeded)
    k, v = rand(2, 2, 24, 32, g=seeded), rand(2, 2, 24, 32, g=seeded)
    w = (0.3 * rand(32, 32, g=seeded)).requires_grad_()

    out, tangent = torch.func.jvp(lambda x_: attention(x_ @ w, k, v), (x,), (tx,))
    (out * tangent.detach()).sum().backward()
    got = w.grad.clone()
    w.grad = None
    ref_out, ref_tangent = torch.func.jvp(lambda x_: materialized_attention(x_ @ w, k, v), (x,), (tx,))
    (ref_out * ref_tangent.detach()).sum().backward()
    fp32_ref = w.grad.clone()
    # Against float64: the kernel's error within 3x the fp32 materialised path's own (|grad| ~ 26,
    # so a fixed 1e-5 atol was rounding-order luck, broken by Triton 3.9's interpreter).
    w64 = w.detach().double().requires_grad_()
    x64, tx64, k64, v64 = (t.double() for t in (x, tx, k, v))
    out64, tangent64 = torch.func.jvp(lambda x_: materialized_attention(x_ @ w64, k64, v64), (x64,), (tx64,))
    (out64 * tangent64.detach()).sum().backward()
    kernel_err = (got.double() - w64.grad).abs().max().item()
    torch_err = (fp32_ref.double() - w64.grad).abs().max().item()
    assert kernel_err <= 3 * torch_err + 1e-6, (kernel_err, torch_err)

    _, tangent = torch.func.jvp(lambda x_: attention(x_ @ w, k, v), (x,), (tx,))
    with pytest.raises(RuntimeError, match="backward through the forward-mode tangent"):
        tangent.sum().backward()
    assert "detach" in TANGENT_BACKWARD_ERROR
