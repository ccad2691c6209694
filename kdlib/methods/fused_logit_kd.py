"""Logit KD for language models through the fused LM-head kernel: the [B·T, V] logits never exist.

Same loss as ``logit_kd`` (Hinton et al. 2015; see kdlib/methods/logit_kd.py):

    loss = soft_weight · T² · D(p_teacher^T ‖ p_student^T) + hard_weight · CE(student, y)

averaged over the tokens whose target y is not -100, but computed by
``kdlib.kernels.fused_linear_divergence`` from the last hidden states and LM-head weights of
student and teacher, chunk by chunk. ``logit_kd`` stays the plain path it is checked against.

Models must follow the LM protocol of ``domains.llm`` (``CausalLM``): ``model(x, output="hidden")``
-> [B, T, H]; attributes ``head_weight`` [V, H], ``head_bias`` [V] or None and ``vocab_size`` (real
tokens; rows past it are padding, masked by the kernel's ``vocab_size``). Student and teacher must
agree on the real vocabulary size (the domain also compares their tokenizers).
Defaults as ``logit_kd``: T=4, soft_weight=0.9, hard_weight=0.1, kind="fkl".
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import Method, register_method
from kdlib.kernels import fused_linear_divergence
from kdlib.methods.logit_kd import LogitKDConfig


@dataclass
class FusedLogitKDConfig(LogitKDConfig):
    """``logit_kd``'s options (same loss), plus how the kernel runs."""

    chunk_size: int | None = None  # tokens per chunk; None: the kernel's memory-budget default
    backend: str | None = None  # None: the kernel's dispatch (triton on CUDA, chunked torch on CPU)


def lm_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None, int]:
    """(weight [V, H], bias [V] or None, real vocab size) of a model following the LM protocol."""
    for attr in ("head_weight", "head_bias", "vocab_size"):
        if not hasattr(model, attr):
            raise TypeError(f"fused_logit_kd: {type(model).__name__} has no {attr!r}; the model must follow the "
                            "LM protocol (forward(x, output='hidden'), head_weight, head_bias, vocab_size)")
    return model.head_weight, model.head_bias, model.vocab_size


def compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the LM-head kernel runs in: autocast's where it is on for this device, else the
    hidden states' own."""
    device = hidden.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else hidden.dtype


def fused_head_divergence(student, teacher, x: torch.Tensor, labels: torch.Tensor | None, who: str,
                          **kernel_options) -> torch.Tensor:
    """The teacher–student divergence of two LMs on inputs ``x`` [B, T] through their LM heads,
    with ``fused_linear_divergence`` (logits never materialised). ``labels`` [B·T] (or None):
    targets for the hard term and ``ignore_index`` (-100) rows, which drop out of the loss; head
    rows past the real vocabulary are masked. ``who`` names the caller in errors."""
    w, b, vocab = lm_head(student.model)
    tw, tb, t_vocab = lm_head(teacher.model)
    if vocab != t_vocab:
        raise ValueError(f"{who}: student has {vocab} real tokens, teacher {t_vocab}")
    hidden = student(x, output="hidden")
    # Under autocast the model hands back fp32 hidden states and the heads are fp32 parameters,
    # but the kernel's matmuls are not autocast ops: cast explicitly, as autocast casts the
    # materialised path's lm_head (measured on an H200: ~35 ms a step at 8k tokens, V=49152).
    dtype = compute_dtype(hidden)
    t_hidden = teacher(x, output="hidden")
    pad = vocab if vocab < max(w.shape[0], tw.shape[0]) else None
    return fused_linear_divergence(
        hidden.flatten(0, -2).to(dtype), w.to(dtype), t_hidden.flatten(0, -2).to(dtype), tw.to(dtype),
        labels=labels, student_bias=None if b is None else b.to(dtype),
        teacher_bias=None if tb is None else tb.to(dtype), vocab_size=pad, **kernel_options)


@register_method("fused_logit_kd")
class FusedLogitKD(Method):
    Config = FusedLogitKDConfig

    def loss(self, batch: dict[str, torch.Tensor], group: str) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        if cfg.soft_weight <= 0:
            raise ValueError("fused_logit_kd: soft_weight must be > 0 (for CE alone use 'supervised')")
        y = batch.get("y")
        hard = cfg.hard_weight if y is not None else 0.0
        # The kernel weighs the hard term against a unit soft term: scale both by soft_weight.
        loss = cfg.soft_weight * fused_head_divergence(
            self.student, self.teacher, batch["x"], None if y is None else y.flatten(), "fused_logit_kd",
            hard_weight=hard / cfg.soft_weight, kind=cfg.kind, beta=cfg.beta, alpha=cfg.alpha,
            generator=cfg.generator, temperature=cfg.temperature, t2_scaling=True, chunk_size=cfg.chunk_size,
            backend=cfg.backend)
        return loss, {"kd/fused": loss.detach()}
