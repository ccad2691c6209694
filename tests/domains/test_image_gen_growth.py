"""A bigger consistency student that starts as the teacher: ``grow_denoiser`` (extra residual
blocks and wider block MLPs) computes exactly the teacher's function at init, through the
domain's ``model.student_blocks`` / ``student_expansion`` and the methods' ``init_from_teacher``;
the extra parts still train; shapes it cannot grow into are refused."""

from __future__ import annotations

import pytest
import torch

from domains.image.gen import ImageGenDataConfig, ImageGenDomain, ImageGenModelConfig
from domains.image.gen_models import MLPDenoiser, grow_denoiser
from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher


def _teacher(hidden=32, blocks=2, shape=(1, 6, 6)):
    torch.manual_seed(0)
    net = MLPDenoiser(shape=shape, hidden=hidden, blocks=blocks, num_classes=3)
    with torch.no_grad():  # every weight non-zero, the zero-initialised output layers too
        for p in net.parameters():
            p.normal_(0, 0.2)
    return net


def _inputs(shape=(1, 6, 6), n=16):
    g = torch.Generator().manual_seed(1)
    return (torch.randn(n, *shape, generator=g), torch.rand(n, generator=g),
            torch.randint(-1, 3, (n,), generator=g))


@pytest.mark.parametrize("blocks, expansion", [(2, 2), (5, 2), (2, 4), (6, 3)])
def test_grown_student_computes_exactly_the_teachers_function(blocks, expansion):
    teacher = _teacher()
    torch.manual_seed(5)
    student = MLPDenoiser(shape=(1, 6, 6), hidden=32, blocks=blocks, num_classes=3, expansion=expansion)
    grow_denoiser(student, teacher)
    x, t, y = _inputs()
    assert torch.equal(student(x, t, y), teacher(x, t, y))
    if blocks > 2 or expansion > 2:
        assert sum(p.numel() for p in student.parameters()) > sum(p.numel() for p in teacher.parameters())


def test_extra_blocks_and_units_get_gradients():
    teacher = _teacher()
    student = grow_denoiser(MLPDenoiser(shape=(1, 6, 6), hidden=32, blocks=4, num_classes=3, expansion=3), teacher)
    x, t, y = _inputs()
    student(x, t, y).square().sum().backward()
    extra_out = student.blocks[3].mlp[2].weight.grad
    wide_out = student.blocks[0].mlp[2].weight.grad[:, 64:]  # the units beyond the teacher's 2·32
    assert extra_out.abs().sum() > 0 and wide_out.abs().sum() > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden=48, blocks=3), "hidden width"),
    (dict(hidden=32, blocks=1), "fewer than the teacher"),
    (dict(hidden=32, blocks=2, expansion=1), "MLP width"),
    (dict(hidden=32, blocks=2, num_classes=4), "classes"),
])
def test_shapes_it_cannot_grow_into_are_refused(kwargs, match):
    student = MLPDenoiser(shape=(1, 6, 6), **{"num_classes": 3, **kwargs})
    with pytest.raises(ValueError, match=match):
        grow_denoiser(student, _teacher())


@pytest.mark.parametrize("method", ["multistep_cd", "consistency_distillation"])
def test_domain_student_grows_from_the_teacher_through_init_from_teacher(method):
    domain = ImageGenDomain(ImageGenDataConfig(), ImageGenModelConfig(
        image_shape=[1, 6, 6], num_classes=3, hidden=32, blocks=2, student_blocks=4, student_expansion=3))
    teacher = _teacher()
    built = domain.build_student()
    assert len(built.net.blocks) == 4 and built.net.blocks[0].mlp[0].out_features == 96
    student = Student(built, ema_decays=[0.9])
    cls = METHODS.get(method)
    cls(cls.Config(param="fm", num_intervals=4), student, Teacher(teacher))
    x, t, y = _inputs()
    for net in (student.model.net, student.ema[0].net):
        assert torch.equal(net(x, t, y), teacher(x, t, y))


def test_every_phase_expert_starts_as_the_teacher():
    domain = ImageGenDomain(ImageGenDataConfig(), ImageGenModelConfig(
        image_shape=[1, 6, 6], num_classes=3, hidden=32, blocks=2, student_experts=2))
    teacher = _teacher()
    student = Student(domain.build_student())
    cls = METHODS.get("multistep_cd")
    cls(cls.Config(param="fm", num_intervals=4, segments=2), student, Teacher(teacher))
    x, _, y = _inputs()
    for t in (0.9, 0.1):  # one time in each expert's phase
        times = torch.full((x.shape[0],), t)
        assert torch.equal(student.model.net(x, times, y=y), teacher(x, times, y))
