"""TAID distillation (Shing et al., "TAID: Temporally Adaptive Interpolated Distillation for
Efficient Knowledge Transfer in Language Models", ICLR 2025).

    loss = KL(p_λ ‖ p_student) + hard_weight · CE(student, y),
    p_λ = softmax(((1 − λ) · sg(z_student) + λ · z_teacher) / T)

with λ rising from ``lambda_start`` to ``lambda_end`` over the run's steps, adaptively faster while
the loss still improves quickly (``kdlib.objectives.TAID``, paper eq. 5–7 and Alg. 1). λ advances
once per optimizer step, from the previous step's TAID loss. Defaults as in the paper's recipe:
λ 0.4 -> 1.0, rate 5e-4, momentum 0.99, T = 1, hard_weight 0.

Resume: λ's adaptive state (the schedule's buffers, the last step and its not yet applied mean
loss) is checkpointed through ``state_tensors``, so a resumed run follows the same λ as an
uninterrupted one. A checkpoint without it (older runs) rejoins the linear floor at its step.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import Method, register_method
from kdlib.core.state import prefixed, unprefixed
from kdlib.objectives import TAID, cross_entropy


@dataclass
class TAIDKDConfig:
    total_steps: int = 500  # the schedule's length: set it to train.steps
    lambda_start: float = 0.4
    lambda_end: float = 1.0
    rate: float = 5e-4
    momentum: float = 0.99
    adaptive: bool = True
    temperature: float = 1.0
    hard_weight: float = 0.0


@register_method("taid_kd")
class TAIDKD(Method):
    Config = TAIDKDConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        self.taid = TAID(config.total_steps, lambda_start=config.lambda_start, lambda_end=config.lambda_end,
                         rate=config.rate, momentum=config.momentum, adaptive=config.adaptive,
                         temperature=config.temperature)
        self._step_losses: list[float] = []
        self._last_step = None

    def update_groups(self, step: int) -> list[str]:
        # The Trainer asks once per optimizer step: the moment to advance λ by the last step's loss.
        if self._last_step is not None and step > self._last_step and self._step_losses:
            self.taid.steps.fill_(self._last_step)
            # one host transfer per step for the adaptive schedule, not one per micro-batch
            self.taid.step(float(torch.stack(self._step_losses).mean()))
        elif self._last_step is None and step > 0:
            # Resumed: rejoin the linear floor at this step (see the module docstring).
            self.taid.steps.fill_(step - 1)
            self.taid.step(float("nan"))
        self._last_step, self._step_losses = step, []
        return super().update_groups(step)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        # Checkpoints refuse non-finite tensors: the "no loss yet" NaN of last_loss stays out.
        state = prefixed("taid/", {k: v for k, v in self.taid.state_dict().items() if bool(torch.isfinite(v).all())})
        if self._last_step is not None:
            state["last_step"] = torch.tensor(self._last_step)
            if self._step_losses:  # the mean update_groups applies at the next step
                state["pending_loss"] = torch.stack(self._step_losses).mean().detach()
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            return  # update_groups rejoins the linear floor (see the module docstring)
        schedule = unprefixed(tensors, "taid/")
        for key, value in self.taid.state_dict().items():  # a missing last_loss keeps its NaN
            if key in schedule:
                value.copy_(schedule[key])
        if "last_step" in tensors:
            self._last_step = int(tensors["last_step"])
            self._step_losses = [tensors["pending_loss"]] if "pending_loss" in tensors else []

    def loss(self, batch: dict[str, torch.Tensor], group: str) -> tuple[torch.Tensor, dict[str, float]]:
        logits = self.student(batch["x"])
        teacher_logits = self.teacher(batch["x"])
        y = batch.get("y")
        mask = None if y is None else y != -100
        soft = self.taid(logits, teacher_logits, mask=mask)
        self._step_losses.append(soft.detach())
        loss = soft
        values = {"taid/loss": soft.detach(), "taid/lambda": self.taid.current_lambda}
        if self.config.hard_weight and y is not None:
            loss = loss + self.config.hard_weight * cross_entropy(logits, y)
        return loss, values
