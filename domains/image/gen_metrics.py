"""Sample quality of generated digits, scored against held-out real digits.

Features come from ``DigitFeatureNet``, a small classifier the project trains on the training
split (``python -m domains.image.train_feature_net``), not from Inception: the metrics are named
after it — "FD-digits", "KID-digits" — and are comparable only with each other. Also reported:
improved precision/recall (k = 3), diversity (mean pairwise feature distance) and class accuracy
(how often the feature classifier reads the digit the sample was conditioned on).
"""

from __future__ import annotations

from pathlib import Path

import torch

from domains.image.gen_models import DigitFeatureNet
from kdlib.core.checkpoint import load_weights
from kdlib.metrics import diversity, frechet_distance, kernel_inception_distance, precision_recall


class DigitsScorer:
    """Scores samples [N, 1, 28, 28] in [-1, 1] against the real images of a held-out split."""

    def __init__(self, weights: str | Path, real: torch.Tensor):
        self.net = load_weights(DigitFeatureNet(), weights).eval().to(real.device)
        self.real = self.features(real)

    @torch.no_grad()
    def features(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.net.features(chunk) for chunk in x.split(1000)])

    @torch.no_grad()
    def score(self, samples: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, float]:
        samples = samples.clamp(-1, 1)
        feats = self.features(samples)
        precision, recall = precision_recall(self.real, feats)
        out = {
            "fd_digits": frechet_distance(self.real, feats),
            "kid_digits": kernel_inception_distance(self.real, feats),
            "precision": precision,
            "recall": recall,
            "diversity": diversity(feats),
        }
        if labels is not None:
            out["class_acc"] = float((self.net.head(feats).argmax(-1) == labels).double().mean())
        return out
