"""The paired table of issues 6 and 7: every few-step method of kdlib, both families (consistency
and distribution matching / adversarial / reflow), distilled from the same shipped MNIST teacher,
on the same data, with the same seeds, evaluated on the same noises and labels.

Each recipe of ``RECIPES`` runs as its own ``kdlib distill image --recipe R`` (its own run
folder under ``--runs-dir``, the recipe as shipped plus ``seeds``; only the first recipe's run
evaluates the teacher at 50/10/4/2/1 steps, the others at 1 step: the table's teacher rows come
from the run that evaluated the most step counts). A
recipe whose run folder already holds ``results.json`` is not run again, and a run that was
stopped resumes where it was (the Experiment skips finished stages, the Trainer resumes a stage's
last checkpoint), so the table can be built in pieces. ``--jobs`` runs that many recipes at once,
each with one thread.

Output: one markdown table (teacher rows, then each method's student at 1/2/4 steps: FD-digits
mean ± std over the seeds, KID-digits, precision, recall and the diversity score — mean pairwise
feature distance — latency and speed-up against the 50-step teacher), the same as JSON at
``--json``. Latencies are measured inside each run; with ``--jobs`` > 1 they share the machine, so
only the quality and diversity columns compare across methods exactly.

    python benchmarks/image_paired_table.py                        # every recipe, seeds 0 1 2
    python benchmarks/image_paired_table.py --recipes mnist-cd mnist-vsd --seeds 0
    python benchmarks/image_paired_table.py --collect-only         # the table from what has run
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RECIPE_DIR = ROOT / "domains" / "image" / "recipes"

# (recipe, family, extra overrides). mnist-mlcm (the default recipe until 2026-12-04; the default is
# now its guided mnist-mlcm-cfg) keeps its iCT baseline: it is the consistency family's teacher-free
# method, trained for the same steps. Being first and unguided, it gives the table's teacher rows.
RECIPES: list[tuple[str, str, list[str]]] = [
    ("mnist-mlcm", "consistency", ["baseline=true"]),
    ("mnist-cd", "consistency", []),
    ("mnist-cd-cfg", "consistency", []),
    ("mnist-mlcm-cfg", "consistency", []),  # the default recipe (guided: its own run's teacher is guided too)
    ("mnist-scott", "consistency", []),
    ("mnist-tbcm", "consistency", []),
    ("mnist-scm", "consistency", []),
    ("mnist-dmd", "distribution matching", []),
    ("mnist-dmd2", "distribution matching", []),
    ("mnist-dmd2-1step", "distribution matching", []),
    ("mnist-decoupled-dmd", "distribution matching", []),
    ("mnist-vsd", "distribution matching", []),
    ("mnist-rcm", "distribution matching", []),
    ("mnist-phased-dmd", "distribution matching", []),
    ("mnist-ladd", "adversarial", []),
    ("mnist-scm-ladd", "adversarial", []),
    ("mnist-reflow", "reflow", []),
    ("mnist-slimflow", "reflow", []),
    ("mnist-reflow-dmd2", "multi-stage", []),
]
FAMILY = {name: family for name, family, _ in RECIPES}
STEPS = (1, 2, 4)
METRICS = ("fd_digits", "kid_digits", "precision", "recall", "diversity", "class_acc")


def run_recipe(recipe: str, extra: list[str], seeds: list[int], runs_dir: Path, full_teacher: bool) -> Path:
    """Run (or resume) one recipe into ``runs_dir/recipe``; returns the run folder."""
    run_dir = runs_dir / recipe
    if (run_dir / "results.json").exists():
        return run_dir
    teacher = [] if full_teacher else ["model.teacher_steps=[1]"]
    overrides = ["baseline=false", *extra, f"seeds=[{','.join(map(str, seeds))}]", *teacher,
                 f"runs_dir={runs_dir}", f"name={recipe}", "train.progress=false"]
    cmd = [sys.executable, "-m", "kdlib.cli", "distill", "image", "--recipe", str(RECIPE_DIR / f"{recipe}.yaml"),
           *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    runs_dir.mkdir(parents=True, exist_ok=True)
    start = time.time()
    with open(runs_dir / f"{recipe}.log", "a") as log:
        code = subprocess.call(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT)
    print(f"{recipe}: exit {code} after {time.time() - start:.0f} s (log {runs_dir / f'{recipe}.log'})", flush=True)
    return run_dir


def student_rows(recipe: str, results: dict) -> list[dict]:
    """One row per (method, steps) of a run: the metric means and stds over its seeds."""
    rows = []
    for method, stats in results["summary"].items():
        for n in STEPS:
            row = {"recipe": recipe, "family": FAMILY.get(recipe, "?"), "method": method, "steps": n}
            for metric in (*METRICS, "latency_ms"):
                cell = stats.get(f"test/student/{metric}_{n}step")
                if cell is not None:
                    row[metric] = cell["mean"]
                    row[f"{metric}_std"] = cell["std"]
                    row["seeds"] = cell["n"]
            if "fd_digits" in row:
                rows.append(row)
    return rows


def teacher_rows(results: dict) -> list[dict]:
    teacher = results["teacher"]
    steps = sorted({int(k.rsplit("_", 1)[1][:-4]) for k in teacher if k.startswith("test/teacher/fd_digits_")},
                   reverse=True)
    return [{"method": "teacher", "steps": n, **{m: teacher.get(f"test/teacher/{m}_{n}step")
                                               for m in (*METRICS, "latency_ms")}} for n in steps]


def fmt(value, spec=".3f"):
    return "-" if value is None else format(value, spec)


def markdown(teacher: list[dict], students: list[dict]) -> str:
    ref = next((r["latency_ms"] for r in teacher if r["steps"] == 50), None)
    head = ["family / recipe", "model", "steps", "FD-digits ↓ (± std)", "KID-digits ↓", "precision", "recall",
            "diversity", "class acc", "latency ms/image", "speed-up vs teacher 50"]
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in [*teacher, *students]:
        fd = fmt(r.get("fd_digits"), ".1f")
        if r.get("seeds", 1) > 1:
            fd += f" (±{r['fd_digits_std']:.1f}, {r['seeds']} seeds)"
        latency = r.get("latency_ms")
        speed = "-" if not latency or not ref else f"{ref / latency:.1f}×"
        where = "teacher" if r["method"] == "teacher" else f"{r['family']} / `{r['recipe']}`"
        cells = [where, r["method"], str(r["steps"]), fd, fmt(r.get("kid_digits"), ".0f"), fmt(r.get("precision")),
                 fmt(r.get("recall")), fmt(r.get("diversity")), fmt(r.get("class_acc")), fmt(latency), speed]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--recipes", nargs="+", default=[r for r, _, _ in RECIPES], help="recipe names (no .yaml)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--runs-dir", type=Path, default=Path("runs/paired-table"))
    ap.add_argument("--jobs", type=int, default=1, help="recipes run at once, one thread each")
    ap.add_argument("--collect-only", action="store_true", help="build the table from finished runs only")
    ap.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "image_paired_table.json")
    args = ap.parse_args()
    extras = {name: extra for name, _, extra in RECIPES}
    unknown = [r for r in args.recipes if not (RECIPE_DIR / f"{r}.yaml").exists()]
    if unknown:
        print(f"unknown recipe(s) {', '.join(unknown)}: choose from {', '.join(sorted(extras))}", file=sys.stderr)
        return 2
    runs_dir = args.runs_dir.resolve()
    start = time.time()
    if not args.collect_only:
        with ThreadPoolExecutor(max_workers=args.jobs) as pool:
            list(pool.map(lambda r: run_recipe(r, extras.get(r, []), args.seeds, runs_dir, r == args.recipes[0]),
                          args.recipes))
    teacher, students, missing = [], [], []
    for recipe in args.recipes:
        path = runs_dir / recipe / "results.json"
        if not path.exists():
            missing.append(recipe)
            continue
        results = json.loads(path.read_text())
        if not teacher or len(teacher_rows(results)) > len(teacher):
            teacher = teacher_rows(results)
        students += student_rows(recipe, results)
    table = markdown(teacher, students)
    print(table)
    if missing:
        print(f"\nnot run yet: {', '.join(missing)}")
    best = {n: min((r for r in students if r["steps"] == n), key=lambda r: r["fd_digits"], default=None) for n in STEPS}
    for n, r in best.items():
        if r is not None:
            print(f"best {n}-step: {r['method']} ({r['recipe']}) FD-digits {r['fd_digits']:.1f}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({
        "date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "seeds": args.seeds, "jobs": args.jobs, "wall_s": round(time.time() - start),
        "teacher": teacher, "students": students, "missing": missing,
    }, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
