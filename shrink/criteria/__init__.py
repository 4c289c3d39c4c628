"""Importance criteria: a score per group channel; the lowest-scored channels go first.

* :mod:`shrink.criteria.weight`: from the weights alone (Ln norm, random, BN scale, user scores)
  and :func:`~shrink.criteria.weight.score`, which every criterion goes through;
* :mod:`shrink.criteria.data`: from the model's behaviour on the user's batches (Taylor,
  activation).
"""

from shrink.criteria.data import Activation, Taylor
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
    "AxisScores",
    "BNScale",
    "Criterion",
    "DataCriterion",
    "LnNorm",
    "Random",
    "Taylor",
    "UserScores",
    "score",
]
