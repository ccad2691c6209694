"""Real handwritten digits, offline: scikit-learn's bundled copy of the UCI digits (1,797 8×8
grey images, 10 classes; ``sklearn.datasets.load_digits`` reads a file inside the package)."""

from __future__ import annotations

import torch

from kdlib.core.data import TensorDataset


def load_digits_splits(test_fraction: float, split_seed: int) -> dict[str, TensorDataset]:
    """``train`` / ``test`` splits, stratified by class and fixed by ``split_seed`` (independent of
    the training seeds, so every seed is scored on the same held-out images).

    x: [N, 1, 8, 8] float32 in [0, 1]; y: [N] int64 class ids.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.int64)
    g = torch.Generator().manual_seed(split_seed)
    test_index, train_index = [], []
    for c in range(10):
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        n_test = round(len(members) * test_fraction)
        test_index.append(members[:n_test])
        train_index.append(members[n_test:])
    # Shuffled so that any prefix of the training split (``train_limit``) mixes all classes.
    train = torch.cat(train_index)
    train = train[torch.randperm(len(train), generator=g)]
    test = torch.cat(test_index)
    return {"train": TensorDataset(x=x[train], y=y[train]), "test": TensorDataset(x=x[test], y=y[test])}


def random_shift(x: torch.Tensor, max_shift: int) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in each direction, filling with zeros.

    x: [B, C, H, W] -> [B, C, H, W]. Uses the global torch RNG (saved in checkpoints).
    """
    if max_shift <= 0:
        return x
    b, _, h, w = x.shape
    padded = torch.nn.functional.pad(x, (max_shift,) * 4)
    ys = torch.randint(0, 2 * max_shift + 1, (b, 1), device=x.device) + torch.arange(h, device=x.device)
    xs = torch.randint(0, 2 * max_shift + 1, (b, 1), device=x.device) + torch.arange(w, device=x.device)
    batch = torch.arange(b, device=x.device)[:, None, None]
    # Advanced indices around a slice put their dims first: [B, H, W, C] -> [B, C, H, W].
    return padded[batch, :, ys[:, :, None], xs[:, None, :]].permute(0, 3, 1, 2)
