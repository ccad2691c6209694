"""The ``kdlib`` command.

    kdlib info                                   versions, native extension, Triton, GPUs
    kdlib distill <domain> [--recipe NAME|PATH] [--dry-run] [key=value ...]
    kdlib resume <run_dir>                       continue a stopped run exactly where it was
    kdlib eval <run_dir>                         re-evaluate a run's teacher and students
    kdlib train-teacher <domain> [args ...]      reproduce a domain's shipped teacher
    kdlib export <run_dir> --format diffusers --out DIR   a trained student as a diffusers folder
    kdlib bench <name> [args ...]                run benchmarks/<name>.py (source checkout)

Multi-GPU / multi-node: launch the same command under torchrun, e.g.
``torchrun --nproc-per-node 8 -m kdlib.cli distill image``.
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # torch is imported lazily: `kdlib --help` stays fast
    import torch

WEIGHTS_HELP = ("which weights: 'raw' (default), or an EMA copy as the report names it (e.g. ema0.98; "
                "'ema' when the stage kept one)")


def cmd_info(_: argparse.Namespace) -> int:
    import torch

    from kdlib import __version__, _ext
    from kdlib.kernels._dispatch import triton_available

    lines = [
        f"kdlib      {__version__}",
        f"python     {platform.python_version()}",
        f"torch      {torch.__version__} (CUDA build: {torch.version.cuda or 'no'})",
    ]
    if triton_available():
        import triton

        lines.append(f"triton     {triton.__version__}")
    else:
        lines.append("triton     not installed: GPU kernels fall back to PyTorch (pip install triton)")
    native = _ext.native()
    if native is None:
        lines.append(f"kdlib._C   NOT BUILT ({_ext.load_error()})")
        lines.append("           slower without it: the fused EMA update (torch._foreach_lerp_ runs instead)")
        lines.append(f"           {_ext.BUILD_HINT}")
    else:
        cuda = (
            "with CUDA kernels" if _ext.has_cuda_ops()
            else "CPU ops only (torch without CUDA, or nvcc absent at build)"
        )
        lines.append(f"kdlib._C   built, {cuda}: {Path(native.__file__).name}")
        lines.append(f"           ops: {', '.join(_ext.describe()['ops'])}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            lines.append(f"gpu {i}      {p.name}, {p.total_memory / 2**30:.0f} GiB, sm_{p.major}{p.minor}")
    else:
        lines.append("gpus       none seen (CPU only)")
    print("\n".join(lines))
    return 0


def _print_results(run_dir: Path, results: dict, cfg) -> None:
    from kdlib.core.domain import DOMAINS
    from kdlib.core.report import format_table, paired_comparison, results_rows

    domain = DOMAINS.get(cfg.domain)(cfg.data, cfg.model)
    table = domain.results_table(results)
    if table is None:
        header, rows = results_rows(results)
        table = format_table(header, rows)
    print(table)
    paired = paired_comparison(results, cfg.method, cfg.baseline_method, DOMAINS.get(cfg.domain).primary_metric)
    if paired:
        print(paired)
    print(f"\nrun directory: {run_dir}\nreport:        {run_dir / 'report.md'}")


def _init_dist(device_name: str) -> None:
    from kdlib.core import distributed
    from kdlib.core.trainer import resolve_device

    distributed.init_distributed(resolve_device(device_name).type)


def cmd_distill(args: argparse.Namespace) -> int:
    from kdlib.core import distributed
    from kdlib.core.domain import DOMAINS
    from kdlib.core.experiment import Experiment, create_run_dir
    from kdlib.core.run_config import load_run_config

    domain_cls = DOMAINS.get(args.domain)
    recipe = domain_cls.recipe_path(args.recipe)
    cfg = load_run_config(recipe, args.overrides, domain=args.domain)
    if args.dry_run:
        from kdlib.core.memory import estimate_run, format_run

        print(f"kdlib: dry run of {cfg.domain} / {cfg.method}, recipe {recipe}: memory of one training step per stage")
        print(format_run(estimate_run(cfg)))
        return 0
    _init_dist(cfg.train.device)
    run_dir = create_run_dir(cfg, recipe)
    if distributed.current().is_main:
        print(f"kdlib: {cfg.domain} / {cfg.method}, recipe {recipe}, run directory {run_dir}", flush=True)
    results = Experiment(run_dir, cfg).run()
    if distributed.current().is_main:
        _print_results(run_dir, results, cfg)
    distributed.shutdown()
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from kdlib.core import distributed
    from kdlib.core.experiment import Experiment, load_run

    cfg = load_run(args.run_dir)
    _init_dist(cfg.train.device)
    results = Experiment(args.run_dir, cfg).run()
    if distributed.current().is_main:
        _print_results(Path(args.run_dir), results, cfg)
    distributed.shutdown()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from kdlib.core.experiment import Experiment

    experiment = Experiment(args.run_dir)
    _print_results(Path(args.run_dir), experiment.evaluate_saved(), experiment.cfg)
    return 0


def cmd_sample(args: argparse.Namespace) -> int:
    from kdlib.core.experiment import Experiment

    experiment = Experiment(args.run_dir)
    cfg = experiment.cfg
    stage = args.stage or f"seed{cfg.seeds[0]}-{cfg.method}"
    student = experiment.load_student(stage)
    if student is None:
        raise FileNotFoundError(f"{args.run_dir}: stage {stage!r} has no checkpoint to sample from")
    try:
        weights = _weights(student, args.weights, stage)
    except ValueError as exc:
        print(f"kdlib sample: {exc}", file=sys.stderr)
        return 2
    suffix = "" if args.weights == "raw" else f"-{args.weights}"
    out = Path(args.out) if args.out else Path(args.run_dir) / "samples" / f"{stage}-{args.steps}step{suffix}"
    files = experiment.domain.write_samples(weights, out, args.count, args.steps)
    print(f"kdlib: wrote {len(files)} files to {out}")
    return 0


def _weights(student, name: str, stage: str) -> torch.nn.Module:
    """The student's raw weights ("raw") or one of its EMA copies ("ema<decay>", as the report names
    them, e.g. ema0.98; "ema" alone when the stage kept exactly one)."""
    models = student.evaluation_models()
    choices = ["raw", *(k for k in models if k != "student")]
    if name == "raw":
        return models["student"]
    if name == "ema" and len(choices) == 2:
        return models[choices[1]]
    if name not in models or name == "student":
        raise ValueError(f"stage {stage!r} has no weights {name!r}; choose one of {', '.join(choices)}")
    return models[name]


def cmd_export(args: argparse.Namespace) -> int:
    from kdlib.core.experiment import Experiment

    experiment = Experiment(args.run_dir)
    stage = args.stage or f"seed{experiment.cfg.seeds[0]}-{experiment.cfg.method}"
    student = experiment.load_student(stage)
    if student is None:
        raise FileNotFoundError(f"{args.run_dir}: stage {stage!r} has no checkpoint to export")
    try:
        out = experiment.domain.export_student(_weights(student, args.weights, stage).cpu(), Path(args.out),
                                               args.format)
    except (NotImplementedError, TypeError, ValueError) as exc:
        print(f"kdlib export: {exc}", file=sys.stderr)
        return 2
    print(f"kdlib: exported {stage} as {args.format} to {out}")
    return 0


def cmd_train_teacher(args: argparse.Namespace) -> int:
    from kdlib.core.domain import DOMAINS

    module_name = DOMAINS.get(args.domain).teacher_trainer
    if module_name is None:
        raise FileNotFoundError(f"domain {args.domain!r} ships no teacher to reproduce; its recipes train "
                                "or load their teacher inside the run")
    importlib.import_module(module_name).main(args.args)
    return 0


def benchmarks_dir() -> Path:
    return Path(__file__).resolve().parent.parent / "benchmarks"


def cmd_bench(args: argparse.Namespace) -> int:
    folder = benchmarks_dir()
    available = sorted(p.stem.replace("_", "-") for p in folder.glob("*.py")) if folder.exists() else []
    name = args.name.replace("_", "-")
    # A unique prefix names a benchmark too: `kdlib bench block-sparse` runs block_sparse_attention.py.
    matches = [b for b in available if b == name] or [b for b in available if b.startswith(name)]
    script = folder / f"{matches[0].replace('-', '_')}.py" if len(matches) == 1 else None
    if script is None:
        if len(matches) > 1:
            print(f"kdlib bench: {args.name!r} is ambiguous: {', '.join(matches)}", file=sys.stderr)
            return 2
        print(
            f"kdlib bench: no benchmark {args.name!r}"
            + (f" (available: {', '.join(available)})" if available else " (benchmarks ship with the source checkout)"),
            file=sys.stderr,
        )
        return 2
    spec = importlib.util.spec_from_file_location(f"kdlib_bench_{script.stem}", script)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return int(module.main(args.args) or 0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="kdlib", description="Distill big, slow models into small, fast ones.")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, native extension, Triton and GPUs").set_defaults(func=cmd_info)
    p = sub.add_parser("distill", help="run a distillation recipe of a domain")
    p.add_argument("domain")
    p.add_argument("--recipe", default=None, help="recipe name in the domain's recipes/ folder, or a YAML path")
    p.add_argument("--dry-run", action="store_true",
                   help="print the memory each network and stage will take (nothing allocated), then exit")
    p.add_argument("overrides", nargs="*", help="key=value config overrides, e.g. train.steps=200 seeds=[0,1]")
    p.set_defaults(func=cmd_distill)
    p = sub.add_parser("resume", help="continue a stopped run from its newest checkpoint")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_resume)
    p = sub.add_parser("eval", help="evaluate a run's teacher and final students again")
    p.add_argument("run_dir")
    p.set_defaults(func=cmd_eval)
    p = sub.add_parser("sample", help="write samples of a run's trained student")
    p.add_argument("run_dir")
    p.add_argument("--stage", default=None, help="stage to sample from (default: the first seed's distilled student)")
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--steps", type=int, default=1, help="sampling steps")
    p.add_argument("--out", default=None, help="output folder (default: <run_dir>/samples/<stage>-<steps>step)")
    p.add_argument("--weights", default="raw", help=WEIGHTS_HELP)
    p.set_defaults(func=cmd_sample)
    p = sub.add_parser("export", help="write a run's trained student in another format (e.g. a diffusers folder)")
    p.add_argument("run_dir")
    p.add_argument("--format", default="diffusers", help="export format (image-gen: diffusers)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--stage", default=None, help="stage to export (default: the first seed's distilled student)")
    p.add_argument("--weights", default="raw", help=WEIGHTS_HELP)
    p.set_defaults(func=cmd_export)
    p = sub.add_parser("train-teacher", help="reproduce a domain's shipped teacher with its own recipe")
    p.add_argument("domain")
    p.add_argument("args", nargs=argparse.REMAINDER, help="passed to the domain's trainer, e.g. --steps 8000 --out F")
    p.set_defaults(func=cmd_train_teacher)
    p = sub.add_parser("bench", help="run a benchmark from benchmarks/")
    p.add_argument("name")
    p.add_argument("args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from kdlib.core.checkpoint import CheckpointError
    from kdlib.core.config import ConfigError

    parser = build_parser()
    # ``distill`` takes its key=value overrides before or after --recipe: argparse alone would
    # bind the positional list before the option and reject the rest.
    args, extra = parser.parse_known_args(argv)
    if extra:
        if args.command != "distill" or any("=" not in item or item.startswith("-") for item in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    try:
        return args.func(args)
    except (ConfigError, CheckpointError, FileNotFoundError, FileExistsError, KeyError) as exc:
        message = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"kdlib: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
