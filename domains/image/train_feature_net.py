"""Reproduce ``assets/fd_digits_classifier.safetensors``, the feature network of FD-digits:

    python -m domains.image.train_feature_net [--steps 1500] [--out PATH]

A small CNN (``DigitFeatureNet``) trained as a digit classifier on the ``image-gen`` training
split only (random shifts of up to 2 pixels); the held-out test digits are never seen, so FD-digits
between generated samples and the test split is an honest held-out score. About a minute on CPU.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from domains.image.data import random_shift
from domains.image.gen import ASSET_DIR
from domains.image.gen_data import load_mnist_splits
from domains.image.gen_models import DigitFeatureNet
from kdlib.core.checkpoint import save_weights


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--out", default=str(ASSET_DIR / "fd_digits_classifier.safetensors"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    splits = load_mnist_splits(100, 0)
    train, test = splits["train"].tensors, splits["test"].tensors
    net = DigitFeatureNet()
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=args.steps)
    for _ in range(args.steps):
        index = torch.randint(0, len(train["x"]), (128,))
        x = random_shift(train["x"][index] + 1.0, 2) - 1.0  # shift with background (-1) fill
        loss = torch.nn.functional.cross_entropy(net(x), train["y"][index])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    net.eval()
    with torch.no_grad():
        accuracy = (net(test["x"]).argmax(-1) == test["y"]).double().mean().item()
    out = save_weights(args.out, net, metadata={"test_accuracy": f"{accuracy:.4f}",
                                               "recipe": "python -m domains.image.train_feature_net"})
    print(f"held-out accuracy {accuracy:.4f}; wrote {out}")
    return out


if __name__ == "__main__":
    main()
