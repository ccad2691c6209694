"""What the distribution-matching methods (``dmd``, ``dmd2``, ``decoupled_dmd``, ``rcm``) share:
the reverse-KL gradient between a frozen real score and a trained fake score, the fake score's own
loss, the student as a few-step generator (with DMD2's backward simulation) and the critic module.
Not a method itself: nothing here is registered.

The distribution matching gradient (DMD, Yin et al. 2024, eq. 7–8; DMD2, Yin et al. 2024, eq. 2).
For a generator sample x = G(z) [B, ...], t from the teacher's training-time law and
x_t = α(t)·x + σ(t)·ε:

    ∇_x KL(p_fake,t ‖ p_real,t) ∝ s_fake(x_t, t) − s_real(x_t, t) ∝ x̂0_fake(x_t, t) − x̂0_real(x_t, t)

(the scores differ by α/σ²·(x̂0_fake − x̂0_real); that factor is absorbed by the weight), normalised
per sample by DMD's w = 1 / mean|x − x̂0_real| (eq. 8), and applied through the surrogate

    L_DM = ½·mean‖x − stopgrad(x − g)‖²,   g = (x̂0_fake − x̂0_real) / mean|x − x̂0_real|

whose gradient in x is exactly g / (number of values in the batch). x̂0_real is the frozen
teacher's estimate (classifier-free guided with ``guidance``), x̂0_fake the fake score's, both in
the teacher's parameterisation; the generator may live in any other (rCM's TrigFlow student), since
x is clean data in all of them. The fake score learns the generator's (detached) samples by the
teacher's own denoising loss (``flow_matching.denoising_loss``), so its x̂0 tracks p_fake.

Domain-agnostic: states [B, ...] of any trailing shape, networks ``net(x, t, **cond)``.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from kdlib.core import distributed
from kdlib.core.models import Student, Teacher
from kdlib.diffusion.consistency import ConsistencyModel, consistency_sample, default_times
from kdlib.diffusion.param import Parameterisation, expand
from kdlib.diffusion.samplers import make_denoiser
from kdlib.methods.consistency_family import check_range
from kdlib.methods.feature_gan import FeatureTap, GANHead
from kdlib.methods.flow_matching import denoising_loss


@dataclass
class DMOptions:
    """The options of the distribution-matching term, shared by every method that uses it."""

    guidance: float = 1.0  # CFG scale of the real score (DMD's asymmetric CFG; 1: none)
    gen_steps: int = 1  # sampling steps the student is trained for (1: a one-step generator)
    backward_simulation: bool = True  # DMD2 §4.5: inputs of later steps come from the student itself
    time_shift: float = 1.0  # σ/α of the noise level scaled by this (SD3's shift; rCM uses 5)


@dataclass
class DistributionMatchingConfig(DMOptions):
    param: str = "fm"  # the teacher's parameterisation; the fake score shares it
    init_from_teacher: bool = True  # the generator starts as the teacher (the critic always does)


def check_options(method: str, options: DMOptions) -> None:
    check_range(method, "gen_steps", options.gen_steps, 1)
    check_range(method, "guidance", options.guidance, 0.0)
    if not options.time_shift > 0:
        raise ValueError(f"{method}: time_shift must be > 0; got {options.time_shift!r}")


def check_single_process(method: str) -> None:
    """The Trainer wraps every group in DDP but hands the method only the student's wrapper, so
    a critic called directly would train unsynchronised on every rank: refuse instead."""
    if distributed.current().enabled:
        raise NotImplementedError(f"{method}: the critic is not averaged across processes under torchrun yet "
                                  "(the Trainer passes DDP wrappers only for the student); run in one process")


def fake_score_network(teacher: Teacher) -> nn.Module:
    """DMD's fake score μ_fake: a trainable full copy of the teacher's network, in fp32 even when
    the teacher runs in bf16 (it is trained). The one place the fake score is built: a LoRA
    adapter on the frozen teacher that shares its weights can replace this function."""
    fake = copy.deepcopy(teacher.model)
    if teacher.dtype in (torch.bfloat16, torch.float16):
        fake = fake.float()
    return fake.requires_grad_(True).train()


@contextmanager
def frozen(module: nn.Module) -> Iterator[None]:
    """No parameter of ``module`` takes part in the graphs built inside: gradients still flow
    through it to its inputs (the generator's GAN term), none land on its weights."""
    flags = [p.requires_grad for p in module.parameters()]
    module.requires_grad_(False)
    try:
        yield
    finally:
        for p, flag in zip(module.parameters(), flags):
            p.requires_grad_(flag)


class Critic(nn.Module):
    """The trained networks against the generator: the fake score ``net`` and, for DMD2's GAN
    loss, a classifier ``head`` on the features of the fake score's layer ``gan_layer`` (DMD2 §4.3:
    the GAN discriminator shares the fake score's encoder). One module: one optimizer, one
    checkpoint entry."""

    def __init__(self, net: nn.Module, gan_layer: str = "", gan_channels: int = 0):
        super().__init__()
        self.net = net
        self.head = GANHead(gan_channels).to(next(net.parameters()).device) if gan_layer else None
        self.tap = FeatureTap(net, gan_layer) if gan_layer else None

    def logits(self, param: Parameterisation, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """Real-vs-generated logits of noisy states x_t [B, ...] at t [B] (per feature position)."""
        return self.head(self.tap.features(lambda: param.predict(self.net, x_t, t, **cond)))


class DistributionMatcher:
    """The DM term of a generator sample and the fake score's loss (module docstring).

    teacher: the frozen real score; critic: its ``net`` is the trained fake score; param: the
    teacher's parameterisation; guidance: the real score's CFG scale; time_shift: see ``time``.
    """

    def __init__(self, teacher: Teacher, critic: Critic, param: Parameterisation, guidance: float = 1.0,
                 time_shift: float = 1.0):
        self.teacher, self.critic, self.param = teacher, critic, param
        self.guidance, self.time_shift = guidance, time_shift

    def time(self, n: int, like: torch.Tensor, shift: float | None = None) -> torch.Tensor:
        """Noise levels [n] of the DM gradient and of the fake score's training: the teacher's own
        training-time law (DMD2's uniform DDPM timesteps for a DDPM teacher; where the real score
        is accurate), with σ/α scaled by ``shift`` (default ``time_shift``; SD3's shift of fm
        time, rCM uses 5)."""
        shift = self.time_shift if shift is None else shift
        t = self.param.sample_train_time(n, device=like.device)
        if shift != 1.0:
            t = self.param.time_from_ratio(shift * self.param.ratio(t))
        return t.to(like.dtype)

    def noised(self, x: torch.Tensor, shift: float | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_t, t) of clean states x [B, ...] at fresh noise levels (``time``'s law)."""
        t = self.time(x.shape[0], x, shift)
        return self.param.add_noise(x, torch.randn_like(x), t), t

    @torch.no_grad()
    def x0(self, net, x_t: torch.Tensor, t: torch.Tensor, cond: dict, guidance: float = 1.0) -> torch.Tensor:
        """x̂0 [B, ...] (float32) of ``net`` at (x_t, t), CFG scale ``guidance``."""
        return make_denoiser(net, self.param, cond, guidance)(x_t, t)[0].float()

    def loss(self, x: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_DM of generator samples x [B, ...] (with their graph). Zero, with zero gradient, when
        the fake score equals the real one (fake = teacher, guidance 1)."""
        x_t, t = self.noised(x.detach())
        x0_real = self.x0(self.teacher, x_t, t, cond, self.guidance)
        x0_fake = self.x0(self.critic.net, x_t, t, cond)
        return surrogate_loss(x, dm_gradient(x.detach().float(), x0_real, x0_fake))

    def fake_score_loss(self, x: torch.Tensor, cond: dict) -> torch.Tensor:
        """The fake score's denoising loss on generator samples x [B, ...] (detached here)."""
        x = x.detach()
        return denoising_loss(self.critic.net, self.param, x, torch.randn_like(x), self.time(x.shape[0], x), cond)


def dmd_normaliser(x: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """mean|x − x̂0_real| per sample, [B, 1, ..., 1] (the inverse of DMD eq. 8's weight w)."""
    return expand((x - x0_real).abs().flatten(1).mean(dim=1).clamp(min=1e-5), x)


def dm_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """g = (x̂0_fake − x̂0_real) / mean|x − x̂0_real| per sample (DMD eq. 8's weight). All [B, ...];
    non-finite values (a diverging score) become 0 rather than poisoning the step."""
    return torch.nan_to_num((x0_fake - x0_real) / dmd_normaliser(x, x0_real))


def surrogate_loss(x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """½·mean‖x − stopgrad(x − g)‖²: a loss whose gradient in x [B, ...] is g / x.numel()."""
    target = (x.detach().float() - grad).detach()
    loss = 0.5 * (x.float() - target).pow(2).mean()
    return loss, {"dm/grad_norm": grad.flatten(1).norm(dim=1).mean().detach()}


class FewStepGenerator:
    """The student (a ``ConsistencyModel``: x̂0 from (x_t, t)) as a ``steps``-step generator on
    its own sampler's times (``default_times``: what ``few_step_sample`` evaluates), trained at one
    step index i per batch, drawn uniformly. The input at step i > 0 comes from backward
    simulation (DMD2 §4.5): the student itself runs steps 0..i−1 from noise (no gradient), and its
    x̂0 is re-noised to t_i, exactly as at inference; without it, real data are noised to t_i (the
    training/inference mismatch DMD2 removes). One-step: always i = 0, pure noise."""

    def __init__(self, student: Student, steps: int, backward_simulation: bool = True):
        if not isinstance(student.model, ConsistencyModel):
            raise TypeError("the student must be a kdlib.diffusion.ConsistencyModel (x̂0 from (x_t, t))")
        self.student, self.param = student, student.model.param
        self.times = default_times(self.param, steps)
        self.backward_simulation = backward_simulation

    def start(self, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{t_0}, t_0): the pure-noise state of noise [B, ...] ~ N(0, I) (as ``consistency_sample``)."""
        t = torch.full((noise.shape[0],), self.times[0], device=noise.device, dtype=noise.dtype)
        return expand(self.param.alpha_sigma(t)[1], noise) * noise, t

    def input(self, data: torch.Tensor, cond: dict, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{t_i}, t_i) the student is fed at step ``index``; data: real states [B, ...]."""
        noise = torch.randn_like(data)
        if index == 0:
            return self.start(noise)
        t = torch.full((data.shape[0],), self.times[index], device=data.device, dtype=data.dtype)
        if self.backward_simulation:
            with torch.no_grad():
                earlier = consistency_sample(self.student, self.param, noise, self.times[:index], **cond)
        else:
            earlier = data
        return self.param.add_noise(earlier, torch.randn_like(data), t), t

    def sample(self, data: torch.Tensor, cond: dict, index: int | None = None) -> torch.Tensor:
        """Generator samples [B, ...] at step ``index`` (drawn if None), with their graph when
        gradients are enabled."""
        if index is None:
            index = int(torch.randint(len(self.times), ()))
        x_t, t = self.input(data, cond, index)
        return self.student(x_t, t, **cond)
