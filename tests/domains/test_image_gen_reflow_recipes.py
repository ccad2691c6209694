"""The reflow-family MNIST recipes (mnist-reflow, mnist-slimflow) run end to end on a tiny budget and
report a Fréchet distance; the students keep their Euler sampler in the checkpoint, and SlimFlow's
smaller student is built from model.student_hidden/student_blocks with its guide checkpointed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("mlxtend")

from safetensors.torch import load_file  # noqa: E402

from kdlib.cli import main  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("recipe,method,extra", [
    ("mnist-reflow", "reflow", []),
    # 2 annealing-reflow steps, then flow-guided distillation: both phases run
    ("mnist-slimflow", "slimflow", ["method_args.reflow_steps=2", "method_args.anneal_steps=1"]),
])
def test_recipe_smoke_run(tmp_path, recipe, method, extra):
    rc = main(["distill", "image-gen", "--recipe", recipe, f"runs_dir={tmp_path}", "name=tiny", "seeds=[0]",
               "baseline=false", "train.steps=3", "train.batch_size=16", "train.progress=false",
               "model.eval_samples=40", "model.teacher_steps=[1]", "model.student_steps=[1,2]",
               "method_args.teacher_steps=2", *extra])
    assert rc == 0
    run = tmp_path / "tiny"
    results = json.loads((run / "results.json").read_text())
    final = results["seeds"][method]["0"]
    assert 0 < final["test/student/fd_digits_1step"] < float("inf")
    assert "student (" + method + ")" in (run / "report.md").read_text()
    checkpoint = next((run / "stages" / f"seed0-{method}" / "checkpoints").glob("step-*"))
    tensors = load_file(checkpoint / "tensors.safetensors")
    assert int(tensors["model/student/segments"]) == 1  # samples with Euler steps after a reload
    if method == "slimflow":
        assert int(tensors["method/rank0/guide/taken"]) == 1
        assert results["params"]["student"] < 0.25 * results["params"]["teacher"]


def test_multi_stage_recipe_hands_the_reflow_student_to_dmd2(tmp_path):
    """mnist-reflow-dmd2: both stages run, in order, and the DMD2 stage starts from the reflow
    stage's final student (not from the teacher, DMD2's own initialisation)."""
    from kdlib.core.checkpoint import latest_checkpoint

    args = ["distill", "image-gen", "--recipe", "mnist-reflow-dmd2", f"runs_dir={tmp_path}", "name=tiny",
            "seeds=[0]", "baseline=false", "train.steps=2", "train.batch_size=16", "train.progress=false",
            "train.checkpoint_every=1", "model.eval_samples=40", "model.teacher_steps=[1]", "model.student_steps=[1]",
            "stages.0.train.steps=3", "stages.0.method_args.teacher_steps=2"]
    assert main(args) == 0
    stages = tmp_path / "tiny" / "stages"
    reflow = latest_checkpoint(stages / "seed0-reflow" / "checkpoints")
    first_dmd2 = min((stages / "seed0-dmd2" / "checkpoints").glob("step-*"))
    assert reflow.step == 3 and first_dmd2.name.startswith("step-")
    results = json.loads((tmp_path / "tiny" / "results.json").read_text())
    assert set(results["seeds"]) == {"reflow", "dmd2"}
    # One Adam step after the hand-over, the DMD2 student is much nearer the reflow student than
    # the teacher (where DMD2's own init_from_teacher would have put it; reflow moved 3 steps away).
    teacher = load_file(ROOT / "domains" / "image" / "assets" / "mnist_fm_teacher.safetensors")
    dmd2 = load_file(first_dmd2 / "tensors.safetensors")
    keys = [k for k in teacher if f"model/student/net.{k}" in dmd2]
    assert len(keys) == len(teacher)

    def distance(a, b):
        return sum((a[f"model/student/net.{k}"] - b[k]).abs().sum().item() for k in keys)

    to_reflow = distance(dmd2, {k: reflow.tensors[f"model/student/net.{k}"] for k in keys})
    assert 0 < to_reflow < 0.5 * distance(dmd2, teacher)
