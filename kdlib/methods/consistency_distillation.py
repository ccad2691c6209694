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
student then samples guided images in one pass (no guidance input: a fixed w).

Defaults: N = 20 intervals, skip k = 1, guidance 1 (none), pseudo-Huber, online target, student
initialised from the teacher (same network shape) — the LCM recipe shrunk for a CPU budget.
Batch: ``x`` clean states [B, ...]; other keys are the condition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import Method, register_method
from kdlib.diffusion.consistency import ConsistencyModel, discretisation
from kdlib.diffusion.guidance import guided_prediction
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.samplers import ddim_step
from kdlib.methods.flow_matching import check_parameterisation, split_batch
from kdlib.objectives import cauchy, l2, pseudo_huber

DISTANCES = ("pseudo_huber", "l2", "cauchy")


def consistency_distance(pred: torch.Tensor, target: torch.Tensor, kind: str, c: float = 0.0,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
    """Batch mean of weight·d(pred, target); c: the pseudo-Huber/Cauchy scale (0: iCT's
    0.00054·√D); l2 is the mean squared error per value. pred, target: [B, ...]; weight: [B]."""
    if kind == "pseudo_huber":
        return pseudo_huber(pred, target, c or None, weight=weight)
    if kind == "cauchy":
        return cauchy(pred, target, c or 0.00054 * pred[0].numel() ** 0.5, weight=weight)
    if kind == "l2":
        return l2(pred, target, weight=weight) / pred[0].numel()
    raise ValueError(f"unknown distance {kind!r}; choose one of {', '.join(DISTANCES)}")


def init_student_from_teacher(student, teacher) -> None:
    """Copy the teacher's weights into the student's network and its EMA copies (same shapes)."""
    state = teacher.model.state_dict()
    for model in (student.model, *student.ema):
        model.net.load_state_dict(state)


@dataclass
class ConsistencyDistillationConfig:
    param: str = "fm"
    num_intervals: int = 20  # N
    skip: int = 1  # k: teacher solver step in intervals
    guidance: float = 1.0  # w of the CFG-augmented teacher step
    distance: str = "pseudo_huber"
    c: float = 0.0  # distance scale; 0: 0.00054·sqrt(values per sample)
    target: str = "online"  # online | ema
    init_from_teacher: bool = True


@register_method("consistency_distillation")
class ConsistencyDistillation(Method):
    Config = ConsistencyDistillationConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        if not isinstance(student.model, ConsistencyModel):
            raise TypeError("consistency_distillation: the student must be a kdlib.diffusion.ConsistencyModel")
        if config.distance not in DISTANCES:
            raise ValueError(f"consistency_distillation: distance must be one of {DISTANCES}, got {config.distance!r}")
        if config.target not in ("online", "ema"):
            raise ValueError(f"consistency_distillation: target must be 'online' or 'ema', got {config.target!r}")
        if config.target == "ema" and not student.ema:
            raise ValueError("consistency_distillation: target=ema needs train.ema_decays (e.g. [0.95])")
        if not 1 <= config.skip <= config.num_intervals:
            raise ValueError(f"consistency_distillation: skip must be in [1, num_intervals], got {config.skip}")
        self.param = get_parameterisation(config.param)
        check_parameterisation(teacher.model, config.param, "the teacher")
        if student.model.param.name != config.param:
            raise ValueError(f"consistency_distillation: student is a {student.model.param.name!r} model, "
                             f"method_args.param is {config.param!r}")
        if config.init_from_teacher:
            init_student_from_teacher(student, teacher)

    def loss(self, batch, group):
        cfg = self.config
        x0, cond = split_batch(batch)
        b = x0.shape[0]
        grid = discretisation(self.param, cfg.num_intervals, device=x0.device)
        n = torch.randint(0, cfg.num_intervals - cfg.skip + 1, (b,), device=x0.device)
        t, s = grid[n + cfg.skip], grid[n]
        x_t = self.param.add_noise(x0, torch.randn_like(x0), t.to(x0.dtype))
        with torch.no_grad():
            x_in, t_in = self.param.model_input(x_t, t.to(x0.dtype))
            pred = guided_prediction(self.teacher, x_in, t_in, cond, cfg.guidance)
            x0_hat, eps_hat = self.param.to_x0_eps(x_t, pred.to(x0.dtype), t.to(x0.dtype))
            x_s = ddim_step(self.param, x0_hat, eps_hat, t, s)
            target_model = self.student.ema[0] if cfg.target == "ema" else self.student.model
            target = target_model(x_s, s.to(x0.dtype), **cond)
        online = self.student(x_t, t.to(x0.dtype), **cond)
        loss = consistency_distance(online, target, cfg.distance, cfg.c)
        return loss, {}
