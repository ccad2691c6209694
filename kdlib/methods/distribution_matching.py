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

The VSD gradient (ProlificDreamer, Wang et al. 2023; as SwiftBrush, Nguyen & Tran 2024, Alg. 1
line 10, applies it) is the same difference in ε, with a weight of the noise level instead of DMD's per-sample
normaliser (``weighting="vsd"``):

    g = w(t)·(ε̂_real − ε̂_fake) = w(t)·(α/σ)·(x̂0_fake − x̂0_real),   w(t) = σ²/(α² + σ²)

w is ProlificDreamer's 1 − ᾱ_t of the variance-preserving process with the same ε (x_t/√(α²+σ²)
is that VP state), so g does not depend on the teacher's parameterisation.

The fake score is ``fake_score_network``'s: a full copy of the teacher, or (``fake_score: lora``)
a LoRA adapter on the frozen teacher that shares its weights (``kdlib.methods.lora_score``).

Domain-agnostic: states [B, ...] of any trailing shape, networks ``net(x, t, **cond)``.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from kdlib.core.method import LossThroughForward
from kdlib.core.models import Student, Teacher
from kdlib.diffusion.consistency import ConsistencyModel, consistency_sample, default_times
from kdlib.diffusion.guidance import drop_condition
from kdlib.diffusion.param import Parameterisation, expand
from kdlib.diffusion.samplers import make_denoiser
from kdlib.methods.consistency_family import check_choice, check_range
from kdlib.methods.feature_gan import FeatureTap, GANHead
from kdlib.methods.flow_matching import denoising_loss
from kdlib.methods.lora_score import LoRAFakeScore

FAKE_SCORES = ("copy", "lora")
WEIGHTINGS = ("dmd", "vsd")


@dataclass
class DMOptions:
    """The options of the distribution-matching term, shared by every method that uses it."""

    guidance: float = 1.0  # CFG scale of the real score (DMD's asymmetric CFG; 1: none)
    guidance_range: list[float] = field(default_factory=list)  # [lo, hi]: SNOOPI's PG-SB scale per sample; []: guidance
    gen_steps: int = 1  # sampling steps the student is trained for (1: a one-step generator)
    backward_simulation: bool = True  # DMD2 §4.5: inputs of later steps come from the student itself
    time_shift: float = 1.0  # σ/α of the noise level scaled by this (SD3's shift; rCM uses 5)
    fake_score: str = "copy"  # copy: a trainable full copy of the teacher; lora: an adapter on its shared weights
    lora_rank: int = 16  # r of the LoRA fake score
    lora_alpha: float = 0.0  # its α (update scaled by α/r; 0: α = r); with Adam, a learning-rate multiplier
    lora_targets: list[str] = field(default_factory=list)  # module names (peft's suffix match); []: every Linear/Conv


@dataclass
class DistributionMatchingConfig(DMOptions):
    param: str = "fm"  # the teacher's parameterisation; the fake score shares it
    init_from_teacher: bool = True  # the generator starts as the teacher (the critic always does)


def check_options(method: str, options: DMOptions) -> None:
    check_range(method, "gen_steps", options.gen_steps, 1)
    check_range(method, "guidance", options.guidance, 0.0)
    guidance_range(method, options)
    if not options.time_shift > 0:
        raise ValueError(f"{method}: time_shift must be > 0; got {options.time_shift!r}")
    check_choice(method, "fake_score", options.fake_score, FAKE_SCORES)
    check_range(method, "lora_rank", options.lora_rank, 1)
    check_range(method, "lora_alpha", options.lora_alpha, 0.0)


def guidance_range(method: str, options: DMOptions) -> tuple[float, float] | None:
    """``options.guidance_range`` checked, as the (lo, hi) ``DistributionMatcher`` takes; None if empty."""
    value = options.guidance_range
    if not value:
        return None
    if len(value) != 2 or not 0.0 <= value[0] <= value[1]:
        raise ValueError(f"{method}: guidance_range must be [lo, hi] with 0 <= lo <= hi, or []; got {value!r}")
    return float(value[0]), float(value[1])


def fake_score_network(teacher: Teacher, options: DMOptions | None = None) -> nn.Module:
    """DMD's fake score μ_fake, the one place it is built. ``options.fake_score``: "copy" (the
    default), a trainable full copy of the teacher's network, in fp32 even when the teacher runs in
    bf16 (it is trained); "lora", a ``LoRAFakeScore`` on the frozen teacher (rank ``lora_rank``,
    ``lora_alpha``, ``lora_targets``), which shares the teacher's weights: only the adapters train."""
    if options is not None and options.fake_score == "lora":
        return LoRAFakeScore(teacher, options.lora_rank, options.lora_alpha, options.lora_targets)
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


class Critic(LossThroughForward, nn.Module):
    """The trained networks against the generator: the fake score ``net`` and, for DMD2's GAN
    loss, a classifier ``head`` on the features of the fake score's layer ``gan_layer`` (DMD2 §4.3:
    the GAN discriminator shares the fake score's encoder). One module: one optimizer, one
    checkpoint entry. ``gan_layer`` names a submodule of the teacher's network (a LoRA fake score
    keeps those names in its ``network``).

    ``critic(fn, *args, **kwargs)`` is ``fn(*args, **kwargs)`` (``LossThroughForward``): the
    critic's own loss runs through its DDP wrapper, which averages ``net``'s and ``head``'s gradients."""

    def __init__(self, net: nn.Module, gan_layer: str = "", gan_channels: int = 0):
        super().__init__()
        self.net = net
        self.head = GANHead(gan_channels).to(next(net.parameters()).device) if gan_layer else None
        features = net.network if isinstance(net, LoRAFakeScore) else net
        self.tap = FeatureTap(features, gan_layer) if gan_layer else None

    def logits(self, param: Parameterisation, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """Real-vs-generated logits of noisy states x_t [B, ...] at t [B] (per feature position)."""
        return self.head(self.tap.features(lambda: param.predict(self.net, x_t, t, **cond)))


class DistributionMatcher:
    """The DM term of a generator sample and the fake score's loss (module docstring).

    teacher: the frozen real score; critic: its ``net`` is the trained fake score; param: the
    teacher's parameterisation; guidance: the real score's CFG scale; time_shift: see ``time``;
    weighting: "dmd" (DMD eq. 8's normaliser) or "vsd" (w(t), module docstring);
    guidance_range: (lo, hi) draws the real score's scale per sample instead (``real_guidance``);
    guide_fake: the fake score is guided by the same scales (SNOOPI guides "both teachers"), and
    then learns its unconditional branch too, dropping the condition with probability
    ``fake_cond_drop`` in its loss.
    """

    def __init__(self, teacher: Teacher, critic: Critic, param: Parameterisation, guidance: float = 1.0,
                 time_shift: float = 1.0, weighting: str = "dmd",
                 guidance_range: tuple[float, float] | None = None, guide_fake: bool = False,
                 fake_cond_drop: float = 0.0):
        if weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {', '.join(WEIGHTINGS)}; got {weighting!r}")
        self.teacher, self.critic, self.param = teacher, critic, param
        self.guidance, self.time_shift, self.weighting = guidance, time_shift, weighting
        self.guidance_range, self.guide_fake, self.fake_cond_drop = guidance_range, guide_fake, fake_cond_drop

    @classmethod
    def from_options(cls, method: str, teacher: Teacher, critic: Critic, param: Parameterisation,
                     options: DMOptions, **kwargs) -> DistributionMatcher:
        """The matcher of ``method``'s options (guidance, guidance_range, time_shift checked);
        ``kwargs``: the other arguments (weighting, guide_fake, fake_cond_drop)."""
        return cls(teacher, critic, param, options.guidance, options.time_shift,
                   guidance_range=guidance_range(method, options), **kwargs)

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
    def estimates(self, net, x_t: torch.Tensor, t: torch.Tensor, cond: dict,
                  guidance: float | torch.Tensor = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
        """(x̂0, ε̂) [B, ...] (float32) of ``net`` at (x_t, t), CFG scale ``guidance`` (a number or [B])."""
        x0, eps = make_denoiser(net, self.param, cond, guidance)(x_t, t)
        return x0.float(), eps.float()

    def x0(self, net, x_t: torch.Tensor, t: torch.Tensor, cond: dict, guidance: float = 1.0) -> torch.Tensor:
        """x̂0 [B, ...] (float32) of ``net`` at (x_t, t), CFG scale ``guidance``."""
        return self.estimates(net, x_t, t, cond, guidance)[0]

    def real_guidance(self, n: int, like: torch.Tensor) -> float | torch.Tensor:
        """The real score's CFG scale: ``guidance``, or with ``guidance_range`` (lo, hi) one scale
        per sample [n] ~ U(lo, hi), drawn afresh at every call (SNOOPI's PG-SB, Nguyen et al. 2024:
        a random scale broadens the teacher's output distribution and stabilises VSD)."""
        if self.guidance_range is None:
            return self.guidance
        lo, hi = self.guidance_range
        return lo + (hi - lo) * torch.rand(n, device=like.device)

    def gradient(self, x: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, cond: dict) -> torch.Tensor:
        """The DM / VSD gradient g [B, ...] (``weighting``) of clean samples x [B, ...] (float32,
        detached) at their noisy x_t [B, ...], t [B]."""
        scale = self.real_guidance(x.shape[0], x)
        x0_real, eps_real = self.estimates(self.teacher, x_t, t, cond, scale)
        x0_fake, eps_fake = self.estimates(self.critic.net, x_t, t, cond, scale if self.guide_fake else 1.0)
        if self.weighting == "vsd":
            return vsd_gradient(self.param, t, eps_real, eps_fake)
        return dm_gradient(x, x0_real, x0_fake)

    def loss(self, x: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """L_DM of generator samples x [B, ...] (with their graph). Zero, with zero gradient, when
        the fake score equals the real one (fake = teacher, guidance 1)."""
        x_t, t = self.noised(x.detach())
        return surrogate_loss(x, self.gradient(x.detach().float(), x_t, t, cond))

    def fake_score_loss(self, x: torch.Tensor, cond: dict) -> torch.Tensor:
        """The fake score's denoising loss on generator samples x [B, ...] (detached here)."""
        x = x.detach()
        if self.guide_fake:
            cond = drop_condition(cond, self.fake_cond_drop)
        return denoising_loss(self.critic.net, self.param, x, torch.randn_like(x), self.time(x.shape[0], x), cond)


def dmd_normaliser(x: torch.Tensor, x0_real: torch.Tensor) -> torch.Tensor:
    """mean|x − x̂0_real| per sample, [B, 1, ..., 1] (the inverse of DMD eq. 8's weight w)."""
    return expand((x - x0_real).abs().flatten(1).mean(dim=1).clamp(min=1e-5), x)


def dm_gradient(x: torch.Tensor, x0_real: torch.Tensor, x0_fake: torch.Tensor) -> torch.Tensor:
    """g = (x̂0_fake − x̂0_real) / mean|x − x̂0_real| per sample (DMD eq. 8's weight). All [B, ...];
    non-finite values (a diverging score) become 0 rather than poisoning the step."""
    return torch.nan_to_num((x0_fake - x0_real) / dmd_normaliser(x, x0_real))


def vsd_gradient(param: Parameterisation, t: torch.Tensor, eps_real: torch.Tensor,
                 eps_fake: torch.Tensor) -> torch.Tensor:
    """g = w(t)·(ε̂_real − ε̂_fake), w = σ²/(α² + σ²) (module docstring). t: [B]; ε̂: [B, ...];
    non-finite values become 0 (as in ``dm_gradient``)."""
    alpha, sigma = param.alpha_sigma(t.to(torch.float64))
    weight = expand((sigma**2 / (alpha**2 + sigma**2)).to(eps_real.dtype), eps_real)
    return torch.nan_to_num(weight * (eps_real - eps_fake))


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
            # A host-side draw (Python's random, saved with every checkpoint's RNG state): under the
            # --dry-run estimator's fake tensors, int(torch.randint(...)) has no value to read.
            index = random.randrange(len(self.times))
        x_t, t = self.input(data, cond, index)
        return self.student(x_t, t, **cond)
