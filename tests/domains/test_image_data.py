"""Data of the generative image domain beyond MNIST: OpenCV's digits.png layout, a user's image
folder, photo patches split by whole photo, and the errors that stop a run before training."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from domains.image.gen import ImageGenDataConfig, ImageGenDomain, ImageGenModelConfig, check_teacher_checkpoint
from domains.image.gen_data import load_gen_splits
from domains.image.gen_models import MLPDenoiser
from domains.image.gen_sources import DataError, find_opencv_digits, load_image_folder, load_opencv_digits
from kdlib.core.checkpoint import save_weights


def synthetic_digits(path):
    """digits.png's layout: 50 rows × 100 columns of 20×20 cells, 5 rows per class; each cell
    holds its class as grey level 20·c in a 10×10 centre square and its column in pixel (0, 0)."""
    grid = np.zeros((1000, 2000), dtype=np.uint8)
    for row in range(50):
        for col in range(100):
            cell = grid[row * 20:(row + 1) * 20, col * 20:(col + 1) * 20]
            cell[5:15, 5:15] = 20 * (row // 5) + 10
            cell[0, 0] = col
    Image.fromarray(grid).save(path)
    return path


def test_opencv_digits_layout(tmp_path):
    x, y = load_opencv_digits(str(synthetic_digits(tmp_path / "digits.png")))
    assert x.shape == (5000, 1, 28, 28) and torch.bincount(y).tolist() == [500] * 10
    grey = ((x + 1) * 127.5).round()
    # class c's cells carry 20·c + 10 in their centre, padded by 4 px of black to 28×28
    assert torch.equal(grey[:, 0, 14, 14], (20 * y + 10).float())
    assert grey[:, 0, :4].max() == 0 and grey[:, 0, :, -4:].max() == 0
    # row-major: consecutive digits walk along a row of 100 columns
    assert grey[:100, 0, 4, 4].tolist() == list(range(100))


def test_real_opencv_digits_when_installed():
    try:
        path = find_opencv_digits()
    except DataError:
        pytest.skip("digits.png not fetched (bash domains/image/fetch_data.sh)")
    x, y = load_opencv_digits(str(path))
    assert x.shape == (5000, 1, 28, 28) and x.min() == -1 and x.max() == 1
    centre, border = x[:, :, 4:24, 4:24].mean(), x[:, :, :4].mean()
    assert centre > border  # white strokes on black, inside the 20×20 box


def test_missing_digits_names_the_fetch_script(tmp_path, monkeypatch):
    monkeypatch.setenv("KDLIB_DATA_DIR", str(tmp_path))
    monkeypatch.setattr("domains.image.gen_sources.SYSTEM_DIGITS", tmp_path / "nowhere.png")
    with pytest.raises(DataError, match="fetch_data.sh"):
        load_opencv_digits()


def write_pngs(folder, count, size=(12, 10), mode="RGB", value=100):
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.new(mode, size, color=(value + i,) * (3 if mode == "RGB" else 1)).save(folder / f"{i}.png")


def test_image_folder_with_classes_is_resized(tmp_path):
    write_pngs(tmp_path / "cats", 3, value=10)
    write_pngs(tmp_path / "dogs", 4, mode="L", value=200)
    x, y, classes = load_image_folder(tmp_path, (3, 8, 8))
    assert classes == ["cats", "dogs"] and x.shape == (7, 3, 8, 8) and y.tolist() == [0, 0, 0, 1, 1, 1, 1]
    assert x.min() >= -1 and x.max() <= 1
    torch.testing.assert_close(x[0], torch.full((3, 8, 8), 10 / 127.5 - 1))
    grey, y_none, none = load_image_folder(tmp_path / "dogs", (1, 4, 4))
    assert grey.shape == (4, 1, 4, 4) and none == [] and y_none.tolist() == [-1] * 4
    splits = load_gen_splits(ImageGenDataConfig(folder=str(tmp_path), test_fraction=0.3), (3, 8, 8))
    assert len(splits["train"]) + len(splits["test"]) == 7 and set(splits["test"].tensors["y"].tolist()) == {0, 1}


def test_image_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "notes.txt").write_text("no images here")
    with pytest.raises(DataError, match="no images"):
        load_image_folder(tmp_path / "empty", (1, 8, 8))
    write_pngs(tmp_path / "bad", 2)
    (tmp_path / "bad" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(DataError, match="unreadable.*broken.png"):
        load_image_folder(tmp_path / "bad", (1, 8, 8))
    with pytest.raises(DataError, match="channels"):
        load_image_folder(tmp_path / "bad", (4, 8, 8))


def test_photo_patches_split_by_whole_photo():
    pytest.importorskip("skimage")
    cfg = ImageGenDataConfig(source="photos", test_photos=["coffee", "flower"], patch_short_side=64, patch_stride=32)
    from domains.image.gen_sources import load_photo_splits

    parts = load_photo_splits(cfg.test_photos, 32, cfg.patch_short_side, cfg.patch_stride)
    train, test = parts["train"], parts["test"]
    assert train["x"].shape[1:] == (3, 32, 32) and len(test["x"]) > 0
    assert not set(train["photo"].tolist()) & set(test["photo"].tolist())
    flat = {tuple(v) for v in train["x"].flatten(1).round(decimals=3).tolist()}
    assert not any(tuple(v) in flat for v in test["x"].flatten(1).round(decimals=3).tolist())
    with pytest.raises(DataError, match="some, not all"):
        load_photo_splits(["no-such-photo"], 32, 64, 32)


def test_shape_errors_before_training(tmp_path):
    # MNIST is 1×28×28: a recipe asking for 3×32×32 stops with both shapes named
    with pytest.raises(DataError, match=r"\(3, 32, 32\).*\(1, 28, 28\)"):
        load_gen_splits(ImageGenDataConfig(source="mnist"), (3, 32, 32))
    with pytest.raises(DataError, match=r"\(3, S, S\)"):
        load_gen_splits(ImageGenDataConfig(source="photos"), (1, 32, 32))
    # a 1×28×28 teacher checkpoint cannot serve 3×8×8 images
    path = tmp_path / "teacher.safetensors"
    save_weights(path, MLPDenoiser(hidden=16, blocks=1), metadata={"param": "fm"})
    domain = ImageGenDomain(ImageGenDataConfig(folder=str(tmp_path)), ImageGenModelConfig(image_shape=[3, 8, 8],
                                                                                       hidden=16, blocks=1))
    with pytest.raises(DataError, match=r"image_shape=\[3, 8, 8\].*inp.weight"):
        domain.load_teacher_weights(domain.build_teacher(), str(path))


def test_checkpoint_parameterisation_mismatch(tmp_path):
    path = tmp_path / "teacher.safetensors"
    save_weights(path, MLPDenoiser(hidden=16, blocks=1), metadata={"param": "fm"})
    with pytest.raises(ValueError, match="param='fm'.*model.param='edm'"):
        check_teacher_checkpoint(path, "edm", MLPDenoiser(hidden=16, blocks=1, parameterisation="edm"))
