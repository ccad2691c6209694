"""Feature/relation losses and regression metrics against independent float64 numpy formulas."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kdlib.objectives.features import (
    FeatureTap,
    HintLoss,
    OFAProjector,
    attention_transfer,
    cka_loss,
    cosine_loss,
    dist_loss,
    linear_cka,
    ofa_loss,
)
from kdlib.objectives.regression import cauchy, ict_c, l2, pseudo_huber


def _g(seed):
    return torch.Generator().manual_seed(seed)


def test_regression_metrics_match_formulas_and_limits():
    x = torch.randn(5, 3, 4, 4, generator=_g(0), dtype=torch.float64)
    y = torch.randn(5, 3, 4, 4, generator=_g(1), dtype=torch.float64)
    r2 = ((x - y).numpy() ** 2).reshape(5, -1).sum(1)
    w = torch.rand(5, generator=_g(2), dtype=torch.float64)
    np.testing.assert_allclose(l2(x, y, reduction="none").numpy(), r2)
    want = (w.numpy() * (np.sqrt(r2 + 0.09) - 0.3)).mean()
    np.testing.assert_allclose(pseudo_huber(x, y, 0.3, weight=w).item(), want)
    np.testing.assert_allclose(cauchy(x, y, 0.7, reduction="sum").item(), np.log1p(r2 / (2 * 0.49)).sum())
    assert ict_c((3, 4, 4)) == pytest.approx(0.00054 * math.sqrt(48))
    small = y + 1e-4 * torch.randn(y.shape, generator=_g(3), dtype=torch.float64)
    near = pseudo_huber(small, y, 1.0, reduction="none")
    torch.testing.assert_close(near, l2(small, y, reduction="none") / 2, rtol=1e-6, atol=0)
    xr = x.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda a: pseudo_huber(a, y, 0.1) + cauchy(a, y, 0.5), (xr,))
    pseudo_huber(y.clone().requires_grad_(True), y).backward()  # finite gradient at x == y
    with pytest.raises(ValueError, match=r"\(5, 3, 4, 4\).*\(5, 3, 4, 3\)"):
        l2(x, y[..., :3])


def test_hint_loss_projects_and_trains():
    hint = HintLoss(4, 6)
    s = torch.randn(2, 4, 5, 5, generator=_g(4))
    with torch.no_grad():
        hint.proj.weight.copy_(torch.randn(6, 4, 1, 1, generator=_g(5)))
    t = hint.proj(s).detach()
    assert hint(s, t).item() == pytest.approx(0.0, abs=1e-12)
    t_noisy = t + torch.randn(t.shape, generator=_g(6))
    loss = hint(s, t_noisy)
    loss.backward()
    assert loss > 0.5 and hint.proj.weight.grad.abs().max() > 0
    assert hint(s, t_noisy[..., :3, :3]).shape == ()  # resized to the teacher's H×W


def test_cosine_and_attention_transfer():
    a = torch.randn(3, 8, 4, 4, generator=_g(7), dtype=torch.float64)
    b = torch.randn(3, 5, 4, 4, generator=_g(8), dtype=torch.float64)
    want = 1 - (a * a.flip(0)).sum(1) / (a.norm(dim=1) * a.flip(0).norm(dim=1))
    torch.testing.assert_close(cosine_loss(a, a.flip(0), dim=1), want.mean())
    assert cosine_loss(a, 3 * a, dim=1) < 1e-12
    def at(f):
        m = (f.numpy() ** 2).mean(1).reshape(3, -1)
        return m / np.linalg.norm(m, axis=1, keepdims=True)
    np.testing.assert_allclose(attention_transfer(a, b).item(), ((at(a) - at(b)) ** 2).sum(1).mean())


def test_linear_cka_properties_and_formula():
    x = torch.randn(40, 7, generator=_g(9), dtype=torch.float64)
    q, _ = torch.linalg.qr(torch.randn(7, 7, generator=_g(10), dtype=torch.float64))
    y = torch.randn(40, 3, generator=_g(11), dtype=torch.float64)
    torch.testing.assert_close(linear_cka(x, x), torch.tensor(1.0, dtype=torch.float64))
    torch.testing.assert_close(linear_cka(x, 2.5 * x @ q), torch.tensor(1.0, dtype=torch.float64))
    hc = np.eye(40) - 1 / 40  # HSIC formulation with the centring matrix
    kx, ky = hc @ x.numpy() @ x.numpy().T @ hc, hc @ y.numpy() @ y.numpy().T @ hc
    want = (kx * ky).sum() / np.sqrt((kx * kx).sum() * (ky * ky).sum())
    np.testing.assert_allclose(linear_cka(x, y).item(), want)
    assert 0 < cka_loss(x, y) < 1


def test_dist_loss_matches_numpy_pearson():
    s = torch.randn(6, 10, generator=_g(12), dtype=torch.float64)
    t = torch.randn(6, 10, generator=_g(13), dtype=torch.float64)
    ps, pt = torch.softmax(s / 2, -1).numpy(), torch.softmax(t / 2, -1).numpy()
    inter = 1 - np.mean([np.corrcoef(ps[i], pt[i])[0, 1] for i in range(6)])
    intra = 1 - np.mean([np.corrcoef(ps[:, c], pt[:, c])[0, 1] for c in range(10)])
    np.testing.assert_allclose(dist_loss(s, t, beta=0.5, gamma=2.0, temperature=2.0).item(),
                               4 * (0.5 * inter + 2.0 * intra))
    assert dist_loss(t, t) < 1e-12


def test_ofa_loss_and_projector():
    s = torch.randn(4, 9, generator=_g(14), dtype=torch.float64)
    t = torch.randn(4, 9, generator=_g(15), dtype=torch.float64)
    y = torch.tensor([0, 3, 8, 3])
    soft_ce = -(torch.softmax(t, -1) * torch.log_softmax(s, -1)).sum(-1).mean()
    torch.testing.assert_close(ofa_loss(s, t, y, eps=1.0), soft_ce)
    pt, lps = torch.softmax(t, -1), torch.log_softmax(s, -1)
    onehot = F.one_hot(y, 9).double()
    manual = -(((pt + onehot) ** 1.5 - onehot) * lps).sum(-1).mean()
    torch.testing.assert_close(ofa_loss(s, t, y, eps=1.5), manual)
    assert OFAProjector(6, 9)(torch.randn(2, 6, 5, 5)).shape == (2, 9)
    assert OFAProjector(6, 9, spatial=False)(torch.randn(2, 11, 6)).shape == (2, 9)


def test_feature_tap_captures_by_path():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 8), nn.Sequential(nn.ReLU(), nn.Linear(8, 3)))
    x = torch.randn(2, 4)
    with FeatureTap(net, ["0", "1.1"], detach=True) as tap:
        out = net(x)
        torch.testing.assert_close(tap["0"], net[0](x))
        torch.testing.assert_close(tap["1.1"], out)
        assert not tap["1.1"].requires_grad
    net(x + 1)
    torch.testing.assert_close(tap["1.1"], out)  # unhooked: not overwritten
    with pytest.raises(KeyError, match=r"no submodule '1\.2'.*'1\.1'"):
        FeatureTap(net, ["1.2"])
