"""DMD2: improved distribution matching distillation (Yin et al. 2024, "Improved Distribution
Matching Distillation for Fast Image Synthesis").

Against DMD: no regression loss (no teacher ODE pairs to precompute, §4.1); the two time-scale
update rule instead — ``critic_updates`` (N) critic updates per generator update (§4.2, N = 5);
a GAN loss on real data, with the discriminator a classifier head on the fake score's features
(§4.3, eq. 3); and multi-step generation trained on the student's own intermediate states by
backward simulation (§4.5, ``FewStepGenerator``):

    generator (every N-th step):  L_G = L_DM(x) + λ_G·(−log D(x_t))                x = G(...)
    critic (every step):          L_C = denoising loss of μ_fake on stopgrad x
                                        + λ_D·(−log D(x_real,t) − log(1 − D(stopgrad x_t)))

D = sigmoid(head(features of μ_fake at layer ``gan_layer``)); x_t, x_real,t are noised at the DM
time law. The generator's GAN term runs through the critic with its weights frozen, so the head
and the fake score get gradients only in the critic's own update. At trainer step k the groups are
``["student", "critic"]`` when k % N == 0 and ``["critic"]`` otherwise (DMD2's loop: generator
first). ``train.steps`` counts critic updates; the generator makes ⌈steps / N⌉. The Trainer's
learning-rate schedule counts each group's own updates, so use ``train.schedule: constant``
(DMD2's) unless a shorter generator schedule is what you want.

λ_G = 3e-3 and λ_D = 1e-2 are DMD2's ImageNet values (relative to the mean-reduced L_DM and
denoising losses used here too). ``gan_layer`` = "" turns the GAN term off (DMD2's ablation).
Batch: ``x`` clean states [B, ...]; other keys are the condition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import Method, register_method
from kdlib.diffusion.param import get_parameterisation
from kdlib.methods.consistency_family import check_range, init_student_from_teacher
from kdlib.methods.distribution_matching import (
    Critic,
    DistributionMatcher,
    DistributionMatchingConfig,
    FewStepGenerator,
    check_options,
    fake_score_network,
    frozen,
)
from kdlib.methods.feature_gan import discriminator_loss, generator_loss
from kdlib.methods.flow_matching import check_parameterisation, split_batch


@dataclass
class DMD2Config(DistributionMatchingConfig):
    critic_updates: int = 5  # N: critic updates per generator update (two time-scale rule)
    gan_layer: str = ""  # the fake score's submodule whose output feeds the GAN head; "": no GAN term
    gan_channels: int = 0  # that output's channel count (dim 1)
    gan_generator_weight: float = 3e-3  # λ_G
    gan_critic_weight: float = 1e-2  # λ_D


@register_method("dmd2")
class DMD2(Method):
    Config = DMD2Config

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        check_options(self.name, config)
        check_range(self.name, "critic_updates", config.critic_updates, 1)
        check_range(self.name, "gan_generator_weight", config.gan_generator_weight, 0.0)
        check_range(self.name, "gan_critic_weight", config.gan_critic_weight, 0.0)
        self.generator = FewStepGenerator(student, config.gen_steps, config.backward_simulation)
        self.param = get_parameterisation(config.param)
        check_parameterisation(teacher.model, config.param, "the teacher")
        if config.init_from_teacher:
            init_student_from_teacher(student, teacher)
        self.critic = Critic(fake_score_network(teacher, config), config.gan_layer, config.gan_channels)
        self.dm = DistributionMatcher.from_options(self.name, teacher, self.critic, self.param, config)

    def trainable_modules(self):
        return {"student": self.student.model, "critic": self.critic}

    def update_groups(self, step):
        generator = ["student"] if step % self.config.critic_updates == 0 else []
        return [*generator, "critic"]

    def loss(self, batch, group):
        x, cond = split_batch(batch)
        return self.critic_loss(x, cond) if group == "critic" else self.generator_loss(x, cond)

    def generator_loss(self, x: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict]:
        fake = self.generator.sample(x, cond)
        loss, stats = self.dm.loss(fake, cond)
        stats["dm/loss"] = loss.detach()
        if self.critic.head is not None:
            with frozen(self.critic):
                gan = generator_loss(self.critic.logits(self.param, *self.dm.noised(fake), cond))
            stats["gan/generator"] = gan.detach()
            loss = loss + self.config.gan_generator_weight * gan
        return loss, stats

    def critic_loss(self, x: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            fake = self.generator.sample(x, cond)
        # Through the critic's forward: under torchrun its DDP wrapper averages these gradients.
        return self.group_forward("critic")(self.critic_terms, x, fake, cond)

    def critic_terms(self, x: torch.Tensor, fake: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict]:
        """L_C of real states x [B, ...] and generator samples fake [B, ...] (detached)."""
        loss = self.dm.fake_score_loss(fake, cond)
        stats = {"critic/denoise": loss.detach()}
        if self.critic.head is not None:
            # One pass over real and generated states: the head sees both at the same noise law.
            x_t, t = self.dm.noised(torch.cat([x, fake]))
            both = {k: torch.cat([v, v]) for k, v in cond.items()}
            real_logits, fake_logits = self.critic.logits(self.param, x_t, t, both).chunk(2)
            gan = discriminator_loss(real_logits, fake_logits)
            stats["gan/critic"] = gan.detach()
            accuracy = 0.5 * ((real_logits > 0).float().mean() + (fake_logits < 0).float().mean())
            stats["gan/critic_acc"] = accuracy.detach()
            loss = loss + self.config.gan_critic_weight * gan
        return loss, stats
