"""The latency model, its cache and the allocation, on synthetic timings (nothing is timed here).

The synthetic runtime charges a layer by whole 16-channel blocks (as onnxruntime's NCHWc convs
do) and a whole model by the sum of its layers, scaled and offset (what the single-layer tables
miss), so the correction loop has something to correct.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from torch import nn

import shrink
from shrink.latency import LatencyTarget, Runtime, solve_latency
from shrink.latency import measure as latency_measure
from shrink.latency.cache import LatencyCache, cache_root
from shrink.latency.correct import Corrections, Point
from shrink.latency.layers import layer_calls, terms
from shrink.latency.measure import onnx_layer, torch_layer
from shrink.latency.solve import Choice, Cost, Problem
from shrink.latency.table import Axis, Table
from shrink.plan import ChannelGroup, IndexMap, Member, Side
from shrink.rules import LayerOp
from shrink.select import Global, candidate_counts

BLOCK = 16


def synthetic_ms(op: LayerOp, batch: int = 1) -> float:
    """A conv/linear that costs whole 16-channel blocks: ms ~ blocks_in * blocks_out * pixels."""
    blocks_in = math.ceil(op.c_in / op.groups / BLOCK)    # per output channel
    blocks_out = math.ceil(op.c_out / BLOCK)
    pixels = math.prod(op.spatial) if op.spatial else 1
    kernel = math.prod(op.kernel) if op.kernel else 1
    return 1e-5 * batch * pixels * kernel * (blocks_in * blocks_out + 2)


class SyntheticBench:
    """A runtime with block-step layers; a model costs ``scale * sum(layers) + constant``."""

    block = BLOCK

    def __init__(self, scale: float = 0.8, constant: float = 0.05, threads: int = 1) -> None:
        self.scale, self.constant, self.threads = scale, constant, threads
        self.layers_timed = 0
        self.models_timed = 0

    def __enter__(self) -> SyntheticBench:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def key(self) -> dict[str, str]:
        return {"runtime": "synthetic", "version": "1", "device": "none",
                "threads": str(self.threads)}

    def layer_ms(self, op: LayerOp, batch: int, cold: bool = False) -> float:
        self.layers_timed += 1
        return synthetic_ms(op, batch)

    def model_ms(self, model: nn.Module, inputs: tuple[Any, ...]) -> float:
        calls = layer_calls(model, inputs)
        return self.constant + self.scale * sum(c.calls * synthetic_ms(c.op) for c in calls)

    def models_ms(self, models: Mapping[str, nn.Module], inputs: tuple[Any, ...],
                  seconds: float) -> dict[str, float]:
        self.models_timed += 1
        return {label: self.model_ms(m, inputs) for label, m in models.items()}


def _group(gid: str, size: int, blocks: tuple[int, ...] = ()) -> ChannelGroup:
    m = Member(gid.split(":")[0], Side.OUT, size, IndexMap(tuple(range(size)), tuple(range(size))))
    return ChannelGroup(gid, size, (m,), blocks=blocks)


class Net(nn.Module):
    """conv0 -> [conv1 -> conv2] + residual -> depthwise -> conv3 -> pool -> fc."""

    def __init__(self) -> None:
        super().__init__()
        self.conv0 = nn.Conv2d(3, 128, 3, padding=1)
        self.conv1 = nn.Conv2d(128, 192, 3, padding=1)
        self.conv2 = nn.Conv2d(192, 128, 3, padding=1)
        self.dw = nn.Conv2d(128, 128, 3, padding=1, groups=128)
        self.conv3 = nn.Conv2d(128, 256, 1)
        self.fc = nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.conv0(x))
        y = y + self.conv2(torch.relu(self.conv1(y)))
        y = self.conv3(torch.relu(self.dw(y)))
        return self.fc(y.mean((2, 3)))


X = (torch.randn(1, 3, 16, 16),)


@pytest.fixture
def synthetic(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> SyntheticBench:
    """shrink.prune(target="latency") times on the synthetic runtime, caching under tmp_path."""
    bench = SyntheticBench()
    monkeypatch.setattr(latency_measure, "bench_for", lambda runtime, threads: bench)
    monkeypatch.setattr("shrink.latency.target.bench_for", lambda runtime, threads: bench)
    monkeypatch.setenv("SHRINK_CACHE_DIR", str(tmp_path))
    return bench


# -- the table ------------------------------------------------------------------------------

def test_axis_points_are_block_multiples_from_one_block_to_the_extent() -> None:
    assert Axis(256, 16).points() == (16, 64, 128, 192, 256)
    assert Axis(64, 16).points() == (16, 32, 48, 64)
    assert Axis(24, 16).points() == (16, 24)
    assert Axis(8, 16).points() == (8,)             # at most one block: one point
    assert Axis(256, 16, variable=False).points() == (256,)


def test_table_is_constant_within_a_block_and_linear_between_measured_points() -> None:
    inp, out = Axis(256, 16), Axis(3, 1, variable=False)
    step = [math.ceil(p / 16) * 1.0 for p in inp.points()]   # 1 ms per block
    table = Table(inp, out, tuple((v,) for v in step))
    ms = table.at(np.arange(1, 257), 3)
    blocks = np.ceil(np.arange(1, 257) / 16)
    np.testing.assert_allclose(ms, blocks)                   # linear in blocks between points
    assert table.at(97, 3) == table.at(112, 3) < table.at(113, 3)   # 97..112 is one block
    # a point that is not linear in blocks is interpolated linearly between its neighbours
    bent = Table(inp, out, ((1.0,), (4.0,), (10.0,), (12.0,), (16.0,)))
    assert float(bent.at(96, 3)) == pytest.approx((4.0 + 10.0) / 2)
    assert float(bent.at(81, 3)) == float(bent.at(96, 3))


def test_table_interpolates_bilinearly_over_both_axes() -> None:
    inp, out = Axis(32, 16), Axis(32, 16)
    table = Table(inp, out, ((1.0, 2.0), (3.0, 4.0)))
    assert float(table.at(16, 16)) == 1.0
    assert float(table.at(32, 32)) == 4.0
    assert float(table.at(24, 24)) == 4.0            # 17..32 is the second block on both axes
    np.testing.assert_allclose(table.at(np.array([16, 32]), np.array([32, 16])), [2.0, 3.0])


def test_table_round_trips_and_refuses_corrupt_data() -> None:
    table = Table(Axis(64, 16), Axis(10, 1, False), ((1.0,), (2.0,), (3.0,), (4.0,)))
    assert Table.from_dict(json.loads(json.dumps(table.to_dict()))) == table
    with pytest.raises(shrink.ConfigError, match="latency table"):
        Table.from_dict({"in": [64, 16, True], "out": [10, 1, False], "ms": [[1.0]]})
    with pytest.raises(shrink.ConfigError, match="not a latency table"):
        Table.from_dict({"ms": []})


# -- the allocation -------------------------------------------------------------------------

def _chain_problem(sizes: list[int], scores: list[torch.Tensor], round_to: int | str = 1,
                   min_keep: int = 1) -> tuple[Problem, list[ChannelGroup]]:
    """Convs in a chain: conv i reads group i-1 and writes group i (16x16 pixels, 3x3)."""
    groups = [_group(f"c{i}:out", n) for i, n in enumerate(sizes)]
    policy = Global(0.0, round_to=round_to, min_keep=min_keep)
    choices = []
    for g, s in zip(groups, scores, strict=True):
        s = s / s.mean()
        ranked = s.sort(descending=True).values
        counts = candidate_counts(g, policy, BLOCK)
        choices.append(Choice(g.id, counts, tuple(float(ranked[:k].sum()) for k in counts)))
    costs = []
    for i, n in enumerate(sizes):
        c_in = 3 if i == 0 else sizes[i - 1]
        inp_axis = Axis(c_in, BLOCK, i > 0)
        out_axis = Axis(n, BLOCK)
        ms = tuple(tuple(synthetic_ms(LayerOp("conv", a, b, (16, 16), (3, 3)))
                         for b in out_axis.points()) for a in inp_axis.points())
        costs.append(Cost(Table(inp_axis, out_axis, ms), ((i - 1, 1.0),) if i else (), 0.0 if i
                          else c_in, ((i, 1.0),), 0.0))
    return Problem(choices, costs), groups


def _scores(sizes: list[int], seed: int = 0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(n, generator=gen, dtype=torch.float64) ** 3 + 0.01 for n in sizes]


def test_solver_picks_kept_counts_on_block_steps_of_the_table() -> None:
    sizes = [64, 96, 128, 64]
    problem, _ = _chain_problem(sizes, _scores(sizes), round_to=1)  # every count allowed
    dense = problem.latency([len(c.counts) - 1 for c in problem.choices])
    alloc = problem.solve(0.5 * dense)
    assert alloc.feasible
    assert alloc.latency <= 0.5 * dense
    # a partial block costs a full one, so importance is free up to the block's end
    assert all(k % BLOCK == 0 for k in alloc.counts.values()), alloc.counts


def test_solver_meets_the_budget_and_beats_a_uniform_ratio_at_the_same_latency() -> None:
    sizes = [64, 256, 128, 512, 64]
    problem, groups = _chain_problem(sizes, _scores(sizes, seed=3), round_to="auto")
    for keep in (0.75, 0.5, 0.25):
        uniform = [max(0, c.counts.index(min(c.counts, key=lambda k, n=g.size:
                                             abs(k - keep * n))))
                   for c, g in zip(problem.choices, groups, strict=True)]
        budget = problem.latency(uniform)
        alloc = problem.solve(budget)
        assert alloc.latency <= budget * (1 + 1e-9)
        assert alloc.value > problem.value(uniform), (keep, alloc.counts)


def test_solver_respects_min_keep_and_reports_an_infeasible_budget() -> None:
    sizes = [64, 128, 64]
    problem, _ = _chain_problem(sizes, _scores(sizes), round_to="auto", min_keep=48)
    alloc = problem.solve(1e-9)
    assert not alloc.feasible
    assert all(k >= 48 for k in alloc.counts.values())
    assert all(k >= 48 for k in problem.solve(0.4 * alloc.latency + 0.6 * problem.latency(
        [len(c.counts) - 1 for c in problem.choices])).counts.values())


def test_small_problems_are_solved_exactly_and_land_in_the_band() -> None:
    """At most ``exact_max`` plans: the best of every plan within the budget (checked against
    a loop over all of them); the relaxation never finds a better one; with a floor, the best
    plan in ``[lower, budget]``, and the closest below when none is in it."""
    import itertools

    sizes = [32, 64, 48, 128]
    problem, _ = _chain_problem(sizes, _scores(sizes, seed=5), round_to="auto")
    plans = list(itertools.product(*(range(len(c.counts)) for c in problem.choices)))
    assert len(plans) <= problem.exact_max
    lats = [problem.latency(p) for p in plans]
    dense = max(lats)
    relaxed = Problem(problem.choices, problem.costs)
    relaxed.exact_max = 0
    for frac in (0.3, 0.45, 0.6, 0.75, 0.9):
        budget = frac * dense
        best = max(problem.value(p) for p, lat in zip(plans, lats, strict=True) if lat <= budget)
        alloc = problem.solve(budget)
        assert alloc.latency <= budget and alloc.value == pytest.approx(best), frac
        assert relaxed.solve(budget).value <= best + 1e-9
        lower = budget * 0.97
        inside = [problem.value(p) for p, lat in zip(plans, lats, strict=True)
                  if lower <= lat <= budget]
        banded = problem.solve(budget, lower=lower)
        if inside:
            assert lower <= banded.latency <= budget
            assert banded.value == pytest.approx(max(inside)), frac
        else:
            assert banded.latency == max(lat for lat in lats if lat <= budget)


def test_candidate_counts_follow_round_to_min_keep_bounds_and_conv_blocks() -> None:
    g = _group("a:out", 64)
    assert candidate_counts(g, Global(0.0, round_to="auto"), 16) == (16, 32, 48, 64)
    assert candidate_counts(g, Global(0.0, round_to="auto", min_keep=20), 16) == (32, 48, 64)
    assert candidate_counts(g, Global(0.0, round_to=1, max_ratio=0.5), 16)[0] == 32
    assert candidate_counts(g, Global(0.0, round_to=1, min_ratio=0.25), 16)[-1] == 48
    grouped = _group("g:out", 24, blocks=tuple(i // 8 for i in range(24)))  # 3 conv groups of 8
    # every conv group keeps the same count; round_to does not apply to grouped convs
    assert candidate_counts(grouped, Global(0.0, round_to="auto"), 16) == tuple(range(3, 25, 3))


# -- the model: layers, groups and prune ----------------------------------------------------

def test_layer_calls_tie_residual_depthwise_and_flatten_to_their_groups() -> None:
    model = Net().eval()
    analysis = shrink.analyze(shrink.capture(model, X))
    variable = {g.id for g in analysis.prunable}
    bound = {t.call.module: t for t in terms(layer_calls(model, X), analysis.groups, variable,
                                             BLOCK)}
    assert set(bound) == {"conv0", "conv1", "conv2", "dw", "conv3", "fc"}
    residual = {g for g, _ in bound["conv0"].out}
    assert {g for g, _ in bound["conv2"].out} == residual    # coupled: one variable
    assert bound["dw"].tied
    assert bound["dw"].in_axis.variable
    assert not bound["dw"].out_axis.variable
    assert bound["conv0"].in_fixed == 3       # the image's channels
    assert not bound["conv0"].inp
    assert bound["fc"].out_fixed == 10        # the classes (pinned)
    assert not bound["fc"].out
    dw = bound["dw"].op_at(32, 0)
    assert (dw.c_in, dw.c_out, dw.groups) == (32, 32, 32)


def test_prune_to_latency_moves_coupled_members_together_and_meets_the_target(
        synthetic: SyntheticBench) -> None:
    model = Net().eval()
    res = shrink.prune(model, X, shrink.PruneConfig(0.5, target="latency"))
    lat = res.report.latency
    assert lat is not None
    assert lat.converged
    assert abs(lat.measured / 0.5 - 1) <= 0.05
    assert synthetic.model_ms(res.model, X) / synthetic.model_ms(model, X) == pytest.approx(
        lat.measured)
    # the residual stream is one group: conv0, conv2 and the depthwise conv keep one count
    assert res.model.conv0.out_channels == res.model.conv2.out_channels \
        == res.model.dw.in_channels == res.model.conv3.in_channels
    kept = [len(d.keep) for d in res.plan.decisions]
    assert all(k % BLOCK == 0 for k in kept)
    assert any(d.message.startswith("latency") for d in res.analysis.diagnostics)


class Stream(nn.Module):
    """A transformer-like residual stream: ``inp`` -> 4 x (x + fc2(relu(fc1(x)))) -> ``out``.
    The hidden size is one group over 10 linears; each MLP width spans 2."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(32, 128)
        self.fc1 = nn.ModuleList(nn.Linear(128, 256) for _ in range(4))
        self.fc2 = nn.ModuleList(nn.Linear(256, 128) for _ in range(4))
        self.out = nn.Linear(128, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inp(x)
        for fc1, fc2 in zip(self.fc1, self.fc2, strict=True):
            y = y + fc2(torch.relu(fc1(y)))
        return self.out(y)


@pytest.mark.xfail(strict=True, reason="known limitation of valuation='scores' (docs/latency.md, "
                   "accuracy at equal latency): each channel is valued at its score over its "
                   "group's mean, so a group spanning every layer is cut first; "
                   "valuation='loss' keeps it (the next test)")
def test_a_group_is_worth_the_layers_it_spans(synthetic: SyntheticBench) -> None:
    """Wanted: the hidden size (one group over all 10 linears) valued like the layers it sets,
    keeping at half the latency at least the fraction the MLP widths keep (each spans 2
    linears), and more than half. Today each channel is worth its score over its group's mean,
    so its 128 channels are worth half of one MLP layer's 256 and it is cut first (to 48 of
    128, the MLPs keeping about 200 of 256). Weighting a group by its layers (tried in commit
    1fe2ff7) passes this test but did not make accuracy at equal latency better than a
    uniform ratio on the trained models and kept less importance on the CNN suite, so it was
    reverted."""
    model = Stream().eval()
    x = (torch.randn(1, 16, 32),)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, target="latency"))
    assert res.report.latency is not None and res.report.latency.converged
    hidden = res.model.inp.out_features / 128
    mlp = [fc.out_features / 256 for fc in res.model.fc1]
    assert hidden >= max(mlp) and hidden > 0.5, (hidden, mlp)


def test_prune_to_latency_keeps_pinned_groups_and_min_keep(synthetic: SyntheticBench) -> None:
    model = Net().eval()
    res = shrink.prune(model, X, shrink.PruneConfig(0.4, target="latency", ignore=["conv1"],
                                                    min_keep=32))
    assert res.model.conv1.out_channels == 192
    assert all(len(d.keep) >= 32 for d in res.plan.decisions)


def test_corrections_converge_when_the_model_misses_most_of_the_time(tmp_path: Path) -> None:
    model = Net().eval()
    analysis = shrink.analyze(shrink.capture(model, X))
    scores = shrink.score(analysis.groups, model, shrink.PruneConfig(0.5).criterion)
    bench = SyntheticBench(scale=0.4, constant=0.02)      # the tables overstate savings 2.5x
    sol = solve_latency(model, X, analysis.groups, scores, LatencyTarget(0.4), analysis.model,
                        bench=bench, cache_dir=tmp_path)
    assert sol.report.converged
    assert abs(sol.report.measured / 0.6 - 1) <= 0.05
    assert 1 <= len(sol.report.history) <= 5
    # the calibration is cached: the same model starts calibrated, no layer is timed again
    again = SyntheticBench(scale=0.4, constant=0.02)
    sol2 = solve_latency(model, X, analysis.groups, scores, LatencyTarget(0.4), analysis.model,
                         bench=again, cache_dir=tmp_path)
    assert again.layers_timed == 0
    assert sol2.report.measured_shapes == 0
    assert len(sol2.report.history) <= len(sol.report.history)


def test_an_unreachable_target_returns_the_closest_plan_and_says_so(tmp_path: Path) -> None:
    model = Net().eval()
    analysis = shrink.analyze(shrink.capture(model, X))
    scores = shrink.score(analysis.groups, model, shrink.PruneConfig(0.5).criterion)
    bench = SyntheticBench(constant=50.0)                 # almost all of it is not prunable
    sol = solve_latency(model, X, analysis.groups, scores, LatencyTarget(0.5), analysis.model,
                        bench=bench, cache_dir=tmp_path)
    assert not sol.report.converged
    assert sol.report.measured > 0.9
    assert "NOT met" in str(sol.report)


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_more_valuable_plans_of_the_same_measured_latency_are_explored(
        ratio: float, tmp_path: Path) -> None:
    """Once a plan is within half the tolerance, the allocation just above its predicted latency
    is measured too; the most valuable plan within half the tolerance is returned."""
    from shrink.latency.value import score_value

    model = Net().eval()
    analysis = shrink.analyze(shrink.capture(model, X))
    scores = shrink.score(analysis.groups, model, shrink.PruneConfig(0.5).criterion)
    sizes = {g.id: g for g in analysis.groups}

    def value(plan: shrink.Plan) -> float:
        kept = {d.group: len(d.keep) for d in plan.decisions}
        return sum(score_value(sizes[g], scores[g], kept.get(g, sizes[g].size))
                   for g in scores if sizes[g].prunable)

    sols = {ex: solve_latency(model, X, analysis.groups, scores, LatencyTarget(ratio, explore=ex),
                              analysis.model, bench=SyntheticBench(),
                              cache_dir=tmp_path / str(ex)) for ex in (0, 2)}
    plain, explored = sols[0].report, sols[2].report
    assert plain.explored == 0
    assert 1 <= explored.explored <= 2           # this net has such plans at every ratio here
    assert explored.history[:len(plain.history)] == plain.history   # the same corrections
    assert len(explored.history) == len(plain.history) + explored.explored
    assert explored.corrections == plain.corrections
    assert abs(explored.measured / (1 - ratio) - 1) <= 0.025          # half the tolerance
    assert value(sols[2].plan) > value(sols[0].plan)
    assert f"{explored.explored} more valuable plan(s) tried" in str(explored)


def test_the_most_valuable_plan_within_half_the_tolerance_wins() -> None:
    loop = Corrections(LatencyTarget(0.5), f=1.0)
    assert loop.explore_budgets() == ()
    loop.record(Point(0.40, 0.60, 1.0, 0.60, shrink.Plan("fp", (), ()), {"a": 64}, value=9.0))
    assert loop.explore_budgets() == ()                        # nothing close yet
    loop.record(Point(0.30, 0.505, 1.0, 0.505, shrink.Plan("fp", (), ()), {"a": 40}, value=5.0))
    loop.record(Point(0.31, 0.495, 1.0, 0.495, shrink.Plan("fp", (), ()), {"a": 36}, value=4.0))
    assert loop.best().counts == {"a": 40}                     # more value, both close
    assert loop.explore_budgets() == pytest.approx((0.30 * 1.0125, 0.30 * 1.025))
    far = Corrections(LatencyTarget(0.5), f=1.0)               # none close: the closest
    far.record(Point(0.4, 0.54, 1.0, 0.54, shrink.Plan("fp", (), ()), {"a": 48}, value=9.0))
    far.record(Point(0.3, 0.47, 1.0, 0.47, shrink.Plan("fp", (), ()), {"a": 32}, value=1.0))
    assert far.best().counts == {"a": 32}


def _point(s: float, r: float, counts: dict[str, int]) -> Point:
    return Point(s, r, 1.0, r, shrink.Plan("fp", (), ()), counts)


def test_corrections_calibrate_the_budget_on_measured_points() -> None:
    loop = Corrections(LatencyTarget(0.5), f=0.8)
    assert loop.next_s() == pytest.approx(1 - 0.5 / 0.8)     # uncalibrated model
    loop.record(_point(0.4, 0.3, {"a": 16}))                  # saved more than predicted
    # between the dense point (1, 1) and (0.4, 0.3): r = 0.5 at s = 0.4 + 0.2 * 0.6 / 0.7
    assert loop.next_s() == pytest.approx(0.4 + 0.2 * 0.6 / 0.7)
    loop.record(_point(0.6, 0.56, {"a": 32}))
    assert loop.next_s() == pytest.approx(0.4 + 0.2 * 0.2 / 0.26)   # the bracketing pair
    loop.record(_point(0.55, 0.505, {"a": 48}))
    assert loop.next_s() is None                               # within half the tolerance
    assert loop.best().counts == {"a": 48}


def test_corrections_walk_between_plans_that_bracket_a_jump() -> None:
    loop = Corrections(LatencyTarget(0.5), f=1.0)
    choices = [Choice("a", (16, 32, 48, 64), (1, 2, 3, 4)), Choice("b", (8, 16), (1, 2))]
    assert loop.between(choices) is None                       # nothing measured yet
    loop.record(_point(0.5, 0.40, {"a": 16, "b": 8}))
    loop.record(_point(0.6, 0.60, {"a": 64, "b": 16}))
    # halfway in r: halfway in every group's count, snapped to its candidates
    assert loop.between(choices) == {"a": 48, "b": 16}
    assert loop.measured({"a": 64, "b": 16})
    # a budget that repeats a measured plan steps past it, towards the goal, doubling
    assert loop.nudge({"a": 64, "b": 16}) == pytest.approx(0.59)
    assert loop.nudge({"a": 16, "b": 8}) == pytest.approx(0.52)


def test_nudges_stop_short_of_a_measured_plan_on_the_other_side_of_the_goal() -> None:
    """Found on the digits CNN (benchmarks/latency_eval.py digits --data hard): with the goal
    between two plans one step apart, the doubling nudge went past the other plan and measured
    two plans further from the goal than either (kept 0.75 and 0.51 for a goal of 0.64)."""
    loop = Corrections(LatencyTarget(0.5), f=1.0)
    loop.record(_point(0.5, 0.45, {"a": 16}))
    loop.record(_point(0.6, 0.60, {"a": 32}))
    steps = [loop.nudge({"a": 16}) for _ in range(4)]
    assert steps == pytest.approx([0.51, 0.52, 0.54, 0.58])   # doubling, towards the goal
    assert loop.nudge({"a": 16}) == pytest.approx(0.59)       # 0.66 would pass (0.6, 0.60)
    assert loop.nudge({"a": 16}) is None                      # nothing new between the two
    down = Corrections(LatencyTarget(0.5), f=1.0)
    down.record(_point(0.5, 0.45, {"a": 16}))
    down.record(_point(0.52, 0.60, {"a": 32}))
    assert down.nudge({"a": 32}) == pytest.approx(0.51)
    assert down.nudge({"a": 32}) == pytest.approx(0.502)      # 0.9 of the way to 0.5
    assert down.nudge({"a": 32}) is None
    alone = Corrections(LatencyTarget(0.5), f=1.0)             # no plan on the other side
    alone.record(_point(0.5, 0.45, {"a": 16}))
    assert [alone.nudge({"a": 16}) for _ in range(6)] == pytest.approx(
        [0.51, 0.52, 0.54, 0.58, 0.66, 0.7])


# -- the cache ------------------------------------------------------------------------------

KEY = {"runtime": "onnxruntime-cpu", "version": "onnxruntime 1.0", "device": "cpu",
       "threads": "1", "batch": "1", "input": "3x224x224"}


def test_cache_round_trips_json_and_is_keyed_by_environment(tmp_path: Path) -> None:
    table = Table(Axis(64, 16), Axis(10, 1, False), ((1.0,), (2.0,), (3.0,), (4.0,)))
    cache = LatencyCache(KEY, tmp_path)
    cache.put("conv sig", table)
    cache.add_points("fp", [(0.5, 0.6)])
    cache.save()
    data = json.loads(cache.path.read_text())                  # plain JSON
    assert data["key"] == KEY
    assert "conv sig" in data["tables"]
    again = LatencyCache(dict(KEY), tmp_path)
    assert again.get("conv sig") == table
    assert again.points("fp") == [(0.5, 0.6)]
    for change in ({"threads": "2"}, {"batch": "8"}, {"input": "3x64x64"},
                   {"device": "other cpu"}, {"version": "onnxruntime 2.0"}):
        other = LatencyCache({**KEY, **change}, tmp_path)
        assert other.get("conv sig") is None, change
        assert other.path != cache.path


def test_cache_ignores_a_corrupt_file_and_honours_shrink_cache_dir(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHRINK_CACHE_DIR", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c" / "latency"
    cache = LatencyCache(KEY)
    cache.path.parent.mkdir(parents=True)
    cache.path.write_text("{not json")
    fresh = LatencyCache(KEY)
    assert fresh.tables == {}
    fresh.put("s", Table(Axis(8, 16), Axis(8, 16), ((1.0,),)))
    fresh.save()
    assert LatencyCache(KEY).get("s") is not None


# -- options --------------------------------------------------------------------------------

@pytest.mark.parametrize(("options", "match"), [
    ({"target": "latency", "runtime": "tpu"}, "runtime='tpu'"),
    ({"target": "latency", "threads": 0}, "threads"),
    ({"target": "latency", "batch": -1}, "batch"),
    ({"target": "latency", "scope": "local"}, "scope='local'"),
    ({"runtime": "torch-cpu"}, "runtime apply to target='latency' only"),
    ({"target": "macs", "threads": 2}, "threads apply to target='latency' only"),
])
def test_bad_latency_options_are_config_errors_naming_the_option(options: dict[str, Any],
                                                                  match: str) -> None:
    with pytest.raises(shrink.ConfigError, match=match):
        shrink.PruneConfig(0.5, **options)


def test_latency_target_needs_example_inputs_and_a_ratio() -> None:
    with pytest.raises(shrink.ConfigError, match="example_inputs"):
        shrink.compress(Net(), 0.5, target="latency")
    with pytest.raises(shrink.ConfigError, match="amount"):
        shrink.PruneConfig(amount=2, target="latency")
    with pytest.raises(shrink.ConfigError, match=r"LatencyTarget\.ratio"):
        LatencyTarget(1.5)


def test_config_builds_the_latency_target() -> None:
    target = shrink.PruneConfig(0.3, target="latency", runtime="torch-cpu", threads=2,
                                batch=4).policy
    assert isinstance(target, LatencyTarget)
    assert (target.ratio, target.runtime, target.threads, target.batch) == (
        0.3, Runtime.TORCH_CPU, 2, 4)
    assert target.policy.round_to == "auto"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_torch_cuda_without_cuda_is_a_config_error() -> None:
    with pytest.raises(shrink.ConfigError, match="torch-cuda"):
        latency_measure.bench_for(Runtime.TORCH_CUDA, 1)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("runtime", [Runtime.TORCH_CUDA, Runtime.ORT_CUDA])
def test_cuda_runtimes_time_a_layer(runtime: Runtime) -> None:
    if runtime is Runtime.ORT_CUDA:
        ort = pytest.importorskip("onnxruntime")
        if "CUDAExecutionProvider" not in ort.get_available_providers():
            pytest.skip("onnxruntime has no CUDAExecutionProvider")
    with latency_measure.bench_for(runtime, 1) as bench:
        assert bench.layer_ms(LayerOp("conv", 32, 32, (16, 16), (3, 3), (1, 1), (1, 1, 1, 1),
                                      (1, 1)), 1) > 0


# -- the single-layer graphs ----------------------------------------------------------------

@pytest.mark.parametrize("op", [
    LayerOp("conv", 16, 32, (9, 9), (3, 3), (2, 2), (1, 1, 1, 1), (1, 1), 1, True),
    LayerOp("conv", 16, 16, (8, 8), (3, 3), (1, 1), (1, 1, 1, 1), (1, 1), 16, False),
    LayerOp("conv", 12, 24, (10,), (3,), (1,), (2, 2), (2,), 3, True),
    LayerOp("linear", 20, 7, (5,), bias=True),
    LayerOp("linear", 20, 7, (), bias=False),
], ids=["conv-s2", "depthwise", "conv1d-grouped", "linear-tokens", "linear-2d"])
def test_single_layer_graphs_compute_what_the_layer_computes(op: LayerOp) -> None:
    ort = pytest.importorskip("onnxruntime")
    onnx = pytest.importorskip("onnx")
    model = onnx_layer(op, 2)
    weights = {t.name: torch.from_numpy(onnx.numpy_helper.to_array(t).copy())
               for t in onnx.load_from_string(model).graph.initializer}
    layer = torch_layer(op)
    with torch.no_grad():
        layer.weight.copy_(weights["W"].T if op.kind == "linear" else weights["W"])
        if op.bias:
            layer.bias.copy_(weights["B"])
    x = torch.randn(latency_measure.input_shape(op, 2))
    session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
    (y,) = session.run(None, {"X": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(y), layer(x), rtol=1e-4, atol=1e-5)


def test_transposed_linear_layer_op_reads_its_own_sizes() -> None:
    """Hugging Face's Conv1D (GPT-2) is a Linear stored transposed: its latency signature has
    its nx inputs and nf outputs (it used to go through nn.Linear's and fail)."""
    from shrink.rules import rule_for
    from shrink.rules.base import LayerOp

    conv1d = pytest.importorskip("transformers.pytorch_utils").Conv1D(8, 4)  # nf=8, nx=4
    rule = rule_for(conv1d)
    assert rule is not None
    assert rule.layer_op(conv1d, (2, 5, 4)) == LayerOp("linear", 4, 8, spatial=(5,), bias=True)
    lin = nn.Linear(4, 8, bias=False)
    assert rule_for(lin).layer_op(lin, (2, 5, 4)) == LayerOp("linear", 4, 8, spatial=(5,),
                                                             bias=False)


def test_loss_valuation_keeps_the_stream_the_loss_depends_on(synthetic: SyntheticBench) -> None:
    """Valued by measured loss (distilling the dense model's output), the hidden size, which
    every layer reads, is worth what cutting it costs: at half the latency it keeps at least the
    fraction the MLP widths keep (valued by scores it is cut first: the xfail above)."""
    torch.manual_seed(0)
    model = Stream().eval()
    x = (torch.randn(1, 16, 32),)
    with torch.no_grad():
        data = [(xb, model(xb)) for xb in (torch.randn(4, 16, 32) for _ in range(2))]
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, target="latency", valuation="loss",
                                                    data=data, loss_fn=nn.functional.mse_loss))
    assert res.report.latency is not None and res.report.latency.converged
    assert res.report.latency.valuation.startswith("loss (")
    hidden = res.model.inp.out_features / 128
    mlp = [fc.out_features / 256 for fc in res.model.fc1]
    assert hidden >= max(mlp), (hidden, mlp)
    scored = shrink.prune(model, x, shrink.PruneConfig(0.5, target="latency")).model
    assert scored.inp.out_features < res.model.inp.out_features   # what the valuation changes


@pytest.mark.parametrize("gqa", ["groups", "query"])
def test_attention_projections_follow_the_embed_dim_and_the_heads(gqa: str) -> None:
    """q/k/v/o of a Hugging Face attention layer are timed with its groups: the hidden size on
    one side, the heads on the other (a KV group keeps n_rep query heads of q and one head of
    k and v; query heads cut inside every group leave k and v whole)."""
    transformers = pytest.importorskip("transformers")
    from shrink.latency.layers import inner_layers

    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=96,
                                   num_hidden_layers=1, num_attention_heads=8,
                                   num_key_value_heads=2, head_dim=8)
    model = transformers.LlamaForCausalLM(cfg).eval()
    x = (torch.randint(0, 64, (1, 8)),)
    groups = shrink.prune(model, x, shrink.PruneConfig(0.3, gqa=gqa, verify=False)
                          ).analysis.groups
    heads = next(g for g in groups if g.id.endswith("self_attn:heads"))
    assert heads.size == (2 if gqa == "groups" else 4)
    bound = {t.call.module.rsplit(".", 1)[-1]: t for t in terms(
        layer_calls(model, x), groups, {g.id for g in groups if g.prunable}, 16,
        inner_layers(model))}
    hidden = bound["q_proj"].inp
    assert len(hidden) == 1 and hidden[0][1] == 1.0   # one position per hidden channel
    assert bound["o_proj"].out == hidden
    per_q = 64 / heads.size   # q has 8 heads x 8 = 64 rows
    assert bound["q_proj"].out == ((heads.id, per_q),)
    assert bound["o_proj"].inp == ((heads.id, per_q),)
    for kv in ("k_proj", "v_proj"):   # 2 KV heads x 8 = 16 rows
        if gqa == "groups":
            assert bound[kv].out == ((heads.id, 8.0),) and bound[kv].out_fixed == 0
        else:
            assert bound[kv].out == () and bound[kv].out_fixed == 16


class ElementwiseBench(SyntheticBench):
    """The synthetic runtime plus time its layers do not show: work on Stream's residual
    stream that grows with the hidden size (norms, adds), as in a small transformer."""

    def model_ms(self, model: nn.Module, inputs: tuple[Any, ...]) -> float:
        return super().model_ms(model, inputs) + 0.002 * model.inp.out_features


@pytest.mark.parametrize("probe", [True, False])
def test_kinds_of_groups_are_timed_when_the_tables_miss_most_of_the_time(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, probe: bool) -> None:
    """Here the tables explain under half of the time. Timing each kind of group cut to about
    half (the hidden size; every MLP width) puts the stream's extra cost into the model: the
    first plan's prediction is then close to its measurement, and the hidden size, which saves
    the most per channel, is cut more. Without the probes (``UNEXPLAINED = 1``) the first
    prediction is far off."""
    from shrink.latency import target as latency_target

    bench = ElementwiseBench()
    monkeypatch.setattr(latency_target, "bench_for", lambda runtime, threads: bench)
    monkeypatch.setenv("SHRINK_CACHE_DIR", str(tmp_path))
    if not probe:
        monkeypatch.setattr(latency_target, "UNEXPLAINED", 1.0)
    torch.manual_seed(0)
    model = Stream().eval()
    x = (torch.randn(1, 16, 32),)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, target="latency"))
    lat = res.report.latency
    assert lat is not None
    predicted, measured = lat.history[0]
    assert bench.model_ms(res.model, x) / bench.model_ms(model, x) == pytest.approx(lat.measured)
    if probe:
        assert abs(predicted - measured) < 0.03, lat.history
        assert lat.converged
    else:
        assert abs(predicted - measured) > 0.1, lat.history
