"""Decoupled DMD (``decoupled_dmd``): the guided DMD gradient is exactly the DM term plus
(w − 1) times the CA term; at guidance 1 it is DMD2's; the two terms train a generator."""

from __future__ import annotations

import pytest
import torch

from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.param import get_parameterisation
from kdlib.methods.distribution_matching import dm_gradient
from tests.methods.nets import TinyNet

FM = get_parameterisation("fm")


def _method(name="decoupled_dmd", seed=0, **args):
    torch.manual_seed(seed)
    cls = METHODS.get(name)
    return cls(cls.Config(**args), Student(ConsistencyModel(TinyNet(), FM)), Teacher(TinyNet()))


def _batch(n=32):
    g = torch.Generator().manual_seed(0)
    return 0.5 * torch.randn(n, 4, generator=g), {"y": torch.randint(0, 3, (n,), generator=g)}


def test_dm_plus_ca_is_the_guided_dmd_gradient():
    method = _method(guidance=3.5)
    with torch.no_grad():  # a fake score that differs from the teacher
        for p in method.critic.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x, cond = _batch()
    x_t, t = method.dm.noised(x)
    g_dm, g_ca = method.dm.gradients(x, x_t, t, cond)
    x0_cfg = method.dm.x0(method.teacher, x_t, t, cond, 3.5)
    x0_fake = method.dm.x0(method.critic.net, x_t, t, cond)
    torch.testing.assert_close(g_dm + 2.5 * g_ca, dm_gradient(x, x0_cfg, x0_fake), rtol=1e-5, atol=1e-6)
    assert g_ca.abs().sum() > 0 and g_dm.abs().sum() > 0


def test_at_guidance_one_it_is_dmd2():
    decoupled, dmd2 = _method(ca_weight=1.0), _method("dmd2")
    x, cond = _batch()
    with torch.no_grad():
        for a, b in zip(decoupled.critic.net.parameters(), dmd2.critic.net.parameters()):
            noise = 0.1 * torch.randn_like(a)
            a.add_(noise), b.add_(noise)
    torch.manual_seed(3)
    loss_d, stats = decoupled.dm.loss(x, cond)
    torch.manual_seed(3)
    loss_2, _ = dmd2.dm.loss(x, cond)
    torch.testing.assert_close(loss_d, loss_2)
    assert "ca/loss" not in stats


def test_decoupled_terms_are_weighted_and_train_the_student():
    method = _method(guidance=3.0, ca_time_shift=3.0, dm_weight=0.5)
    x, cond = _batch()
    batch = {"x": x, **cond}
    logged = {}
    for group in method.update_groups(0):
        loss, stats = method.loss(batch, group)
        assert torch.isfinite(loss)
        loss.backward()
        logged[group] = stats
    assert logged["student"]["ca/loss"] > 0 and logged["student"]["ca/grad_norm"] > 0
    assert all(p.grad is not None for p in method.student.model.parameters())
    with pytest.raises(ValueError, match="ca_time_shift"):
        _method(ca_time_shift=0.0)
    with pytest.raises(ValueError, match="ca_weight"):
        _method(ca_weight=-1.0)
