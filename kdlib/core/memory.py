"""The memory one training step takes, estimated before anything is allocated
(``kdlib distill ... --dry-run``), and measured on a GPU to check the estimate.

How the estimate is made, per stage of the run:

1. The method, with its teacher, student, EMA copies and every network it declares, is built
   under ``torch.device("meta")``: shapes and dtypes, no storage, no initialisation compute.
2. Every parameter and buffer is swapped for a FakeTensor on the run's device (torch's
   FakeTensorMode: real dtypes, devices and dispatch, autocast included, and no memory); a
   tensor two networks share (a LoRA fake score on the teacher's weights) stays shared. Building
   under FakeTensorMode directly is not possible: torch cannot ``.to()`` fake parameters, which
   Teacher does (so neither may a loss). ``torch.func.jvp`` runs too (``_MetaMeansTheDevice``).
3. One micro-batch (``batch_size / grad_accum / processes`` examples of the real data) runs the
   method's loss for every parameter group, forward and backward, under the trainer's precision,
   at the run's first and at its last step (a loss may change with the step: a warm-up that
   switches a term on, a second phase); the larger counts. ``torch.autograd.graph.saved_tensors_hooks``
   sees each tensor autograd keeps for the backward; their storages, each counted once and the
   weights left out (and forward AD's zero tangents, which hold none), are the group's activations
   (under bf16 autocast these include the bf16 copies of the weights the matmuls save).
4. The trainer's own optimizers step on the fake gradients: what they allocate is the optimizer
   state (AdamW: exp_avg and exp_avg_sq, two per parameter at its dtype; SGD with momentum: one;
   CPU-side step counters are not device memory and are not counted), for every trainable
   parameter, also one this step's loss gives no gradient (a later phase's expert): over the run
   each gets its state at its first update.

The step's peak is then estimated as

    data + weights + gradients + optimizer state + max over groups of max(activations, step temporaries)

the train split lives on the device (the trainer moves it there); every group's gradients stay
alive between its updates (zero_grad(set_to_none) runs only before a group's own update); a
group's activations and the optimizer step's temporaries (torch's foreach AdamW, the CUDA
default, holds sqrt(exp_avg_sq) of the whole group at once) never coexist. Counting the full
gradients beside the activations over-estimates a little (the backward frees activations as it
makes gradients) and stands in for the transient tensors the backward makes. Not counted: transient
tensors not saved for backward (a no-grad teacher's layer outputs, the loss's intermediates), the
CUDA caching allocator's rounding and cuBLAS workspaces, DDP's gradient buckets (about one more
copy of the gradients under torchrun). ``measure_training_peak`` is the check on a GPU:
``torch.cuda.max_memory_allocated`` around real training steps of the same method.
"""

from __future__ import annotations

import gc
import os
import tempfile
import traceback
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch._subclasses.fake_tensor import (
    DataDependentOutputException,
    DynamicOutputShapeException,
    FakeTensor,
    FakeTensorMode,
    UnsupportedOperatorException,
)
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_map

from kdlib.core.data import TensorDataset
from kdlib.core.method import Method
from kdlib.core.run_config import TrainConfig
from kdlib.core.trainer import _make_optimizer, uses_bf16

DTYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}


@dataclass
class NetworkMemory:
    """One network of a stage. ``params``: parameters it holds that no earlier row holds;
    ``shared``: parameters it shares with an earlier row (counted there); bytes at their dtypes,
    ``weights`` = its own parameters and buffers."""

    name: str
    params: int
    shared: int
    dtypes: str
    weights: int
    grads: int
    optimizer: int


@dataclass
class StageMemory:
    name: str
    method: str
    device: str
    precision: str  # "bf16 autocast" or "fp32"
    micro_batch: int
    optimizer_name: str
    networks: list[NetworkMemory] = field(default_factory=list)
    data: int = 0  # the train split, which the trainer keeps on the device
    activations: dict[str, int] = field(default_factory=dict)  # per group, one micro-batch
    step_temporaries: dict[str, int] = field(default_factory=dict)  # per group
    # Groups whose loss could not run on fake tensors (it reads tensor values), and where: their
    # activations are missing from the peak; gradients and optimizer state are still exact.
    unmeasured: dict[str, str] = field(default_factory=dict)
    note: str = ""

    @property
    def weights(self) -> int:
        return sum(n.weights for n in self.networks)

    @property
    def grads(self) -> int:
        return sum(n.grads for n in self.networks)

    @property
    def optimizer(self) -> int:
        return sum(n.optimizer for n in self.networks)

    @property
    def transient(self) -> int:
        groups = set(self.activations) | set(self.step_temporaries)
        return max((max(self.activations.get(g, 0), self.step_temporaries.get(g, 0)) for g in groups), default=0)

    @property
    def peak(self) -> int:
        return self.data + self.weights + self.grads + self.optimizer + self.transient


# -- counting storages ----------------------------------------------------------------------------
class _Storages:
    """Bytes of distinct storages: views of one tensor, or a tensor met twice, count once. The
    storages are kept referenced so that their ids stay unique while counting."""

    def __init__(self, exclude: Iterable[torch.Tensor] = ()):
        self._skip = {id(t.untyped_storage()): t.untyped_storage() for t in exclude}
        self._seen: dict[int, Any] = {}

    def add(self, t: torch.Tensor) -> int:
        """Count ``t``'s storage if new; returns the bytes it added."""
        if t._is_zerotensor():  # forward AD's zero tangents hold no memory (their fakes would count)
            return 0
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._skip or key in self._seen:
            return 0
        self._seen[key] = storage
        return storage.nbytes()

    @property
    def total(self) -> int:
        return sum(s.nbytes() for s in self._seen.values())

    def clear(self) -> None:
        self._skip, self._seen = {}, {}


@contextmanager
def saved_tensor_bytes(exclude: Iterable[torch.Tensor] = ()) -> Iterator[Callable[[], int]]:
    """Inside the block, count the tensors autograd saves for backward: yields a function giving
    the bytes (each storage once; ``exclude``'s storages, e.g. the weights, left out). The
    storages are let go at the end of the block, so that real tensors are freed by the backward."""
    storages = _Storages(exclude)
    final: list[int] = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        storages.add(t)
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            yield lambda: final[0] if final else storages.total
    finally:
        final.append(storages.total)
        storages.clear()


# -- building on meta, running on fake --------------------------------------------------------------
def _networks(method: Method) -> dict[str, nn.Module]:
    """Every network the method holds, by row name: teacher, trainable groups, EMA copies, then
    any other module attribute of the method (e.g. a frozen discriminator backbone)."""
    out: dict[str, nn.Module] = {}
    if method.teacher is not None:
        out["teacher"] = method.teacher.model
    out.update(method.trainable_modules())
    for decay, ema in zip(method.student.ema_decays, method.student.ema):
        out[f"student ema {decay:g}"] = ema
    known = {id(m) for m in (*out.values(), method.student, method.teacher)}
    for attr, value in vars(method).items():
        if isinstance(value, nn.Module) and id(value) not in known:
            out[attr] = value
    return out


def _to_fake(roots: Iterable[nn.Module], mode: FakeTensorMode, device: torch.device) -> None:
    """Swap every parameter and buffer under ``roots`` for an empty FakeTensor on ``device`` (same
    shape, stride, dtype, requires_grad), in place; one tensor met twice gets one fake."""
    memo: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # id -> (original kept alive, fake)

    def fake(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in memo:
            with mode:
                new = torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=device)
                if isinstance(t, nn.Parameter):
                    new = nn.Parameter(new, requires_grad=t.requires_grad)
            memo[id(t)] = (t, new)
        return memo[id(t)][1]

    # A module reachable from two roots (Teacher and Teacher.model; a LoRA critic sharing the
    # teacher's layers) is swapped once: a second pass would fake the fakes and split shared weights.
    seen: set[int] = set()
    for root in roots:
        for module in root.modules():
            if id(module) in seen:
                continue
            seen.add(id(module))
            for name, p in list(module.named_parameters(recurse=False)):
                setattr(module, name, fake(p))
            for name, b in list(module.named_buffers(recurse=False)):
                setattr(module, name, fake(b))


class _MetaMeansTheDevice(TorchDispatchMode):
    """Inside a FakeTensorMode running a step on ``device``: the meta tensors that escape torch's
    ZeroTensor kernels count as tensors on ``device``.

    Forward-mode AD (``torch.func.jvp``, sCM's dF/dt) gives a parameter, which has no tangent, an
    efficient zero tangent wherever a derivative formula needs one (LayerNorm's weight and bias).
    torch's ZeroTensor kernels work on meta copies of their inputs, and under FakeTensorMode some
    of that leaks out (pytorch#185718, #186160): a view of a zero tangent comes back as a plain
    meta tensor, and a binary op with one picks meta as its output device, so the next op fails
    with a meta/CPU device mismatch. A step on fakes never computes on meta, so here plain meta
    inputs become fakes on ``device``, and a zero tensor or copy asked for on meta is made on
    ``device`` (shapes and dtypes unchanged; ZeroTensor kernels' own ``.to("meta")`` is left alone).
    """

    _MOVED = (torch.ops.aten._efficientzerotensor.default, torch.ops.aten._to_copy.default)

    def __init__(self, mode: FakeTensorMode, device: torch.device):
        super().__init__()
        self.mode, self.device = mode, device

    def _adopt(self, t: Any) -> Any:
        if isinstance(t, torch.Tensor) and not isinstance(t, FakeTensor) and t.device.type == "meta":
            return self.mode.fake_tensor_converter.from_meta_and_device(self.mode, t, self.device)
        return t

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in self._MOVED and kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "meta":
            kwargs = {**kwargs, "device": self.device}
        args, kwargs = tree_map(self._adopt, (args, kwargs))
        return func(*args, **kwargs)


def _step_temporaries(params: list[nn.Parameter], cfg: TrainConfig, device: torch.device) -> int:
    """Bytes an optimizer step allocates and frees. torch's default is the foreach path on CUDA,
    the per-parameter loop elsewhere: foreach AdamW holds sqrt(exp_avg_sq) of every parameter at
    once, the loop two temporaries of one parameter; SGD updates in place except for the weight
    decay term (one gradient-sized sum)."""
    sizes = [p.numel() * p.element_size() for p in params]
    if not sizes or (cfg.optimizer == "sgd" and not cfg.weight_decay):
        return 0
    if device.type == "cuda":
        return sum(sizes)
    return max(sizes) * (2 if cfg.optimizer == "adamw" else 1)


def estimate_training(
    build_method: Callable[[], Method],
    data: TensorDataset,
    cfg: TrainConfig,
    *,
    device: torch.device | str = "cpu",
    name: str = "train",
    augment: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
    world_size: int = 1,
    resident: Callable[[], dict[str, nn.Module]] | None = None,
    stage_data: Callable[[TensorDataset, Method], TensorDataset] | None = None,
) -> StageMemory:
    """The memory of one training step of the method ``build_method()`` returns (it is called
    under ``torch.device("meta")``: build teacher, student and method there) on ``data`` (its
    first micro-batch gives the shapes) with ``cfg``, for a run on ``device``. ``resident()``
    (also called on meta) names networks that stay on the device without taking part (e.g. the
    run's teacher while the no-teacher baseline trains). See the module docstring for what is
    counted. ``stage_data(data, method)`` (``Domain.stage_data``, given the meta-built method)
    gives the stage's own training data. Nothing is allocated on ``device``.

    A CUDA run can be estimated on a machine without CUDA: the step then runs on fake CPU tensors
    under CPU autocast (whose op lists differ slightly from CUDA's), noted in the result.
    """
    device = torch.device(device)
    compute = device
    note = ""
    if device.type == "cuda" and not torch.cuda.is_available():
        compute, note = torch.device("cpu"), "no CUDA here: estimated on fake CPU tensors with CPU autocast"
    bf16 = uses_bf16(cfg, device)
    micro = cfg.batch_size // (world_size * cfg.grad_accum)
    with torch.device("meta"):
        method = build_method()
        extra = resident() if resident is not None else {}
    if stage_data is not None:
        data = stage_data(data, method)
    batch = {k: v[:micro].clone() for k, v in data.tensors.items()}
    if augment is not None:
        batch = augment(batch)
    stage = StageMemory(name=name, method=method.name, device=str(device),
                        precision="bf16 autocast" if bf16 else "fp32", micro_batch=micro,
                        optimizer_name=cfg.optimizer, note=note,
                        data=sum(t.numel() * t.element_size() for t in data.tensors.values()))
    networks = {**_networks(method), **extra}
    mode = FakeTensorMode(allow_non_fake_inputs=True)  # tensors a method made at build time are taken as they are
    _to_fake([m for m in (method.teacher, method.student, *networks.values()) if m is not None], mode, compute)
    modules = method.trainable_modules()
    optimizers = {g: _make_optimizer([p for p in m.parameters() if p.requires_grad], cfg) for g, m in modules.items()}
    weights = [t for m in networks.values() for t in (*m.parameters(), *m.buffers())]
    joint = {g2 for g in modules for g2 in method.trained_with(g)}
    autocast = (lambda: torch.autocast(compute.type, dtype=torch.bfloat16)) if bf16 else nullcontext

    with mode, _MetaMeansTheDevice(mode, compute):
        fake_batch = {k: mode.from_tensor(v).to(compute) for k, v in batch.items()}
        # A loss can change with the step (a warm-up that switches a term on, a second phase):
        # each group's activations are the larger of its first and its last step's.
        for step in sorted({0, max(cfg.steps - 1, 0)}):
            method.update_groups(step)  # methods that follow the step (schedules, curricula) set it here
            for group in (g for g in modules if g not in joint):
                _estimate_group(stage, method, group, fake_batch, modules, optimizers, weights, autocast, cfg, device)
        stage.networks = _network_rows(networks, optimizers, modules, compute)
    return stage


def _estimate_group(stage: StageMemory, method: Method, group: str, batch: dict[str, torch.Tensor],
                    modules: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                    weights: list[torch.Tensor], autocast: Callable, cfg: TrainConfig, device: torch.device) -> None:
    """One update of ``group`` (and the groups trained with it) on fake ``batch``: its loss's
    saved tensors (the larger of this and an earlier step's), backward, optimizer steps."""
    updated = [group, *method.trained_with(group)]
    for g in updated:
        optimizers[g].zero_grad(set_to_none=True)
    try:
        with saved_tensor_bytes(exclude=weights) as saved, autocast():
            loss, _ = method.loss(batch, group)
        stage.activations[group] = max(stage.activations.get(group, 0), saved())
        loss.backward()
    except FAKE_ERRORS as exc:
        stage.unmeasured.setdefault(group, _where(exc))
        for p in (p for g in updated for p in modules[g].parameters() if p.requires_grad):
            p.grad = torch.zeros_like(p)  # the gradients the backward would have made
    for g in updated:
        params = [p for p in modules[g].parameters() if p.requires_grad]
        # Every trainable parameter gets its optimizer state at its first update, whichever step
        # that is (a phase's expert, a term that starts later): zero gradients for the ones this
        # loss left out make the optimizer allocate it, and are taken back after the step.
        idle = [p for p in params if p.grad is None]
        for p in idle:
            p.grad = torch.zeros_like(p)
        optimizers[g].step()
        for p in idle:
            p.grad = None
    stage.step_temporaries[group] = sum(
        _step_temporaries([p for p in modules[g].parameters() if p.requires_grad], cfg, device) for g in updated
    )


# What a loss that needs tensor values (float(t), t.item(), t.nonzero()) raises on fake tensors.
FAKE_ERRORS = (DataDependentOutputException, DynamicOutputShapeException, UnsupportedOperatorException)


def _where(exc: Exception) -> str:
    """``file.py:line`` of the innermost frame outside torch and this module (whose dispatch mode
    sees every op): the line that needs values."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if f"{os.sep}torch{os.sep}" not in f.filename and f.filename != __file__]
    frame = frames[-1] if frames else traceback.extract_tb(exc.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


def _network_rows(networks: dict[str, nn.Module], optimizers: dict[str, torch.optim.Optimizer],
                  modules: dict[str, nn.Module], device: torch.device) -> list[NetworkMemory]:
    weights, grads, states = _Storages(), _Storages(), _Storages()
    owner: dict[int, str] = {}
    rows = []
    for name, net in networks.items():
        own = [p for p in net.parameters() if id(p) not in owner]
        shared = [p for p in net.parameters() if id(p) in owner]
        for p in own:
            owner[id(p)] = name
        row = NetworkMemory(
            name=name, params=sum(p.numel() for p in own), shared=sum(p.numel() for p in shared),
            dtypes="/".join(sorted({DTYPE_NAMES.get(p.dtype, str(p.dtype)) for p in net.parameters()})) or "-",
            weights=sum(weights.add(t) for t in (*own, *net.buffers())),
            grads=sum(grads.add(p.grad) for p in own if p.grad is not None),
            optimizer=0,
        )
        if name in modules:
            opt = optimizers[name]
            row.optimizer = sum(states.add(v) for p in own for v in opt.state.get(p, {}).values()
                                if torch.is_tensor(v) and v.device.type == device.type)
        rows.append(row)
    return rows


# -- a run's stages ---------------------------------------------------------------------------------
def estimate_run(cfg: Any) -> list[StageMemory]:
    """One StageMemory per training stage of run config ``cfg`` (the first seed's: seeds repeat
    them): the teacher's own training if the run trains it, then every student stage."""
    from kdlib.core.domain import DOMAINS
    from kdlib.core.experiment import DTYPES
    from kdlib.core.method import METHODS
    from kdlib.core.models import Student, Teacher
    from kdlib.core.stages import student_stages
    from kdlib.core.trainer import resolve_device

    def new_domain():
        return DOMAINS.get(cfg.domain)(cfg.data, cfg.model)

    domain = new_domain()
    train_data = domain.datasets()["train"]
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    out = []

    def estimate(name, method_name, method_cfg, role, with_teacher, train, resident_teacher=False):
        # Each stage builds its networks from a domain of its own: a domain may keep what it built
        # (the llm domain's loaded teacher, which its students are cut from), and the estimate
        # turns a stage's networks into fakes in place, which a later build could not .to() again.
        nets = new_domain()

        def teacher():
            return Teacher(nets.build_teacher(), device="meta", dtype=DTYPES[cfg.teacher.dtype])

        def build():
            student = Student(nets.build_teacher() if role == "teacher" else nets.build_student(),
                              ema_decays=train.ema_decays)
            return METHODS.get(method_name)(method_cfg, student, teacher() if with_teacher else None)

        # Experiment.run keeps the teacher on the device for every student stage, baseline included.
        resident = (lambda: {"teacher (kept, unused)": teacher().model}) if resident_teacher else None
        out.append(estimate_training(build, train_data, train, device=resolve_device(train.device), name=name,
                                     augment=lambda b: domain.augment(b, role), world_size=world_size,
                                     resident=resident, stage_data=domain.stage_data))

    if cfg.teacher.path is None and not domain.teacher_is_pretrained:
        estimate("teacher", cfg.teacher.method, METHODS.get(cfg.teacher.method).Config(), "teacher", False,
                 cfg.teacher.train)
    for plan in student_stages(cfg):
        estimate(f"seed{cfg.seeds[0]}-{plan.name}", plan.method, plan.method_args, "student", plan.with_teacher,
                 plan.train, resident_teacher=not plan.with_teacher)
    return out


# -- the report -------------------------------------------------------------------------------------
def human(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError


def format_stage(stage: StageMemory) -> str:
    header = ["network", "params", "dtype", "weights", "grads", "optimizer"]
    rows = []
    for n in stage.networks:
        params = f"{n.params:,}" + (f" (+{n.shared:,} shared)" if n.shared else "")
        rows.append([n.name, params, n.dtypes, human(n.weights), human(n.grads) if n.grads else "-",
                     human(n.optimizer) if n.optimizer else "-"])
    rows.append(["total", f"{sum(n.params for n in stage.networks):,}", "", human(stage.weights),
                 human(stage.grads), human(stage.optimizer)])
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    table = ["  " + "  ".join(c.ljust(w) if i < 3 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in [header, *rows]]
    groups = ", ".join([*(f"{g} {human(b)}" for g, b in stage.activations.items()),
                        *(f"{g} not estimated (its loss reads tensor values at {where})"
                          for g, where in stage.unmeasured.items())])
    temps = ", ".join(f"{g} {human(b)}" for g, b in stage.step_temporaries.items())
    totals = [
        ("data (train split, on the device)", human(stage.data)),
        ("activations of one micro-batch", groups),
        ("optimizer step temporaries", temps),
        ("peak estimate", f"{human(stage.peak)} = data + weights + grads + optimizer"
                          " + max(activations, step temporaries)"
                          + (" (a lower bound: activations missing)" if stage.unmeasured else "")),
    ]
    width = max(len(label) for label, _ in totals)
    head = (f"stage {stage.name}: {stage.method}, {stage.optimizer_name}, {stage.precision} on {stage.device}, "
            f"micro-batch {stage.micro_batch}" + (f" ({stage.note})" if stage.note else ""))
    return "\n".join([head, *table, *(f"  {label:<{width}}  {value}" for label, value in totals)])


def format_run(stages: list[StageMemory]) -> str:
    body = "\n\n".join(format_stage(s) for s in stages)
    worst = max(stages, key=lambda s: s.peak)
    return f"{body}\n\nrun peak estimate: {human(worst.peak)} (stage {worst.name}); nothing was allocated or trained"


# -- the check on a GPU -----------------------------------------------------------------------------
def measure_training_peak(method: Method, data: TensorDataset, cfg: TrainConfig, *, steps: int = 2) -> int:
    """``torch.cuda.max_memory_allocated`` (bytes) over ``steps`` real training steps of
    ``method`` (its networks already on the GPU) by the Trainer, from its construction (which
    moves ``data`` to the device) to the end of its last step: the first step allocates the
    optimizer state, the second runs with it, so the peak is the steady one."""
    from kdlib.core.trainer import Trainer

    device = next(method.student.model.parameters()).device
    if device.type != "cuda":
        raise ValueError(f"measure_training_peak needs the method's networks on a CUDA device, not {device}")
    cfg = replace(cfg, steps=steps, checkpoint_every=10**9, eval_every=0, log_every=10**9, progress=False)
    gc.collect()  # an earlier run's optimizer state, held in a cycle with its LR schedule, would count
    with tempfile.TemporaryDirectory() as stage_dir:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        trainer = Trainer(method, data, cfg, stage_dir=stage_dir, seed=0)
        for _ in range(steps):  # fit()'s loop body without its checkpoint at the end
            for group in method.update_groups(trainer.step):
                trainer._update(group)
            trainer.step += 1
            method.student.update_ema()
        torch.cuda.synchronize(device)
        peak = torch.cuda.max_memory_allocated(device)
        trainer.log.close()
    del trainer
    gc.collect()
    return peak
