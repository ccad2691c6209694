import subprocess
import sys
from pathlib import Path

import pytest

from kdlib import _ext
from kdlib.cli import main

ROOT = Path(__file__).resolve().parents[2]


def test_info_reports_the_extension_honestly(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    line = next(l for l in out.splitlines() if l.startswith("kdlib._C"))
    if _ext.native() is None:
        assert "NOT BUILT" in line and "pip install -e ." in out
    else:
        assert "built" in line and ("with CUDA kernels" in line) == _ext.has_cuda_ops()
    assert "torch" in out and ("gpus" in out or "gpu 0" in out)


def test_unknown_key_stops_before_any_work(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["distill", "image", "train.setps=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'train.setps'" in err and "'train.steps'" in err and "default.yaml" in err
    assert not (tmp_path / "runs").exists()


def test_unknown_domain_and_recipe(capsys):
    assert main(["distill", "imag"]) == 2
    assert "did you mean 'image'" in capsys.readouterr().err
    assert main(["distill", "image", "--recipe", "nope"]) == 2
    assert "available: classifier-kd, default, mnist-cd" in capsys.readouterr().err


def test_bench_lists_available_benchmarks(capsys):
    assert main(["bench", "no-such-bench"]) == 2
    assert "no benchmark 'no-such-bench'" in capsys.readouterr().err


def test_bench_resolves_a_unique_prefix(tmp_path, capsys, monkeypatch):
    import kdlib.cli as cli

    for name, code in (("block_sparse_attention", 41), ("ema_update", 42), ("ema_other", 43)):
        (tmp_path / f"{name}.py").write_text(f"def main(argv):\n    print('ran', argv)\n    return {code}\n")
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: tmp_path)
    assert main(["bench", "block-sparse", "--x"]) == 41  # unique prefix
    assert "ran ['--x']" in capsys.readouterr().out
    assert main(["bench", "ema_update"]) == 42  # exact name, underscores or dashes
    assert main(["bench", "ema"]) == 2
    assert "ambiguous: ema-other, ema-update" in capsys.readouterr().err


@pytest.mark.parametrize("cmd", [["resume"], ["eval"]])
def test_resume_and_eval_need_a_run_dir(tmp_path, capsys, cmd):
    assert main([*cmd, str(tmp_path)]) == 2
    assert "not a kdlib run directory" in capsys.readouterr().err


def test_distill_then_eval_end_to_end(tmp_path):
    """A short real run: teacher trained, student distilled and baseline trained, report written,
    and ``kdlib eval`` reproduces the stored results from the run directory alone."""
    # teacher.dtype=bf16: the teacher is distilled from and evaluated in bf16, by the run and by eval
    args = ["seeds=[0,1]", "teacher.train.steps=60", "train.steps=40", "train.eval_every=20",
            "train.progress=false", "teacher.train.progress=false", "teacher.dtype=bf16", "name=e2e"]
    command = [sys.executable, "-m", "kdlib.cli", "distill", "image", "--recipe", "classifier-kd", *args]
    run = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                         env={"PYTHONPATH": str(ROOT), "PATH": ""})
    assert run.returncode == 0, run.stdout + run.stderr
    assert "teacher" in run.stdout and "logit_kd" in run.stdout and "supervised" in run.stdout
    run_dir = tmp_path / "runs/e2e"
    report = (run_dir / "report.md").read_text()
    assert "± " in report and "(n=2)" in report and "plots/loss.png" in report
    assert (run_dir / "plots/loss.png").stat().st_size > 1000
    assert (run_dir / "teacher.safetensors").exists()
    import json

    stored = json.loads((run_dir / "results.json").read_text())
    from kdlib.core.experiment import Experiment

    again = Experiment(run_dir).evaluate_saved()
    assert again["teacher"] == pytest.approx(stored["teacher"], abs=1e-6)
    for method, stats in stored["summary"].items():
        for key, s in stats.items():
            assert again["summary"][method][key]["mean"] == pytest.approx(s["mean"], abs=1e-6), key


def test_overrides_may_follow_the_recipe_option(tmp_path, capsys, monkeypatch):
    """``kdlib distill <domain> --recipe NAME key=value`` (the documented order) reaches the config
    check: a misspelt key after --recipe is reported as a config error, not an argparse error."""
    monkeypatch.chdir(tmp_path)
    assert main(["distill", "image", "--recipe", "classifier-kd", "train.setps=3"]) == 2
    assert "unknown config key 'train.setps'" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["distill", "image", "--recipe", "classifier-kd", "--no-such-flag"])
    assert "unrecognized arguments: --no-such-flag" in capsys.readouterr().err
