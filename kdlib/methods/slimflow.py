"""SlimFlow: a small one-step student by annealing reflow, then flow-guided distillation (Zhu, Liu &
Liu 2024, "SlimFlow: Training Smaller One-Step Diffusion Models with Rectified Flow", ECCV).

A student smaller than the teacher cannot start from the teacher's weights, and reflow from a
random start is slow; SlimFlow starts it on an easy problem and moves it to the reflow one. In
kdlib's fm convention (t = 0 data, t = 1 noise; ``kdlib.methods.reflow``), with (z, x) the
teacher's ODE couplings x = ODE_teacher(z) and k the training step:

Phase 1, annealing reflow (steps k < ``reflow_steps``):

    β(k) = 1 − min(1, k/K_a)                     (linear)   or   (1 + cos(π·min(1, k/K_a)))/2   (cosine)
    z_β = sqrt(1 − β²)·z + β·ξ,   ξ ~ N(0, I) independent      (still N(0, I): (1 − β²) + β² = 1)
    L_1 = E_t m(u_θ((1 − t)·x + t·z_β, t), z_β − x)

β(0) = 1: the noise is independent of the teacher's sample (random pairing, i.e. flow matching on
the teacher's samples: the 1-rectified flow, easy from scratch); β(k) = 0 for k ≥ K_a
(``anneal_steps`` ≤ ``reflow_steps``): exactly the teacher's coupling, i.e. reflow. Phase 1 ends
with the student as a 2-rectified flow v₂ of the teacher.

Phase 2, flow-guided distillation (steps k ≥ ``reflow_steps``): at its first step a frozen copy of
the student is taken as v₂ (the guide); the student then learns the one-step map at t = 1, both onto
the teacher's couplings and onto v₂'s own two-step Euler solutions from fresh noise ζ:

    L_2 = m(u_θ(z, 1), z − x) + λ·m(u_θ(ζ, 1), ζ − x̂₂(ζ))
    x̂₂(ζ) = x_s − s·v₂(x_s, s),   x_s = ζ − (1 − s)·v₂(ζ, 1),   s ~ U[s_lo, s_hi]

(the one-step distillation loss plus the flow-guidance term; s ∈ [0.2, 0.8] as in the authors' code,
which also has a variant whose first step is the student's own: here v₂ takes both). The one-step
sample is x̂ = z − u_θ(z, 1): one Euler step, the student's own sampler (segments = 1, as reflow).
m is reflow's premetric (pseudo-Huber, c = 0.00054·√D, or l2); the paper's LPIPS is image-specific
and not used. Both phases run in one training run with one optimizer and learning-rate schedule
(the paper restarts them; here phase 2 continues from phase 1's optimizer state).

The guide is method state (``state_tensors``, keys ``guide/...``), not a parameter group: its
weights reach the checkpoints, so a run resumed in phase 2 continues with the same v₂ (its buffer
``taken`` records that the copy was made). The student is usually smaller than the teacher (a
domain option such as the image domain's ``model.student_hidden``), so ``init_from_teacher``
defaults to false; with ``reflow_steps: 0`` the guide is the student's starting point.

Defaults: K_a = 500 of reflow_steps = 1000, linear β, uniform t (as the paper), λ = 1, s ∈ [0.2, 0.8];
the couplings are reflow's (Euler, K = 20, refreshed every step).
Batch: ``x`` [B, ...] (shape only); other keys are the condition.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
from torch import nn

from kdlib.core.method import register_method
from kdlib.core.state import prefixed, unprefixed
from kdlib.methods.consistency_family import check_choice, check_range
from kdlib.methods.flow_matching import split_batch
from kdlib.methods.reflow import Reflow, ReflowConfig

SCHEDULES = ("linear", "cosine")


def anneal_beta(step: int, anneal_steps: int, schedule: str = "linear") -> float:
    """β(k): 1 at k = 0, falling to 0 at k = K_a and 0 after (K_a = 0: always 0)."""
    if anneal_steps <= 0:
        return 0.0
    progress = min(1.0, step / anneal_steps)
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"anneal_beta: schedule must be one of {', '.join(SCHEDULES)}; got {schedule!r}")


def anneal_noise(z: torch.Tensor, beta: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """z_β = sqrt(1 − β²)·z + β·ξ with fresh ξ ~ N(0, I): [B, ...], still standard normal."""
    if beta == 0.0:
        return z
    xi = torch.randn(z.shape, device=z.device, dtype=z.dtype, generator=generator)
    return math.sqrt(1.0 - beta * beta) * z + beta * xi


class GuideSnapshot(nn.Module):
    """v₂: a frozen copy of the student taken once (``take``); calling it gives its velocity
    [B, ...] at (x [B, ...], t [B]). Stays in eval mode, like a Teacher."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model)
        self.register_buffer("taken", torch.zeros((), dtype=torch.long))
        # ``taken`` on the host, for the step loop: reading the buffer there would cost a device
        # sync per step, and has no value under the --dry-run estimator's fake tensors. Set by
        # ``take`` and, on resume, from the loaded buffer.
        self.is_taken = False
        self.register_load_state_dict_post_hook(GuideSnapshot._loaded)

    @staticmethod
    def _loaded(module: GuideSnapshot, _incompatible_keys) -> None:
        module.is_taken = bool(module.taken)

    @torch.no_grad()
    def take(self, model: nn.Module) -> None:
        self.model.load_state_dict(model.state_dict())
        self.taken.fill_(1)
        self.is_taken = True

    def train(self, mode: bool = True) -> GuideSnapshot:
        self.training = False
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, x: torch.Tensor, t: torch.Tensor, **cond) -> torch.Tensor:
        return self.model(x, t, prediction=True, **cond)


@dataclass
class SlimFlowConfig(ReflowConfig):
    time_dist: str = "uniform"  # phase 1's law of t (the paper: uniform; u_shaped as reflow)
    init_from_teacher: bool = False  # the student is usually smaller than the teacher
    reflow_steps: int = 1000  # phase 1 length; phase 2 runs from here to train.steps
    anneal_steps: int = 500  # K_a <= reflow_steps
    anneal_schedule: str = "linear"  # linear | cosine
    guide_weight: float = 1.0  # λ
    guide_split: list[float] = field(default_factory=lambda: [0.2, 0.8])  # [s_lo, s_hi]


@register_method("slimflow")
class SlimFlow(Reflow):
    Config = SlimFlowConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        name = self.name
        check_range(name, "reflow_steps", config.reflow_steps, 0)
        check_range(name, "anneal_steps", config.anneal_steps, 0, config.reflow_steps)
        check_choice(name, "anneal_schedule", config.anneal_schedule, SCHEDULES)
        check_range(name, "guide_weight", config.guide_weight, 0.0)
        split = config.guide_split
        if len(split) != 2 or not 0.0 <= split[0] <= split[1] <= 1.0:
            raise ValueError(f"{name}: guide_split must be [s_lo, s_hi] with 0 <= s_lo <= s_hi <= 1; got {split!r}")
        self.guide = GuideSnapshot(student.model)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        state = super().state_tensors()
        if self.guide.is_taken:
            state.update(prefixed("guide/", self.guide.state_dict()))
        return state

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        super().load_state_tensors({k: v for k, v in tensors.items() if not k.startswith("guide/")})
        guide = unprefixed(tensors, "guide/")
        if guide:
            self.guide.load_state_dict(guide)

    def update_groups(self, step: int) -> list[str]:
        if step >= self.config.reflow_steps and not self.guide.is_taken:
            self.guide.take(self.student.model)
        return super().update_groups(step)

    def distilling(self) -> bool:
        return self.step >= self.config.reflow_steps

    @torch.no_grad()
    def guide_target(self, zeta: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """x̂₂(ζ): v₂'s two-step Euler solution from noise ζ [B, ...], split at s ~ U[s_lo, s_hi] [B]."""
        lo, hi = self.config.guide_split
        b = zeta.shape[0]
        ones = torch.ones(b, device=zeta.device, dtype=zeta.dtype)
        s = lo + (hi - lo) * torch.rand(b, device=zeta.device, dtype=zeta.dtype)
        s_ = s.reshape(b, *([1] * (zeta.dim() - 1)))
        x_s = zeta - (1 - s_) * self.guide(zeta, ones, **cond)
        return x_s - s_ * self.guide(x_s, s, **cond)

    def distill_loss(self, z: torch.Tensor, x: torch.Tensor, cond: dict[str, torch.Tensor]
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_2 on the couplings (z, x) [B, ...], and its two terms to log."""
        ones = torch.ones(z.shape[0], device=z.device, dtype=z.dtype)
        one_step = self.distance(self.velocity(z, ones, cond), z - x)
        if self.config.guide_weight == 0:
            return one_step, {"slimflow/one_step": one_step.detach()}
        zeta = torch.randn_like(z)
        guided = self.distance(self.velocity(zeta, ones, cond), zeta - self.guide_target(zeta, cond))
        loss = one_step + self.config.guide_weight * guided
        return loss, {"slimflow/one_step": one_step.detach(), "slimflow/guided": guided.detach()}

    def loss(self, batch, group):
        like, cond = split_batch(batch)
        z, x, cond = self.couplings(like, cond)
        if self.distilling():
            loss, values = self.distill_loss(z, x, cond)
            return loss, {"slimflow/phase": 2.0, **values}
        beta = anneal_beta(self.step, self.config.anneal_steps, self.config.anneal_schedule)
        loss = self.reflow_loss(anneal_noise(z, beta), x, cond)
        return loss, {"slimflow/phase": 1.0, "slimflow/beta": beta}
