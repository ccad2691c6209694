"""A plain PNG grid of grey or colour images, for shapes the digit report does not cover."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch


def save_grid(path: Path, images: torch.Tensor, columns: int = 10, scale: int = 2) -> Path:
    """images: [N, C, H, W] in [-1, 1], C = 1 or 3 -> one PNG, ``columns`` per row, upscaled."""
    from PIL import Image

    n, c, h, w = images.shape
    rows = -(-n // columns)
    canvas = torch.zeros(c, rows * h, columns * w)
    for i, image in enumerate(images.clamp(-1, 1).cpu().float()):
        r, k = divmod(i, columns)
        canvas[:, r * h:(r + 1) * h, k * w:(k + 1) * w] = image
    array = ((canvas + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    picture = Image.fromarray(array[..., 0] if c == 1 else np.ascontiguousarray(array))
    picture = picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST)
    path.parent.mkdir(parents=True, exist_ok=True)
    picture.save(path)
    return path
