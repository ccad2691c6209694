"""Multi-stage recipes: the run's student trained by a chain of methods, each stage starting from
the student the previous one produced (e.g. reflow -> consistency distillation -> DMD2).

    method: consistency_distillation     # optional with stages: the last stage's method
    train: {batch_size: 128, lr: 1e-3}   # every stage's defaults
    stages:
      - name: fm-finetune                # optional; default: the method's name
        method: flow_matching
        method_args: {param: fm}
        train: {steps: 300, ema_decays: [0.99]}   # merged over the run's train
      - method: consistency_distillation
        start_from: ema                  # auto | ema | raw (below)
        method_args: {num_intervals: 10}
        train: {steps: 1000}

Keys of a stage: ``name``, ``method``, ``method_args``, ``train``, ``start_from``; any other key
stops the run, naming it. A stage without ``method`` uses the run's; ``method_args`` of a stage
that keeps the run's method are merged over the run's ``method_args``, a stage with another method
starts that method's options afresh (the rule recipes follow with ``extends``).

Hand-over: stage i > 0 starts from the final checkpoint of stage i-1: ``start_from: ema`` takes
its first EMA copy (decay ``train.ema_decays[0]``), ``raw`` its trained weights, ``auto`` (the
default) the EMA copy when that stage keeps one and the raw weights otherwise. The weights go
into the new stage's student and every EMA copy of it, and they win over the method's own
initialisation (e.g. consistency distillation's ``init_from_teacher``).

Run directory: ``stages/seed<k>-<name>/`` per stage and seed. The last stage is the run's student:
its name is always its method, so it sits where a single-stage run's student does
(``seed<k>-<method>``) and ``kdlib sample/export/eval`` find it. A stage with ``done.json`` is not
run again; a killed stage resumes from its own newest checkpoint. The no-teacher baseline
(``baseline: true``) stays one stage with the run's ``train``.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from kdlib.core.checkpoint import CheckpointError, latest_checkpoint
from kdlib.core.config import ConfigError, build, deep_merge, merge_recipe
from kdlib.core.models import Student
from kdlib.core.run_config import TrainConfig, check_train
from kdlib.core.state import unprefixed

NAME = re.compile(r"^[A-Za-z0-9_.][A-Za-z0-9_.-]*$")


@dataclass
class StageConfigBase:
    name: str = ""  # default: the method's name
    method: str = ""
    # Which weights of the previous stage's student this one starts from: auto | ema | raw.
    start_from: Literal["auto", "ema", "raw"] = "auto"
    train: TrainConfig = field(default_factory=TrainConfig)


@dataclass(frozen=True)
class StagePlan:
    """One student stage of a seed: ``stages/seed<k>-<name>/``."""

    name: str
    method: str
    method_args: Any
    train: TrainConfig
    with_teacher: bool  # False: the no-teacher baseline
    start_from: str | None = None  # "ema" | "raw" of stage ``previous``; None: a fresh student
    previous: str | None = None


def default_method(raw: dict[str, Any]) -> dict[str, Any]:
    """With ``stages`` and no top-level ``method``, the run's method is the last stage's."""
    stages = raw.get("stages")
    if raw.get("method") or not isinstance(stages, list) or not stages or not isinstance(stages[-1], dict):
        return raw
    return {**raw, "method": stages[-1].get("method")} if stages[-1].get("method") else raw


def resolve_stages(raw: dict[str, Any], cfg: Any, source: str) -> list[Any]:
    """The typed stages of recipe ``raw`` (whose top level resolved to ``cfg``); [] without
    ``stages``. Raises ConfigError naming ``stages[i].<key>`` for a bad key or value."""
    from kdlib.core.method import METHODS

    items = raw.get("stages") or []
    run_defaults = {"method": cfg.method, "method_args": raw.get("method_args") or {}}
    stages = []
    for i, item in enumerate(items):
        where = f"stages[{i}]"
        if not isinstance(item, dict):
            raise ConfigError(f"{source}: {where} must be a mapping (method, method_args, train, ...), got {item!r}")
        item = merge_recipe(run_defaults, item)
        if isinstance(item.get("train", {}), dict):
            item["train"] = deep_merge(raw.get("train") or {}, item.get("train", {}))
        try:
            method_cls = METHODS.get(item["method"])
        except KeyError as exc:
            raise ConfigError(f"{source}: {where}.method: {exc.args[0]}") from None
        cls = dataclasses.make_dataclass(
            "StageConfig",
            [("method_args", method_cls.Config, field(default_factory=method_cls.Config))],
            bases=(StageConfigBase,),
        )
        stage = build(cls, item, source=source, prefix=f"{where}.")
        stage.name = stage.name or stage.method
        check_train(f"{where}.train", stage.train, source)
        stages.append(stage)
    _check_chain(stages, cfg, source)
    return stages


def _check_chain(stages: list[Any], cfg: Any, source: str) -> None:
    if not stages:
        return
    last = len(stages) - 1
    if stages[last].method != cfg.method:
        raise ConfigError(
            f"{source}: stages[{last}].method is {stages[last].method!r} but the run's method is {cfg.method!r}: "
            "the last stage trains the run's student; leave out the top-level method or make them agree"
        )
    if stages[last].name != stages[last].method:
        raise ConfigError(
            f"{source}: stages[{last}].name: the last stage is the run's student and is named after its method "
            f"({stages[last].method!r}, folder seed<k>-{stages[last].method}); leave its name out"
        )
    reserved = {"teacher"} | ({cfg.baseline_method} if cfg.baseline else set())
    seen: dict[str, int] = {}
    for i, stage in enumerate(stages):
        if not NAME.match(stage.name):
            raise ConfigError(f"{source}: stages[{i}].name={stage.name!r}: use letters, digits, '_', '.', '-'")
        if stage.name in seen:
            raise ConfigError(f"{source}: stages[{i}].name={stage.name!r} is also stages[{seen[stage.name]}]'s name; "
                              "give one of them another name")
        if stage.name in reserved:
            raise ConfigError(f"{source}: stages[{i}].name={stage.name!r} is taken by the run's "
                              f"{'teacher' if stage.name == 'teacher' else 'baseline'} stage; choose another")
        seen[stage.name] = i
    if stages[0].start_from != "auto":
        raise ConfigError(f"{source}: stages[0].start_from: the first stage starts from the domain's student "
                          "(and its method's own initialisation); start_from applies from stages[1] on")
    for i in range(1, len(stages)):
        if stages[i].start_from == "ema" and not stages[i - 1].train.ema_decays:
            raise ConfigError(f"{source}: stages[{i}].start_from=ema but stages[{i - 1}] keeps no EMA copy "
                              f"(its train.ema_decays is empty); set start_from: raw or give it train.ema_decays")


def student_stages(cfg: Any) -> list[StagePlan]:
    """The student stages of one seed, in order: the chain (one stage without ``stages``), then
    the no-teacher baseline if the run has one."""
    chain = cfg.stages or [StageConfigBase(name=cfg.method, method=cfg.method, train=cfg.train)]
    args = [s.method_args if cfg.stages else cfg.method_args for s in chain]
    plans: list[StagePlan] = []
    for i, (stage, method_args) in enumerate(zip(chain, args)):
        start, previous = None, None
        if i:
            previous = chain[i - 1]
            start = stage.start_from if stage.start_from != "auto" else ("ema" if previous.train.ema_decays else "raw")
        plans.append(StagePlan(stage.name, stage.method, method_args, stage.train, True, start,
                               previous.name if previous else None))
    if cfg.baseline:
        plans.append(StagePlan(cfg.baseline_method, cfg.baseline_method, cfg.baseline_args,
                               cfg.baseline_train or cfg.train, False))
    return plans


def previous_student(stage_dir: Path, which: str, steps: int) -> dict[str, torch.Tensor]:
    """The state dict a stage starts from: the ``which`` ("ema": first EMA copy, "raw": trained
    weights) student of the final checkpoint (step ``steps``) in the finished ``stage_dir``."""
    found = latest_checkpoint(stage_dir / "checkpoints")
    if found is None or found.step != steps:
        got = "no valid checkpoint" if found is None else f"its newest valid checkpoint is step {found.step}"
        raise CheckpointError(f"{stage_dir} should end with its step-{steps} checkpoint to start the next stage "
                              f"from, but {got}")
    prefix = "ema/0/" if which == "ema" else "model/student/"
    state = unprefixed(found.tensors, prefix)
    if not state:
        raise CheckpointError(f"checkpoint {found.path} holds no {which} student ({prefix}*)")
    return state


def load_start(student: Student, state: dict[str, torch.Tensor]) -> None:
    """Put the previous stage's weights into ``student`` and each of its EMA copies."""
    for model in (student.model, *student.ema):
        model.load_state_dict(state, strict=True)
