"""Held-out NLL gap to the teacher per text domain, per seed, from `kdlib distill llm` run folders.

    python benchmarks/llm_ddk_gaps.py RUN_DIR [RUN_DIR ...] [--method cached_kd] [--json OUT]

For each run (its results.json) and seed: gap_d = NLL_student(val_d) − NLL_teacher(val_d) in nats,
the worst (largest) gap, and how many training blocks of each domain the run drew (from the data
order's state in the stage's last checkpoint: DDK's mixture counts them; a uniform mixture draws
every block once an epoch, so it shows None); then the mean over seeds.
Used for the DDK-vs-uniform table of benchmarks/RESULTS.md (issue 8).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdlib.core.checkpoint import latest_checkpoint  # noqa: E402


def domains_in_order(results: dict) -> list[str]:
    """The text domains in the run's source order (the order of the mixture's domain indices)."""
    return [k.split("/")[0][len("val_"):] for k in results["teacher"] if k.endswith("/teacher/nll")]


def gaps(run_dir: Path, method: str) -> dict:
    results = json.loads((run_dir / "results.json").read_text())
    teacher = results["teacher"]
    domains = domains_in_order(results)
    seeds = {}
    for seed, metrics in results["seeds"][method].items():
        row = {d: metrics[f"val_{d}/student/nll"] - teacher[f"val_{d}/teacher/nll"] for d in domains}
        found = latest_checkpoint(run_dir / "stages" / f"seed{seed}-{method}" / "checkpoints")
        drawn = found.meta.get("data_order", {}).get("drawn") if found is not None else None
        seeds[seed] = {"gap": row, "worst": max(row.values()),
                       "drawn": dict(zip(domains, drawn)) if drawn else None}
    mean = {d: statistics.mean(s["gap"][d] for s in seeds.values()) for d in domains}
    worst = [s["worst"] for s in seeds.values()]
    return {"run": str(run_dir), "domains": domains, "seeds": seeds, "mean_gap": mean,
            "mean_worst": statistics.mean(worst), "std_worst": statistics.stdev(worst) if len(worst) > 1 else 0.0}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--method", default="cached_kd")
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    out = [gaps(r, args.method) for r in args.runs]
    for g in out:
        print(f"{g['run']}: " + " | ".join(g["domains"]) + " | worst | blocks drawn")
        for seed, s in g["seeds"].items():
            w = " ".join(f"{s['drawn'][d]}" for d in g["domains"]) if s["drawn"] else "-"
            print(f"  seed {seed}: " + " | ".join(f"{s['gap'][d]:.3f}" for d in g["domains"])
                  + f" | {s['worst']:.3f} | {w}")
        print("  mean:   " + " | ".join(f"{g['mean_gap'][d]:.3f}" for d in g["domains"])
              + f" | {g['mean_worst']:.3f} ± {g['std_worst']:.3f}")
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
