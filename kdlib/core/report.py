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


def _method_of(stage: str) -> str:
    """``seed3-logit_kd`` -> ``logit_kd``: seeds of one method share a colour in the plots."""
    return stage.split("-", 1)[1] if stage.startswith("seed") and "-" in stage else stage


def _plot_series(path: Path, series: dict[str, list[tuple[int, float]]], ylabel: str, title: str, log: bool) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    methods = sorted({_method_of(stage) for stage in series})
    colours = {m: plt.get_cmap("tab10")(i % 10) for i, m in enumerate(methods)}
    fig, ax = plt.subplots(figsize=(7, 4))
    labelled = set()
    for stage, points in sorted(series.items()):
        method = _method_of(stage)
        label = None if method in labelled else method
        labelled.add(method)
        ax.plot(*zip(*points), color=colours[method], linewidth=1, alpha=0.8, label=label,
                marker="o" if len(points) < 20 else None, markersize=3)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if log:
        ax.set_yscale("log")
    ax.legend(fontsize=8)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot(run_dir: Path, records_by_stage: dict[str, list[dict[str, Any]]], metric: str) -> list[str]:
    """plots/loss.png (training loss of every stage) and plots/metrics.png (held-out ``metric`` of
    the raw student over steps); one colour per method, one line per seed."""
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    losses, metrics = {}, {}
    for stage, records in records_by_stage.items():
        loss_points = [
            (r["step"], v) for r in records if "nonfinite_skipped" not in r
            for k, v in r.items() if k.endswith("/loss")
        ]
        if loss_points:
            losses[stage] = loss_points
        for key in sorted({k for r in records for k in r if k.endswith(f"/student/{metric}")}):
            metrics[f"{stage} {key.split('/')[0]}"] = [(r["step"], r[key]) for r in records if key in r]
    _plot_series(plots / "loss.png", losses, "training loss", "Training loss (one line per seed)", log=True)
    _plot_series(plots / "metrics.png", metrics, metric, f"Held-out {metric} over training", log=False)
    return ["plots/loss.png", "plots/metrics.png"]


def write_report(
    run_dir: str | Path, cfg: Any, results: dict[str, Any], primary: tuple[str, bool],
    extra_sections: list[str] | None = None, table: str | None = None,
) -> Path:
    """report.md: ``table`` (the domain's own results table, markdown) or the generic one row per
    model, the paired seed comparison, plots, then the domain's ``extra_sections``."""
    run_dir = Path(run_dir)
    if table is None:
        header, rows = results_rows(results)
        table = format_table(header, rows, markdown=True)
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
        table,
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
