"""The generative image report: the paired teacher/student table (quality, diversity, latency,
speed-up per step count) and PNG sample grids of the same noise and labels side by side."""

from __future__ import annotations

from pathlib import Path

import torch

COLUMNS = [("fd_digits", "FD-digits ↓"), ("kid_digits", "KID-digits ↓"), ("precision", "precision"),
           ("recall", "recall"), ("diversity", "diversity"), ("class_acc", "class acc")]
PAIRED_HEADER = ["model", "steps", *[c for _, c in COLUMNS], "latency ms/image", "speed-up"]


def paired_rows(results: dict, teacher_steps: list[int], student_steps: list[int],
                split: str = "test") -> list[list[str]]:
    """Rows: teacher at each step count (and, for a guided recipe, unguided at its largest), then
    every method's student (mean over seeds) at each step count, followed by each EMA copy of it
    that was evaluated (``train.ema_decays``: "student (M, EMA d)"); speed-up is relative to the
    teacher at its largest step count, at the recipe's guidance."""
    teacher = results["teacher"]
    ref_steps = max(teacher_steps)
    ref_latency = teacher.get(f"{split}/teacher/latency_ms_{ref_steps}step")
    rows = []

    def row(label, steps, get):
        latency = get("latency_ms", steps)
        cells = [label, str(steps)]
        cells += ["-" if get(k, steps) is None else f"{get(k, steps):.3f}" for k, _ in COLUMNS]
        cells.append("-" if latency is None else f"{latency:.3f}")
        cells.append("-" if latency is None or not ref_latency else f"{ref_latency / latency:.1f}×")
        rows.append(cells)

    for n in teacher_steps:
        row("teacher", n, lambda k, n: teacher.get(f"{split}/teacher/{k}_{n}step"))
    if f"{split}/teacher/fd_digits_{ref_steps}step_w1" in teacher:  # a guided recipe: the unguided reference too
        row("teacher, w = 1", ref_steps, lambda k, n: teacher.get(f"{split}/teacher/{k}_{n}step_w1"))
    for method, stats in results["summary"].items():
        emas = sorted({key.split("/")[1] for key in stats
                       if key.startswith(f"{split}/ema") and key.endswith(f"/fd_digits_{student_steps[0]}step")})
        for model, label in [("student", f"student ({method})"),
                             *((m, f"student ({method}, EMA {m[len('ema'):]})") for m in emas)]:
            for n in student_steps:
                row(label, n, lambda k, n, stats=stats, model=model: stats.get(f"{split}/{model}/{k}_{n}step",
                                                                               {}).get("mean"))
    return rows


def sample_grid(path: Path, rows: list[tuple[str, torch.Tensor]]) -> Path:
    """One PNG: a labelled row of images per (name, images [K, 1, H, W] in [-1, 1])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = rows[0][1].shape[0]
    fig, axes = plt.subplots(len(rows), 1, figsize=(k * 0.6, len(rows) * 0.75))
    for ax, (name, images) in zip(axes if len(rows) > 1 else [axes], rows):
        strip = torch.cat(list(images[:, 0].clamp(-1, 1).cpu()), dim=1)
        ax.imshow(strip.numpy(), cmap="gray", vmin=-1, vmax=1)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def report_section(domain, run_dir: Path, teacher: torch.nn.Module, students: dict) -> list[str]:
    """How the paired table at the top of report.md was measured, and the sample grids."""
    cfg = domain.model_config
    noise, labels = grid_noise(next(teacher.parameters()).device)
    rows = [(f"teacher {n} steps", domain.generate(teacher, noise, labels, n)) for n in cfg.teacher_steps]
    for method, student in students.items():
        # the raw student, then each EMA copy the table reports (same rows' names as the table's)
        models = [(method, student.model), *((f"{method} EMA {d:g}", ema)
                                             for d, ema in zip(student.ema_decays, student.ema))]
        rows += [(f"{name} {n} step{'s' if n > 1 else ''}", domain.generate(model, noise, labels, n))
                 for name, model in models for n in cfg.student_steps]
    grid = sample_grid(run_dir / "plots" / "samples.png", rows)
    return [
        "## Teacher vs student, paired by step count\n\n"
        f"The table above: {cfg.eval_samples} samples per row (labels 0–9 cycling, the same noise for every "
        "model), scored on the held-out test digits with features of the project's own digit classifier "
        "(FD-digits/KID-digits: not comparable with Inception FID). Teacher: "
        f"{cfg.teacher_sampler} sampler, guidance {cfg.guidance} (with guidance ≠ 1 each teacher step is one "
        "batched call on the conditional and unconditional inputs). Latency: batched, per image, on this "
        "machine; speed-up relative to the teacher's largest step count.",
        f"Samples (same noise and labels in every row):\n\n![samples]({grid.relative_to(run_dir)})",
    ]


def grid_noise(device, count: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(99)
    return torch.randn(count, 1, 28, 28, generator=g).to(device), torch.arange(count).to(device) % 10
