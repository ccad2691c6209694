"""Reflow: a 2-rectified flow trained on the teacher's own noise-to-data couplings (Liu et al. 2022,
"Flow Straight and Fast", the Reflow procedure), with the training improvements of Lee, Lin & Fanti 2024
("Improving the Training of Rectified Flows"): the U-shaped time law, the pseudo-Huber premetric and
initialisation from the teacher.

The teacher's probability-flow ODE is a deterministic map z ↦ x from noise to data; reflow trains
the student on the straight line between the two ends (kdlib's fm convention, t = 0 data, t = 1
noise; ``kdlib.diffusion.rectified_flow``):

    z ~ N(0, I),  x = ODE_teacher(z; K steps of a deterministic sampler, guidance w)   (no grad)
    t ~ p_U(t) = a·cosh(a(t − ½)) / (2 sinh(a/2))                      (Lee et al., U-shaped, a = 4)
    x_t = (1 − t)·x + t·z
    L = E[ m(u_θ(x_t, t), z − x) ],   m(u, v) = sqrt(‖u − v‖² + c²) − c,  c = 0.00054·√D   (their premetric)

(the papers' target x − z, written with time running from data to noise); ``distance: l2`` gives
Liu et al.'s ‖u − v‖² / D instead. u_θ is the student network's velocity prediction. When the
student's flow is straight, one Euler step from t = 1 is exact: x̂ = z − u_θ(z, 1).

Students: an fm ``kdlib.diffusion.ConsistencyModel`` (the domain's student; its ``segments`` buffer
is set to 1 so that its own sampler, ``few_step_sample``, walks deterministic DDIM steps edge to
edge, which for fm is exactly Euler on the uniform grid — the ODE sampler of a rectified flow).
The teacher may be any parameterisation (``teacher_param``): only its ODE sampler is used, so a VP
or EDM teacher is reflowed into an fm student the same way. ``init_from_teacher`` copies the
teacher's weights (same network; with another teacher parameterisation the domain must build the
student as the teacher's network seen through ``ReparameterisedNet``).

Couplings are generated on the fly from the batch's condition (its ``x`` gives only the shape):
the papers pre-generate a fixed set of pairs; here each batch of pairs costs K teacher calls and
serves ``refresh_every`` batches with fresh times (the teacher cost falls by that factor, at the
price of correlated batches). The pairs being served are checkpointed (``state_tensors``), so a
resumed run continues exactly as an uninterrupted one.
Not implemented: LPIPS (image-specific; the pseudo-Huber premetric is the domain-agnostic one) and
Lee et al.'s real-data pairs from teacher inversion.

Defaults: Euler, K = 20, guidance 1, fresh pairs every step, U-shaped t (a = 4), pseudo-Huber.
Batch: ``x`` [B, ...] (shape only); other keys are the condition.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import Method, register_method
from kdlib.core.state import prefixed, unprefixed
from kdlib.diffusion.consistency import ConsistencyModel
from kdlib.diffusion.param import get_parameterisation
from kdlib.diffusion.rectified_flow import sample_u_shaped, straight_path
from kdlib.diffusion.reparam import ReparameterisedNet
from kdlib.diffusion.samplers import SAMPLERS, sample
from kdlib.methods.consistency_family import check_choice, check_range, consistency_distance, init_student_from_teacher
from kdlib.methods.flow_matching import check_parameterisation, split_batch

TIME_LAWS = ("u_shaped", "uniform")
DISTANCES = ("pseudo_huber", "l2")
# "sde" draws fresh noise inside the solve: its (z, x) is no deterministic coupling.
ODE_SAMPLERS = tuple(s for s in SAMPLERS if s != "sde")


@dataclass
class ReflowConfig:
    teacher_param: str = "fm"  # the teacher's parameterisation (its ODE sampler makes the couplings)
    teacher_sampler: str = "euler"  # euler | heun | ddim | dpm++2m
    teacher_steps: int = 20  # K
    guidance: float = 1.0  # w: the teacher's classifier-free guidance while it makes couplings
    refresh_every: int = 1  # batches (micro-batches under grad_accum) a batch of couplings serves
    time_dist: str = "u_shaped"  # u_shaped | uniform
    u_shape_a: float = 4.0
    distance: str = "pseudo_huber"  # pseudo_huber | l2
    c: float = 0.0  # pseudo-Huber c; 0: 0.00054·sqrt(values per sample)
    init_from_teacher: bool = True


def same_architecture(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two networks have the same parameter names and shapes."""
    shapes = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    return shapes(a) == shapes(b)


@register_method("reflow")
class Reflow(Method):
    Config = ReflowConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        name = self.name
        model = student.model
        if not isinstance(model, ConsistencyModel) or model.param.name != "fm":
            raise TypeError(f"{name}: the student must be an fm kdlib.diffusion.ConsistencyModel (a rectified "
                            "flow lives on fm's straight path); set the domain's model.param or student_param to fm")
        check_choice(name, "teacher_sampler", config.teacher_sampler, ODE_SAMPLERS)
        check_choice(name, "time_dist", config.time_dist, TIME_LAWS)
        check_choice(name, "distance", config.distance, DISTANCES)
        check_range(name, "teacher_steps", config.teacher_steps, 1)
        check_range(name, "refresh_every", config.refresh_every, 1)
        if config.u_shape_a <= 0:
            raise ValueError(f"{name}: u_shape_a must be > 0; got {config.u_shape_a!r}")
        try:
            self.teacher_param = get_parameterisation(config.teacher_param)
        except ValueError as exc:
            raise ValueError(f"{name}: teacher_param: {exc}") from None
        check_parameterisation(teacher.model, config.teacher_param, "the teacher")
        if config.init_from_teacher:
            net = model.net.net if isinstance(model.net, ReparameterisedNet) else model.net
            if not same_architecture(net, teacher.model):
                raise ValueError(f"{name}: init_from_teacher needs a student of the teacher's architecture; "
                                 "set method_args.init_from_teacher=false for a smaller student")
            init_student_from_teacher(student, teacher)
        for m in (model, *student.ema):
            m.segments.fill_(1)  # sample with Euler steps (module docstring)
        self.step = 0
        # (batches served, z, x, cond): counted per loss call, so that every micro-batch of a
        # step under grad_accum gets its own couplings.
        self._pairs: tuple[int, torch.Tensor, torch.Tensor, dict[str, torch.Tensor]] | None = None

    def update_groups(self, step: int) -> list[str]:
        self.step = step
        return ["student"]

    # -- resume -----------------------------------------------------------------------------------
    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self._pairs is None:
            return {}
        served, z, x, cond = self._pairs
        return {"pairs/served": torch.tensor(served), "pairs/z": z, "pairs/x": x, **prefixed("pairs/cond/", cond)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            self._pairs = None
            return
        device = next(self.student.model.parameters()).device
        self._pairs = (int(tensors["pairs/served"]), tensors["pairs/z"].to(device), tensors["pairs/x"].to(device),
                       unprefixed(tensors, "pairs/cond/", device))

    # -- the pieces -------------------------------------------------------------------------------
    @torch.no_grad()
    def couplings(self, like: torch.Tensor, cond: dict[str, torch.Tensor]
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """(z, x, cond): noise z [B, ...] and the teacher's ODE solution x = ODE(z) under ``cond``,
        fresh for every ``refresh_every``-th batch. like: [B, ...], only its shape, device and dtype."""
        cfg = self.config
        if self._pairs is None or self._pairs[0] >= cfg.refresh_every or self._pairs[1].shape != like.shape:
            z = torch.randn_like(like)
            x = sample(self.teacher, self.teacher_param, z, cfg.teacher_steps, cfg.teacher_sampler,
                       cond=cond, guidance=cfg.guidance).to(like.dtype)
            self._pairs = (0, z, x, cond)
        served, z, x, cond = self._pairs
        self._pairs = (served + 1, z, x, cond)
        return z, x, cond

    def sample_times(self, n: int, device) -> torch.Tensor:
        if self.config.time_dist == "u_shaped":
            return sample_u_shaped(n, self.config.u_shape_a, device=device)
        return torch.rand(n, device=device)

    def velocity(self, x_t: torch.Tensor, t: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """u_θ(x_t, t): the student network's velocity [B, ...] (through ``Student.forward``)."""
        return self.student(x_t, t.to(x_t.dtype), prediction=True, **cond)

    def distance(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return consistency_distance(pred, target, self.config.distance, self.config.c)

    def reflow_loss(self, z: torch.Tensor, x: torch.Tensor, cond: dict[str, torch.Tensor]) -> torch.Tensor:
        """L = E_t m(u_θ(x_t, t), z − x) on the straight path of the pairs (z, x) [B, ...]."""
        t = self.sample_times(x.shape[0], x.device)
        x_t, target = straight_path(x, z, t)
        return self.distance(self.velocity(x_t, t, cond), target)

    def loss(self, batch, group):
        like, cond = split_batch(batch)
        z, x, cond = self.couplings(like, cond)
        return self.reflow_loss(z, x, cond), {}
