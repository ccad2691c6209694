"""The configuration of a distillation run: what every recipe YAML fills.

Top-level keys: ``domain``, ``method``, ``seeds``, ``baseline``, ``runs_dir``, and the sections
``train`` (the student's loop), ``teacher`` (where the teacher comes from and, if the recipe trains
it, its loop), ``data`` and ``model`` (typed by the domain), ``method_args`` (typed by the
method), ``baseline_args`` (typed by ``baseline_method``) and ``stages`` (a chain of methods for
the student, each stage typed by its own method: ``kdlib.core.stages``). ``resolve_config``
builds the specialised dataclass and checks every key and value.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from kdlib.core.config import ConfigError, build, deep_merge, load_yaml, merge_recipe, parse_overrides


@dataclass
class TrainConfig:
    steps: int = 500
    batch_size: int = 64  # global: split evenly across torchrun processes
    grad_accum: int = 1  # micro-batches per optimizer step; each has batch_size / grad_accum examples
    optimizer: Literal["adamw", "sgd"] = "adamw"
    lr: float = 1e-3
    # Base learning rate per parameter group of the method (e.g. {critic: 2e-5}); groups not named
    # use ``lr``. Every group's schedule follows the global step, so all end at ``steps``.
    group_lr: dict[str, float] = field(default_factory=dict)
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    momentum: float = 0.9  # sgd only
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_steps: int = 0
    grad_clip: float = 1.0  # max global grad norm; 0 disables clipping
    ema_decays: list[float] = field(default_factory=list)
    precision: Literal["auto", "fp32", "bf16"] = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    eval_every: int = 0  # 0: evaluate at the end only
    checkpoint_every: int = 100
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5  # abort after this many non-finite steps in a row
    log_every: int = 10
    device: str = "auto"  # auto: cuda if available, else cpu
    progress: bool = True


@dataclass
class TeacherConfig:
    # A safetensors file with the teacher's weights (e.g. teacher.safetensors of an earlier run);
    # when unset the run trains its teacher with ``train`` first.
    path: str | None = None
    train: TrainConfig = field(default_factory=TrainConfig)
    method: str = "supervised"  # how the run trains its teacher (e.g. a diffusion training objective)
    dtype: Literal["fp32", "bf16", "fp16"] = "fp32"


@dataclass
class RunConfigBase:
    domain: str = ""
    method: str = ""
    seeds: list[int] = field(default_factory=lambda: [0])
    # Also train the same student on the same data, steps and seed without the teacher, and
    # report both: the only honest way to show what distillation bought.
    baseline: bool = True
    baseline_method: str = "supervised"
    # The baseline's own train settings, over the run's ``train`` (e.g. a multi-stage run's total
    # steps and its first stage's lr, so the baseline gets the budget the chain had); resolved into
    # a TrainConfig, None when not given (the run's ``train``).
    baseline_train: Any = None
    runs_dir: str = "runs"
    name: str | None = None  # run folder name; default <domain>-<method>-<time>
    train: TrainConfig = field(default_factory=TrainConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # Multi-stage recipes (kdlib.core.stages): empty for a single-stage run; resolve_config types
    # each entry by its method.
    stages: list[Any] = field(default_factory=list)


def resolve_config(raw: dict[str, Any], *, source: str) -> Any:
    """Build the run config for ``raw``: top level checked, ``data``/``model`` typed by the
    domain, ``method_args`` typed by the method. Raises ConfigError naming ``source``."""
    from kdlib.core.domain import DOMAINS
    from kdlib.core.method import METHODS
    from kdlib.core.stages import default_method, resolve_stages

    raw = default_method(raw)
    for key in ("domain", "method"):
        if not isinstance(raw.get(key), str) or not raw.get(key):
            raise ConfigError(f"{source}: the recipe must name a {key} (e.g. {key}: ...)")
    try:
        domain_cls = DOMAINS.get(raw["domain"])
        method_cls = METHODS.get(raw["method"])
        baseline_cls = METHODS.get(raw.get("baseline_method", "supervised"))
    except KeyError as exc:
        raise ConfigError(f"{source}: {exc.args[0]}") from None
    cls = dataclasses.make_dataclass(
        "RunConfig",
        [
            ("data", domain_cls.DataConfig, field(default_factory=domain_cls.DataConfig)),
            ("model", domain_cls.ModelConfig, field(default_factory=domain_cls.ModelConfig)),
            ("method_args", method_cls.Config, field(default_factory=method_cls.Config)),
            ("baseline_args", baseline_cls.Config, field(default_factory=baseline_cls.Config)),
        ],
        bases=(RunConfigBase,),
    )
    cfg = build(cls, raw, source=source)
    _check_values(cfg, source)
    cfg.stages = resolve_stages(raw, cfg, source)
    cfg.baseline_train = _baseline_train(raw, source)
    return cfg


def _baseline_train(raw: dict[str, Any], source: str) -> TrainConfig | None:
    given = raw.get("baseline_train")
    if given is None:
        return None
    if not isinstance(given, dict):
        raise ConfigError(f"{source}: baseline_train must be a mapping of train keys, got {given!r}")
    train = build(TrainConfig, deep_merge(raw.get("train") or {}, given), source=source, prefix="baseline_train.")
    check_train("baseline_train", train, source)
    return train


def check_train(name: str, train: TrainConfig, source: str) -> None:
    """Values a TrainConfig's types cannot rule out; ``name`` is its key (``train``, ``stages[1].train``)."""
    for key in ("steps", "batch_size", "grad_accum", "keep_checkpoints", "max_nonfinite_steps"):
        if getattr(train, key) < 1:
            raise ConfigError(f"{source}: {name}.{key} must be >= 1, got {getattr(train, key)}")
    if train.batch_size % train.grad_accum:
        raise ConfigError(
            f"{source}: {name}.batch_size={train.batch_size} must be divisible by "
            f"{name}.grad_accum={train.grad_accum}"
        )
    for group, lr in list(train.group_lr.items()):
        try:
            lr = float(lr) if not isinstance(lr, bool) else None
        except (TypeError, ValueError):
            lr = None
        if lr is None or not lr > 0.0:
            raise ConfigError(f"{source}: {name}.group_lr.{group} must be a number > 0, got {train.group_lr[group]!r}")
        train.group_lr[group] = lr  # YAML reads "2e-5" as a string
    for d in train.ema_decays:
        if not 0.0 < d < 1.0:
            raise ConfigError(f"{source}: {name}.ema_decays entries must be in (0, 1), got {d}")


def _check_values(cfg: Any, source: str) -> None:
    for name, train in (("train", cfg.train), ("teacher.train", cfg.teacher.train)):
        check_train(name, train, source)
    if not cfg.seeds:
        raise ConfigError(f"{source}: seeds must list at least one seed")


def load_run_config(recipe: str | Path, overrides: list[str] | None = None, *, domain: str | None = None) -> Any:
    """Recipe file + ``key=value`` overrides -> checked run config."""
    raw = load_yaml(recipe)
    if domain is not None:
        raw.setdefault("domain", domain)
        if raw["domain"] != domain and not _same_recipe_family(raw["domain"], domain):
            raise ConfigError(f"recipe {recipe} is for domain {raw['domain']!r}, not {domain!r}")
    try:
        raw = merge_recipe(raw, parse_overrides(overrides or []))
    except ConfigError as exc:  # e.g. an override of a list item that is not there
        raise ConfigError(f"recipe {recipe}: {exc}") from None
    source = f"recipe {recipe}" + (f" with overrides {' '.join(overrides)}" if overrides else "")
    return resolve_config(raw, source=source)


def _same_recipe_family(recipe_domain: str, cli_domain: str) -> bool:
    """Domains that share a recipes folder (e.g. ``image`` and ``image-gen``) run each other's
    recipes: ``kdlib distill image`` may run a generative recipe that names ``domain: image-gen``."""
    from kdlib.core.domain import DOMAINS

    try:
        a, b = DOMAINS.get(recipe_domain), DOMAINS.get(cli_domain)
    except KeyError:
        return False
    return a.recipes_dir is not None and a.recipes_dir == b.recipes_dir
