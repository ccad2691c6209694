"""The Method interface and its registry.

A Method is one distillation algorithm. It sees tensors and callables (the Teacher, the Student
and any extra trainable networks it declares), never domain code. The Trainer asks it which
parameter groups to update at each step (``update_groups``: e.g. DMD2's several critic updates per
generator update) and for the loss of each group on a batch. Every group's learning-rate schedule
follows the Trainer's global step (not that group's update count), its base rate is
``train.group_lr[group]`` or ``train.lr``, and ``bind_wrapped`` hands the method each group's
(DDP-)wrapped module.
"""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from kdlib.core.models import Student, Teacher
from kdlib.core.registry import Registry


@dataclass
class NoConfig:
    """For methods and domains without options of their own."""


def _import_builtin_methods() -> None:
    import kdlib.methods as pkg

    for info in pkgutil.iter_modules(pkg.__path__):
        importlib.import_module(f"{pkg.__name__}.{info.name}")


METHODS: Registry[type[Method]] = Registry("method", loader=_import_builtin_methods)
register_method = METHODS.register


class Method:
    """Base class. Subclasses set ``Config`` (a dataclass of their options) and implement ``loss``.

    ``needs_teacher = False`` marks methods that train without one (plain supervised training,
    the no-teacher baseline, consistency training).
    """

    name: str = "method"
    Config: type = NoConfig
    needs_teacher: bool = True

    def __init__(self, config: Any, student: Student, teacher: Teacher | None):
        if self.needs_teacher and teacher is None:
            raise ValueError(f"method {self.name!r} needs a teacher")
        self.config = config
        self.student = student
        self.teacher = teacher

    def trainable_modules(self) -> dict[str, nn.Module]:
        """Parameter groups by name; each gets its own optimizer. Default: the student alone."""
        return {"student": self.student.model}

    def update_groups(self, step: int) -> list[str]:
        """Which groups take an optimizer step at ``step`` (in order). Default: every group."""
        return list(self.trainable_modules())

    def bind_wrapped(self, name: str, module: nn.Module) -> None:
        """Called by the Trainer once per group of ``trainable_modules``, before training, with the
        module the loss must call for that group's gradients to be averaged across processes: its
        DistributedDataParallel wrapper under torchrun, the module itself in one process. Default:
        nothing (the Trainer already routes ``self.student(...)`` through the student's wrapper).

        A method whose loss calls another group directly (a critic, a discriminator) keeps the
        module here, e.g. ``if name == "critic": self.critic_forward = module``, and in that
        group's own loss calls it (``self.critic_forward(...)``) exactly once per backward pass,
        through ``forward`` (DDP only sees calls of the wrapper; other attributes of
        ``module.module`` bypass it: route them through the wrapped module's ``forward``, e.g. a
        ``forward(self, fn, *args)`` that returns ``fn(*args)``). Where the group is only a frozen
        helper of another group's loss (the critic inside the generator's loss), call the plain
        module, not the wrapper: DDP would wait for gradients that never come."""

    def trained_with(self, group: str) -> list[str]:
        """Groups that ``group``'s loss trains too, in the same backward pass and update (e.g.
        sCM's adaptive loss weight with the student). They must not appear in ``update_groups``."""
        return []

    def loss(
        self, batch: dict[str, torch.Tensor], group: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The scalar loss for ``group`` on ``batch``, and named values to log (detached scalar
        tensors are best: the Trainer moves them to the host once per step)."""
        raise NotImplementedError
