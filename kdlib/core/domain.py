"""The Domain interface and its registry.

A Domain supplies everything domain-specific: data (loaded offline), the teacher and student
networks, how to evaluate them, and its recipes. Built-in domains live in the top-level
``domains`` package and register themselves on import; kdlib itself never imports them except
through this registry's loader, so the dependency stays one-way (domains -> kdlib).
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kdlib.core.data import BatchOrder, TensorDataset
from kdlib.core.method import Method, NoConfig
from kdlib.core.registry import Registry

BUILTIN_DOMAINS = ("image", "video", "speech", "shape3d", "robot", "llm")


def _import_builtin_domains() -> None:
    for name in BUILTIN_DOMAINS:
        try:
            importlib.import_module(f"domains.{name}")
        except ModuleNotFoundError as exc:
            if exc.name not in (f"domains.{name}", "domains"):
                raise  # a domain that exists but misses a dependency must say so


DOMAINS: Registry[type[Domain]] = Registry("domain", loader=_import_builtin_domains)
register_domain = DOMAINS.register


class Domain:
    """Base class. Subclasses set ``DataConfig``/``ModelConfig`` dataclasses and ``recipes_dir``."""

    name: str = "domain"
    DataConfig: type = NoConfig
    ModelConfig: type = NoConfig
    recipes_dir: Path | None = None
    default_recipe: str = "default"
    # True when build_teacher() returns a trained model (e.g. loaded from a local transformers
    # folder): the run then has no teacher-training stage.
    teacher_is_pretrained: bool = False
    # ``kdlib train-teacher <domain> [args]`` runs ``main(args)`` of this module: the recipe that
    # reproduces a teacher the domain ships (None: the domain ships none).
    teacher_trainer: str | None = None
    # The metric that decides "better" in reports, and whether larger is better.
    primary_metric: tuple[str, bool] = ("loss", False)

    def __init__(self, data_config: Any, model_config: Any):
        self.data_config = data_config
        self.model_config = model_config

    def datasets(self) -> dict[str, TensorDataset]:
        """At least ``train``; other splits (``val``, ``test``) are evaluated."""
        raise NotImplementedError

    def build_teacher(self) -> nn.Module:
        raise NotImplementedError

    def build_student(self) -> nn.Module:
        raise NotImplementedError

    def load_teacher_weights(self, model: nn.Module, path: str) -> nn.Module:
        """Load ``teacher.path`` into the teacher network. Domains that ship teachers resolve
        relative paths against their package here. Default: the path as given."""
        from kdlib.core.checkpoint import load_weights

        return load_weights(model, path)

    def results_table(self, results: dict, markdown: bool = False) -> str | None:
        """The results table ``kdlib distill``/``eval`` print (plain) and report.md opens with
        (markdown), for ``results`` (results.json's content); None: the generic one row per model,
        one column per metric."""
        return None

    def write_samples(self, model: nn.Module, out_dir: Path, count: int, steps: int) -> list[Path]:
        """``kdlib sample``: write ``count`` samples of a trained student (``steps`` sampling
        steps) under ``out_dir``; returns the files written. Generative domains implement it."""
        raise NotImplementedError(f"domain {self.name!r} does not generate samples")

    def export_student(self, model: nn.Module, out_dir: Path, format: str) -> Path:
        """``kdlib export``: write a trained student in another framework's format (e.g.
        "diffusers") under ``out_dir``; returns the folder written. Default: not supported."""
        raise NotImplementedError(f"domain {self.name!r} cannot export students (format {format!r})")

    def stage_data(self, train: TensorDataset, method: Method) -> TensorDataset:
        """The training data of one stage, given its method (built, with its teacher): ``train``
        itself, or ``train`` with what the method declares it needs from the domain attached to
        every row (image-gen: the teacher's ODE pairs for a method whose ``needs_ode_pairs`` is
        true). Called once per stage, before training and on resume: it must be deterministic.
        Default: ``train``."""
        return train

    def batch_order(self, train: TensorDataset, batch_size: int, seed: int) -> BatchOrder | None:
        """The order in which training examples are drawn; None: uniform, reshuffled each epoch."""
        return None

    def augment(self, batch: dict[str, torch.Tensor], role: str) -> dict[str, torch.Tensor]:
        """Training-time augmentation of a batch for ``role`` ("teacher" while the run trains its
        teacher, "student" otherwise: teachers often gain from stronger augmentation than a small
        student can absorb). Uses the global torch RNG, which checkpoints save. Default: none."""
        return batch

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: TensorDataset) -> dict[str, float]:
        raise NotImplementedError

    def report_sections(self, run_dir: Path, teacher: nn.Module, students: dict[str, nn.Module]) -> list[str]:
        """Extra markdown sections for report.md (sample grids, generations side by side, speed).
        ``students``: the first seed's final student per method, by method name. Default: none."""
        return []

    @classmethod
    def recipe_path(cls, name: str | None) -> Path:
        """A recipe by name (``classifier-kd``) from the domain's folder, or a path as given."""
        name = name or cls.default_recipe
        candidate = Path(name)
        if candidate.suffix in (".yaml", ".yml") and candidate.exists():
            return candidate
        if cls.recipes_dir is None:
            raise FileNotFoundError(f"domain {cls.name!r} has no recipes folder; pass a recipe file path")
        path = cls.recipes_dir / f"{name}.yaml"
        if not path.exists():
            available = sorted(p.stem for p in cls.recipes_dir.glob("*.yaml"))
            raise FileNotFoundError(f"domain {cls.name!r} has no recipe {name!r} (available: {', '.join(available)})")
        return path
