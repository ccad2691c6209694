"""A distillation run, end to end, as a sequence of resumable stages in one run directory.

    runs/<domain>-<method>-<time>/
        config.yaml                 the resolved config (what ``kdlib resume`` reloads)
        teacher.safetensors         the teacher's weights (trained by the run, or copied in)
        stages/<stage>/             one Trainer each: checkpoints/, metrics.jsonl, tensorboard/, done.json
        results.json, report.md     the results table over seeds, plots of the loss and metrics

Stages: ``teacher`` (only when no teacher weights are given), then for each seed the distilled
student (``seed<k>-<method>``) and, with ``baseline: true``, the same student trained on the same
data, steps and seed without the teacher (``seed<k>-<baseline_method>``). A recipe with
``stages:`` trains the distilled student through a chain of methods instead, one stage folder
each, every stage starting from the previous one's student (``kdlib.core.stages``). A stage with
done.json is skipped on resume; an unfinished one resumes from its newest valid checkpoint.
"""

from __future__ import annotations

import json
import random
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import yaml

from kdlib.core import distributed
from kdlib.core.checkpoint import load_weights, save_weights
from kdlib.core.config import to_dict
from kdlib.core.domain import DOMAINS, Domain
from kdlib.core.method import METHODS
from kdlib.core.models import Student, Teacher
from kdlib.core.run_config import TrainConfig, resolve_config
from kdlib.core.stages import StagePlan, load_start, previous_student, student_stages
from kdlib.core.state import unprefixed
from kdlib.core.trainer import Trainer, resolve_device

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def create_run_dir(cfg: Any, recipe: str | Path) -> Path:
    """Make ``runs/<name>/`` and write the resolved config; under torchrun all ranks agree on it."""
    name = cfg.name or f"{cfg.domain}-{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}"
    info = distributed.current()
    if info.enabled:
        box = [name]
        torch.distributed.broadcast_object_list(box, src=0)
        name = box[0]
    run_dir = Path(cfg.runs_dir) / name
    if info.is_main:
        if (run_dir / "config.yaml").exists():
            raise FileExistsError(f"run directory {run_dir} already exists; resume it with: kdlib resume {run_dir}")
        run_dir.mkdir(parents=True, exist_ok=True)
        resolved = {"recipe": str(recipe), **to_dict(cfg)}
        (run_dir / "config.yaml").write_text(yaml.safe_dump(resolved, sort_keys=False))
    distributed.barrier()
    return run_dir


def load_run(run_dir: str | Path) -> Any:
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise FileNotFoundError(f"{run_dir} is not a kdlib run directory (no config.yaml)")
    raw = yaml.safe_load(path.read_text())
    raw.pop("recipe", None)
    return resolve_config(raw, source=str(path))


class Experiment:
    """Runs (or resumes) every stage of the run in ``run_dir``."""

    def __init__(self, run_dir: str | Path, cfg: Any | None = None):
        self.run_dir = Path(run_dir)
        self.cfg = cfg if cfg is not None else load_run(run_dir)
        self.device = resolve_device(self.cfg.train.device)
        self.dist = distributed.current()
        self.domain: Domain = DOMAINS.get(self.cfg.domain)(self.cfg.data, self.cfg.model)
        self.data = self.domain.datasets()

    # -- evaluation -------------------------------------------------------------------------------
    def evaluate_models(self, models: dict[str, torch.nn.Module]) -> dict[str, float]:
        """``{split}/{model}/{metric}`` for every held-out split and model."""
        out = {}
        for split, data in self.data.items():
            if split == "train":
                continue
            split_data = data.to(self.device)
            for model_name, model in models.items():
                was_training = model.training
                model.eval()
                for metric, value in self.domain.evaluate(model, split_data).items():
                    out[f"{split}/{model_name}/{metric}"] = float(value)
                model.train(was_training)
        return out

    # -- stages -----------------------------------------------------------------------------------
    def _stage_dir(self, name: str) -> Path:
        return self.run_dir / "stages" / name

    def _done(self, name: str) -> dict[str, float] | None:
        path = self._stage_dir(name) / "done.json"
        return json.loads(path.read_text()) if path.exists() else None

    def _mark_done(self, name: str, results: dict[str, float]) -> None:
        if self.dist.is_main:
            path = self._stage_dir(name) / "done.json"
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(results, indent=1))
            tmp.replace(path)
        distributed.barrier()

    def _train(self, name: str, method_name: str, method_cfg: Any, student_model: torch.nn.Module,
               teacher: Teacher | None, train_cfg: TrainConfig, seed: int,
               start: dict[str, torch.Tensor] | None = None) -> tuple[Student, dict[str, float]]:
        """Train (or resume) stage ``name``; ``start``: the weights the student starts from (the
        previous stage's student), None for the domain's initialisation."""
        student = Student(student_model.to(self.device), ema_decays=train_cfg.ema_decays)
        if start is not None:  # before the method: one that copies the student at construction copies these
            load_start(student, start)
        method = METHODS.get(method_name)(method_cfg, student, teacher)
        if start is not None:  # and after: the method's own initialisation (init_from_teacher) must not win
            load_start(student, start)
        data = self.domain.stage_data(self.data["train"], method)
        trainer = Trainer(
            method, data, train_cfg, stage_dir=self._stage_dir(name), seed=seed,
            order=self.domain.batch_order(data, train_cfg.batch_size, seed),
            evaluate=lambda step: self.evaluate_models(student.evaluation_models()),
            augment=lambda batch: self.domain.augment(batch, "teacher" if name == "teacher" else "student"),
            description=name,
        )
        return student, trainer.fit()

    def teacher(self, *, train_if_missing: bool = True) -> Teacher:
        """The run's teacher, in ``teacher.dtype``: from ``teacher.path``, the run's own
        teacher.safetensors, the domain's pretrained weights, or (``train_if_missing``) trained now
        and saved; without it a missing teacher.safetensors is an error."""
        cfg = self.cfg
        weights = self.run_dir / "teacher.safetensors"
        seed_everything(cfg.seeds[0])
        model = self.domain.build_teacher()
        if cfg.teacher.path is not None:
            self.domain.load_teacher_weights(model, cfg.teacher.path)
        elif weights.exists() or (not train_if_missing and not self.domain.teacher_is_pretrained):
            load_weights(model, weights)
        elif not self.domain.teacher_is_pretrained:
            teacher_method = METHODS.get(cfg.teacher.method)
            trained, _ = self._train("teacher", cfg.teacher.method, teacher_method.Config(), model, None,
                                     cfg.teacher.train, cfg.seeds[0])
            model = trained.model
            if self.dist.is_main:
                save_weights(weights, model, metadata={"domain": cfg.domain})
            distributed.barrier()
        return Teacher(model, device=self.device, dtype=DTYPES[cfg.teacher.dtype])

    def run(self) -> dict[str, Any]:
        """Every stage in order; returns (and writes) the results over seeds."""
        cfg = self.cfg
        teacher = self.teacher()
        results: dict[str, Any] = {
            "teacher": self.evaluate_models({"teacher": teacher.model}),
            "params": {"teacher": _count(teacher.model), "student": _count(self.domain.build_student())},
            "seeds": {},
        }
        plans = student_stages(cfg)
        for seed in cfg.seeds:
            for plan in plans:
                name = f"seed{seed}-{plan.name}"
                done = self._done(name)
                if done is None:
                    seed_everything(seed)
                    _, done = self._train(name, plan.method, plan.method_args, self.domain.build_student(),
                                          teacher if plan.with_teacher else None, plan.train, seed,
                                          start=self._stage_start(seed, plan))
                    self._mark_done(name, done)
                # Every stage's student is evaluated and reported under its stage's name; the last
                # of a chain is named after the run's method.
                results["seeds"].setdefault(plan.name, {})[str(seed)] = done
        results["summary"] = summarize(results)
        if self.dist.is_main:
            from kdlib.core.report import write_report

            (self.run_dir / "results.json").write_text(json.dumps(results, indent=1))
            final = [cfg.method] + ([cfg.baseline_method] if cfg.baseline else [])
            students = {m: self.load_student(f"seed{cfg.seeds[0]}-{m}") for m in final}
            extra = self.domain.report_sections(self.run_dir, teacher, {k: v for k, v in students.items() if v})
            write_report(self.run_dir, cfg, results, self.domain.primary_metric, extra_sections=extra,
                         table=self.domain.results_table(results, markdown=True))
        return results

    def _stage_start(self, seed: int, plan: StagePlan) -> dict[str, torch.Tensor] | None:
        """The weights stage ``plan`` of ``seed`` starts from: None for a fresh student, else the
        final student of the stage before it (its ``plan.start_from`` copy)."""
        if plan.start_from is None:
            return None
        previous = next(s for s in self.cfg.stages if s.name == plan.previous)
        return previous_student(self._stage_dir(f"seed{seed}-{plan.previous}"), plan.start_from,
                                previous.train.steps)

    def load_student(self, stage: str) -> Student | None:
        """The student (with its EMA copies) from the newest valid checkpoint of ``stage``."""
        from kdlib.core.checkpoint import latest_checkpoint

        found = latest_checkpoint(self._stage_dir(stage) / "checkpoints")
        if found is None:
            return None
        # The checkpoint's own decays: stages of a chain may keep different EMA copies.
        student = Student(self.domain.build_student(), ema_decays=found.meta["ema_decays"])
        _load_prefix(student.model, "model/student/", found.tensors)
        for i, ema in enumerate(student.ema):
            _load_prefix(ema, f"ema/{i}/", found.tensors)
        return student.to(self.device).eval()


    def evaluate_saved(self) -> dict[str, Any]:
        """Evaluate the saved teacher and the newest checkpoint of every student stage again."""
        cfg = self.cfg
        teacher = self.teacher(train_if_missing=False)  # as the run built it, dtype included
        results: dict[str, Any] = {
            "teacher": self.evaluate_models({"teacher": teacher.model}),
            "params": {"teacher": _count(teacher.model), "student": _count(self.domain.build_student())},
            "seeds": {},
        }
        for seed in cfg.seeds:
            for plan in student_stages(cfg):
                student = self.load_student(f"seed{seed}-{plan.name}")
                if student is None:
                    continue
                results["seeds"].setdefault(plan.name, {})[str(seed)] = self.evaluate_models(
                    student.evaluation_models()
                )
        results["summary"] = summarize(results)
        return results


def _load_prefix(module: torch.nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
    module.load_state_dict(unprefixed(tensors, prefix))


def _count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def summarize(results: dict[str, Any]) -> dict[str, dict[str, dict[str, float]]]:
    """Mean and sample std over seeds of every final metric, per method."""
    summary: dict[str, dict[str, dict[str, float]]] = {}
    for method_name, per_seed in results["seeds"].items():
        keys = sorted(set().union(*(r.keys() for r in per_seed.values())))
        summary[method_name] = {}
        for key in keys:
            values = [r[key] for r in per_seed.values() if key in r]
            summary[method_name][key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "n": len(values),
            }
    return summary
