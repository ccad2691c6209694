"""The ``vsd`` method (SwiftBrush's image-free VSD with a LoRA fake score, SNOOPI's random-scale
guidance) on tiny networks: the VSD gradient's identity, a student that trains, guidance scales
drawn per sample within the range (and the fixed-scale path when the range is one point), and no
use of the data's values."""

from __future__ import annotations

import random

import pytest
import torch

from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.param import get_parameterisation
from kdlib.methods.distribution_matching import vsd_gradient
from tests.methods.nets import C, PointMassResidual, TinyNet

FM = get_parameterisation("fm")


def _method(teacher_net=None, student_net=None, **args):
    cls = METHODS.get("vsd")
    return cls(cls.Config(**args), Student(ConsistencyModel(student_net or TinyNet(), FM)),
               Teacher(teacher_net or TinyNet()))


def _noisy(method, n=64, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = 0.5 * torch.randn(n, 4, generator=g)
    t = torch.rand(n, generator=g).clamp(0.05, 0.95)
    x_t = FM.add_noise(x, torch.randn(n, 4, generator=g), t)
    return x, x_t, t, {"y": torch.randint(0, 3, (n,), generator=g)}


@pytest.mark.parametrize("param", ["fm", "vp-eps", "edm", "trigflow"])
def test_vsd_gradient_is_the_weighted_score_difference(param):
    """w(t)·(ε̂_real − ε̂_fake) = w(t)·(α/σ)·(x̂0_fake − x̂0_real), w = σ²/(α²+σ²): the same
    direction as DMD's gradient, in any parameterisation."""
    p = get_parameterisation(param)
    g = torch.Generator().manual_seed(0)
    t = p.sample_train_time(8, generator=g).double()
    x_t = torch.randn(8, 5, generator=g, dtype=torch.float64)
    x0_real, x0_fake = torch.randn(8, 5, generator=g, dtype=torch.float64), torch.randn(8, 5, generator=g,
                                                                                        dtype=torch.float64)
    grad = vsd_gradient(p, t, p.eps_from_x0(x_t, x0_real, t), p.eps_from_x0(x_t, x0_fake, t))
    alpha, sigma = (v[:, None] for v in p.alpha_sigma(t))
    torch.testing.assert_close(grad, sigma**2 / (alpha**2 + sigma**2) * alpha / sigma * (x0_fake - x0_real))


def test_vsd_is_zero_at_the_start_and_trains_a_random_student_onto_the_teacher():
    """The LoRA fake score starts as the teacher: with no guidance g = 0. From a random one-step
    student on an exact point-mass teacher, VSD contracts the samples onto the point mass, the fake
    score's loss goes down, and everything stays finite. (The student's surrogate value is
    ½·mean g²: zero while fake = teacher, then it rises as the fake score learns the student's
    samples; it is not a descent objective.)"""
    torch.manual_seed(0)
    start = _method()
    x, x_t, t, cond = _noisy(start)
    assert torch.count_nonzero(start.dm.gradient(x, x_t, t, cond)) == 0

    torch.manual_seed(0)
    method = _method(PointMassResidual(), init_from_teacher=False, lora_rank=8)

    def distance():
        with torch.no_grad():
            x = method.generator.sample(torch.zeros(512, 4), {"y": torch.zeros(512, dtype=torch.long)}, index=0)
        return (x - C).pow(2).mean().item()

    before = distance()
    optimizers = {g: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
                  for g, m in method.trainable_modules().items()}
    losses = []
    for step in range(100):
        for group in method.update_groups(step):
            batch = {"x": torch.zeros(64, 4), "y": torch.randint(0, 3, (64,))}
            optimizers[group].zero_grad()
            loss, stats = method.loss(batch, group)
            loss.backward()
            optimizers[group].step()
            assert all(torch.isfinite(torch.as_tensor(v)) for v in (loss, *stats.values()))
            if group == "critic":
                losses.append(loss.item())
    assert distance() < 0.5 * before
    assert sum(losses[-20:]) < 0.5 * sum(losses[:20])


def test_random_guidance_scales_are_drawn_per_sample_within_the_range():
    torch.manual_seed(0)
    method = _method(guidance_range=[2.0, 6.0])
    scales = method.dm.real_guidance(4096, torch.zeros(4096, 4))
    assert scales.shape == (4096,)
    assert scales.min() >= 2.0 and scales.max() <= 6.0
    assert abs(scales.mean() - 4.0) < 0.1 and scales.min() < 2.05 and scales.max() > 5.95
    assert not torch.equal(scales, method.dm.real_guidance(4096, torch.zeros(4096, 4)))  # fresh each call

    # each sample's gradient is the fixed-scale gradient at its own scale
    x, x_t, t, cond = _noisy(method, n=6)
    with torch.no_grad():  # a fake score that differs from the teacher
        for p in method.critic.parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    torch.manual_seed(1)
    random = method.dm.gradient(x, x_t, t, cond)
    torch.manual_seed(1)
    drawn = method.dm.real_guidance(6, x)
    method.dm.guidance_range = None
    for i, scale in enumerate(drawn.tolist()):
        method.dm.guidance = scale
        torch.testing.assert_close(random[i], method.dm.gradient(x, x_t, t, cond)[i])


def test_a_one_point_range_is_the_fixed_scale_path():
    torch.manual_seed(0)
    fixed = _method(guidance=2.5)
    point = _method(guidance_range=[2.5, 2.5])
    point.critic.load_state_dict(fixed.critic.state_dict())
    point.teacher.model.load_state_dict(fixed.teacher.model.state_dict())
    x, x_t, t, cond = _noisy(fixed)
    expected = fixed.dm.gradient(x, x_t, t, cond)
    assert torch.count_nonzero(expected) > 0  # guidance makes the real score differ from the fake one
    assert torch.equal(point.dm.gradient(x, x_t, t, cond), expected)


def test_guiding_the_fake_score_too_keeps_the_gradient_zero_at_the_start():
    """SNOOPI guides both teachers by the same scale: while the fake score equals the teacher the
    gradient is zero under any scales; guiding only the real score makes it non-zero."""
    torch.manual_seed(0)
    method = _method(guidance_range=[1.0, 5.0], guide_fake_score=True)
    x, x_t, t, cond = _noisy(method)
    assert torch.count_nonzero(method.dm.gradient(x, x_t, t, cond)) == 0
    method.dm.guide_fake = False
    assert torch.count_nonzero(method.dm.gradient(x, x_t, t, cond)) > 0


@pytest.mark.parametrize("gen_steps", [1, 3])
def test_vsd_never_reads_the_data(gen_steps):
    """Image-free: NaN images give the very same losses and gradients as real ones (the batch's
    x only gives the shape), and a few updates on them train the student."""
    torch.manual_seed(0)
    method = _method(gen_steps=gen_steps, guidance_range=[1.0, 3.0])
    y = torch.randint(0, 3, (32,))
    real, nan = {"x": torch.randn(32, 4), "y": y}, {"x": torch.full((32, 4), float("nan")), "y": y}
    for group in ("student", "critic"):
        values = []
        for batch in (real, nan):
            torch.manual_seed(3)
            random.seed(3)  # the few-step generator's step index
            for m in method.trainable_modules().values():
                m.zero_grad(set_to_none=True)
            loss, _ = method.loss(batch, group)
            loss.backward()
            params = method.trainable_modules()[group].parameters()
            values.append([loss.detach(), *(p.grad.clone() for p in params if p.grad is not None)])
        assert all(torch.equal(a, b) for a, b in zip(*values)) and torch.isfinite(values[1][0])

    before = [p.detach().clone() for p in method.student.model.parameters()]
    optimizers = {g: torch.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=1e-3)
                  for g, m in method.trainable_modules().items()}
    for step in range(4):
        for group in method.update_groups(step):
            optimizers[group].zero_grad()
            method.loss(nan, group)[0].backward()
            optimizers[group].step()
    after = list(method.student.model.parameters())
    assert all(torch.isfinite(p).all() for p in after)
    assert any(not torch.equal(a, b) for a, b in zip(after, before))


def test_bad_vsd_options_stop_clearly():
    with pytest.raises(ValueError, match="guidance_range must be"):
        _method(guidance_range=[3.0, 1.0])
    with pytest.raises(ValueError, match="guidance_range must be"):
        _method(guidance_range=[2.0])
    with pytest.raises(ValueError, match="image-free"):
        _method(gen_steps=2, backward_simulation=False)
    with pytest.raises(ValueError, match="weighting must be one of dmd, vsd"):
        _method(weighting="sds")
    with pytest.raises(ValueError, match="critic_updates must be >= 1"):
        _method(critic_updates=0)
