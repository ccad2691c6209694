"""What the consistency-distillation methods (``consistency_distillation``, ``multistep_cd``,
``scott``, ``tbcm``) share: the options (``ConsistencyDistillationConfig``, which the variants
extend), their validation, the distance d, the student's initialisation from the teacher, the
target network and the trainer's step. Not a method itself: nothing here is registered.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from kdlib.core.method import Method
from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.phase_experts import PhaseExperts
from kdlib.diffusion.reparam import ReparameterisedNet
from kdlib.methods.flow_matching import check_parameterisation
from kdlib.objectives import cauchy, l2, pseudo_huber

TARGETS = ("online", "ema")
DISTANCES = ("pseudo_huber", "l2", "cauchy")


def consistency_distance(pred: torch.Tensor, target: torch.Tensor, kind: str, c: float = 0.0,
                         weight: torch.Tensor | None = None) -> torch.Tensor:
    """Batch mean of weight·d(pred, target); c: the pseudo-Huber/Cauchy scale (0: iCT's
    0.00054·√D); l2 is the mean squared error per value. pred, target: [B, ...]; weight: [B]."""
    if kind == "pseudo_huber":
        return pseudo_huber(pred, target, c or None, weight=weight)
    if kind == "cauchy":
        return cauchy(pred, target, c or 0.00054 * pred[0].numel() ** 0.5, weight=weight)
    if kind == "l2":
        return l2(pred, target, weight=weight) / pred[0].numel()
    raise ValueError(f"unknown distance {kind!r}; choose one of {', '.join(DISTANCES)}")


def init_student_from_teacher(student, teacher) -> None:
    """Start the student's network and its EMA copies as the teacher (``copy_teacher_into``);
    a ``PhaseExperts`` student (one network per noise range) starts with every expert the teacher."""
    for model in (student.model, *student.ema):
        # A student in another parameterisation wraps the teacher's network (ReparameterisedNet).
        net = model.net.net if isinstance(model.net, ReparameterisedNet) else model.net
        for part in net.experts if isinstance(net, PhaseExperts) else [net]:
            copy_teacher_into(part, teacher.model)


def copy_teacher_into(net: torch.nn.Module, teacher_net: torch.nn.Module) -> None:
    """``net`` computes ``teacher_net``'s function: the teacher's state when the shapes match;
    otherwise, for a network that defines ``grow_from(teacher_net)`` (a function-preserving growth
    of the teacher, e.g. extra residual blocks that start as identity), that. A network of another
    shape without it is an error (``load_state_dict``'s)."""
    state = teacher_net.state_dict()
    own = net.state_dict()
    same = own.keys() == state.keys() and all(own[k].shape == v.shape for k, v in state.items())
    if not same and hasattr(net, "grow_from"):
        net.grow_from(teacher_net)
    else:
        net.load_state_dict(state)


@dataclass
class ConsistencyDistillationConfig:
    param: str = "fm"
    num_intervals: int = 20  # N
    skip: int = 1  # k: teacher solver step in intervals
    guidance: float = 1.0  # w of the CFG-augmented teacher step
    # [w_lo, w_hi]: the student absorbs CFG as an input instead of a fixed w (LCM §4.2's
    # w-conditioned student): each sample's teacher step is guided at its own w ~ U[w_lo, w_hi] and
    # the student and its target see that w (condition key ``guidance``, [B]); the student then
    # samples at any w of the range in one pass. Empty: the fixed ``guidance``.
    guidance_input: list[float] = field(default_factory=list)
    distance: str = "pseudo_huber"
    c: float = 0.0  # distance scale; 0: 0.00054·sqrt(values per sample)
    target: str = "online"  # online | ema
    init_from_teacher: bool = True


def check_choice(method: str, key: str, value, choices: Sequence) -> None:
    """Stop with the method, the key and the valid choices when ``value`` is not one of them."""
    if value not in choices:
        raise ValueError(f"{method}: {key} must be one of {', '.join(map(str, choices))}; got {value!r}")


def check_range(method: str, key: str, value, low, high=None) -> None:
    """Stop when ``value`` is outside [low, high] (high None: no upper bound)."""
    if value < low or (high is not None and value > high):
        bound = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{method}: {key} must be {bound}; got {value!r}")


class ConsistencyFamily(Method):
    """Base of the consistency-distillation methods: checks the shared options (``param``, ``num_intervals``, ``skip``,
    ``distance``, ``target``), that the student is a ``ConsistencyModel`` of the recipe's
    parameterisation and that the teacher declares the same one, then copies the teacher into the
    student (``init_from_teacher``). ``self.step`` follows the trainer (exact on resume)."""

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        name = self.name
        if not isinstance(student.model, ConsistencyModel):
            raise TypeError(f"{name}: the student must be a kdlib.diffusion.ConsistencyModel")
        check_choice(name, "distance", config.distance, DISTANCES)
        check_choice(name, "target", config.target, TARGETS)
        check_range(name, "num_intervals", config.num_intervals, 1)
        check_range(name, "skip", config.skip, 1, config.num_intervals)
        if config.target == "ema" and not student.ema:
            raise ValueError(f"{name}: target=ema needs train.ema_decays (e.g. [0.95])")
        try:  # a name or a spelled-out discrete schedule: get_parameterisation knows the valid ones
            self.param = get_parameterisation(config.param)
        except ValueError as exc:
            raise ValueError(f"{name}: param: {exc}") from None
        check_parameterisation(teacher.model, config.param, "the teacher")
        if student.model.param.name != config.param:
            raise ValueError(f"{name}: student is a {student.model.param.name!r} model, "
                             f"method_args.param is {config.param!r}")
        if config.guidance_input:
            lo_hi = config.guidance_input
            if not self.supports_guidance_input:
                raise ValueError(f"{name}: guidance_input is supported by consistency_distillation, scott and "
                                 "multistep_cd")
            if len(lo_hi) != 2 or not 0 <= lo_hi[0] <= lo_hi[1]:
                raise ValueError(f"{name}: guidance_input must be [w_lo, w_hi] with 0 <= w_lo <= w_hi; got {lo_hi!r}")
            if config.guidance != 1.0:
                raise ValueError(f"{name}: set either guidance (a fixed w) or guidance_input (a range the student "
                                 f"takes as an input), not both; got guidance={config.guidance}")
        if config.init_from_teacher:
            init_student_from_teacher(student, teacher)
        self.step = 0

    supports_guidance_input = False  # methods whose loss calls ``guidance_draw``

    def guidance_draw(self, b: int, device) -> tuple[float | torch.Tensor, dict[str, torch.Tensor]]:
        """(w for the teacher's guided step, extra condition for the student and its target): the
        fixed ``guidance`` and {}; with ``guidance_input``, w [B] ~ U[w_lo, w_hi] and {"guidance": w}."""
        if not self.config.guidance_input:
            return self.config.guidance, {}
        lo, hi = self.config.guidance_input
        w = lo + (hi - lo) * torch.rand(b, device=device, dtype=torch.float64)
        return w, {"guidance": w.float()}

    def update_groups(self, step: int) -> list[str]:
        self.step = step
        return super().update_groups(step)

    def target_model(self) -> ConsistencyModel:
        """f_θ⁻: the student itself (called under no_grad) or its first EMA copy."""
        return self.student.ema[0] if self.config.target == "ema" else self.student.model
