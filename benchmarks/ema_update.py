"""Benchmark: the EMA update over all parameters of a model — kdlib's native op (kdlib._C, called
through ``ema_update_(..., backend="native")``) vs ``torch._foreach_lerp_`` vs a naive per-tensor
loop (``e.mul_(d).add_(p, alpha=1 - d)``), in one run, on CPU and/or GPU.

Parameter sets have the tensor shapes of a GPT-style transformer (separate q/k/v/o weights and
biases, two LayerNorms and a 4x MLP per layer, embeddings): "10m" (d=256, 12 layers, 11.8M params)
and "100m" (d=768, 12 layers, 110M params), 196 tensors each. Each update reads ema and
params and writes ema: effective GB/s = 3 * bytes / time, shown next to the device's copy rate
measured in the same run (read + write of a large tensor), the floor for a memory-bound op.

GPU times: triton.testing.do_bench median (it flushes the L2 cache before each call); CPU times:
median of host-clock runs after warm-up. Inputs are random, never zeros.

    python benchmarks/ema_update.py --device all --models 10m 100m --dtypes fp32 bf16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MODELS = {"10m": dict(d=256, layers=12, vocab=8192), "100m": dict(d=768, layers=12, vocab=32000)}


def transformer_shapes(d: int, layers: int, vocab: int) -> list[tuple[int, ...]]:
    """Parameter shapes of a GPT-style model: embeddings, per layer attention + MLP + 2 norms, head norm."""
    shapes = [(vocab, d), (1024, d)]
    for _ in range(layers):
        shapes += [(d,), (d,)]  # norm 1
        shapes += [(d, d), (d,)] * 4  # q, k, v, o
        shapes += [(d,), (d,)]  # norm 2
        shapes += [(4 * d, d), (4 * d,), (d, 4 * d), (d,)]  # MLP
    return shapes + [(d,), (d,)]


def _make(shapes, dtype, device, seed=0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    ema = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    params = [torch.randn(s, generator=g).to(device=device, dtype=dtype) for s in shapes]
    return ema, params


def _impls(ema, params, decay):
    from kdlib import _ext
    from kdlib.kernels.ema import ema_update_

    def naive():
        for e, p in zip(ema, params):
            e.mul_(decay).add_(p, alpha=1.0 - decay)

    impls = {
        "torch._foreach_lerp_": lambda: torch._foreach_lerp_(ema, params, 1.0 - decay),
        "naive loop": naive,
    }
    device = ema[0].device.type
    if (_ext.has_cuda_ops() if device == "cuda" else _ext.native() is not None):
        impls = {"kdlib native": lambda: ema_update_(ema, params, decay, backend="native"), **impls}
    else:
        why = _ext.load_error() or "built without CUDA"
        print(f"kdlib._C has no {device} op here ({why}); timing the peers only", file=sys.stderr)
    return impls


def _time_ms(fn, device: str, reps: int) -> float:
    if device == "cuda":
        import triton.testing

        return triton.testing.do_bench(fn, warmup=50, rep=max(reps, 100), return_mode="median")
    for _ in range(3):
        fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def copy_rate_gbs(device: str, reps: int) -> float:
    """Measured read+write rate of a large device copy: the floor's bandwidth."""
    n = (1 << 28) if device == "cuda" else (1 << 26)  # 1 GiB / 256 MiB of fp32
    src = torch.randn(n, device=device)
    dst = torch.empty_like(src)
    ms = _time_ms(lambda: dst.copy_(src), device, reps)
    return 2 * src.numel() * src.element_size() / (ms * 1e-3) / 1e9


def run(device: str, models: list[str], dtypes: list[str], reps: int, decay: float) -> dict:
    rows = []
    copy_gbs = copy_rate_gbs(device, reps)
    for model in models:
        shapes = transformer_shapes(**MODELS[model])
        for dname in dtypes:
            ema, params = _make(shapes, DTYPES[dname], device)
            numel = sum(e.numel() for e in ema)
            nbytes = 3 * numel * ema[0].element_size()
            times = {name: _time_ms(fn, device, reps) for name, fn in _impls(ema, params, decay).items()}
            base = times["torch._foreach_lerp_"]
            for name, ms in times.items():
                rows.append(
                    dict(
                        device=device, model=model, dtype=dname, tensors=len(shapes), params=numel, impl=name,
                        ms=ms, gbs=nbytes / (ms * 1e-3) / 1e9, speedup_vs_foreach=base / ms,
                        floor_ms=nbytes / (copy_gbs * 1e9) * 1e3,
                    )
                )
            del ema, params
    return dict(copy_gbs=copy_gbs, rows=rows)


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda", "all"], default="all", help="all: cpu + cuda")
    ap.add_argument("--models", nargs="+", choices=sorted(MODELS), default=["10m", "100m"])
    ap.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["fp32", "bf16"])
    ap.add_argument("--reps", type=int, default=20, help="timed runs per case on CPU (min 100 ms on GPU)")
    ap.add_argument("--decay", type=float, default=0.999)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "ema_update.json")
    args = ap.parse_args(argv)

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu", "cuda"] if args.device == "all" else [args.device]
    devices = [d for d in devices if d == "cpu" or torch.cuda.is_available()]
    result = dict(torch=torch.__version__, date=time.strftime("%Y-%m-%d"), argv=sys.argv[1:], devices={})
    print(f"{'device':6} {'model':5} {'dtype':5} {'tensors':>7} {'params':>11} {'impl':22} "
          f"{'ms':>9} {'GB/s':>7} {'vs foreach':>10}")
    for device in devices:
        out = run(device, args.models, args.dtypes, args.reps, args.decay)
        out["name"] = _device_name(device)
        result["devices"][device] = out
        for r in out["rows"]:
            print(f"{r['device']:6} {r['model']:5} {r['dtype']:5} {r['tensors']:7d} {r['params']:11,d} "
                  f"{r['impl']:22} {r['ms']:9.3f} {r['gbs']:7.1f} {r['speedup_vs_foreach']:9.2f}x")
        print(f"{device}: {out['name']}; measured copy rate {out['copy_gbs']:.0f} GB/s "
              f"(floor = 3 x bytes / copy rate)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1))
    print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
