"""Reproduce the shipped flow-matching teacher ``assets/mnist_fm_teacher.safetensors``:

    python -m domains.image.train_teacher [--steps 8000] [--out PATH] [--network dit]

Trains the ``image-gen`` domain's teacher network with the ``flow_matching`` method on the
training split only (same split as every recipe), keeps an EMA (0.999) and writes the EMA weights
in float16 (half the file size; the domain loads them into float32). About 8 minutes on one idle
CPU core. ``--network dit`` trains the domain's DiT denoiser instead (``model.network=dit``, its
default width/depth/heads/patch size) — a GPU-sized job: run recipes with it as
``model.network=dit teacher.path=<the file>``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file

from domains.image.gen import ASSET_DIR, ImageGenDataConfig, ImageGenDomain, ImageGenModelConfig
from kdlib.core.models import Student
from kdlib.core.run_config import TrainConfig
from kdlib.core.trainer import Trainer
from kdlib.methods.flow_matching import FlowMatching, FlowMatchingConfig


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8000)
    parser.add_argument("--out", default=None, help="default: the shipped asset (mlp) or assets/mnist_fm_dit_teacher")
    parser.add_argument("--network", choices=["mlp", "dit"], default="mlp")
    args = parser.parse_args(argv)
    if args.out is None:
        name = "mnist_fm_teacher" if args.network == "mlp" else "mnist_fm_dit_teacher"
        args.out = str(ASSET_DIR / f"{name}.safetensors")
    torch.manual_seed(0)
    domain = ImageGenDomain(ImageGenDataConfig(), ImageGenModelConfig(network=args.network))
    student = Student(domain.build_teacher(), ema_decays=[0.999])
    method = FlowMatching(FlowMatchingConfig(), student, None)
    cfg = TrainConfig(steps=args.steps, batch_size=128, lr=2e-3, warmup_steps=200, ema_decays=[0.999],
                      checkpoint_every=args.steps, log_every=500, progress=False)
    with tempfile.TemporaryDirectory() as tmp:
        Trainer(method, domain.datasets()["train"], cfg, stage_dir=Path(tmp), seed=0,
                description="teacher").fit()
    state = {k: v.detach().half().contiguous() for k, v in student.ema[0].state_dict().items()}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"param": "fm", "network": args.network,
                                         "recipe": f"python -m domains.image.train_teacher --network {args.network}"})
    print(f"wrote {out}")
    return out


if __name__ == "__main__":
    main()
