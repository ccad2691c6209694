"""reflow and slimflow: the U-shaped time law, the premetric's two regimes, the straight-path
target, Euler sampling of the student, a toy problem with a known straight coupling where one
reflowed step beats the teacher's, SlimFlow's annealing endpoints and flow guidance, the guide's
checkpoint, losses that go down and clear errors for bad options."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from kdlib.core.config import ConfigError, build
from kdlib.core.data import TensorDataset
from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.core.run_config import TrainConfig
from kdlib.core.trainer import Trainer
from kdlib.diffusion.consistency import ConsistencyModel, few_step_sample
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.rectified_flow import sample_u_shaped, straight_path, u_shaped_pdf
from kdlib.diffusion.samplers import sample
from kdlib.methods.consistency_family import consistency_distance
from kdlib.methods.slimflow import anneal_beta, anneal_noise
from tests.methods.nets import TinyNet

FM = get_parameterisation("fm")
MU, S = torch.tensor([1.0, -1.0]), torch.tensor([1.5, 0.5])  # toy data: x ~ N(MU, diag(S²))


class GaussianVelocity(nn.Module):
    """The exact fm velocity E[z − x0 | x_t] for data N(MU, diag(S²)). Its PF-ODE maps noise z to
    MU + S·z (the monotone map per dimension); its one Euler step maps every z to MU."""

    parameterisation = "fm"

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        t = t[:, None]
        r = (x - (1 - t) * MU) / ((1 - t) ** 2 * S**2 + t**2)
        return t * r - (MU + (1 - t) * S**2 * r) + 0 * self.dummy


class StraightGaussianVelocity(nn.Module):
    """The straight (2-rectified) flow of that coupling: along x_t = (1 − t)(MU + S z) + t z the
    velocity is z − (MU + S z), with z recovered from (x_t, t)."""

    parameterisation = "fm"

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def forward(self, x, t, y=None):
        t = t[:, None]
        z = (x - (1 - t) * MU) / ((1 - t) * S + t)
        return z - (MU + S * z) + 0 * self.dummy


def _method(name, student_net, teacher_net, **args):
    cls = METHODS.get(name)
    return cls(cls.Config(**args), Student(ConsistencyModel(student_net, FM)), Teacher(teacher_net))


def _train(method, steps, batch, lr=3e-3):
    opt = torch.optim.Adam(method.student.model.parameters(), lr=lr)
    losses = []
    for step in range(steps):
        method.update_groups(step)
        loss, _ = method.loss(batch, "student")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


# -- the U-shaped time law ------------------------------------------------------------------------
@pytest.mark.parametrize("a", [1.0, 4.0])
def test_u_shaped_density_integrates_to_one_with_mass_at_both_ends(a):
    t = torch.linspace(0, 1, 200_001, dtype=torch.float64)
    p = u_shaped_pdf(t, a)
    assert torch.trapezoid(p, t).item() == pytest.approx(1.0, abs=1e-9)
    assert torch.allclose(p, p.flip(0))  # symmetric about ½
    mass = lambda lo, hi: torch.trapezoid(p[(t >= lo) & (t <= hi)], t[(t >= lo) & (t <= hi)]).item()  # noqa: E731
    middle = mass(0.45, 0.55)
    assert mass(0.0, 0.1) == pytest.approx(mass(0.9, 1.0)) and mass(0.0, 0.1) > (3 if a == 4 else 1.05) * middle
    assert u_shaped_pdf(torch.tensor([-0.1, 1.1]), a).abs().max() == 0


def test_u_shaped_sampler_follows_the_density():
    g = torch.Generator().manual_seed(0)
    t = sample_u_shaped(400_000, 4.0, generator=g).double()
    assert 0 <= t.min() and t.max() <= 1
    counts = torch.histc(t, bins=10, min=0, max=1) / len(t)
    edges = torch.linspace(0, 1, 11, dtype=torch.float64)
    expected = torch.tensor([math.sinh(4 * (b - 0.5)) - math.sinh(4 * (a - 0.5)) for a, b in zip(edges, edges[1:])],
                            dtype=torch.float64)
    expected = expected / (2 * math.sinh(2.0))  # F(b) − F(a)
    assert torch.allclose(counts, expected, atol=3e-3)
    assert counts[0] > 3 * counts[4]  # a = 4: p(0)/p(½) = cosh 2 ≈ 3.8


# -- the premetric --------------------------------------------------------------------------------
def test_pseudo_huber_is_l2_over_2c_near_zero_and_the_norm_far_away():
    d = torch.randn(3, 2, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    c = 0.00054 * math.sqrt(50)  # iCT's c for 50 values per sample: the default (c = 0)
    zero = torch.zeros_like(d)
    small, large = d / d.flatten(1).norm(dim=1)[:, None, None, None] * 1e-2 * c, d * 1e4
    r2_small = small.flatten(1).pow(2).sum(1)
    assert consistency_distance(small, zero, "pseudo_huber").item() == pytest.approx(
        (r2_small / (2 * c)).mean().item(), rel=1e-4)
    norm_large = large.flatten(1).norm(dim=1)
    assert consistency_distance(large, zero, "pseudo_huber").item() == pytest.approx(
        (norm_large - c).mean().item(), rel=1e-6)
    assert consistency_distance(large, zero, "pseudo_huber").item() == pytest.approx(norm_large.mean().item(),
                                                                                   rel=1e-3)
    assert consistency_distance(d, zero, "l2").item() == pytest.approx(d.pow(2).mean().item(), rel=1e-6)


# -- the straight-path target ---------------------------------------------------------------------
def test_reflow_target_is_z_minus_x_at_every_t():
    g = torch.Generator().manual_seed(0)
    x, z = torch.randn(11, 3, 4, generator=g), torch.randn(11, 3, 4, generator=g)
    t = torch.linspace(0, 1, 11)
    x_t, target = straight_path(x, z, t)
    assert torch.equal(target, z - x)  # the same at every t
    assert torch.equal(x_t[0], x[0]) and torch.equal(x_t[-1], z[-1])  # t = 0 data, t = 1 noise
    # kdlib's fm convention: the same point and the same regression target as flow matching
    assert torch.allclose(x_t, FM.add_noise(x, z, t))
    assert torch.allclose(target, FM.from_x0_eps(x_t, x, z, t))


def test_loss_is_zero_for_the_exact_straight_flow():
    torch.manual_seed(0)
    method = _method("reflow", StraightGaussianVelocity(), GaussianVelocity(), init_from_teacher=False,
                     teacher_sampler="heun", teacher_steps=40, distance="l2")
    loss, _ = method.loss({"x": torch.zeros(256, 2)}, "student")
    assert loss.item() < 1e-6
    # the teacher itself is not straight: as a student it scores clearly worse
    curved = _method("reflow", GaussianVelocity(), GaussianVelocity(), init_from_teacher=False,
                     teacher_sampler="heun", teacher_steps=40, distance="l2")
    assert curved.loss({"x": torch.zeros(256, 2)}, "student")[0].item() > 0.05


def test_student_samples_with_the_euler_ode_sampler():
    torch.manual_seed(0)
    method = _method("reflow", TinyNet(dim=2), TinyNet(dim=2))
    noise = torch.randn(16, 2)
    for steps in (1, 2, 4):
        ours = few_step_sample(method.student.model, FM, noise, steps)
        euler = sample(method.student.model.net, FM, noise, steps, "euler")
        assert torch.allclose(ours, euler, atol=1e-6)


def test_student_starts_as_the_teacher():
    teacher = TinyNet(dim=2)
    method = _method("reflow", TinyNet(dim=2), teacher)
    x, t = torch.randn(8, 2), torch.rand(8)
    assert torch.equal(method.student.model(x, t, prediction=True), teacher(x, t))


# -- training -------------------------------------------------------------------------------------
def test_reflow_loss_decreases_on_a_tiny_model():
    torch.manual_seed(0)
    method = _method("reflow", TinyNet(), TinyNet(), init_from_teacher=False, teacher_steps=8, refresh_every=4)
    losses = _train(method, 80, {"x": torch.zeros(128, 4), "y": torch.randint(0, 3, (128,))})
    assert all(math.isfinite(v) for v in losses)
    assert sum(losses[-10:]) < 0.5 * sum(losses[:10])


def test_one_reflowed_step_beats_the_teachers_one_step_on_a_known_straight_coupling():
    """Gaussian data: the teacher's ODE coupling is z -> MU + S z (straight after reflow), but its
    own one Euler step collapses every z onto MU (error tr S² = 2.5)."""
    torch.manual_seed(0)
    method = _method("reflow", TinyNet(dim=2), GaussianVelocity(), init_from_teacher=False,
                     teacher_sampler="heun", teacher_steps=20)
    _train(method, 150, {"x": torch.zeros(256, 2)}, lr=5e-3)
    z = torch.randn(4096, 2, generator=torch.Generator().manual_seed(1))
    exact = MU + S * z
    err = lambda x: (x - exact).pow(2).sum(1).mean().item()  # noqa: E731
    teacher_err = err(sample(GaussianVelocity(), FM, z, 1, "euler"))
    student_err = err(few_step_sample(method.student.model, FM, z, 1))
    assert teacher_err == pytest.approx(2.5, rel=0.05)
    assert student_err < 0.01 * teacher_err  # measured: 0.004 against 2.5


# -- SlimFlow -------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_anneal_schedule_runs_from_random_pairing_to_the_teachers_coupling(schedule):
    assert anneal_beta(0, 100, schedule) == 1.0  # β = 1: noise independent of the teacher's sample
    assert anneal_beta(50, 100, schedule) == pytest.approx(0.5)
    assert anneal_beta(100, 100, schedule) == pytest.approx(0.0, abs=1e-12)  # the teacher's coupling
    assert anneal_beta(1000, 100, schedule) == pytest.approx(0.0, abs=1e-12)
    betas = [anneal_beta(k, 100, schedule) for k in range(101)]
    assert all(a >= b for a, b in zip(betas, betas[1:]))
    assert anneal_beta(0, 0, schedule) == 0.0  # no annealing: reflow from the start


def test_annealed_noise_stays_standard_normal():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(200_000, generator=g)
    for beta in (0.0, 0.6, 1.0):
        mixed = anneal_noise(z, beta, generator=g)
        assert mixed.std().item() == pytest.approx(1.0, abs=1e-2)
        corr = torch.corrcoef(torch.stack([z, mixed]))[0, 1].item()
        assert corr == pytest.approx(math.sqrt(1 - beta**2), abs=1e-2)
    assert anneal_noise(z, 0.0) is z


def test_flow_guided_target_of_a_straight_guide_is_the_one_step_target():
    """Euler is exact on a straight flow: v₂'s two-step solution equals MU + S ζ for any split s,
    and the whole distillation loss vanishes for a student that is that flow."""
    torch.manual_seed(0)
    method = _method("slimflow", StraightGaussianVelocity(), GaussianVelocity(), reflow_steps=0, anneal_steps=0,
                     teacher_sampler="heun", teacher_steps=40, distance="l2", guide_split=[0.0, 1.0])
    method.update_groups(0)  # phase 2 from the start: the guide is the student
    assert int(method.guide.taken) == 1 and method.distilling()
    zeta = torch.randn(512, 2)
    assert torch.allclose(method.guide_target(zeta, {}), MU + S * zeta, atol=1e-5)
    loss, logged = method.loss({"x": torch.zeros(256, 2)}, "student")
    assert loss.item() < 1e-6 and logged["slimflow/phase"] == 2.0


def test_slimflow_trains_a_smaller_student_through_both_phases():
    torch.manual_seed(0)
    small = TinyNet(dim=4)
    small.net[0] = nn.Linear(6, 16)
    small.net[2] = nn.Linear(16, 4)
    method = _method("slimflow", small, TinyNet(), reflow_steps=40, anneal_steps=20, teacher_steps=8)
    batch = {"x": torch.zeros(128, 4), "y": torch.randint(0, 3, (128,))}
    opt = torch.optim.Adam(method.student.model.parameters(), lr=3e-3)
    losses, phases = [], []
    for step in range(100):
        method.update_groups(step)
        if step == 40:  # the guide is the student as phase 1 left it
            snapshot = {k: v.clone() for k, v in method.student.model.state_dict().items()}
            assert all(torch.equal(snapshot[k], v) for k, v in method.guide.model.state_dict().items())
        loss, logged = method.loss(batch, "student")
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        phases.append(logged["slimflow/phase"])
    assert all(math.isfinite(v) for v in losses)
    assert phases == [1.0] * 40 + [2.0] * 60
    assert sum(losses[-10:]) < 0.2 * sum(losses[:10])
    assert sum(losses[-10:]) < sum(losses[40:50])  # and the one-step distillation still improves it
    # the guide stayed frozen while the student moved on
    assert all(torch.equal(snapshot[k], v) for k, v in method.guide.model.state_dict().items())
    assert not all(torch.equal(snapshot[k], v) for k, v in method.student.model.state_dict().items())


def _fit(method, stage_dir, steps):
    labels = torch.randint(0, 3, (256,), generator=torch.Generator().manual_seed(0))
    data = TensorDataset(x=torch.zeros(256, 4), y=labels)
    # constant lr: a 4-step run then shares the 8-step run's schedule, as a killed run would
    cfg = TrainConfig(steps=steps, batch_size=32, lr=3e-3, schedule="constant", checkpoint_every=4, log_every=2,
                      progress=False, device="cpu")
    Trainer(method, data, cfg, stage_dir=stage_dir, seed=0).fit()
    return method


@pytest.mark.parametrize("name,args", [("reflow", {"init_from_teacher": False}),
                                       ("slimflow", {"reflow_steps": 3, "anneal_steps": 2})])
def test_a_resumed_run_ends_as_one_that_was_not_stopped(tmp_path, name, args):
    """refresh_every = 1: every draw comes from the checkpointed RNG; slimflow's guide (taken at
    step 3, checkpointed at step 4) is restored, not taken again from the resumed student."""
    def fresh():
        torch.manual_seed(0)
        return _method(name, TinyNet(), TinyNet(), teacher_steps=4, **args)

    straight = _fit(fresh(), tmp_path / "straight", 8)
    _fit(fresh(), tmp_path / "stopped", 4)
    resumed = _fit(fresh(), tmp_path / "stopped", 8)  # a new process would rebuild the method like this
    for a, b in zip(straight.student.model.state_dict().values(), resumed.student.model.state_dict().values()):
        assert torch.equal(a, b)
    if name == "slimflow":
        assert int(resumed.guide.taken) == 1 and resumed.guide.is_taken  # restored with the checkpoint
        for a, b in zip(straight.guide.state_dict().values(), resumed.guide.state_dict().values()):
            assert torch.equal(a, b)


def test_couplings_are_fresh_per_micro_batch_and_served_refresh_every_batches():
    torch.manual_seed(0)
    method = _method("reflow", TinyNet(), TinyNet(), teacher_steps=2, refresh_every=3)
    like = torch.zeros(8, 4)
    method.update_groups(0)
    draws = [method.couplings(like, {})[0] for _ in range(4)]  # e.g. 4 micro-batches of one step
    assert draws[0] is draws[1] is draws[2] and not torch.equal(draws[2], draws[3])
    assert method.couplings(torch.zeros(4, 4), {})[0].shape == (4, 4)  # another batch shape: fresh pairs


# -- errors ---------------------------------------------------------------------------------------
def test_unknown_option_names_the_key_and_the_closest_ones():
    for name in ("reflow", "slimflow"):
        with pytest.raises(ConfigError, match=r"unknown config key 'teacher_step'.*did you mean 'teacher_steps'"):
            build(METHODS.get(name).Config, {"teacher_step": 4}, source="recipe r")


@pytest.mark.parametrize("name,args,match", [
    ("reflow", {"distance": "lpips"}, "distance must be one of pseudo_huber, l2"),
    ("reflow", {"teacher_sampler": "sde"}, "teacher_sampler must be one of"),
    ("reflow", {"time_dist": "logit_normal"}, "time_dist must be one of u_shaped, uniform"),
    ("reflow", {"teacher_steps": 0}, "teacher_steps must be >= 1"),
    ("reflow", {"teacher_param": "vp-x"}, "teacher_param: unknown parameterisation"),
    ("reflow", {"teacher_param": "edm"}, "teacher network is a 'fm' model"),
    ("slimflow", {"reflow_steps": 10, "anneal_steps": 20}, r"anneal_steps must be in \[0, 10\]"),
    ("slimflow", {"anneal_schedule": "exp"}, "anneal_schedule must be one of linear, cosine"),
    ("slimflow", {"guide_split": [0.8, 0.2]}, "guide_split must be"),
])
def test_bad_options_stop_before_training(name, args, match):
    with pytest.raises(ValueError, match=match):
        _method(name, TinyNet(), TinyNet(), **args)


def test_students_that_cannot_be_reflowed_are_refused():
    cls = METHODS.get("reflow")
    trig = get_parameterisation("trigflow")
    with pytest.raises(TypeError, match="fm kdlib.diffusion.ConsistencyModel"):
        cls(cls.Config(), Student(ConsistencyModel(TinyNet(), trig)), Teacher(TinyNet()))
    small = TinyNet()
    small.net[0] = nn.Linear(6, 16)
    small.net[2] = nn.Linear(16, 4)
    with pytest.raises(ValueError, match="init_from_teacher=false for a smaller student"):
        _method("reflow", small, TinyNet())
