"""Benchmark: one full LLM distillation training step — kdlib's fused LM-head loss vs materialised logits.

A step is what kdlib's Trainer does for one update under bf16 autocast (its GPU default):
zero the gradients, teacher forward (no grad), student forward, loss, backward, AdamW step.
Teacher: the SmolLM2-135M architecture (LlamaConfig: hidden 576, 30 layers, 9 heads, 3 kv heads,
intermediate 1536, vocab 49152, tied embeddings), **randomly initialised** (speed and memory do not
depend on the weights); student: every ``--student-every``-th teacher layer plus the last, cut by
``domains.llm.models.student_from_teacher`` (3: layers 0, 3, ..., 27, 29 = 11 layers). Both are fp32
parameters, as the Trainer keeps them (its default teacher dtype is fp32); autocast runs the matmuls
in bf16. Batch: ``x`` [B, T] random token ids, ``y`` [B, T] the next tokens, B·T = ``--tokens``.

Paths, per kind:

- ``materialised``: method ``logit_kd`` (the plain path ``fused_logit_kd`` is checked against):
  the student and teacher logits [B, T, V] exist, ``kdlib.objectives.divergence`` + cross-entropy.
- ``fused``: method ``fused_logit_kd`` as it is: ``fused_linear_divergence`` on the last hidden states
  [B·T, H] and the head weights [V, H]; the logits never exist at once.
- ``fused bf16``: the same method, with the hidden states and head weights handed over in bf16
  (a wrapper casts them; the gradient flows back to the fp32 parameters). Under autocast the last
  hidden state of a transformers Llama is fp32 (the residual stream keeps the embeddings' dtype) and
  the kernel's matmuls use ``out=``, which autocast leaves alone: without the cast it runs in fp32.

Reported: median step time (``triton.testing.do_bench`` medians on GPU, host clock on CPU; ``--rounds``
rounds, interleaved over the paths in rotating order, and the median of those), the peak memory
of a whole step (``max_memory_allocated``; also minus what was allocated before the step: parameters,
AdamW state, the batch), and the loss's own extra peak: hidden states from a real forward are made
leaves, then only the method's loss (head matmuls included) forward + backward runs, and its peak
minus the memory before it is reported (it includes the student head's weight gradient, fp32 [V, H]).
The first-step losses of all paths (same weights, same batch) are printed to show they agree.

    python benchmarks/llm_kd_step.py                                  # GPU, the shapes above
    python benchmarks/llm_kd_step.py --tokens 64 --seq-len 32 --layers 2 --device cpu   # smoke test
"""

from __future__ import annotations

import argparse
import copy
import gc
import importlib.metadata
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

IMPLS = ("materialised", "fused", "fused bf16")


# -- models ---------------------------------------------------------------------------------------
def build_models(args, device):
    """(teacher CausalLM, student CausalLM) on ``device``, fp32 parameters, random init (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from domains.llm.models import CausalLM, student_from_teacher

    config = LlamaConfig(
        hidden_size=args.hidden, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads, intermediate_size=args.intermediate, vocab_size=args.vocab,
        tie_word_embeddings=True, max_position_embeddings=max(2048, args.seq_len), rms_norm_eps=1e-5,
        rope_theta=100000.0, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )
    torch.manual_seed(0)
    teacher = CausalLM(LlamaForCausalLM(config), args.vocab)
    student = student_from_teacher(teacher, args.student_every)
    return teacher.to(device).eval(), student.to(device).train()


class Bf16Head(nn.Module):
    """LM protocol (see ``CausalLM``) around ``inner`` with the hidden states [B, T, H] and head
    weight [V, H] / bias [V] cast to bf16 (differentiable casts: gradients reach the fp32 params)."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner
        self.vocab_size = inner.vocab_size

    def forward(self, x, output="logits"):
        out = self.inner(x, output=output)
        return out.to(torch.bfloat16) if output == "hidden" else out

    @property
    def head_weight(self):
        return self.inner.head_weight.to(torch.bfloat16)

    @property
    def head_bias(self):
        b = self.inner.head_bias
        return None if b is None else b.to(torch.bfloat16)


class Precomputed(nn.Module):
    """LM protocol over fixed last hidden states ``hidden`` [B, T, H] of ``model``: only its head
    runs (logits [B, T, V] = hidden @ head_weightᵀ), so a method's loss can be measured alone."""

    def __init__(self, model: nn.Module, hidden: torch.Tensor):
        super().__init__()
        self._model = [model]  # not a submodule: wrapping this in a Teacher must not touch the model
        self.hidden = hidden
        self.vocab_size = model.vocab_size

    def forward(self, x, output="logits"):
        if output == "hidden":
            return self.hidden
        return self._model[0].hf.lm_head(self.hidden)

    @property
    def head_weight(self):
        return self._model[0].head_weight

    @property
    def head_bias(self):
        return self._model[0].head_bias


def make_method(impl, kind, args, student_model, teacher_model, device):
    """The kdlib Method of ``impl`` over ``student_model`` / ``teacher_model``."""
    from kdlib.core.method import METHODS
    from kdlib.core.models import Student, Teacher

    name = "logit_kd" if impl == "materialised" else "fused_logit_kd"
    cls = METHODS.get(name)
    config = cls.Config(temperature=args.temperature, soft_weight=0.9, hard_weight=0.1, kind=kind, beta=0.5)
    if impl == "fused bf16":
        student_model, teacher_model = Bf16Head(student_model), Bf16Head(teacher_model)
    return cls(config, Student(student_model), Teacher(teacher_model, device=device))


# -- measuring ------------------------------------------------------------------------------------
def _autocast(device):
    """bf16 autocast, as the Trainer on GPU (on CPU too here, so the smoke test takes the same dtypes)."""
    return torch.autocast(device.type, dtype=torch.bfloat16)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def _median_ms(fn, device, rep_ms, cpu_reps):
    if device.type == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=max(1, rep_ms // 10), rep=rep_ms, return_mode="median")
    times = []
    for _ in range(cpu_reps):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def measure(impl, kind, args, teacher, student_init, batch, device, shared):
    """One row: first-step loss, median step ms, whole-step peak and loss-alone extra peak (GiB), and
    the step function (None if it failed) for more timing rounds. ``shared``: bytes allocated by what
    all rows share (teacher, batch); the step peak counts those plus this row's own allocations, not
    the other rows' students kept alive for the interleaved rounds."""
    own_base = torch.cuda.memory_allocated() if device.type == "cuda" else 0
    student = copy.deepcopy(student_init)
    method = make_method(impl, kind, args, student, teacher, device)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=5e-4, betas=(0.9, 0.95), weight_decay=0.0)

    def step():
        opt.zero_grad(set_to_none=True)
        with _autocast(device):
            loss, _ = method.loss(batch, "student")
        loss.backward()
        opt.step()
        return loss

    cuda = device.type == "cuda"
    row = dict(kind=kind, impl=impl)
    try:
        row["first_loss"] = float(step().detach())  # warm-up (compilation, AdamW state) and the loss value
        for _ in range(2):
            step()
        _sync(device)
        opt.zero_grad(set_to_none=True)
        if cuda:
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            torch.cuda.reset_peak_memory_stats()
            step()
            torch.cuda.synchronize()
            peak = torch.cuda.max_memory_allocated()
            row.update(step_peak_gib=(peak - own_base + shared) / 2**30, step_extra_gib=(peak - before) / 2**30,
                       before_step_gib=(before - own_base + shared) / 2**30)
        row["step_ms_rounds"] = [_median_ms(step, device, args.rep_ms, args.cpu_reps)]
        opt.zero_grad(set_to_none=True)
        row["loss_extra_gib"] = loss_alone_peak(impl, kind, args, teacher, student, batch, device)
    except torch.OutOfMemoryError:
        row["oom"] = True
    except Exception as exc:  # one failing path must not cost the other rows of a GPU run
        import traceback

        traceback.print_exc()
        row["error"] = f"{type(exc).__name__}: {exc}"
    return row, (None if row.get("oom") or row.get("error") else step)


def loss_alone_peak(impl, kind, args, teacher, student, batch, device):
    """Extra peak GiB of the loss forward + backward alone, from leaf hidden states [B, T, H]
    (run on CPU too, as a check of the code path, but measured only on CUDA: None there)."""
    cuda = device.type == "cuda"
    with torch.no_grad(), _autocast(device):
        h = student(batch["x"], output="hidden")
        th = teacher(batch["x"], output="hidden")
    h = h.detach().requires_grad_(True)
    method = make_method(impl, kind, args, Precomputed(student, h), Precomputed(teacher, th), device)
    student.zero_grad(set_to_none=True)
    if cuda:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
    with _autocast(device):
        loss, _ = method.loss(batch, "student")
    loss.backward()
    if h.grad is None or not torch.isfinite(h.grad).all():
        raise RuntimeError(f"{impl}: the loss alone gave no finite gradient for the hidden states")
    extra = None
    if cuda:
        torch.cuda.synchronize()
        extra = (torch.cuda.max_memory_allocated() - before) / 2**30
    student.zero_grad(set_to_none=True)
    del method, loss, h, th
    return extra


def matmul_floor_ms(args, n_student_layers, device):
    """(bf16 TFLOP/s measured on an 8192³ product, floor ms of one step's matmul FLOPs at that rate).
    FLOPs: teacher forward 2·N·(P_t + V·H), student forward + backward 6·N·(P_s + V·H), with P the
    non-embedding linear parameters per model, plus causal attention 2·N·T·H per layer forward (×3
    with its backward for the student)."""
    if device.type != "cuda":
        return None, None
    from triton.testing import do_bench

    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    tflops = 2 * 8192**3 / do_bench(lambda: a @ b, warmup=25, rep=200, return_mode="median") / 1e9
    h, kv = args.hidden, args.hidden * args.kv_heads // args.heads
    per_layer = h * h * 2 + 2 * h * kv + 3 * h * args.intermediate
    n, t, vh = args.tokens, args.seq_len, args.vocab * args.hidden
    flops = (2 * n * (args.layers * per_layer + vh) + 6 * n * (n_student_layers * per_layer + vh)
             + 2 * n * t * h * (args.layers + 3 * n_student_layers))
    return tflops, flops / tflops / 1e9


# -- main -----------------------------------------------------------------------------------------
def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=8192, help="tokens a step (batch = tokens / seq-len)")
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=576)
    p.add_argument("--layers", type=int, default=30, help="teacher layers")
    p.add_argument("--heads", type=int, default=9)
    p.add_argument("--kv-heads", type=int, default=3)
    p.add_argument("--intermediate", type=int, default=1536)
    p.add_argument("--student-every", type=int, default=3)
    p.add_argument("--temperature", type=float, default=1.0, help="as the fused-gpu recipe")
    p.add_argument("--kinds", nargs="+", default=["fkl", "jsd"])
    p.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    p.add_argument("--rep-ms", type=int, default=1000, help="do_bench time budget per row and round (GPU)")
    p.add_argument("--rounds", type=int, default=5, help="timing rounds, interleaved over the paths")
    p.add_argument("--cpu-reps", type=int, default=3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=str(ROOT / "results" / "llm_kd_step.json"))
    args = p.parse_args(argv)
    device = torch.device(args.device)
    seq = min(args.seq_len, args.tokens)
    if args.tokens % seq:
        p.error(f"--tokens {args.tokens} must be a multiple of --seq-len {seq}")
    args.seq_len = seq

    teacher, student = build_models(args, device)
    n_student = student.lm.config.num_hidden_layers
    g = torch.Generator(device="cpu").manual_seed(1)
    blocks = torch.randint(0, args.vocab, (args.tokens // seq, seq + 1), generator=g).to(device)
    batch = {"x": blocks[:, :-1], "y": blocks[:, 1:]}
    tflops, floor_ms = matmul_floor_ms(args, n_student, device)
    meta = dict(device=torch.cuda.get_device_name() if device.type == "cuda" else platform.processor() or "cpu",
                torch=torch.__version__, triton=_version("triton"), transformers=_version("transformers"),
                python=platform.python_version(), argv=sys.argv[1:] if argv is None else argv,
                batch=list(batch["x"].shape), teacher_layers=args.layers, student_layers=n_student,
                teacher_params=sum(q.numel() for q in teacher.parameters()),
                student_params=sum(q.numel() for q in student.parameters()),
                matmul_tflops=tflops, step_floor_ms=floor_ms, init="random (seed 0)")
    print(f"device {meta['device']}; batch {meta['batch']} = {args.tokens} tokens; V={args.vocab} H={args.hidden}; "
          f"teacher {args.layers} layers ({meta['teacher_params'] / 1e6:.1f}M), student {n_student} layers "
          f"({meta['student_params'] / 1e6:.1f}M); matmul floor {_fmt(floor_ms, '.2f')} ms "
          f"at {_fmt(tflops, '.0f')} TFLOP/s", flush=True)

    rows = []
    header = (f"{'kind':>4} {'impl':>12} {'loss':>8} {'step ms':>8} {'vs mat.':>7} {'step peak':>9} "
              f"{'step extra':>10} {'loss extra':>10} {'mat./this':>9}")
    print(header)
    for kind in args.kinds:
        gc.collect()  # the last kind's students, optimizer states and methods go first
        if device.type == "cuda":
            torch.cuda.empty_cache()
        shared = torch.cuda.memory_allocated() if device.type == "cuda" else 0
        kind_rows, steps = [], {}
        for impl in args.impls:
            row, steps[impl] = measure(impl, kind, args, teacher, student, batch, device, shared)
            kind_rows.append(row)
        # More timing rounds, interleaved and in rotating order: a slow spell of the host (launches
        # of this small model are host-bound) then hits every path, not the one that ran in it.
        for r in range(1, args.rounds):
            for i in range(len(kind_rows)):
                row = kind_rows[(i + r) % len(kind_rows)]
                if steps[row["impl"]] is not None:
                    row["step_ms_rounds"].append(_median_ms(steps[row["impl"]], device, args.rep_ms, args.cpu_reps))
        steps.clear()
        ref = None
        for row in kind_rows:
            impl = row["impl"]
            rows.append(row)
            failed = row.get("oom") or row.get("error")
            if not failed:
                row["step_ms"] = statistics.median(row["step_ms_rounds"])
            if impl == "materialised" and not failed:
                ref = row
            speed = mem = None
            if ref is not None and not failed:
                speed = ref["step_ms"] / row["step_ms"]
                if row.get("loss_extra_gib"):
                    mem = ref["loss_extra_gib"] / row["loss_extra_gib"]
                row.update(speedup_vs_materialised=speed, loss_memory_ratio=mem)
            if failed:
                print(f"{kind:>4} {impl:>12} {'OOM' if row.get('oom') else row['error'][:60]}", flush=True)
            else:
                print(f"{kind:>4} {impl:>12} {row['first_loss']:>8.4f} {row['step_ms']:>8.2f} "
                      f"{_fmt(speed, '.2f') + 'x':>7} {_fmt(row.get('step_peak_gib'), '.2f'):>9} "
                      f"{_fmt(row.get('step_extra_gib'), '.2f'):>10} {_fmt(row.get('loss_extra_gib'), '.3f'):>10} "
                      f"{_fmt(mem, '.1f') + 'x':>9}  rounds "
                      f"{' '.join(f'{t:.1f}' for t in row['step_ms_rounds'])}", flush=True)
            _write(args.json, meta, rows)  # after every row: a run cut short keeps its figures
    print("(GiB; step extra = step peak minus memory before the step; loss extra = loss fwd+bwd alone; "
          "step ms = median of the rounds' do_bench medians; vs mat. = materialised step ms / this; "
          "mat./this = materialised loss extra / this)")
    print(f"wrote {args.json}")
    return 0


def _write(path, meta, rows):
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
