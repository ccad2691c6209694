import torch

from domains.image import ImageDataConfig, ImageDomain, ImageModelConfig
from domains.image.data import load_digits_splits, random_shift


def test_digits_load_offline_with_disjoint_stratified_splits():
    splits = load_digits_splits(0.3, split_seed=0)
    train, test = splits["train"], splits["test"]
    assert len(train) + len(test) == 1797
    assert train.tensors["x"].shape[1:] == (1, 8, 8) and 0 <= train.tensors["x"].min() and train.tensors["x"].max() <= 1
    # stratified: every class is ~30% test
    for c in range(10):
        n_test = int((test.tensors["y"] == c).sum())
        n_all = n_test + int((train.tensors["y"] == c).sum())
        assert abs(n_test / n_all - 0.3) < 0.01
    # disjoint: no image appears in both splits
    a = {tuple(r.tolist()) for r in train.tensors["x"].flatten(1)}
    b = [tuple(r.tolist()) for r in test.tensors["x"].flatten(1)]
    assert sum(r in a for r in b) < 0.02 * len(b)  # the raw data holds a few exact duplicates


def test_random_shift_moves_content_within_bounds():
    torch.manual_seed(0)
    x = torch.rand(64, 1, 8, 8) + 0.1
    assert torch.equal(random_shift(x, 0), x)
    y = random_shift(x, 1)
    assert y.shape == x.shape
    for i in range(64):  # each output is the input shifted by some (dy, dx) in [-1, 1]^2
        padded = torch.nn.functional.pad(x[i], (1, 1, 1, 1))
        assert any(torch.equal(y[i], padded[:, dy:dy + 8, dx:dx + 8]) for dy in range(3) for dx in range(3))
    assert not torch.equal(y, x)


def test_teacher_is_much_bigger_than_student():
    d = ImageDomain(ImageDataConfig(), ImageModelConfig())
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(d.build_teacher()) > 20 * n(d.build_student())
    assert d.build_teacher()(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_train_limit_keeps_every_class():
    d = ImageDomain(ImageDataConfig(train_limit=100), ImageModelConfig())
    y = d.datasets()["train"].tensors["y"]
    assert len(y) == 100 and set(y.tolist()) == set(range(10))
