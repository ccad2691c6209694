"""Fused LM-head divergence: ``divergence(h_s W_sᵀ + b_s, h_t W_tᵀ + b_t)`` without the [N, V] logits.

Tokens are processed in chunks of ``chunk_size`` rows. For each chunk: two matmuls give the student
and teacher logits [C, V]; the loss and its gradient w.r.t. the student logits are computed in one
more pass (a Triton kernel on GPU, autograd on the chunk in the "torch" backend), written over the
student logits; two more matmuls turn that into the chunk's gradient w.r.t. student_hidden and its
contribution to student_weight's gradient. The forward therefore returns the loss with all
gradients already computed; the backward only scales them by the incoming gradient. Peak extra
memory is the weight gradient plus two [C, V] logit buffers.

Backends (``backend=`` or ``KDLIB_FUSED_LINEAR_DIVERGENCE_BACKEND``): "triton" (default on CUDA),
"torch" (chunked, autograd per chunk: the CPU default, and the fallback), "reference" (materialises
everything; the specification).
"""

from __future__ import annotations

import torch

from kdlib.kernels._checks import check_same, check_tensor
from kdlib.kernels._dispatch import can_run_triton, notice_once, requested_backend
from kdlib.kernels.reference.fused_linear_divergence import (
    divergence_terms,
    fused_linear_divergence_reference,
    real_vocab,
    validate_options,
)

OP = "fused_linear_divergence"
# Memory for both [C, V] logit buffers together: at most 896 MiB, and no more than leaves the
# weight gradient plus the buffers under ~1.8 GiB (never under 256 MiB). Measured on an H200
# (V=128256, H=4096, bf16, 8192 tokens): 1024-row chunks cost ~1.5 ms more than 1536 (one more
# read-modify-write of the [V, H] weight gradient per chunk, smaller GEMMs); 2048 rows gain little
# more but pass 2 GiB of extra memory.
_LOGIT_BUDGET_MAX = 896 * 2**20
_LOGIT_BUDGET_MIN = 256 * 2**20
_EXTRA_TARGET = int(1.8 * 2**30)


def default_chunk_size(vocab: int, element_size: int, weight_bytes: int = 0) -> int:
    """Rows per chunk for the logit-buffer budget (multiple of 512, which keeps the GEMM shapes on
    cuBLAS's fast tiles; else of 64, at least 64). weight_bytes: size of the weight gradient."""
    budget = min(_LOGIT_BUDGET_MAX, max(_LOGIT_BUDGET_MIN, _EXTRA_TARGET - weight_bytes))
    rows = budget // (2 * vocab * element_size)
    return rows // 512 * 512 if rows >= 512 else max(64, rows // 64 * 64)


def _logit_grads_torch(s, t, labels, row_loss, *, kind, beta, alpha, generator, temperature,
                       soft_w, hard_w, grad_scale, ignore_index):
    """The torch backend's middle step: same contract as the Triton kernel (see ``divergence_rows_``)."""
    with torch.enable_grad():
        z = s.to(torch.float64 if s.dtype == torch.float64 else torch.float32).requires_grad_(True)
        y = t.to(z.dtype)
        log_ps = torch.log_softmax(z / temperature, -1)
        log_pt = torch.log_softmax(y / temperature, -1)
        rows = soft_w * divergence_terms(log_ps, log_pt, kind, beta=beta, alpha=alpha,
                                         generator=generator).sum(-1)
        if labels is not None:
            valid = labels != ignore_index
            if hard_w != 0.0:
                safe = torch.where(valid, labels, torch.zeros_like(labels))
                nll = -torch.log_softmax(z, -1).gather(-1, safe[:, None]).squeeze(-1)
                rows = rows + hard_w * nll
            rows = torch.where(valid, rows, torch.zeros_like(rows))
        (grad,) = torch.autograd.grad(rows.sum() * grad_scale, z)
    row_loss.copy_(rows.detach())
    s.copy_(grad)


class _FusedLinearDivergence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, w, th, tw, b, tb, labels, opts):
        vocab, backend, chunk = opts["vocab"], opts["backend"], opts["chunk_size"]
        n = h.shape[0]
        need_h, need_w, need_b = ctx.needs_input_grad[0], ctx.needs_input_grad[1], ctx.needs_input_grad[4]
        w_real, tw_real = w[:vocab], tw[:vocab]
        b_real = None if b is None else b[:vocab]
        tb_real = None if tb is None else tb[:vocab]

        if labels is None:
            n_valid = n
        else:
            n_valid = int((labels != opts["ignore_index"]).sum())
        grad_scale = {"sum": 1.0, "mean": 1.0 / max(n_valid, 1),
                      "batchmean": 1.0 / max(n, 1)}[opts["reduction"]]

        grad_h = torch.empty_like(h) if need_h else None
        grad_w = torch.empty_like(w) if need_w else None
        if need_w and vocab < w.shape[0]:
            grad_w[vocab:].zero_()  # padding rows get no gradient
        grad_b = torch.zeros(vocab, dtype=torch.float32, device=h.device) if need_b else None
        loss_dtype = torch.float64 if h.dtype == torch.float64 else torch.float32
        row_loss = torch.empty(n, dtype=loss_dtype, device=h.device)
        s_buf = torch.empty(min(chunk, n), vocab, dtype=h.dtype, device=h.device)
        t_buf = torch.empty(min(chunk, n), vocab, dtype=h.dtype, device=h.device)

        for start in range(0, n, chunk):
            end = min(start + chunk, n)
            s, t = s_buf[: end - start], t_buf[: end - start]
            _linear(h[start:end], w_real, b_real, out=s)
            _linear(th[start:end], tw_real, tb_real, out=t)
            chunk_labels = None if labels is None else labels[start:end]
            _logit_grads(backend, s, t, chunk_labels, row_loss[start:end], opts, grad_scale)
            # s now holds ∂loss/∂student_logits for the chunk.
            if need_h:
                torch.mm(s, w_real, out=grad_h[start:end])
            if need_w and start == 0:
                torch.mm(s.T, h[start:end], out=grad_w[:vocab])
            elif need_w:
                grad_w[:vocab].addmm_(s.T, h[start:end])
            if need_b:
                grad_b += s.sum(0, dtype=torch.float32)

        if need_b:
            full = torch.zeros_like(b)
            full[:vocab] = grad_b
            grad_b = full
        # Kept as plain attributes, not saved tensors: backward hands them over and drops its own
        # reference, so autograd can adopt them as .grad without copying a [V, H] tensor.
        ctx.grads = (grad_h, grad_w, grad_b)
        return row_loss.sum() * grad_scale

    @staticmethod
    def backward(ctx, grad_out):
        if ctx.grads is None:
            raise RuntimeError(f"{OP}: backward ran twice; the gradients were computed in the forward and "
                               "handed over the first time (call the op again instead of retain_graph)")
        grads, ctx.grads = list(ctx.grads), None
        if not torch.equal(grad_out, torch.ones_like(grad_out)):
            grads = [None if g is None else g * grad_out.to(g.dtype) for g in grads]
        grad_h, grad_w, grad_b = grads
        return grad_h, grad_w, None, None, grad_b, None, None, None


def _linear(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, *, out: torch.Tensor) -> None:
    if b is None:
        torch.mm(x, w.T, out=out)
    else:
        torch.addmm(b, x, w.T, out=out)


def _logit_grads(backend, s, t, labels, row_loss, opts, grad_scale):
    soft_w = opts["temperature"] ** 2 if opts["t2_scaling"] else 1.0
    common = dict(hard_w=opts["hard_weight"] if labels is not None else 0.0, grad_scale=grad_scale,
                  ignore_index=opts["ignore_index"])
    if backend == "triton":
        from kdlib.kernels.triton.fused_linear_divergence import divergence_rows_, kind_code

        code, coef = kind_code(opts["kind"], opts["beta"], opts["alpha"], opts["generator"])
        if opts["kind"] in ("skew_fkl", "skew_rkl") and opts["alpha"] == 1.0:
            soft_w = 0.0  # the skew divergences vanish identically at α = 1
        divergence_rows_(s, t, row_loss, labels, kind=code, coef=coef, inv_temp=1.0 / opts["temperature"],
                         soft_w=soft_w, **common)
    else:
        _logit_grads_torch(s, t, labels, row_loss, kind=opts["kind"], beta=opts["beta"],
                           alpha=opts["alpha"], generator=opts["generator"], temperature=opts["temperature"],
                           soft_w=soft_w, **common)


def _choose_backend(backend: str | None, device: torch.device, dtype: torch.dtype) -> str:
    choice = requested_backend(OP, backend)
    if choice in ("torch", "reference"):
        return choice
    if choice == "triton":
        if not can_run_triton(device) or dtype == torch.float64:
            raise RuntimeError(f"{OP}: backend 'triton' was requested but cannot run on {device} / {dtype} "
                               "(needs CUDA, or TRITON_INTERPRET=1 on CPU, and fp16/bf16/fp32)")
        return choice
    if choice is not None:
        raise ValueError(f"{OP}: backend {choice!r} is not available for this op; use 'triton', 'torch' or "
                         "'reference'")
    if device.type == "cuda" and can_run_triton(device) and dtype != torch.float64:
        return "triton"
    if device.type == "cuda":
        notice_once(f"{OP}: Triton is not available; using the chunked torch path (slower)")
    return "torch"


def _validate(h, w, th, tw, b, tb, labels, hard_weight, reduction):
    floats = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
    tensors = {"student_hidden": h, "student_weight": w, "teacher_hidden": th, "teacher_weight": tw}
    for name, x in tensors.items():
        check_tensor(OP, name, x, ndim=2, dtypes=floats)
    if h.shape[1] != w.shape[1]:
        raise ValueError(f"{OP}: student_hidden [N, H] = {tuple(h.shape)} and student_weight [V, H] = "
                         f"{tuple(w.shape)} disagree on H")
    if th.shape[1] != tw.shape[1]:
        raise ValueError(f"{OP}: teacher_hidden [N, H_t] = {tuple(th.shape)} and teacher_weight [V_t, H_t] = "
                         f"{tuple(tw.shape)} disagree on H_t")
    if th.shape[0] != h.shape[0]:
        raise ValueError(f"{OP}: teacher_hidden has {th.shape[0]} tokens, student_hidden {h.shape[0]}")
    for name, bias, weight in (("student_bias", b, w), ("teacher_bias", tb, tw)):
        if bias is not None:
            check_tensor(OP, name, bias, ndim=1, dtypes=floats)
            if bias.shape[0] != weight.shape[0]:
                raise ValueError(f"{OP}: {name} has shape {tuple(bias.shape)}, expected ({weight.shape[0]},)")
            tensors[name] = bias
    check_same(OP, tensors)
    if labels is not None:
        check_tensor(OP, "labels", labels, ndim=1, dtypes=(torch.int64, torch.int32))
        if labels.shape[0] != h.shape[0]:
            raise ValueError(f"{OP}: labels has shape {tuple(labels.shape)}, expected ({h.shape[0]},)")
        check_same(OP, {"student_hidden": h, "labels": labels}, dtype=False)
    elif hard_weight != 0.0:
        raise ValueError(f"{OP}: hard_weight={hard_weight} needs labels")
    if reduction not in ("mean", "sum", "batchmean"):
        raise ValueError(f"{OP}: reduction must be 'mean', 'sum' or 'batchmean', got {reduction!r}")


def fused_linear_divergence(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    *,
    kind: str = "fkl",
    beta: float = 0.5,
    alpha: float = 0.1,
    generator: str | None = None,
    temperature: float = 1.0,
    t2_scaling: bool = False,
    labels: torch.Tensor | None = None,
    ignore_index: int = -100,
    hard_weight: float = 0.0,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    vocab_size: int | None = None,
    chunk_size: int | None = None,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Distillation loss on LM-head outputs, fused with the head's matmul.

    student_hidden: [N, H]; student_weight: [V_s, H]; teacher_hidden: [N, H_t]; teacher_weight:
    [V_t, H_t]; biases [V_s] / [V_t]; labels: [N] int (``ignore_index`` drops a token from every term).

    Per token: ``soft_w · divergence(student_logits, teacher_logits, kind) + hard_weight · CE(student
    logits at T = 1, label)``, soft_w = T² if ``t2_scaling`` else 1; the divergence uses the same
    kinds, β, α, generator and temperature as ``kdlib.objectives.divergence`` (exact formulas in
    ``kdlib.kernels.reference.fused_linear_divergence``). ``reduction``: "mean" over non-ignored
    tokens, "sum", or "batchmean" (sum / N).

    Padded vocabularies: ``vocab_size=K`` marks only the first K logit columns (of both heads) as real
    tokens; the other columns get probability zero and their weight rows a zero gradient. Without it,
    V_s must equal V_t, and a mismatch is an error naming both sizes.

    Returns a scalar (fp32), differentiable w.r.t. student_hidden, student_weight and student_bias;
    the teacher side gets no gradient. Inputs share one device and dtype (bf16/fp16/fp32; fp64 on
    the torch/reference backends).
    """
    validate_options(kind, beta, alpha, generator)
    if temperature <= 0:
        raise ValueError(f"{OP}: temperature must be > 0, got {temperature}")
    _validate(student_hidden, student_weight, teacher_hidden, teacher_weight, student_bias, teacher_bias,
              labels, hard_weight, reduction)
    vocab = real_vocab(student_weight.shape[0], teacher_weight.shape[0], vocab_size, OP)
    chosen = _choose_backend(backend, student_hidden.device, student_hidden.dtype)
    if chosen == "reference":
        return fused_linear_divergence_reference(
            student_hidden, student_weight, teacher_hidden, teacher_weight, kind=kind, beta=beta, alpha=alpha,
            generator=generator, temperature=temperature, t2_scaling=t2_scaling, labels=labels,
            ignore_index=ignore_index, hard_weight=hard_weight, student_bias=student_bias,
            teacher_bias=teacher_bias, vocab_size=vocab_size, reduction=reduction)
    if chunk_size is None:
        chunk_size = default_chunk_size(vocab, student_hidden.element_size(),
                                        student_weight.numel() * student_weight.element_size())
    if chunk_size <= 0:
        raise ValueError(f"{OP}: chunk_size must be > 0, got {chunk_size}")
    opts = dict(vocab=vocab, backend=chosen, chunk_size=chunk_size, kind=kind, beta=beta, alpha=alpha,
                generator=generator, temperature=temperature, t2_scaling=t2_scaling,
                ignore_index=ignore_index, hard_weight=hard_weight, reduction=reduction)
    if labels is not None:
        labels = labels.contiguous()
    return _FusedLinearDivergence.apply(
        student_hidden.contiguous(), student_weight, teacher_hidden.contiguous(), teacher_weight.detach(),
        student_bias, None if teacher_bias is None else teacher_bias.detach(), labels, opts)
