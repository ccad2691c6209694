"""LADD's discriminator and adversarial game (Sauer et al. 2024, "Fast High-Resolution Image
Synthesis with Latent Adversarial Diffusion Distillation", §3), shared by ``ladd`` and ``scm_ladd``.
Not a method itself: nothing here is registered.

The discriminator is the *frozen teacher* as a feature network plus small trainable heads. A clean
state x0 [B, ...] (a student sample, or a real / teacher sample) is re-noised at a level t drawn
from ``disc_time``'s law, x_t = α(t)·x0 + σ(t)·ε, the teacher runs once on x_t, and the outputs of
its submodules ``disc_layers`` (read by forward hooks, ``feature_gan.FeatureTap``) feed one head
each. ``disc_noise_draws`` = M re-noises every sample M times, at M independent levels: with L
layers the discriminator gives L·M logit tensors (layer-major), each [B, ...] (one logit per
feature position). The teacher's weights never train: in the generator's loss gradients flow
through it to x0 only, in the discriminator's it runs under no_grad.

Noise levels (LADD §3: a logit-normal π(t; m, s); LADD's m = s = 1 biases toward high noise, where
the teacher's features carry global structure rather than detail): the law is stated in the
rectified-flow time τ = σ/(α + σ) ∈ [0, 1] (the SNR, independent of the parameterisation), then
shifted as SD3 does (σ/α scaled by ``disc_time_shift``) and converted to the teacher's own t:

    logit_normal: τ = sigmoid(m + s·n), n ~ N(0, 1);   uniform: τ ~ U[0, 1);   train: the teacher's law.

Heads (a projection discriminator, Miyato & Koyama 2018, eq. 3, conditioned on what LADD's heads
see: the noise level, and the class label where LADD has a text embedding): per feature position
h = SiLU(LN(W·f)), logit = w·h + ⟨h, e⟩/√C, with e = MLP(sin/cos features of log(σ/α)) (+ a class
embedding of the integer label ``cond[disc_class_key]`` when ``disc_classes`` > 0; label −1 is
the null class).

Losses: ``hinge`` (ADD, LADD: D: mean relu(1 − D(real)) + mean relu(1 + D(fake)); G: −mean D(fake))
or ``non_saturating`` (``feature_gan``'s). Each is averaged over the L·M logit tensors.
"Real" samples: the batch's data (``real: data``) or the teacher's own samples (``real: teacher``,
LADD's synthetic data): the batch's precomputed ``ode_x`` (``dmd.add_ode_pairs``) when it carries
them, else ``teacher_steps`` ODE steps from fresh noise under the batch's condition.
"""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from kdlib.core.method import LossThroughForward
from kdlib.core.models import Teacher
from kdlib.diffusion.param import Parameterisation
from kdlib.diffusion.samplers import SAMPLERS, sample
from kdlib.methods.consistency_family import check_choice, check_range
from kdlib.methods.distribution_matching import frozen
from kdlib.methods.feature_gan import FeatureTap, discriminator_loss, generator_loss, tapped_features
from kdlib.nn.embeddings import sinusoidal_embedding

DISC_TIMES = ("logit_normal", "uniform", "train")
DISC_LOSSES = ("hinge", "non_saturating")
REAL_SOURCES = ("data", "teacher")


@dataclass
class AdversarialOptions:
    """The options of the teacher-feature discriminator, shared by every method that uses it."""

    disc_layers: list[str] = field(default_factory=list)  # teacher submodules, one head each
    disc_channels: list[int] = field(default_factory=list)  # each layer's output channels (dim 1)
    disc_noise_draws: int = 1  # M: noise levels per sample
    disc_time: str = "logit_normal"  # logit_normal | uniform | train
    disc_time_mean: float = 1.0  # m of the logit-normal law (LADD: 1)
    disc_time_std: float = 1.0  # s (LADD: 1)
    disc_time_shift: float = 1.0  # σ/α scaled by this after drawing (SD3's shift)
    disc_loss: str = "hinge"  # hinge | non_saturating
    disc_classes: int = 0  # > 0: heads conditioned on the label cond[disc_class_key] in [0, n)
    disc_class_key: str = "y"
    disc_updates: int = 1  # discriminator updates per generator update
    disc_warmup: int = 0  # steps of discriminator updates alone before the generator starts
    real: str = "data"  # data | teacher (synthetic data, LADD)
    teacher_steps: int = 20  # ODE steps of the teacher's samples (real: teacher, without ode_x)
    teacher_sampler: str = "euler"
    teacher_guidance: float = 1.0  # CFG scale of the teacher's samples and of ladd's distillation target


def check_adversarial_options(method: str, o: AdversarialOptions) -> None:
    if not o.disc_layers:
        raise ValueError(f"{method}: disc_layers must name at least one submodule of the teacher network "
                         "(e.g. disc_layers=[blocks.1,blocks.3])")
    if len(o.disc_channels) != len(o.disc_layers):
        raise ValueError(f"{method}: disc_channels needs one channel count per disc_layers entry; got "
                         f"{len(o.disc_channels)} for {len(o.disc_layers)} layers")
    for c in o.disc_channels:
        check_range(method, "disc_channels", c, 1)
    check_range(method, "disc_noise_draws", o.disc_noise_draws, 1)
    check_range(method, "disc_time_std", o.disc_time_std, 0.0)
    check_range(method, "disc_classes", o.disc_classes, 0)
    check_range(method, "disc_updates", o.disc_updates, 1)
    check_range(method, "disc_warmup", o.disc_warmup, 0)
    check_range(method, "teacher_steps", o.teacher_steps, 1)
    check_range(method, "teacher_guidance", o.teacher_guidance, 0.0)
    check_choice(method, "disc_time", o.disc_time, DISC_TIMES)
    check_choice(method, "disc_loss", o.disc_loss, DISC_LOSSES)
    check_choice(method, "real", o.real, REAL_SOURCES)
    check_choice(method, "teacher_sampler", o.teacher_sampler, SAMPLERS)
    if not o.disc_time_shift > 0:
        raise ValueError(f"{method}: disc_time_shift must be > 0; got {o.disc_time_shift!r}")


def adversarial_times(param: Parameterisation, n: int, o: AdversarialOptions, device=None) -> torch.Tensor:
    """Re-noising levels [n] in ``param``'s t (module docstring)."""
    if o.disc_time == "train":
        alpha, sigma = param.alpha_sigma(param.sample_train_time(n, device=device))
        tau = sigma / (alpha + sigma)
    elif o.disc_time == "uniform":
        tau = torch.rand(n, device=device)
    else:
        tau = torch.sigmoid(o.disc_time_mean + o.disc_time_std * torch.randn(n, device=device))
    shift = o.disc_time_shift
    tau = (shift * tau / (1 + (shift - 1) * tau)).clamp(0.0, 1 - 1e-6)  # σ/α -> shift·σ/α
    t = param.time_from_ratio(tau / (1 - tau))
    return t.clamp(param.t_min, param.t_max)


def log_snr_level(param: Parameterisation, t: torch.Tensor) -> torch.Tensor:
    """log(σ/α) [B] of times t [B], clamped to ±20 (finite at t_max where α may be 0)."""
    alpha, sigma = param.alpha_sigma(t.float())
    return (sigma.clamp(min=1e-9).log() - alpha.clamp(min=1e-9).log()).clamp(-20.0, 20.0)


class NoiseConditionedHead(nn.Module):
    """features [B, C, ...], noise level [B], labels [B] or None -> logits [B, ...] (module
    docstring). Channels second, any trailing positions; computed in float32."""

    def __init__(self, channels: int, classes: int = 0, freq_dim: int = 64):
        super().__init__()
        self.channels, self.freq_dim = channels, freq_dim
        self.body = nn.Sequential(nn.Linear(channels, channels), nn.LayerNorm(channels), nn.SiLU())
        self.out = nn.Linear(channels, 1)
        self.noise_embed = nn.Sequential(nn.Linear(freq_dim, channels), nn.SiLU(), nn.Linear(channels, channels))
        self.class_embed = nn.Embedding(classes + 1, channels) if classes else None  # last row: null class

    def forward(self, features: torch.Tensor, level: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        if features.dim() < 2 or features.shape[1] != self.channels:
            raise ValueError(f"the discriminator head expects features [B, {self.channels}, ...], got "
                             f"{tuple(features.shape)}: set method_args.disc_channels to the layer's channel count")
        h = self.body(features.movedim(1, -1).float())  # [B, ..., C]
        e = self.noise_embed(sinusoidal_embedding(level.float(), self.freq_dim))
        if self.class_embed is not None:
            null = self.class_embed.num_embeddings - 1
            e = e + self.class_embed(torch.where(labels < 0, torch.full_like(labels, null), labels).long())
        e = e.reshape(e.shape[0], *([1] * (h.dim() - 2)), self.channels)
        return self.out(h)[..., 0] + (h * e).sum(dim=-1) / self.channels**0.5


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    return F.relu(1 - real_logits).mean() + F.relu(1 + fake_logits).mean()


def hinge_generator_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """−mean D(fake): its gradient raises the logits of generated samples, toward "real"."""
    return -fake_logits.mean()


class DiscriminatorHeads(LossThroughForward, nn.ModuleList):
    """The trainable heads, one per teacher layer (a ModuleList: its state dict keys are the
    heads' indices); the discriminator's loss runs through their DDP wrapper
    (``LossThroughForward``), which averages the heads' gradients."""


class TeacherDiscriminator:
    """The frozen teacher's features at several layers and noise levels, and the trainable heads
    (``heads``: the module the method trains; the teacher stays out of it and of its checkpoint).

    method: the method's name (for errors); options: ``AdversarialOptions``; param: the teacher's
    parameterisation (the re-noising lives in it).
    """

    def __init__(self, method: str, options: AdversarialOptions, teacher: Teacher, param: Parameterisation):
        check_adversarial_options(method, options)
        self.method, self.options, self.teacher, self.param = method, options, teacher, param
        self.taps = [FeatureTap(teacher.model, layer, "disc_layers", "the teacher network")
                     for layer in options.disc_layers]
        device = next(teacher.model.parameters()).device
        # Initialised from the global random state, which is then restored: building the heads
        # does not shift the draws of the training that follows (scm_ladd at weight 0 is sCM's run).
        with torch.random.fork_rng(devices=[]):
            heads = [NoiseConditionedHead(c, options.disc_classes) for c in options.disc_channels]
        self.heads = DiscriminatorHeads(heads).to(device)

    @property
    def outputs(self) -> int:
        """L·M: logit tensors per call of ``noised_logits``."""
        return len(self.heads) * self.options.disc_noise_draws

    def groups(self, step: int) -> list[str]:
        """``["discriminator"]`` during the first ``disc_warmup`` steps (under Adam a generator
        that follows a still uninformed discriminator takes full-size steps in random directions),
        then ``["student", "discriminator"]`` every ``disc_updates``-th step and
        ``["discriminator"]`` in between."""
        o = self.options
        generator = ["student"] if step >= o.disc_warmup and (step - o.disc_warmup) % o.disc_updates == 0 else []
        return [*generator, "discriminator"]

    def _labels(self, cond: dict) -> torch.Tensor | None:
        if not self.options.disc_classes:
            return None
        key = self.options.disc_class_key
        if key not in cond:
            raise ValueError(f"{self.method}: disc_classes > 0 conditions the heads on the label cond[{key!r}], "
                             f"which the batch lacks (its condition keys: {', '.join(cond) or 'none'}); "
                             "set disc_class_key or disc_classes=0")
        return cond[key]

    def logits(self, x0: torch.Tensor, cond: dict, t: torch.Tensor, eps: torch.Tensor,
               through_teacher: bool = True) -> list[torch.Tensor]:
        """One logit tensor per head, each [B, ...], of clean states x0 [B, ...] noised at t [B]
        with eps [B, ...]. ``through_teacher``: keep the graph through the teacher to x0 (the
        generator's loss); off, the features are computed without one (the discriminator's)."""
        x_t = self.param.add_noise(x0, eps, t)
        dtype = self.teacher.dtype
        if dtype is not None:  # a bf16 teacher takes the fp32 states as they come
            x_t, t_in = x_t.to(dtype), t.to(dtype)
            cond_in = {k: v.to(dtype) if torch.is_tensor(v) and v.is_floating_point() else v for k, v in cond.items()}
        else:
            t_in, cond_in = t, cond
        with nullcontext() if through_teacher else torch.no_grad():
            features = tapped_features(self.taps, lambda: self.param.predict(self.teacher.model, x_t, t_in, **cond_in))
        level, labels = log_snr_level(self.param, t), self._labels(cond)
        return [head(f, level, labels) for head, f in zip(self.heads, features)]

    def noised_logits(self, x0: torch.Tensor, cond: dict, through_teacher: bool = True) -> list[torch.Tensor]:
        """The L·M logit tensors [B, ...] of x0 [B, ...], each sample re-noised at M fresh levels."""
        m = self.options.disc_noise_draws
        x = x0.repeat(m, *([1] * (x0.dim() - 1)))
        cond = {k: v.repeat(m, *([1] * (v.dim() - 1))) if torch.is_tensor(v) else v for k, v in cond.items()}
        t = adversarial_times(self.param, x.shape[0], self.options, device=x.device).to(x.dtype)
        per_head = self.logits(x, cond, t, torch.randn_like(x), through_teacher)
        return [draw for logits in per_head for draw in logits.chunk(m)]

    @torch.no_grad()
    def real_samples(self, x: torch.Tensor, cond: dict, pairs: dict | None = None) -> torch.Tensor:
        """The "real" states [B, ...]: the data x, or the teacher's samples (module docstring)."""
        if self.options.real == "data":
            return x
        if pairs and "ode_x" in pairs:
            return pairs["ode_x"]
        o = self.options
        return sample(self.teacher, self.param, torch.randn_like(x), o.teacher_steps, o.teacher_sampler,
                      cond=cond, guidance=o.teacher_guidance).to(x.dtype)

    def generator_loss(self, fake: torch.Tensor, cond: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The generator's adversarial loss of its samples fake [B, ...] (with their graph); the
        heads are frozen in it, so they get gradients only in the discriminator's update."""
        loss_fn = hinge_generator_loss if self.options.disc_loss == "hinge" else generator_loss
        with frozen(self.heads):
            logits = self.noised_logits(fake, cond, through_teacher=True)
        loss = torch.stack([loss_fn(lg) for lg in logits]).mean()
        fake_mean = torch.stack([lg.float().mean() for lg in logits]).mean()
        return loss, {"adv/generator": loss.detach(), "adv/fake_logit": fake_mean.detach()}

    def discriminator_loss(self, real: torch.Tensor, fake: torch.Tensor,
                           cond: dict) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The heads' loss on real and generated states [B, ...] (both detached here), in one
        teacher pass over both at the same noise law."""
        loss_fn = hinge_discriminator_loss if self.options.disc_loss == "hinge" else discriminator_loss
        both = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in cond.items()}
        logits = self.noised_logits(torch.cat([real, fake]).detach(), both, through_teacher=False)
        # noised_logits repeats the [real; fake] batch M times: split each draw's rows back.
        pairs = [lg.chunk(2) for lg in logits]
        loss = torch.stack([loss_fn(r, f) for r, f in pairs]).mean()
        accuracy = torch.stack([0.5 * ((r > 0).float().mean() + (f < 0).float().mean()) for r, f in pairs]).mean()
        return loss, {"adv/discriminator": loss.detach(), "adv/disc_acc": accuracy.detach(),
                      "adv/real_logit": torch.stack([r.mean() for r, _ in pairs]).mean().detach(),
                      "adv/fake_logit_d": torch.stack([f.mean() for _, f in pairs]).mean().detach()}
