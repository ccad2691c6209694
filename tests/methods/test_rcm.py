"""The registered rCM method (``rcm``): sCM's loss (the same code as ``scm``) plus the DMD
reverse-divergence term with its fake-score critic, switched on after the tangent warm-up."""

from __future__ import annotations

import pytest
import torch

from kdlib.core.checkpoint import latest_checkpoint
from kdlib.core.data import TensorDataset
from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.core.run_config import TrainConfig
from kdlib.core.trainer import Trainer
from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.reparam import ReparameterisedNet
from tests.methods.nets import TinyNet

FM, TRIG = get_parameterisation("fm"), get_parameterisation("trigflow")


def _build(name, teacher_net, student_net, **args):
    cls = METHODS.get(name)
    student = Student(ConsistencyModel(ReparameterisedNet(student_net, FM, TRIG), TRIG))
    return cls(cls.Config(**args), student, Teacher(teacher_net))


def _pair(**args):
    """An rcm and an scm method on the same teacher and the same initial student."""
    torch.manual_seed(0)
    teacher, student = TinyNet(), TinyNet()
    rcm = _build("rcm", teacher, student, **args)
    scm_args = {k: v for k, v in args.items() if k in ("tangent_warmup", "adaptive_weight", "init_from_teacher")}
    scm = _build("scm", teacher, TinyNet(), **scm_args)
    scm.student.model.load_state_dict(rcm.student.model.state_dict())
    return rcm, scm


def _batch(n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": 0.5 * torch.randn(n, 4, generator=g) + 0.2, "y": torch.randint(0, 3, (n,), generator=g)}


def _loss_and_grads(method, batch, seed=5):
    method.student.model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, stats = method.loss(batch, "student")
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in method.student.model.parameters()], stats


def test_rcm_is_scm_when_the_fake_score_equals_the_real_one():
    """Before the critic moves (fake = teacher, no guidance) the DM term is exactly zero: rCM's
    loss and gradient are sCM's, bit for bit (the same code draws the same noise first)."""
    rcm, scm = _pair(tangent_warmup=0, adaptive_weight=False, gen_steps=2)
    rcm.update_groups(3), scm.update_groups(3)
    loss_r, grads_r, stats = _loss_and_grads(rcm, _batch())
    loss_s, grads_s, _ = _loss_and_grads(scm, _batch())
    assert stats["dm/loss"].item() == 0.0
    assert torch.equal(loss_r, loss_s) and all(torch.equal(a, b) for a, b in zip(grads_r, grads_s))

    # a critic that has moved adds the reverse-divergence gradient
    with torch.no_grad():
        for p in rcm.critic.net.parameters():
            p.add_(0.1 * torch.randn_like(p))
    loss_r, grads_r, stats = _loss_and_grads(rcm, _batch())
    assert stats["dm/loss"].item() > 0 and not torch.equal(loss_r, loss_s)
    assert loss_r.item() == pytest.approx(loss_s.item() + 0.02 * stats["dm/loss"].item(), rel=1e-5)


def test_dm_term_and_critic_start_after_the_tangent_warmup():
    rcm, _ = _pair(tangent_warmup=3, critic_updates=2)
    assert [rcm.update_groups(k) for k in range(8)] == [
        ["student"], ["student"], ["student"], ["student", "critic"], ["critic"], ["student", "critic"],
        ["critic"], ["student", "critic"]]
    rcm.update_groups(1)
    assert "dm/loss" not in rcm.loss(_batch(), "student")[1]
    rcm.update_groups(3)
    assert "dm/loss" in rcm.loss(_batch(), "student")[1]


def test_rcm_losses_go_down_on_a_tiny_model():
    """From a random student: rCM's student loss (sCM + λ·DM, on a few fixed draws) falls and the
    critic's denoising loss stays finite (it is mostly the irreducible denoising variance of the
    student's samples, so it need not fall; test_dmd checks that a critic tracks its generator)."""
    rcm, _ = _pair(tangent_warmup=0, adaptive_weight=False, init_from_teacher=False, critic_updates=2, gen_steps=2)
    optimizers = {g: torch.optim.Adam(m.parameters(), lr=3e-3) for g, m in rcm.trainable_modules().items()}
    batch = _batch(256, seed=2)
    losses = {"student": [], "critic": []}
    for step in range(80):
        for group in rcm.update_groups(step):
            torch.manual_seed(step % 4)
            loss, _ = rcm.loss(batch, group)
            optimizers[group].zero_grad()
            loss.backward()
            optimizers[group].step()
            losses[group].append(loss.item())
    assert len(losses["student"]) == 40 and len(losses["critic"]) == 80
    assert all(torch.isfinite(torch.tensor(losses["student"] + losses["critic"])))
    assert sum(losses["student"][-8:]) < 0.6 * sum(losses["student"][:8])


def test_rcm_trains_all_its_groups_through_the_trainer(tmp_path):
    rcm, _ = _pair(tangent_warmup=2, critic_updates=2)
    data = TensorDataset(**_batch(256, seed=4))
    critic_before = [p.detach().clone() for p in rcm.critic.parameters()]
    cfg = TrainConfig(steps=8, batch_size=32, lr=1e-3, schedule="constant", checkpoint_every=8, log_every=2,
                      progress=False, device="cpu")
    trainer = Trainer(rcm, data, cfg, stage_dir=tmp_path, seed=0)
    trainer.fit()
    # student: 2 warm-up steps + steps 2, 4, 6; critic: steps 2..7; sCM's weight with the student
    assert [trainer.schedules[g].last_epoch for g in ("student", "scm_weight", "critic")] == [5, 5, 6]
    assert any(not torch.equal(a, b) for a, b in zip(critic_before, rcm.critic.parameters()))
    tensors = latest_checkpoint(tmp_path / "checkpoints").tensors
    assert any(k.startswith("model/critic/net.") for k in tensors)


def test_bad_rcm_options_are_refused():
    with pytest.raises(ValueError, match="critic_updates"):
        _pair(critic_updates=0)
    with pytest.raises(ValueError, match="dm_weight"):
        _pair(dm_weight=-1.0)
    with pytest.raises(ValueError, match="student_param=trigflow"):
        cls = METHODS.get("rcm")
        cls(cls.Config(), Student(ConsistencyModel(TinyNet(), FM)), Teacher(TinyNet()))
