"""Solve a latency target: model, allocate, measure end to end, correct.

1. **Model.** Every prunable layer call (:mod:`shrink.latency.layers`) gets a table of its time
   against its kept channels (:mod:`shrink.latency.table`), measured on the runtime once per
   distinct layer signature and cached (:mod:`shrink.latency.cache`). ``P(plan)`` is the sum of
   the tables at the plan's counts and ``P_dense`` at the dense counts; everything else is a
   constant, so with the dense model measured end to end (``M_dense``) the first prediction of
   a plan's kept fraction is ``1 - (P_dense / M_dense) * (1 - P(plan) / P_dense)``.
2. **Allocate** the budget on ``s = P / P_dense`` (:mod:`shrink.latency.solve`).
3. **Measure** the pruned model end to end, interleaved with the dense one (best-of, the
   protocol of :func:`shrink.compare`), giving its measured kept fraction ``r``. A plan that
   lands near the goal is timed a second time and ``r`` is the mean of both: a shared machine
   moves one timing by a few percent.
4. **Correct.** The measured points ``(s, r)`` and the dense point ``(1, 1)`` calibrate the
   prediction: the next ``s`` interpolates linearly between the two points nearest the goal
   that bracket it (or extrapolates from the dense point through the nearest one), i.e. the
   budget is rescaled by measured/predicted savings. Stop when ``|r / goal - 1|`` is within
   half the tolerance (a margin for the noise of a later timing), after ``max_corrections``
   corrections, or when budgets keep giving plans already measured; the closest plan is
   returned and the report says whether it is within the tolerance.

The calibration points are cached per model fingerprint, so a second run on the same model
starts calibrated and usually needs one measurement.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shrink.deploy.timing import rebatch
from shrink.errors import ConfigError
from shrink.latency.cache import LatencyCache
from shrink.latency.layers import Term, layer_calls, terms
from shrink.latency.measure import Bench, bench_for, llc_bytes
from shrink.latency.options import LatencyTarget
from shrink.latency.solve import Choice, Cost, Problem
from shrink.latency.table import Table
from shrink.plan import ChannelGroup, Plan
from shrink.progress import stage
from shrink.report import LatencyReport
from shrink.rewrite import apply
from shrink.select import Uniform, candidate_counts, override_for, plan_from_counts, select

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LatencySolution:
    """The plan that meets (or comes closest to) a latency target, and how it was found."""

    plan: Plan
    report: LatencyReport


def solve_latency(
    model: nn.Module,
    inputs: tuple[Any, ...],
    groups: tuple[ChannelGroup, ...],
    scores: Mapping[str, torch.Tensor],
    target: LatencyTarget,
    fingerprint: str,
    *,
    bench: Bench | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> LatencySolution:
    """The plan that removes ``target.ratio`` of the measured latency (see the module doc).

    Args:
        model: the dense model (read only).
        inputs: example inputs; their shape is the one timed (batch: ``target.batch``).
        groups: every group of the analysis.
        scores: channel scores per group (:func:`shrink.score`).
        target: the latency target.
        fingerprint: ``analysis.model``.
        bench: the runtime to time on (default: :func:`shrink.latency.measure.bench_for`).
        cache_dir: the cache directory (default: :func:`shrink.latency.cache.cache_root`).

    Returns:
        The plan and a :class:`~shrink.report.LatencyReport`.

    Raises:
        ConfigError: no tensor inputs, or the runtime is not available.

    Example:
        >>> sol = solve_latency(model, (x,), analysis.groups, scores, LatencyTarget(0.5),
        ...                     analysis.model)
        >>> sol.report.measured   # ~0.5
    """
    start = time.perf_counter()
    tensors = [t for t in inputs if isinstance(t, torch.Tensor)]
    if not tensors or tensors[0].ndim == 0:
        raise ConfigError("a latency target times the model on its example inputs: pass "
                          "example_inputs with at least one batched tensor")
    batch = target.batch or int(tensors[0].shape[0])
    feed = tuple(rebatch(t, batch) for t in inputs)
    with contextlib.ExitStack() as stack:
        if bench is None:
            bench = stack.enter_context(bench_for(target.runtime, target.threads))
        cache = LatencyCache({**bench.key(), "batch": str(batch), "input": ",".join(
            "x".join(map(str, t.shape[1:])) for t in tensors)}, cache_dir)
        choices = _choices(groups, scores, target, bench.block, fingerprint)
        with stage("latency tables"):
            bound = terms(layer_calls(model, inputs), groups, {c.id for c in choices},
                          bench.block)
            cold = sum(p.numel() * p.element_size() for p in model.parameters()) > llc_bytes()
            tables, measured = _tables(bound, bench, batch, cache, cold)
        problem = Problem(choices, _costs(bound, tables, choices, cold))
        p_dense = sum(t.call.calls * float(tables[_signature(t, cold)].at(
            t.in_axis.extent, t.out_axis.extent)) for t in bound)
        with stage("latency dense"):
            m_dense = bench.models_ms({"dense": model}, feed, target.seconds / 2)["dense"]
        loop = _Corrections(target, p_dense / max(m_dense, 1e-9), cache.points(fingerprint))

        def measure(plan: Plan) -> tuple[float, float]:
            return _measure(bench, model, apply(model, plan), feed, loop)

        s_goal = loop.next_s()
        while s_goal is not None:
            alloc = problem.solve(s_goal * p_dense, lower=s_goal * p_dense * (1 - loop.band))
            plan = plan_from_counts(groups, scores, alloc.counts, fingerprint)
            if loop.measured(plan):  # the budget moves on, unmeasured
                s_goal = loop.nudge(plan, s_goal)
                continue
            with stage(f"latency measure {len(loop.history) + 1}"):
                loop.record(plan, alloc.latency / p_dense, *measure(plan))
            s_goal = loop.next_s()
        cache.add_points(fingerprint, [(s, r) for s, r, *_ in loop.history])
        cache.save()
    s, r, dense_ms, pruned_ms, plan = loop.best()
    report = LatencyReport(
        runtime=target.runtime.value, threads=target.threads, batch=batch,
        goal=1 - target.ratio, dense_ms=dense_ms, pruned_ms=pruned_ms,
        predicted=loop.predicted(s), corrections=len(loop.history) - 1,
        converged=loop.met(r), layer_shapes=len(tables), measured_shapes=measured,
        seconds=time.perf_counter() - start,
        history=tuple((loop.predicted(h[0]), h[1]) for h in loop.history))
    log.info("shrink: %s", report)
    return LatencySolution(plan, report)


def _measure(bench: Bench, dense: nn.Module, pruned: nn.Module, feed: tuple[Any, ...],
             loop: _Corrections) -> tuple[float, float]:
    """Dense and pruned milliseconds, interleaved. A plan near the goal is timed twice and
    its ratio is the mean of both (a shared machine moves one timing by a few percent)."""
    pair = {"dense": dense, "pruned": pruned}
    ms = bench.models_ms(pair, feed, loop.target.seconds)
    ratio = ms["pruned"] / ms["dense"]
    if loop.close(ratio):
        again = bench.models_ms(pair, feed, loop.target.seconds)
        ratio = (ratio + again["pruned"] / again["dense"]) / 2
    return ms["dense"], ratio * ms["dense"]


def _choices(groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor],
             target: LatencyTarget, block: int, fingerprint: str) -> list[Choice]:
    """One choice per scored prunable group; an overridden group has its one count."""
    policy = target.policy
    targets = [g for g in groups if g.prunable and g.id in scores]
    fixed: dict[str, int] = {}
    if policy.overrides:  # select() resolves overrides exactly as a Global policy would
        plan = select(tuple(groups), scores, Uniform(0.0, round_to=policy.round_to,
                                                     min_keep=policy.min_keep,
                                                     overrides=policy.overrides), fingerprint)
        kept = {d.group: len(d.keep) for d in plan.decisions}
        fixed = {g.id: kept.get(g.id, g.size) for g in targets
                 if override_for(g, policy.overrides) is not None}
    out = []
    for g in targets:
        counts = (fixed[g.id],) if g.id in fixed else candidate_counts(g, policy, block)
        out.append(Choice(g.id, counts, tuple(_value(g, scores[g.id], k) for k in counts)))
    return out


def _value(g: ChannelGroup, scores: torch.Tensor, k: int) -> float:
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


def _tables(bound: Sequence[Term], bench: Bench, batch: int, cache: LatencyCache,
            cold: bool) -> tuple[dict[str, Table], int]:
    """The table of every signature: from the cache, else measured (and cached). ``cold``:
    the model's weights exceed the last-level cache, so each layer is timed with its weights
    out of the caches (:func:`shrink.latency.measure.best_of`)."""
    tables: dict[str, Table] = {}
    measured = 0
    for term in bound:
        sig = _signature(term, cold)
        if sig in tables:
            continue
        table = cache.get(sig)
        if table is None:
            ms = tuple(tuple(bench.layer_ms(term.op_at(i, o), batch, cold)
                             for o in term.out_axis.points())
                       for i in term.in_axis.points())
            table = Table(term.in_axis, term.out_axis, ms)
            cache.put(sig, table)
            measured += 1
        tables[sig] = table
    log.info("latency: %d layer signatures, %d measured now", len(tables), measured)
    return tables, measured


def _signature(term: Term, cold: bool) -> str:
    return term.signature() + (" cold" if cold else "")


def _costs(bound: Sequence[Term], tables: Mapping[str, Table],
           choices: Sequence[Choice], cold: bool) -> list[Cost]:
    index = {c.id: i for i, c in enumerate(choices)}
    return [Cost(tables[_signature(t, cold)], tuple((index[g], p) for g, p in t.inp), t.in_fixed,
                 () if t.tied else tuple((index[g], p) for g, p in t.out),
                 t.out_fixed, t.call.calls) for t in bound]


MAX_NUDGES = 8
"""Budgets tried without a new plan before the correction loop gives up."""


class _Corrections:
    """The measured points and the next budget (see the module doc, step 4)."""

    def __init__(self, target: LatencyTarget, f: float,
                 prior: list[tuple[float, float]]) -> None:
        self.target = target
        self.goal = 1 - target.ratio
        self.f = f
        self.prior = prior
        self.history: list[tuple[float, float, float, float, Plan]] = []
        # the allocation aims at [1 - band, 1] of its budget: a quarter of the tolerance on the
        # measured fraction, carried over to the budget's scale
        self.band = target.tolerance / 4
        self._seen: dict[tuple[tuple[str, int], ...], int] = {}
        self.nudges = 0

    def predicted(self, s: float) -> float:
        """The uncalibrated model's kept fraction at layer fraction ``s``."""
        return max(0.0, 1 - self.f * (1 - s))

    def met(self, r: float) -> bool:
        return abs(r / self.goal - 1) <= self.target.tolerance

    def close(self, r: float) -> bool:
        """Within half the tolerance: corrections stop here. A plan between half and the whole
        tolerance is accepted only when the corrections run out, so that a later timing of
        the plan, with the noise of a shared machine, still meets the target."""
        return abs(r / self.goal - 1) <= self.target.tolerance / 2

    def next_s(self) -> float | None:
        if self.history and (self.close(self.history[-1][1])
                             or len(self.history) > self.target.max_corrections):
            return None
        own = [(s, r) for s, r, *_ in self.history]
        points = [(1.0, 1.0), *own, *(self.prior if len(own) < 1 else [])]
        below = [p for p in points if p[1] <= self.goal]
        above = [p for p in points if p[1] > self.goal]
        a = min(above, key=lambda p: p[1])
        if below:
            b = max(below, key=lambda p: p[1])
        elif len(points) == 1:
            return max(0.0, 1 - (1 - self.goal) / max(self.f, 1e-9))
        else:
            b, a = a, (1.0, 1.0)
        if abs(a[1] - b[1]) < 1e-9 or abs(a[0] - b[0]) < 1e-12:
            return max(0.0, b[0] * self.goal / max(b[1], 1e-9))
        s = b[0] + (self.goal - b[1]) * (a[0] - b[0]) / (a[1] - b[1])
        return min(1.0, max(0.0, s))

    @staticmethod
    def _key(plan: Plan) -> tuple[tuple[str, int], ...]:
        return tuple((d.group, len(d.keep)) for d in plan.decisions)

    def measured(self, plan: Plan) -> bool:
        return self._key(plan) in self._seen

    def nudge(self, plan: Plan, s_goal: float) -> float | None:
        """The next budget after one that gave a plan measured before: ``s_goal`` rescaled by
        goal / that plan's measured fraction. Where the model is coarse near the goal (one
        group's next count jumps over it), a range of budgets gives the same plan; after
        :data:`MAX_NUDGES` such budgets, or at an end of the range, None ends the loop."""
        r = self.history[self._seen[self._key(plan)]][1]
        if self.close(r):
            return None
        s = min(1.0, max(0.0, s_goal * self.goal / max(r, 1e-9)))
        self.nudges += 1
        return None if self.nudges > MAX_NUDGES or abs(s - s_goal) < 1e-6 else s

    def record(self, plan: Plan, s: float, dense_ms: float, pruned_ms: float) -> None:
        r = pruned_ms / dense_ms
        log.info("latency: plan at predicted layer fraction %.3f measured %.3f (goal %.3f)",
                 s, r, self.goal)
        self._seen[self._key(plan)] = len(self.history)
        self.history.append((s, r, dense_ms, pruned_ms, plan))

    def best(self) -> tuple[float, float, float, float, Plan]:
        return min(self.history, key=lambda h: abs(h[1] / self.goal - 1))
