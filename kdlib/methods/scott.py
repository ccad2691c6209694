"""SCott: stochastic consistency distillation (Liu et al. 2024, "SCott: Accelerating Diffusion
Models with Stochastic Consistency Distillation"): consistency distillation whose teacher solver is
a stochastic (SDE) sampler with a controlled noise strength and several sub-steps, instead of
LCM's single deterministic DDIM step.

On the ascending discretisation t_0 = t_min < ... < t_N = t_max of the parameterisation:

    n ~ U{0, ..., N − k},  t = t_{n+k},  s = t_n,  x_t = α(t)·x0 + σ(t)·ε
    x̂_s = M stochastic DDIM sub-steps of the (CFG-guided) teacher from t to s, evenly spaced in t:
          x_b = α_b·x̂0 + √(σ_b² − c²)·ε̂ + c·ξ,  c = η·σ_b·√(1 − SNR_a/SNR_b),  ξ ~ N(0, I)
    L = d(f_θ(x_t, t), stopgrad f_θ⁻(x̂_s, s))

η (``eta``) sets the noise strength (0: the PF-ODE, 1: DDPM's posterior), M (``substeps``) the
number of teacher steps per interval; with η = 0 and M = 1 this is consistency_distillation
exactly (same draws, same loss). The guided prediction ε̂_w = ε̂_∅ + w(ε̂_c − ε̂_∅) (``guidance``)
drives every sub-step, as in LCM. d, f_θ⁻ (``target``) and the initialisation are
consistency_distillation's. Not included: SCott's additional adversarial loss (see the LADD /
adversarial methods for that term). Defaults: η = 0.3 and M = 2 (a moderate SDE, our choice for
small budgets, not a number from the paper), N = 20, k = 1, pseudo-Huber, online target.

Batch: ``x`` clean states [B, ...]; other keys are the condition.
"""

from __future__ import annotations

from dataclasses import dataclass

from kdlib.core.method import register_method
from kdlib.diffusion.consistency import solver_step
from kdlib.methods.consistency_distillation import ConsistencyDistillation
from kdlib.methods.consistency_family import ConsistencyDistillationConfig, check_range


@dataclass
class SCottConfig(ConsistencyDistillationConfig):
    eta: float = 0.3  # noise strength of the teacher's SDE step, in [0, 1]
    substeps: int = 2  # teacher sub-steps per interval (M)


@register_method("scott")
class SCott(ConsistencyDistillation):
    """consistency_distillation with the stochastic teacher step: only ``teacher_step`` differs."""

    Config = SCottConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        check_range(self.name, "eta", config.eta, 0.0, 1.0)
        check_range(self.name, "substeps", config.substeps, 1)

    def teacher_step(self, x_t, t, s, cond, guidance=None):
        cfg = self.config
        w = cfg.guidance if guidance is None else guidance
        return solver_step(self.teacher, self.param, x_t, t, s, cond, w, eta=cfg.eta, substeps=cfg.substeps)
