"""Importance criteria: a score per group channel; the lowest-scored channels go first.

* :mod:`shrink.criteria.weight`: from the weights alone (Ln norm, random, BN scale, user scores)
  and :func:`~shrink.criteria.weight.score`, which every criterion goes through;
* :mod:`shrink.criteria.data`: from the model's behaviour on the user's batches (Taylor,
  activation-weighted magnitude, activation), scored through
  :mod:`shrink.criteria.saliency` where a per-weight saliency exists.
"""

from shrink.criteria.data import Activation, ActivationWeighted, Taylor
from shrink.criteria.saliency import SaliencyScores
from shrink.criteria.weight import (
    AxisScores,
    BNScale,
    Criterion,
    DataCriterion,
    LnNorm,
    Random,
    UserScores,
    score,
)

__all__ = [
    "Activation",
    "ActivationWeighted",
    "AxisScores",
    "BNScale",
    "Criterion",
    "DataCriterion",
    "LnNorm",
    "Random",
    "SaliencyScores",
    "Taylor",
    "UserScores",
    "score",
]
