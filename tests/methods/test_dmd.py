"""The distribution-matching methods ``dmd`` and ``dmd2`` (and their shared parts in
``kdlib.methods.distribution_matching``) on tiny networks: the DM gradient's identities, losses that
go down, the two time-scale rule counted through the Trainer, where the GAN gradients land,
backward simulation, exact resume, and clear errors for bad options."""

from __future__ import annotations

import json
import random

import pytest
import torch

from kdlib.core.checkpoint import latest_checkpoint
from kdlib.core.config import ConfigError, build
from kdlib.core.data import TensorDataset
from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.core.run_config import TrainConfig
from kdlib.core.trainer import Trainer
from kdlib.diffusion.consistency import ConsistencyModel, default_times
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.samplers import sample
from kdlib.methods.distribution_matching import dm_gradient, frozen, surrogate_loss
from kdlib.methods.dmd import add_ode_pairs
from kdlib.methods.feature_gan import generator_loss
from tests.methods.nets import C, PointMassResidual, PointMassVelocity, TinyNet

FM = get_parameterisation("fm")
GAN = {"gan_layer": "net.1", "gan_channels": 64}  # TinyNet's hidden activations


def _method(name, teacher_net=None, student_net=None, **args):
    cls = METHODS.get(name)
    student = Student(ConsistencyModel(student_net or TinyNet(), FM))
    return cls(cls.Config(**args), student, Teacher(teacher_net or TinyNet()))


def _batch(n=32, seed=0, point_mass=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.full((n, 4), C) if point_mass else 0.5 * torch.randn(n, 4, generator=g) + 0.2
    return {"x": x, "y": torch.randint(0, 3, (n,), generator=g)}


def _student_grads(method):
    return [p.grad for p in method.student.model.parameters()]


def _backward(method, batch, group):
    for module in method.trainable_modules().values():
        module.zero_grad(set_to_none=True)
    loss, stats = method.loss(batch, group)
    loss.backward()
    return loss, stats


def test_surrogate_gradient_is_the_normalised_score_difference():
    """∂L_DM/∂x = (x̂0_fake − x̂0_real) / mean|x − x̂0_real| / numel (DMD eq. 8): descending it moves
    x toward the real score's estimate and away from the fake one's."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, generator=g, requires_grad=True)
    real, fake = torch.randn(3, 5, generator=g), torch.randn(3, 5, generator=g)
    grad = dm_gradient(x.detach(), real, fake)
    loss, _ = surrogate_loss(x, grad)
    loss.backward()
    weight = (x.detach() - real).abs().mean(dim=1, keepdim=True)
    torch.testing.assert_close(x.grad, (fake - real) / weight / x.numel())
    assert ((-x.grad) * (real - fake)).sum() > 0


LORA = {"fake_score": "lora", "lora_rank": 4}


@pytest.mark.parametrize("name,args", [("dmd", {"regression_weight": 0.0}), ("dmd2", {}), ("dmd2", GAN),
                                       ("dmd", {"regression_weight": 0.0, **LORA}), ("dmd2", {**GAN, **LORA})])
def test_dm_gradient_is_zero_when_fake_and_real_scores_agree(name, args):
    """The fake score starts as the teacher (a copy, or a LoRA adapter whose B = 0): with no
    guidance its x̂0 equals the real one's, so L_DM and its gradient into the student are exactly
    zero."""
    torch.manual_seed(0)
    method = _method(name, gen_steps=2, **args)
    _backward(method, _batch(), "student")
    loss, stats = method.dm.loss(method.generator.sample(_batch()["x"], {"y": _batch()["y"]}), {"y": _batch()["y"]})
    assert loss.item() == 0.0 and stats["dm/grad_norm"].item() == 0.0
    if name == "dmd" or not args:  # no GAN term: the student's whole gradient is the DM one
        assert all(g is None or torch.count_nonzero(g) == 0 for g in _student_grads(method))
    # a guided real score (DMD's asymmetric CFG) or a fake score that moved makes it non-zero
    guided = _method(name, guidance=3.0, **args)
    assert guided.dm.loss(guided.generator.sample(_batch()["x"], {"y": _batch()["y"]}), {"y": _batch()["y"]})[0] > 0
    with torch.no_grad():  # only the trainable part: a LoRA fake score shares the teacher's weights
        for p in method.critic.net.parameters():
            if p.requires_grad:
                p.add_(0.05 * torch.randn_like(p))
    assert method.dm.loss(method.generator.sample(_batch()["x"], {"y": _batch()["y"]}), {"y": _batch()["y"]})[0] > 0


def _generator_distance(method, n=512):
    """Mean squared distance of the student's one-step samples to the point mass C."""
    with torch.no_grad():
        x = method.generator.sample(torch.zeros(n, 4), {"y": torch.zeros(n, dtype=torch.long)}, index=0)
    return (x - C).pow(2).mean().item()


def _train_manually(method, steps, lr=3e-3, batch_fn=None):
    optimizers = {g: torch.optim.Adam(m.parameters(), lr=lr) for g, m in method.trainable_modules().items()}
    logged = []
    for step in range(steps):
        for group in method.update_groups(step):
            batch = batch_fn(step) if batch_fn else _batch(64, seed=step, point_mass=True)
            optimizers[group].zero_grad()
            loss, stats = method.loss(batch, group)
            loss.backward()
            optimizers[group].step()
            logged.append({"group": group, "loss": loss.item(), **{k: float(v) for k, v in stats.items()}})
    return logged


def test_dmd2_moves_a_random_generator_onto_the_teacher_distribution():
    """Point-mass data, an exact teacher (whose fake-score copy can learn): DMD2 from a random
    one-step student. Every logged value stays finite and the samples contract onto the teacher's
    point mass (the real score's x̂0 is C everywhere; the fake score learns where the samples are)."""
    torch.manual_seed(0)
    method = _method("dmd2", PointMassResidual(), init_from_teacher=False, critic_updates=2,
                     gan_layer="residual.net.1", gan_channels=64)
    before = _generator_distance(method)
    logged = _train_manually(method, 120)
    assert all(torch.isfinite(torch.tensor(list(v for k, v in r.items() if k != "group"))).all() for r in logged)
    assert _generator_distance(method) < 0.5 * before
    student = [r["loss"] for r in logged if r["group"] == "student"]
    assert len(student) == 60 and {"dm/loss", "gan/generator"} <= set(logged[0])


def test_dmd_regression_loss_goes_down_on_precomputed_teacher_pairs():
    torch.manual_seed(0)
    teacher = Teacher(PointMassResidual())
    data = add_ode_pairs(TensorDataset(**_batch(256, point_mass=True)), teacher, FM, steps=8, sampler="euler")
    # the pairs are the teacher's ODE samples from the stored noise under each row's label
    torch.testing.assert_close(data.tensors["ode_x"][:8], sample(teacher, FM, data.tensors["ode_noise"][:8], 8,
                                                                  cond={"y": data.tensors["y"][:8]}))
    assert torch.allclose(data.tensors["ode_x"], torch.full_like(data.tensors["ode_x"], C), atol=1e-4)
    again = add_ode_pairs(TensorDataset(**_batch(256, point_mass=True)), teacher, FM, steps=8, sampler="euler")
    assert torch.equal(again.tensors["ode_noise"], data.tensors["ode_noise"])

    method = METHODS.get("dmd")(METHODS.get("dmd").Config(init_from_teacher=False),
                                Student(ConsistencyModel(TinyNet(), FM)), teacher)
    g = torch.Generator().manual_seed(1)
    logged = _train_manually(method, 60, batch_fn=lambda step: data.batch(torch.randint(0, 256, (64,), generator=g)))
    regression = [r["dmd/regression"] for r in logged if r["group"] == "student"]
    critic = [r["critic/denoise"] for r in logged if r["group"] == "critic"]
    assert all(torch.isfinite(torch.tensor(regression + critic)))
    assert sum(regression[-10:]) < 0.5 * sum(regression[:10])


def test_dmd_without_pairs_says_how_to_make_them():
    method = _method("dmd")
    with pytest.raises(ValueError, match="add_ode_pairs"):
        method.loss(_batch(), "student")


def _trainer(method, tmp_path, steps, **cfg):
    data = TensorDataset(**_batch(256, seed=3))
    config = TrainConfig(steps=steps, batch_size=32, lr=1e-3, schedule="constant", checkpoint_every=4,
                         log_every=2, progress=False, device="cpu", **cfg)
    return Trainer(method, data, config, stage_dir=tmp_path, seed=0, evaluate=lambda step: {})


def test_two_time_scale_rule_makes_n_critic_updates_per_generator_update(tmp_path):
    torch.manual_seed(0)
    method = _method("dmd2", critic_updates=3, **GAN)
    trainer = _trainer(method, tmp_path, 12)
    updates = []
    for name, optimizer in trainer.optimizers.items():
        optimizer.register_step_post_hook(lambda opt, args, kwargs, name=name: updates.append(name))
    trainer.fit()
    assert updates == ["student", "critic", "critic", "critic"] * 4
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert any("gan/critic_acc" in r for r in records) and any("dm/loss" in r for r in records)


@pytest.mark.parametrize("fake", [{}, LORA])
def test_gan_head_gets_gradients_only_in_the_critic_update(fake):
    """The generator's GAN term reaches the student through the critic (for a LoRA fake score,
    through the teacher's frozen layers) and leaves no gradient on the critic."""
    torch.manual_seed(0)
    method = _method("dmd2", **GAN, **fake)
    batch = _batch()
    flags = [p.requires_grad for p in method.critic.parameters()]
    _, stats = _backward(method, batch, "student")
    assert stats["gan/generator"] > 0
    assert all(p.grad is None for p in method.critic.parameters())  # head and fake score untouched
    assert any(g is not None and torch.count_nonzero(g) > 0 for g in _student_grads(method))
    assert [p.requires_grad for p in method.critic.parameters()] == flags  # frozen() restored them

    _backward(method, batch, "critic")
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in method.critic.head.parameters())
    assert all(g is None for g in _student_grads(method))
    assert all(p.grad is None for p in method.teacher.parameters())


def test_generator_gan_term_pushes_samples_toward_real():
    """A small step on the samples against the generator's GAN loss raises the critic's logits
    (toward "real") at the same noise, for a critic that has learned something."""
    torch.manual_seed(0)
    method = _method("dmd2", **GAN)
    with torch.no_grad():  # a critic head with non-trivial weights
        for p in method.critic.head.parameters():
            p.normal_(0, 0.5)
    x = torch.randn(64, 4, requires_grad=True)
    t, eps = torch.rand(64), torch.randn(64, 4)
    cond = {"y": torch.zeros(64, dtype=torch.long)}

    def logits(x):
        return method.critic.logits(FM, FM.add_noise(x, eps, t), t, cond)

    with frozen(method.critic):
        generator_loss(logits(x)).backward()
    with torch.no_grad():
        assert logits(x - 0.1 * x.grad / x.grad.norm()).mean() > logits(x).mean()


class Recorder(torch.nn.Module):
    """Wraps a network and records every (x, t) it is asked at."""

    parameterisation = "fm"

    def __init__(self, net):
        super().__init__()
        self.net, self.calls = net, []

    def forward(self, x, t, y=None):
        self.calls.append((x.detach().clone(), t.detach().clone()))
        return self.net(x, t, y)


@pytest.mark.parametrize("backward_simulation", [True, False])
def test_backward_simulation_feeds_the_student_its_own_outputs(backward_simulation):
    """A 4-step student whose x̂0 is always C, trained at its last step: with backward simulation it
    is run at t_0, t_1, t_2 first and each next input is its own output C re-noised,
    (x − α·C)/σ ~ N(0, 1); without it, the input is the real data (here −3) noised."""
    torch.manual_seed(0)
    recorder = Recorder(PointMassVelocity())
    method = _method("dmd2", student_net=recorder, gen_steps=4, backward_simulation=backward_simulation,
                     init_from_teacher=False)
    times = default_times(FM, 4)
    data = torch.full((4096, 4), -3.0)
    method.generator.sample(data, {"y": torch.zeros(4096, dtype=torch.long)}, index=3)
    asked = [float(t[0]) for _, t in recorder.calls]
    assert asked == (times if backward_simulation else times[3:])
    x, t = recorder.calls[-1]
    z = (x - (1 - t[:, None]) * C) / t[:, None]
    if backward_simulation:
        assert abs(z.mean()) < 0.05 and abs(z.std() - 1) < 0.05
    else:
        assert z.mean() < -5


@pytest.mark.parametrize("fake", [{}, LORA])
def test_dmd2_kill_and_resume_is_exact(tmp_path, fake):
    """Stopped between checkpoints (step 6, last checkpoint 4) and resumed by a fresh method and
    Trainer: bit-identical to an uninterrupted run (generator, critic with its GAN head, both
    optimizers). A LoRA critic's checkpoint holds its adapters and head, not the teacher."""

    def run(stage, evaluate=None):
        torch.manual_seed(0)
        random.seed(0)  # the few-step generator draws its step index from Python's random
        method = _method("dmd2", critic_updates=3, gen_steps=2, **GAN, **fake)
        trainer = _trainer(method, tmp_path / stage, 12, eval_every=6)
        if evaluate:
            trainer.evaluate = evaluate
        trainer.fit()

    run("full")

    def crash(step):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run("killed", crash)
    assert latest_checkpoint(tmp_path / "killed" / "checkpoints").step == 4
    run("killed")
    full = latest_checkpoint(tmp_path / "full" / "checkpoints")
    resumed = latest_checkpoint(tmp_path / "killed" / "checkpoints")
    assert full.step == resumed.step == 12
    keys = [k for k in full.tensors if k.startswith(("model/", "optim/"))]
    assert any(k.startswith("model/critic/head.") for k in keys) and any(k.startswith("optim/critic") for k in keys)
    critic = {k for k in keys if k.startswith("model/critic/net.")}
    if fake:
        assert critic and all(".lora_" in k for k in critic)
    else:
        assert not any(".lora_" in k for k in critic)
    for k in keys:
        assert torch.equal(full.tensors[k], resumed.tensors[k]), k


def test_unknown_keys_and_bad_values_stop_clearly():
    with pytest.raises(ConfigError, match="critic_updates"):
        build(METHODS.get("dmd2").Config, {"critic_update": 5}, source="recipe mnist-dmd2")
    with pytest.raises(ConfigError, match="regression_weight"):
        build(METHODS.get("dmd").Config, {"regresion_weight": 0.1}, source="recipe x")
    with pytest.raises(ValueError, match="critic_updates must be >= 1"):
        _method("dmd2", critic_updates=0)
    with pytest.raises(ValueError, match="gen_steps"):
        _method("dmd2", gen_steps=0)
    with pytest.raises(ValueError, match="submodules: net, net.0, net.1, net.2"):
        _method("dmd2", gan_layer="blocks.3", gan_channels=64)
    with pytest.raises(ValueError, match="gan_channels"):
        _method("dmd2", gan_layer="net.1", gan_channels=32).loss(_batch(), "critic")
    with pytest.raises(ValueError, match="regression_distance"):
        _method("dmd", regression_distance="lpips")
    with pytest.raises(TypeError, match="ConsistencyModel"):
        cls = METHODS.get("dmd2")
        cls(cls.Config(), Student(TinyNet()), Teacher(TinyNet()))


@pytest.mark.parametrize("name", ["dmd", "dmd2"])
def test_random_guidance_scales_reach_the_real_score_of_dmd_and_dmd2(name):
    """SNOOPI's per-sample scale (``guidance_range``) is a distribution-matching option, not VSD's
    alone: under dmd/dmd2 the real score's scale is drawn per sample in [lo, hi], and the one-point
    range is the fixed-scale path bit for bit."""
    torch.manual_seed(0)
    method = _method(name, guidance_range=[1.5, 3.0])
    scales = method.dm.real_guidance(2048, torch.zeros(2048, 4))
    assert scales.shape == (2048,) and 1.5 <= scales.min() < 1.55 and 2.95 < scales.max() <= 3.0
    fixed, point = _method(name, guidance=2.0), _method(name, guidance_range=[2.0, 2.0])
    point.critic.load_state_dict(fixed.critic.state_dict())
    point.teacher.model.load_state_dict(fixed.teacher.model.state_dict())
    with torch.no_grad():  # a fake score that differs from the teacher's
        for a, b in zip(fixed.critic.parameters(), point.critic.parameters()):
            b.copy_(a.add_(0.1 * torch.randn_like(a)))
    batch = _batch()
    x_t, t = fixed.dm.noised(batch["x"])
    cond = {"y": batch["y"]}
    expected = fixed.dm.gradient(batch["x"], x_t, t, cond)
    assert torch.count_nonzero(expected) > 0
    assert torch.equal(point.dm.gradient(batch["x"], x_t, t, cond), expected)


def test_decoupled_dmd_refuses_a_guidance_range():
    with pytest.raises(ValueError, match="guidance_range is not supported"):
        _method("decoupled_dmd", guidance=3.0, guidance_range=[1.0, 2.0])
    with pytest.raises(ValueError, match="guidance_range must be"):
        _method("dmd2", guidance_range=[2.0, 1.0])
