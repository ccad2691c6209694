"""rCM: score-regularised continuous-time consistency distillation (Zheng et al. 2025, "Large
Scale Diffusion Distillation via Score-Regularized Continuous-Time Consistency", §4).

sCM's loss (``kdlib.methods.scm``: the forward-divergence, trajectory-following term) plus DMD's
reverse-divergence term on the student's own few-step samples, with its fake-score critic:

    student:  L = L_sCM(F_θ) + λ·L_DM(x),   x = f_θ(x_{t_i}, t_i) a few-step sample (backward simulation)
    critic:   denoising loss of μ_fake on stopgrad x

L_DM is ``distribution_matching``'s surrogate with the teacher (in its own parameterisation,
``teacher_param``) as the real score; the student stays a TrigFlow ``ConsistencyModel``, its
samples are clean data in every parameterisation. As in rCM: the DM term and the critic start
after sCM's tangent warm-up (``tangent_warmup`` steps of sCM alone, so the fake score starts from
the teacher when the student already samples in few steps), then ``critic_updates`` (N) critic
updates per student update: groups ``["student", "critic"]`` at (k − H) % N == 0, ``["critic"]``
otherwise. rCM's λ is 1/100 of sCM's sum-reduced loss, with the DM surrogate unhalved; in the
mean-reduced, halved surrogate here that is ``dm_weight`` = 0.02. ``guidance`` guides only the
DM term's real score (sCM's tangent stays the unguided teacher's). Under the TTUR, use
``train.schedule: constant`` (the Trainer's schedule counts each group's own updates).
Batch: ``x`` clean states [B, ...]; other keys are the condition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import register_method
from kdlib.diffusion.param import get_parameterisation
from kdlib.methods.consistency_family import check_range
from kdlib.methods.distribution_matching import (
    Critic,
    DistributionMatcher,
    DMOptions,
    FewStepGenerator,
    check_options,
    fake_score_network,
)
from kdlib.methods.flow_matching import split_batch
from kdlib.methods.scm import SCMDistillation, SCMMethodConfig


@dataclass
class RCMConfig(SCMMethodConfig, DMOptions):
    dm_weight: float = 0.02  # λ of the reverse-divergence term (rCM's 1/100 in its loss scaling)
    critic_updates: int = 5  # N: critic updates per student update once the DM term is on (rCM: 5)


@register_method("rcm")
class RCM(SCMDistillation):
    Config = RCMConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        check_options(self.name, config)
        check_range(self.name, "dm_weight", config.dm_weight, 0.0)
        check_range(self.name, "critic_updates", config.critic_updates, 1)
        self.generator = FewStepGenerator(student, config.gen_steps, config.backward_simulation)
        self.critic = Critic(fake_score_network(teacher, config))
        self.dm = DistributionMatcher.from_options(self.name, teacher, self.critic,
                                                   get_parameterisation(config.teacher_param), config)

    def trainable_modules(self):
        return {**super().trainable_modules(), "critic": self.critic}

    def dm_active(self, step: int) -> bool:
        return step >= self.config.tangent_warmup

    def update_groups(self, step):
        super().update_groups(step)  # sCM's step counter (tangent warm-up)
        if not self.dm_active(step):
            return ["student"]
        student = ["student"] if (step - self.config.tangent_warmup) % self.config.critic_updates == 0 else []
        return [*student, "critic"]

    def loss(self, batch, group):
        x0, cond = split_batch(batch)
        if group == "critic":
            with torch.no_grad():
                fake = self.generator.sample(x0, cond)
            loss = self.group_forward("critic")(self.dm.fake_score_loss, fake, cond)
            return loss, {"critic/denoise": loss.detach()}
        loss, stats = super().loss(batch, group)
        if self.dm_active(self.step) and self.config.dm_weight > 0:
            dm, dm_stats = self.dm.loss(self.generator.sample(x0, cond), cond)
            stats.update(dm_stats, **{"dm/loss": dm.detach()})
            loss = loss + self.config.dm_weight * dm
        return loss, stats
