"""The Trainer with several parameter groups (DMD2-like: a generator "student" and a "critic", with
N critic updates per generator update): global-step LR schedules, EMA on student steps only,
per-group learning rates, the bind_wrapped hook, and exact resume (in-process crash and SIGKILL)."""

import math
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from kdlib.core.checkpoint import latest_checkpoint
from kdlib.core.config import ConfigError
from kdlib.core.method import Method, register_method
from kdlib.core.models import Student
from kdlib.core.run_config import check_train
from kdlib.core.trainer import Trainer
from tests.core.toy import toy_data, toy_model, toy_train_config

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class _TwoGroupConfig:
    critic_updates: int = 3


@register_method("test_two_groups")
class TwoGroups(Method):
    """A student and a critic, each a classifier of the toy data; the student every N-th step
    (first), the critic every step."""

    Config = _TwoGroupConfig
    needs_teacher = False

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        self.critic = toy_model()
        self.bound: list[tuple[str, torch.nn.Module]] = []

    def trainable_modules(self):
        return {"student": self.student.model, "critic": self.critic}

    def update_groups(self, step):
        return [*(["student"] if step % self.config.critic_updates == 0 else []), "critic"]

    def bind_wrapped(self, name, module):
        self.bound.append((name, module))

    def loss(self, batch, group):
        net = self.student if group == "student" else self.critic
        return torch.nn.functional.cross_entropy(net(batch["x"]), batch["y"]), {}


def _trainer(stage_dir, steps=12, augment=None, **cfg):
    torch.manual_seed(0)
    method = TwoGroups(_TwoGroupConfig(), Student(toy_model(), ema_decays=[0.9]), None)
    return Trainer(method, toy_data(), toy_train_config(steps=steps, **cfg), stage_dir=stage_dir, seed=3,
                   augment=augment)


def _record_lrs(trainer):
    """(global step, lr) of every optimizer step, per group."""
    seen = {g: [] for g in trainer.optimizers}
    for g, opt in trainer.optimizers.items():
        opt.register_step_pre_hook(
            lambda o, args, kwargs, _g=g: seen[_g].append((trainer.step, o.param_groups[0]["lr"]))
        )
    return seen


def _factor(step, steps, warmup):
    if step < warmup:
        return (step + 1) / warmup
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, (step - warmup) / (steps - warmup))))


def test_lr_schedules_follow_the_global_step(tmp_path):
    t = _trainer(tmp_path, steps=12, warmup_steps=2, schedule="cosine", group_lr={"critic": 2e-3})
    seen = _record_lrs(t)
    t.fit()
    assert [s for s, _ in seen["student"]] == [0, 3, 6, 9]
    assert [s for s, _ in seen["critic"]] == list(range(12))
    for s, lr in seen["student"]:
        assert lr == pytest.approx(0.01 * _factor(s, 12, 2), rel=1e-12, abs=1e-15), s
    for s, lr in seen["critic"]:
        assert lr == pytest.approx(2e-3 * _factor(s, 12, 2), rel=1e-12, abs=1e-15), s
    # both schedules reach their end together; update counts are still each group's own
    assert t.schedules["student"].get_last_lr()[0] == pytest.approx(0.01 * _factor(10, 12, 2))
    assert t.schedules["critic"].get_last_lr()[0] == pytest.approx(0.0, abs=1e-15)
    assert [t.schedules[g].last_epoch for g in ("student", "critic")] == [4, 12]


def test_ema_moves_only_on_student_steps(tmp_path):
    t = _trainer(tmp_path, steps=9, checkpoint_every=100)
    snapshots = []
    groups = t.method.update_groups

    def snapshot(step):  # the EMA as it stands when step `step` begins
        snapshots.append({k: v.clone() for k, v in t.method.student.ema[0].state_dict().items()})
        return groups(step)

    t.method.update_groups = snapshot
    t.fit()
    snapshots.append(t.method.student.ema[0].state_dict())
    changed = [s for s in range(9) if any(not torch.equal(snapshots[s][k], snapshots[s + 1][k]) for k in snapshots[s])]
    assert changed == [0, 3, 6]


def test_group_lr_applies_and_bad_names_are_refused(tmp_path):
    t = _trainer(tmp_path / "ok", group_lr={"critic": 2e-5})
    assert [g["initial_lr"] for g in t.optimizers["critic"].param_groups] == [2e-5]
    assert [g["initial_lr"] for g in t.optimizers["student"].param_groups] == [0.01]
    with pytest.raises(ValueError, match=r"'critc'.*groups are: 'student', 'critic'"):
        _trainer(tmp_path / "bad", group_lr={"critc": 2e-5})
    # from a recipe: YAML's "2e-5" string is read as a number; non-positive values are refused
    cfg = toy_train_config(group_lr={"critic": "2e-5"})
    check_train("train", cfg, "recipe x")
    assert cfg.group_lr == {"critic": 2e-5}
    with pytest.raises(ConfigError, match="train.group_lr.critic must be a number > 0"):
        check_train("train", toy_train_config(group_lr={"critic": 0}), "recipe x")


def test_bind_wrapped_is_called_for_every_group(tmp_path):
    t = _trainer(tmp_path)
    assert [name for name, _ in t.method.bound] == ["student", "critic"]
    for name, module in t.method.bound:
        assert module is t.wrapped[name]  # in one process: the module itself


def _checkpoint_state(stage_dir):
    found = latest_checkpoint(Path(stage_dir) / "checkpoints")
    return found.step, found.tensors, found.meta


def _assert_same_end(a_dir, b_dir):
    step_a, a, meta_a = _checkpoint_state(a_dir)
    step_b, b, meta_b = _checkpoint_state(b_dir)
    assert step_a == step_b
    compared = [k for k in a if k.startswith(("model/", "ema/", "optim/"))]
    assert any(k.startswith("model/critic/") for k in compared) and any(k.startswith("ema/") for k in compared)
    assert a.keys() == b.keys()
    for k in compared:
        assert torch.equal(a[k], b[k]), k
    assert meta_a["schedules"] == meta_b["schedules"]


def test_crash_then_resume_is_bit_identical(tmp_path):
    _trainer(tmp_path / "full", steps=30, grad_accum=2, warmup_steps=3).fit()
    part = _trainer(tmp_path / "part", steps=30, grad_accum=2, warmup_steps=3)
    guard = part._guard

    def crash_at_25(skipped, logged):  # 5 steps after the checkpoint at step 20 (a critic-only step)
        guard(skipped, logged)
        if part.step == 25:
            raise KeyboardInterrupt

    part._guard = crash_at_25
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed = _trainer(tmp_path / "part", steps=30, grad_accum=2, warmup_steps=3)
    assert resumed.restore() and resumed.step == 20
    resumed.fit()
    _assert_same_end(tmp_path / "full", tmp_path / "part")


STEPS = 200


def _slow(batch):  # identity: only slows the victim down so that it is killed mid-run
    time.sleep(0.002)
    return batch


def test_sigkill_then_resume_is_bit_identical(tmp_path):
    _trainer(tmp_path / "full", steps=STEPS, warmup_steps=5).fit()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    victim = subprocess.Popen([sys.executable, "-m", "tests.core.test_multi_group", str(tmp_path / "killed")],
                              cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    checkpoints = tmp_path / "killed" / "checkpoints"
    deadline = time.time() + 120
    while not (checkpoints / "step-00000040").exists():
        assert victim.poll() is None, victim.communicate()[0].decode()[-3000:]
        assert time.time() < deadline, "the run never reached its step-40 checkpoint"
        time.sleep(0.01)
    victim.send_signal(signal.SIGKILL)
    victim.wait()
    assert latest_checkpoint(checkpoints).step < STEPS, "killed too late to test anything"
    _trainer(tmp_path / "killed", steps=STEPS, warmup_steps=5).fit()
    _assert_same_end(tmp_path / "full", tmp_path / "killed")


if __name__ == "__main__":  # the victim of the SIGKILL test
    torch.set_num_threads(1)
    _trainer(sys.argv[1], steps=STEPS, warmup_steps=5, augment=_slow).fit()
