"""benchmarks/image_paired_table.py: the table's rows come from each run's results.json (teacher
from the run that evaluated the most step counts, students as mean ± std over seeds), a recipe
that has not run is listed as missing, and every recipe it names is shipped."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _table():
    spec = importlib.util.spec_from_file_location("image_paired_table", ROOT / "benchmarks" / "image_paired_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _results(teacher_steps, fd):
    teacher = {f"test/teacher/{m}_{n}step": float(n) for n in teacher_steps
               for m in ("fd_digits", "recall", "latency_ms")}
    student = {f"test/student/{m}_{n}step": {"mean": fd * n, "std": 0.5, "n": 3}
               for n in (1, 2, 4) for m in ("fd_digits", "recall", "latency_ms")}
    return {"teacher": teacher, "summary": {"dmd2": student}}


def test_every_listed_recipe_is_shipped():
    table = _table()
    for recipe, family, _ in table.RECIPES:
        assert (table.RECIPE_DIR / f"{recipe}.yaml").exists(), recipe
        assert family in ("consistency", "distribution matching", "adversarial", "reflow", "multi-stage")


def test_collect_builds_rows_from_results_and_names_what_is_missing(tmp_path, monkeypatch, capsys):
    table = _table()
    for recipe, steps, fd in [("mnist-dmd2", [50, 10, 1], 10.0), ("mnist-vsd", [1], 20.0)]:
        (tmp_path / recipe).mkdir()
        (tmp_path / recipe / "results.json").write_text(json.dumps(_results(steps, fd)))
    out = tmp_path / "table.json"
    monkeypatch.setattr(sys, "argv", ["x", "--collect-only", "--runs-dir", str(tmp_path), "--json", str(out),
                                      "--recipes", "mnist-dmd2", "mnist-vsd", "mnist-cd"])
    assert table.main() == 0
    written = json.loads(out.read_text())
    assert [r["steps"] for r in written["teacher"]] == [50, 10, 1]  # the fullest teacher evaluation
    rows = {(r["recipe"], r["steps"]): r for r in written["students"]}
    assert rows[("mnist-vsd", 2)]["fd_digits"] == 40.0 and rows[("mnist-dmd2", 4)]["fd_digits_std"] == 0.5
    assert written["missing"] == ["mnist-cd"]
    printed = capsys.readouterr().out
    assert "10.0 (±0.5, 3 seeds)" in printed and "not run yet: mnist-cd" in printed
    assert "best 1-step: dmd2 (mnist-dmd2) FD-digits 10.0" in printed
    # speed-up is against the teacher's 50-step latency (50 ms here): the 1-step student at 10 ms
    assert "| 5.0× |" in printed


def test_an_unknown_recipe_is_refused(monkeypatch, capsys):
    table = _table()
    monkeypatch.setattr(sys, "argv", ["x", "--collect-only", "--recipes", "mnist-nope"])
    assert table.main() == 2
    assert "unknown recipe(s) mnist-nope" in capsys.readouterr().err
