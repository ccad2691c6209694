"""TAID: temporally adaptive interpolated distillation (Shing et al., ICLR 2025).

The student learns from an intermediate teacher that moves from itself towards the real teacher:

    p_λ = softmax(((1 − λ) · sg(z_s) + λ · z_t) / T),     loss = KL(p_λ ‖ p_s)   (forward KL)

z_s, z_t: student and teacher logits; sg = stop-gradient. λ follows a schedule that never falls
below the linear ramp from ``lambda_start`` to ``lambda_end`` over ``total_steps``, and moves faster
while the objective is still improving quickly:

    δ_n = (J_{n−1} − J_n) / (J_{n−1} + ε)         relative improvement of the loss
    m_n = momentum · m_{n−1} + (1 − momentum) · δ_n
    λ_n = min(1, max(linear(n), λ_{n−1} + rate · sigmoid(m_n) · (1 − λ_{n−1})))
"""

from __future__ import annotations

import math

import torch
from torch import nn

from kdlib.objectives.divergences import reduce


class TAID(nn.Module):
    """Stateful TAID loss. Call it on logits [..., V]; call :meth:`step` once per optimizer step.

    The schedule state (λ, momentum, last loss, step count) lives in buffers, so it is saved and
    restored with the method's ``state_dict`` for an exact resume.
    """

    def __init__(self, total_steps: int, *, lambda_start: float = 0.4, lambda_end: float = 1.0,
                 rate: float = 5e-4, momentum: float = 0.99, adaptive: bool = True, temperature: float = 1.0):
        super().__init__()
        if total_steps <= 0:
            raise ValueError(f"TAID: total_steps must be > 0, got {total_steps}")
        if not 0.0 <= lambda_start <= lambda_end <= 1.0:
            raise ValueError(f"TAID: need 0 <= lambda_start <= lambda_end <= 1, "
                             f"got {lambda_start}, {lambda_end}")
        self.total_steps, self.lambda_start, self.lambda_end = total_steps, lambda_start, lambda_end
        self.rate, self.momentum, self.adaptive, self.temperature = rate, momentum, adaptive, temperature
        self.register_buffer("lam", torch.tensor(float(lambda_start), dtype=torch.float64))
        self.register_buffer("momentum_state", torch.tensor(0.0, dtype=torch.float64))
        self.register_buffer("last_loss", torch.tensor(math.nan, dtype=torch.float64))
        self.register_buffer("steps", torch.tensor(0, dtype=torch.int64))

    @property
    def current_lambda(self) -> float:
        return float(self.lam)

    def forward(self, student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                mask: torch.Tensor | None = None, reduction: str = "mean") -> torch.Tensor:
        """KL(p_λ ‖ p_s) per the module docstring; logits [..., V] -> scalar (or [...] for "none")."""
        dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
        s = student_logits.to(dtype) / self.temperature
        t = teacher_logits.to(dtype) / self.temperature
        lam = float(self.lam)
        log_p_mid = torch.log_softmax((1.0 - lam) * s.detach() + lam * t, dim=-1)
        log_ps = torch.log_softmax(s, dim=-1)
        rows = (log_p_mid.exp() * (log_p_mid - log_ps)).sum(-1)
        return reduce(rows, mask, reduction)

    @torch.no_grad()
    def step(self, loss: float | torch.Tensor) -> float:
        """Advance the schedule after an optimizer step, given that step's TAID loss; returns new λ."""
        loss = float(loss)
        self.steps += 1
        linear = self.lambda_start + (self.lambda_end - self.lambda_start) * min(
            1.0, int(self.steps) / self.total_steps)
        lam = float(self.lam)
        if self.adaptive and not math.isnan(float(self.last_loss)):
            prev = float(self.last_loss)
            delta = (prev - loss) / (prev + 1e-8)
            m = self.momentum * float(self.momentum_state) + (1 - self.momentum) * delta
            self.momentum_state.fill_(m)
            lam = lam + self.rate / (1 + math.exp(-m)) * (1 - lam)
        self.last_loss.fill_(loss)
        self.lam.fill_(min(1.0, max(linear, lam)))
        return float(self.lam)
