"""Benchmark: LM-head distillation loss, forward + backward, bf16 — kdlib's fused op vs the naive
torch loss on materialised logits vs Liger-Kernel's chunked and fused-linear JSD, in one run.

For each (tokens N, vocab V, hidden H, kind) it reports the median time (triton.testing.do_bench)
and the extra peak memory (max_memory_allocated during one fwd+bwd minus what was allocated
before: the inputs), and the floor: 4 matmuls of 2·N·V·H FLOPs at the bf16 matmul rate measured
in the same run. Liger expresses fkl / rkl as its JSD with β = 0 / 1, so it runs for those kinds
too. A configuration that runs out of memory is reported as "OOM".

    python benchmarks/fused_divergence.py --tokens 8192 --vocab 128256 --hidden 4096
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import platform
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

BETA = {"fkl": 0.0, "rkl": 1.0, "jsd": 0.5}


def _inputs(n, v, h, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    kw = dict(device="cuda", dtype=torch.bfloat16, generator=g)
    return dict(
        sh=torch.randn(n, h, **kw).requires_grad_(True),
        sw=(torch.randn(v, h, **kw) * h**-0.5).requires_grad_(True),
        th=torch.randn(n, h, **kw),
        tw=torch.randn(v, h, **kw) * h**-0.5,
        labels=torch.randint(0, v, (n,), device="cuda", generator=g),
    )


def _impls(kind):
    from kdlib.kernels.fused_linear_divergence import fused_linear_divergence
    from kdlib.objectives import divergence

    def kdlib_fused(x):
        return fused_linear_divergence(x["sh"], x["sw"], x["th"], x["tw"], kind=kind, beta=0.5)

    def naive(x):
        return divergence(x["sh"] @ x["sw"].T, x["th"] @ x["tw"].T, kind, beta=0.5)

    impls = {"kdlib": kdlib_fused, "naive torch": naive}
    try:
        from liger_kernel.chunked_loss import LigerFusedLinearJSDLoss
        from liger_kernel.transformers import LigerFusedLinearJSD
    except ImportError as exc:
        print(f"Liger-Kernel not importable ({exc}); skipping it", file=sys.stderr)
        return impls
    chunked = LigerFusedLinearJSDLoss(weight_hard_loss=0.0, weight_soft_loss=1.0, beta=BETA[kind])
    fused = LigerFusedLinearJSD(jsd_beta=BETA[kind])
    impls["liger chunked JSD"] = lambda x: chunked(x["sh"], x["sw"], x["th"], x["tw"], x["labels"])
    impls["liger fused linear JSD"] = lambda x: fused(x["sh"], x["sw"], x["th"], x["tw"], None)
    return impls


def _measure(fn, x, reps_ms):
    from triton.testing import do_bench

    def step():
        fn(x).backward()

    try:
        step()  # warm-up: compilation, autotuning, allocator
        torch.cuda.synchronize()
        x["sh"].grad = x["sw"].grad = None
        torch.cuda.empty_cache()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - base
        x["sh"].grad = x["sw"].grad = None
        ms = do_bench(step, warmup=reps_ms // 4, rep=reps_ms, grad_to_none=[x["sh"], x["sw"]],
                      return_mode="median")
        return ms, peak / 2**30
    except torch.OutOfMemoryError:
        x["sh"].grad = x["sw"].grad = None
        torch.cuda.empty_cache()
        return None, None


def _matmul_tflops(n, v, h):
    from triton.testing import do_bench

    a = torch.randn(n, h, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(v, h, device="cuda", dtype=torch.bfloat16)
    ms = do_bench(lambda: a @ b.T, warmup=25, rep=200, return_mode="median")
    return 2 * n * v * h / ms / 1e9


def _version(dist):
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, nargs="+", default=[1024, 4096, 8192, 16384])
    p.add_argument("--vocab", type=int, nargs="+", default=[32000, 128256, 151936])
    p.add_argument("--hidden", type=int, nargs="+", default=[2048, 4096])
    p.add_argument("--kinds", nargs="+", default=["fkl", "rkl", "jsd"], choices=list(BETA))
    p.add_argument("--impls", nargs="+", default=None, help="subset of: kdlib, 'naive torch', liger ...")
    p.add_argument("--rep-ms", type=int, default=1000)
    p.add_argument("--json", default=str(ROOT / "results" / "fused_divergence.json"))
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("fused_divergence: needs a CUDA GPU", file=sys.stderr)
        return 1

    rows = []
    header = (f"{'N':>6} {'V':>7} {'H':>5} {'kind':>4} {'impl':>23} {'ms':>8} {'GiB':>6} {'vs kdlib':>8} "
              f"{'floor ms':>8}")
    print(header)
    for h in args.hidden:
        for v in args.vocab:
            for n in args.tokens:
                tflops = _matmul_tflops(n, v, h)
                floor_ms = 4 * 2 * n * v * h / tflops / 1e9
                x = _inputs(n, v, h)
                for kind in args.kinds:
                    results = {}
                    for name, fn in _impls(kind).items():
                        if args.impls and name not in args.impls:
                            continue
                        ms, gib = _measure(fn, x, args.rep_ms)
                        results[name] = ms
                        ours = results.get("kdlib")
                        ratio = f"{ms / ours:.2f}x" if ms and ours else "-"
                        ms_txt = f"{ms:.2f}" if ms else "OOM"
                        gib_txt = f"{gib:.2f}" if gib else "-"
                        print(f"{n:>6} {v:>7} {h:>5} {kind:>4} {name:>23} {ms_txt:>8} {gib_txt:>6} "
                              f"{ratio:>8} {floor_ms:>8.2f}", flush=True)
                        rows.append(dict(tokens=n, vocab=v, hidden=h, kind=kind, impl=name, ms=ms,
                                         extra_peak_gib=gib, floor_ms=floor_ms, matmul_tflops=tflops))
                        _write(args, rows, argv)  # after every row: a run cut short keeps its figures
                del x
                torch.cuda.empty_cache()
    print(f"wrote {args.json}")
    return 0


def _write(args, rows, argv):
    out = Path(args.json)
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = dict(device=torch.cuda.get_device_name(), torch=torch.__version__,
                python=platform.python_version(), triton=_version("triton"), liger=_version("liger-kernel"),
                argv=sys.argv[1:] if argv is None else argv)
    out.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))


if __name__ == "__main__":
    raise SystemExit(main())
