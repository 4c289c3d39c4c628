"""Allocation by budget: solve for the ratio that removes a given share of MACs or parameters.

A :class:`Target` names what to shrink (``Metric.MACS`` or ``Metric.PARAMS``), by how much
(``ratio``: the fraction removed, as everywhere in shrink) and how channels are chosen (``policy``,
a :class:`~shrink.select.Uniform` or :class:`~shrink.select.Global` template whose own ratio is
ignored). :func:`solve_target` bisects the template's channel ratio ``r``:

    kept(r) = metric(apply(model, select(groups, scores, policy(r)))) / metric(model)

is non-increasing in ``r`` (a larger ratio drops a superset of channels in every group, for both
policies), so bisection on ``[0, r_max]`` converges to the step of ``kept`` nearest the goal
``1 - ratio``. The metric is measured on the rebuilt model, not estimated: the candidate plans are
applied to a copy of the model on the ``meta`` device (shapes only, no arithmetic), and MACs are
counted by :func:`shrink.report.count_macs` on meta inputs; models that cannot run on ``meta`` are
measured on real tensors instead.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shrink.capture import meta_copy
from shrink.errors import ConfigError
from shrink.plan import ChannelGroup, Plan
from shrink.report import count_macs, count_params
from shrink.rewrite import apply
from shrink.select import Global, Metric, Target, Uniform, select

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class Solution:
    """The solved policy and the kept fraction of the metric it achieves."""

    policy: Uniform | Global
    kept: float
    iterations: int


def measurer(model: nn.Module, inputs: tuple[Any, ...], metric: Metric) -> Callable[[Plan], float]:
    """A function ``plan -> kept fraction of metric`` for ``model`` on ``inputs``."""
    count: Callable[[nn.Module, tuple[Any, ...]], int]
    if metric is Metric.PARAMS:
        def count(m: nn.Module, x: tuple[Any, ...]) -> int:
            return count_params(m)
    else:
        count = count_macs
    base_model, base_inputs = model, inputs
    try:
        meta = meta_copy(model)  # keeps tied weights tied (.to("meta") would untie them)
        meta_inputs = tuple(x.to("meta") if isinstance(x, torch.Tensor) else x for x in inputs)
        base = count(meta, meta_inputs)
        base_model, base_inputs = meta, meta_inputs
    except Exception as e:  # any failure on meta: fall back to real tensors
        log.info("allocate: measuring on real tensors (meta device failed: %s)", e)
        base = count(model, inputs)
    if base <= 0:
        raise ConfigError(f"the model has no {metric.value} to remove (counted {base})")

    def kept(plan: Plan) -> float:
        return count(apply(base_model, plan), base_inputs) / base

    return kept


def solve_target(
    model: nn.Module,
    inputs: tuple[Any, ...],
    groups: tuple[ChannelGroup, ...],
    scores: Mapping[str, torch.Tensor],
    target: Target,
    fingerprint: str,
) -> Solution:
    """Find the channel ratio of ``target.policy`` that removes ``target.ratio`` of the metric.

    Args:
        model: the model the plan is for (read only).
        inputs: example inputs (for MACs).
        groups: every group of the analysis.
        scores: channel scores per group (:func:`shrink.score`).
        target: the budget.
        fingerprint: ``analysis.model``.

    Returns:
        The policy with the solved ratio, and the kept fraction it achieves.

    Raises:
        ConfigError: when even the largest ratio the policy allows keeps more than the goal
            (pinned groups, ``max_ratio`` or overrides bound what can be removed).

    Example:
        >>> sol = solve_target(model, x, analysis.groups, scores, Target(0.5),
        ...                           analysis.model)
    """
    goal = 1.0 - target.ratio
    kept_of = measurer(model, inputs, target.metric)
    cache: dict[float, float] = {}

    def f(r: float) -> float:
        if r not in cache:
            policy = dataclasses.replace(target.policy, ratio=r)
            cache[r] = kept_of(select(groups, scores, policy, fingerprint))
        return cache[r]

    hi = target.policy.max_ratio if isinstance(target.policy, Global) else 0.99
    hi = min(hi, 0.99)
    if f(hi) > goal * (1 + target.tolerance):
        raise ConfigError(
            f"cannot remove {target.ratio:.1%} of {target.metric.value}: the "
            f"{type(target.policy).__name__} policy at its largest ratio ({hi}) keeps "
            f"{f(hi):.1%}. Pinned groups, max_ratio, min_keep or overrides limit it; raise "
            "max_ratio, drop ignore= entries, or lower the target."
        )
    lo, best = 0.0, hi
    it = 0
    while it < target.max_iter:
        it += 1
        mid = (lo + hi) / 2
        k = f(mid)
        if abs(k - goal) < abs(f(best) - goal):
            best = mid
        if abs(k / goal - 1) <= target.tolerance:
            best = mid
            break
        lo, hi = (mid, hi) if k > goal else (lo, mid)
    if abs(f(best) / goal - 1) > target.tolerance:
        log.warning("allocate: closest kept %s fraction %.4f for goal %.4f after %d steps",
                    target.metric.value, f(best), goal, target.max_iter)
    log.info("allocate: ratio %.4f keeps %.4f of %s (goal %.4f, %d steps)",
             best, f(best), target.metric.value, goal, it)
    return Solution(dataclasses.replace(target.policy, ratio=best), f(best), it)
