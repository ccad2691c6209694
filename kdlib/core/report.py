"""``report.md`` for a run: the results table (mean ± std over seeds) and plots of the training
loss and the evaluation metrics over steps, made with matplotlib from the stages' metrics.jsonl."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdlib.core.metrics_log import read_metrics


def results_rows(results: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and rows: one row per (method, evaluated model), metric columns from the summary."""
    teacher = results["teacher"]
    columns = sorted({k.split("/", 2)[0] + "/" + k.split("/", 2)[2] for k in teacher})
    header = ["model", "trained with", "params", *[f"{c}" for c in columns]]
    rows = [["teacher", "-", f"{results['params']['teacher']:,}",
             *[f"{teacher[_key(c, 'teacher')]:.4f}" for c in columns]]]
    for method_name, stats in results["summary"].items():
        models = sorted({k.split("/")[1] for k in stats})
        for model in models:
            cells = []
            for c in columns:
                s = stats.get(_key(c, model))
                cells.append("-" if s is None else f"{s['mean']:.4f} ± {s['std']:.4f} (n={s['n']})")
            label = "student" if model == "student" else f"student {model}"
            rows.append([label, method_name, f"{results['params']['student']:,}", *cells])
    return header, rows


def paired_comparison(results: dict[str, Any], method: str, baseline: str, primary: tuple[str, bool]) -> str | None:
    """"logit_kd beats supervised on 4 of 5 seeds (test accuracy, paired by seed; mean gain +0.0029)"."""
    seeds = results["seeds"]
    if method not in seeds or baseline not in seeds:
        return None
    metric, higher_is_better = primary
    lines = []
    for key in sorted(k for k in next(iter(seeds[method].values())) if k.endswith(f"/student/{metric}")):
        pairs = [(seeds[method][s][key], seeds[baseline][s][key]) for s in seeds[method] if s in seeds[baseline]]
        gains = [(a - b) if higher_is_better else (b - a) for a, b in pairs]
        wins, ties = sum(g > 0 for g in gains), sum(g == 0 for g in gains)
        split = key.split("/")[0]
        lines.append(
            f"{method} beats {baseline} on {wins} of {len(gains)} seeds ({ties} tied) in {split} {metric}, "
            f"paired by seed; mean gain {sum(gains) / len(gains):+.4f}"
        )
    return "\n".join(lines) or None


def _key(column: str, model: str) -> str:
    split, metric = column.split("/", 1)
    return f"{split}/{model}/{metric}"


def format_table(header: list[str], rows: list[list[str]], markdown: bool = False) -> str:
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines)
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*["-" * w for w in widths])] + [fmt.format(*r) for r in rows])


def _plot(run_dir: Path, records_by_stage: dict[str, list[dict[str, Any]]], metric: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    fig, ax = plt.subplots(figsize=(7, 4))
    for stage, records in records_by_stage.items():
        points = [
            (r["step"], v) for r in records if "nonfinite_skipped" not in r
            for k, v in r.items() if k.endswith("/loss")
        ]
        if points:
            ax.plot(*zip(*points), label=stage, linewidth=1)
    ax.set_xlabel("step")
    ax.set_ylabel("training loss")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    ax.set_title("Training loss by stage")
    fig.tight_layout()
    fig.savefig(plots / "loss.png", dpi=110)
    plt.close(fig)
    made.append("plots/loss.png")

    fig, ax = plt.subplots(figsize=(7, 4))
    for stage, records in records_by_stage.items():
        keys = sorted({k for r in records for k in r if k.endswith(f"/student/{metric}")})
        for key in keys:
            points = [(r["step"], r[key]) for r in records if key in r]
            if points:
                ax.plot(*zip(*points), marker="o", markersize=3, label=f"{stage} {key.split('/')[0]}")
    ax.set_xlabel("step")
    ax.set_ylabel(metric)
    ax.legend(fontsize=7)
    ax.set_title(f"Held-out {metric} over training")
    fig.tight_layout()
    fig.savefig(plots / "metrics.png", dpi=110)
    plt.close(fig)
    made.append("plots/metrics.png")
    return made


def write_report(
    run_dir: str | Path, cfg: Any, results: dict[str, Any], primary: tuple[str, bool],
    extra_sections: list[str] | None = None,
) -> Path:
    run_dir = Path(run_dir)
    header, rows = results_rows(results)
    stages_dir = run_dir / "stages"
    stages = sorted(p.name for p in stages_dir.iterdir() if p.is_dir()) if stages_dir.exists() else []
    records = {s: read_metrics(run_dir / "stages" / s / "metrics.jsonl") for s in stages}
    plots = _plot(run_dir, records, primary[0])
    n = len(cfg.seeds)
    text = [
        f"# {cfg.domain} / {cfg.method}",
        "",
        f"Student distilled with `{cfg.method}` vs the same student trained with `{cfg.baseline_method}` "
        f"(no teacher), same data, {cfg.train.steps} steps, seeds {cfg.seeds}: mean ± sample std over {n} "
        f"seed{'s' if n > 1 else ''}.",
        "",
        format_table(header, rows, markdown=True),
        "",
        paired_comparison(results, cfg.method, cfg.baseline_method, primary) or "",
        "",
        *[f"![{p}]({p})" for p in plots],
        "",
        *[section + "\n" for section in extra_sections or []],
        "Resolved configuration: `config.yaml`; every logged value: `stages/*/metrics.jsonl`; "
        "TensorBoard: `tensorboard --logdir " + str(run_dir / "stages") + "`.",
        "",
    ]
    path = run_dir / "report.md"
    path.write_text("\n".join(text))
    return path
