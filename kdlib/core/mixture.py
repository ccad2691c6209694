"""A re-weighted mixture of data domains as a batch order, and the DDK weight update.

``MixtureOrder`` keeps ``BatchOrder``'s interface (``next_global``, ``next_local``, ``state``,
``load_state``), so the Trainer draws from it unchanged and checkpoints resume it exactly: each
global batch draws its per-domain counts from a multinomial over the current ``weights`` (from a
generator seeded by (seed, batch number)), and each domain hands out its examples in epochs of its
own: a fresh permutation (seeded by seed, domain and epoch) walked through without replacement, so
a domain that gets more of the batches brings new examples before it repeats any. The state is
the batch number, the weights and how many examples each domain has handed out.

DDK (Liu et al. 2024, "DDK: Distilling Domain Knowledge for Efficient Large Language Models",
§3.2) re-weights the domains toward those where the student trails the teacher most on validation
data. From per-domain validation NLLs (cross-entropies) of student and teacher, the discrepancy of
domain i is their ratio, and the weights follow DDK's factor-smooth update: a multiplicative step
on the previous weights, then a mix with the uniform mixture that keeps every domain at least
(1 − α)/N of the batches:

    d_i = nll_student_i / nll_teacher_i,
    ψ_i = weights_i · exp(d_i / temperature),
    weights_i ← α · ψ_i / Σ_j ψ_j + (1 − α) / N

(α = ``smoothing``, 0.5 and temperature 1 in the paper; the paper re-weights every K steps from
validation sets kept apart from the test data, and so does the LLM domain here).
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
        self.drawn = [0] * count  # examples handed out so far, per domain

    def _take(self, domain: int, count: int) -> torch.Tensor:
        members, n = self.members[domain], len(self.members[domain])
        positions = range(self.drawn[domain], self.drawn[domain] + count)
        self.drawn[domain] += count
        perms: dict[int, torch.Tensor] = {}
        out = []
        for pos in positions:
            epoch = pos // n
            if epoch not in perms:
                g = torch.Generator().manual_seed((self.seed * 1_000_003 + domain) * 1_000_003 + epoch)
                perms[epoch] = torch.randperm(n, generator=g)
            out.append(members[perms[epoch][pos % n]])
        return torch.stack(out) if out else members[:0]

    def next_global(self) -> torch.Tensor:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.batches)
        self.batches += 1
        counts = torch.bincount(torch.multinomial(self.weights, self.batch_size, replacement=True, generator=g),
                                minlength=len(self.members))
        index = torch.cat([self._take(d, int(c)) for d, c in enumerate(counts)])
        return index[torch.randperm(len(index), generator=g)]

    def next_local(self, rank: int, world_size: int) -> torch.Tensor:
        index = self.next_global()
        per_rank = self.batch_size // world_size
        return index[rank * per_rank : (rank + 1) * per_rank]

    def state(self) -> dict:
        return {"batches": self.batches, "seed": self.seed, "batch_size": self.batch_size,
                "weights": [float(w) for w in self.weights], "drawn": list(self.drawn)}

    def load_state(self, state: dict) -> None:
        if (state.get("seed") != self.seed or state.get("batch_size") != self.batch_size or "weights" not in state
                or len(state.get("drawn", ())) != len(self.members)):
            raise ValueError(f"cannot resume the mixture order from {state} (this run: seed={self.seed}, "
                             f"batch_size={self.batch_size})")
        self.batches = state["batches"]
        self.weights = torch.tensor(state["weights"], dtype=torch.float64)
        self.drawn = [int(n) for n in state["drawn"]]

    def update_ddk(self, student_nll: list[float], teacher_nll: list[float], *, temperature: float = 1.0,
                   smoothing: float = 0.5) -> list[float]:
        """One DDK factor-smooth step from per-domain validation NLLs (see the module docstring);
        returns the weights. ``smoothing`` (α) in (0, 1]: the weight of the new factor, the rest is
        the uniform floor."""
        if not 0 < smoothing <= 1 or temperature <= 0:
            raise ValueError(f"update_ddk: need 0 < smoothing <= 1 and temperature > 0, got {smoothing}, {temperature}")
        ratio = torch.tensor(student_nll, dtype=torch.float64) / torch.tensor(teacher_nll, dtype=torch.float64)
        if ratio.shape != self.weights.shape:
            raise ValueError(f"update_ddk: need {len(self.weights)} NLLs per model, got {len(student_nll)}, "
                             f"{len(teacher_nll)}")
        # ψ ∝ weights · exp(ratio / T), computed in log space (the ratios of a badly trailing
        # student can be large)
        psi = torch.softmax(self.weights.log() + ratio / temperature, 0)
        self.weights = smoothing * psi + (1 - smoothing) / len(self.weights)
        return [float(w) for w in self.weights]
