"""iCT: improved consistency training from data, without a teacher (Song & Dhariwal 2023,
"Improved Techniques for Training Consistency Models").

    N = N(k) = min(s0·2^⌊k/K'⌋, s1) + 1                        (exponential curriculum, eq. 7)
    i ~ p(i), discrete log-normal over the intervals            (§3.5)
    x_{t_{i+1}} = α·x0 + σ·ε,  x_{t_i} = α'·x0 + σ'·ε          (the same ε: the 1-sample score estimate)
    L = λ(σ_i) · d(f_θ(x_{t_{i+1}}, t_{i+1}), stopgrad f_θ(x_{t_i}, t_i)),  λ = 1/(σ_{i+1} − σ_i)

with no EMA target (μ = 0, §3.2), d the pseudo-Huber metric (c = 0.00054·√D, §3.3) and σ the EDM
noise level σ/α of each time (capped at 80 where α = 0). The discretisation is the
parameterisation's own grid (Karras ρ = 7 for EDM), so iCT runs in every parameterisation.
Defaults: s0 = 10, s1 = 1280, P_mean = −1.1, P_std = 2.0; the total step count K is
``total_steps`` (set it to ``train.steps``). Also serves as the no-teacher baseline of
consistency distillation: same student, data and steps.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import Method, register_method
from kdlib.diffusion.consistency import (
    ConsistencyModel,
    discretisation,
    ict_discretisation_steps,
    lognormal_interval_probs,
    noise_ratio,
)
from kdlib.diffusion.param import get_parameterisation
from kdlib.methods.consistency_family import DISTANCES, consistency_distance
from kdlib.methods.flow_matching import split_batch


@dataclass
class ICTConfig:
    param: str = "fm"
    total_steps: int = 2000  # K of the curriculum: set it to train.steps
    s0: int = 10
    s1: int = 1280
    p_mean: float = -1.1
    p_std: float = 2.0
    distance: str = "pseudo_huber"
    c: float = 0.0  # 0: 0.00054·sqrt(values per sample)


@register_method("ict")
class ICT(Method):
    Config = ICTConfig
    needs_teacher = False

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        if not isinstance(student.model, ConsistencyModel):
            raise TypeError("ict: the student must be a kdlib.diffusion.ConsistencyModel")
        if config.distance not in DISTANCES:
            raise ValueError(f"ict: distance must be one of {DISTANCES}, got {config.distance!r}")
        self.param = get_parameterisation(config.param)
        self.step = 0

    def update_groups(self, step: int) -> list[str]:
        self.step = step  # the curriculum follows the trainer's step (exact on resume)
        return super().update_groups(step)

    def intervals(self, step: int) -> int:
        return ict_discretisation_steps(step, self.config.total_steps, self.config.s0, self.config.s1) - 1

    def loss(self, batch, group):
        cfg = self.config
        x0, cond = split_batch(batch)
        b = x0.shape[0]
        grid = discretisation(self.param, self.intervals(self.step), device=x0.device)
        probs = lognormal_interval_probs(self.param, grid, cfg.p_mean, cfg.p_std)
        i = torch.multinomial(probs, b, replacement=True)
        t, s = grid[i + 1], grid[i]
        weight = 1.0 / (noise_ratio(self.param, t) - noise_ratio(self.param, s)).clamp(min=1e-6)
        eps = torch.randn_like(x0)
        x_t = self.param.add_noise(x0, eps, t.to(x0.dtype))
        x_s = self.param.add_noise(x0, eps, s.to(x0.dtype))
        with torch.no_grad():
            target = self.student.model(x_s, s.to(x0.dtype), **cond)
        online = self.student(x_t, t.to(x0.dtype), **cond)
        loss = consistency_distance(online, target, cfg.distance, cfg.c, weight=weight)
        return loss, {"ict/intervals": float(len(grid) - 1)}
