"""LADD: latent adversarial diffusion distillation (Sauer et al. 2024, "Fast High-Resolution Image
Synthesis with Latent Adversarial Diffusion Distillation", §3).

A few-step student trained by an adversarial loss alone, against a discriminator made of the frozen
teacher's features at several layers and noise levels plus small trainable heads
(``teacher_discriminator``):

    generator (every N-th step):  L_G = mean_heads ℓ_G(D(x̂0)) + λ_distill·L_distill,   x̂0 = G(...)
    discriminator (every step):   L_D = mean_heads ℓ_D(D(x_real), D(stopgrad x̂0))

with ℓ hinge (LADD's) or non-saturating, D the teacher-feature discriminator at re-noised states,
N = ``disc_updates``. As in ADD/LADD the student's input at sampler step i > 0 is a "real" state
noised to t_i (``backward_simulation`` off, the default; on: the student's own earlier steps, as
DMD2), so with ``real: teacher`` — LADD's synthetic data — the student trains on teacher samples
only, and its targets are the teacher's distribution rather than the data's. L_distill is ADD's
distillation loss (Sauer et al. 2023, "Adversarial Diffusion Distillation", §3, with d the mean
squared error and c(t) = 1): the student's x̂0 against the teacher's (guided) x̂0 of it re-noised
at the teacher's training law; LADD drops it (λ_distill = 0, the default). ``disc_warmup`` steps
of discriminator updates come first (``teacher_discriminator.TeacherDiscriminator.groups``).

The student is a ``ConsistencyModel`` (x̂0 from (x_t, t)) in the teacher's parameterisation, started
from the teacher; ``gen_steps`` > 1 trains its few-step sampler's times (``FewStepGenerator``).
Batch: ``x`` clean states [B, ...], optionally ``dmd.add_ode_pairs``' ``ode_x`` (teacher samples
for ``real: teacher``); other keys are the condition.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from kdlib.core.method import Method, register_method
from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.samplers import make_denoiser
from kdlib.methods.consistency_family import check_range, init_student_from_teacher
from kdlib.methods.distribution_matching import FewStepGenerator
from kdlib.methods.dmd import split_pairs
from kdlib.methods.flow_matching import check_parameterisation
from kdlib.methods.teacher_discriminator import AdversarialOptions, TeacherDiscriminator


@dataclass
class LADDConfig(AdversarialOptions):
    param: str = "fm"  # the teacher's parameterisation; the student shares it
    gen_steps: int = 1  # sampling steps the student is trained for
    backward_simulation: bool = False  # ADD/LADD: later steps' inputs are real states noised
    distill_weight: float = 0.0  # λ_distill of ADD's distillation loss (LADD: 0)
    init_from_teacher: bool = True


def check_generator(method: str, student, param_name: str) -> None:
    model = student.model
    if not isinstance(model, ConsistencyModel) or model.param.name != param_name:
        found = model.param.name if isinstance(model, ConsistencyModel) else type(model).__name__
        raise ValueError(f"{method}: the student must be a ConsistencyModel in {param_name!r}; got {found}")


@register_method("ladd")
class LADD(Method):
    Config = LADDConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        check_range(self.name, "gen_steps", config.gen_steps, 1)
        check_range(self.name, "distill_weight", config.distill_weight, 0.0)
        self.param = get_parameterisation(config.param)
        check_parameterisation(teacher.model, config.param, "the teacher")
        check_generator(self.name, student, config.param)
        if config.init_from_teacher:
            init_student_from_teacher(student, teacher)
        self.generator = FewStepGenerator(student, config.gen_steps, config.backward_simulation)
        self.disc = TeacherDiscriminator(self.name, config, teacher, self.param)

    def trainable_modules(self):
        return {"student": self.student.model, "discriminator": self.disc.heads}

    def update_groups(self, step):
        return self.disc.groups(step)

    def student_sample(self, x: torch.Tensor, cond: dict, pairs: dict) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(x̂0 [B, ...] with its graph when grad is on, the real states when they were needed):
        the real states feed the student only at a step i > 0 without backward simulation, and
        teacher samples are not drawn unless they are used."""
        # A host-side draw, as FewStepGenerator.sample's (Python's random, saved with every
        # checkpoint's RNG state): int(torch.randint(...)) has no value under the --dry-run fakes.
        index = random.randrange(len(self.generator.times))
        real = None
        if index > 0 and not self.config.backward_simulation:
            real = self.disc.real_samples(x, cond, pairs)
        return self.generator.sample(x if real is None else real, cond, index), real

    def loss(self, batch, group):
        x, cond, pairs = split_pairs(batch)
        if group == "discriminator":
            with torch.no_grad():
                fake, real = self.student_sample(x, cond, pairs)
            real = self.disc.real_samples(x, cond, pairs) if real is None else real
            # Through the heads' forward: under torchrun their DDP wrapper averages these gradients.
            return self.group_forward("discriminator")(self.disc.discriminator_loss, real, fake, cond)
        fake, _ = self.student_sample(x, cond, pairs)
        loss, stats = self.disc.generator_loss(fake, cond)
        if self.config.distill_weight > 0:
            distill = self.distillation_loss(fake, cond)
            stats["ladd/distill"] = distill.detach()
            loss = loss + self.config.distill_weight * distill
        return loss, stats

    def distillation_loss(self, fake: torch.Tensor, cond: dict) -> torch.Tensor:
        """ADD's distillation loss with d = MSE: ‖x̂0 − stopgrad x̂0_teacher(x̂0 re-noised)‖² per value."""
        with torch.no_grad():
            t = self.param.sample_train_time(fake.shape[0], device=fake.device).to(fake.dtype)
            x_t = self.param.add_noise(fake.detach(), torch.randn_like(fake), t)
            target = make_denoiser(self.teacher, self.param, cond, self.config.teacher_guidance)(x_t, t)[0]
        return (fake.float() - target.float()).pow(2).mean()
