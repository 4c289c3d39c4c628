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
4. **Correct** (:mod:`shrink.latency.correct`): the measured points calibrate the next
   budget, or pick a plan between two that bracket the goal, until one is within half the
   tolerance or the corrections run out.
5. **Explore**: the allocation at budgets a little above the plan within half the tolerance
   is measured when it is worth more (``LatencyTarget.explore``); the most valuable plan
   within half the tolerance is returned, else the closest, and the report says whether it
   is within the tolerance.

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
from shrink.latency.correct import Corrections, Point
from shrink.latency.layers import Term, inner_layers, layer_calls, terms
from shrink.latency.measure import Bench, bench_for, llc_bytes
from shrink.latency.options import LatencyTarget
from shrink.latency.solve import Choice, Cost, Problem
from shrink.latency.table import Axis, Table
from shrink.latency.value import LossMemo, loss_values, score_value
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
    memo: LossMemo | None = None,
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
        memo: with ``target.valuation``, the losses measured by an earlier call on the same
            model (filled in by this one).

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
        valuation = "scores"
        if target.valuation is not None:
            with stage("latency valuation"):
                memo = {} if memo is None else memo
                t0 = time.perf_counter()
                choices = loss_values(model, groups, scores, choices, target.valuation,
                                      fingerprint, memo)
                valuation = (f"loss ({len(memo) - 1} pruned copies, "
                             f"{time.perf_counter() - t0:.1f} s)")
        with stage("latency tables"):
            bound = terms(layer_calls(model, inputs), groups, {c.id for c in choices},
                          bench.block, inner_layers(model))
            cold = sum(p.numel() * p.element_size() for p in model.parameters()) > llc_bytes()
            tables, measured = _tables(bound, bench, batch, cache, cold)
        problem = Problem(choices, _costs(bound, tables, choices, cold))
        p_dense = sum(t.call.calls * float(tables[_signature(t, cold)].at(
            t.in_axis.extent, t.out_axis.extent)) for t in bound)
        with stage("latency dense"):
            m_dense = bench.models_ms({"dense": model}, feed, target.seconds / 2)["dense"]
        points = fingerprint
        if p_dense < (1 - UNEXPLAINED) * m_dense:
            with stage("latency group kinds"):
                extra, offset = _kind_costs(bench, model, feed, groups, scores, bound, problem,
                                            choices, fingerprint, m_dense,
                                            target.seconds / 2)
            if extra:
                problem = Problem(choices, _costs(bound, tables, choices, cold) + extra, offset)
                p_dense = problem.latency([len(c.counts) - 1 for c in problem.choices])
                points = f"{fingerprint}/kinds"   # points of this model of the latency
        loop = Corrections(target, p_dense / max(m_dense, 1e-9), cache.points(points))

        def measure(counts: Mapping[str, int], why: str) -> Point:
            plan = plan_from_counts(groups, scores, counts, fingerprint)
            with stage(f"latency measure {len(loop.history) + 1}"):
                dense_ms, pruned_ms = _measure(bench, model, apply(model, plan), feed, loop)
            point = Point(problem.latency_of(counts) / p_dense, pruned_ms / dense_ms,
                          dense_ms, pruned_ms, plan, counts, problem.value_of(counts))
            log.info("latency: plan %d (%s): layer fraction %.3f, measured %.3f (goal %.3f)",
                     len(loop.history) + 1, why, point.s, point.r, loop.goal)
            loop.record(point)
            return point

        s_goal = loop.next_s()
        while s_goal is not None:
            between = None
            counts = problem.solve(s_goal * p_dense,
                                   lower=s_goal * p_dense * (1 - loop.band)).counts
            if loop.measured(counts):  # try a plan between two measured ones, or a new budget
                between = loop.between(problem.choices)
                if between is None:
                    s_goal = loop.nudge(counts)
                    continue
                counts = between
            measure(counts, "between" if between is not None else "budget")
            s_goal = loop.next_s()
        explored = 0
        for s_try in loop.explore_budgets():   # more value at the same measured latency
            if explored >= target.explore:
                break
            best = loop.best()
            counts = problem.solve(s_try * p_dense, lower=best.s * p_dense).counts
            if loop.measured(counts) or problem.value_of(counts) <= best.value:
                continue
            explored += 1
            measure(counts, "explore")   # the model errs plan by plan: a miss ends nothing
        cache.add_points(points, [(p.s, p.r) for p in loop.history])
        cache.save()
    best = loop.best()
    report = LatencyReport(
        runtime=target.runtime.value, threads=target.threads, batch=batch,
        goal=1 - target.ratio, dense_ms=best.dense_ms, pruned_ms=best.pruned_ms,
        predicted=loop.predicted(best.s), corrections=len(loop.history) - 1 - explored,
        converged=loop.met(best.r), layer_shapes=len(tables), measured_shapes=measured,
        seconds=time.perf_counter() - start,
        history=tuple((loop.predicted(p.s), p.r) for p in loop.history), valuation=valuation,
        explored=explored)
    log.info("shrink: %s", report)
    return LatencySolution(best.plan, report)


def _measure(bench: Bench, dense: nn.Module, pruned: nn.Module, feed: tuple[Any, ...],
             loop: Corrections) -> tuple[float, float]:
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
        out.append(Choice(g.id, counts, tuple(score_value(g, scores[g.id], k) for k in counts)))
    return out


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


UNEXPLAINED = 0.25
"""Share of the dense model's measured time the layer tables may leave out before each kind of
group is measured end to end (:func:`_kind_costs`)."""


def _kind_costs(bench: Bench, model: nn.Module, feed: tuple[Any, ...],
                groups: Sequence[ChannelGroup], scores: Mapping[str, torch.Tensor],
                bound: Sequence[Term], problem: Problem, choices: Sequence[Choice],
                fingerprint: str, m_dense: float,
                seconds: float) -> tuple[list[Cost], float]:
    """What cutting each kind of group saves beyond its layers' tables, measured end to end.

    When the layer tables explain little of the model's time (a small transformer: norms,
    rotary embeddings, the attention products and hundreds of small nodes outside the linears),
    which groups are cheap to cut is not what the tables say: a hidden size saves the norms and
    adds around every layer, a head its attention products, an MLP width only its linears. So
    groups are sorted into *kinds* (the same layer signatures on the same sides: the MLP widths
    of every layer are one kind, the heads of every layer another), every group of a kind is cut
    to about half at once, the pruned model is timed against the dense one, and the time saved
    beyond what the tables predict becomes a cost linear in each group's kept count (spread
    over the kind's groups; negative when the tables overstate the saving).

    Returns the extra costs (choice indices into ``choices``, as :class:`Problem` takes them)
    and the offset that keeps their tables non-negative.
    """
    given = {c.id: i for i, c in enumerate(choices)}
    kinds: dict[tuple[Any, ...], list[int]] = {}
    for i, c in enumerate(problem.choices):
        if len(c.counts) < 2:
            continue
        sig = tuple(sorted((t.signature(), side, per) for t in bound
                           for side, axis in (("in", t.inp), ("out", t.out))
                           for gid, per in axis if gid == c.id))
        kinds.setdefault(sig, []).append(i)
    dense_idx = [len(c.counts) - 1 for c in problem.choices]
    dense_ms = problem.latency(dense_idx)
    extra: list[Cost] = []
    offset = 0.0
    for members in kinds.values():
        idx = list(dense_idx)
        for i in members:   # about half of each group
            idx[i] = _near_half(problem.choices[i].counts)
        counts_of = {problem.choices[i].id: problem.choices[i].counts[idx[i]] for i in members}
        try:
            plan = plan_from_counts(tuple(groups), scores, counts_of, fingerprint)
            ms = bench.models_ms({"dense": model, "pruned": apply(model, plan)}, feed, seconds)
        except Exception as e:  # a kind that cannot be timed keeps the tables' word
            log.info("latency: kind of %s not timed (%s: %s)", sorted(counts_of), type(e).__name__,
                     e)
            continue
        saved = (1 - ms["pruned"] / ms["dense"]) * m_dense
        predicted = dense_ms - problem.latency(idx)
        removed = sum(problem.choices[i].counts[-1] - problem.choices[i].counts[idx[i]]
                      for i in members)
        per_channel = (saved - predicted) / max(removed, 1)
        log.info("latency: kind of %d group(s) (%s, ...): %.3f ms saved at about half, tables "
                 "predict %.3f", len(members), problem.choices[members[0]].id, saved, predicted)
        for i in members:
            size = problem.choices[i].counts[-1]
            axis = Axis(size, 1, True)
            low = min(0.0, per_channel * size)   # keep the table non-negative
            table = Table(axis, Axis(1, 1, False), tuple(
                (per_channel * k - low,) for k in axis.points()))
            extra.append(Cost(table, ((given[problem.choices[i].id], 1.0),), 0.0, (), 1.0))
            offset -= low
    return extra, offset


def _near_half(counts: Sequence[int]) -> int:
    """The index of the count nearest half the largest, below the largest."""
    return min(range(len(counts) - 1), key=lambda j: abs(counts[j] - counts[-1] / 2))


def _signature(term: Term, cold: bool) -> str:
    return term.signature() + (" cold" if cold else "")


def _costs(bound: Sequence[Term], tables: Mapping[str, Table],
           choices: Sequence[Choice], cold: bool) -> list[Cost]:
    index = {c.id: i for i, c in enumerate(choices)}
    return [Cost(tables[_signature(t, cold)], tuple((index[g], p) for g, p in t.inp), t.in_fixed,
                 () if t.tied else tuple((index[g], p) for g, p in t.out),
                 t.out_fixed, t.call.calls) for t in bound]
