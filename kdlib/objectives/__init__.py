"""kdlib.objectives: the losses every distillation method ends in, with stated conventions.

- logit divergences: ``divergence``, ``cross_entropy``, ``kd_loss``, ``TAID``;
- feature and relation losses: ``HintLoss``, ``cosine_loss``, ``cka_loss``, ``attention_transfer``,
  ``dist_loss``, ``OFAProjector`` + ``ofa_loss``, and ``FeatureTap`` to capture features by module path;
- regression metrics for generative distillation: ``l2``, ``pseudo_huber``, ``cauchy``.

For the LM-head case (logits too large to materialise) use ``kdlib.kernels.fused_linear_divergence``,
which computes the same divergences fused with the head's matmul.
"""

from kdlib.objectives.divergences import cross_entropy, divergence, kd_loss
from kdlib.objectives.features import (
    FeatureTap,
    HintLoss,
    OFAProjector,
    attention_transfer,
    cka_loss,
    cosine_loss,
    dist_loss,
    linear_cka,
    ofa_loss,
)
from kdlib.objectives.regression import cauchy, l2, pseudo_huber
from kdlib.objectives.taid import TAID

__all__ = [
    "divergence", "cross_entropy", "kd_loss", "TAID",
    "HintLoss", "cosine_loss", "cka_loss", "linear_cka", "attention_transfer", "dist_loss", "OFAProjector",
    "ofa_loss", "FeatureTap",
    "l2", "pseudo_huber", "cauchy",
]
