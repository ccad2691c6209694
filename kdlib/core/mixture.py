"""A re-weighted mixture of data domains as a batch order, and the DDK weight update.

``MixtureOrder`` keeps ``BatchOrder``'s interface (``next_global``, ``next_local``, ``state``,
``load_state``), so the Trainer draws from it unchanged and checkpoints resume it exactly: each
global batch draws its per-domain counts from a multinomial over the current ``weights`` and its
examples uniformly within each domain, all from a generator seeded by (seed, batch number); the
state is the batch number and the weights.

DDK (Liu et al. 2024, "DDK: Distilling Domain Knowledge for Efficient Large Language Models",
§3.2) re-weights the domains toward those where the student trails the teacher most on held-out
data. Here, from per-domain held-out NLLs of student and teacher:

    d_i = nll_student_i / nll_teacher_i,    target = softmax(d / temperature),
    weights ← (1 − smoothing) · weights + smoothing · target

(the smoothing keeps the mixture from jumping on one noisy evaluation; DDK's "factor-smooth
updating"; the exact constants here are ours: temperature 0.1, smoothing 0.5).
"""

from __future__ import annotations

import torch


class MixtureOrder:
    """Batches over examples labelled with ``domains`` [N] (ints 0..D−1), mixed by ``weights`` [D]."""

    def __init__(self, domains: torch.Tensor, batch_size: int, seed: int, weights: list[float] | None = None):
        self.domains = domains.long().cpu()
        self.size, self.batch_size, self.seed = len(domains), batch_size, seed
        count = int(self.domains.max()) + 1
        self.members = [(self.domains == d).nonzero().flatten() for d in range(count)]
        if any(len(m) == 0 for m in self.members):
            raise ValueError(f"MixtureOrder: some of the {count} domains have no examples")
        self.weights = torch.tensor(weights if weights is not None else [1.0 / count] * count, dtype=torch.float64)
        if self.weights.shape != (count,) or (self.weights < 0).any() or self.weights.sum() <= 0:
            raise ValueError(f"MixtureOrder: need {count} non-negative weights, got {weights}")
        self.weights = self.weights / self.weights.sum()
        self.batches = 0

    def next_global(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batches)
        self.batches += 1
        counts = torch.bincount(torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g),
                                minlength=len(self.members))
        picks = [m[torch.randint(len(m), (int(c),), generator=g)] for m, c in zip(self.members, counts)]
        index = torch.cat(picks)
        return index[torch.randperm(len(index), generator=g)]

    def next_local(self, rank: int, world_size: int) -> torch.Tensor:
        index = self.next_global()
        per_rank = self.batch_size // world_size
        return index[rank * per_rank : (rank + 1) * per_rank]

    def state(self) -> dict:
        return {"batches": self.batches, "seed": self.seed, "batch_size": self.batch_size,
                "weights": [float(w) for w in self.weights]}

    def load_state(self, state: dict) -> None:
        if state.get("seed") != self.seed or state.get("batch_size") != self.batch_size or "weights" not in state:
            raise ValueError(f"cannot resume the mixture order from {state} (this run: seed={self.seed}, "
                             f"batch_size={self.batch_size})")
        self.batches = state["batches"]
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)

    def update_ddk(self, student_nll: list[float], teacher_nll: list[float], *, temperature: float = 0.1,
                   smoothing: float = 0.5) -> list[float]:
        """One DDK step from per-domain held-out NLLs (see the module docstring); returns the weights."""
        ratio = torch.tensor(student_nll, dtype=torch.float64) / torch.tensor(teacher_nll, dtype=torch.float64)
        target = torch.softmax(ratio / temperature, 0)
        self.weights = (1 - smoothing) * self.weights + smoothing * target
        return [float(w) for w in self.weights]
