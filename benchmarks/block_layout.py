"""Benchmark: the native block-sparse layout ops (kdlib._C) against their PyTorch reference.

    python benchmarks/block_layout.py          # = kdlib bench block-layout

For 10% random masks / random scores of shape [1, 16, M, M]: ``block_layout`` and
``select_blocks`` (ratio 0.1 and mass 0.9), eager and as CUDA-graph replay, against
``kdlib.kernels.reference.block_layout``; then single rows of growing length (the shared-memory
sort, its opt-in past 4096 blocks, the counting fallback past 16384).
"""

# ruff: noqa: B023  (each closure is timed inside the loop iteration that defines it)

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from kdlib import _ext  # noqa: E402
from kdlib.kernels.block_layout import block_layout, select_blocks  # noqa: E402
from kdlib.kernels.reference.block_layout import layout_reference, select_blocks_reference  # noqa: E402


def graph_ms(fn) -> float:
    """Kernel time without Python overhead: fn captured in a CUDA graph, replay timed."""
    from triton.testing import do_bench

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up outside the capture (allocator, lazy init)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=25, rep=200)


def main(argv: list[str] | None = None) -> int:
    if not torch.cuda.is_available() or not _ext.has_cuda_ops():
        print("block_layout benchmark: needs a CUDA GPU and kdlib._C built with CUDA", file=sys.stderr)
        return 1
    from triton.testing import do_bench

    print(f"# {torch.cuda.get_device_name()}, torch {torch.__version__}; times in ms")
    for m in (256, 512, 1024, 4096):
        shape = (1, 16, m, m)
        mask = torch.rand(shape, device="cuda") < 0.1
        scores = torch.randn(shape, device="cuda")
        row = {
            "layout eager": do_bench(lambda: block_layout(mask), warmup=25, rep=200),
            "layout graph": graph_ms(lambda: block_layout(mask)),
            "layout ref": do_bench(lambda: layout_reference(mask), warmup=5, rep=50),
        }
        for mode, keep in (("ratio", 0.1), ("mass", 0.9)):
            row[f"select {mode} graph"] = graph_ms(lambda: select_blocks(scores, keep, mode=mode))
            row[f"select {mode} ref"] = do_bench(
                lambda: select_blocks_reference(scores, keep, mode=mode), warmup=5, rep=50
            )
        print(f"{shape}: " + " | ".join(f"{k} {v:.4f}" for k, v in row.items()), flush=True)
    for mk in (2048, 4097, 8192, 16384, 20000):
        scores = torch.randn(1, 1, 64, mk, device="cuda")
        ratio = graph_ms(lambda: select_blocks(scores, 0.1))
        mass = graph_ms(lambda: select_blocks(scores, 0.9, mode="mass"))
        print(f"select, 64 rows of {mk} blocks: ratio {ratio:.4f}, mass {mass:.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
