"""kdlib.objectives: the losses every distillation method ends in, with stated conventions.

- logit divergences (``divergence``, ``cross_entropy``, ``kd_loss``, ``TAID``);
- feature and relation losses (``kdlib.objectives.features``);
- regression metrics for generative distillation (``kdlib.objectives.regression``).
"""

from kdlib.objectives.divergences import cross_entropy, divergence, kd_loss
from kdlib.objectives.taid import TAID

__all__ = ["divergence", "cross_entropy", "kd_loss", "TAID"]
