"""DMD: one-step diffusion with distribution matching distillation (Yin et al. 2024, "One-step
Diffusion with Distribution Matching Distillation", Alg. 1).

    generator:   L_G = L_DM(G(z)) + λ_reg·d(G(z_ref), y_ref)                    (eq. 7–9)
    fake score:  L_fake = denoising loss of μ_fake on stopgrad G(z)             (eq. 6)

L_DM is the distribution matching surrogate of ``distribution_matching`` (real score: the frozen
teacher, optionally CFG-guided; fake score: a trainable copy of the teacher). The regression term
anchors the generator to the teacher's PF-ODE on precomputed pairs (z_ref, y_ref): noise and the
teacher's deterministic sample from it under that row's condition, built once with
``add_ode_pairs`` and carried in the batch as ``ode_noise`` / ``ode_x`` (``needs_ode_pairs`` asks the
domain to attach them to the training data, ``Domain.stage_data``). d is a distance of
``consistency_family`` (DMD uses LPIPS, an image metric: pseudo-Huber is the domain-agnostic
default here). Both networks update once per step, generator first (DMD alternates them 1:1).

The generator is the student, a ``ConsistencyModel`` (x̂0 from (x_t, t)) started from the teacher;
``gen_steps`` > 1 trains it as a few-step generator (``FewStepGenerator``), with the regression
term on its first step (the map from pure noise, which is what the pairs describe).
Batch: ``x`` clean states [B, ...], the pairs, other keys are the condition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.data import TensorDataset
from kdlib.core.method import Method, register_method
from kdlib.core.models import Teacher
from kdlib.diffusion.param import Parameterisation, get_parameterisation
from kdlib.diffusion.samplers import sample
from kdlib.methods.consistency_family import (
    DISTANCES,
    check_choice,
    check_range,
    consistency_distance,
    init_student_from_teacher,
)
from kdlib.methods.distribution_matching import (
    Critic,
    DistributionMatcher,
    DistributionMatchingConfig,
    FewStepGenerator,
    check_options,
    fake_score_network,
)
from kdlib.methods.flow_matching import check_parameterisation, split_batch

PAIR_KEYS = ("ode_noise", "ode_x")


@torch.no_grad()
def add_ode_pairs(data: TensorDataset, teacher: Teacher, param: Parameterisation, steps: int = 50,
                  sampler: str = "heun", guidance: float = 1.0, seed: int = 0,
                  batch_size: int = 256) -> TensorDataset:
    """``data`` plus DMD's regression pairs: per row, noise ``ode_noise`` [N, ...] ~ N(0, I) and the
    teacher's ODE sample ``ode_x`` from it under that row's condition (every key but ``x``).
    Deterministic in ``seed``; costs steps·N teacher evaluations (2× with guidance, Heun)."""
    tensors = data.tensors
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(tensors["x"].shape, generator=g).to(tensors["x"])
    outputs = []
    for start in range(0, len(data), batch_size):
        rows = slice(start, start + batch_size)
        cond = {k: v[rows] for k, v in tensors.items() if k != "x" and k not in PAIR_KEYS}
        outputs.append(sample(teacher, param, noise[rows], steps, sampler, cond=cond, guidance=guidance))
    return TensorDataset(**tensors, ode_noise=noise, ode_x=torch.cat(outputs))


def split_pairs(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict, dict]:
    """(x [B, ...], condition, regression pairs) of a DMD batch."""
    x, rest = split_batch(batch)
    pairs = {k: rest.pop(k) for k in PAIR_KEYS if k in rest}
    return x, rest, pairs


@dataclass
class DMDConfig(DistributionMatchingConfig):
    regression_weight: float = 0.25  # λ_reg (DMD §4: 0.25); 0 turns the regression term off
    regression_distance: str = "pseudo_huber"  # pseudo_huber | l2 | cauchy
    regression_c: float = 0.0  # distance scale; 0: 0.00054·sqrt(values per sample)


@register_method("dmd")
class DMD(Method):
    Config = DMDConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        check_options(self.name, config)
        check_range(self.name, "regression_weight", config.regression_weight, 0.0)
        check_choice(self.name, "regression_distance", config.regression_distance, DISTANCES)
        self.generator = FewStepGenerator(student, config.gen_steps, config.backward_simulation)
        self.param = get_parameterisation(config.param)
        check_parameterisation(teacher.model, config.param, "the teacher")
        if config.init_from_teacher:
            init_student_from_teacher(student, teacher)
        self.critic = Critic(fake_score_network(teacher, config))
        self.dm = DistributionMatcher.from_options(self.name, teacher, self.critic, self.param, config)

    @property
    def needs_ode_pairs(self) -> bool:
        """Whether every batch must carry the teacher's ODE pairs (``PAIR_KEYS``): a domain that
        can make them attaches them to the training data (``Domain.stage_data``; image-gen does)."""
        return self.config.regression_weight > 0

    def trainable_modules(self):
        return {"student": self.student.model, "critic": self.critic}

    def loss(self, batch, group):
        x, cond, pairs = split_pairs(batch)
        if group == "critic":
            with torch.no_grad():
                fake = self.generator.sample(x, cond)
            loss = self.group_forward("critic")(self.dm.fake_score_loss, fake, cond)
            return loss, {"critic/denoise": loss.detach()}
        loss, stats = self.dm.loss(self.generator.sample(x, cond), cond)
        stats["dm/loss"] = loss.detach()
        if self.config.regression_weight > 0:
            regression = self.regression_loss(pairs, cond)
            stats["dmd/regression"] = regression.detach()
            loss = loss + self.config.regression_weight * regression
        return loss, stats

    def regression_loss(self, pairs: dict, cond: dict) -> torch.Tensor:
        """d(G(z_ref), y_ref) with G the student's first step from the pair's noise."""
        if set(PAIR_KEYS) - set(pairs):
            raise ValueError(f"{self.name}: regression_weight > 0 needs the teacher's ODE pairs in every batch "
                             f"(keys {', '.join(PAIR_KEYS)}): build them with kdlib.methods.dmd.add_ode_pairs "
                             "(a domain attaches them in Domain.stage_data when the method's needs_ode_pairs is "
                             "true), or set method_args.regression_weight=0")
        x_t, t = self.generator.start(pairs["ode_noise"])
        pred = self.student(x_t, t, **cond)
        return consistency_distance(pred, pairs["ode_x"], self.config.regression_distance, self.config.regression_c)
