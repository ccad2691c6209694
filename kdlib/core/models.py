"""Teacher and Student: the two wrappers every method sees.

A Teacher is frozen (eval mode, no gradients) and placed once; a Student is the trainable model
plus EMA copies at one or more decays. Methods call them like the wrapped networks.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class Teacher(nn.Module):
    """A frozen model: eval mode, ``requires_grad=False`` everywhere, forward under no_grad.

    ``dtype`` lets a teacher run in bf16 while the student trains in fp32 master weights.
    """

    def __init__(self, model: nn.Module, *, device: torch.device | str = "cpu", dtype: torch.dtype | None = None):
        super().__init__()
        self.model = model.to(device=device, dtype=dtype).eval()
        self.model.requires_grad_(False)
        self.dtype = dtype

    def train(self, mode: bool = True) -> Teacher:
        # A teacher never leaves eval mode (dropout, batch-norm statistics stay fixed).
        self.training = False
        self.model.eval()
        return self

    @torch.no_grad()
    def forward(self, *args, **kwargs):
        if self.dtype is not None:  # a bf16 teacher takes the fp32 student's inputs as they come
            args = tuple(cast_floating(a, self.dtype) for a in args)
            kwargs = {k: cast_floating(v, self.dtype) for k, v in kwargs.items()}
        return self.model(*args, **kwargs)


def cast_floating(x, dtype: torch.dtype):
    """``x`` in ``dtype`` if it is a floating tensor, else ``x`` as it is (labels, flags, None)."""
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


class Student(nn.Module):
    """The trainable model and its EMA copies.

    ``ema_decays``: one EMA copy per decay (e.g. ``[0.999, 0.9999]``); EMA copies are updated after
    every optimizer step by the fused ``kdlib.kernels.ema_update_``. ``forward`` calls
    ``forward_module`` — the model itself, or its DistributedDataParallel wrapper during training.
    """

    def __init__(self, model: nn.Module, *, ema_decays: list[float] | tuple[float, ...] = ()):
        super().__init__()
        for d in ema_decays:
            if not 0.0 <= d <= 1.0:
                raise ValueError(f"EMA decay must be in [0, 1], got {d}")
        self.model = model
        self.ema_decays = list(ema_decays)
        self.ema = nn.ModuleList(copy.deepcopy(model).requires_grad_(False).eval() for _ in self.ema_decays)
        self.forward_module: nn.Module | None = None

    def forward(self, *args, **kwargs):
        module = self.forward_module if self.forward_module is not None else self.model
        return module(*args, **kwargs)

    @torch.no_grad()
    def update_ema(self) -> None:
        if not self.ema_decays:
            return
        from kdlib.kernels.ema import ema_update_

        params = [p.detach() for p in self.model.parameters()]
        for decay, ema in zip(self.ema_decays, self.ema):
            ema_update_([p for p in ema.parameters()], params, decay)
            # Buffers (e.g. normalisation statistics) are copied, not averaged.
            for b_ema, b in zip(ema.buffers(), self.model.buffers()):
                b_ema.copy_(b)

    def ema_model(self, decay: float) -> nn.Module:
        return self.ema[self.ema_decays.index(decay)]

    def evaluation_models(self) -> dict[str, nn.Module]:
        """The models to evaluate: the raw student and every EMA copy, by name."""
        models = {"student": self.model}
        for decay, ema in zip(self.ema_decays, self.ema):
            models[f"ema{decay:g}"] = ema
        return models
