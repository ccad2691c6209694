"""Phased DMD (``phased_dmd``) and its phase experts on tiny networks: the phases partition the
noise range, phase k draws its noise levels inside its subinterval, each expert learns only from
its phase, the trained maps are the student's own sampler, the subinterval score-matching loss has
the right minimiser, the distribution matching moves a random generator onto the teacher, exact
resume and clear errors."""

from __future__ import annotations

import pytest
import torch

from kdlib.core.checkpoint import latest_checkpoint
from kdlib.core.config import ConfigError, build
from kdlib.core.data import TensorDataset
from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.core.run_config import TrainConfig
from kdlib.core.trainer import Trainer
from kdlib.diffusion.consistency import ConsistencyModel, few_step_sample, segment_edges
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.phase_experts import PhaseExperts, phase_boundaries
from kdlib.methods.flow_matching import denoising_loss
from kdlib.methods.phased_dmd import law_table, subinterval_denoising_loss, transition, truncated_times
from tests.methods.nets import C, PointMassResidual, PointMassVelocity, TinyNet

FM = get_parameterisation("fm")
PHASED = METHODS.get("phased_dmd")


def _student(phases, net=TinyNet):
    return Student(ConsistencyModel(PhaseExperts.for_segments([net() for _ in range(phases)], FM), FM))


def _method(phases=3, teacher_net=None, **args):
    torch.manual_seed(0)
    return PHASED(PHASED.Config(phases=phases, **args), _student(phases), Teacher(teacher_net or TinyNet()))


def _batch(n=32, seed=0, point_mass=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 4), C) if point_mass else 0.5 * torch.randn(n, 4, generator=g) + 0.2
    return {"x": x, "y": torch.randint(0, 3, (n,), generator=g)}


def _zero_grads(method):
    for module in method.trainable_modules().values():
        module.zero_grad(set_to_none=True)


def _perturb(module, scale=0.1):
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))


@pytest.mark.parametrize("name", ["fm", "trigflow", "edm", "vp-eps"])
@pytest.mark.parametrize("phases", [1, 2, 3, 4])
def test_phase_boundaries_partition_the_range(name, phases):
    """b_0 = t_max > ... > b_K = t_min are the K-segment sampler's edges; every time in
    (t_min, t_max] is routed to exactly the phase k with b_{k+1} < t <= b_k (a boundary belongs to
    the phase it starts), through the time the networks are fed."""
    param = get_parameterisation(name)
    b = phase_boundaries(param, phases)
    assert torch.equal(b, segment_edges(param, phases).flip(0))
    assert b[0].item() == pytest.approx(param.t_max) and b[-1].item() == pytest.approx(param.t_min)
    assert bool((b[1:] < b[:-1]).all())
    experts = PhaseExperts.for_segments([torch.nn.Identity() for _ in range(phases)], param)
    t = torch.cat([torch.linspace(param.t_min, param.t_max, 2001)[1:], b[:-1].float()])
    expected = ((t.double()[:, None] <= b[None, 1:-1] * (1 + 1e-7)).sum(1))  # boundaries in float32 count as theirs
    _, t_in = param.model_input(torch.zeros(len(t), 1), t)
    routed = experts.phase(t_in)
    assert torch.equal(routed, expected)
    assert set(routed.tolist()) == set(range(phases))
    for k in range(phases):  # each phase start is routed to its own expert
        assert experts.phase(param.model_input(torch.zeros(1, 1), b[k:k + 1].float())[1]).item() == k


def test_mixed_batches_run_each_sample_through_its_own_expert():
    experts = [TinyNet() for _ in range(3)]
    net = PhaseExperts.for_segments(experts, FM)
    x, y = torch.randn(6, 4), torch.tensor([0, 1, 2, 0, 1, 2])
    t = torch.tensor([1.0, 0.9, 0.5, 0.4, 0.2, 0.05])
    out = net(x, t, y=y)
    for i, k in enumerate([0, 0, 1, 1, 2, 2]):
        torch.testing.assert_close(out[i], experts[k](x[i:i + 1], t[i:i + 1], y[i:i + 1])[0])
    out.sum().backward()
    assert all(p.grad is not None for e in experts for p in e.parameters())
    # a caller that knows the phase names it: the same expert as routing by t
    torch.testing.assert_close(net(x[2:4], t[2:4], phase=1, y=y[2:4]), out[2:4], rtol=0, atol=0)


def test_without_time_values_the_batch_is_split_evenly_among_the_experts():
    """Fake tensors (the --dry-run estimator's) have no times to route by: the batch goes to the
    experts in equal slices, so every expert runs (and gets gradients) on rows adding up to the
    batch, the routed forward's memory. Real tensors are still routed by their times."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    experts = [TinyNet() for _ in range(3)]
    net = PhaseExperts.for_segments(experts, FM)
    calls = []
    for e in experts:
        e.register_forward_hook(lambda module, args, out: calls.append((experts.index(module), args[0].shape[0])))
    with FakeTensorMode(allow_non_fake_inputs=True):  # the experts' weights stay real here
        out = net(torch.randn(7, 4), torch.rand(7), y=torch.zeros(7, dtype=torch.long))
        out.sum().backward()
    assert out.shape == (7, 4) and calls == [(0, 2), (1, 2), (2, 3)]
    assert all(p.grad is not None for e in experts for p in e.parameters())


@pytest.mark.parametrize("phase_time", ["teacher", "uniform"])
@pytest.mark.parametrize("score_range", ["phase", "above"])
def test_noise_levels_of_phase_k_lie_in_its_subinterval(score_range, phase_time):
    """Every level drawn at phase k, and every time the real and the fake score are asked at in
    phase k's generator and critic losses, lies strictly inside (b_{k+1}, b_k) (or (b_{k+1}, t_max)
    for score_range=above); the phases' subintervals under ``phase`` are disjoint."""
    teacher = Recorder(TinyNet())
    method = _method(3, teacher, score_range=score_range, phase_time=phase_time, init_from_teacher=False)
    b = method.bounds
    for k in range(3):
        hi = b[k] if score_range == "phase" else b[0]
        t = method.times(k, 20000, torch.zeros(1))
        assert float(t.min()) > b[k + 1] and float(t.max()) < hi
        # the whole subinterval is covered (the logit-normal law has little mass near t = 1)
        assert float(t.max() - t.min()) > (0.98 if phase_time == "uniform" else 0.9) * (hi - b[k + 1])
        teacher.calls.clear()
        critic = method.critic.net
        critic.calls.clear()
        method.generator_loss(_batch()["x"], {"y": _batch()["y"]}, k)
        method.critic_loss(_batch()["x"], {"y": _batch()["y"]}, k)
        asked = torch.cat([t for _, t in teacher.calls + critic.calls])
        assert len(teacher.calls) == 1 and len(critic.calls) == 2  # DM (real, fake) and the critic's loss
        assert float(asked.min()) > b[k + 1] and float(asked.max()) < hi


@pytest.mark.parametrize("s,hi", [(0.0, 0.25), (0.25, 0.5), (0.5, 1.0), (0.75, 1.0)])
def test_teacher_law_truncated_to_a_phase_is_the_conditional_law(s, hi):
    """phase_time=teacher draws from the teacher's own time law (fm: logit-normal) conditioned on
    the subinterval: its quantiles match those of rejection sampling, and differ from uniform's."""
    table = law_table(FM)
    draws = truncated_times(table, s, hi, 50_000)
    law = FM.sample_train_time(2_000_000).double()
    kept = law[(law > s) & (law < hi)]
    q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    torch.testing.assert_close(torch.quantile(draws, q), torch.quantile(kept[:200_000], q), atol=4e-3 * (hi - s) + 2e-3,
                               rtol=0)
    uniform = torch.quantile(truncated_times(None, s, hi, 50_000), q)
    assert (uniform - torch.quantile(draws, q)).abs().max() > 0.02 * (hi - s)


def test_each_expert_gets_gradients_only_from_its_phase():
    """Phase k's generator loss (with backward simulation through experts 0..k−1) reaches expert k
    alone; the critic's loss reaches no expert; the generator's loss no critic weight."""
    method = _method(3)
    _perturb(method.critic.net)  # a fake score that has moved: a non-zero DM gradient
    experts = method.student.model.net.experts
    for k in range(3):
        _zero_grads(method)
        loss, stats = method.generator_loss(_batch()["x"], {"y": _batch()["y"]}, k)
        loss.backward()
        assert stats["dm/grad_norm"] > 0
        for j, expert in enumerate(experts):
            grads = [p.grad for p in expert.parameters()]
            if j == k:
                assert all(g is not None for g in grads) and any(torch.count_nonzero(g) > 0 for g in grads)
            else:
                assert all(g is None for g in grads), (k, j)
        assert all(p.grad is None for p in method.critic.parameters())
        _zero_grads(method)
        method.critic_loss(_batch()["x"], {"y": _batch()["y"]}, k)[0].backward()
        assert all(p.grad is None for p in method.student.model.parameters())
        assert all(p.grad is not None for p in method.critic.parameters())


def test_expert_steps_are_the_students_own_sampler():
    """The K trained maps, chained from noise, are the student's K-step sampler bit for bit
    (``few_step_sample`` walks the segment edges), and phase k's input under backward simulation
    is that sampler's state after k steps."""
    method = _method(3)
    for expert in method.student.model.net.experts:
        _perturb(expert, 0.3)  # distinct experts
    cond = {"y": torch.tensor([0, 1, 2, 1])}
    torch.manual_seed(5)
    noise = torch.randn(4, 4)
    states, x = [], noise
    with torch.no_grad():
        for k in range(3):
            states.append(x)
            x, _ = method.expert_step(x, k, cond)
        assert torch.equal(x, few_step_sample(method.student.model, FM, noise, 3, **cond))
        for k in range(3):
            torch.manual_seed(5)
            x_in = method.phase_input(torch.zeros(4, 4), cond, k)
            torch.manual_seed(5)
            assert torch.equal(x_in, states[k])
    assert int(method.student.model.segments) == 3


def test_subinterval_loss_is_the_denoising_loss_at_t_min():
    g = torch.Generator().manual_seed(0)
    net = TinyNet()
    x0, eps = torch.randn(64, 4, generator=g), torch.randn(64, 4, generator=g)
    t = torch.rand(64, generator=g).clamp(0.01, 0.99)
    cond = {"y": torch.zeros(64, dtype=torch.long)}
    ours = subinterval_denoising_loss(net, FM, x0, torch.zeros(64), t, eps, cond)
    torch.testing.assert_close(ours, denoising_loss(net, FM, x0, eps, t, cond))


@pytest.mark.parametrize("s", [0.25, 0.5, 0.75])
def test_subinterval_loss_is_minimised_by_the_true_score(s):
    """States x_s of point-mass data C at level s, diffused to t in (s, 1): the subinterval loss
    is smallest for the exact score of p_t (the point-mass velocity), not for a scaled one, even
    though the network never sees C — only x_s."""
    g = torch.Generator().manual_seed(1)
    n = 200_000
    x_s = FM.add_noise(torch.full((n, 2), C), torch.randn(n, 2, generator=g), torch.full((n,), s))
    t = s + (1 - s) * torch.rand(n, generator=g).clamp(1e-3, 1 - 1e-3)
    eps = torch.randn(n, 2, generator=g)
    losses = {scale: subinterval_denoising_loss(PointMassVelocity(scale), FM, x_s, torch.full((n,), s), t, eps, {})
              for scale in (0.9, 1.0, 1.1)}
    assert losses[1.0] < losses[0.9] and losses[1.0] < losses[1.1]
    # and x_t is the forward process from x_s: its noise around α_t·C has variance σ_t²
    x_t, _, _ = transition(FM, x_s, torch.full((n,), s), t, eps)
    z = (x_t - (1 - t[:, None]) * C) / t[:, None]
    assert abs(float(z.mean())) < 0.01 and abs(float(z.var()) - 1) < 0.01


def test_dm_gradient_is_zero_when_fake_and_real_scores_agree():
    method = _method(2)
    for k in range(2):
        loss, stats = method.generator_loss(_batch()["x"], {"y": _batch()["y"]}, k)
        assert loss.item() == 0.0 and stats["dm/grad_norm"].item() == 0.0
    guided = _method(2, guidance=3.0)
    assert guided.generator_loss(_batch()["x"], {"y": _batch()["y"]}, 1)[0] > 0


def test_phase_schedules():
    """Together: blocks of N steps, each one generator and N critic updates of one phase, the
    phases in turn; progressive: phase k for P steps each, the last one onwards."""
    together = _method(3, critic_updates=2)
    assert [together.phase(s) for s in range(13)] == [0, 0, 1, 1, 2, 2, 0, 0, 1, 1, 2, 2, 0]
    assert [together.update_groups(s) for s in range(3)] == [["student", "critic"], ["critic"], ["student", "critic"]]
    progressive = _method(3, phase_steps=4)
    assert [progressive.phase(s) for s in range(14)] == [0] * 4 + [1] * 4 + [2] * 6


def _sample_distance(method, n=512):
    with torch.no_grad():
        x = few_step_sample(method.student.model, FM, torch.randn(n, 4), len(method.bounds) - 1,
                            y=torch.zeros(n, dtype=torch.long))
    return (x - C).pow(2).mean().item()


def test_phased_dmd_moves_random_experts_onto_the_teacher_distribution():
    """Point-mass data, an exact teacher (whose fake-score copy can learn), random experts: the
    2-step samples contract onto the point mass; every logged value stays finite."""
    torch.manual_seed(0)
    method = PHASED(PHASED.Config(phases=2, critic_updates=2, init_from_teacher=False),
                    _student(2), Teacher(PointMassResidual()))
    before = _sample_distance(method)
    optimizers = {g: torch.optim.Adam(m.parameters(), lr=3e-3) for g, m in method.trainable_modules().items()}
    logged = []
    for step in range(300):
        for group in method.update_groups(step):
            optimizers[group].zero_grad()
            loss, stats = method.loss(_batch(64, seed=step, point_mass=True), group)
            loss.backward()
            optimizers[group].step()
            logged += [loss.item(), *(float(v) for v in stats.values())]
    assert all(torch.isfinite(torch.tensor(logged)))
    assert _sample_distance(method) < 0.2 * before


def test_fake_score_learns_the_score_of_noisy_states():
    """A random critic trained by the subinterval loss on states x_s of point-mass data at s = 0.5
    (what a phase-0 generator outputs once it is right): its loss on fixed draws falls most of
    the way to that of the exact score, the irreducible floor."""
    torch.manual_seed(0)
    critic, s = TinyNet(), 0.5
    optimizer = torch.optim.Adam(critic.parameters(), lr=3e-3)

    def loss(net, seed):
        g = torch.Generator().manual_seed(seed)
        x_s = FM.add_noise(torch.full((256, 4), C), torch.randn(256, 4, generator=g), torch.full((256,), s))
        t = truncated_times(law_table(FM), s, 1.0, 256).float()
        return subinterval_denoising_loss(net, FM, x_s, torch.full((256,), s), t, torch.randn(256, 4, generator=g), {})

    def total(net):
        torch.manual_seed(123)
        return sum(loss(net, 1000 + k).item() for k in range(8))

    before, floor = total(critic), total(PointMassVelocity())
    for step in range(300):
        optimizer.zero_grad()
        loss(critic, step).backward()
        optimizer.step()
    assert total(critic) - floor < 0.3 * (before - floor)


def _trainer(method, tmp_path, steps, **cfg):
    data = TensorDataset(**_batch(256, seed=3))
    config = TrainConfig(steps=steps, batch_size=32, lr=1e-3, schedule="constant", checkpoint_every=4,
                         log_every=2, progress=False, device="cpu", **cfg)
    return Trainer(method, data, config, stage_dir=tmp_path, seed=0, evaluate=lambda step: {})


def test_phased_dmd_kill_and_resume_is_exact(tmp_path):
    """Stopped between checkpoints and resumed by a fresh method and Trainer: bit-identical to an
    uninterrupted run (every expert, the critic, both optimizers); the teacher never changes."""

    def run(stage, evaluate=None):
        method = _method(2, critic_updates=2, phase_steps=5)
        teacher_before = {k: v.clone() for k, v in method.teacher.model.state_dict().items()}
        trainer = _trainer(method, tmp_path / stage, 12, eval_every=6)
        if evaluate:
            trainer.evaluate = evaluate
        trainer.fit()
        assert all(torch.equal(v, method.teacher.model.state_dict()[k]) for k, v in teacher_before.items())

    run("full")

    def crash(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run("killed", crash)
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").step == 4
    run("killed")
    full = latest_checkpoint(tmp_path / "full" / "checkpoints")
    resumed = latest_checkpoint(tmp_path / "killed" / "checkpoints")
    keys = [k for k in full.tensors if k.startswith(("model/", "optim/"))]
    assert {f"model/student/net.experts.{i}.net.0.weight" for i in range(2)} <= set(keys)
    assert any(k.startswith("optim/critic") for k in keys)
    for k in keys:
        assert torch.equal(full.tensors[k], resumed.tensors[k]), k


def test_unknown_keys_and_bad_values_stop_clearly():
    with pytest.raises(ConfigError, match="phases"):
        build(PHASED.Config, {"phase": 2}, source="recipe mnist-phased-dmd")
    with pytest.raises(ValueError, match="phases must be >= 1"):
        _method(0)
    with pytest.raises(ValueError, match="score_range must be one of phase, above"):
        _method(2, score_range="all")
    with pytest.raises(ValueError, match="critic_updates"):
        _method(2, critic_updates=0)
    with pytest.raises(ValueError, match="student_experts=3"):  # a plain student: no experts
        PHASED(PHASED.Config(phases=3), Student(ConsistencyModel(TinyNet(), FM)), Teacher(TinyNet()))
    with pytest.raises(ValueError, match="this student has 2 experts"):
        PHASED(PHASED.Config(phases=3), _student(2), Teacher(TinyNet()))
    with pytest.raises(ValueError, match="not at the phase boundaries"):
        PHASED(PHASED.Config(phases=2), Student(ConsistencyModel(PhaseExperts([TinyNet(), TinyNet()], [0.3]), FM)),
               Teacher(TinyNet()))


class Recorder(torch.nn.Module):
    """Wraps a network and records every (x, t) it is asked at."""

    parameterisation = "fm"

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, y=None):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.net(x, t, y)
