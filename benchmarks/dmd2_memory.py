"""Benchmark: peak GPU memory of DMD2 training with the fake score as a full copy of the teacher vs
as a LoRA adapter on the frozen teacher that shares its weights (issue 7's memory goal: ≥ 30% less
peak training memory with a ≥ 100M-parameter model).

The model is kdlib's DiT (``kdlib.nn.dit``, domain-agnostic) at DiT-B/2's size: hidden 768, depth
12, 12 heads, patch 2, on latents [B, 4, 32, 32] (256 tokens), 1,000 classes: 130.3M parameters.
Teacher (frozen, ``--teacher-dtype``), student (a ``ConsistencyModel`` of a copy, fp32 master
weights) and the fake-score critic run DMD2 (``kdlib.methods.dmd2``; no GAN head: kdlib's GAN head
reads channels-second features, the DiT's are [B, N, C]) through kdlib's Trainer: AdamW, bf16
autocast on CUDA, ``--steps`` trainer steps with 2 critic updates per generator update, so the
generator and the critic both update (the first steps allocate the optimizer states, later ones
run with them). Per variant and batch size, ``torch.cuda.max_memory_allocated`` from the built
networks (weights resident; the peak counter is reset after building, so a build-time transient
such as the fp32 teacher before its bf16 cast does not count) to the end of the last step, less
what was allocated before the variant (cuBLAS's workspace): the steady training peak.

Where ``kdlib.core.memory`` exists, its estimate (the ``--dry-run`` figures: built on the meta
device, run on fake tensors, nothing allocated) is printed beside each measurement.

    python benchmarks/dmd2_memory.py                      # H200: both variants, well under 3 minutes
    python benchmarks/dmd2_memory.py --tiny --device cpu  # the code path on CPU (no peak to measure there)

Prints one JSON line per variant, then a markdown table, one row per batch size (``--batch``,
default 4 and 16: activations grow with the batch, weights and optimizer state do not, so the
reduction shrinks as the batch grows), with the reduction, and writes the JSON to ``--json``.
Exits 1 with a message when ``--device cuda`` and CUDA is not available.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from kdlib.core.data import TensorDataset  # noqa: E402
from kdlib.core.method import METHODS  # noqa: E402
from kdlib.core.models import Student, Teacher  # noqa: E402
from kdlib.core.run_config import TrainConfig  # noqa: E402
from kdlib.core.trainer import Trainer  # noqa: E402
from kdlib.diffusion.consistency import ConsistencyModel  # noqa: E402
from kdlib.diffusion.param import get_parameterisation  # noqa: E402
from kdlib.nn.dit import DiT, DiTConfig  # noqa: E402

GiB = 2**30
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SIZES = {  # DiT config, latent shape [C, H, W]
    "base": (dict(hidden=768, depth=12, heads=12), (4, 32, 32)),  # DiT-B/2: 130.3M parameters
    "tiny": (dict(hidden=64, depth=2, heads=4), (4, 8, 8)),
}


def build_method(size: str, fake_score: str, rank: int, teacher_dtype: torch.dtype, device: torch.device):
    """DMD2 on a DiT teacher with the fake score ``fake_score`` ("copy" | "lora", rank ``rank``);
    the student starts as the teacher (DMD2's initialisation). Works under ``torch.device("meta")``."""
    dit, (channels, _, _) = SIZES[size]
    with torch.device(device):  # initialised where it lives (no 130M-parameter CPU init and copy)
        net = DiT(DiTConfig(in_channels=channels, patch_size=2, num_classes=1000, **dit))
        student = Student(ConsistencyModel(copy.deepcopy(net), get_parameterisation("fm")))
    teacher = Teacher(net, device=device, dtype=teacher_dtype)
    cls = METHODS.get("dmd2")
    config = cls.Config(param="fm", gen_steps=1, critic_updates=2, fake_score=fake_score, lora_rank=rank)
    return cls(config, student, teacher)


def make_data(size: str, n: int) -> TensorDataset:
    shape = SIZES[size][1]
    g = torch.Generator().manual_seed(0)
    return TensorDataset(x=torch.randn(n, *shape, generator=g), y=torch.randint(0, 1000, (n,), generator=g))


def train_steps(method, data: TensorDataset, cfg: TrainConfig, device: torch.device) -> float:
    """``cfg.steps`` trainer steps (the body of ``Trainer.fit`` without its checkpoint); returns
    the mean wall time of the steps after the first, in ms."""
    with tempfile.TemporaryDirectory() as stage_dir:
        trainer = Trainer(method, data, cfg, stage_dir=stage_dir, seed=0)
        times = []
        for _ in range(cfg.steps):
            start = time.perf_counter()
            for group in method.update_groups(trainer.step):
                logged = trainer._update(group)
                if "skipped" in logged:
                    raise RuntimeError(f"non-finite {group} update: {logged}")
            trainer.step += 1
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        trainer.log.close()
    later = times[1:] or times
    return 1000 * sum(later) / len(later)


def estimate(size: str, fake_score: str, rank: int, teacher_dtype, device, data, cfg) -> dict | None:
    """The ``--dry-run`` estimator's figures (bytes), None where ``kdlib.core.memory`` is absent,
    {"error": ...} where it fails (the measurement is this benchmark's result, not the estimate)."""
    try:
        from kdlib.core.memory import estimate_training
    except ImportError:
        return None
    # Built on the meta device (as ``kdlib distill --dry-run`` does), estimated for ``device``.
    meta = torch.device("meta")
    try:
        stage = estimate_training(lambda: build_method(size, fake_score, rank, teacher_dtype, meta), data, cfg,
                                  device=device, name=fake_score)
    except Exception as exc:  # noqa: BLE001 - reported beside the measurement
        return {"error": f"{type(exc).__name__}: {exc}"}
    rows = {n.name: {"params": n.params, "shared": n.shared, "weights": n.weights, "grads": n.grads,
                     "optimizer": n.optimizer} for n in stage.networks}
    return {"peak": stage.peak, "weights": stage.weights, "grads": stage.grads, "optimizer": stage.optimizer,
            "activations": max(stage.activations.values(), default=0), "networks": rows, "note": stage.note}


def run_variant(args, fake_score: str, batch: int, device: torch.device) -> dict:
    teacher_dtype = DTYPES[args.teacher_dtype]
    data = make_data(args.size, 4 * batch)
    cfg = TrainConfig(steps=args.steps, batch_size=batch, lr=1e-5, schedule="constant", progress=False,
                      checkpoint_every=10**9, log_every=10**9, device=str(device))
    cuda = device.type == "cuda"
    if cuda:
        gc.collect()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    torch.manual_seed(0)
    method = build_method(args.size, fake_score, args.lora_rank, teacher_dtype, device)
    resident = torch.cuda.memory_allocated(device) - base if cuda else None
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    critic = method.critic
    step_ms = train_steps(method, data, cfg, device)
    peak = torch.cuda.max_memory_allocated(device) - base if cuda else None
    result = {
        "fake_score": fake_score, "batch": batch, "lora_rank": args.lora_rank if fake_score == "lora" else None,
        "teacher_params": sum(p.numel() for p in method.teacher.parameters()),
        "critic_trainable_params": sum(p.numel() for p in critic.parameters() if p.requires_grad),
        "resident_bytes": resident, "peak_bytes": peak, "step_ms": round(step_ms, 2),
    }
    del method, critic
    result["estimate"] = estimate(args.size, fake_score, args.lora_rank, teacher_dtype, device, data, cfg)
    return result


def gib(n: int | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f}"


def estimate_text(r: dict) -> str:
    """The estimate in GiB and its ratio to the measured peak."""
    est = r["estimate"]
    if est is None:
        return "no estimator"
    if "error" in est:
        return "estimator failed"
    ratio = f" ({est['peak'] / r['peak_bytes']:.2f}×)" if r["peak_bytes"] else ""
    return f"{gib(est['peak'])}{ratio}"


def markdown_row(args, device_name: str, copy_r: dict, lora_r: dict) -> str:
    """| model, device | setting | copy peak | LoRA peak | reduction | estimates (est/measured) | step ms |"""
    reduction = (f"**{100 * (1 - lora_r['peak_bytes'] / copy_r['peak_bytes']):.1f}%**"
                 if copy_r["peak_bytes"] and lora_r["peak_bytes"] else "not measurable on CPU")
    return (f"| DiT {copy_r['teacher_params'] / 1e6:.1f}M ({args.size}), {device_name} | {args.teacher_dtype} teacher, "
            f"B={copy_r['batch']}, {args.steps} steps | {gib(copy_r['peak_bytes'])} | {gib(lora_r['peak_bytes'])} "
            f"(r={args.lora_rank}) | {reduction} | {estimate_text(copy_r)} / {estimate_text(lora_r)} "
            f"| {copy_r['step_ms']} / {lora_r['step_ms']} |")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda (default; the measurement) or cpu (the code path)")
    ap.add_argument("--tiny", action="store_true", help="a tiny DiT and latent (a quick check of the code path)")
    ap.add_argument("--batch", type=int, nargs="+", default=[4, 16], help="batch sizes: one row each")
    ap.add_argument("--steps", type=int, default=4, help="trainer steps (the generator updates every 2nd)")
    ap.add_argument("--lora-rank", type=int, default=None, help="LoRA rank (default 64; 4 with --tiny)")
    ap.add_argument("--teacher-dtype", choices=sorted(DTYPES), default="bf16")
    ap.add_argument("--json", type=Path, default=ROOT / "results" / "dmd2_memory.json")
    args = ap.parse_args(argv)
    args.size = "tiny" if args.tiny else "base"
    args.lora_rank = args.lora_rank or (4 if args.tiny else 64)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("dmd2_memory: CUDA is not available on this machine; this benchmark measures GPU memory "
              "(torch.cuda.max_memory_allocated). Run it on a GPU, or check the code path with "
              "--tiny --device cpu.", file=sys.stderr)
        sys.exit(1)
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    if device.type != "cuda":
        print("dmd2_memory: peak memory is not measurable on CPU (no allocator statistics): running the "
              "steps and the estimator only", file=sys.stderr)
    else:  # cuBLAS's workspace, made at the first matmul, then sits in both variants' baseline
        torch.ones(64, 64, device=device) @ torch.ones(64, 64, device=device)
        torch.cuda.synchronize(device)

    results, rows = [], []
    for batch in args.batch:
        pair = {}
        for fake_score in ("copy", "lora"):
            pair[fake_score] = run_variant(args, fake_score, batch, device)
            print(json.dumps({"variant": fake_score, **pair[fake_score]}), flush=True)
        results.append(pair)
        rows.append(markdown_row(args, device_name, pair["copy"], pair["lora"]))
    print("| model, device | setting | copy peak GiB | LoRA peak GiB | reduction | estimate copy / LoRA GiB "
          "(est/measured) | step ms copy / LoRA |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    print("\n".join(rows))
    out = {"device": device_name, "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
           "command": " ".join(sys.argv), "args": {k: str(v) for k, v in vars(args).items()},
           "results": results, "markdown": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1))
    print(f"wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
