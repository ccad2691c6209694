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
    max_shift: int = 1  # training augmentation: random shift by up to this many pixels


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

    def augment(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {**batch, "x": random_shift(batch["x"], self.data_config.max_shift)}

    def evaluate(self, model: torch.nn.Module, split: TensorDataset) -> dict[str, float]:
        return classification_metrics(model, split)
