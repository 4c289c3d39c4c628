"""Allocation: the kept count of every group that keeps the most importance within a latency.

The problem. Group ``g`` keeps one of its candidate counts ``k_g`` (block steps, within
``min_keep``/``max_ratio``/``min_ratio``), worth ``V_g(k_g)`` (the sum of its ``k_g`` highest
normalised channel scores: concave in ``k_g``). Every layer call ``l`` costs
``T_l(c_in, c_out)`` from its table, where ``c_in`` and ``c_out`` are affine in the counts of
the groups on its input and output (:mod:`shrink.latency.layers`). Find

    max  sum_g V_g(k_g)   subject to   L(k) = sum_l T_l(c_in(k), c_out(k)) <= budget.

A layer couples the group of its input with the group of its output, so the latency is not a
sum of per-group terms and a plain knapsack does not apply. shrink relaxes the budget with a
multiplier ``lam`` (Lagrangian relaxation) and maximises

    sum_g V_g(k_g) - lam * L(k)

by *coordinate ascent*: starting from every group at its largest count, each group in turn
(sorted by id) takes the count that maximises the objective with its neighbours' counts fixed
(ties keep more channels), sweep after sweep until nothing changes. Every step raises the
objective, so this stops, at a point no single group can improve. ``L`` falls as ``lam`` grows;
bisection on ``log(lam)`` finds the smallest ``lam`` whose point meets the budget, and the best
feasible point seen is kept. Then a greedy *fill* spends what the budget has left: while some
group's next larger count fits, the one with the most importance per millisecond grows. Last,
when a floor is asked for (a latency target wants the budget met, not undercut) and the plan is
below it, *exchanges* (one group grows a step, others shrink to fit, then the budget left is
filled again) move it into the band.

A small problem (at most :attr:`Problem.exact_max` plans in all: a few groups) is solved
exactly instead: every plan is evaluated at once (the tables take arrays), and the best one in
the band (else the one closest below the budget) is taken. The relaxation is a heuristic: the
latency is not separable, and on a handful of groups with coarse steps its optimum can sit far
below the budget with nothing a single exchange can reach.

Coupled channels move together by construction: a group is one variable, whatever layers it
spans (a residual stream is one group across every block).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shrink.latency.table import Table


@dataclass(frozen=True, slots=True)
class Choice:
    """One group's options: candidate kept ``counts`` (ascending) and the importance kept at
    each (``value``, non-decreasing)."""

    id: str
    counts: tuple[int, ...]
    value: tuple[float, ...]


@dataclass(frozen=True, slots=True)
class Cost:
    """One layer call bound to the choices: ``c_in = in_fixed + sum(per * count[choice])``
    over ``inp`` (pairs of choice index and positions per channel), the same for the output;
    ``tied`` layers read only ``c_in``. Costs ``calls * table.at(c_in, c_out)`` ms."""

    table: Table
    inp: tuple[tuple[int, float], ...] = ()
    in_fixed: float = 0.0
    out: tuple[tuple[int, float], ...] = ()
    out_fixed: float = 0.0
    calls: int = 1


@dataclass(frozen=True, slots=True)
class Allocation:
    """The chosen count of every choice, its latency (ms, layer terms only) and importance."""

    counts: dict[str, int]
    latency: float
    value: float
    feasible: bool
    lam: float = 0.0


class Problem:
    """Choices and costs; evaluates latency and solves for a budget."""

    #: problems with at most this many plans are solved by enumerating them
    exact_max: int = 50_000

    def __init__(self, choices: Sequence[Choice], costs: Sequence[Cost],
                 offset: float = 0.0) -> None:
        self.offset = offset   # subtracted from the summed costs (tables kept non-negative)
        self.choices = sorted(choices, key=lambda c: c.id)
        order = {c.id: i for i, c in enumerate(choices)}
        remap = {order[c.id]: i for i, c in enumerate(self.choices)}
        self.costs = [Cost(c.table, tuple((remap[i], p) for i, p in c.inp), c.in_fixed,
                           tuple((remap[i], p) for i, p in c.out), c.out_fixed, c.calls)
                      for c in costs]
        self._k = [np.asarray(c.counts, dtype=np.float64) for c in self.choices]
        self._v = [np.asarray(c.value, dtype=np.float64) for c in self.choices]
        # per choice: (cost index, positions per channel on the input, on the output)
        self._touch: list[list[tuple[int, float, float]]] = [[] for _ in self.choices]
        for j, c in enumerate(self.costs):
            per: dict[int, list[float]] = {}
            for i, p in c.inp:
                per.setdefault(i, [0.0, 0.0])[0] += p
            for i, p in c.out:
                per.setdefault(i, [0.0, 0.0])[1] += p
            for i, (pi, po) in sorted(per.items()):
                self._touch[i].append((j, pi, po))

    def latency(self, idx: Sequence[int]) -> float:
        """Milliseconds of the layer terms with choice ``i`` at ``counts[idx[i]]``."""
        total = 0.0
        for c in self.costs:
            cin = c.in_fixed + sum(p * self._k[i][idx[i]] for i, p in c.inp)
            cout = c.out_fixed + sum(p * self._k[i][idx[i]] for i, p in c.out)
            total += c.calls * float(c.table.at(cin, cout))
        return total - self.offset

    def latency_of(self, counts: Mapping[str, int]) -> float:
        """:meth:`latency` of kept counts given by group id (each one of its candidates)."""
        return self.latency([c.counts.index(counts[c.id]) for c in self.choices])

    def value(self, idx: Sequence[int]) -> float:
        return float(sum(v[i] for v, i in zip(self._v, idx, strict=True)))

    def value_of(self, counts: Mapping[str, int]) -> float:
        """:meth:`value` of kept counts given by group id."""
        return self.value([c.counts.index(counts[c.id]) for c in self.choices])

    def _group_costs(self, g: int, idx: Sequence[int]) -> np.ndarray:
        """Latency of the layers touching choice ``g`` at each of its counts, others fixed."""
        k = self._k[g]
        total = np.zeros(len(k))
        for j, pin, pout in self._touch[g]:
            c = self.costs[j]
            cin = c.in_fixed + sum(p * self._k[i][idx[i]] for i, p in c.inp if i != g) + pin * k
            cout = (c.out_fixed + sum(p * self._k[i][idx[i]] for i, p in c.out if i != g)
                    + pout * k)
            total += c.calls * c.table.at(cin, cout)
        return total

    def ascend(self, lam: float, max_sweeps: int = 50) -> list[int]:
        """Coordinate ascent on ``value - lam * latency`` from the largest counts."""
        idx = [len(k) - 1 for k in self._k]
        for _ in range(max_sweeps):
            changed = False
            for g in range(len(self.choices)):
                obj = self._v[g] - lam * self._group_costs(g, idx)
                top = obj.max()
                best = int(np.flatnonzero(obj >= top - 1e-12 * max(1.0, abs(top)))[-1])
                if best != idx[g]:
                    idx[g], changed = best, True
            if not changed:
                break
        return idx

    def fill(self, idx: list[int], budget: float) -> list[int]:
        """Grow counts greedily (most importance per ms first) while the budget allows."""
        idx = list(idx)
        lat = self.latency(idx)
        while True:
            best: tuple[float, int, float] | None = None
            for g in range(len(self.choices)):
                if idx[g] + 1 >= len(self._k[g]):
                    continue
                costs = self._group_costs(g, idx)
                dc = float(costs[idx[g] + 1] - costs[idx[g]])
                dv = float(self._v[g][idx[g] + 1] - self._v[g][idx[g]])
                if lat + dc > budget * (1 + 1e-12):
                    continue
                rate = math.inf if dc <= 0 else dv / dc
                if best is None or rate > best[0]:
                    best = (rate, g, dc)
            if best is None:
                return idx
            idx[best[1]] += 1
            lat = self.latency(idx)

    def _shed(self, idx: list[int], budget: float, keep: int) -> list[int] | None:
        """Shrink groups other than ``keep`` (least importance lost per ms saved first) until
        the budget holds; None when it cannot."""
        idx = list(idx)
        while self.latency(idx) > budget * (1 + 1e-12):
            best: tuple[float, int] | None = None
            for g in range(len(self.choices)):
                if g == keep or idx[g] == 0:
                    continue
                costs = self._group_costs(g, idx)
                dc = float(costs[idx[g]] - costs[idx[g] - 1])
                if dc <= 0:
                    continue
                rate = float(self._v[g][idx[g]] - self._v[g][idx[g] - 1]) / dc
                if best is None or rate < best[0]:
                    best = (rate, g)
            if best is None:
                return None
            idx[best[1]] -= 1
        return idx

    def tighten(self, idx: list[int], budget: float, lower: float) -> list[int]:
        """Spend the budget down to ``lower``: while the latency is below it, grow one group
        by a step and shrink others to fit (:meth:`_shed`), taking the exchange that lands in
        ``[lower, budget]`` with the most importance (else the one that gets closest).

        Near the goal the optimum of the Lagrangian can jump: a group on many layers (a
        residual stream) changes the latency by more than the tolerance in one step, and the
        best plan under the budget is then well below it. An exchange trades importance for
        hitting the budget, which is what a latency target asks for.
        """
        for _ in range(4 * len(self.choices)):
            lat = self.latency(idx)
            if lat >= lower:
                break
            best: tuple[tuple[bool, float, float], list[int]] | None = None
            for g in range(len(self.choices)):
                if idx[g] + 1 >= len(self._k[g]):
                    continue
                grown = list(idx)
                grown[g] += 1
                cand = self._shed(grown, budget, g)
                if cand is None:
                    continue
                cand = self.fill(cand, budget)   # shedding in steps can overshoot
                c_lat = self.latency(cand)
                if c_lat <= lat * (1 + 1e-9):
                    continue
                key = (c_lat >= lower, self.value(cand) if c_lat >= lower else c_lat,
                       self.value(cand))
                if best is None or key > best[0]:
                    best = (key, cand)
            if best is None:
                break
            idx = best[1]
        return idx

    def solve(self, budget: float, lower: float | None = None, steps: int = 40) -> Allocation:
        """The allocation for a latency ``budget`` (ms of the layer terms); with ``lower``,
        one whose latency is at least ``lower`` when an exchange finds it (:meth:`tighten`).

        Returns the smallest counts everywhere, with ``feasible=False``, when even those exceed
        the budget.
        """
        dense = [len(k) - 1 for k in self._k]
        if self.latency(dense) <= budget or not self.choices:
            return self._result(dense, True, 0.0)
        least = [0] * len(self._k)
        if self.latency(least) > budget:
            return self._result(least, False, math.inf)
        if math.prod(len(k) for k in self._k) <= self.exact_max:
            return self._result(self.exhaustive(budget, lower), True, 0.0)
        # lam's scale: importance per millisecond of the dense model
        span = max(self.value(dense) - self.value(least), 1e-12)
        hi = span / max(self.latency(dense) - self.latency(least), 1e-12)
        best: list[int] = least
        best_lam = math.inf
        for _ in range(60):
            idx = self.ascend(hi)
            if self.latency(idx) <= budget:
                best, best_lam = idx, hi
                break
            hi *= 4
        lo = hi / 1e6
        for _ in range(steps):
            mid = math.sqrt(lo * hi)
            idx = self.ascend(mid)
            if self.latency(idx) <= budget:
                hi = mid
                if self.value(idx) >= self.value(best):
                    best, best_lam = idx, mid
            else:
                lo = mid
            if hi / lo < 1 + 1e-4:
                break
        best = self.fill(best, budget)
        if lower is not None:
            best = self.tighten(best, budget, lower)
        return self._result(best, True, best_lam)

    def exhaustive(self, budget: float, lower: float | None = None) -> list[int]:
        """The exact solution of a small problem: of every plan within ``budget``, the most
        valuable one at or above ``lower`` (ties keep more channels), else the one with the
        highest latency (then value). Call only when the budget admits the smallest plan."""
        grids = np.meshgrid(*[np.arange(len(k)) for k in self._k], indexing="ij")
        idx = [g.ravel() for g in grids]
        lat = np.zeros(idx[0].shape)
        for c in self.costs:
            cin = c.in_fixed + sum(p * self._k[i][idx[i]] for i, p in c.inp)
            cout = c.out_fixed + sum(p * self._k[i][idx[i]] for i, p in c.out)
            lat = lat + c.calls * c.table.at(np.broadcast_to(cin, lat.shape),
                                             np.broadcast_to(cout, lat.shape))
        lat = lat - self.offset
        value = np.sum([v[i] for v, i in zip(self._v, idx, strict=True)], axis=0)
        kept = np.sum([self._k[j][i] for j, i in enumerate(idx)], axis=0)
        ok = lat <= budget * (1 + 1e-12)
        band = ok & (lat >= lower) if lower is not None else ok
        if band.any():   # most value, then most channels kept, then least latency
            order = np.lexsort((-lat, kept, value))
            pick = order[band[order]][-1]
        else:
            order = np.lexsort((value, lat))
            pick = order[ok[order]][-1]
        return [int(i[pick]) for i in idx]

    def _result(self, idx: Sequence[int], feasible: bool, lam: float) -> Allocation:
        counts = {c.id: int(c.counts[i]) for c, i in zip(self.choices, idx, strict=True)}
        return Allocation(counts, self.latency(idx), self.value(idx), feasible, lam)
