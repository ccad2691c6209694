"""sCM + LADD: SANA-Sprint's hybrid distillation (Chen et al. 2025, "SANA-Sprint: One-Step
Diffusion with Continuous-Time Consistency Distillation", §3).

sCM's loss (``kdlib.methods.scm``, the same code) plus LADD's adversarial loss on the student's own
samples, with the discriminator made of the frozen teacher's features and trainable heads
(``teacher_discriminator``):

    student:        L = L_sCM(F_θ) + λ_adv·L_G(x̂0),   x̂0 = f_θ(x_{t_i}, t_i) a few-step sample
    discriminator:  L_D(real, stopgrad x̂0)    (``disc_updates`` per student update)

x̂0 comes from the TrigFlow student's own sampler (``FewStepGenerator``: from pure noise at one
step, the 1-step output that is evaluated); it is clean data, so the teacher re-noises it in its
own parameterisation (``teacher_param``). The default λ_adv = 0.5 is SANA-Sprint's, in its loss
scaling; it does not carry over: with sCM's adaptive weight the two gradients differ by orders of
magnitude (on the MNIST recipe the adversarial one is 60–200× the sCM one, so mnist-scm-ladd uses
0.001). Hinge loss, as in SANA-Sprint. During the first ``disc_warmup`` steps the student trains by sCM alone
while the discriminator learns. With ``adv_weight`` 0 the method is sCM exactly: no adversarial term is
computed and the discriminator never updates, so loss, gradients and random draws are sCM's.
Batch: ``x`` clean states [B, ...]; other keys are the condition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import register_method
from kdlib.diffusion.param import get_parameterisation
from kdlib.methods.consistency_family import check_range
from kdlib.methods.distribution_matching import FewStepGenerator
from kdlib.methods.flow_matching import split_batch
from kdlib.methods.scm import SCMDistillation, SCMMethodConfig
from kdlib.methods.teacher_discriminator import AdversarialOptions, TeacherDiscriminator


@dataclass
class SCMLADDConfig(SCMMethodConfig, AdversarialOptions):
    adv_weight: float = 0.5  # λ_adv (SANA-Sprint: 0.5)
    gen_steps: int = 1  # sampling steps of the student's adversarial samples
    backward_simulation: bool = True  # inputs of later steps from the student itself (else: data noised)


@register_method("scm_ladd")
class SCMLADD(SCMDistillation):
    Config = SCMLADDConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        check_range(self.name, "adv_weight", config.adv_weight, 0.0)
        check_range(self.name, "gen_steps", config.gen_steps, 1)
        self.generator = FewStepGenerator(student, config.gen_steps, config.backward_simulation)
        self.disc = TeacherDiscriminator(self.name, config, teacher, get_parameterisation(config.teacher_param))

    def trainable_modules(self):
        return {**super().trainable_modules(), "discriminator": self.disc.heads}

    def adv_active(self, step: int) -> bool:
        return self.config.adv_weight > 0 and step >= self.config.disc_warmup

    def update_groups(self, step):
        super().update_groups(step)  # sCM's step counter (tangent warm-up)
        if self.config.adv_weight == 0:
            return ["student"]
        # during the discriminator's warm-up the student still trains, by sCM alone
        return self.disc.groups(step) if self.adv_active(step) else ["student", "discriminator"]

    def loss(self, batch, group):
        if group == "discriminator":
            x0, cond = split_batch(batch)
            with torch.no_grad():
                fake = self.generator.sample(x0, cond)
            real = self.disc.real_samples(x0, cond)
            # Through the heads' forward: under torchrun their DDP wrapper averages these gradients.
            return self.group_forward("discriminator")(self.disc.discriminator_loss, real, fake, cond)
        loss, stats = super().loss(batch, group)
        if self.adv_active(self.step):
            x0, cond = split_batch(batch)
            adv, adv_stats = self.disc.generator_loss(self.generator.sample(x0, cond), cond)
            stats.update(adv_stats)
            loss = loss + self.config.adv_weight * adv
        return loss, stats
