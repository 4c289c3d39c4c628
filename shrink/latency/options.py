"""Options of a latency target: the runtime it is measured on and the budget.

Plain frozen data, imported by :mod:`shrink.config`; the work is in :mod:`shrink.latency.target`.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from shrink.errors import ConfigError
from shrink.select import AUTO, Global


class Runtime(enum.Enum):
    """Where a :class:`LatencyTarget` is measured."""

    ORT_CPU = "onnxruntime-cpu"
    TORCH_CPU = "torch-cpu"
    ORT_CUDA = "onnxruntime-cuda"
    TORCH_CUDA = "torch-cuda"

    @property
    def cuda(self) -> bool:
        return self.value.endswith("cuda")


@dataclass(frozen=True, slots=True, eq=False)
class LossValuation:
    """Value a group's kept counts by the measured loss of pruning it alone
    (:mod:`shrink.latency.value`), instead of by its channel scores.

    Attributes:
        data: re-iterable calibration batches (as :class:`~shrink.criteria.Taylor` takes them):
            ``(*inputs, target)`` tuples, or dicts of keyword arguments with ``labels`` for a
            model that returns ``.loss``.
        loss_fn: ``loss_fn(output, target) -> scalar``; None uses ``output.loss``.
        max_batches: use at most this many batches (None: all of ``data``).
        points: kept counts measured per group (the rest are interpolated), at least 2.
        recalibrate_bn: re-estimate batch-norm statistics on ``data`` before measuring the
            loss of the dense model and of every pruned copy (EagleEye's adaptive BN; see
            :mod:`shrink.latency.value`).

    Example:
        >>> cfg = shrink.PruneConfig(0.5, target="latency", valuation="loss", data=loader,
        ...                          loss_fn=torch.nn.functional.cross_entropy, max_batches=4)
    """

    data: Iterable[Any]
    loss_fn: Callable[[Any, Any], Any] | None = None
    max_batches: int | None = None
    points: int = 8
    recalibrate_bn: bool = True

    def __post_init__(self) -> None:
        if self.data is None:
            raise ConfigError("valuation='loss' measures the loss of pruned copies on "
                              "calibration data: pass data= (batches of (x, y)) and loss_fn=")
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ConfigError(f"loss_fn must be callable(output, target) -> scalar loss, got "
                              f"{self.loss_fn!r}")
        if isinstance(self.points, bool) or not isinstance(self.points, int) or self.points < 2:
            raise ConfigError(f"LossValuation.points must be an int >= 2, got {self.points!r}")


@dataclass(frozen=True, slots=True)
class LatencyTarget:
    """Remove ``ratio`` of the model's *measured* latency on ``runtime`` (see
    :mod:`shrink.latency`: a per-layer latency model, a Lagrangian allocation over the groups,
    and end-to-end measurements that correct it).

    Attributes:
        ratio: fraction of the dense model's latency removed, in (0, 1).
        runtime: where latency is measured.
        threads: intra-op threads of the runtime.
        batch: batch size timed; None: the example inputs' batch.
        policy: the template whose ``round_to`` (``"auto"``: the runtime's channel block),
            ``min_keep``, ``max_ratio``, ``min_ratio`` and ``overrides`` bound every group's kept
            count; its ratio is ignored.
        tolerance: accept a plan whose measured kept latency is within this *relative* error of
            ``1 - ratio``.
        max_corrections: end-to-end measurements after the first that re-solve the budget.
        explore: once a plan is within half the tolerance, at most this many more valuable
            plans (the allocation at budgets up to half the tolerance above that plan's
            predicted latency) are measured, and the most valuable plan within half the
            tolerance wins: the latency model's error between nearby plans (a few percent)
            should not decide which of two equally fast plans is kept.
        seconds: time budget of each end-to-end measurement (interleaved rounds).
        valuation: what keeping ``k`` channels of a group is worth to the allocation: None
            values them by their scores (the sum of the ``k`` best, over the group's mean); a
            :class:`LossValuation` by the measured loss of pruning that group alone
            (:mod:`shrink.latency.value`).

    Example:
        >>> cfg = shrink.PruneConfig(0.5, target="latency")   # builds this LatencyTarget
        >>> res = shrink.prune(model, x, cfg)   # res.report.latency.measured ~= 0.5
    """

    ratio: float
    runtime: Runtime = Runtime.ORT_CPU
    threads: int = 1
    batch: int | None = None
    policy: Global = field(default_factory=lambda: Global(0.0, round_to=AUTO))
    tolerance: float = 0.05
    max_corrections: int = 4
    explore: int = 2
    seconds: float = 3.0
    valuation: LossValuation | None = None

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, float) or not (
            0.0 < self.ratio < 1.0
        ):
            raise ConfigError(
                "LatencyTarget.ratio must be a float in (0, 1), the fraction of measured latency "
                f"removed; got {self.ratio!r}"
            )
        if not isinstance(self.runtime, Runtime):
            raise ConfigError(f"runtime must be one of {[r.value for r in Runtime]}, got "
                              f"{self.runtime!r}")
        if isinstance(self.threads, bool) or not isinstance(self.threads, int) or self.threads < 1:
            raise ConfigError(f"threads must be an int >= 1 (intra-op threads), got "
                              f"{self.threads!r}")
        if self.batch is not None and (isinstance(self.batch, bool)
                                       or not isinstance(self.batch, int) or self.batch < 1):
            raise ConfigError(f"batch must be an int >= 1 or None (the example inputs' batch), "
                              f"got {self.batch!r}")
        if not isinstance(self.policy, Global):
            raise ConfigError("LatencyTarget.policy must be a Global (latency is allocated "
                              "across groups)")
        if not 0.0 < self.tolerance < 0.5:
            raise ConfigError(f"LatencyTarget.tolerance must be in (0, 0.5), got {self.tolerance}")
        if isinstance(self.max_corrections, bool) or not isinstance(self.max_corrections, int) \
                or self.max_corrections < 0:
            raise ConfigError(f"max_corrections must be an int >= 0, got {self.max_corrections!r}")
        if isinstance(self.explore, bool) or not isinstance(self.explore, int) \
                or self.explore < 0:
            raise ConfigError(f"explore must be an int >= 0, got {self.explore!r}")
        if not self.seconds > 0:
            raise ConfigError(f"seconds must be > 0, got {self.seconds}")
        if self.valuation is not None and not isinstance(self.valuation, LossValuation):
            raise ConfigError(f"LatencyTarget.valuation must be None (channel scores) or a "
                              f"LossValuation, got {self.valuation!r}")
