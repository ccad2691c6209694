"""Sample quality for images that are not 28×28 digits (photo patches, a user's folder), where
the project has no trained feature network: statistics of block-averaged pixels.

Features: the image average-pooled to at most 8×8 (each block's mean colour), flattened — no
learnt features, so "FD-pixels"/"KID-pixels" measure colour layout and coarse structure only and
are comparable only with each other. Also improved precision/recall (k = 3) and diversity.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from kdlib.metrics import diversity, frechet_distance, kernel_inception_distance, precision_recall


def pixel_features(x: torch.Tensor, grid: int = 8) -> torch.Tensor:
    """x: [N, C, H, W] in [-1, 1] -> [N, C·g·g] block means, g = min(grid, H, W)."""
    g = min(grid, x.shape[-2], x.shape[-1])
    return F.adaptive_avg_pool2d(x.float(), g).flatten(1)


class PixelScorer:
    """Scores samples [N, C, H, W] in [-1, 1] against the real images of a held-out split."""

    def __init__(self, real: torch.Tensor):
        # The Fréchet distance needs a full-rank covariance: fewer feature dimensions than real
        # images (a small held-out folder gets a coarser grid).
        c = real.shape[1]
        self.grid = 8
        while self.grid > 1 and c * self.grid**2 >= real.shape[0]:
            self.grid //= 2
        self.real = pixel_features(real, self.grid)

    @torch.no_grad()
    def score(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        feats = pixel_features(samples.clamp(-1, 1), self.grid)
        precision, recall = precision_recall(self.real, feats)
        return {
            "fd_pixels": frechet_distance(self.real, feats),
            "kid_pixels": kernel_inception_distance(self.real, feats),
            "precision": precision,
            "recall": recall,
            "diversity": diversity(feats),
        }
