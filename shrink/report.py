"""Report: what pruning did (params, MACs, groups, pinned reasons, oracle error), as a table."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from torch import nn

from shrink.modcopy import copy_module, set_eval

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class GroupRow:
    id: str
    kept: int
    total: int
    pinned: str | None = None
    exact: bool = True


@dataclass(frozen=True, slots=True)
class LatencyReport:
    """How a latency target was met (:mod:`shrink.latency`).

    Attributes:
        runtime: where latency was measured (``"onnxruntime-cpu"``, ...).
        threads: intra-op threads.
        batch: batch size timed.
        goal: the kept fraction of latency asked for, ``1 - ratio``.
        dense_ms: best-of latency of the dense model (interleaved with the final plan's).
        pruned_ms: best-of latency of the pruned model.
        predicted: the latency model's kept fraction for the final plan, before calibration.
        corrections: end-to-end measurements after the first that corrected the budget.
        converged: whether the measured kept fraction is within the tolerance of ``goal``.
        layer_shapes: distinct layer signatures in the latency table.
        measured_shapes: of those, how many were timed now (the rest came from the cache).
        seconds: wall time of the whole latency allocation.
        history: ``(predicted, measured)`` kept fractions of every plan timed end to end.
        valuation: what the allocation maximised: ``"scores"`` (channel scores) or
            ``"loss: ..."`` (measured loss; with the pruned copies evaluated and their time).
        explored: more valuable plans measured once the goal was met
            (:attr:`~shrink.latency.LatencyTarget.explore`); ``history`` lists them last.
    """

    runtime: str
    threads: int
    batch: int
    goal: float
    dense_ms: float
    pruned_ms: float
    predicted: float
    corrections: int
    converged: bool
    layer_shapes: int
    measured_shapes: int
    seconds: float
    history: tuple[tuple[float, float], ...] = ()
    valuation: str = "scores"
    explored: int = 0

    @property
    def measured(self) -> float:
        """The measured kept fraction: ``pruned_ms / dense_ms``."""
        return self.pruned_ms / self.dense_ms

    def __str__(self) -> str:
        state = "met" if self.converged else "NOT met (closest plan returned)"
        return (f"latency ({self.runtime}, {self.threads} thread(s), batch {self.batch}): "
                f"{self.dense_ms:.3f} ms -> {self.pruned_ms:.3f} ms, kept {self.measured:.3f} "
                f"(goal {self.goal:.3f}, {state}; predicted {self.predicted:.3f}, "
                f"{self.corrections} correction(s)"
                + (f", {self.explored} more valuable plan(s) tried" if self.explored else "")
                + f"; valued by {self.valuation})")


@dataclass(frozen=True, slots=True)
class Report:
    """Measured effect of a plan on a model."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    groups: tuple[GroupRow, ...] = ()
    max_rel_error: float | None = None
    oracle_dtype: str | None = None
    diagnostics: tuple[str, ...] = field(default_factory=tuple)
    #: max relative deviation of the pruned model from the plainly masked original, when inexact
    #: groups (channels a LayerNorm normalises) were pruned; None when every pruned group is exact
    deviation: float | None = None
    #: measured latency before/after, when the plan was made for a latency target
    latency: LatencyReport | None = None
    #: shape of the smaller input the oracle compared on (:mod:`shrink.reduced`), e.g.
    #: ``"2x3x112x112"``; None when it compared on the example inputs
    oracle_input: str | None = None

    @property
    def param_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def mac_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["param_ratio"] = self.param_ratio
        d["mac_ratio"] = self.mac_ratio
        if self.latency is not None:
            d["latency"]["measured"] = self.latency.measured
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def __str__(self) -> str:
        lines = [
            f"{'':12}{'before':>16}{'after':>16}{'ratio':>9}",
            f"{'params':12}{self.params_before:>16,}{self.params_after:>16,}{self.param_ratio:>9.3f}",
            f"{'MACs':12}{self.macs_before:>16,}{self.macs_after:>16,}{self.mac_ratio:>9.3f}",
        ]
        if self.max_rel_error is not None:
            on = "" if self.oracle_input is None else (
                f", on two half-resolution views of the input: {self.oracle_input}")
            lines.append(
                f"masked-oracle max relative error: {self.max_rel_error:.2e} "
                f"({self.oracle_dtype}{on})"
            )
        if self.deviation is not None:
            lines.append(
                f"inexact: pruned LayerNorm-normalised channels change its statistics; max "
                f"relative deviation from the masked original {self.deviation:.2e} "
                "(exact_only=True prunes only exact groups)"
            )
        if self.latency is not None:
            lines.append(str(self.latency))
        pruned = [g for g in self.groups if g.pinned is None]
        pinned = [g for g in self.groups if g.pinned is not None]
        lines.append(f"groups: {len(pruned)} prunable, {len(pinned)} pinned")
        width = max([len(g.id) for g in self.groups] + [5])
        for g in pruned:
            note = "" if g.exact or g.kept == g.total else "  inexact"
            lines.append(f"  {g.id:<{width}} {g.kept:>6} / {g.total:<6}{note}".rstrip())
        for g in pinned:
            lines.append(f"  {g.id:<{width}} pinned ({g.total}): {g.pinned}")
        lines += [f"note: {d}" for d in self.diagnostics]
        return "\n".join(lines)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_inputs: tuple[Any, ...]) -> int:
    """Multiply-accumulates of one eval-mode forward pass (aten conv/mm/bmm/attention).

    Counted with FlopCounterMode's formulas on a weightless meta-device copy (no compute),
    falling back to FlopCounterMode itself, then to a real run for models with ops that cannot
    run on meta. ``model`` is not modified.
    """
    from shrink.capture import meta_copy, to_meta

    try:
        return count_run(set_eval(meta_copy(model)), to_meta(example_inputs))
    except Exception:  # an op without a meta kernel: count on a real copy
        return count_run(set_eval(copy_module(model)), example_inputs, lean=False)


def count_run(model: nn.Module, inputs: tuple[Any, ...], *, lean: bool = True) -> int:
    """MACs of ``model(*inputs)``, run under ``no_grad`` with :func:`~shrink.fastmeta.fast_meta`.

    ``lean``: count in that mode, then, should that fail (a higher-order op), with
    FlopCounterMode, whose total it equals (``tests/unit/test_macs.py``).
    """
    return counted(lambda: model(*inputs), lean=lean)[1]


T = TypeVar("T")


def counted(run: Callable[[], T], *, lean: bool = True) -> tuple[T, int]:
    """``run()`` (a forward pass) and its MACs, under ``no_grad`` and
    :func:`~shrink.fastmeta.fast_meta`; see :func:`count_run`."""
    from torch.utils.flop_counter import FlopCounterMode

    from shrink.fastmeta import fast_meta

    # nn.MultiheadAttention's inference fast path is one fused op the counter does not see
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        if lean:
            try:
                with torch.no_grad(), fast_meta(count=True) as mode:
                    out = run()
                return out, mode.flops // 2
            except NotImplementedError as e:
                log.debug("count_run: %s; counting with FlopCounterMode", e)
        full = FlopCounterMode(display=False)
        # fast_meta inside the counter: the ops it answers (norms, pointwise, mean, cat) have
        # no flop formula, and the counter would decompose them first
        with torch.no_grad(), full, fast_meta():
            out = run()
        return out, int(full.get_total_flops()) // 2
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
