"""Iterative pruning: reach a target in ``k`` steps, fine-tuning between them.

Amounts are relative to what remains, as in ``torch.nn.utils.prune``'s iterative semantics: to
remove a total fraction ``R`` in ``k`` equal steps, each step removes

    r = 1 - (1 - R) ** (1 / k)

of the channels (or MACs/parameters, for ``target="macs"``/``"params"``) that are left, so
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
        >>> step_ratios(0.75, 2)
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


def _per_step(config: PruneConfig, steps: int) -> PruneConfig:
    """``config`` with every fraction (ratio, overrides, global floor) spread over ``steps``."""
    if config.depth is not None:
        raise ConfigError(
            f"depth={config.depth} would remove layers at every step; remove them once with "
            "shrink.remove_layers, then prune the result iteratively"
        )
    if config.ratio is None:
        raise ConfigError(
            f"an iterative schedule needs ratio= (a fraction of what remains); amount="
            f"{config.amount} channels per group does not compound"
        )

    def scale(x: float) -> float:
        return step_ratios(float(x), steps)[0]

    return dataclasses.replace(
        config, ratio=scale(config.ratio),
        overrides=tuple((p, scale(v)) for p, v in config.overrides),
        min_ratio=scale(config.min_ratio) if config.min_ratio else 0.0,
    )


def prune_iteratively(
    model: nn.Module,
    example_inputs: Any,
    config: PruneConfig,
    *,
    steps: int,
    finetune: FineTune | None = None,
) -> IterativeResult:
    """Prune ``config.ratio`` in total over ``steps`` rounds, fine-tuning after each.

    Args:
        model: the dense model; never modified (each step works on the previous step's copy).
        example_inputs: inputs for capture and verification.
        config: the total goal: ``ratio`` of the channels (overrides and the global floor
            are spread the same way) or, with ``target="macs"``/``"params"``, of the metric.
        steps: number of prune (and fine-tune) rounds, ``k >= 1``.
        finetune: called as ``finetune(model, step)`` after every step, ``step`` counting from 0;
            it trains the pruned model in place or returns a replacement.

    Returns:
        The final model and each step's result.

    Raises:
        ConfigError: for an absolute ``amount`` or a bad ``steps``.

    Example:
        >>> out = shrink.prune_iteratively(model, x, shrink.PruneConfig(0.5), steps=3,
        ...                                finetune=lambda m, i: train(m, epochs=1))
    """
    step_config = _per_step(config, steps)
    per_step = step_config.ratio
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
