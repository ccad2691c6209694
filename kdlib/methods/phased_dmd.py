"""Phased DMD: few-step distribution matching with score matching within subintervals (Fan et al.
2025, "Phased DMD: Few-step Distribution Matching Distillation via Score Matching within
Subintervals", §3).

The noise range is cut into K phases at the student's K-segment sampler edges
(``kdlib.diffusion.phase_experts``), b_0 = t_max > b_1 > ... > b_K = t_min, phase k = (b_{k+1}, b_k].
The student is a segmented ``ConsistencyModel`` over ``PhaseExperts``: expert k is the generator
of phase k, one DDIM step with its own estimates from b_k to b_{k+1},

    x_{b_{k+1}} = G_k(x_{b_k}) = α(b_{k+1})·x̂0_k + σ(b_{k+1})·ε̂_k,   (x̂0_k, ε̂_k) from expert k at (x_{b_k}, b_k),

and K-step sampling (``segment_sample``) is G_{K−1} ∘ ... ∘ G_0 of noise. Expert k's input comes
from the experts before it (backward simulation, no gradient) or, with ``backward_simulation``
off, from data noised to b_k. What is matched at phase k is the law of the phase's *output*, a
noisy state x_s at s = b_{k+1} (clean only for the last phase). Its diffusion to t > s follows the
transition kernel of the forward process,

    x_t = α_{t|s}·x_s + σ_{t|s}·ε,   α_{t|s} = α_t/α_s,   σ²_{t|s} = σ_t² − α²_{t|s}·σ_s²,

so p_fake,t for t > s is defined by the phase's outputs alone. The scheme implemented:

1. Noise levels. At phase k every noise level, of the DM gradient and of the fake score's training,
   lies inside (s, hi) with hi = b_k (``score_range: phase``, the default: the phase's own
   subinterval) or hi = t_max (``above``: every level the phase's output affects). Its law
   (``phase_time``) is the teacher's training law truncated to (s, hi) (``teacher``, the default,
   as DMD2 draws from the whole law; by inverse CDF on a fixed table of 2¹⁶ sorted draws of it) or
   uniform in t (``uniform``); either way u is kept 10⁻⁴ of the interval's probability away from its
   ends. Under ``phase`` the subintervals are disjoint, so one fake score network serves all phases
   without interference: its weights at times of phase k learn expert k's outputs only.
2. Fake score: score matching within the subinterval (the paper's derivation, in our notation).
   Denoising score matching from x_s has the target ∇log p(x_t | x_s) = −ε/σ_{t|s}; in the
   network's own prediction space (whatever the parameterisation) that is the prediction of the
   pair (x0*, ε*) with the same score,

       ε* = (σ_t/σ_{t|s})·ε,   x0* = (x_t − σ_t·ε*)/α_t = x_s/α_s − α_t·σ_s²/(α_s²·σ_{t|s})·ε,

   and E[x0* | x_t] is Tweedie's x̂0 of p_fake,t, so the minimiser is the fake score exactly. The
   loss is w·‖pred − P(x0*, ε*)‖² with w = σ²_{t|s}/σ_t² (a weight of t alone, so the minimiser is
   unchanged), which keeps the target's variance, of order 1/σ²_{t|s}, bounded as t -> s. At s = t_min
   (the last phase) x0* = x_s, ε* = ε, w = 1: the teacher's own denoising loss, as in DMD.
3. Generator: DMD's gradient at phase k (DMD eq. 7–8), through x_t's dependence on x_s:
   ∇_{x_s} KL = α_{t|s}·(s_fake − s_real)(x_t) ∝ x̂0_fake(x_t, t) − x̂0_real(x_t, t); the positive
   factors go into DMD's per-sample weight 1/mean|x̂0_k − x̂0_real| with x̂0_k the expert's own clean
   estimate (exactly DMD's in the last phase, whose output is x̂0_k). Applied to x_s through
   ``distribution_matching.surrogate_loss``; only expert k is in the graph.
4. Schedule: the two time-scale rule of DMD2, ``critic_updates`` (N) critic updates per generator
   update (groups ``["student", "critic"]`` when step % N == 0). ``phase_steps`` = 0: all phases
   train together, in blocks of N steps — the block's one generator update and N critic updates
   all at phase (step // N) % K, so each phase's critic keeps DMD2's N updates per update of its
   expert; ``phase_steps`` = P > 0: progressive, as in the paper — phase k for steps
   [k·P, (k+1)·P), the last phase from then on (set train.steps = K·P).

``guidance`` scales the real score's CFG (DMD's asymmetric guidance); the fake score is unguided.
Batch: ``x`` clean states [B, ...]; other keys are the condition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import Method, register_method
from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.param import Parameterisation, expand, get_parameterisation
from kdlib.diffusion.phase_experts import PhaseExperts, phase_boundaries
from kdlib.diffusion.samplers import ddim_step
from kdlib.methods.consistency_family import check_choice, check_range
from kdlib.methods.distribution_matching import (
    Critic,
    DistributionMatcher,
    dm_gradient,
    fake_score_network,
    surrogate_loss,
)
from kdlib.methods.flow_matching import check_parameterisation, split_batch

SCORE_RANGES = ("phase", "above")
PHASE_TIMES = ("teacher", "uniform")
MARGIN = 1e-4  # noise levels stay this fraction of the interval (in probability) away from its ends
TABLE_SIZE = 2**16


@dataclass
class PhasedDMDConfig:
    param: str = "fm"  # the teacher's parameterisation; the student and the fake score share it
    phases: int = 2  # K: sampler steps = experts = SNR subintervals
    guidance: float = 1.0  # CFG scale of the real score (1: none)
    critic_updates: int = 5  # N: critic updates per generator update
    phase_steps: int = 0  # P > 0: progressive, phase k during steps [k·P, (k+1)·P); 0: phases together
    score_range: str = "phase"  # noise levels of phase k: phase = (b_{k+1}, b_k); above = (b_{k+1}, t_max)
    phase_time: str = "teacher"  # their law: teacher (its training law truncated) | uniform
    backward_simulation: bool = True  # expert k's input from experts 0..k−1 (else: data noised to b_k)
    init_from_teacher: bool = True  # every expert starts as the teacher


def transition(param: Parameterisation, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
               eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x_t = α_{t|s}·x_s + σ_{t|s}·ε, the forward process from level s to t > s; returns
    (x_t, α_{t|s}, σ_{t|s}), the last two [B, 1, ..., 1]. x_s, eps: [B, ...]; s, t: [B]."""
    (a_s, sg_s), (a_t, sg_t) = param.alpha_sigma(s), param.alpha_sigma(t)
    a_ts = a_t / a_s
    sg_ts = (sg_t**2 - (a_ts * sg_s) ** 2).clamp(min=0).sqrt()
    a_ts, sg_ts = expand(a_ts, x_s), expand(sg_ts, x_s)
    return a_ts * x_s + sg_ts * eps, a_ts, sg_ts


def law_table(param: Parameterisation) -> torch.Tensor:
    """2¹⁶ sorted draws [N] (float64) of the teacher's training-time law, from a fixed seed (the
    global random state is not touched): its empirical quantile function."""
    # On the CPU explicitly: the method may be built under torch.device("meta") (--dry-run).
    draws = param.sample_train_time(TABLE_SIZE, device="cpu", generator=torch.Generator().manual_seed(0))
    return draws.to(torch.float64).sort().values


def law_mass(table: torch.Tensor, s: float, hi: float) -> tuple[float, float]:
    """The law's CDF at s and at hi (the fractions of ``table``'s draws below them)."""
    last = len(table) - 1
    cdf = torch.searchsorted(table.cpu(), torch.tensor([s, hi], dtype=torch.float64, device="cpu")) / last
    return float(cdf[0]), float(cdf[1])


def truncated_times(table: torch.Tensor | None, s: float, hi: float, n: int, device=None,
                    mass: tuple[float, float] | None = None) -> torch.Tensor:
    """n times [n] (float64) of the law ``table`` (``law_table``; None: uniform in t) truncated to
    (s, hi), by inverse CDF: u uniform between the law's CDF at s and at hi (``mass``, from
    ``law_mass`` when not given), 10⁻⁴ of that mass away from both ends, then the table's quantile
    (linear between neighbouring draws), clamped inside the interval (where the table holds few
    draws in it). No host sync when ``mass`` is given."""
    u = torch.rand(n, device=device, dtype=torch.float64).clamp(MARGIN, 1 - MARGIN)
    if table is None:
        return hi - (hi - s) * u
    lo_q, hi_q = mass or law_mass(table, s, hi)
    table = table.to(device)
    last = len(table) - 1
    pos = (lo_q + (hi_q - lo_q) * u).clamp(0, 1) * last
    i = pos.floor().long().clamp(max=last - 1)
    t = table[i] + (pos - i) * (table[i + 1] - table[i])
    return t.clamp(s + MARGIN * (hi - s), hi - MARGIN * (hi - s))


def subinterval_denoising_loss(net, param: Parameterisation, x_s: torch.Tensor, s: torch.Tensor, t: torch.Tensor,
                               eps: torch.Tensor, cond: dict) -> torch.Tensor:
    """Score matching within a subinterval (module docstring, 2): ``net``'s prediction at
    x_t = transition(x_s; s -> t) against the prediction of (x0*, ε*), weighted by σ²_{t|s}/σ_t²
    per sample. x_s, eps: [B, ...] (x_s detached by the caller); s < t: [B]. At s = t_min it is
    ``flow_matching.denoising_loss`` of x0 = x_s."""
    x_t, _, sg_ts = transition(param, x_s, s, t, eps)
    (a_s, sg_s), (a_t, sg_t) = (tuple(expand(v, x_s) for v in param.alpha_sigma(u)) for u in (s, t))
    eps_star = sg_t / sg_ts * eps
    # The closed form of (x_t − σ_t·ε*)/α_t: no division by α_t, which vanishes at fm's t_max.
    x0_star = x_s / a_s - a_t * sg_s**2 / (a_s**2 * sg_ts) * eps
    target = param.from_x0_eps(x_t, x0_star, eps_star, t)
    pred = param.predict(net, x_t, t, **cond)
    weight = (sg_ts / sg_t).flatten() ** 2
    return (weight * (pred.float() - target.float()).pow(2).flatten(1).mean(dim=1)).mean()


@register_method("phased_dmd")
class PhasedDMD(Method):
    Config = PhasedDMDConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        name, k = self.name, config.phases
        check_range(name, "phases", k, 1)
        check_range(name, "critic_updates", config.critic_updates, 1)
        check_range(name, "phase_steps", config.phase_steps, 0)
        check_range(name, "guidance", config.guidance, 0.0)
        check_choice(name, "score_range", config.score_range, SCORE_RANGES)
        check_choice(name, "phase_time", config.phase_time, PHASE_TIMES)
        self.param = get_parameterisation(config.param)
        check_parameterisation(teacher.model, config.param, "the teacher")
        self._check_student(student.model, k)
        self.bounds = phase_boundaries(self.param, k).tolist()  # b_0 > ... > b_K
        self.table = law_table(self.param) if config.phase_time == "teacher" else None
        # each phase's share of the law, once: no host sync per step
        self.mass = [law_mass(self.table, *self.interval(j)) if self.table is not None else None for j in range(k)]
        models = (student.model, *student.ema)
        if config.init_from_teacher:
            state = teacher.model.state_dict()
            for model in models:
                for expert in model.net.experts:
                    expert.load_state_dict(state)
        for model in models:  # the student's own sampler then walks the phases (segment_sample)
            model.segments.fill_(k)
        self.critic = Critic(fake_score_network(teacher))
        self.dm = DistributionMatcher(teacher, self.critic, self.param, config.guidance)
        self.step = 0

    def _check_student(self, model, k: int) -> None:
        if not isinstance(model, ConsistencyModel) or model.param.name != self.config.param:
            raise ValueError(f"{self.name}: the student must be a ConsistencyModel in the teacher's "
                             f"parameterisation {self.config.param!r}")
        experts = model.net
        if not isinstance(experts, PhaseExperts) or len(experts.experts) != k:
            found = len(experts.experts) if isinstance(experts, PhaseExperts) else "no"
            raise ValueError(f"{self.name}: phases={k} needs a student with one expert per phase, a "
                             f"ConsistencyModel over kdlib.diffusion.phase_experts.PhaseExperts with {k} experts "
                             f"(image-gen: model.student_experts={k}); this student has {found} experts")
        expected = PhaseExperts.for_segments(list(experts.experts), self.param).boundaries
        if any(abs(a - b) > 1e-6 * max(1.0, abs(b)) for a, b in zip(experts.boundaries, expected)):
            raise ValueError(f"{self.name}: the student's experts are routed at {experts.boundaries}, "
                             f"not at the phase boundaries {expected}: build them with PhaseExperts.for_segments")

    def trainable_modules(self):
        return {"student": self.student.model, "critic": self.critic}

    def unused_parameters(self, group):
        # A generator update trains the phase's expert only: under DDP the others must be found.
        return group == "student" and len(self.bounds) > 2

    def update_groups(self, step):
        self.step = step  # the phase follows the trainer's step (exact on resume)
        generator = ["student"] if step % self.config.critic_updates == 0 else []
        return [*generator, "critic"]

    # -- phases -----------------------------------------------------------------------------------
    def phase(self, step: int) -> int:
        """The phase the generator and the critic train at ``step`` (module docstring, 4)."""
        k, cfg = len(self.bounds) - 1, self.config
        if cfg.phase_steps > 0:
            return min(step // cfg.phase_steps, k - 1)
        return (step // cfg.critic_updates) % k

    def interval(self, k: int) -> tuple[float, float]:
        """(s, hi): phase k's output level s = b_{k+1} and the top of its noise levels."""
        hi = self.bounds[k] if self.config.score_range == "phase" else self.bounds[0]
        return self.bounds[k + 1], hi

    def times(self, k: int, n: int, like: torch.Tensor) -> torch.Tensor:
        """n noise levels [n] of phase k, inside (s, hi) (module docstring, 1)."""
        if self.table is not None and self.table.device != like.device:
            self.table = self.table.to(like.device)
        return truncated_times(self.table, *self.interval(k), n, like.device, self.mass[k]).to(like.dtype)

    def _full(self, value: float, like: torch.Tensor) -> torch.Tensor:
        return torch.full((like.shape[0],), value, device=like.device, dtype=like.dtype)

    def phase_input(self, x: torch.Tensor, cond: dict, k: int) -> torch.Tensor:
        """Expert k's input x_{b_k} [B, ...]: noise at b_0, then experts 0..k−1 without gradient
        (as ``segment_sample``), or data x [B, ...] noised to b_k without backward simulation."""
        noise = torch.randn_like(x)
        start = expand(self.param.alpha_sigma(self._full(self.bounds[0], x))[1], x) * noise
        if k == 0:
            return start
        if not self.config.backward_simulation:
            return self.param.add_noise(x, torch.randn_like(x), self._full(self.bounds[k], x))
        with torch.no_grad():
            state = start
            for j in range(k):
                t, edge = self._full(self.bounds[j], x), self._full(self.bounds[j + 1], x)
                state = self.student(state, t, edge=edge, phase=j, **cond)
        return state

    def expert_step(self, x_in: torch.Tensor, k: int, cond: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(G_k(x_in), x̂0_k): phase k's output at b_{k+1} and the expert's clean estimate, [B, ...]
        each, with their graph. The same map as ``ConsistencyModel(x, b_k, edge=b_{k+1})``; asked
        for the raw prediction (through the student's forward, so a DDP wrapper sees it) because
        the DM weight needs x̂0_k too. The expert is named (``phase``), not routed by t: the
        same expert, without a host sync per call."""
        t = self._full(self.bounds[k], x_in)
        pred = self.student(x_in, t, prediction=True, phase=k, **cond)
        x0, eps = self.param.to_x0_eps(x_in, pred, t)
        return ddim_step(self.param, x0, eps, t, self._full(self.bounds[k + 1], x_in)), x0

    # -- losses -----------------------------------------------------------------------------------
    def loss(self, batch, group):
        x, cond = split_batch(batch)
        k = self.phase(self.step)
        loss, stats = self.generator_loss(x, cond, k) if group == "student" else self.critic_loss(x, cond, k)
        return loss, {**stats, "phased/phase": float(k)}

    def generator_loss(self, x: torch.Tensor, cond: dict, k: int) -> tuple[torch.Tensor, dict]:
        x_s, x0 = self.expert_step(self.phase_input(x, cond, k), k, cond)
        s = self._full(self.interval(k)[0], x)
        t = self.times(k, x.shape[0], x)
        x_t, _, _ = transition(self.param, x_s.detach(), s, t, torch.randn_like(x))
        x0_real = self.dm.x0(self.teacher, x_t, t, cond, self.config.guidance)
        x0_fake = self.dm.x0(self.critic.net, x_t, t, cond)
        loss, stats = surrogate_loss(x_s, dm_gradient(x0.detach().float(), x0_real, x0_fake))
        return loss, {**stats, "dm/loss": loss.detach()}

    def critic_loss(self, x: torch.Tensor, cond: dict, k: int) -> tuple[torch.Tensor, dict]:
        with torch.no_grad():
            x_s, _ = self.expert_step(self.phase_input(x, cond, k), k, cond)
        s = self._full(self.interval(k)[0], x)
        t = self.times(k, x.shape[0], x)
        loss = self.group_forward("critic")(subinterval_denoising_loss, self.critic.net, self.param, x_s, s, t,
                                            torch.randn_like(x), cond)
        return loss, {"critic/denoise": loss.detach()}
