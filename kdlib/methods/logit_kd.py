"""Logit knowledge distillation (Hinton, Vinyals & Dean 2015, "Distilling the Knowledge in a
Neural Network").

    loss = soft_weight · T² · D(p_teacher^T ‖ p_student^T) + hard_weight · CE(student, y)

with p^T = softmax(logits / T) and D a divergence of ``kdlib.objectives.divergence`` (default
"fkl" = KL(p_teacher ‖ p_student), Hinton's choice). The T² factor keeps the soft term's gradient
scale independent of T (paper §2) and is applied explicitly here. Works for any logits
``[..., V]``: classifiers ``[B, C]`` and language models ``[B, T, V]`` alike; targets equal to
-100 are ignored in both terms. Defaults: T=4, soft_weight=0.9, hard_weight=0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import Method, register_method
from kdlib.objectives import cross_entropy, divergence


@dataclass
class LogitKDConfig:
    temperature: float = 4.0
    soft_weight: float = 0.9
    hard_weight: float = 0.1
    kind: str = "fkl"
    beta: float = 0.5  # jsd only
    alpha: float = 0.1  # skew_fkl / skew_rkl only
    generator: str | None = None  # kind="f" only: kl, reverse_kl, js, hellinger, chi2


@register_method("logit_kd")
class LogitKD(Method):
    Config = LogitKDConfig

    def loss(self, batch: dict[str, torch.Tensor], group: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        cfg = self.config
        student_logits = self.student(batch["x"])
        teacher_logits = self.teacher(batch["x"])
        y = batch.get("y")
        mask = None if y is None else y != -100
        soft = divergence(
            student_logits, teacher_logits, cfg.kind, temperature=cfg.temperature, beta=cfg.beta,
            alpha=cfg.alpha, generator=cfg.generator, mask=mask, t2_scaling=True,
        )
        loss = cfg.soft_weight * soft
        values = {"kd/soft": soft.detach()}
        if cfg.hard_weight and y is not None:
            hard = cross_entropy(student_logits, y)
            loss = loss + cfg.hard_weight * hard
            values["kd/hard"] = hard.detach()
        return loss, values
