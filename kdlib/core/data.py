"""In-memory datasets and a deterministic, resumable, shardable batch order.

The order of examples is a pure function of (seed, epoch), so the data position in a checkpoint
is two integers and a resumed run sees exactly the batches the uninterrupted run would have.
Under torch.distributed each rank takes its own contiguous slice of every global batch, so
``world_size`` processes with per-rank batch ``b`` see the same examples as one process with
batch ``world_size * b``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


class TensorDataset:
    """Named tensors sharing their first dimension: ``{"x": [N, ...], "y": [N]}``."""

    def __init__(self, **tensors: torch.Tensor):
        sizes = {name: t.shape[0] for name, t in tensors.items()}
        if len(set(sizes.values())) != 1:
            raise ValueError(f"TensorDataset: tensors must share their first dimension, got {sizes}")
        self.tensors = tensors

    def __len__(self) -> int:
        return next(iter(self.tensors.values())).shape[0]

    def batch(self, index: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: t[index] for name, t in self.tensors.items()}

    def subset(self, index: torch.Tensor) -> TensorDataset:
        return TensorDataset(**self.batch(index))

    def to(self, device: torch.device | str) -> TensorDataset:
        return TensorDataset(**{k: v.to(device) for k, v in self.tensors.items()})


@dataclass
class BatchOrder:
    """Yields index tensors for global batches; ``epoch``/``position`` are its whole state."""

    size: int
    batch_size: int  # global batch size (all ranks together)
    seed: int
    epoch: int = 0
    position: int = 0  # index of the next example in this epoch's permutation
    _cached: tuple[int, torch.Tensor] | None = field(default=None, init=False, repr=False)

    def _permutation(self) -> torch.Tensor:
        if self._cached is None or self._cached[0] != self.epoch:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            self._cached = (self.epoch, torch.randperm(self.size, generator=g))
        return self._cached[1]

    def next_global(self) -> torch.Tensor:
        """The next ``batch_size`` indices; an epoch's incomplete tail is dropped so every batch is full."""
        if self.batch_size > self.size:
            raise ValueError(f"batch size {self.batch_size} is larger than the dataset ({self.size} examples)")
        if self.position + self.batch_size > self.size:
            self.epoch += 1
            self.position = 0
        perm = self._permutation()
        index = perm[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return index

    def next_local(self, rank: int, world_size: int) -> torch.Tensor:
        index = self.next_global()
        per_rank = self.batch_size // world_size
        return index[rank * per_rank : (rank + 1) * per_rank]

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position, "seed": self.seed, "batch_size": self.batch_size}

    def load_state(self, state: dict[str, int]) -> None:
        if state["seed"] != self.seed or state["batch_size"] != self.batch_size:
            raise ValueError(
                f"cannot resume the data order: checkpoint has seed={state['seed']}, batch_size={state['batch_size']}, "
                f"this run has seed={self.seed}, batch_size={self.batch_size}"
            )
        self.epoch, self.position = state["epoch"], state["position"]
