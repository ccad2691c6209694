"""The fake score as a LoRA adapter on the frozen teacher, sharing its weights (issue 7, memory).

DMD's fake score starts as the teacher and is trained on the generator's samples. As a full copy
it costs the teacher's weights again plus their gradients and optimizer state (with AdamW, four
times the teacher's parameter bytes). Here it is the teacher's own network with low-rank adapters
on its Linear / Conv layers (Hu et al. 2021, LoRA eq. 3: h = W·x + (α/r)·B·A·x, B = 0 at the
start), the fake score of ProlificDreamer's VSD (Wang et al. 2023) and SwiftBrush, built with
peft:

- The teacher's module tree is copied structurally: new module objects, and every parameter and
  buffer the very tensor the teacher holds (nothing is duplicated). peft injects its LoRA layers
  into that copy only, so the teacher itself never contains an adapter: every call of the teacher
  (the real score, samplers, evaluation, sCM's tangent) runs the unchanged frozen network, which
  is "adapters disabled" by construction, with no switch to forget. At initialisation B = 0 and
  the fake score's outputs equal the teacher's exactly (base + 0).
- The shared weights keep ``requires_grad=False``: an optimizer over this module's trainable
  parameters holds only the adapters. Gradients still flow *through* the frozen layers, to their
  inputs (DMD2's generator GAN term) and to the adapters of earlier layers.
- ``state_dict`` holds only the adapters (checkpoints do not repeat the teacher); loading takes
  the shared entries from the teacher already in place, so a strict load still checks every key.
- The shared layers stay in eval mode whatever ``train()`` says: they are the teacher's, whose
  dropout must stay off and whose normalisation statistics (shared buffers) must not move.
- With a bf16/fp16 teacher the adapters are fp32 master weights; inputs are cast to the teacher's
  dtype (as ``Teacher`` does) and outputs returned in fp32 (as a full fp32 copy would).

peft is imported when a LoRA fake score is built, not with kdlib (it is an optional dependency).
"""

from __future__ import annotations

import copy
import re

import torch
from torch import nn

from kdlib.core.models import Teacher

ADAPTER = "fake_score"
LORA_LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def shared_structure_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model``'s module tree whose parameters and buffers are ``model``'s own tensors
    (deepcopy with every tensor pre-entered in the memo as itself)."""
    memo = {id(t): t for t in (*model.parameters(), *model.buffers())}
    return copy.deepcopy(model, memo)


def lora_layer_names(model: nn.Module) -> list[str]:
    """Names of the Linear and Conv{1,2,3}d layers of ``model`` (the default LoRA targets)."""
    return [name for name, m in model.named_modules() if isinstance(m, LORA_LAYERS)]


class LoRAFakeScore(nn.Module):
    """``net(x, t, **cond)``: the teacher's network plus a LoRA adapter (module docstring).

    teacher: the frozen real score; rank: r; alpha: α (the update is scaled by α/r; with Adam,
    raising α at fixed r raises the adapter's effective learning rate); targets: module names in
    peft's sense (a name matches itself and any ``*.name``), default every Linear/Conv layer.
    ``network`` is the adapted copy: its submodule names are the teacher's (a GAN layer named for
    the teacher is found there).
    """

    def __init__(self, teacher: Teacher, rank: int = 16, alpha: float = 0.0, targets: list[str] | None = None):
        super().__init__()
        try:
            from peft import LoraConfig, inject_adapter_in_model
        except ImportError as exc:  # pragma: no cover - peft ships with the dev and llm extras
            raise ImportError("fake_score: lora needs peft (pip install peft)") from exc
        base = teacher.model
        available = lora_layer_names(base)
        if targets:
            target_modules: list[str] | str = list(targets)
        elif available:
            # An anchored regex: peft's suffix match on plain names could catch a non-Linear module
            # whose name ends like a Linear's (e.g. "0" matching "blocks.0").
            target_modules = "|".join(re.escape(name) for name in available)
        else:
            raise ValueError(f"fake_score: lora found no Linear or Conv layer in {type(base).__name__} to adapt")
        shared = {id(t) for t in (*base.parameters(), *base.buffers())}
        network = shared_structure_copy(base)
        config = LoraConfig(r=rank, lora_alpha=alpha or rank, target_modules=target_modules, lora_dropout=0.0)
        try:
            self.network = inject_adapter_in_model(config, network, adapter_name=ADAPTER)
        except ValueError as exc:
            raise ValueError(f"lora_targets {targets!r}: {exc} (the teacher's Linear/Conv layers: "
                             f"{', '.join(available)})") from None
        # Every name of a shared tensor (tied weights appear under each of their names in a state_dict).
        self.shared_names = [name for name, t in (*self.named_parameters(remove_duplicate=False),
                                                  *self.named_buffers(remove_duplicate=False)) if id(t) in shared]
        self.dtype = teacher.dtype
        if self.dtype is not None:
            for p in self.adapter_parameters():
                p.data = p.data.float()  # fp32 master weights beside the low-precision base
        self.network.eval()
        self.register_state_dict_post_hook(_drop_shared)
        self.register_load_state_dict_pre_hook(_fill_shared)

    def adapter_parameters(self) -> list[nn.Parameter]:
        """The LoRA weights (the only parameters that are not the teacher's)."""
        shared = set(self.shared_names)
        return [p for name, p in self.named_parameters() if name not in shared]

    def train(self, mode: bool = True) -> LoRAFakeScore:
        # The shared layers are the teacher's: never in training mode (module docstring).
        self.training = mode
        return self

    def forward(self, *args, **kwargs):
        if self.dtype is None:
            return self.network(*args, **kwargs)
        args = tuple(_cast(a, self.dtype) for a in args)
        kwargs = {k: _cast(v, self.dtype) for k, v in kwargs.items()}
        return self.network(*args, **kwargs).float()


def _cast(x, dtype: torch.dtype):
    return x.to(dtype) if isinstance(x, torch.Tensor) and x.is_floating_point() else x


def _drop_shared(module: LoRAFakeScore, state_dict: dict, prefix: str, local_metadata) -> None:
    for name in module.shared_names:
        state_dict.pop(prefix + name, None)


def _fill_shared(module: LoRAFakeScore, state_dict: dict, prefix: str, *_) -> None:
    # The teacher's tensors are loaded onto themselves: a strict load then checks only the adapters.
    current = dict((*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)))
    for name in module.shared_names:
        state_dict.setdefault(prefix + name, current[name].detach())
