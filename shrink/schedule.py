"""Iterative pruning: reach a target in ``k`` steps, fine-tuning between them.

Amounts are relative to what remains, as in ``torch.nn.utils.prune``'s iterative semantics: to
remove a total fraction ``R`` in ``k`` equal steps, each step removes

    r = 1 - (1 - R) ** (1 / k)

of the channels (or MACs/parameters, for a :class:`~shrink.select.Target`) that are left, so
``(1 - r) ** k = 1 - R``. Per-group rounding makes the final count differ by at most a channel per
step and group. Each step is one full :func:`shrink.prune` (capture, score, select, apply,
verify) of the *current* model, so data-driven criteria re-score the fine-tuned weights.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import Any, NamedTuple

from torch import nn

from shrink.api import Result, prune
from shrink.config import PruneConfig
from shrink.errors import ConfigError
from shrink.select import Global, Target, Uniform

log = logging.getLogger(__name__)

FineTune = Callable[[nn.Module, int], nn.Module | None]
"""``finetune(model, step) -> model or None``: train ``model`` (in place, or return a new one)."""


class IterativeResult(NamedTuple):
    """The final model and every step's :class:`~shrink.api.Result` (plans chain step to step)."""

    model: nn.Module
    steps: tuple[Result, ...]


def step_ratios(ratio: float | int, steps: int) -> tuple[float, ...]:
    """Per-step fractions, each relative to what remains, that compound to ``ratio``.

    Raises:
        ConfigError: unless ``0 <= ratio < 1`` and ``steps >= 1``.

    Example:
        >>> shrink.step_ratios(0.75, 2)
        (0.5, 0.5)
    """
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ConfigError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(ratio, bool) or not isinstance(ratio, float) or not 0.0 <= ratio < 1.0:
        raise ConfigError(
            f"an iterative schedule needs a float ratio in [0, 1) (the total fraction removed), "
            f"got {ratio!r}; absolute channel counts do not compound"
        )
    r = 1.0 - (1.0 - ratio) ** (1.0 / steps)
    return (r,) * steps


def _with_ratio(
    policy: Uniform | Global | Target, r: float, steps: int
) -> Uniform | Global | Target:
    def scale(x: float | int) -> float:
        return step_ratios(float(x), steps)[0] if isinstance(x, float) else float(x)

    if isinstance(policy, Target):
        return dataclasses.replace(policy, ratio=r)
    overrides = tuple((p, scale(v)) for p, v in policy.overrides)
    if isinstance(policy, Global):
        return dataclasses.replace(policy, ratio=r, overrides=overrides,
                                   min_ratio=scale(policy.min_ratio) if policy.min_ratio else 0.0)
    return dataclasses.replace(policy, ratio=r, overrides=overrides)


def prune_iteratively(
    model: nn.Module,
    example_inputs: Any,
    config: PruneConfig,
    *,
    steps: int,
    finetune: FineTune | None = None,
) -> IterativeResult:
    """Prune ``config.policy.ratio`` in total over ``steps`` rounds, fine-tuning after each.

    Args:
        model: the dense model; never modified (each step works on the previous step's copy).
        example_inputs: inputs for capture and verification.
        config: the total goal: a float channel ratio (Uniform/Global; overrides and the
            global floor are spread the same way) or a :class:`~shrink.select.Target`.
        steps: number of prune (and fine-tune) rounds, ``k >= 1``.
        finetune: called as ``finetune(model, step)`` after every step, ``step`` counting from 0;
            it trains the pruned model in place or returns a replacement.

    Returns:
        The final model and each step's result.

    Raises:
        ConfigError: for an absolute (int) ratio or a bad ``steps``.

    Example:
        >>> out = shrink.prune_iteratively(model, x, shrink.make_config(0.5), steps=3,
        ...                                finetune=lambda m, i: train(m, epochs=1))
    """
    per_step = step_ratios(config.policy.ratio, steps)[0]
    step_config = dataclasses.replace(config, policy=_with_ratio(config.policy, per_step, steps))
    current = model
    results: list[Result] = []
    for i in range(steps):
        res = prune(current, example_inputs, step_config)
        current = res.model
        if finetune is not None:
            out = finetune(current, i)
            if out is not None:
                if not isinstance(out, nn.Module):
                    raise ConfigError(
                        f"finetune returned {type(out).__name__}; return the model or None"
                    )
                current = out
        results.append(res._replace(model=current))
        log.info("schedule: step %d/%d removed %.3f of what remained", i + 1, steps, per_step)
    return IterativeResult(current, tuple(results))
