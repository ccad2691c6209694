import pytest
import torch

from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.core.registry import Registry


def test_teacher_is_frozen_and_stays_in_eval():
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Dropout(0.5), torch.nn.BatchNorm1d(4))
    teacher = Teacher(net)
    teacher.train()  # a method calling .train() on everything must not unfreeze the teacher
    assert not teacher.model.training and all(not p.requires_grad for p in teacher.parameters())
    x = torch.randn(8, 4, requires_grad=True)
    out1, out2 = teacher(x), teacher(x)
    assert torch.equal(out1, out2) and not out1.requires_grad  # no dropout, no graph
    assert torch.equal(teacher.model[2].running_mean, torch.zeros(4))  # statistics untouched


def test_bf16_teacher_takes_fp32_inputs():
    teacher = Teacher(torch.nn.Linear(4, 3), dtype=torch.bfloat16)
    out = teacher(torch.randn(2, 4))
    assert out.dtype == torch.bfloat16 and teacher.model.weight.dtype == torch.bfloat16


def test_student_ema_copies_are_frozen_and_independent():
    student = Student(torch.nn.Linear(3, 2), ema_decays=[0.9, 0.99])
    assert len(student.ema) == 2 and all(not p.requires_grad for p in student.ema.parameters())
    with torch.no_grad():
        student.model.weight.add_(1.0)
        before = student.ema_model(0.9).weight.clone()
    student.update_ema()
    expected = 0.9 * before + 0.1 * student.model.weight
    assert torch.allclose(student.ema_model(0.9).weight, expected, atol=1e-6)
    assert set(student.evaluation_models()) == {"student", "ema0.9", "ema0.99"}
    with pytest.raises(ValueError, match="EMA decay must be in"):
        Student(torch.nn.Linear(1, 1), ema_decays=[1.5])


def test_registry_suggests_close_names():
    reg = Registry("thing")
    reg.register("alpha")(type("A", (), {}))
    with pytest.raises(KeyError, match="did you mean 'alpha'"):
        reg.get("alpah")
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha")(type("B", (), {}))
    assert {"logit_kd", "supervised"} <= set(METHODS.names())


def test_method_without_teacher_is_refused():
    cls = METHODS.get("logit_kd")
    with pytest.raises(ValueError, match="needs a teacher"):
        cls(cls.Config(), Student(torch.nn.Linear(2, 2)), None)
