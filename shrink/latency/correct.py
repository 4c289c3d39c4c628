"""Corrections: from the plans measured end to end to the next plan to try.

Each measured plan is a point ``(s, r)``: ``s = P(plan) / P_dense`` is its layer-table latency as
a fraction of the dense model's, ``r`` its measured kept fraction of latency. The goal is
``r = 1 - ratio``.

* **Budget.** The next budget ``s`` interpolates linearly between the two points nearest the
  goal that bracket it, or extrapolates from the dense point ``(1, 1)`` through the nearest one
  when none is below it; with nothing measured, the uncalibrated model
  ``r = 1 - f * (1 - s)``, ``f = P_dense / M_dense``, gives it. Points cached from an earlier run
  on the same model stand in until this run has measured a plan.
* **Between.** The allocation maps budgets to plans in steps, and a measured latency can jump
  where the budget cannot (a pruned model whose weights come to fit in the last-level cache runs
  faster than its layers predict). When a budget gives a plan measured already and two plans
  bracket the goal, the next plan interpolates their counts instead (group by group, snapped
  to each group's candidate counts), which walks between them in plan space.
* **Nudge.** Otherwise the next budget steps past that plan's layer fraction towards the goal
  (by 0.01 of the dense latency, doubling), at most :data:`MAX_NUDGES` times, and never as far
  as a measured plan on the goal's other side: a plan past it is further from the goal.

The loop stops when a plan is within half the tolerance (a margin for the noise of a later
timing), after ``max_corrections`` corrections, or when nothing new can be tried.

* **Explore.** Plans of nearly the same latency can differ a lot in value, and the latency model
  errs by a few percent between them (on the digits CNN it put the uniform plan 2% over a budget
  that plan measured exactly at). So once a plan is within half the tolerance, the allocation
  at budgets a quarter and a half of the tolerance above its predicted latency is measured too
  when it is worth more (at most ``explore`` plans; one measured outside half the tolerance
  does not stop the next, since the model's error differs from plan to plan).

The most valuable plan within half the tolerance wins; without one, the closest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from shrink.latency.options import LatencyTarget
from shrink.latency.solve import Choice
from shrink.plan import Plan

MAX_NUDGES = 8
"""Budgets tried without a new plan before the correction loop gives up."""

Key = tuple[tuple[str, int], ...]


@dataclass(frozen=True, slots=True)
class Point:
    """A plan measured end to end: its layer fraction ``s``, its measured kept fraction ``r``
    and the timings, the plan and its kept counts."""

    s: float
    r: float
    dense_ms: float
    pruned_ms: float
    plan: Plan
    counts: Mapping[str, int]
    value: float = 0.0


def key(counts: Mapping[str, int]) -> Key:
    return tuple(sorted(counts.items()))


class Corrections:
    """The measured points of one allocation and what to try next (see the module doc)."""

    def __init__(self, target: LatencyTarget, f: float,
                 prior: Sequence[tuple[float, float]] = ()) -> None:
        self.target = target
        self.goal = 1 - target.ratio
        self.f = f
        self.prior = list(prior)
        self.history: list[Point] = []
        # the allocation aims at [1 - band, 1] of its budget: a quarter of the tolerance on the
        # measured fraction, carried over to the budget's scale
        self.band = target.tolerance / 4
        self._seen: dict[Key, int] = {}
        self.nudges = 0
        self._edged: set[Key] = set()   # plans nudged up to the other side's layer fraction

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
        """The next budget (a layer fraction), or None when the loop is done."""
        if self.history and (self.close(self.history[-1].r)
                             or len(self.history) > self.target.max_corrections):
            return None
        own = [(p.s, p.r) for p in self.history]
        points = [(1.0, 1.0), *own, *(self.prior if not own else [])]
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

    def measured(self, counts: Mapping[str, int]) -> bool:
        return key(counts) in self._seen

    def between(self, choices: Sequence[Choice]) -> dict[str, int] | None:
        """Unmeasured counts between the two measured plans nearest the goal on either side,
        or None when there is no such pair or no new plan between them."""
        below = [p for p in self.history if p.r <= self.goal]
        above = [p for p in self.history if p.r > self.goal]
        if not below or not above:
            return None
        lo = max(below, key=lambda p: p.r)
        hi = min(above, key=lambda p: p.r)
        for t in ((self.goal - lo.r) / (hi.r - lo.r), 0.5):
            counts = {c.id: _snap(c.counts, lo.counts[c.id]
                                  + t * (hi.counts[c.id] - lo.counts[c.id])) for c in choices}
            if not self.measured(counts):
                return counts
        return None

    def nudge(self, counts: Mapping[str, int]) -> float | None:
        """The next budget after one that gave the plan of ``counts``, measured before: just
        past that plan's layer fraction, towards the goal, by a step that doubles with every
        nudge (0.01, 0.02, ... of the dense latency); None ends the loop (after
        :data:`MAX_NUDGES`, at an end of the range, or when that plan is close enough).

        A measured plan on the goal's other side bounds the step: a budget at or past its
        layer fraction gives plans further from the goal than it (they were measured, twice, on
        the digits CNN), so the step stops at 0.9 of the way there, once per plan, and then the
        loop ends (nothing new between the two)."""
        k = key(counts)
        p = self.history[self._seen[k]]
        if self.close(p.r) or self.nudges >= MAX_NUDGES:
            return None
        up = p.r < self.goal
        step = min(0.2, 0.01 * 2 ** self.nudges)
        self.nudges += 1
        other = [q.s for q in self.history if (q.r > self.goal) == up]
        gap = ((min(other) - p.s) if up else (p.s - max(other))) if other else float("inf")
        if 0.0 < gap <= step + 1e-12:   # at or past it
            if k in self._edged:
                return None
            self._edged.add(k)
            step = 0.9 * gap
        s = p.s + (step if up else -step)
        return s if 0.0 < s < 1.0 else None

    def record(self, point: Point) -> None:
        self._seen[key(point.counts)] = len(self.history)
        self.history.append(point)

    def best(self) -> Point:
        """The most valuable measured plan within half the tolerance (the closer on a tie);
        without one, the plan closest to the goal."""
        close = [p for p in self.history if self.close(p.r)]
        if close:
            return max(close, key=lambda p: (p.value, -abs(p.r / self.goal - 1)))
        return min(self.history, key=lambda p: abs(p.r / self.goal - 1))

    def explore_budgets(self) -> tuple[float, ...]:
        """The layer-fraction budgets to explore above the best plan (see the module doc);
        none unless that plan is within half the tolerance."""
        best = self.best() if self.history else None
        if best is None or not self.close(best.r):
            return ()
        return tuple(best.s * (1 + f * self.target.tolerance) for f in (0.25, 0.5))


def _snap(counts: Sequence[int], k: float) -> int:
    """The candidate count nearest ``k`` (the larger on a tie)."""
    return min(counts, key=lambda c: (abs(c - k), -c))
