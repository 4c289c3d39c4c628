"""What keeping ``k`` channels of a group is worth to a latency allocation.

Two valuations (:attr:`shrink.latency.LatencyTarget.valuation`):

* **scores** (no data): the sum of the group's ``k`` best channel scores, each divided by the
  group's mean score, as the Global policy ranks channels (:func:`score_value`). Cheap, but a
  score is a proxy: it says which channels of a group matter least, not what cutting the
  group costs against cutting another one. A channel of a residual stream or of the first
  conv is worth as much as any other by this measure, although cutting it changes every layer
  it feeds.
* **loss** (calibration data): the measured loss. For every group ``g`` and a few of its
  candidate counts ``k`` (at most :attr:`LossValuation.points`, evenly spread over the
  candidates, the smallest and the largest included), the plan that keeps the ``k``
  best-scored channels of ``g`` and prunes nothing else is applied to a copy of the model, and
  its mean loss on the calibration batches is measured (eval mode, no gradients). Batch norms
  are first re-estimated on the same batches (:func:`recalibrate_bn`, with
  :attr:`LossValuation.recalibrate_bn`), in the dense model as in every pruned copy: removing
  channels shifts the statistics every later norm sees, and a copy judged with stale
  statistics looks far worse than it is after any fine-tune (the first conv cut in half
  drops to chance accuracy and recovers in one epoch). Judging sub-networks after
  re-estimating their norms is what makes pruned accuracy predict fine-tuned accuracy
  (EagleEye, Li et al. 2020). The value
  of ``k`` is ``-(loss(k) - loss(dense))``, linear between measured counts, made
  non-decreasing in ``k`` (keeping more is never worth less). The allocation then maximises
  ``-sum_g dloss_g(k_g)``: the first-order, additive estimate of the loss of the whole plan,
  the criterion of sensitivity-based allocation (NetAdapt, AMC's ablations).

  Cost: ``points`` evaluations per group, each an :func:`~shrink.rewrite.apply` and one pass
  over the calibration batches. A group whose pruned copy fails to run at a count loses that
  count and every smaller one (a warning says why).
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Mapping, MutableMapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from shrink.criteria.batches import Batch, batch_loss, iter_batches
from shrink.errors import ConfigError
from shrink.latency.options import LossValuation
from shrink.latency.solve import Choice
from shrink.modcopy import copy_module, shared_copy
from shrink.plan import ChannelGroup
from shrink.rewrite import apply
from shrink.rules.norm import batch_norms, reestimate_batch_norms_
from shrink.select import plan_from_counts

log = logging.getLogger(__name__)

#: measured losses of one model: ``(group id, kept count) -> mean loss``, and ``"dense"``
LossMemo = MutableMapping[Any, float]


def score_value(g: ChannelGroup, scores: torch.Tensor, k: int) -> float:
    """Importance kept by the ``k`` best channels, scores divided by the group's mean (as the
    Global policy ranks them); per block for grouped convs (each block keeps ``k / blocks``)."""
    s = scores.detach().double().cpu()
    mean = float(s.mean())
    s = s / mean if mean > 0 else s
    if not g.blocks:
        return float(s.sort(descending=True).values[:k].sum())
    labels = sorted(set(g.blocks))
    kb = k // len(labels)
    blocks = torch.as_tensor(g.blocks)
    return float(sum(s[blocks == b].sort(descending=True).values[:kb].sum() for b in labels))


def loss_values(model: nn.Module, groups: tuple[ChannelGroup, ...],
                scores: Mapping[str, torch.Tensor], choices: Sequence[Choice],
                valuation: LossValuation, fingerprint: str,
                memo: LossMemo | None = None) -> list[Choice]:
    """``choices`` with their values replaced by measured loss (see the module docstring).

    Args:
        memo: measured losses kept between calls on the same model (a re-solve after the
            shape probe pins a group measures nothing twice).

    Raises:
        ConfigError: the data yields no batches, a batch has no target for ``loss_fn``, the
            dense model's loss is not finite.
    """
    start = time.perf_counter()
    memo = {} if memo is None else memo
    batches = list(iter_batches(valuation.data, valuation.max_batches, "valuation='loss'"))
    if "dense" not in memo:
        own = valuation.recalibrate_bn and bool(batch_norms(model))
        # the dense model's own copy when its norms are re-estimated, else shared weights
        memo["dense"] = _judge(copy_module(model) if own else shared_copy(model), batches,
                               valuation)
        if not math.isfinite(memo["dense"]):
            raise ConfigError(f"valuation='loss': the dense model's loss on the calibration data "
                              f"is {memo['dense']}; check the data and loss_fn")
    base = memo["dense"]
    sizes = {g.id: g.size for g in groups}
    out: list[Choice] = []
    evaluated = 0
    for c in choices:
        if len(c.counts) == 1:
            out.append(Choice(c.id, c.counts, (0.0,)))
            continue
        losses: dict[int, float] = {}
        for i in reversed(_spread(len(c.counts), valuation.points)):  # largest count first
            k = c.counts[i]
            if k >= sizes[c.id]:
                losses[k] = base
                continue
            if (c.id, k) not in memo:
                plan = plan_from_counts(groups, scores, {c.id: k}, fingerprint)
                try:
                    memo[(c.id, k)] = _judge(apply(model, plan), batches, valuation)
                except Exception as e:  # a count the model cannot run at
                    log.warning("valuation='loss': %s keeping %d of %d channels fails (%s: "
                                "%s); it keeps more", c.id, k, sizes[c.id], type(e).__name__,
                                str(e).splitlines()[0] if str(e) else "")
                    memo[(c.id, k)] = math.nan
                evaluated += 1
            if not math.isfinite(memo[(c.id, k)]):
                break   # this count and every smaller one are out
            losses[k] = memo[(c.id, k)]
        if not losses:   # not even its largest candidate runs: it keeps that, valued 0
            out.append(Choice(c.id, c.counts[-1:], (0.0,)))
            continue
        counts = tuple(k for k in c.counts if k >= min(losses))
        out.append(Choice(c.id, counts, _monotone(counts, losses, base)))
    log.info("valuation='loss': %d groups, %d pruned copies evaluated on %d batch(es) in %.1f s "
             "(dense loss %.4g)", len(choices), evaluated, len(batches),
             time.perf_counter() - start, base)
    return out


def _spread(n: int, points: int) -> list[int]:
    """At most ``points`` indices of ``range(n)``, evenly spread, first and last included."""
    if n <= points:
        return list(range(n))
    return sorted({round(j * (n - 1) / (points - 1)) for j in range(points)})


def _monotone(counts: Sequence[int], losses: Mapping[int, float],
              base: float) -> tuple[float, ...]:
    """``-(loss - base)`` at every count, linear between measured ones, non-decreasing."""
    known = sorted(losses)
    values = np.interp(counts, known, [base - losses[k] for k in known])
    return tuple(float(v) for v in np.maximum.accumulate(values))


def _judge(model: nn.Module, batches: Sequence[Batch], valuation: LossValuation) -> float:
    """The mean loss of ``model`` (a copy of the caller's, modified here) in eval mode, its batch
    norms first re-estimated on the batches when ``valuation.recalibrate_bn``."""
    if valuation.recalibrate_bn:
        recalibrate_bn(model, batches)
    return _mean_loss(model.eval(), batches, valuation.loss_fn)


def recalibrate_bn(model: nn.Module, batches: Sequence[Batch]) -> int:
    """Re-estimate the running statistics of every batch norm of ``model`` (modified in place)
    on ``batches``: statistics reset, a cumulative average over one pass with the norms in
    training mode and every other module in eval mode; the model is left in eval mode. Returns
    the number of norms.

    Example:
        >>> recalibrate_bn(pruned_copy, [split_batch((x, y)) for x, y in loader])
    """
    model.eval()
    return reestimate_batch_norms_(model, [functools.partial(b.run, model) for b in batches])


@torch.no_grad()
def _mean_loss(model: nn.Module, batches: Sequence[Batch], loss_fn: Any) -> float:
    return sum(float(batch_loss(model, b, loss_fn, "valuation='loss'", "measure"))
               for b in batches) / len(batches)
