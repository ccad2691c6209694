"""``teacher.dtype=bf16``: the distribution-matching recipes run on CPU with the frozen teacher in
bf16 while everything that trains stays fp32 master weights: the student, its EMA copy, the fake
score (a full copy for mnist-dmd2; only the LoRA adapters for mnist-vsd, whose shared base is the
teacher's bf16 weights) and every optimizer state."""

from __future__ import annotations

import json

import pytest
import torch

pytest.importorskip("mlxtend")

import kdlib.core.experiment as experiment  # noqa: E402
from kdlib.cli import main  # noqa: E402
from kdlib.methods.lora_score import LoRAFakeScore  # noqa: E402


def _dtypes(tensors) -> set[torch.dtype]:
    return {t.dtype for t in tensors if t.is_floating_point()}


@pytest.mark.parametrize("recipe,method", [("mnist-dmd2", "dmd2"), ("mnist-vsd", "vsd")])
def test_bf16_teacher_with_fp32_student_ema_fake_score_and_optimizer(tmp_path, monkeypatch, recipe, method):
    trainers = []

    class Recorded(experiment.Trainer):
        def fit(self):
            trainers.append(self)
            return super().fit()

    monkeypatch.setattr(experiment, "Trainer", Recorded)
    rc = main(["distill", "image", "--recipe", recipe, f"runs_dir={tmp_path}", "name=bf16", "seeds=[0]",
               "baseline=false", "teacher.dtype=bf16", "train.steps=3", "train.batch_size=16",
               "train.ema_decays=[0.9]", "method_args.critic_updates=2", "train.progress=false",
               "model.eval_samples=40", "model.teacher_steps=[1]", "model.student_steps=[1]"])
    assert rc == 0
    (trainer,) = trainers
    m = trainer.method
    assert trainer.step == 3
    assert _dtypes(m.teacher.model.parameters()) == {torch.bfloat16}
    assert _dtypes(m.student.model.parameters()) == {torch.float32}
    assert _dtypes(p for ema in m.student.ema for p in ema.parameters()) == {torch.float32}
    trained = [p for p in m.critic.parameters() if p.requires_grad]
    assert trained and _dtypes(trained) == {torch.float32}
    if method == "vsd":  # LoRA: the fake score's base is the teacher's own bf16 tensors
        assert isinstance(m.critic.net, LoRAFakeScore)
        teacher_tensors = {id(p) for p in m.teacher.model.parameters()}
        frozen = [p for p in m.critic.parameters() if not p.requires_grad]
        assert frozen and all(id(p) in teacher_tensors for p in frozen) and _dtypes(frozen) == {torch.bfloat16}
        assert all(".lora_" in name for name, p in m.critic.named_parameters() if p.requires_grad)
    else:  # a full copy of the teacher, trained, in fp32
        assert not any(p.requires_grad is False for p in m.critic.parameters())
    for group, optimizer in trainer.optimizers.items():
        params = [p for g in optimizer.param_groups for p in g["params"]]
        assert _dtypes(params) == {torch.float32}, group
        states = [v for p in params for v in optimizer.state[p].values() if torch.is_tensor(v)]
        assert states, f"{group} took no optimizer step"
        assert _dtypes(states) == {torch.float32}, group
    # the bf16 teacher was evaluated too (its bare network on the fp32 sampler), and the students are digits
    results = json.loads((tmp_path / "bf16" / "results.json").read_text())
    assert 0 < results["teacher"]["test/teacher/fd_digits_1step"] < float("inf")
    final = results["seeds"][method]["0"]
    assert final["test/student/class_acc_1step"] > 0.3 and final["test/ema0.9/class_acc_1step"] > 0.3
    assert 0 < final["test/student/fd_digits_1step"] < float("inf")
