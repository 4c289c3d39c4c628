"""Sensitivity analysis: how much a metric drops when one group alone is pruned.

For every prunable group ``g`` and ratio ``r``, the plan that removes ``round(r * size)`` of
``g``'s lowest-scored channels (and nothing else) is applied to a copy of the model and the user's
``evaluate(model) -> float`` is called on it. The drop is ``baseline - metric`` when higher is
better (accuracy) and ``metric - baseline`` otherwise (loss), so a positive drop always means
"worse". :meth:`Sensitivity.ratios` turns the table into per-group ratios (the largest tested
ratio whose drop stays within a budget), which :meth:`Sensitivity.overrides` hands to a
:class:`~shrink.select.Uniform` or :class:`~shrink.select.Global` policy.

Cost: ``len(groups) * len(ratios)`` evaluations; restrict ``groups`` (ids or globs) on big models.
A group whose pruning breaks a shape (:mod:`shrink.probe`) is not measured from the ratio that
breaks it on (a warning says why).
"""

from __future__ import annotations

import fnmatch
import json
import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from shrink.analysis import analyze
from shrink.capture import capture, normalize_inputs
from shrink.criteria.weight import Criterion, LnNorm, score
from shrink.errors import ConfigError
from shrink.probe import ShapeProbe
from shrink.rewrite import apply
from shrink.select import Overrides, Uniform, select

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SensitivityRow:
    """One evaluation: ``group`` pruned alone by ``ratio`` (``kept`` of ``size`` channels stay)."""

    group: str
    ratio: float
    kept: int
    size: int
    metric: float
    drop: float


@dataclass(frozen=True, slots=True)
class Sensitivity:
    """The table returned by :func:`sensitivity`.

    Attributes:
        baseline: ``evaluate(model)`` of the unpruned model.
        rows: one row per (group, ratio), in group then ratio order.
        higher_is_better: whether the metric is a score (accuracy) rather than a loss.
    """

    baseline: float
    rows: tuple[SensitivityRow, ...]
    higher_is_better: bool = True

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(dict.fromkeys(r.group for r in self.rows))

    def ratios(self, max_drop: float) -> dict[str, float]:
        """Per group, the largest tested ratio whose drop is at most ``max_drop`` (else 0.0).

        Example:
            >>> per_group = table.ratios(max_drop=0.01)   # at most 1 point of accuracy each
        """
        out = dict.fromkeys(self.groups, 0.0)
        for r in self.rows:
            if r.drop <= max_drop and r.ratio > out[r.group]:
                out[r.group] = r.ratio
        return out

    def overrides(self, max_drop: float) -> Overrides:
        """:meth:`ratios` as ``PruneConfig(0.0, overrides=table.overrides(0.01))`` takes them."""
        return tuple(self.ratios(max_drop).items())

    def to_dict(self) -> dict[str, Any]:
        return {"baseline": self.baseline, "higher_is_better": self.higher_is_better,
                "rows": [asdict(r) for r in self.rows]}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def to_markdown(self) -> str:
        """A group x ratio table of drops."""
        ratios = sorted({r.ratio for r in self.rows})
        head = "| group | size | " + " | ".join(f"drop @ {x:g}" for x in ratios) + " |"
        lines = [f"baseline: {self.baseline:.4f}", "", head,
                 "|---|---:|" + "---:|" * len(ratios)]
        for g in self.groups:
            rows = {r.ratio: r for r in self.rows if r.group == g}
            size = next(iter(rows.values())).size
            cells = " | ".join(f"{rows[x].drop:+.4f}" if x in rows else "" for x in ratios)
            lines.append(f"| {g} | {size} | {cells} |")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_markdown()

    def plot(self, path: str | None = None, *, max_legend: int = 12) -> Any:
        """Drop versus ratio, one line per group; saved to ``path`` when given.

        Returns:
            The matplotlib ``Figure``.

        Raises:
            ImportError: without matplotlib (``pip install matplotlib``).
        """
        try:
            import matplotlib

            if path is not None:
                matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as e:
            raise ImportError("Sensitivity.plot needs matplotlib: pip install matplotlib") from e
        fig, ax = plt.subplots(figsize=(6, 4))
        for g in self.groups:
            rows = [r for r in self.rows if r.group == g]
            ax.plot([r.ratio for r in rows], [r.drop for r in rows], marker="o", label=g)
        ax.axhline(0.0, color="grey", linewidth=0.5)
        ax.set_xlabel("fraction of the group's channels removed (alone)")
        ax.set_ylabel("metric drop (positive = worse)")
        ax.set_title(f"sensitivity per group (baseline {self.baseline:.4g})")
        if len(self.groups) <= max_legend:
            ax.legend(fontsize="small")
        fig.tight_layout()
        if path is not None:
            fig.savefig(path)
        return fig


def sensitivity(
    model: nn.Module,
    example_inputs: Any,
    evaluate: Callable[[nn.Module], float],
    *,
    ratios: Sequence[float] = (0.25, 0.5, 0.75),
    criterion: Criterion | None = None,
    groups: Sequence[str] = (),
    ignore: Sequence[str | type[nn.Module]] = (),
    higher_is_better: bool = True,
) -> Sensitivity:
    """Prune each group alone at each ratio and measure ``evaluate`` on the result.

    Args:
        model: the dense model; never modified.
        example_inputs: inputs for capture.
        evaluate: ``evaluate(model) -> float`` (accuracy, or a loss with
            ``higher_is_better=False``); it should put the model in the mode it needs.
        ratios: fractions of each group's channels to remove, each in (0, 1).
        criterion: which channels go first (``LnNorm(2)`` by default).
        groups: group ids or globs to test (all prunable groups when empty).
        ignore: passed to :func:`shrink.analyze`.
        higher_is_better: see above.

    Returns:
        A :class:`Sensitivity` table (``str()`` it, ``.plot()`` it, or feed ``.overrides()``).

    Raises:
        ConfigError: bad ratios, or ``groups`` entries matching no prunable group.

    Example:
        >>> table = shrink.sensitivity(model, x, lambda m: accuracy(m, val), ratios=(0.3, 0.6))
        >>> cfg = shrink.PruneConfig(0.0, overrides=table.overrides(max_drop=0.01))
    """
    if not ratios or any(isinstance(r, bool) or not 0.0 < float(r) < 1.0 for r in ratios):
        raise ConfigError(f"ratios must be floats in (0, 1), got {tuple(ratios)!r}")
    inputs = normalize_inputs(example_inputs)
    analysis = analyze(capture(model, inputs), ignore=ignore)
    chosen = [g for g in analysis.prunable
              if not groups or any(g.id == p or fnmatch.fnmatchcase(g.id, p) for p in groups)]
    for p in groups:
        if not any(g.id == p or fnmatch.fnmatchcase(g.id, p) for g in analysis.prunable):
            raise ConfigError(
                f"groups entry {p!r} matches no prunable group; prunable groups are e.g. "
                f"{[g.id for g in analysis.prunable][:6]}"
            )
    scores = score(tuple(chosen), model, criterion if criterion is not None else LnNorm())
    baseline = float(evaluate(model))
    sign = 1.0 if higher_is_better else -1.0
    rows: list[SensitivityRow] = []
    probe = ShapeProbe(model, inputs)
    for g in chosen:
        if g.id not in scores:
            continue
        for r in sorted(float(x) for x in ratios):
            plan = select(analysis.groups, {g.id: scores[g.id]}, Uniform(r), analysis.model)
            why = probe.culprits(plan).get(g.id) if plan.decisions else None
            if why is not None:  # evaluate would get a model that crashes or answers wrong
                log.warning("sensitivity: %s is not measured from ratio %s on: %s", g.id, r, why)
                break
            kept = len(plan.decisions[0].keep) if plan.decisions else g.size
            metric = baseline if not plan.decisions else float(evaluate(apply(model, plan)))
            rows.append(SensitivityRow(g.id, r, kept, g.size, metric, sign * (baseline - metric)))
        log.info("sensitivity: %s done", g.id)
    return Sensitivity(baseline, tuple(rows), higher_is_better)
