"""Plain supervised training without a teacher.

Trains teachers from scratch in recipes that make their own, and is the no-teacher baseline that
every distillation result is compared against (same student, data, steps and seed).
Batch convention: ``x`` the network input, ``y`` integer targets (``ignore_index`` = -100 skipped).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import Method, register_method
from kdlib.objectives import cross_entropy


@dataclass
class SupervisedConfig:
    label_smoothing: float = 0.0


@register_method("supervised")
class Supervised(Method):
    Config = SupervisedConfig
    needs_teacher = False

    def loss(self, batch: dict[str, torch.Tensor], group: str) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.student(batch["x"])
        if self.config.label_smoothing:
            loss = torch.nn.functional.cross_entropy(
                logits.float().flatten(0, -2), batch["y"].flatten(), label_smoothing=self.config.label_smoothing
            )
        else:
            loss = cross_entropy(logits, batch["y"])
        return loss, {}
