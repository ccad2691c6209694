"""Sequence-level knowledge distillation (Kim & Rush 2016, "Sequence-Level Knowledge Distillation",
EMNLP 2016).

Word-level KD matches the teacher's next-token distribution on fixed data; sequence-level KD
instead approximates the teacher's *sequence* distribution by its mode: the student is trained with
plain cross-entropy on the teacher's own output ŷ,

    ŷ ≈ argmax_y p_T(y | x)      (the paper uses beam search; here greedy, or sampled at a temperature)
    L_SEQ-KD(θ) = − Σ_n log p_S^θ(ŷ_n | ŷ_<n, x)

Per batch ``x`` [B, L] of token ids: the prompt x[:, :prompt_tokens] is continued by the teacher by
``new_tokens`` tokens (batched, KV-cached, no grad, through ``kdlib.core.generation``); the loss is
the mean token cross-entropy over the generated positions only (prompt positions and positions
after a row's end-of-sequence token are masked). Defaults: greedy decoding (``temperature=0``, the
beam-size-1 case of the paper), prompt 16 tokens, 32 new tokens. Teacher outputs are regenerated
every step (they are deterministic when greedy; sampled ones are seeded from torch's global RNG).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from kdlib.core.generation import continuation_targets, continue_prompts, split_prompt, step_generator
from kdlib.core.method import Method, register_method
from kdlib.objectives import cross_entropy


@dataclass
class SeqKDConfig:
    prompt_tokens: int = 16  # the prefix of each sequence the teacher continues
    new_tokens: int = 32  # tokens the teacher generates per prompt
    temperature: float = 0.0  # teacher decoding: 0 = greedy, > 0 = sampling at this temperature


@register_method("seq_kd")
class SeqKD(Method):
    Config = SeqKDConfig

    def __init__(self, config, student, teacher):
        super().__init__(config, student, teacher)
        if config.prompt_tokens < 1 or config.new_tokens < 1:
            raise ValueError(f"seq_kd: prompt_tokens and new_tokens must be >= 1, got {config.prompt_tokens} "
                             f"and {config.new_tokens}")
        if config.temperature < 0:
            raise ValueError(f"seq_kd: temperature must be >= 0 (0 = greedy), got {config.temperature}")

    def teacher_targets(self, batch: dict[str, torch.Tensor], generator: torch.Generator | None = None
                        ) -> dict[str, torch.Tensor]:
        """The teacher's continuations of the batch's prompts as training tensors: ``x`` [B, P+T-1],
        ``y`` (the teacher's tokens at generated positions, -100 elsewhere), ``keep``, ``ids``, ``mask``."""
        cfg = self.config
        prompt = split_prompt(batch["x"], cfg.prompt_tokens, "seq_kd")
        ids, mask = continue_prompts(self.teacher, prompt, cfg.new_tokens, cfg.temperature, generator, "seq_kd")
        return {**continuation_targets(ids, mask, cfg.prompt_tokens), "ids": ids, "mask": mask}

    def loss(self, batch: dict[str, torch.Tensor], group: str) -> tuple[torch.Tensor, dict[str, float]]:
        generator = step_generator() if self.config.temperature > 0 else None
        targets = self.teacher_targets(batch, generator)
        loss = cross_entropy(self.student(targets["x"]), targets["y"])
        generated = targets["keep"].sum(1).float().mean()
        return loss, {"seq_kd/ce": loss.detach(), "seq_kd/generated_tokens": generated}
