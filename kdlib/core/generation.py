"""The sequence-generation capability that on-policy and sequence-level methods need from a model.

A model that can continue token sequences exposes

    generate(prompt_ids, max_new_tokens, temperature=1.0, generator=None) -> (ids, attention_mask)

- ``prompt_ids``: int64 [B, P], every row a full prompt (no padding);
- ``max_new_tokens``: T >= 1;
- ``temperature``: > 0 samples from softmax(logits / temperature) over the model's full real
  vocabulary (no top-k / top-p truncation); 0 is greedy decoding;
- ``generator``: a ``torch.Generator`` that makes sampling deterministic (None: torch's global RNG);
- returns ``ids`` int64 [B, P + T] (the prompt verbatim, then the continuation, always exactly T new
  positions) and ``attention_mask`` int64 [B, P + T]: 1 for the prompt and for every generated
  token up to and including the first end-of-sequence token, 0 after it (those ids are padding).

It runs batched and KV-cached, without gradients. ``domains.llm.models.CausalLM`` implements it
with transformers' ``generate``. Methods call :func:`continue_prompts`, which checks the contract,
and :func:`continuation_targets`, which turns a result into next-token inputs and a loss mask.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch
from torch import nn


@runtime_checkable
class SequenceGenerator(Protocol):
    def generate(self, prompt_ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
                 generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]: ...


def generating_model(model: nn.Module, who: str) -> SequenceGenerator:
    """The model under a Teacher / Student / DDP wrapper that exposes ``generate`` (see module doc)."""
    seen = model
    # Unwrap DistributedDataParallel (.module) and kdlib's Teacher / Student (.model).
    for _ in range(4):
        if isinstance(seen, SequenceGenerator):
            return seen
        inner = getattr(seen, "module", None)
        if not isinstance(inner, nn.Module):
            inner = getattr(seen, "model", None)
        if not isinstance(inner, nn.Module):
            break
        seen = inner
    raise TypeError(f"{who}: {type(model).__name__} cannot generate sequences; the model must expose "
                    "generate(prompt_ids [B, P], max_new_tokens, temperature, generator) -> "
                    "(ids [B, P+T], attention_mask [B, P+T]) (kdlib.core.generation)")


def split_prompt(x: torch.Tensor, prompt_tokens: int, who: str) -> torch.Tensor:
    """The first ``prompt_tokens`` positions of a batch of token ids ``x`` [B, L] -> [B, P]."""
    if x.dim() != 2 or x.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"{who}: batch['x'] must be integer token ids [B, L], got {x.dtype} {tuple(x.shape)}")
    if not 1 <= prompt_tokens <= x.shape[1]:
        raise ValueError(f"{who}: prompt_tokens={prompt_tokens} must be in [1, {x.shape[1]}] "
                         f"(the batch's sequences have {x.shape[1]} tokens)")
    return x[:, :prompt_tokens].long()


def continue_prompts(model: nn.Module, prompt: torch.Tensor, new_tokens: int, temperature: float,
                     generator: torch.Generator | None, who: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``model.generate`` on ``prompt`` [B, P] with the contract checked: (ids, mask) [B, P+T]."""
    if new_tokens < 1:
        raise ValueError(f"{who}: new_tokens must be >= 1, got {new_tokens}")
    if temperature < 0:
        raise ValueError(f"{who}: the generation temperature must be >= 0 (0 = greedy), got {temperature}")
    gen = generating_model(model, who)
    with torch.no_grad():
        ids, mask = gen.generate(prompt, new_tokens, temperature=temperature, generator=generator)
    expected = (prompt.shape[0], prompt.shape[1] + new_tokens)
    if tuple(ids.shape) != expected or tuple(mask.shape) != expected:
        raise ValueError(f"{who}: generate returned ids {tuple(ids.shape)} / mask {tuple(mask.shape)}, "
                         f"expected {expected}")
    if not torch.equal(ids[:, : prompt.shape[1]], prompt):
        raise ValueError(f"{who}: generate did not keep the prompt verbatim")
    return ids, mask


def continuation_targets(ids: torch.Tensor, mask: torch.Tensor, prompt_tokens: int) -> dict[str, torch.Tensor]:
    """Next-token training tensors for a generated batch (ids, mask [B, P+T]).

    Returns ``x`` [B, P+T-1] (inputs), ``y`` [B, P+T-1] (next tokens, -100 where ignored) and
    ``keep`` bool [B, P+T-1]: position j predicts ids[:, j+1], kept only when that token was
    generated (j+1 >= P) and is not padding after the end of sequence.
    """
    x, targets = ids[:, :-1], ids[:, 1:]
    generated = torch.arange(1, ids.shape[1], device=ids.device) >= prompt_tokens
    keep = mask[:, 1:].bool() & generated
    y = torch.where(keep, targets, torch.full_like(targets, -100))
    return {"x": x, "y": y, "keep": keep}


def step_generator() -> torch.Generator:
    """A fresh CPU generator seeded from torch's global RNG: what a method draws per batch (coin
    flips, sampling) is then fixed by ``torch.manual_seed`` and resumes exactly with the global RNG
    state that checkpoints carry, while the generation itself leaves the global RNG untouched."""
    return torch.Generator().manual_seed(int(torch.randint(0, 2**62, ())))
