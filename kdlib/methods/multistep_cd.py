"""Multistep / trajectory-segmented consistency distillation: MLCM (Xie et al. 2024, "MLCM:
Multistep Consistency Distillation of Latent Diffusion Model") and Hyper-SD's trajectory-segmented
consistency distillation, TSCD (Ren et al. 2024, "Hyper-SD: Trajectory Segmented Consistency Model
for Efficient Image Synthesis", §3.1); Heek et al. 2024 ("Multistep Consistency Models") in
continuous time.

The ascending discretisation t_0 = t_min < ... < t_N = t_max is cut into S segments of L = N/S
intervals, with edges e_j = t_{jL}. A point maps to the lower edge of its segment, not to t_min:

    n ~ U{0, ..., N − k},  m = n + k,  t = t_m,  x_t = α(t)·x0 + σ(t)·ε
    e = t_{⌊(m − 1)/L⌋·L}              (the lower edge of the segment (e, e + L] holding t)
    s = max(t_n, e)                    (the teacher's step stops at the edge, Hyper-SD)
    x̂_s = DDIM(teacher, x_t, t -> s, guidance w)
    f(x, t; e) = α(e)·x̂0_θ(x, t) + σ(e)·ε̂_θ(x, t)         (``ConsistencyModel(..., edge=e)``)
    L = d(f_θ(x_t, t; e) / c_e, stopgrad f_θ⁻(x̂_s, s; e) / c_e),   c_e = √(α(e)² + σ(e)²)

The boundary f(x, e; e) = x holds at every edge for any weights, so when the teacher's step lands
on the edge the target is the teacher's state itself. c_e is 1 in VP (the papers' setting) and
keeps EDM's states at σ up to 80 from swamping the loss; d, f_θ⁻ (``target``), CFG (``guidance``)
and the student's initialisation are consistency_distillation's. With S = 1 and fm/trigflow this
is consistency_distillation exactly.

Phases (Hyper-SD's progressive [8, 4, 2, 1], MLCM's progressive training): ``segment_schedule``
lists S per phase; training step k is in phase ⌊k·P/K⌋ of P equal phases, K = ``total_steps``
(set it to ``train.steps``). Empty: S = ``segments`` throughout. Every S must divide N. The
student's ``segments`` buffer holds the current S, so its sampler (``few_step_sample``) steps
deterministically edge to edge, DDIM-style with the student's (x̂0, ε̂): S steps at the segment
edges are exactly the maps it was trained on. Hyper-SD's score-distillation and human-feedback
phases are not part of this method.

Optional regression on the teacher's ODE pairs (``regression_weight`` λ > 0; DMD's regression
term, Yin et al. 2024, §3.3, applied to the segmented sampler): with pairs (z, y_ref) of noise and
the teacher's multi-step ODE sample from it (``ode_noise`` / ``ode_x`` in the batch, attached by the
domain when ``needs_ode_pairs``; ``kdlib.methods.dmd.add_ode_pairs``), the loss adds

    λ · d(segment_rollout(f_θ, z, S), y_ref)

at the current S: the student's own S-step sample (S network calls, edge to edge) pulled toward the
teacher's solution from the same noise, an anchor without the consistency loss's bootstrapping.

Defaults: N = 20, k = 1, S = 4, no schedule, pseudo-Huber, online target, guidance 1, no regression.
Batch: ``x`` clean states [B, ...], the pairs when regressing; other keys are the condition.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from kdlib.core.method import register_method
from kdlib.diffusion.consistency import discretisation, segment_rollout, solver_step
from kdlib.diffusion.param import expand
from kdlib.methods.consistency_family import (
    DISTANCES,
    ConsistencyDistillationConfig,
    ConsistencyFamily,
    check_choice,
    check_range,
    consistency_distance,
)
from kdlib.methods.dmd import PAIR_KEYS, split_pairs

CLEAN_STATES = ("data", "teacher")


@dataclass
class MultistepCDConfig(ConsistencyDistillationConfig):
    segments: int = 4  # S when segment_schedule is empty
    segment_schedule: list[int] = field(default_factory=list)  # S per phase, e.g. [8, 4, 2, 1]
    total_steps: int = 2000  # K over which the phases run: set it to train.steps
    # Where the clean states x0 that are noised to x_t come from: "data" (the batch's x) or
    # "teacher" (the teacher's ODE samples of the batch's pairs, ode_x: its own, e.g. guided, output
    # distribution, so x_t lies near the trajectories the student must map).
    clean_states: str = "data"
    regression_weight: float = 0.0  # λ of the ODE-pair regression term; 0: off (no pairs needed)
    regression_distance: str = "pseudo_huber"  # pseudo_huber | l2 | cauchy
    regression_c: float = 0.0  # distance scale; 0: 0.00054·sqrt(values per sample)


@register_method("multistep_cd")
class MultistepCD(ConsistencyFamily):
    Config = MultistepCDConfig
    supports_guidance_input = True

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        check_range(self.name, "total_steps", config.total_steps, 1)
        for key, values in (("segments", [config.segments]), ("segment_schedule", config.segment_schedule)):
            for s in values:
                if s < 1 or config.num_intervals % s:
                    raise ValueError(f"multistep_cd: every value of {key} must be >= 1 and divide num_intervals "
                                     f"({config.num_intervals}); got {s}")
        check_range(self.name, "regression_weight", config.regression_weight, 0.0)
        check_choice(self.name, "regression_distance", config.regression_distance, DISTANCES)
        check_choice(self.name, "clean_states", config.clean_states, CLEAN_STATES)
        if config.guidance_input and self.needs_ode_pairs:
            raise ValueError("multistep_cd: guidance_input cannot be combined with regression_weight or "
                             "clean_states=teacher (the teacher's ODE pairs are drawn at one fixed guidance)")
        self._set_segments(self.segments_at(0))

    @property
    def needs_ode_pairs(self) -> bool:
        """Whether every batch must carry the teacher's ODE pairs (``PAIR_KEYS``): only when
        regressing on them (``regression_weight`` > 0) or noising their samples (``clean_states``)."""
        return self.config.regression_weight > 0 or self.config.clean_states == "teacher"

    def segments_at(self, step: int) -> int:
        schedule = self.config.segment_schedule
        if not schedule:
            return self.config.segments
        return schedule[min(step * len(schedule) // self.config.total_steps, len(schedule) - 1)]

    def _set_segments(self, s: int) -> None:
        # The buffer on the model and its EMA copies: evaluation mid-run samples with the current S.
        for model in (self.student.model, *self.student.ema):
            model.segments.fill_(s)

    def update_groups(self, step: int) -> list[str]:
        self._set_segments(self.segments_at(step))
        return super().update_groups(step)

    def loss(self, batch, group):
        cfg = self.config
        x0, cond, pairs = split_pairs(batch)
        if self.needs_ode_pairs and set(PAIR_KEYS) - set(pairs):
            raise ValueError(f"{self.name}: regression_weight > 0 and clean_states=teacher need the teacher's ODE "
                             f"pairs in every batch (keys {', '.join(PAIR_KEYS)}; a domain attaches them in "
                             "Domain.stage_data when the method's needs_ode_pairs is true)")
        if cfg.clean_states == "teacher":
            x0 = pairs["ode_x"]
        b, dtype = x0.shape[0], x0.dtype
        segments = self.segments_at(self.step)
        per_segment = cfg.num_intervals // segments
        grid = discretisation(self.param, cfg.num_intervals, device=x0.device)
        n = torch.randint(0, cfg.num_intervals - cfg.skip + 1, (b,), device=x0.device)
        lower = torch.div(n + cfg.skip - 1, per_segment, rounding_mode="floor") * per_segment
        t, s, e = grid[n + cfg.skip], grid[torch.maximum(n, lower)], grid[lower]
        x_t = self.param.add_noise(x0, torch.randn_like(x0), t.to(dtype))
        scale = expand(torch.sqrt(sum(v**2 for v in self.param.alpha_sigma(e))), x0)
        w, w_cond = self.guidance_draw(b, x0.device)
        with torch.no_grad():
            x_s = solver_step(self.teacher, self.param, x_t, t, s, cond, w)
            target = self.target_model()(x_s, s.to(dtype), edge=e.to(dtype), **cond, **w_cond)
        online = self.student(x_t, t.to(dtype), edge=e.to(dtype), **cond, **w_cond)
        loss = consistency_distance(online / scale, target / scale, cfg.distance, cfg.c)
        stats = {"multistep_cd/segments": float(segments)}
        if cfg.regression_weight > 0:
            sample = segment_rollout(self.student, self.param, pairs["ode_noise"], segments, **cond)
            regression = consistency_distance(sample, pairs["ode_x"], cfg.regression_distance, cfg.regression_c)
            stats["multistep_cd/regression"] = regression.detach()
            loss = loss + cfg.regression_weight * regression
        return loss, stats
