"""Sample-quality metrics on feature vectors: pure functions of [N, D] tensors, domain-agnostic.
The domain chooses the feature extractor (and names the metric honestly after it)."""

from kdlib.metrics.coverage import diversity, precision_recall
from kdlib.metrics.distribution import frechet_distance, kernel_inception_distance

__all__ = ["frechet_distance", "kernel_inception_distance", "precision_recall", "diversity"]
