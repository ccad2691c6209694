"""sCM: continuous-time consistency training/distillation in TrigFlow (Lu & Song 2024,
"Simplifying, Stabilizing and Scaling Continuous-Time Consistency Models", Algorithm 1).

For x_t = cos(t)x0 + sin(t)z and the PF-ODE tangent dx_t/dt (the teacher's σ_d·F_pre(x_t/σ_d, t)
for distillation, sCD; cos(t)z − sin(t)x0 for training from data, sCT):

    σ_d·cos(t)sin(t)·dF⁻/dt = jvp(F⁻, (x_t/σ_d, t), (cos(t)sin(t)·dx_t/dt, cos(t)sin(t)·σ_d))
    g = −cos²(t)·(σ_d F⁻ − dx_t/dt) − r·(cos(t)sin(t)·x_t + σ_d cos(t)sin(t)·dF⁻/dt)
    g ← g / (‖g‖ + c)                                 (tangent normalisation, per sample)
    L = e^{w(t)}/D · ‖F_θ − F⁻ − g‖² − w(t)           (w: optional adaptive weighting)

with F⁻ the stop-gradient network, r = min(1, step/H) the tangent warm-up and D the number of
elements per sample. One ``torch.func.jvp`` gives both F_θ (with its graph, for the gradient) and
the tangent (detached): through kdlib attention the tangent comes from the fused JVP kernel.

Domain-agnostic: states are [B, ...] of any trailing shape, networks are ``net(x, t, **cond)``
returning an F-prediction of x's shape, t is [B].
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from kdlib.core.method import Method, register_method
from kdlib.diffusion import trigflow
from kdlib.diffusion.consistency import ConsistencyModel, network_jvp
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.reparam import ReparameterisedNet
from kdlib.methods.consistency_family import init_student_from_teacher
from kdlib.methods.flow_matching import check_parameterisation, split_batch
from kdlib.nn.embeddings import sinusoidal_embedding

Net = Callable[..., torch.Tensor]
JVP = Callable[..., tuple[torch.Tensor, torch.Tensor]]  # (primals, tangents, **cond) -> (F, dF)


@dataclass
class SCMConfig:
    sigma_d: float = 0.5
    p_mean: float = -1.0  # log-normal proposal of tan(t)·σ_d
    p_std: float = 1.4
    tangent_warmup: int = 10_000  # H: steps over which r ramps from 0 to 1
    tangent_norm_c: float = 0.1


class AdaptiveWeight(nn.Module):
    """w(t): [B] -> [B], a learned log-weight per time (sCM's adaptive loss weighting)."""

    def __init__(self, freq_dim: int = 128, scale: float = 1.0):
        super().__init__()
        self.freq_dim, self.scale = freq_dim, scale
        self.linear = nn.Linear(freq_dim, 1)
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        features = sinusoidal_embedding(self.scale * t, self.freq_dim).to(self.linear.weight.dtype)
        return self.linear(features)[:, 0]


def tangent_warmup(step: int, warmup_steps: int) -> float:
    """r = min(1, step / H); H = 0 switches the warm-up off."""
    return 1.0 if warmup_steps <= 0 else min(1.0, step / warmup_steps)


def normalize_tangent(g: torch.Tensor, c: float) -> torch.Tensor:
    """g / (‖g‖ + c) with the norm over each sample's elements. g: [B, ...]."""
    norm = g.flatten(1).norm(dim=1)
    return g / trigflow.expand(norm + c, g)


def f_and_time_derivative(
    net: Net, x_t: torch.Tensor, t: torch.Tensor, dxt_dt: torch.Tensor, sigma_d: float,
    jvp: JVP | None = None, **cond
) -> tuple[torch.Tensor, torch.Tensor]:
    """F(x_t/σ_d, t) (with its graph if grad is on) and σ_d·cos(t)sin(t)·dF/dt along the PF-ODE
    (detached). x_t, dxt_dt: [B, ...]; t: [B]. The cos·sin factor is put in the tangents, not
    applied afterwards, so dF/dt never blows up near t = π/2 (as in the paper). ``jvp``: what
    computes (F, dF) of (primals, tangents, **cond) in place of ``network_jvp`` of ``net`` (the
    same computation through a module's forward, e.g. a DDP-wrapped student's)."""
    cs = torch.cos(t) * torch.sin(t)
    primals, tangents = (x_t / sigma_d, t), (trigflow.expand(cs, x_t) * dxt_dt, cs * sigma_d)
    if jvp is None:
        f_value, tangent = network_jvp(net, primals, tangents, **cond)
    else:
        f_value, tangent = jvp(primals, tangents, **cond)
    return f_value, tangent.detach()


def scm_loss(
    net: Net,
    x0: torch.Tensor,
    z: torch.Tensor,
    t: torch.Tensor,
    dxt_dt: torch.Tensor,
    *,
    r: float,
    sigma_d: float,
    norm_c: float = 0.1,
    weight: Callable[[torch.Tensor], torch.Tensor] | None = None,
    jvp: JVP | None = None,
    **cond,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The sCM loss for one batch. x0, z, dxt_dt: [B, ...] (z ~ N(0, σ_d²)); t: [B]. ``jvp``: see
    ``f_and_time_derivative``.

    Returns the scalar loss (mean over the batch) and detached scalar statistics for logging.
    """
    x_t = trigflow.add_noise(x0, z, t)
    f_theta, cs_df_dt = f_and_time_derivative(net, x_t, t, dxt_dt, sigma_d, jvp, **cond)
    f_minus = f_theta.detach()
    cos, sin = trigflow.expand(torch.cos(t), x_t), trigflow.expand(torch.sin(t), x_t)
    g = -cos**2 * (sigma_d * f_minus - dxt_dt) - r * (cos * sin * x_t + cs_df_dt)
    g_norm = g.flatten(1).norm(dim=1)
    g = normalize_tangent(g, norm_c)

    per_sample = (f_theta - f_minus - g).flatten(1).float().pow(2).mean(dim=1)
    if weight is not None:
        w = weight(t).float()
        loss = (torch.exp(w) * per_sample - w).mean()
    else:
        loss = per_sample.mean()
    # Detached tensors, not floats: a host sync per statistic would stall a GPU step.
    stats = {"loss": loss.detach(), "mse": per_sample.mean().detach(), "tangent_norm": g_norm.mean().detach()}
    return loss, stats


class SCM:
    """sCM training step on a student F-prediction network.

    teacher: None for consistency training from data (sCT), else the pretrained F-prediction
    network whose PF-ODE tangent σ_d·F_pre(x_t/σ_d, t) is distilled (sCD); weight: w(t) (called
    once per loss); jvp: see ``f_and_time_derivative``.
    """

    def __init__(self, student: Net, teacher: Net | None = None, config: SCMConfig | None = None,
                 weight: Callable[[torch.Tensor], torch.Tensor] | None = None, jvp: JVP | None = None):
        self.student, self.teacher = student, teacher
        self.config = config or SCMConfig()
        self.weight, self.jvp = weight, jvp

    def loss(self, x0: torch.Tensor, step: int, generator: torch.Generator | None = None,
             **cond) -> tuple[torch.Tensor, dict[str, float]]:
        """x0: [B, ...] clean data (already scaled so its std is about σ_d)."""
        cfg = self.config
        z = cfg.sigma_d * torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        t = trigflow.sample_time(x0.shape[0], p_mean=cfg.p_mean, p_std=cfg.p_std, sigma_d=cfg.sigma_d,
                                 device=x0.device, generator=generator).to(x0.dtype)
        if self.teacher is None:
            dxt_dt = trigflow.velocity(x0, z, t)
        else:
            with torch.no_grad():
                x_t = trigflow.add_noise(x0, z, t)
                dxt_dt = trigflow.f_velocity(self.teacher, x_t, t, cfg.sigma_d, **cond)
        r = tangent_warmup(step, cfg.tangent_warmup)
        return scm_loss(self.student, x0, z, t, dxt_dt, r=r, sigma_d=cfg.sigma_d,
                        norm_c=cfg.tangent_norm_c, weight=self.weight, jvp=self.jvp, **cond)

    def train_step(self, optimizer: torch.optim.Optimizer, x0: torch.Tensor, step: int,
                   generator: torch.Generator | None = None, **cond) -> dict[str, torch.Tensor]:
        """One optimiser update; ``optimizer`` holds the student's (and the weight's) parameters."""
        optimizer.zero_grad(set_to_none=True)
        loss, stats = self.loss(x0, step, generator, **cond)
        loss.backward()
        optimizer.step()
        return stats


@dataclass
class SCMMethodConfig:
    teacher_param: str = "fm"  # the teacher's parameterisation; it is seen in TrigFlow exactly
    p_mean: float = -1.0
    p_std: float = 1.4
    tangent_warmup: int = 10_000  # H (sCM: 10k steps); 0 switches the warm-up off
    tangent_norm_c: float = 0.1
    adaptive_weight: bool = True  # learn w(t) jointly with the student (sCM §4.3)
    init_from_teacher: bool = True


@register_method("scm")
class SCMDistillation(Method):
    """sCM distillation (sCD) as a registered method, for any state shape and any teacher
    parameterisation: the student is a TrigFlow ``ConsistencyModel`` (f = cos t·x_t − sin t·σ_d·F),
    usually the teacher's own network seen through ``ReparameterisedNet`` (the domain's
    ``student_param: trigflow``), so it starts as the teacher. The teacher's PF-ODE tangent comes
    from the same exact conversion; dF/dt from ``torch.func.jvp`` of the student, which runs the
    fused attention JVP kernel when the network uses kdlib attention. Data are scaled by nothing:
    σ_d is the student parameterisation's (0.5 by default, about the std of images in [−1, 1]).
    Batch: ``x`` clean states [B, ...]; other keys are the condition."""

    Config = SCMMethodConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        model = student.model
        if not isinstance(model, ConsistencyModel) or model.param.name != "trigflow":
            raise ValueError("scm: the student must be a TrigFlow ConsistencyModel; set the domain's "
                             "model.student_param=trigflow")
        check_parameterisation(teacher.model, config.teacher_param, "the teacher")
        if config.init_from_teacher:
            init_student_from_teacher(student, teacher)
        self.sigma_d = model.param.sigma_data
        tangent_net = teacher.model
        if config.teacher_param != "trigflow":
            tangent_net = ReparameterisedNet(teacher.model, get_parameterisation(config.teacher_param), model.param)
        # On the student's device from the start: under torchrun it is a DDP-wrapped group, and
        # torch cannot .to() the fake parameters the --dry-run estimator runs the loss on.
        device = next(model.parameters()).device
        self.weight = AdaptiveWeight().to(device) if config.adaptive_weight else None
        self.scm = SCM(model.net, tangent_net, SCMConfig(self.sigma_d, config.p_mean, config.p_std,
                                                         config.tangent_warmup, config.tangent_norm_c),
                       self.weight, jvp=self.student_jvp)
        self.step = 0

    def student_jvp(self, primals: tuple, tangents: tuple, **cond) -> tuple[torch.Tensor, torch.Tensor]:
        """(F, dF) of the student's network through the student's forward (its DDP wrapper under
        torchrun, which then averages the sCM gradients): ``ConsistencyModel``'s ``net_tangents``."""
        return self.student(*primals, net_tangents=tangents, **cond)

    def trainable_modules(self):
        modules = {"student": self.student.model}
        if self.weight is not None:
            modules["scm_weight"] = self.weight
        return modules

    def update_groups(self, step):
        self.step = step  # the tangent warm-up follows the trainer's step (exact on resume)
        return ["student"]

    def trained_with(self, group):
        return ["scm_weight"] if group == "student" and self.weight is not None else []

    def loss(self, batch, group):
        x0, cond = split_batch(batch)
        # w(t) through its own wrapper: trained with the student, averaged with it under torchrun.
        self.scm.weight = self.group_forward("scm_weight") if self.weight is not None else None
        loss, stats = self.scm.loss(x0, self.step, **cond)
        return loss, {"scm/mse": stats["mse"], "scm/tangent_norm": stats["tangent_norm"]}
