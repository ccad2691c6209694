import json
from dataclasses import dataclass

import pytest
import torch

from kdlib.core import checkpoint as ckpt
from kdlib.core.method import Method, register_method
from kdlib.core.models import Student
from kdlib.core.trainer import NonFiniteError, Trainer
from tests.core.toy import toy_data, toy_model, toy_train_config


def _trainer(tmp_path, method_name="supervised", steps=40, ema=(0.9,), **cfg):
    from kdlib.core.method import METHODS

    torch.manual_seed(0)
    student = Student(toy_model(), ema_decays=list(ema))
    cls = METHODS.get(method_name)
    method = cls(cls.Config(), student, None)
    return Trainer(method, toy_data(), toy_train_config(steps=steps, **cfg), stage_dir=tmp_path, seed=3)


def _params(trainer):
    return {k: v.clone() for k, v in trainer.method.student.state_dict().items()}


def test_loss_goes_down_and_is_logged(tmp_path):
    t = _trainer(tmp_path, steps=60)
    t.fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    losses = [r["student/loss"] for r in records if "student/loss" in r]
    assert len(losses) == 12 and losses[-1] < 0.6 * losses[0]
    assert (tmp_path / "tensorboard").is_dir()


def test_resume_is_bit_identical(tmp_path):
    full = _trainer(tmp_path / "full", steps=40, grad_accum=2)
    full.fit()
    part = _trainer(tmp_path / "part", steps=40, grad_accum=2)
    guard = part._guard

    def crash_at_25(skipped, logged):  # dies mid-run, 5 steps after the checkpoint at step 20
        guard(skipped, logged)
        if part.step == 25:
            raise KeyboardInterrupt

    part._guard = crash_at_25
    with pytest.raises(KeyboardInterrupt):
        part.fit()
    resumed = _trainer(tmp_path / "part", steps=40, grad_accum=2)
    assert resumed.restore() and resumed.step == 20
    resumed.fit()
    a, b = _params(full), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # the metrics log reads as one uninterrupted run
    steps = [json.loads(line)["step"] for line in (tmp_path / "part" / "metrics.jsonl").read_text().splitlines()
             if "student/loss" in line]
    assert steps == sorted(set(steps))


def test_resume_uses_previous_checkpoint_when_latest_is_corrupt(tmp_path):
    t = _trainer(tmp_path, steps=30)
    t.fit()
    latest = ckpt.list_checkpoints(tmp_path / "checkpoints")[-1]
    (latest / ckpt.TENSORS).write_bytes(b"\0" * 64)
    again = _trainer(tmp_path, steps=30)
    with pytest.warns(RuntimeWarning, match="falling back to the previous checkpoint"):
        assert again.restore()
    assert again.step == 20


@dataclass
class _NaNConfig:
    nan_steps: list[int]


@register_method("test_nan_injector")
class NaNInjector(Method):
    """Supervised loss, but NaN at the steps listed (counted by calls)."""

    Config = _NaNConfig
    needs_teacher = False

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        self.calls = 0

    def loss(self, batch, group):
        loss = torch.nn.functional.cross_entropy(self.student(batch["x"]), batch["y"])
        self.calls += 1
        return (loss * float("nan") if self.calls - 1 in self.config.nan_steps else loss), {}


def _nan_trainer(tmp_path, nan_steps, **cfg):
    torch.manual_seed(0)
    student = Student(toy_model(), ema_decays=[0.9])
    method = NaNInjector(_NaNConfig(nan_steps), student, None)
    return Trainer(method, toy_data(), toy_train_config(**cfg), stage_dir=tmp_path, seed=0)


def test_nan_step_is_skipped_and_logged(tmp_path):
    t = _nan_trainer(tmp_path, nan_steps=[3], steps=6, checkpoint_every=100, log_every=1)
    before = {}

    original = t._update

    def spy(group):
        before[t.step] = _params(t)
        return original(group)

    t._update = spy
    with pytest.warns(RuntimeWarning, match="step 4 had a non-finite loss"):
        t.fit()
    after_skip = before[4]
    for k, v in before[3].items():  # the update at step index 3 changed nothing
        assert torch.equal(v, after_skip[k]), k
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r.get("nonfinite_skipped")] == [4]
    assert all(torch.isfinite(v).all() for v in _params(t).values())


def test_too_many_nonfinite_steps_abort_without_bad_checkpoint(tmp_path):
    t = _nan_trainer(tmp_path, nan_steps=list(range(5, 40)), steps=40, checkpoint_every=2, max_nonfinite_steps=3)
    with pytest.warns(RuntimeWarning), pytest.raises(NonFiniteError, match="3 consecutive steps"):
        t.fit()
    found = ckpt.latest_checkpoint(tmp_path / "checkpoints")
    assert found is not None and found.step <= 8
    assert all(torch.isfinite(v).all() for v in found.tensors.values() if v.is_floating_point())


def test_ema_tracks_formula(tmp_path):
    t = _trainer(tmp_path, steps=1, ema=(0.5,), checkpoint_every=100)
    start = {k: v.clone() for k, v in t.method.student.model.state_dict().items()}
    t.fit()
    now = t.method.student.model.state_dict()
    ema = t.method.student.ema[0].state_dict()
    for k in start:
        assert torch.allclose(ema[k], 0.5 * start[k] + 0.5 * now[k], atol=1e-6), k
