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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

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

T = TypeVar("T")
register_method = METHODS.register


class LossThroughForward:
    """Mixin for a trained group that its loss does not call like a network (a critic whose loss
    reads several of its parts, a list of heads): ``module(fn, *args, **kwargs)`` returns
    ``fn(*args, **kwargs)``, so the group's loss runs inside ``forward``, that is inside its DDP
    wrapper (``Method.group_forward(name)(fn, ...)``), which then averages its gradients. Put it
    first among the bases: ``class Critic(LossThroughForward, nn.Module)``."""

    def forward(self, fn: Callable[..., T], *args, **kwargs) -> T:
        return fn(*args, **kwargs)


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
        self._wrapped: dict[str, nn.Module] = {}

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
        keeps it for ``group_forward`` (the Trainer already routes ``self.student(...)`` through the
        student's wrapper).

        A method whose loss trains another group than the student (a critic, a discriminator, a
        weight ``trained_with`` the student) runs that group through ``self.group_forward(name)``
        and its ``forward``: DDP sees only calls of the wrapper (other attributes of
        ``module.module`` bypass it), so a module used in another way takes its loss through
        ``LossThroughForward`` (``Critic``, LADD's heads). More than one call of a wrapper before
        a backward pass is fine (DDP waits for each parameter's gradient once). Where the group is
        only a frozen helper of another group's loss (the critic inside the generator's loss),
        call the plain module, not the wrapper: DDP would wait for gradients that never come."""
        self._wrapped[name] = module

    def group_forward(self, name: str) -> nn.Module:
        """The module group ``name``'s loss calls (``bind_wrapped``): its DDP wrapper once the
        Trainer has bound it, else (one process, or a loss called outside the Trainer) the module."""
        module = self._wrapped.get(name)
        return module if module is not None else self.trainable_modules()[name]

    def unused_parameters(self, group: str) -> bool:
        """Whether a backward pass of ``group``'s loss may leave some of its trainable parameters
        without a gradient (Phased DMD's student: only the phase's expert trains at a step). Under
        torchrun the Trainer then has DDP look for them after every forward of the group
        (``find_unused_parameters``: a walk of the autograd graph), without which it would wait for
        their gradients forever. Default False: every trainable parameter of a group takes part in
        every backward pass of its loss (parameters frozen with ``requires_grad=False`` at the
        Trainer's start, e.g. a LoRA fake score's shared weights, are not DDP's)."""
        return False

    def trained_with(self, group: str) -> list[str]:
        """Groups that ``group``'s loss trains too, in the same backward pass and update (e.g.
        sCM's adaptive loss weight with the student). They must not appear in ``update_groups``."""
        return []

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """State outside the trainable modules that an exact resume needs (a cache of teacher
        samples, an adaptive schedule): name -> tensor. The Trainer checkpoints it per process and
        hands it back to ``load_state_tensors`` on resume. Default: none."""
        return {}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what ``state_tensors`` returned (same names, on the CPU), before the first step
        of a resumed run. An empty dict means the checkpoint holds none for this process (written
        before the method kept state, or by another number of processes): start afresh."""
        if tensors:
            raise ValueError(f"method {self.name!r} keeps no state, but the checkpoint has {sorted(tensors)}")

    def loss(
        self, batch: dict[str, torch.Tensor], group: str
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor | float]]:
        """The scalar loss for ``group`` on ``batch``, and named values to log (detached scalar
        tensors are best: the Trainer moves them to the host once per step)."""
        raise NotImplementedError
