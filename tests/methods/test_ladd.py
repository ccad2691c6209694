"""LADD (``ladd``) and SANA-Sprint's sCM + LADD (``scm_ladd``) on tiny networks: the teacher-feature
discriminator's outputs, where gradients land, that the generator's loss pushes toward "real", the
noise-level law, synthetic data, losses that go down, sCM exactly at adversarial weight 0, a
frozen teacher, exact resume and clear errors."""

from __future__ import annotations

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
from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.reparam import ReparameterisedNet
from kdlib.diffusion.samplers import sample
from kdlib.methods.dmd import add_ode_pairs
from kdlib.methods.teacher_discriminator import AdversarialOptions, adversarial_times
from tests.methods.nets import TinyNet

FM, TRIG = get_parameterisation("fm"), get_parameterisation("trigflow")
DISC = {"disc_layers": ["net.0", "net.1"], "disc_channels": [64, 64]}  # TinyNet's hidden pre/post activation


def _ladd(teacher_net=None, student_net=None, **args):
    cls = METHODS.get("ladd")
    student = Student(ConsistencyModel(student_net or TinyNet(), FM))
    return cls(cls.Config(**{**DISC, **args}), student, Teacher(teacher_net or TinyNet()))


def _trig_student(net):
    return Student(ConsistencyModel(ReparameterisedNet(net, FM, TRIG), TRIG))


def _scm_pair(**args):
    """A scm_ladd and an scm method on the same teacher and the same initial student."""
    torch.manual_seed(0)
    teacher = TinyNet()
    cls = METHODS.get("scm_ladd")
    hybrid = cls(cls.Config(**{**DISC, **args}), _trig_student(TinyNet()), Teacher(teacher))
    scm_args = {k: v for k, v in args.items() if k in ("tangent_warmup", "adaptive_weight", "init_from_teacher")}
    scm_cls = METHODS.get("scm")
    scm = scm_cls(scm_cls.Config(**scm_args), _trig_student(TinyNet()), Teacher(teacher))
    scm.student.model.load_state_dict(hybrid.student.model.state_dict())
    if scm.weight is not None:
        scm.weight.load_state_dict(hybrid.weight.state_dict())
    return hybrid, scm


def _batch(n=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"x": 0.5 * torch.randn(n, 4, generator=g) + 0.2, "y": torch.randint(0, 3, (n,), generator=g)}


def _backward(method, batch, group):
    for module in method.trainable_modules().values():
        module.zero_grad(set_to_none=True)
    loss, stats = method.loss(batch, group)
    loss.backward()
    return loss, stats


def _randomise(heads, std=0.5):
    with torch.no_grad():  # heads with non-trivial weights: a discriminator that has learned something
        for p in heads.parameters():
            p.normal_(0, std)


class Recorder(torch.nn.Module):
    """Wraps a network and records every time t it is asked at."""

    parameterisation = "fm"

    def __init__(self, net):
        super().__init__()
        self.net, self.times = net, []

    def forward(self, x, t, y=None):
        self.times.append(t.detach().clone())
        return self.net(x, t, y)


@pytest.mark.parametrize("layers,draws", [(1, 1), (2, 1), (2, 3), (3, 2)])
def test_feature_taps_at_several_noise_levels_give_layers_times_draws_outputs(layers, draws):
    """L layers and M noise levels per sample: L·M logit tensors of [B] from one teacher pass over
    the M·B re-noised states, each sample at M distinct levels."""
    names = ["net.net.0", "net.net.1", "net.net.2"][:layers]  # TinyNet's layers inside the Recorder
    teacher = Recorder(TinyNet())
    method = _ladd(teacher, disc_layers=names, disc_channels=[64, 64, 4][:layers], disc_noise_draws=draws,
                   init_from_teacher=False)
    logits = method.disc.noised_logits(torch.randn(8, 4), {"y": torch.zeros(8, dtype=torch.long)})
    assert len(logits) == layers * draws == method.disc.outputs
    assert all(lg.shape == (8,) for lg in logits)
    assert len(teacher.times) == 1 and teacher.times[0].shape == (8 * draws,)
    per_sample = teacher.times[0].reshape(draws, 8)
    assert draws == 1 or bool((per_sample[0] != per_sample[1]).all())


def test_heads_condition_on_noise_level_and_class():
    method = _ladd(disc_classes=3)
    _randomise(method.disc.heads)
    x, eps = torch.randn(16, 4), torch.randn(16, 4)
    t = torch.full((16,), 0.5)

    def logits(t, y):
        return method.disc.logits(x, {"y": y}, t, eps)[0]

    y = torch.zeros(16, dtype=torch.long)
    base = logits(t, y)
    # the same noisy input seen as another noise level or another class gets other logits
    x_t = FM.add_noise(x, eps, t)
    same_input = method.disc.logits((x_t - 0.3 * eps) / 0.5, {"y": y}, torch.full((16,), 0.3), eps)[0]
    assert not torch.allclose(base, same_input)
    assert not torch.allclose(base, logits(t, torch.full((16,), 2)))
    assert torch.isfinite(logits(t, torch.full((16,), -1))).all()  # the null class
    with pytest.raises(ValueError, match=r"cond\['y'\]"):
        method.disc.logits(x, {}, t, eps)


def test_teacher_frozen_and_heads_get_gradients_only_in_the_discriminator_update():
    torch.manual_seed(0)
    method = _ladd(gen_steps=2)
    _, stats = _backward(method, _batch(), "student")
    assert "adv/generator" in stats
    assert all(p.grad is None for p in method.disc.heads.parameters())
    assert all(p.grad is None and not p.requires_grad for p in method.teacher.model.parameters())
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in method.student.model.parameters())
    assert all(p.requires_grad for p in method.disc.heads.parameters())  # frozen() restored them

    _backward(method, _batch(), "discriminator")
    assert all(p.grad is not None for p in method.disc.heads.parameters())
    assert all(any(torch.count_nonzero(p.grad) > 0 for p in head.parameters()) for head in method.disc.heads)
    assert all(p.grad is None for p in method.student.model.parameters())
    assert all(p.grad is None for p in method.teacher.model.parameters())


@pytest.mark.parametrize("loss", ["hinge", "non_saturating"])
def test_generator_adversarial_loss_pushes_samples_toward_real(loss):
    """A small step on the samples against the generator's loss raises every head's logits (toward
    "real") at the same noise, for a discriminator that has learned something."""
    torch.manual_seed(0)
    method = _ladd(disc_loss=loss, disc_noise_draws=2)
    _randomise(method.disc.heads)
    x = torch.randn(64, 4, requires_grad=True)
    t, eps = torch.rand(64), torch.randn(64, 4)
    cond = {"y": torch.zeros(64, dtype=torch.long)}
    torch.manual_seed(1)
    gen_loss, _ = method.disc.generator_loss(x, cond)
    gen_loss.backward()
    step = x - 0.05 * x.grad / x.grad.norm()
    with torch.no_grad():
        before = method.disc.logits(x, cond, t, eps)
        after = method.disc.logits(step, cond, t, eps)
    assert all(a.mean() > b.mean() for a, b in zip(after, before))


def test_discriminator_warmup_then_n_discriminator_updates_per_generator_update():
    method = _ladd(disc_warmup=3, disc_updates=2)
    d, both = ["discriminator"], ["student", "discriminator"]
    assert [method.update_groups(k) for k in range(8)] == [d, d, d, both, d, both, d, both]
    # scm_ladd: the student trains by sCM alone during the warm-up, then with the adversarial term
    hybrid, _ = _scm_pair(disc_warmup=2, tangent_warmup=0)
    assert [hybrid.update_groups(k) for k in range(4)] == [both, both, both, both]
    hybrid.update_groups(1)
    assert "adv/generator" not in hybrid.loss(_batch(), "student")[1]
    hybrid.update_groups(2)
    assert "adv/generator" in hybrid.loss(_batch(), "student")[1]


def test_noise_level_law_is_ladds_logit_normal_in_the_rectified_flow_time():
    """disc_time=logit_normal (m, s) draws τ with logit τ ~ N(m, s²), converted exactly to the
    teacher's t (fm: t = τ; TrigFlow: the t with the same σ/α); shift scales σ/α."""
    torch.manual_seed(0)
    o = AdversarialOptions(disc_time_mean=1.0, disc_time_std=1.0)
    t = adversarial_times(FM, 200_000, o)
    logit = torch.log(t / (1 - t))
    assert abs(float(logit.mean()) - 1.0) < 0.02 and abs(float(logit.std()) - 1.0) < 0.02
    torch.manual_seed(0)
    trig = adversarial_times(TRIG, 200_000, o)
    torch.testing.assert_close(TRIG.ratio(trig), FM.ratio(t), rtol=1e-4, atol=1e-4)
    torch.manual_seed(0)
    shifted = adversarial_times(FM, 200_000, AdversarialOptions(disc_time_shift=3.0))
    torch.testing.assert_close(FM.ratio(shifted), 3 * FM.ratio(t), rtol=1e-3, atol=1e-3)
    uniform = adversarial_times(FM, 100_000, AdversarialOptions(disc_time="uniform"))
    assert abs(float(uniform.mean()) - 0.5) < 0.01


def test_real_samples_are_data_or_the_teachers_own():
    torch.manual_seed(0)
    batch = _batch(16)
    cond = {"y": batch["y"]}
    data = _ladd(real="data")
    assert torch.equal(data.disc.real_samples(batch["x"], cond), batch["x"])
    synthetic = _ladd(real="teacher", teacher_steps=6, teacher_sampler="heun")
    torch.manual_seed(3)
    got = synthetic.disc.real_samples(batch["x"], cond)
    torch.manual_seed(3)
    want = sample(synthetic.teacher, FM, torch.randn(16, 4), 6, "heun", cond=cond)
    assert torch.equal(got, want)
    # precomputed pairs (dmd.add_ode_pairs) are used as they are, and are no condition of the networks
    pairs = add_ode_pairs(TensorDataset(**batch), synthetic.teacher, FM, steps=4, sampler="euler").tensors
    assert torch.equal(synthetic.disc.real_samples(batch["x"], cond, {"ode_x": pairs["ode_x"]}), pairs["ode_x"])
    for group in ("student", "discriminator"):
        loss, _ = synthetic.loss(pairs, group)
        assert torch.isfinite(loss)


def test_discriminator_and_generator_losses_go_down():
    """Each side against a fixed other: the discriminator learns to tell the data from a fixed
    student's samples, and the student then lowers its adversarial loss against the fixed heads."""
    torch.manual_seed(0)
    # low noise levels (logit-normal around t ≈ 0.12): the random tiny teacher's features still see the samples
    method = _ladd(init_from_teacher=False, disc_noise_draws=2, disc_time_mean=-2.0, disc_time_std=0.5)
    batch = _batch(256, seed=2)

    def run(group, steps, lr=3e-3):
        optimizer = torch.optim.Adam(method.trainable_modules()[group].parameters(), lr=lr)
        losses = []
        for step in range(steps):
            torch.manual_seed(step % 4)
            loss, stats = method.loss(batch, group)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
        assert all(torch.isfinite(torch.tensor(losses)))
        return losses, stats

    d_losses, stats = run("discriminator", 150)
    assert sum(d_losses[-8:]) < 0.7 * sum(d_losses[:8]) and stats["adv/disc_acc"] > 0.7
    g_losses, _ = run("student", 100)
    assert sum(g_losses[-8:]) < sum(g_losses[:8]) - 0.5 * 8


def test_ladd_distillation_term():
    torch.manual_seed(0)
    method = _ladd(distill_weight=0.5)
    _, stats = _backward(method, _batch(), "student")
    assert stats["ladd/distill"] >= 0 and "adv/generator" in stats
    # a student equal to the teacher, one step from noise: its x̂0 is the teacher's, re-noised
    # and denoised again it is not — the term is a real regression signal, finite and positive
    assert torch.isfinite(stats["ladd/distill"]) and stats["ladd/distill"] > 0


def test_scm_ladd_at_adversarial_weight_zero_is_scm_bit_for_bit(tmp_path):
    hybrid, scm = _scm_pair(adv_weight=0.0, tangent_warmup=2)
    for step in (0, 3):
        assert hybrid.update_groups(step) == ["student"] == scm.update_groups(step)
        results = []
        for method in (hybrid, scm):
            _backward(method, _batch(), "student")  # warm the modules identically
            torch.manual_seed(5)
            loss, stats = _backward(method, _batch(), "student")
            results.append((loss.detach(), [p.grad.clone() for p in method.student.model.parameters()],
                            [p.grad.clone() for p in method.weight.parameters()]))
        (la, ga, wa), (lb, gb, wb) = results
        assert torch.equal(la, lb) and all(torch.equal(a, b) for a, b in zip(ga + wa, gb + wb))

    # building the discriminator heads leaves the global random state as sCM's construction does
    draws = []
    for name, args in (("scm_ladd", {**DISC, "adv_weight": 0.0}), ("scm", {})):
        cls, nets = METHODS.get(name), (TinyNet(), TinyNet())
        torch.manual_seed(7)
        cls(cls.Config(**args), _trig_student(nets[0]), Teacher(nets[1]))
        draws.append(torch.rand(3))
    assert torch.equal(*draws)

    # and through the Trainer: the same student weights after a short run
    def train(method, stage):
        torch.manual_seed(1)
        data = TensorDataset(**_batch(128, seed=4))
        cfg = TrainConfig(steps=6, batch_size=32, lr=1e-3, checkpoint_every=6, log_every=2, progress=False,
                          device="cpu")
        Trainer(method, data, cfg, stage_dir=tmp_path / stage, seed=0).fit()
        return method.student.model.state_dict()

    hybrid, scm = _scm_pair(adv_weight=0.0, tangent_warmup=2)
    a, b = train(hybrid, "hybrid"), train(scm, "scm")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_scm_ladd_adds_the_weighted_adversarial_term():
    hybrid, scm = _scm_pair(adv_weight=0.5, tangent_warmup=0, adaptive_weight=False, disc_updates=2)
    hybrid.update_groups(1), scm.update_groups(1)
    torch.manual_seed(5)
    loss_h, stats = hybrid.loss(_batch(), "student")
    torch.manual_seed(5)
    loss_s, _ = scm.loss(_batch(), "student")
    assert loss_h.item() == pytest.approx(loss_s.item() + 0.5 * stats["adv/generator"].item(), rel=1e-5, abs=1e-7)
    assert [hybrid.update_groups(k) for k in range(4)] == [
        ["student", "discriminator"], ["discriminator"], ["student", "discriminator"], ["discriminator"]]
    _backward(hybrid, _batch(), "discriminator")
    assert all(p.grad is not None for p in hybrid.disc.heads.parameters())
    assert all(p.grad is None for p in hybrid.student.model.parameters())


def _trainer(method, tmp_path, steps, **cfg):
    data = TensorDataset(**_batch(256, seed=3))
    config = TrainConfig(steps=steps, batch_size=32, lr=1e-3, schedule="constant", checkpoint_every=4,
                         log_every=2, progress=False, device="cpu", **cfg)
    return Trainer(method, data, config, stage_dir=tmp_path, seed=0, evaluate=lambda step: {})


@pytest.mark.parametrize("name", ["ladd", "scm_ladd"])
def test_kill_and_resume_is_exact_and_the_teacher_never_changes(tmp_path, name):
    """Stopped between checkpoints (step 6, last checkpoint 4) and resumed by a fresh method and
    Trainer: bit-identical to an uninterrupted run (student, heads, optimizers); the teacher's
    weights are bit-identical to what they were before training."""

    def run(stage, evaluate=None):
        torch.manual_seed(0)
        random.seed(0)  # LADD draws its generator step index from Python's random
        if name == "ladd":
            method = _ladd(gen_steps=2, disc_updates=2, real="teacher", teacher_steps=3, disc_classes=3)
        else:
            method, _ = _scm_pair(tangent_warmup=2, disc_updates=2, disc_noise_draws=2)
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
    assert any(k.startswith("model/discriminator/0.") for k in keys)
    assert not any(k.startswith("model/discriminator/") and "net." in k for k in keys)  # no teacher weights
    for k in keys:
        assert torch.equal(full.tensors[k], resumed.tensors[k]), k


def test_unknown_keys_and_bad_values_stop_clearly():
    with pytest.raises(ConfigError, match="disc_layers"):
        build(METHODS.get("ladd").Config, {"disc_layer": ["net.1"]}, source="recipe mnist-ladd")
    with pytest.raises(ConfigError, match="adv_weight"):
        build(METHODS.get("scm_ladd").Config, {"adv_weigth": 0.5}, source="recipe mnist-scm-ladd")
    with pytest.raises(ValueError, match="disc_layers must name at least one"):
        _ladd(disc_layers=[], disc_channels=[])
    with pytest.raises(ValueError, match="one channel count per disc_layers"):
        _ladd(disc_channels=[64])
    with pytest.raises(ValueError, match="disc_layers 'blocks.3' is not a submodule of the teacher network"):
        _ladd(disc_layers=["blocks.3"], disc_channels=[64])
    with pytest.raises(ValueError, match="disc_channels"):
        _ladd(disc_layers=["net.1"], disc_channels=[32]).loss(_batch(), "discriminator")
    with pytest.raises(ValueError, match="disc_loss must be one of hinge, non_saturating"):
        _ladd(disc_loss="wgan")
    with pytest.raises(ValueError, match="real must be one of data, teacher"):
        _ladd(real="ema")
    with pytest.raises(ValueError, match="disc_time must be one of"):
        _ladd(disc_time="lognormal")
    with pytest.raises(ValueError, match="disc_updates"):
        _ladd(disc_updates=0)
    with pytest.raises(ValueError, match="adv_weight"):
        _scm_pair(adv_weight=-1.0)
    with pytest.raises(ValueError, match="ConsistencyModel in 'fm'"):
        cls = METHODS.get("ladd")
        cls(cls.Config(**DISC), Student(TinyNet()), Teacher(TinyNet()))
