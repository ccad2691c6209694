"""TBCM: data-free consistency distillation on the teacher's own sampled trajectories (after
"Trajectory-Backward Consistency Model", 2025: consistency distillation whose training pairs come
from teacher trajectories started at pure noise instead of from noised real data).

What this file implements, precisely: on the ascending discretisation t_0 = t_min < ... < t_N =
t_max of the parameterisation,

    x_{t_N} = σ(t_max)·z,  z ~ N(0, I)                       (pure noise, no data)
    x_{t_{i-1}} = DDIM(teacher, x_{t_i}, t_i -> t_{i-1}, guidance w),  i = N, ..., 1   (no grad)
    n ~ U{0, ..., N − k} per sample
    L = d(f_θ(x_{t_{n+k}}, t_{n+k}), stopgrad f_θ⁻(x_{t_n}, t_n))

so both points of a pair lie on one teacher trajectory (k teacher steps apart) and the student
sees exactly the states it meets when sampling: no real data, no forward noising, no mismatch
between training and inference inputs. Compared with LCM-style CD a trajectory costs N teacher
NFE instead of one; ``refresh_every`` reuses one batch of trajectories (and the condition it was
drawn with) for that many steps, drawing fresh pair indices each step: the teacher cost falls by
that factor at the price of correlated batches. The cache is checkpointed (``state_tensors``), so a
resumed run serves the same trajectories an uninterrupted one would. Memory: (N + 1)·B states.

The batch's ``x`` is used only for its shape (and device/dtype); the other keys are the
condition the trajectories are sampled under (e.g. class labels), so a recipe's data loader still
sets the condition mix. d, f_θ⁻ (``target``), CFG (``guidance``) and the initialisation are
consistency_distillation's. Defaults: N = 20, k = 1, refresh every step, pseudo-Huber, online
target, guidance 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import register_method
from kdlib.core.state import prefixed, unprefixed
from kdlib.diffusion.consistency import discretisation, solver_step
from kdlib.methods.consistency_family import (
    ConsistencyDistillationConfig,
    ConsistencyFamily,
    check_range,
    consistency_distance,
)
from kdlib.methods.flow_matching import split_batch


@dataclass
class TBCMConfig(ConsistencyDistillationConfig):
    refresh_every: int = 1  # steps between fresh teacher trajectories (1: every step)


@register_method("tbcm")
class TBCM(ConsistencyFamily):
    Config = TBCMConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        check_range(self.name, "refresh_every", config.refresh_every, 1)
        self._cache: tuple[int, torch.Tensor, dict[str, torch.Tensor]] | None = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        if self._cache is None:
            return {}
        step, states, cond = self._cache
        return {"cache/step": torch.tensor(step), "cache/states": states, **prefixed("cache/cond/", cond)}

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        if not tensors:
            self._cache = None
            return
        device = next(self.student.model.parameters()).device
        self._cache = (int(tensors["cache/step"]), tensors["cache/states"].to(device),
                       unprefixed(tensors, "cache/cond/", device))

    @torch.no_grad()
    def trajectory(self, like: torch.Tensor, cond: dict[str, torch.Tensor], grid: torch.Tensor) -> torch.Tensor:
        """The teacher's DDIM trajectory from pure noise: [N + 1, B, ...], index i at time grid[i]
        (ascending, so index N is the noise). like: [B, ...], only its shape, device and dtype."""
        b = like.shape[0]
        # σ(t_max) stays a 0-dim tensor, second in the product (the numbers a Python float gave):
        # no host sync, and no value to read from the --dry-run estimator's fake tensors.
        x = torch.randn_like(like) * self.param.alpha_sigma(grid[-1])[1]
        states = [x]
        for i in range(len(grid) - 1, 0, -1):
            x = solver_step(self.teacher, self.param, x, grid[i].expand(b), grid[i - 1].expand(b), cond,
                            self.config.guidance)
            states.append(x)
        return torch.stack(states[::-1])

    def loss(self, batch, group):
        cfg = self.config
        like, cond = split_batch(batch)
        grid = discretisation(self.param, cfg.num_intervals, device=like.device)
        if self._cache is None or self.step - self._cache[0] >= cfg.refresh_every:
            self._cache = (self.step, self.trajectory(like, cond, grid), cond)
        _, states, cond = self._cache
        b, dtype = states.shape[1], states.dtype
        n = torch.randint(0, cfg.num_intervals - cfg.skip + 1, (b,), device=states.device)
        rows = torch.arange(b, device=states.device)
        x_t, x_s = states[n + cfg.skip, rows], states[n, rows]
        with torch.no_grad():
            target = self.target_model()(x_s, grid[n].to(dtype), **cond)
        online = self.student(x_t, grid[n + cfg.skip].to(dtype), **cond)
        return consistency_distance(online, target, cfg.distance, cfg.c), {}
