"""Language-model metrics on held-out blocks: perplexity, agreement with the teacher, speed."""

from __future__ import annotations

import math
import time

import torch

from kdlib.core.data import TensorDataset


@torch.no_grad()
def lm_metrics(model: torch.nn.Module, split: TensorDataset, batch_size: int = 8) -> dict[str, float]:
    """``ppl`` = exp(mean next-token NLL in nats) and ``nll`` over the targets that are not -100;
    ``agreement``: fraction of those positions where the model's top-1 token equals the teacher's
    (``teacher_top1`` [N, T] in the split; absent -> not reported).

    split: ``x`` [N, T] input ids, ``y`` [N, T] targets."""
    nll, hits, count = 0.0, 0, 0
    n = len(split)
    for start in range(0, n, batch_size):
        batch = split.batch(torch.arange(start, min(n, start + batch_size)))
        logits = model(batch["x"]).float()
        valid = batch["y"] != -100
        lp = torch.log_softmax(logits, -1)
        token_nll = -lp.gather(-1, batch["y"].clamp_min(0)[..., None]).squeeze(-1)
        nll += float(token_nll[valid].sum())
        count += int(valid.sum())
        if "teacher_top1" in batch:
            hits += int((logits.argmax(-1) == batch["teacher_top1"])[valid].sum())
    out = {"nll": nll / max(count, 1), "ppl": math.exp(nll / max(count, 1))}
    if "teacher_top1" in split.tensors:
        out["agreement"] = hits / max(count, 1)
    return out


@torch.no_grad()
def tokens_per_second(model: torch.nn.Module, x: torch.Tensor, repeats: int = 2) -> float:
    """Forward throughput on input ids ``x`` [B, T] (best of ``repeats`` after one warm-up)."""
    model(x)
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        model(x)
        best = min(best, time.perf_counter() - start)
    return x.numel() / best


@torch.no_grad()
def greedy_continuations(model: torch.nn.Module, prompts: torch.Tensor, tokenizer, new_tokens: int) -> list[str]:
    """Greedy continuations of equal-length prompts [B, T] in one batched, KV-cached ``generate``
    (the transformers model inside a ``CausalLM``); returns the decoded new text per prompt."""
    lm = model.lm
    out = lm.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new_tokens,
                      do_sample=False, use_cache=True, pad_token_id=tokenizer.eos_token_id)
    return [tokenizer.decode(row[prompts.shape[1]:], skip_special_tokens=True) for row in out]
