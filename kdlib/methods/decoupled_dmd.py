"""Decoupled DMD (Liu et al. 2025, "Decoupled DMD: CFG Augmentation as the Spear, Distribution
Matching as the Shield", §3–4): DMD2 with its guided distribution-matching gradient split into its
two parts, each with its own weight and its own noise-level law.

With a CFG-guided real score x̂0_cfg = x̂0_u + w·(x̂0_c − x̂0_u), DMD's gradient decomposes exactly:

    g_DMD = (x̂0_fake − x̂0_cfg)/n = (x̂0_fake − x̂0_c)/n + (w − 1)·(x̂0_u − x̂0_c)/n = g_DM + (w − 1)·g_CA

n = mean|x − x̂0_cfg| (DMD's normaliser). g_DM is true distribution matching against the
conditional teacher (the "shield", a regulariser); g_CA, CFG augmentation, bakes the guidance
direction into the student (the "spear", the engine of few-step quality). Here

    L = λ_DM·L_sur(x, g_DM at t ~ law(time_shift)) + λ_CA·(w − 1)·L_sur(x, g_CA at τ ~ law(ca_time_shift))

with L_sur the surrogate of ``distribution_matching`` (gradient g / numel), each term at its own
freshly drawn noise level. With λ_DM = λ_CA = 1 and both terms at the same (x_t, t) this is DMD2's
guided gradient exactly; the paper's gain comes from decoupling the two re-noising schedules.
Everything else (critic, GAN term, two time-scale rule, backward simulation) is ``dmd2``'s. The
fake score is conditional and unguided, as in DMD2. At ``guidance`` 1 the CA term vanishes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import register_method
from kdlib.methods.consistency_family import check_range
from kdlib.methods.distribution_matching import DistributionMatcher, dmd_normaliser, surrogate_loss
from kdlib.methods.dmd2 import DMD2, DMD2Config


@dataclass
class DecoupledDMDConfig(DMD2Config):
    dm_weight: float = 1.0  # λ_DM of the distribution-matching term
    ca_weight: float = 1.0  # λ_CA of the CFG-augmentation term (times w − 1)
    ca_time_shift: float = 1.0  # σ/α scale of the CA term's noise levels (DM: time_shift)


class DecoupledMatcher(DistributionMatcher):
    """``DistributionMatcher`` whose loss is the two decoupled terms (module docstring)."""

    def __init__(self, teacher, critic, param, guidance, time_shift, dm_weight, ca_weight, ca_time_shift):
        super().__init__(teacher, critic, param, guidance, time_shift)
        self.dm_weight, self.ca_weight, self.ca_time_shift = dm_weight, ca_weight, ca_time_shift

    def gradients(self, x: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, cond: dict,
                  fake: bool = True) -> tuple[torch.Tensor | None, torch.Tensor]:
        """(g_DM, g_CA) [B, ...] at one noisy point (g_DM None when ``fake`` is False: the CA
        term does not need the fake score). x: the clean samples (float32, detached)."""
        x0_c = self.x0(self.teacher, x_t, t, cond, 1.0)
        x0_u = self.x0(self.teacher, x_t, t, cond, 0.0)
        norm = dmd_normaliser(x, x0_u + self.guidance * (x0_c - x0_u))
        g_dm = torch.nan_to_num((self.x0(self.critic.net, x_t, t, cond) - x0_c) / norm) if fake else None
        return g_dm, torch.nan_to_num((x0_u - x0_c) / norm)

    def loss(self, x, cond):
        clean = x.detach().float()
        g_dm, _ = self.gradients(clean, *self.noised(x.detach()), cond)
        dm, stats = surrogate_loss(x, self.dm_weight * g_dm)
        loss = dm
        if self.ca_weight > 0 and self.guidance != 1.0:
            _, g_ca = self.gradients(clean, *self.noised(x.detach(), self.ca_time_shift), cond, fake=False)
            ca, ca_stats = surrogate_loss(x, self.ca_weight * (self.guidance - 1.0) * g_ca)
            loss = loss + ca
            stats["ca/grad_norm"] = ca_stats["dm/grad_norm"]
            stats["ca/loss"] = ca.detach()
        return loss, stats


@register_method("decoupled_dmd")
class DecoupledDMD(DMD2):
    Config = DecoupledDMDConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        if config.guidance_range:  # the CA term is scaled by one fixed w − 1 (module docstring)
            raise ValueError(f"{self.name}: guidance_range is not supported (the CFG-augmentation term is "
                             "weighted by a fixed guidance − 1); set guidance to one scale instead")
        check_range(self.name, "dm_weight", config.dm_weight, 0.0)
        check_range(self.name, "ca_weight", config.ca_weight, 0.0)
        if not config.ca_time_shift > 0:
            raise ValueError(f"{self.name}: ca_time_shift must be > 0; got {config.ca_time_shift!r}")
        self.dm = DecoupledMatcher(teacher, self.critic, self.param, config.guidance, config.time_shift,
                                   config.dm_weight, config.ca_weight, config.ca_time_shift)
