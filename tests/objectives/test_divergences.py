"""Logit divergences against independent references (torch.nn.functional.kl_div, scipy, float64
numpy closed forms) and their stated properties."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy.spatial.distance import jensenshannon
from scipy.special import rel_entr, softmax

from kdlib.objectives import TAID, cross_entropy, divergence, kd_loss

ALL = [("fkl", None), ("rkl", None), ("jsd", None), ("tvd", None), ("skew_fkl", None), ("skew_rkl", None),
       ("symkl", None)] + [("f", g) for g in ("kl", "reverse_kl", "js", "hellinger", "chi2")]
IDS = [k if g is None else f"f-{g}" for k, g in ALL]


def _pair(seed, shape=(6, 37), scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g, dtype=torch.float64) * scale,
            torch.randn(shape, generator=g, dtype=torch.float64) * scale)


def _np_reference(s, t, kind, generator, T=1.0, beta=0.5, alpha=0.1):
    """Per-row divergence from the textbook formulas, float64 numpy."""
    ps, pt = softmax(s.numpy() / T, -1), softmax(t.numpy() / T, -1)
    kl = lambda p, q: rel_entr(p, q).sum(-1)  # noqa: E731
    if kind == "f":
        kind = {"kl": "fkl", "reverse_kl": "rkl", "js": "jsd"}.get(generator, generator)
        beta = 0.5
    if kind == "fkl":
        return kl(pt, ps)
    if kind == "rkl":
        return kl(ps, pt)
    if kind == "jsd":
        m = beta * pt + (1 - beta) * ps
        return beta * kl(pt, m) + (1 - beta) * kl(ps, m)
    if kind == "tvd":
        return 0.5 * np.abs(pt - ps).sum(-1)
    if kind == "skew_fkl":
        return kl(pt, alpha * pt + (1 - alpha) * ps)
    if kind == "skew_rkl":
        return kl(ps, alpha * ps + (1 - alpha) * pt)
    if kind == "symkl":
        return kl(pt, ps) + kl(ps, pt)
    if kind == "hellinger":
        return ((np.sqrt(pt) - np.sqrt(ps)) ** 2).sum(-1)
    if kind == "chi2":
        return ((pt - ps) ** 2 / ps).sum(-1)
    raise AssertionError(kind)


@pytest.mark.parametrize(("kind", "gen"), ALL, ids=IDS)
def test_matches_numpy_closed_form(kind, gen):
    s, t = _pair(1)
    got = divergence(s, t, kind, generator=gen, temperature=1.7, beta=0.3, alpha=0.2, reduction="none")
    want = _np_reference(s, t, kind, gen, T=1.7, beta=0.3, alpha=0.2)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-10, atol=1e-12)


def test_fkl_rkl_match_torch_kl_div_and_jsd_matches_scipy():
    s, t = _pair(2)
    ls, lt = torch.log_softmax(s / 2, -1), torch.log_softmax(t / 2, -1)
    fkl = F.kl_div(ls, lt, log_target=True, reduction="batchmean")
    rkl = F.kl_div(lt, ls, log_target=True, reduction="batchmean")
    torch.testing.assert_close(divergence(s, t, "fkl", temperature=2.0, reduction="batchmean"), fkl)
    torch.testing.assert_close(divergence(s, t, "rkl", temperature=2.0, reduction="batchmean"), rkl)
    js = jensenshannon(ls.exp().numpy(), lt.exp().numpy(), axis=-1) ** 2  # scipy gives the distance
    got = divergence(s, t, "jsd", temperature=2.0, reduction="none")
    np.testing.assert_allclose(got.numpy(), js, rtol=1e-8)


@pytest.mark.parametrize(("kind", "gen"), ALL, ids=IDS)
def test_zero_for_equal_and_nonnegative(kind, gen):
    s, t = _pair(3)
    assert divergence(s, s.clone(), kind, generator=gen, reduction="none").abs().max() < 1e-12
    assert divergence(s, t, kind, generator=gen, reduction="none").min() > 0


def test_bounds_and_symmetry():
    s, t = _pair(4, scale=6.0)
    jsd = divergence(s, t, "jsd", beta=0.5, reduction="none")
    assert jsd.max() <= math.log(2) and jsd.max() > 0.3  # large logits push it towards the bound
    torch.testing.assert_close(jsd, divergence(t, s, "jsd", beta=0.5, reduction="none"))
    tvd = divergence(s, t, "tvd", reduction="none")
    assert tvd.max() <= 1.0 and tvd.max() > 0.5
    assert divergence(s, t, "f", generator="hellinger", reduction="none").max() <= 2.0


def test_beta_and_alpha_endpoints():
    s, t = _pair(5)
    fkl, rkl = divergence(s, t, "fkl"), divergence(s, t, "rkl")
    torch.testing.assert_close(divergence(s, t, "jsd", beta=0.0), fkl)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=1.0), rkl)
    # The endpoints are the limits of JSD_β / β and JSD_β / (1 − β).
    torch.testing.assert_close(divergence(s, t, "jsd", beta=1e-5) / 1e-5, fkl, rtol=1e-3, atol=0)
    torch.testing.assert_close(divergence(s, t, "jsd", beta=1 - 1e-5) / 1e-5, rkl, rtol=1e-3, atol=0)
    torch.testing.assert_close(divergence(s, t, "skew_fkl", alpha=0.0), fkl)
    torch.testing.assert_close(divergence(s, t, "skew_rkl", alpha=0.0), rkl)
    assert divergence(s, t, "skew_fkl", alpha=1.0) == 0 and divergence(s, t, "skew_rkl", alpha=1.0) == 0
    torch.testing.assert_close(divergence(s, t, "symkl"), fkl + rkl)


def test_temperature_softens_both_and_t2_is_explicit():
    s, t = _pair(6)
    T = 3.0
    plain = divergence(s, t, "fkl", temperature=T)
    torch.testing.assert_close(plain, divergence(s / T, t / T, "fkl"))
    torch.testing.assert_close(divergence(s, t, "fkl", temperature=T, t2_scaling=True), plain * T * T)


@pytest.mark.parametrize(("kind", "gen"), ALL, ids=IDS)
def test_gradcheck_float64(kind, gen):
    s, t = _pair(7, shape=(3, 5))
    s.requires_grad_(True)
    t.requires_grad_(True)
    fn = lambda a, b: divergence(a, b, kind, generator=gen, temperature=1.3, beta=0.3, alpha=0.2)  # noqa: E731
    assert torch.autograd.gradcheck(fn, (s, t))


def test_mask_and_reductions():
    s, t = _pair(8, shape=(4, 5, 11))
    mask = torch.rand(4, 5, generator=torch.Generator().manual_seed(1)) > 0.4
    s2, t2 = s.clone(), t.clone()
    s2[~mask] = 50 * torch.randn_like(s2[~mask])  # garbage where masked must not matter
    rows = divergence(s, t, "rkl", reduction="none")
    got_none = divergence(s2, t2, "rkl", mask=mask, reduction="none")
    torch.testing.assert_close(got_none, torch.where(mask, rows, 0.0))
    torch.testing.assert_close(divergence(s2, t2, "rkl", mask=mask), rows[mask].mean())
    torch.testing.assert_close(divergence(s2, t2, "rkl", mask=mask, reduction="sum"), rows[mask].sum())
    batchmean = divergence(s2, t2, "rkl", mask=mask, reduction="batchmean")
    torch.testing.assert_close(batchmean, rows[mask].sum() / 4)
    s2.requires_grad_(True)
    divergence(s2, t2, "rkl", mask=mask).backward()
    assert s2.grad[~mask].abs().max() == 0 and s2.grad[mask].abs().max() > 0


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_inputs_computed_in_fp32(dtype):
    s, t = _pair(9, scale=30.0)  # large logits: exp overflows in half precision
    sl, tl = s.to(dtype), t.to(dtype)
    for kind in ("fkl", "rkl", "jsd"):
        got = divergence(sl, tl, kind)
        assert got.dtype == torch.float32 and torch.isfinite(got)
        torch.testing.assert_close(got, divergence(sl.float(), tl.float(), kind))


def test_padded_vocab_masks_columns_and_mismatch_errors():
    s, t = _pair(10, shape=(5, 20))
    t_padded = torch.cat([t, 40 + torch.randn(5, 7, dtype=t.dtype)], -1)  # big logits in the padding
    want = divergence(s, t, "jsd")
    torch.testing.assert_close(divergence(s, t_padded, "jsd", vocab_size=20), want)
    with pytest.raises(ValueError, match=r"student vocab 20 != teacher vocab 27"):
        divergence(s, t_padded, "jsd")
    with pytest.raises(ValueError, match=r"vocab_size=21"):
        divergence(s, t_padded, "jsd", vocab_size=21)


def test_bad_options_raise():
    s, t = _pair(11)
    with pytest.raises(ValueError, match="unknown divergence kind"):
        divergence(s, t, "kl")
    with pytest.raises(ValueError, match="generator"):
        divergence(s, t, "f")
    with pytest.raises(ValueError, match="beta"):
        divergence(s, t, "jsd", beta=1.5)
    with pytest.raises(ValueError, match=r"\(6, 37\).*\(5, 37\)"):
        divergence(s, t[:5], "fkl")


def test_cross_entropy_and_kd_loss():
    s, t = _pair(12, shape=(2, 6, 9))
    labels = torch.randint(0, 9, (2, 6), generator=torch.Generator().manual_seed(0))
    labels[0, :2] = -100
    want = F.cross_entropy(s.reshape(-1, 9), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(cross_entropy(s, labels), want)
    keep = labels != -100
    combo = kd_loss(s, t, labels, kind="fkl", soft_weight=0.7, hard_weight=0.3, temperature=2.0)
    torch.testing.assert_close(combo, 0.7 * divergence(s, t, "fkl", temperature=2.0, mask=keep) + 0.3 * want)


def test_taid_interpolates_and_schedules():
    s, t = _pair(13)
    taid = TAID(total_steps=10, lambda_start=0.4)
    s.requires_grad_(True)
    loss = taid(s, t)
    mid = torch.log_softmax(0.6 * s.detach() + 0.4 * t, -1)
    want = F.kl_div(torch.log_softmax(s, -1), mid, log_target=True, reduction="batchmean")
    torch.testing.assert_close(loss, want)
    loss.backward()
    assert s.grad.abs().max() > 0
    lams = [taid.step(1.0 / (i + 1)) for i in range(12)]  # a falling loss
    assert all(b >= a for a, b in zip(lams, lams[1:])) and lams[-1] == 1.0
    assert all(lam >= min(1.0, 0.4 + 0.6 * (i + 1) / 10) - 1e-12 for i, lam in enumerate(lams))  # the ramp
    fast = TAID(total_steps=1000, rate=0.05)
    fast_lams = [fast.step(1.0 / (i + 1)) for i in range(3)]
    assert fast_lams[2] > 0.4 + 0.6 * 3 / 1000 + 0.01  # an improving loss moves λ ahead of the ramp
    restored = TAID(total_steps=10)
    restored.load_state_dict(taid.state_dict())
    assert restored.current_lambda == taid.current_lambda
    torch.testing.assert_close(TAID(total_steps=1, lambda_start=1.0)(s, t), divergence(s, t, "fkl"))
