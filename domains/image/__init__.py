"""The image domain. Today: classic logit distillation of a digits classifier (recipe
``classifier-kd``); the generative recipes of the diffusion issues build on the same domain."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from domains.image.data import load_digits_splits, random_shift
from domains.image.metrics import classification_metrics
from domains.image.models import CNNClassifier, MLPClassifier
from kdlib.core.data import TensorDataset
from kdlib.core.domain import Domain, register_domain


@dataclass
class ImageDataConfig:
    test_fraction: float = 0.3
    split_seed: int = 0
    train_limit: int = 0  # use only the first N training images (0: all), for small-data studies
    # Training augmentation: random shifts by up to this many pixels. The CNN teacher learns
    # shift invariance from it; the MLP student, which has no such prior, trains best unshifted
    # and inherits some of that knowledge through the teacher's soft targets.
    teacher_max_shift: int = 1
    student_max_shift: int = 0


@dataclass
class ImageModelConfig:
    teacher_channels: list[int] = field(default_factory=lambda: [32, 64, 128])
    student_hidden: list[int] = field(default_factory=lambda: [32])


@register_domain("image")
class ImageDomain(Domain):
    DataConfig = ImageDataConfig
    ModelConfig = ImageModelConfig
    recipes_dir = Path(__file__).parent / "recipes"
    default_recipe = "default"
    # ``kdlib distill image`` runs the generative default (recipes/default.yaml), so
    # ``kdlib train-teacher image`` reproduces its shipped teacher too; the classifier recipe
    # trains its own teacher inside the run.
    teacher_trainer = "domains.image.train_teacher"
    primary_metric = ("accuracy", True)

    def datasets(self) -> dict[str, TensorDataset]:
        splits = load_digits_splits(self.data_config.test_fraction, self.data_config.split_seed)
        if self.data_config.train_limit:
            train = splits["train"]
            splits["train"] = train.subset(torch.arange(min(self.data_config.train_limit, len(train))))
        return splits

    def build_teacher(self) -> torch.nn.Module:
        return CNNClassifier(self.model_config.teacher_channels)

    def build_student(self) -> torch.nn.Module:
        return MLPClassifier(self.model_config.student_hidden)

    def augment(self, batch: dict[str, torch.Tensor], role: str) -> dict[str, torch.Tensor]:
        shift = self.data_config.teacher_max_shift if role == "teacher" else self.data_config.student_max_shift
        return {**batch, "x": random_shift(batch["x"], shift)}

    def evaluate(self, model: torch.nn.Module, split: TensorDataset) -> dict[str, float]:
        return classification_metrics(model, split)


# The generative recipes are a second registered domain, ``image-gen`` (domains/image/gen.py).
from domains.image import gen as _gen  # noqa: E402, F401
