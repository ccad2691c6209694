"""Logit KD from a cached teacher signal: the teacher does not run during training.

    loss = soft_weight · T² · D(p_teacher^T ‖ p_student^T) + hard_weight · CE(student, y)

as ``logit_kd`` (Hinton et al. 2015), with D taken on the k + 1 buckets of the teacher's stored
top-k log-probabilities and tail mass (``kdlib.core.teacher_cache.cached_divergence``: exact for
an all-in-top-k teacher, a lower bound otherwise). The batch carries the signal next to the
inputs: ``teacher_ids`` [B, T, k], ``teacher_logp`` [B, T, k], ``teacher_tail`` [B, T] (a domain
adds them to its training split, e.g. ``domains.llm`` with ``data.teacher_cache_k > 0``).
Defaults: T=1 (the tail bucket makes softening approximate), soft_weight=0.9, hard_weight=0.1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.method import Method, register_method
from kdlib.core.teacher_cache import cached_divergence
from kdlib.objectives import cross_entropy

SIGNAL_KEYS = {"ids": "teacher_ids", "logp": "teacher_logp", "tail": "teacher_tail"}


@dataclass
class CachedKDConfig:
    temperature: float = 1.0
    soft_weight: float = 0.9
    hard_weight: float = 0.1
    kind: str = "fkl"
    beta: float = 0.5  # jsd only
    alpha: float = 0.1  # skew_fkl / skew_rkl only


@register_method("cached_kd")
class CachedKD(Method):
    Config = CachedKDConfig
    needs_teacher = False  # the teacher's outputs come with the batch

    def loss(self, batch: dict[str, torch.Tensor], group: str) -> tuple[torch.Tensor, dict[str, float]]:
        cfg = self.config
        missing = [k for k in SIGNAL_KEYS.values() if k not in batch]
        if missing:
            raise KeyError(f"cached_kd: the batch has no {missing}; the domain must attach the teacher cache "
                           "(e.g. data.teacher_cache_k=32 for the llm domain)")
        logits = self.student(batch["x"])
        y = batch.get("y")
        mask = None if y is None else y != -100
        signal = {k: batch[v] for k, v in SIGNAL_KEYS.items()}
        soft = cached_divergence(logits, signal, cfg.kind, temperature=cfg.temperature, mask=mask,
                                 t2_scaling=True, beta=cfg.beta, alpha=cfg.alpha)
        loss = cfg.soft_weight * soft
        values = {"kd/soft": soft.detach()}
        if cfg.hard_weight and y is not None:
            hard = cross_entropy(logits, y)
            loss = loss + cfg.hard_weight * hard
            values["kd/hard"] = hard.detach()
        return loss, values
