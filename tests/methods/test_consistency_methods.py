"""flow_matching, consistency_distillation and ict on tiny networks: exact zeros where the
theory gives them, losses that go down, clear errors for mismatched set-ups."""

from __future__ import annotations

import pytest
import torch

from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.diffusion.consistency import ConsistencyModel, ict_discretisation_steps
from kdlib.diffusion.param import get_parameterisation
from tests.methods.nets import C, PointMassVelocity, TinyNet


def _batch(n=64, dim=4, point_mass=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, dim), C) if point_mass else 0.5 * torch.randn(n, dim, generator=g) + 0.2
    return {"x": x, "y": torch.randint(0, 3, (n,), generator=g)}


def _method(name, student_net, teacher_net=None, **args):
    cls = METHODS.get(name)
    student = Student(student_net)
    teacher = Teacher(teacher_net) if teacher_net is not None else None
    return cls(cls.Config(**args), student, teacher)


def _train(method, steps, lr=3e-3, seed=0):
    opt = torch.optim.Adam(method.student.model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        torch.manual_seed(seed + step)
        method.update_groups(step)
        loss, _ = method.loss(_batch(seed=step % 4), "student")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_cd_loss_is_zero_for_exact_teacher_and_student():
    torch.manual_seed(0)
    fm = get_parameterisation("fm")
    method = _method("consistency_distillation", ConsistencyModel(PointMassVelocity(), fm), PointMassVelocity(),
                     init_from_teacher=False, num_intervals=8, skip=2)
    loss, _ = method.loss(_batch(point_mass=True), "student")
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_ict_loss_is_zero_for_exact_student():
    torch.manual_seed(0)
    method = _method("ict", ConsistencyModel(PointMassVelocity(), get_parameterisation("fm")))
    loss, _ = method.loss(_batch(point_mass=True), "student")
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


@pytest.mark.parametrize("name", ["consistency_distillation", "ict"])
def test_consistency_losses_decrease(name):
    torch.manual_seed(0)
    fm = get_parameterisation("fm")
    teacher = TinyNet() if name == "consistency_distillation" else None
    args = {"guidance": 2.0, "init_from_teacher": False} if teacher is not None else {"total_steps": 60}
    method = _method(name, ConsistencyModel(TinyNet(), fm), teacher, **args)
    losses = _train(method, 60)
    assert all(torch.isfinite(torch.tensor(losses)))
    assert sum(losses[-10:]) < 0.7 * sum(losses[:10])


def test_flow_matching_loss_decreases():
    torch.manual_seed(0)
    # the flow-matching loss has a large irreducible part (the conditional velocity's variance)
    losses = _train(_method("flow_matching", TinyNet()), 120)
    assert sum(losses[-20:]) < 0.8 * sum(losses[:20])


def test_cd_initialises_student_from_teacher():
    teacher = TinyNet()
    method = _method("consistency_distillation", ConsistencyModel(TinyNet(), get_parameterisation("fm")), teacher)
    for a, b in zip(method.student.model.net.parameters(), teacher.parameters()):
        assert torch.equal(a, b)


def test_mismatched_parameterisation_stops_before_training():
    teacher = TinyNet()
    teacher.parameterisation = "edm"
    with pytest.raises(ValueError, match="edm"):
        _method("consistency_distillation", ConsistencyModel(TinyNet(), get_parameterisation("fm")), teacher)
    with pytest.raises(TypeError, match="ConsistencyModel"):
        _method("consistency_distillation", TinyNet(), TinyNet())
    with pytest.raises(ValueError, match="ema_decays"):
        _method("consistency_distillation", ConsistencyModel(TinyNet(), get_parameterisation("fm")), TinyNet(),
                target="ema")


def test_ict_curriculum_doubles_to_its_cap():
    total = 700  # K' = ⌊700 / 8⌋ = 87
    values = [ict_discretisation_steps(k, total) for k in (0, 86, 87, 174, 699)]
    assert values == [11, 11, 21, 41, 1281]
