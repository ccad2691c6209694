"""Consistency distillation with a skipping-step teacher solver and optional CFG-augmented
targets — LCM-style (Song et al. 2023, "Consistency Models", Alg. 2; Luo et al. 2023, "Latent
Consistency Models", §4.2–4.3).

On the ascending discretisation t_0 = t_min < ... < t_N = t_max of the parameterisation:

    n ~ U{0, ..., N − k},  x_{t_{n+k}} = α·x0 + σ·ε                      (data noised)
    x̂_{t_n} = DDIM(teacher, x_{t_{n+k}}, t_{n+k} -> t_n, guidance w)     (skipping-step solver)
    L = λ · d(f_θ(x_{t_{n+k}}, t_{n+k}), stopgrad f_θ⁻(x̂_{t_n}, t_n))

f_θ is the student, a ``ConsistencyModel`` (boundary f(x, t_min) = x built in); f_θ⁻ is the
student itself without gradient (``target: online``, iCT's finding that the EMA target is
unnecessary) or its first EMA copy (``target: ema``, CM/LCM with μ = 0.95 via
``train.ema_decays``). d: pseudo-Huber (default, c = 0.00054·√D), l2 or cauchy from
``kdlib.objectives``; λ = 1. The guided teacher prediction
ε̂_w = ε̂_∅ + w(ε̂_c − ε̂_∅) (LCM eq. 9) is used for the DDIM step when ``guidance`` ≠ 1; the
student then samples guided images in one pass at that fixed w — or, with ``guidance_input``
[w_lo, w_hi], at any w of the range: the student takes w as an input (LCM §4.2).

Defaults: N = 20 intervals, skip k = 1, guidance 1 (none), pseudo-Huber, online target, student
initialised from the teacher (same network shape) — the LCM recipe shrunk for a CPU budget.
Batch: ``x`` clean states [B, ...]; other keys are the condition.
"""

from __future__ import annotations

import torch

from kdlib.core.method import register_method
from kdlib.diffusion.consistency import discretisation, solver_step
from kdlib.methods.consistency_family import ConsistencyDistillationConfig, ConsistencyFamily, consistency_distance
from kdlib.methods.flow_matching import split_batch


@register_method("consistency_distillation")
class ConsistencyDistillation(ConsistencyFamily):
    Config = ConsistencyDistillationConfig
    supports_guidance_input = True

    def teacher_step(self, x_t: torch.Tensor, t: torch.Tensor, s: torch.Tensor, cond: dict,
                     guidance: float | torch.Tensor | None = None) -> torch.Tensor:
        """x̂_s from x_t [B, ...] (t, s: [B]): LCM's skipping step, one DDIM step guided at
        ``guidance`` (a number or [B]; default: the config's)."""
        w = self.config.guidance if guidance is None else guidance
        return solver_step(self.teacher, self.param, x_t, t, s, cond, w)

    def loss(self, batch, group):
        cfg = self.config
        x0, cond = split_batch(batch)
        b, dtype = x0.shape[0], x0.dtype
        grid = discretisation(self.param, cfg.num_intervals, device=x0.device)
        n = torch.randint(0, cfg.num_intervals - cfg.skip + 1, (b,), device=x0.device)
        t, s = grid[n + cfg.skip], grid[n]
        x_t = self.param.add_noise(x0, torch.randn_like(x0), t.to(dtype))
        w, w_cond = self.guidance_draw(b, x0.device)
        with torch.no_grad():
            x_s = self.teacher_step(x_t, t, s, cond, w)
            target = self.target_model()(x_s, s.to(dtype), **cond, **w_cond)
        online = self.student(x_t, t.to(dtype), **cond, **w_cond)
        return consistency_distance(online, target, cfg.distance, cfg.c), {}
