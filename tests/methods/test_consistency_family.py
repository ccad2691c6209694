"""multistep_cd, scott and tbcm on tiny networks: zero loss for an exact student, losses that go
down, the reductions to plain consistency distillation that the theory gives, the segment
schedule, the data-free trajectory cache, and clear errors for bad options."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.param import expand, get_parameterisation
from tests.methods.nets import C, TinyNet

FAMILY = ["multistep_cd", "scott", "tbcm"]


class PointMass(nn.Module):
    """An exact network for data x0 = C in ``param``, any state shape [B, ...]: the denoiser
    x̂0 = C, ε̂ = (x_t − α·C)/σ (``of=None``: what the teacher and a segmented student are), or, for
    the ``ConsistencyModel`` ``of``, the x̂0 that makes it the exact consistency function
    f(x_t, t) = α_min·C + σ_min·(x_t − α·C)/σ despite its c_skip mixing. ``offset`` ≠ 0 adds
    offset·x_t to x̂0: no longer exact."""

    def __init__(self, param, of: ConsistencyModel | None = None, offset: float = 0.0):
        super().__init__()
        self.param, self.parameterisation, self.of, self.offset = param, param.name, of, offset
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x_in, t_in, y=None):
        param = self.param
        x, t = x_in, t_in
        if param.name == "edm":
            t = torch.exp(4 * t_in)
            x = x_in * expand(torch.sqrt(t**2 + param.sigma_data**2), x_in)
        alpha, sigma = (expand(v, x) for v in param.alpha_sigma(t))
        eps = (x - alpha * C) / sigma.clamp(min=1e-6)
        x0 = torch.full_like(x, C)
        if self.of is not None and self.of.boundary == "cm":
            a_min, s_min = param.alpha_sigma(torch.tensor(param.t_min))
            c = expand(self.of.c_skip(t), x)
            x0 = (a_min * C + s_min * eps - c * x) / (1 - c).clamp(min=1e-12)
        x0 = x0 + self.offset * x
        return param.from_x0_eps(x, x0, (x - alpha * x0) / sigma.clamp(min=1e-6), t) + 0 * self.dummy


def _exact_student(param, offset=0.0):
    model = ConsistencyModel(nn.Identity(), param)
    model.net = PointMass(param, of=model, offset=offset)
    return model


def _batch(n=64, shape=(4,), point_mass=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, *shape), C) if point_mass else 0.5 * torch.randn(n, *shape, generator=g) + 0.2
    return {"x": x, "y": torch.randint(0, 3, (n,), generator=g)}


def _method(name, student_net, teacher_net, param="fm", **args):
    """``name`` with a student of ``student_net`` (or that ConsistencyModel itself) and a teacher."""
    cls = METHODS.get(name)
    if not isinstance(student_net, ConsistencyModel):
        student_net = ConsistencyModel(student_net, get_parameterisation(param))
    student = Student(student_net)
    return cls(cls.Config(param=param, **args), student, Teacher(teacher_net))


def _loss(method, batch, step=0, seed=0):
    torch.manual_seed(seed)
    method.update_groups(step)
    return method.loss(batch, "student")[0]


@pytest.mark.parametrize("param", ["fm", "edm", "vp-eps"])
@pytest.mark.parametrize("name", FAMILY)
def test_loss_is_zero_for_an_exact_student(name, param):
    # multistep_cd's student is a segmented function (DDIM with its x̂0, ε̂ to the edge): exact
    # when its network is the denoiser; the others need the exact consistency function.
    # SCott's noise moves x̂_s to another trajectory; f then differs by σ(t_min)·Δε, zero only in fm.
    p = get_parameterisation(param)
    extra = {"eta": 0.8 if param == "fm" else 0.0} if name == "scott" else {}

    def loss(offset):
        student = PointMass(p, offset=offset) if name == "multistep_cd" else _exact_student(p, offset)
        method = _method(name, student, PointMass(p), param, init_from_teacher=False, num_intervals=8, skip=2,
                         **extra)
        return _loss(method, _batch(shape=(2, 3), point_mass=True)).item()

    assert loss(0.0) == pytest.approx(0.0, abs=1e-6)
    assert loss(0.2) > 1e-4


@pytest.mark.parametrize("name,args,ratio", [
    ("multistep_cd", {"num_intervals": 8, "segment_schedule": [4, 2, 1], "total_steps": 60}, 0.5),
    # SCott's target is random (the SDE noise): its loss keeps an irreducible part, ~η·σ·|∂f/∂x|
    ("scott", {"eta": 0.3, "substeps": 2}, 0.85),
    ("tbcm", {"refresh_every": 2}, 0.5),
])
def test_losses_decrease(name, args, ratio):
    torch.manual_seed(0)
    method = _method(name, TinyNet(), TinyNet(), guidance=2.0, init_from_teacher=False, **args)

    def held_out():  # the same batches and draws before and after training
        with torch.no_grad():
            return sum(_loss(method, _batch(seed=i), 0, seed=100 + i).item() for i in range(4))

    before = held_out()
    opt = torch.optim.Adam(method.student.model.parameters(), lr=3e-3)
    for step in range(60):
        loss = _loss(method, _batch(seed=step % 4), step, seed=step)
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert held_out() < ratio * before


def test_scott_without_noise_is_consistency_distillation():
    torch.manual_seed(0)
    teacher, student = TinyNet(), TinyNet()
    cd = METHODS.get("consistency_distillation")
    reference = cd(cd.Config(guidance=2.0, skip=2), Student(ConsistencyModel(student, get_parameterisation("fm"))),
                   Teacher(teacher))
    batch = _batch()
    losses = {eta: _loss(_method("scott", TinyNet(), teacher, guidance=2.0, skip=2, eta=eta, substeps=1), batch)
              for eta in (0.0, 0.5)}
    expected = _loss(reference, batch)
    assert losses[0.0].item() == pytest.approx(expected.item(), rel=1e-6)
    assert abs(losses[0.5].item() - expected.item()) > 1e-3 * expected.item()


def test_one_segment_is_consistency_distillation():
    torch.manual_seed(0)
    teacher = TinyNet()
    cd = METHODS.get("consistency_distillation")
    reference = cd(cd.Config(skip=2), Student(ConsistencyModel(TinyNet(), get_parameterisation("fm"))),
                   Teacher(teacher))
    batch = _batch()
    one = _loss(_method("multistep_cd", TinyNet(), teacher, skip=2, segments=1), batch)
    four = _loss(_method("multistep_cd", TinyNet(), teacher, skip=2, segments=4), batch)
    assert one.item() == pytest.approx(_loss(reference, batch).item(), rel=1e-6)
    assert abs(four.item() - one.item()) > 1e-3 * one.item()


@pytest.mark.parametrize("param", ["fm", "edm"])
def test_one_interval_per_segment_targets_the_teacher_step_itself(param):
    # With N = S every teacher step ends on an edge: the target is the teacher's DDIM state, which
    # a student equal to the teacher reproduces exactly. With N = 2S it must bootstrap instead.
    torch.manual_seed(0)
    teacher = TinyNet()
    teacher.parameterisation = param
    batch = _batch()
    same = _loss(_method("multistep_cd", TinyNet(), teacher, param, num_intervals=4, segments=4), batch)
    finer = _loss(_method("multistep_cd", TinyNet(), teacher, param, num_intervals=8, segments=4), batch)
    assert same.item() == pytest.approx(0.0, abs=1e-7)
    assert finer.item() > 1e-4


def test_segment_schedule_follows_the_training_step():
    cls = METHODS.get("multistep_cd")
    student = Student(ConsistencyModel(TinyNet(), get_parameterisation("fm")), ema_decays=[0.9])
    method = cls(cls.Config(num_intervals=8, segment_schedule=[4, 2, 1], total_steps=9), student, Teacher(TinyNet()))
    seen = []
    for step in (0, 2, 3, 5, 6, 8, 20):
        _, logged = method.loss(_batch(), method.update_groups(step)[0])
        seen.append((int(logged["multistep_cd/segments"]), int(student.model.segments), int(student.ema[0].segments)))
    assert seen == [(4, 4, 4), (4, 4, 4), (2, 2, 2), (2, 2, 2), (1, 1, 1), (1, 1, 1), (1, 1, 1)]


class CountingNet(TinyNet):
    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, t, y=None):
        self.calls += 1
        return super().forward(x, t, y)


def test_tbcm_is_data_free_and_reuses_its_trajectories():
    teacher = CountingNet()
    method = _method("tbcm", TinyNet(), teacher, num_intervals=5, refresh_every=3)
    batch = _batch()
    calls = []
    for step in range(5):
        before = teacher.calls
        _loss(method, batch, step, seed=step)
        calls.append(teacher.calls - before)
    assert calls == [5, 0, 0, 5, 0]  # N teacher calls per fresh trajectory, none on reuse
    # only the shape of x matters: other data values, same draws, same loss
    # (students initialised from the same teacher: equal weights)
    a = _loss(_method("tbcm", TinyNet(), teacher, num_intervals=5), batch, seed=9)
    b = _loss(_method("tbcm", TinyNet(), teacher, num_intervals=5), {"x": 1000 * batch["x"] - 5, "y": batch["y"]},
              seed=9)
    assert a.item() == b.item() and a.item() > 0


@pytest.mark.parametrize("name,args,match", [
    ("multistep_cd", {"segments": 3}, "segments"),
    ("multistep_cd", {"num_intervals": 12, "segment_schedule": [8, 4]}, "segment_schedule"),
    ("multistep_cd", {"total_steps": 0}, "total_steps"),
    ("multistep_cd", {"regression_weight": -1.0}, "regression_weight"),
    ("multistep_cd", {"clean_states": "noise"}, "clean_states must be one of data, teacher"),
    ("scott", {"eta": 1.5}, "eta"),
    ("scott", {"substeps": 0}, "substeps"),
    ("tbcm", {"refresh_every": 0}, "refresh_every"),
    ("tbcm", {"distance": "l1"}, "distance must be one of pseudo_huber, l2, cauchy"),
    ("scott", {"target": "slow"}, "target must be one of online, ema"),
    ("multistep_cd", {"skip": 30}, "skip"),
    ("tbcm", {"target": "ema"}, "ema_decays"),
])
def test_bad_options_stop_before_training(name, args, match):
    with pytest.raises(ValueError, match=match):
        _method(name, TinyNet(), TinyNet(), **args)


@pytest.mark.parametrize("name", FAMILY)
def test_teacher_of_another_parameterisation_is_refused(name):
    cls = METHODS.get(name)
    with pytest.raises(ValueError, match="param: unknown parameterisation 've'; choose one of"):
        cls(cls.Config(param="ve"), Student(ConsistencyModel(TinyNet(), get_parameterisation("fm"))),
            Teacher(TinyNet()))
    teacher = TinyNet()
    teacher.parameterisation = "edm"
    with pytest.raises(ValueError, match="edm"):
        _method(name, TinyNet(), teacher)
    with pytest.raises(TypeError, match="ConsistencyModel"):
        cls(cls.Config(), Student(TinyNet()), Teacher(TinyNet()))


def _paired_batch(n=64, shape=(4,), seed=0):
    """A batch with the teacher's ODE pairs: noise ``ode_noise`` and a stand-in sample ``ode_x``."""
    g = torch.Generator().manual_seed(seed + 50)
    return {**_batch(n, shape, seed=seed), "ode_noise": torch.randn(n, *shape, generator=g),
            "ode_x": torch.full((n, *shape), C)}


def test_multistep_cd_asks_for_the_ode_pairs_only_when_it_uses_them():
    assert not _method("multistep_cd", TinyNet(), TinyNet()).needs_ode_pairs
    assert _method("multistep_cd", TinyNet(), TinyNet(), regression_weight=0.5).needs_ode_pairs
    assert _method("multistep_cd", TinyNet(), TinyNet(), clean_states="teacher").needs_ode_pairs
    with pytest.raises(ValueError, match="ODE pairs"):
        _loss(_method("multistep_cd", TinyNet(), TinyNet(), clean_states="teacher"), _batch())


def test_multistep_cd_clean_states_from_the_teacher_replace_the_data():
    # clean_states=teacher noises the pairs' ode_x instead of x: other x values, same loss; and the
    # same loss as data clean states whose x is that ode_x.
    torch.manual_seed(0)
    teacher = TinyNet()
    batch = _paired_batch()
    loss = _loss(_method("multistep_cd", TinyNet(), teacher, clean_states="teacher"), batch, seed=3)
    moved = _loss(_method("multistep_cd", TinyNet(), teacher, clean_states="teacher"),
                  {**batch, "x": 100 * batch["x"]}, seed=3)
    as_data = _loss(_method("multistep_cd", TinyNet(), teacher), {"x": batch["ode_x"], "y": batch["y"]}, seed=3)
    assert loss.item() == moved.item() == pytest.approx(as_data.item(), rel=1e-6)


@pytest.mark.parametrize("segments", [1, 2])
def test_multistep_cd_regression_is_the_students_own_sample_against_the_pairs(segments):
    from kdlib.diffusion.consistency import segment_sample
    from kdlib.methods.consistency_family import consistency_distance

    torch.manual_seed(0)
    teacher = TinyNet()
    batch = _paired_batch()
    plain = _method("multistep_cd", TinyNet(), teacher, num_intervals=4, segments=segments)
    weighted = _method("multistep_cd", TinyNet(), teacher, num_intervals=4, segments=segments, regression_weight=2.0)
    cond = {"y": batch["y"]}
    sample = segment_sample(weighted.student.model, weighted.param, batch["ode_noise"], segments, **cond)
    expected = consistency_distance(sample, batch["ode_x"], "pseudo_huber")
    diff = _loss(weighted, batch, seed=4) - _loss(plain, batch, seed=4)
    assert diff.item() == pytest.approx(2.0 * expected.item(), rel=1e-5)
    # differentiable through every step of the student's sampler
    weighted.student.model.zero_grad()
    _loss(weighted, batch, seed=4).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in weighted.student.model.parameters())
