"""Benchmark: kdlib's fused attention JVP vs torch.func.jvp over materialised attention vs the
SDPA forward on the same shape, and an sCM training step of a small DiT with either JVP.

    python benchmarks/attention_jvp.py                       # full table (GPU)
    python benchmarks/attention_jvp.py --ns 8192 --ds 128    # one shape
    python benchmarks/attention_jvp.py --sweep               # block-size sweep for the config table

TFLOP/s count 6 GEMMs of 2·Nq·Nk·D FLOPs per (batch, head) — QKᵀ, tQ Kᵀ, Q tKᵀ, PV, P tV,
(P∘dS)V — i.e. 3× the forward's 4·Nq·Nk·D; causal shapes count half. The SDPA forward column
counts its own 2 GEMMs, so equal TFLOP/s means the JVP takes 3× the forward's time. The floor is
the 6-GEMM FLOPs over the bf16 matmul rate measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdlib.kernels.attention_jvp import attention_jvp  # noqa: E402
from kdlib.kernels.reference.attention_jvp import materialized_attention  # noqa: E402

GIB = 2**30


def bench_ms(fn, warmup=25, rep=100) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")


def peak_gib(fn) -> float:
    """Peak memory allocated while ``fn`` runs, inputs included."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / GIB


def matmul_tflops() -> float:
    a, b = (torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    return 2 * 8192**3 / bench_ms(lambda: a @ b) / 1e9


def attention_flops(b, h, n, d, causal, gemms):
    return gemms * 2 * b * h * n * n * d * (0.5 if causal else 1.0)


def bench_shape(n, d, causal, b, h, mm_rate, skip_materialized_gib) -> dict:
    g = torch.Generator(device="cuda").manual_seed(n + d)
    q, k, v, tq, tk, tv = (
        torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(6)
    )
    row = {"N": n, "D": d, "causal": causal, "B": b, "H": h}
    flops6 = attention_flops(b, h, n, d, causal, 6)

    def ours():
        return attention_jvp(q, k, v, tq, tk, tv, causal=causal)

    row["kdlib_ms"] = bench_ms(ours)
    row["kdlib_tflops"] = flops6 / row["kdlib_ms"] / 1e9
    row["kdlib_peak_gib"] = peak_gib(ours)
    row["floor_ms"] = flops6 / mm_rate / 1e9

    def sdpa():
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    row["sdpa_fwd_ms"] = bench_ms(sdpa)
    row["sdpa_fwd_tflops"] = attention_flops(b, h, n, d, causal, 2) / row["sdpa_fwd_ms"] / 1e9
    row["sdpa_fwd_peak_gib"] = peak_gib(sdpa)
    row["jvp_over_sdpa_fwd"] = row["kdlib_ms"] / row["sdpa_fwd_ms"]

    # Materialised JVP keeps ~24 bytes per score element alive (measured at N=8192 on an H200).
    need = 24 * b * h * n * n / GIB
    row["materialized_ms"] = row["materialized_peak_gib"] = None
    if need <= skip_materialized_gib:
        def materialized():
            return torch.func.jvp(lambda a_, b_, c_: materialized_attention(a_, b_, c_, causal=causal),
                                  (q, k, v), (tq, tk, tv))
        try:
            row["materialized_ms"] = bench_ms(materialized, warmup=5, rep=20)
            row["materialized_peak_gib"] = peak_gib(materialized)
            row["speedup_vs_materialized"] = row["materialized_ms"] / row["kdlib_ms"]
        except torch.OutOfMemoryError:
            row["materialized_ms"] = "OOM"
        torch.cuda.empty_cache()
    else:
        row["materialized_ms"] = f"skipped (needs ~{need:.0f} GiB)"
    return row


def bench_scm_step(tokens: int, attention: str, batch: int, steps: int = 10) -> dict:
    """Time of one sCM distillation step (teacher forward, student JVP + forward/backward, AdamW)
    of a small DiT on latents with ``tokens`` tokens, in bf16."""
    from kdlib.methods.scm import SCM, SCMConfig
    from kdlib.nn import DiT, DiTConfig

    side = int(math.isqrt(tokens)) * 2  # patch 2
    cfg = DiTConfig(in_channels=4, patch_size=2, hidden=768, depth=4, heads=6, time_scale=1.0)
    torch.manual_seed(0)
    student = DiT(DiTConfig(**{**cfg.__dict__, "attention": attention})).cuda().to(torch.bfloat16)
    teacher = DiT(cfg).cuda().to(torch.bfloat16).requires_grad_(False)
    for p in list(student.parameters()) + list(teacher.parameters()):
        p.data.normal_(0, 0.02)  # non-zero adaLN gates so attention matters from the first step
    method = SCM(student, teacher, SCMConfig(tangent_warmup=100))
    opt = torch.optim.AdamW(student.parameters(), lr=1e-4)
    x0 = 0.5 * torch.randn(batch, 4, side, side, device="cuda", dtype=torch.bfloat16)
    row = {"tokens": tokens, "batch": batch, "model": "DiT hidden 768, depth 4, heads 6 (D=128)",
           "attention": attention}
    try:
        for i in range(3):
            method.train_step(opt, x0, i)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for i in range(steps):
            method.train_step(opt, x0, 3 + i)
        end.record()
        torch.cuda.synchronize()
        row["step_ms"] = start.elapsed_time(end) / steps
        row["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    except torch.OutOfMemoryError:
        row["step_ms"] = "OOM"
    return row


SWEEP_CONFIGS = [
    (128, 64, 8, 2), (128, 64, 8, 3), (128, 64, 8, 1), (128, 32, 8, 2), (128, 32, 8, 3), (128, 128, 8, 2),
    (128, 64, 4, 2), (64, 64, 4, 2), (64, 64, 4, 3), (64, 128, 4, 2), (64, 32, 4, 3), (128, 32, 4, 3),
    (64, 64, 8, 2), (64, 64, 8, 3), (64, 32, 8, 3), (128, 16, 8, 3),
]


def sweep(ns, ds, b, h, mm_rate) -> list[dict]:
    from kdlib.kernels.triton.attention_jvp import attention_jvp_triton

    rows = []
    for n in ns:
        for d in ds:
            for causal in (False, True):
                inputs = [torch.randn(b, h, n, d, device="cuda", dtype=torch.bfloat16) for _ in range(6)]
                for cfg in SWEEP_CONFIGS:
                    row = {"N": n, "D": d, "causal": causal, "config": cfg}

                    def run(inputs=inputs, causal=causal, cfg=cfg):
                        return attention_jvp_triton(*inputs, scale=None, causal=causal, config=cfg)

                    try:
                        ms = bench_ms(run)
                        row["ms"] = ms
                        row["tflops"] = attention_flops(b, h, n, d, causal, 6) / ms / 1e9
                    except Exception as e:  # out of shared memory / registers for this config
                        row["error"] = type(e).__name__
                    rows.append(row)
                    print(json.dumps(row), flush=True)
    return rows


def fmt(x, spec=".2f"):
    return format(x, spec) if isinstance(x, float) else ("-" if x is None else str(x))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--ns", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384, 32768, 65536])
    parser.add_argument("--ds", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--causal", choices=["both", "no", "yes"], default="both")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--materialized-limit-gib", type=float, default=60.0,
                        help="skip the materialised JVP where it would need more than this")
    parser.add_argument("--scm-tokens", type=int, default=4096, help="0 skips the sCM step benchmark")
    parser.add_argument("--scm-batch", type=int, nargs="+", default=[2, 8])
    parser.add_argument("--sweep", action="store_true", help="time the block-size table's candidates instead")
    parser.add_argument("--json", default="benchmarks/results/attention_jvp.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("attention_jvp benchmark: needs a CUDA GPU", file=sys.stderr)
        return 1

    device = torch.cuda.get_device_name()
    mm_rate = matmul_tflops()
    print(f"# {device}, torch {torch.__version__}, bf16 matmul {mm_rate:.0f} TFLOP/s", flush=True)
    command = " ".join(["python benchmarks/attention_jvp.py", *sys.argv[1:]])
    result = {"device": device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
              "matmul_tflops": mm_rate, "command": command}
    if args.sweep:
        result["sweep"] = sweep(args.ns, args.ds, args.batch, args.heads, mm_rate)
    else:
        causals = {"both": (False, True), "no": (False,), "yes": (True,)}[args.causal]
        rows = []
        header = (f"{'N':>6} {'D':>4} {'causal':>6} | {'kdlib ms':>9} {'TFLOP/s':>8} {'GiB':>6} "
                  f"{'floor':>6} | {'SDPA fwd':>8} {'TFLOP/s':>8} {'ratio':>6} | "
                  f"{'materialised ms':>16} {'GiB':>6} {'speedup':>7}")
        print(header, flush=True)
        for d in args.ds:
            for causal in causals:
                for n in args.ns:
                    r = bench_shape(n, d, causal, args.batch, args.heads, mm_rate,
                                    args.materialized_limit_gib)
                    rows.append(r)
                    print(f"{n:>6} {d:>4} {str(causal):>6} | {r['kdlib_ms']:>9.3f} {r['kdlib_tflops']:>8.0f} "
                          f"{r['kdlib_peak_gib']:>6.2f} {r['floor_ms']:>6.3f} | {r['sdpa_fwd_ms']:>8.3f} "
                          f"{r['sdpa_fwd_tflops']:>8.0f} {r['jvp_over_sdpa_fwd']:>6.2f} | "
                          f"{fmt(r['materialized_ms'], '.3f'):>16} {fmt(r['materialized_peak_gib']):>6} "
                          f"{fmt(r.get('speedup_vs_materialized'), '.1f'):>7}", flush=True)
        result["attention"] = rows
        if args.scm_tokens:
            result["scm_step"] = []
            for batch in args.scm_batch:
                scm = [bench_scm_step(args.scm_tokens, a, batch) for a in ("kdlib", "materialized")]
                result["scm_step"] += scm
                for r in scm:
                    print(f"sCM step, {r['tokens']} tokens, batch {r['batch']}, {r['attention']:>12}: "
                          f"{fmt(r['step_ms'], '.1f')} ms, peak {fmt(r.get('peak_gib'))} GiB", flush=True)
                if all(isinstance(r["step_ms"], float) for r in scm):
                    speedup = scm[1]["step_ms"] / scm[0]["step_ms"]
                    print(f"sCM step speedup at batch {batch} (materialised / kdlib): {speedup:.2f}x")
                torch.cuda.empty_cache()
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    raise SystemExit(main())
