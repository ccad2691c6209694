"""The reflow-family MNIST recipes (mnist-reflow, mnist-slimflow) run end to end on a tiny budget and
report a Fréchet distance; the students keep their Euler sampler in the checkpoint, and SlimFlow's
smaller student is built from model.student_hidden/student_blocks with its guide checkpointed."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mlxtend")

from safetensors.torch import load_file  # noqa: E402

from kdlib.cli import main  # noqa: E402


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
        assert int(tensors["model/slimflow_guide/taken"]) == 1
        assert results["params"]["student"] < 0.25 * results["params"]["teacher"]
