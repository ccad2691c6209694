"""Benchmark: kdlib block-sparse attention vs dense SDPA vs PyTorch FlexAttention with the very
same block mask, in one run on one GPU.

    python benchmarks/block_sparse_attention.py                  # the issue's grid (GPU)
    python benchmarks/block_sparse_attention.py --ns 32768 --ds 128 --densities 0.1 1.0
    python benchmarks/block_sparse_attention.py --sweep          # tile-config sweep for the tables

For every (N, D, mask): forward and forward+backward times of kdlib, dense SDPA (whatever backend
PyTorch picks: cuDNN / flash) and FlexAttention (``torch.compile``d, given our mask as a
``BlockMask`` whose selected blocks are all "full", Flex's fastest path); the ideal (dense time ×
density); and the mask→layout time (``block_layout``) as a share of kdlib's kernel time. Masks:
random per head at the given densities, the sliding tile window of a video grid (T, 64, 64) with
(2, 8, 8) tiles and a 3×3×3 window, and Video-BLADE's adaptive selection (keep 10%) on the inputs.
B=1, H=16, bf16, 128×128 blocks by default.
"""

# ruff: noqa: B023  (the sweep's closures are timed inside the loop that defines them)

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdlib.kernels.block_layout import block_layout  # noqa: E402
from kdlib.kernels.block_sparse_attention import block_sparse_attention  # noqa: E402
from kdlib.kernels.masks import adaptive_block_mask, tile_window_mask  # noqa: E402


def bench_ms(fn, grad_to_none=None) -> float:
    import triton.testing

    return triton.testing.do_bench(fn, warmup=10, rep=60, grad_to_none=grad_to_none, return_mode="median")


def flex_block_mask(layout, n: int, block: int):
    """Our layout as a FlexAttention BlockMask: every selected block is "full" (no mask_mod)."""
    from torch.nn.attention.flex_attention import BlockMask

    none = torch.zeros_like(layout.kv_count)
    return BlockMask.from_kv_blocks(
        none, layout.kv_index, layout.kv_count, layout.kv_index, BLOCK_SIZE=block, seq_lengths=(n, n)
    )


def make_masks(q, k, n, block, densities, heads):
    m = -(-n // block)
    g = torch.Generator(device="cuda").manual_seed(n)
    masks = {}
    for p in densities:
        masks[f"random {p:g}"] = torch.rand(1, heads, m, m, device="cuda", generator=g) < p
    if n % (64 * 64 * 2) == 0 and block == 128:
        grid = (n // (64 * 64), 64, 64)
        masks["tile-window 3x3x3"] = tile_window_mask(grid, (2, 8, 8), (3, 3, 3), device="cuda")
    masks["adaptive keep 0.1"] = adaptive_block_mask(q, k, block_size=block, keep=0.1)
    return masks


def bench_shape(n, d, heads, block, densities, flex_fn) -> list[dict]:
    shape = (1, heads, n, d)
    g = torch.Generator(device="cuda").manual_seed(n + d)
    q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]

    def fwd_bwd(fn):
        def run():
            fn(*leaves).backward(do)
        return run

    def sdpa(a, b, c):
        return F.scaled_dot_product_attention(a, b, c)

    dense_fwd = bench_ms(lambda: sdpa(q, k, v))
    dense_fb = bench_ms(fwd_bwd(sdpa), grad_to_none=leaves)
    rows = []
    for name, mask in make_masks(q, k, n, block, densities, heads).items():
        density = mask.float().mean().item()
        layout = block_layout(mask, block)
        row = {"N": n, "D": d, "H": heads, "block": block, "mask": name, "density": density,
               "sdpa_fwd_ms": dense_fwd, "sdpa_fwd_bwd_ms": dense_fb,
               "ideal_fwd_x": 1 / max(density, 1e-9)}

        def ours(a, b, c, layout=layout):
            return block_sparse_attention(a, b, c, layout)

        row["kdlib_fwd_ms"] = bench_ms(lambda: ours(q, k, v))
        row["kdlib_fwd_bwd_ms"] = bench_ms(fwd_bwd(ours), grad_to_none=leaves)
        row["layout_ms"] = bench_ms(lambda mask=mask: block_layout(mask, block))
        row["layout_share_fwd"] = row["layout_ms"] / row["kdlib_fwd_ms"]
        row["layout_share_fwd_bwd"] = row["layout_ms"] / row["kdlib_fwd_bwd_ms"]
        if flex_fn is not None:
            bm = flex_block_mask(layout, n, block)

            def flex(a, b, c, bm=bm):
                return flex_fn(a, b, c, block_mask=bm)

            try:
                row["flex_fwd_ms"] = bench_ms(lambda: flex(q, k, v))
                row["flex_fwd_bwd_ms"] = bench_ms(fwd_bwd(flex), grad_to_none=leaves)
            except Exception as exc:  # noqa: BLE001  (report, keep benchmarking the rest)
                row["flex_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
        for what in ("fwd", "fwd_bwd"):
            row[f"kdlib_{what}_x_sdpa"] = row[f"sdpa_{what}_ms"] / row[f"kdlib_{what}_ms"]
            if f"flex_{what}_ms" in row:
                row[f"flex_{what}_x_sdpa"] = row[f"sdpa_{what}_ms"] / row[f"flex_{what}_ms"]
                row[f"kdlib_{what}_x_flex"] = row[f"flex_{what}_ms"] / row[f"kdlib_{what}_ms"]
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


SWEEP = {
    "fwd": [(128, 64, 8, 3), (128, 64, 8, 2), (128, 128, 8, 2), (128, 32, 8, 3), (128, 64, 4, 3),
            (64, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 3), (128, 64, 8, 4)],
    "dkdv": [(128, 32, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 3),
             (64, 32, 4, 3), (128, 64, 8, 3), (128, 16, 8, 3)],
    "dq": [(128, 32, 8, 2), (128, 32, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (128, 32, 4, 3),
           (64, 32, 4, 3), (128, 64, 8, 3), (128, 16, 8, 3)],
}


def sweep(n, ds, heads, block, density) -> list[dict]:
    from kdlib.kernels.triton import block_sparse_attention as kernels

    rows = []
    for d in ds:
        shape = (1, heads, n, d)
        q, k, v, do = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(4))
        m = -(-n // block)
        layout = block_layout(torch.rand(1, heads, m, m, device="cuda") < density, block)
        lay = (layout.kv_count, layout.kv_index, layout.q_count, layout.q_index)
        out, lse2 = kernels.forward(q, k, v, lay[0], lay[1], (block, block), d**-0.5)
        for part, configs in SWEEP.items():
            for cfg in configs:
                if part == "fwd":
                    def run(cfg=cfg):
                        kernels.forward(q, k, v, lay[0], lay[1], (block, block), d**-0.5, config=cfg)
                else:
                    extra = {"dkdv_config": cfg} if part == "dkdv" else {"dq_config": cfg}

                    def run(extra=extra):
                        kernels.backward(do, q, k, v, out, lse2, *lay, (block, block), d**-0.5, **extra)
                row = {"N": n, "D": d, "density": density, "part": part, "config": cfg}
                try:
                    row["ms"] = bench_ms(run)
                except Exception as exc:  # noqa: BLE001  (out of shared memory for this config)
                    row["error"] = type(exc).__name__
                print(json.dumps(row), flush=True)
                rows.append(row)
    return rows


def fmt(x, spec=".2f"):
    return format(x, spec) if isinstance(x, float) else ("-" if x is None else str(x))


def table(rows) -> str:
    head = ("| N | D | mask | density | SDPA fwd ms | kdlib fwd ms | Flex fwd ms | kdlib fwd × SDPA | "
            "Flex fwd × SDPA | ideal × | SDPA f+b ms | kdlib f+b ms | Flex f+b ms | kdlib f+b × SDPA | "
            "Flex f+b × SDPA | layout % of fwd |")
    lines = [head, "|" + " --- |" * (head.count("|") - 1)]
    for r in rows:
        lines.append(
            f"| {r['N']} | {r['D']} | {r['mask']} | {r['density']:.3f} | {fmt(r['sdpa_fwd_ms'])} | "
            f"{fmt(r['kdlib_fwd_ms'])} | {fmt(r.get('flex_fwd_ms'))} | {fmt(r['kdlib_fwd_x_sdpa'])} | "
            f"{fmt(r.get('flex_fwd_x_sdpa'))} | {fmt(r['ideal_fwd_x'], '.1f')} | {fmt(r['sdpa_fwd_bwd_ms'])} | "
            f"{fmt(r['kdlib_fwd_bwd_ms'])} | {fmt(r.get('flex_fwd_bwd_ms'))} | {fmt(r['kdlib_fwd_bwd_x_sdpa'])} | "
            f"{fmt(r.get('flex_fwd_bwd_x_sdpa'))} | {100 * r['layout_share_fwd']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ns", type=int, nargs="+", default=[8192, 16384, 32768, 65536])
    parser.add_argument("--ds", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--densities", type=float, nargs="+", default=[0.05, 0.1, 0.2, 0.5, 1.0])
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--block", type=int, default=128)
    parser.add_argument("--no-flex", action="store_true", help="skip FlexAttention")
    parser.add_argument("--sweep", action="store_true", help="time tile-config candidates instead")
    parser.add_argument("--json", default="benchmarks/results/block_sparse_attention.json")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("block_sparse_attention benchmark: needs a CUDA GPU", file=sys.stderr)
        return 1

    device = torch.cuda.get_device_name()
    print(f"# {device}, torch {torch.__version__}", flush=True)
    command = " ".join(["python benchmarks/block_sparse_attention.py", *sys.argv[1:]])
    result = {"device": device, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "command": command}
    if args.sweep:
        result["sweep"] = sweep(args.ns[0], args.ds, args.heads, args.block, args.densities[0])
    else:
        rows = []
        for n in args.ns:
            for d in args.ds:
                flex_fn = None
                if not args.no_flex:
                    from torch.nn.attention.flex_attention import flex_attention

                    # A fresh compile per shape: past dynamo's recompile limit (8 by default) a
                    # shared compiled function silently falls back to eager flex_attention, which
                    # materialises the N×N scores (100× slower at 16k, out of memory at 32k).
                    torch._dynamo.reset()
                    flex_fn = torch.compile(flex_attention, dynamic=False)
                rows.extend(bench_shape(n, d, args.heads, args.block, args.densities, flex_fn))
                torch.cuda.empty_cache()
        result["rows"] = rows
        print(table(rows))
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
