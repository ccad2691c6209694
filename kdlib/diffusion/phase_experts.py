"""A mixture of experts over the noise range: one network per phase of a few-step sampler
(Phased DMD, Fan et al. 2025, §3: one expert per SNR subinterval; Wan2.2's high-/low-noise
experts are the two-phase case).

The phases are the segments of ``kdlib.diffusion.consistency``'s segmented sampler: with K phases
the boundaries are that sampler's K-segment edges, listed from noise to data,

    b_0 = t_max > b_1 > ... > b_K = t_min,   phase k = (b_{k+1}, b_k],

so a segmented ``ConsistencyModel`` over ``PhaseExperts`` samples in K steps with step k exactly
expert k's map b_k -> b_{k+1} (``few_step_sample`` -> ``segment_sample``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch._subclasses.fake_tensor import is_fake

from kdlib.diffusion.consistency import segment_edges
from kdlib.diffusion.param import Parameterisation


def phase_boundaries(param: Parameterisation, phases: int) -> torch.Tensor:
    """b_0 = t_max > ... > b_K = t_min [K + 1] float64: the K-segment edges, noise first."""
    if phases < 1:
        raise ValueError(f"the number of phases must be >= 1, got {phases}")
    # On the CPU explicitly: a network may be built under torch.device("meta") (--dry-run).
    return segment_edges(param, phases, device="cpu").flip(0)


class PhaseExperts(nn.Module):
    """``net(x, t, **cond)`` that runs, for each sample, the expert of the phase holding its t.

    experts: K networks of one signature (and output shape); boundaries: the K − 1 interior
    boundaries b_1 > ... > b_{K−1} in the time units the experts are fed (the parameterisation's
    ``model_input`` time). A t within 1e-5 (relative) of b_j counts as b_j itself, i.e. as the
    start of phase j: times arrive in float32 while the boundaries are float64.
    """

    def __init__(self, experts: Sequence[nn.Module], boundaries: Sequence[float]):
        super().__init__()
        boundaries = [float(b) for b in boundaries]
        if len(boundaries) != len(experts) - 1:
            raise ValueError(f"PhaseExperts: {len(experts)} experts need {len(experts) - 1} interior boundaries, "
                             f"got {len(boundaries)}")
        if any(a <= b for a, b in zip(boundaries, boundaries[1:])):
            raise ValueError(f"PhaseExperts: boundaries must decrease (noise first), got {boundaries}")
        self.experts = nn.ModuleList(experts)
        self.boundaries = boundaries  # plain floats: not cast by .to(dtype), not in the state dict
        self.parameterisation = getattr(experts[0], "parameterisation", None)

    @classmethod
    def for_segments(cls, experts: Sequence[nn.Module], param: Parameterisation) -> PhaseExperts:
        """Experts on the phases of ``phase_boundaries(param, len(experts))``, routed by the time
        the networks see (``param.model_input``: e.g. EDM's c_noise)."""
        inner = phase_boundaries(param, len(experts))[1:-1]
        _, t_in = param.model_input(torch.zeros(len(inner), 1, dtype=torch.float64, device="cpu"), inner)
        return cls(experts, t_in.tolist())

    def phase(self, t: torch.Tensor) -> torch.Tensor:
        """The phase index [B] (long) of times t [B]: the number of boundaries b_j >= t."""
        b = torch.tensor(self.boundaries, dtype=torch.float64, device=t.device)
        tol = 1e-5 * b.abs().clamp(min=1.0)
        return (t.to(torch.float64)[:, None] <= (b + tol)[None]).sum(dim=1)

    def forward(self, x: torch.Tensor, t: torch.Tensor, phase: int | None = None, **cond) -> torch.Tensor:
        """x [B, ...], t [B] -> the experts' outputs [B, ...]. ``phase``: the phase of every sample,
        when the caller knows it (a trainer at one sampler step): no routing, no host sync."""
        if phase is not None:
            return self.experts[phase](x, t, **cond)
        if is_fake(t):
            # The --dry-run estimator's fake tensors have no times to route by. The batch is split
            # evenly among the experts instead: the routed forward's gathers, scatters and rows
            # (which add up to the batch whatever the times), and every expert gets gradients.
            ends = [j * x.shape[0] // len(self.experts) for j in range(len(self.experts) + 1)]
            return self._routed(x, t, cond, [(j, torch.arange(lo, hi, device=x.device))
                                             for j, (lo, hi) in enumerate(zip(ends, ends[1:])) if hi > lo])
        phase = self.phase(t)
        low, high = phase.aminmax()
        if low == high:  # the usual case (a batch at one sampler step): no gather/scatter
            return self.experts[int(low)](x, t, **cond)
        return self._routed(x, t, cond, [(j, (phase == j).nonzero()[:, 0]) for j in phase.unique().tolist()])

    def _routed(self, x: torch.Tensor, t: torch.Tensor, cond: dict,
                routes: list[tuple[int, torch.Tensor]]) -> torch.Tensor:
        """Expert j on the rows [n_j] of x [B, ...] and t [B] for each (j, rows) of ``routes``
        (disjoint rows covering the batch), scattered back into one output [B, ...]."""
        out = None
        for j, rows in routes:
            part = {n: v[rows] if torch.is_tensor(v) else v for n, v in cond.items()}
            y = self.experts[j](x[rows], t[rows], **part)
            out = y.new_zeros(x.shape[0], *y.shape[1:]) if out is None else out
            out = out.index_copy(0, rows, y)  # out of place: autograd reaches every expert used
        return out
