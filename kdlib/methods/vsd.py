"""VSD / SwiftBrush: image-free one-step distillation by variational score distillation (Nguyen &
Tran 2024, "SwiftBrush: One-Step Text-to-Image Diffusion Model with Variational Score
Distillation", Alg. 1; the loss of ProlificDreamer, Wang et al. 2023), with SNOOPI's
random-scale guidance (Nguyen et al. 2024, "SNOOPI: Supercharged One-step Diffusion Distillation
with Proper Guidance", PG-SB).

    student:     L_G = L_sur(x, g),  g = w(t)·(ε̂_real(x_t, t, y) − ε̂_fake(x_t, t, y)),  x = G(z, y)   (Alg. 1 l. 10)
    fake score:  denoising loss of ε_fake on stopgrad x                                           (Alg. 1 l. 11–14)

g is ``distribution_matching``'s gradient with ``weighting="vsd"`` (w(t) = σ²/(α²+σ²), the VP
1 − ᾱ_t of ProlificDreamer; ``weighting: dmd`` swaps in DMD's per-sample normaliser), applied
through the same surrogate as DMD's. ε̂_real is the frozen teacher, classifier-free guided
(``kdlib.diffusion.guidance``) at ``guidance``, or, with ``guidance_range: [lo, hi]``, at a scale
drawn per sample from U(lo, hi) at every step (PG-SB: a fixed scale makes VSD unstable across
backbones; ``guide_fake_score`` guides the fake score by the same scales, as SNOOPI does for "both
teachers", and then trains its unconditional branch by dropping the condition with probability
``fake_cond_drop``). The fake score is a LoRA adapter on the teacher by default (SwiftBrush's "LoRA
teacher", ``fake_score: lora``; ``copy`` is the full-copy ablation), trained on the student's
samples; ``critic_updates`` fake-score updates per student update (SwiftBrush alternates 1:1,
student first).

Image-free: the student is trained from the teacher alone. Of a batch it reads the condition
(every key but ``x``) and the shape, dtype and device of ``x``, never its values: the student
starts from noise, and a few-step student (``gen_steps`` > 1) reaches its later steps by backward
simulation of its own samples (``backward_simulation`` must stay on). Both noise levels follow the
teacher's training-time law (SwiftBrush draws t ~ U(0.02T, 0.98T) for the student, U(0, T) for the
LoRA teacher), scaled by ``time_shift``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import Method, register_method
from kdlib.diffusion.param import get_parameterisation
from kdlib.methods.consistency_family import check_choice, check_range, init_student_from_teacher
from kdlib.methods.distribution_matching import (
    WEIGHTINGS,
    Critic,
    DistributionMatcher,
    DistributionMatchingConfig,
    FewStepGenerator,
    check_options,
    fake_score_network,
)
from kdlib.methods.flow_matching import check_parameterisation, split_batch


@dataclass
class VSDConfig(DistributionMatchingConfig):
    fake_score: str = "lora"  # SwiftBrush's LoRA teacher; copy: a full trainable copy
    weighting: str = "vsd"  # vsd: w(t)·Δε (SwiftBrush); dmd: DMD's per-sample normaliser
    guide_fake_score: bool = False  # the fake score guided by the same scales (SNOOPI's "both teachers")
    fake_cond_drop: float = 0.1  # with guide_fake_score: condition dropout of the fake score's loss
    critic_updates: int = 1  # fake-score updates per student update (SwiftBrush: 1)


@register_method("vsd")
class VSD(Method):
    Config = VSDConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        check_options(self.name, config)
        check_choice(self.name, "weighting", config.weighting, WEIGHTINGS)
        check_range(self.name, "critic_updates", config.critic_updates, 1)
        check_range(self.name, "fake_cond_drop", config.fake_cond_drop, 0.0, 1.0)
        if config.gen_steps > 1 and not config.backward_simulation:
            raise ValueError(f"{self.name} is image-free: with gen_steps > 1 the later steps' inputs come from the "
                             "student's own samples (backward_simulation: true), never from data")
        self.generator = FewStepGenerator(student, config.gen_steps, backward_simulation=True)
        self.param = get_parameterisation(config.param)
        check_parameterisation(teacher.model, config.param, "the teacher")
        if config.init_from_teacher:
            init_student_from_teacher(student, teacher)
        self.critic = Critic(fake_score_network(teacher, config))
        self.dm = DistributionMatcher.from_options(self.name, teacher, self.critic, self.param, config,
                                                   weighting=config.weighting, guide_fake=config.guide_fake_score,
                                                   fake_cond_drop=config.fake_cond_drop)

    def trainable_modules(self):
        return {"student": self.student.model, "critic": self.critic}

    def update_groups(self, step):
        student = ["student"] if step % self.config.critic_updates == 0 else []
        return [*student, "critic"]

    def loss(self, batch, group):
        x, cond = split_batch(batch)
        # The only use of the data: a zero state of x's shape, dtype and device (module docstring).
        like = torch.zeros_like(x)
        if group == "critic":
            with torch.no_grad():
                fake = self.generator.sample(like, cond)
            loss = self.group_forward("critic")(self.dm.fake_score_loss, fake, cond)
            return loss, {"critic/denoise": loss.detach()}
        loss, stats = self.dm.loss(self.generator.sample(like, cond), cond)
        stats["vsd/loss"] = loss.detach()
        return loss, stats
