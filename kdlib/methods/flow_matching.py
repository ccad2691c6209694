"""Diffusion / flow-matching training of a network from data, without a teacher: how the
generative recipes train their own teachers.

    x_t = α(t)·x0 + σ(t)·ε,   loss = ‖net(model_input(x_t, t), cond) − target(x0, ε, t)‖²

with (α, σ, target, the law of t) given by a ``kdlib.diffusion.param`` parameterisation. The
default "fm" is rectified flow / flow matching (Liu et al. 2022, Lipman et al. 2022): velocity
target ε − x0, logit-normal t (Esser et al. 2024); "edm" gives EDM's preconditioned loss
(Karras et al. 2022, eq. 8 with λ = 1/c_out², i.e. plain MSE on F); "vp-eps" the DDPM loss.
The condition (every batch key other than ``x``) is dropped per sample with probability
``cond_drop`` so that classifier-free guidance works (Ho & Salimans 2022; default 0.1).

Batch convention: ``x`` the clean state [B, ...]; other keys are the condition passed to the
network as keyword arguments.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import Method, register_method
from kdlib.diffusion.guidance import drop_condition
from kdlib.diffusion.param import Parameterisation, get_parameterisation


def split_batch(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(state x, condition dict) of a generative batch."""
    return batch["x"], {k: v for k, v in batch.items() if k != "x"}


def check_parameterisation(net: torch.nn.Module, name: str, who: str) -> None:
    """Networks may declare the parameterisation they were trained in (``net.parameterisation``);
    a mismatch with the recipe would silently produce garbage, so it stops the run."""
    declared = getattr(net, "parameterisation", None)
    if declared is not None and declared != name:
        raise ValueError(f"{who} network is a {declared!r} model but the recipe says param={name!r}")


def denoising_loss(net, param: Parameterisation, x0: torch.Tensor, eps: torch.Tensor, t: torch.Tensor,
                   cond: dict[str, torch.Tensor]) -> torch.Tensor:
    """Mean squared error of ``net``'s prediction at x_t = α(t)·x0 + σ(t)·ε against the prediction a
    perfect network makes (the parameterisation's regression target). x0, eps: [B, ...]; t: [B].
    Also how DMD's fake score learns the generator's samples (``kdlib.methods.distribution_matching``)."""
    x_t = param.add_noise(x0, eps, t)
    target = param.from_x0_eps(x_t, x0, eps, t)
    pred = param.predict(net, x_t, t, **cond)
    return (pred.float() - target.float()).pow(2).mean()


@dataclass
class FlowMatchingConfig:
    param: str = "fm"  # vp-eps, vp-v, edm, fm, trigflow
    cond_drop: float = 0.1


@register_method("flow_matching")
class FlowMatching(Method):
    Config = FlowMatchingConfig
    needs_teacher = False

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        self.param = get_parameterisation(config.param)
        check_parameterisation(student.model, config.param, "the trained")

    def loss(self, batch, group):
        x0, cond = split_batch(batch)
        cond = drop_condition(cond, self.config.cond_drop)
        eps = torch.randn_like(x0)
        t = self.param.sample_train_time(x0.shape[0], device=x0.device).to(x0.dtype)
        return denoising_loss(self.student, self.param, x0, eps, t, cond), {}
