"""The registered sCM method (``scm``): a flow-matching teacher distilled into a TrigFlow
consistency student through the exact conversion. Zero loss for the exact consistency function,
a loss that goes down, the adaptive weight trained in the student's update and checkpointed, and a
clear error for a student in the wrong parameterisation."""

from __future__ import annotations

import json

import pytest
import torch

from kdlib.core.data import TensorDataset
from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.core.run_config import TrainConfig
from kdlib.core.trainer import Trainer
from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.reparam import ReparameterisedNet
from tests.methods.nets import C, PointMassVelocity, TinyNet

FM, TRIG = get_parameterisation("fm"), get_parameterisation("trigflow")


def _scm(teacher_net, student_net, **args):
    cls = METHODS.get("scm")
    student = Student(ConsistencyModel(ReparameterisedNet(student_net, FM, TRIG), TRIG))
    return cls(cls.Config(**args), student, Teacher(teacher_net))


def test_exact_consistency_function_has_zero_loss():
    """For point-mass data the teacher's PF-ODE is exact and the student f ≡ C is its exact
    consistency function: the sCM tangent g vanishes, so does the loss (r = 1, no warm-up)."""
    method = _scm(PointMassVelocity(), PointMassVelocity(), tangent_warmup=0, adaptive_weight=False)
    torch.manual_seed(0)
    loss, logged = method.loss({"x": torch.full((64, 4), C)}, "student")
    assert loss.item() < 1e-8 and logged["scm/tangent_norm"] < 1e-4
    # a wrong student (velocity scaled by 2) is not consistent: clearly non-zero
    wrong = _scm(PointMassVelocity(), PointMassVelocity(scale=2.0), tangent_warmup=0, adaptive_weight=False,
                 init_from_teacher=False)
    assert wrong.loss({"x": torch.full((64, 4), C)}, "student")[0].item() > 1e-2


def test_student_starts_as_the_teacher_and_trains_with_its_adaptive_weight(tmp_path):
    torch.manual_seed(0)
    teacher = TinyNet()
    method = _scm(teacher, TinyNet(), tangent_warmup=5)
    # init_from_teacher: the student's network is the teacher's, seen in TrigFlow
    x = torch.randn(8, 4)
    t = torch.full((8,), 0.6)
    denom = torch.cos(t) + 0.5 * torch.sin(t)  # fm state = trigflow state / (cos t + σ_d sin t)
    x_fm, t_fm = x / denom[:, None], 0.5 * torch.sin(t) / denom
    assert torch.allclose(method.student.model(x, t), x_fm - t_fm[:, None] * teacher(x_fm, t_fm), atol=1e-5)

    g = torch.Generator().manual_seed(1)
    data = TensorDataset(x=0.5 * torch.randn(512, 4, generator=g) + 0.2)
    cfg = TrainConfig(steps=60, batch_size=64, lr=3e-3, checkpoint_every=60, log_every=10, progress=False,
                      device="cpu")
    weight_before = [p.detach().clone() for p in method.weight.parameters()]
    Trainer(method, data, cfg, stage_dir=tmp_path, seed=0).fit()
    assert any(not torch.equal(a, b) for a, b in zip(weight_before, method.weight.parameters()))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    mse = [r["scm/mse"] for r in records if "scm/mse" in r]
    assert len(mse) == 6 and all(torch.isfinite(torch.tensor(mse)))
    from kdlib.core.checkpoint import latest_checkpoint

    tensors = latest_checkpoint(tmp_path / "checkpoints").tensors
    assert any(k.startswith("model/scm_weight/") for k in tensors)


def test_loss_goes_down_on_a_tiny_model():
    torch.manual_seed(0)
    method = _scm(TinyNet(), TinyNet(), tangent_warmup=0, adaptive_weight=False, init_from_teacher=False)
    opt = torch.optim.Adam(method.student.model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(2)
    batch = {"x": 0.5 * torch.randn(256, 4, generator=g) + 0.2}
    losses = []
    for step in range(80):
        torch.manual_seed(step % 4)  # a few fixed draws of (t, z): the loss must fall on them
        method.step = step
        loss, _ = method.loss(batch, "student")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-8:]) < 0.5 * sum(losses[:8])


def test_student_in_the_wrong_parameterisation_is_refused():
    cls = METHODS.get("scm")
    with pytest.raises(ValueError, match="student_param=trigflow"):
        cls(cls.Config(), Student(ConsistencyModel(TinyNet(), FM)), Teacher(TinyNet()))
    with pytest.raises(ValueError, match="param"):
        _scm(TinyNet(), TinyNet(), teacher_param="edm")
