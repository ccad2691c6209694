"""The training loop every method runs in.

Per step: for each parameter group the method updates at this step, one global batch (split over
ranks, then into ``grad_accum`` micro-batches) -> loss -> backward -> non-finite guard -> clip ->
optimizer and schedule step; then EMA (on steps where the student took an update). Evaluation,
logging and checkpoints at their intervals.

Several groups (e.g. DMD2's generator and critic, N critic updates per generator update):
- every group's learning-rate schedule follows the trainer's global step, not the group's own
  update count, so all schedules span ``train.steps`` and end together;
- ``train.group_lr`` sets a group's base learning rate (default ``train.lr``);
- each group is wrapped (DDP under torchrun, looking for parameters a backward pass leaves without
  a gradient only where ``Method.unused_parameters`` says so) and handed to ``Method.bind_wrapped``;
  the groups ``trained_with`` another share its backward passes and its gradient averaging.

Guarantees:
- exact resume: a checkpoint holds model, EMA, optimizer, schedule, every RNG and the data
  position, so a run killed at any moment and resumed ends bit-identical (CPU) to one that was not;
- a non-finite loss or gradient skips the update (logged and warned), ``max_nonfinite_steps`` in a
  row abort the run, and a non-finite checkpoint is never written;
- under torchrun, DistributedDataParallel over each trainable group (the method gets every
  wrapper through ``Method.bind_wrapped``); the main process alone writes files.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from contextlib import ExitStack, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from kdlib.core import checkpoint as ckpt
from kdlib.core import distributed
from kdlib.core.data import BatchOrder, TensorDataset
from kdlib.core.method import Method
from kdlib.core.metrics_log import MetricsLog
from kdlib.core.run_config import TrainConfig
from kdlib.core.state import (
    capture_rng,
    flatten_state,
    prefixed,
    restore_rng,
    restore_torch_rng,
    seed_rank,
    torch_rng_tensors,
    unflatten_state,
    unprefixed,
)


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _lr_lambda(cfg: TrainConfig) -> Callable[[int], float]:
    def factor(step: int) -> float:
        if cfg.warmup_steps and step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        span = max(1, cfg.steps - cfg.warmup_steps)
        progress = min(1.0, (step - cfg.warmup_steps) / span)
        if cfg.schedule == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if cfg.schedule == "linear":
            return 1.0 - progress
        return 1.0

    return factor


def uses_bf16(cfg: TrainConfig, device: torch.device) -> bool:
    """Whether the loop runs the loss under bf16 autocast (fp32 parameters as master weights)."""
    return cfg.precision == "bf16" or (cfg.precision == "auto" and device.type == "cuda")


def _make_optimizer(params: list[nn.Parameter], cfg: TrainConfig, lr: float | None = None) -> torch.optim.Optimizer:
    lr = cfg.lr if lr is None else lr
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def group_lrs(cfg: TrainConfig, groups: list[str]) -> dict[str, float]:
    """Each group's base learning rate: ``cfg.group_lr`` where it names the group, else ``cfg.lr``.
    A name that is not one of ``groups`` raises ValueError listing the valid ones."""
    unknown = sorted(set(cfg.group_lr) - set(groups))
    if unknown:
        raise ValueError(
            f"train.group_lr names {', '.join(map(repr, unknown))}, which the method does not train; "
            f"its parameter groups are: {', '.join(map(repr, groups))}"
        )
    return {g: float(cfg.group_lr.get(g, cfg.lr)) for g in groups}


class GlobalStepLR(torch.optim.lr_scheduler.LambdaLR):
    """A LambdaLR whose factor is taken at the trainer's global step (``global_step``) rather than
    at ``last_epoch``, which still counts this group's own updates. ``at(step)`` sets the learning
    rate for an update at global step ``step``. Both counters are in ``state_dict`` (checkpoints)."""

    def __init__(self, optimizer: torch.optim.Optimizer, factor: Callable[[int], float]):
        self.global_step = 0
        super().__init__(optimizer, factor)

    def get_lr(self) -> list[float]:
        return [base * lmbda(self.global_step) for lmbda, base in zip(self.lr_lambdas, self.base_lrs, strict=True)]

    def at(self, step: int) -> None:
        self.global_step = step
        for group, lr in zip(self.optimizer.param_groups, self.get_lr(), strict=True):
            group["lr"] = lr
        self._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def step_after_update(self, step: int) -> None:
        """After an optimizer step at global step ``step``: count the update, and set the rate the
        next step (``step + 1``) would use, as a plain LambdaLR.step() does for a single group."""
        self.global_step = step + 1
        self.step()


class Trainer:
    """Runs ``method`` on ``data`` for ``cfg.steps`` steps, checkpointing into ``stage_dir``.

    ``evaluate(step)`` returns metrics (called on the main process only); ``augment(batch)``
    transforms each micro-batch; ``order`` replaces the default uniform shuffled batch order.
    ``fit()`` resumes from the newest valid checkpoint if any.
    """

    def __init__(
        self,
        method: Method,
        data: TensorDataset,
        cfg: TrainConfig,
        *,
        stage_dir: str | Path,
        seed: int,
        evaluate: Callable[[int], dict[str, float]] | None = None,
        augment: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]] | None = None,
        description: str = "train",
        order: BatchOrder | None = None,
    ):
        self.method = method
        self.cfg = cfg
        self.stage_dir = Path(stage_dir)
        self.evaluate = evaluate
        self.augment = augment
        self.description = description
        self.dist = distributed.current()
        self.device = next(method.student.model.parameters()).device
        self.data = data.to(self.device)
        if cfg.batch_size % (self.dist.world_size * cfg.grad_accum):
            raise ValueError(
                f"batch_size={cfg.batch_size} must be divisible by world_size*grad_accum="
                f"{self.dist.world_size}*{cfg.grad_accum}"
            )
        # A domain may bring its own order (e.g. a re-weighted mixture of text domains); it must
        # keep BatchOrder's interface, including state()/load_state() for exact resume.
        self.seed = seed
        self.order = order or BatchOrder(size=len(data), batch_size=cfg.batch_size, seed=seed)
        self.modules = method.trainable_modules()
        lrs = group_lrs(cfg, list(self.modules))
        self.wrapped = {name: self._wrap(name, m) for name, m in self.modules.items()}
        for name, wrapped in self.wrapped.items():
            method.bind_wrapped(name, wrapped)
        self.optimizers = {
            name: _make_optimizer([p for p in m.parameters() if p.requires_grad], cfg, lrs[name])
            for name, m in self.modules.items()
        }
        self.schedules = {name: GlobalStepLR(opt, _lr_lambda(cfg)) for name, opt in self.optimizers.items()}
        self.step = 0
        self.nonfinite_in_a_row = 0
        self.autocast = (
            (lambda: torch.autocast(self.device.type, dtype=torch.bfloat16)) if uses_bf16(cfg, self.device)
            else nullcontext
        )
        self.log = MetricsLog(self.stage_dir, stage=description, enabled=self.dist.is_main)

    # -- set-up -----------------------------------------------------------------------------------
    def _wrap(self, name: str, module: nn.Module) -> nn.Module:
        if not self.dist.enabled:
            return module
        wrapped = DistributedDataParallel(
            module, device_ids=[self.device.index] if self.device.type == "cuda" else None,
            find_unused_parameters=self.method.unused_parameters(name),
        )
        if name == "student":
            self.method.student.forward_module = wrapped
        return wrapped

    # -- checkpoints ------------------------------------------------------------------------------
    def state_tensors(self) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        tensors: dict[str, torch.Tensor] = {}
        meta: dict[str, Any] = {"optimizers": {}, "schedules": {}}
        for name, module in self.modules.items():
            for key, value in module.state_dict().items():
                tensors[f"model/{name}/{key}"] = value
            meta["optimizers"][name] = flatten_state(f"optim/{name}", self.optimizers[name].state_dict(), tensors)
            meta["schedules"][name] = self.schedules[name].state_dict()
        for i, ema in enumerate(self.method.student.ema):
            for key, value in ema.state_dict().items():
                tensors[f"ema/{i}/{key}"] = value
        meta["rng"] = capture_rng(tensors)
        meta["data_order"] = self.order.state()
        meta["nonfinite_in_a_row"] = self.nonfinite_in_a_row
        meta["ema_decays"] = self.method.student.ema_decays
        return tensors, meta

    def _rank_tensors(self) -> dict[str, torch.Tensor]:
        """This process's own part of a checkpoint: its torch RNG streams (rank 0's are also the
        main state) and the method's state (``Method.state_tensors``: caches differ per rank)."""
        rank = self.dist.rank
        tensors = torch_rng_tensors(f"rng/rank{rank}/") if rank else {}
        state = {k: v.detach().to("cpu") for k, v in self.method.state_tensors().items()}
        return {**tensors, **prefixed(f"method/rank{rank}/", state)}

    def save(self) -> None:
        # Every rank takes part: each sends its own RNG streams and method state to rank 0.
        ranks = distributed.gather_to_main(self._rank_tensors())
        if self.dist.is_main:
            tensors, meta = self.state_tensors()
            meta["rng"]["world_size"] = self.dist.world_size
            for states in ranks:
                tensors.update(states)
            directory = self.stage_dir / "checkpoints"
            ckpt.save_checkpoint(directory, self.step, tensors, meta, keep=self.cfg.keep_checkpoints)
        distributed.barrier()

    def _load_module(self, module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        module.load_state_dict(unprefixed(tensors, prefix), strict=True)

    def restore(self) -> bool:
        """Load the newest valid checkpoint of this stage, if any; True if one was loaded."""
        found = ckpt.latest_checkpoint(self.stage_dir / "checkpoints")
        if found is None:
            return False
        tensors, meta = found.tensors, found.meta
        if meta.get("ema_decays") != self.method.student.ema_decays:
            raise ckpt.CheckpointError(
                f"checkpoint {found.path} has EMA decays {meta.get('ema_decays')}, the config asks for "
                f"{self.method.student.ema_decays}"
            )
        for name, module in self.modules.items():
            self._load_module(module, f"model/{name}/", tensors)
            state = unflatten_state(meta["optimizers"][name], tensors)
            self.optimizers[name].load_state_dict(state)
            self.schedules[name].load_state_dict(meta["schedules"][name])
        for i, ema in enumerate(self.method.student.ema):
            self._load_module(ema, f"ema/{i}/", tensors)
        restore_rng(meta["rng"], tensors)
        self._restore_rank_rng(meta["rng"], tensors, found.path, found.step)
        self._restore_method_state(meta["rng"], tensors, found.path)
        self.order.load_state(meta["data_order"])
        self.nonfinite_in_a_row = meta["nonfinite_in_a_row"]
        self.step = found.step
        if self.dist.is_main:
            self.log.truncate_after(self.step)
        return True

    def _restore_rank_rng(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path,
                          step: int) -> None:
        """Ranks > 0 take back their own torch streams (rank 0's is the checkpoint's main state)."""
        rank = self.dist.rank
        if rank == 0:
            return
        if meta.get("world_size") == self.dist.world_size and restore_torch_rng(tensors, f"rng/rank{rank}/"):
            return
        warnings.warn(
            f"{path} was written by {meta.get('world_size', 1)} process(es), this run has "
            f"{self.dist.world_size}: rank {rank} continues on a fresh random stream, so the resumed run "
            "is not bit-identical to an uninterrupted one", RuntimeWarning, stacklevel=2)
        seed_rank(self.seed + step, rank, self.description)

    def _restore_method_state(self, meta: dict[str, Any], tensors: dict[str, torch.Tensor], path: Path) -> None:
        state = unprefixed(tensors, f"method/rank{self.dist.rank}/")
        written_by = meta.get("world_size", 1)
        if written_by != self.dist.world_size and any(k.startswith("method/") for k in tensors):
            warnings.warn(
                f"{path} was written by {written_by} process(es), this run has {self.dist.world_size}: "
                f"the method {self.method.name!r} starts its state (e.g. cached teacher samples) afresh",
                RuntimeWarning, stacklevel=2)
            state = {}
        self.method.load_state_tensors(state)

    # -- the loop ---------------------------------------------------------------------------------
    def _micro_batches(self) -> list[dict[str, torch.Tensor]]:
        index = self.order.next_local(self.dist.rank, self.dist.world_size).to(self.device)
        batch = self.data.batch(index)
        chunks = [
            {k: v.chunk(self.cfg.grad_accum)[i] for k, v in batch.items()} for i in range(self.cfg.grad_accum)
        ]
        return [self.augment(c) if self.augment else c for c in chunks]

    def _update(self, group: str) -> dict[str, float]:
        """One optimizer step of ``group``; returns what to log (``skipped`` if non-finite)."""
        groups = [group, *self.method.trained_with(group)]
        for g in groups:
            self.optimizers[g].zero_grad(set_to_none=True)
        wrapped = [self.wrapped[g] for g in groups if isinstance(self.wrapped[g], DistributedDataParallel)]
        micro = self._micro_batches()
        # Values stay on the device until one transfer after the backward passes: a host sync per
        # micro-batch would stall the GPU pipeline.
        loss_sum = torch.zeros((), device=self.device)
        totals: dict[str, torch.Tensor | float] = {}
        for i, batch in enumerate(micro):
            with ExitStack() as stack:
                if i < len(micro) - 1:  # gradients are averaged once, after the last micro-batch
                    for w in wrapped:
                        stack.enter_context(w.no_sync())
                stack.enter_context(self.autocast())
                loss, values = self.method.loss(batch, group)
            (loss / len(micro)).backward()
            loss_sum += loss.detach().float() / len(micro)
            for k, v in values.items():
                totals[k] = totals.get(k, 0.0) + (v.detach().float() if torch.is_tensor(v) else v) / len(micro)
        params = [p for g in groups for p in self.modules[g].parameters() if p.grad is not None]
        norm = torch.nn.utils.get_total_norm([p.grad for p in params]) if params else torch.zeros(())
        loss_sum, grad_norm = torch.stack([loss_sum, norm.float().to(self.device)]).tolist()
        logged = {k: float(v) for k, v in totals.items()}
        logged[f"{group}/loss"] = loss_sum
        logged[f"{group}/grad_norm"] = grad_norm
        if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
            for g in groups:
                self.optimizers[g].zero_grad(set_to_none=True)
            logged["skipped"] = 1.0
            return logged
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.cfg.grad_clip, norm)
        for g in groups:
            self.schedules[g].at(self.step)  # the global step's rate, however few updates g has had
            self.optimizers[g].step()
            self.schedules[g].step_after_update(self.step)
        logged[f"{group}/lr"] = self.schedules[group].get_last_lr()[0]
        return logged

    def _guard(self, skipped: bool, logged: dict[str, float]) -> None:
        if not skipped:
            self.nonfinite_in_a_row = 0
            return
        self.nonfinite_in_a_row += 1
        self.log.log(self.step, {"nonfinite_skipped": 1, **{k: v for k, v in logged.items() if k != "skipped"}})
        warnings.warn(
            f"{self.description}: step {self.step} had a non-finite loss or gradient; update skipped "
            f"({self.nonfinite_in_a_row} in a row, limit {self.cfg.max_nonfinite_steps})",
            RuntimeWarning,
            stacklevel=2,
        )
        if self.nonfinite_in_a_row >= self.cfg.max_nonfinite_steps:
            raise NonFiniteError(
                f"{self.description}: {self.nonfinite_in_a_row} consecutive steps with a non-finite loss or "
                f"gradient at step {self.step}; aborting. The last good checkpoint is in "
                f"{self.stage_dir / 'checkpoints'}. Lower train.lr, raise train.grad_clip, or check the data."
            )

    def fit(self) -> dict[str, float]:
        """Train to ``cfg.steps`` (resuming if a checkpoint exists); returns the final evaluation.
        Under torchrun each rank draws its own torch random numbers (``seed_rank``), and each rank's
        stream is checkpointed, so a resumed multi-process run continues exactly."""
        if not self.restore():
            seed_rank(self.seed, self.dist.rank, self.description)
        progress = None
        if self.cfg.progress and self.dist.is_main:
            from tqdm.auto import tqdm

            # disable=None: no bar when stderr is not a terminal (CI logs, nohup), where every
            # refresh would become a line of its own.
            progress = tqdm(total=self.cfg.steps, initial=self.step, desc=self.description, leave=False, disable=None)
        window: dict[str, list[float]] = {}
        for module in self.modules.values():
            module.train()
        try:
            while self.step < self.cfg.steps:
                logged: dict[str, float] = {}
                skipped = False
                updated: set[str] = set()  # groups whose parameters changed at this step
                for group in self.method.update_groups(self.step):
                    values = self._update(group)
                    if values.pop("skipped", 0.0):
                        skipped = True
                    else:
                        updated.update([group, *self.method.trained_with(group)])
                    logged.update(values)
                self.step += 1
                self._guard(skipped, logged)
                if "student" in updated:  # not on critic-only steps, nor when its update was skipped
                    self.method.student.update_ema()
                for k, v in logged.items():
                    window.setdefault(k, []).append(v)
                if self.step % self.cfg.log_every == 0 or self.step == self.cfg.steps:
                    means = {k: sum(v) / len(v) for k, v in window.items()}
                    means = distributed.all_reduce_mean(means, self.device)
                    self.log.log(self.step, means)
                    if progress is not None:
                        loss_keys = [k for k in means if k.endswith("/loss")]
                        progress.set_postfix({k.replace("/loss", " loss"): f"{means[k]:.4f}" for k in loss_keys})
                    window = {}
                if self.cfg.eval_every and self.step % self.cfg.eval_every == 0 and self.step < self.cfg.steps:
                    self._evaluate()
                if self.step % self.cfg.checkpoint_every == 0 or self.step == self.cfg.steps:
                    self.save()
                if progress is not None:
                    progress.update(1)
            return self._evaluate()
        finally:
            if progress is not None:
                progress.close()
            self.log.close()

    def _evaluate(self) -> dict[str, float]:
        results: dict[str, float] = {}
        if self.evaluate is not None and self.dist.is_main:
            for module in self.modules.values():
                module.eval()
            results = self.evaluate(self.step)
            for module in self.modules.values():
                module.train()
            self.log.log(self.step, results)
        distributed.barrier()
        return results
