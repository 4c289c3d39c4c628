"""The shape probe: sizes that forward computes from tensor shapes pin their group, with the
op and the source line, instead of a model that crashes or fails verification.

Each model has a *culprit* (a layer whose output channels become a size somewhere else) and a
*bystander* branch (``m1 -> m2``) that nothing constrains, so the rest still prunes.
"""

from __future__ import annotations

import inspect
import math
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn.utils import prune as tprune

import shrink
from shrink.errors import InvariantError
from shrink.plan import Plan
from shrink.probe import ShapeProbe
from shrink.select import Uniform, select
from tests.helpers import assert_matches_masked_original, kept, n_params, prune_checked


class _Bystander(nn.Module):
    def __init__(self, c_in: int) -> None:
        super().__init__()
        self.m1 = nn.Conv2d(c_in, 16, 1)
        self.m2 = nn.Conv2d(16, 4, 1)

    def side(self, x: torch.Tensor) -> torch.Tensor:
        return self.m2(torch.relu(self.m1(x)))


class ViewFromShape(_Bystander):
    """``b, c, h, w = x.shape; y.view(b, c // 2, -1)`` with ``c`` from another layer."""

    def __init__(self) -> None:
        super().__init__(3)
        self.a = nn.Conv2d(3, 16, 3, padding=1)
        self.a2 = nn.Conv2d(16, 4, 1)
        self.b = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: torch.Tensor) -> Any:
        u = self.a(x)
        b, c, _h, _w = u.shape
        y = self.b(x).view(b, c // 2, -1)
        return y, self.a2(u), self.side(x)


class QkvHeads(nn.Module):
    """``b, n, d = x.shape; qkv.reshape(b, n, 3, self.h, d // self.h)`` (a ViT block)."""

    def __init__(self, d: int = 32, h: int = 4) -> None:
        super().__init__()
        self.h = h
        self.inp = nn.Linear(16, d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.m1 = nn.Linear(16, 16)
        self.m2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> Any:
        e = self.inp(x)
        b, n, d = e.shape
        qkv = self.qkv(e).reshape(b, n, 3, self.h, d // self.h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        a = (q @ k.transpose(-2, -1)).softmax(-1)
        return self.proj((a @ v).transpose(1, 2).reshape(b, n, d)), self.m2(self.m1(x).relu())


class SizeInReshape(_Bystander):
    """``y.reshape(y.size(0), x.size(1), -1)``."""

    def __init__(self) -> None:
        super().__init__(3)
        self.a = nn.Conv2d(3, 16, 1)
        self.a2 = nn.Conv2d(16, 4, 1)
        self.b = nn.Conv2d(3, 16, 1)

    def forward(self, x: torch.Tensor) -> Any:
        u = self.a(x)
        y = self.b(x)
        return y.reshape(y.size(0), u.size(1), -1), self.a2(u), self.side(x)


class HeadsFromLastDim(nn.Module):
    """``v.reshape(b, n, heads, e.shape[-1] // heads)`` with ``e`` another layer's output."""

    def __init__(self) -> None:
        super().__init__()
        self.heads = 4
        self.emb = nn.Linear(8, 32)
        self.v = nn.Linear(8, 32)
        self.out = nn.Linear(32, 8)
        self.m1 = nn.Linear(8, 16)
        self.m2 = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> Any:
        e = self.emb(x)
        b, n, _ = e.shape
        v = self.v(x).reshape(b, n, self.heads, e.shape[-1] // self.heads)
        return v.flatten(2), self.out(e), self.m2(self.m1(x).relu())


class ChunkByShape(_Bystander):
    """``torch.chunk(y, x.shape[1] // self.n, dim=1)``: the chunk count follows x's channels."""

    def __init__(self) -> None:
        super().__init__(3)
        self.n = 4
        self.a = nn.Conv2d(3, 16, 1)
        self.a2 = nn.Conv2d(16, 4, 1)
        self.b = nn.Conv2d(3, 16, 1)

    def forward(self, x: torch.Tensor) -> Any:
        u = self.a(x)
        parts = torch.chunk(self.b(x), u.shape[1] // self.n, dim=1)
        return torch.stack(parts[:2]), self.a2(u), self.side(x)


@torch.fx.wrap
def _data_dependent(x: torch.Tensor) -> torch.Tensor:
    return x * float(x.abs().max().item() > 0)  # .item() has no meta kernel


class ViewFromShapeNotOnMeta(ViewFromShape):
    """:class:`ViewFromShape` with a step that cannot run on the meta device."""

    def forward(self, x: torch.Tensor) -> Any:
        u = self.a(x)
        b, c, _h, _w = u.shape
        y = self.b(x).view(b, c // 2, -1)
        return y, self.a2(u), self.side(x), _data_dependent(x)


def _line(cls: type, marker: str) -> int:
    """Line number of the first line of ``cls.forward`` that contains ``marker``."""
    lines, start = inspect.getsourcelines(cls.forward)  # type: ignore[attr-defined]
    return start + next(i for i, text in enumerate(lines) if marker in text)


# (model, input, culprit group, op named in the reason, marker of the source line)
CASES = [
    (ViewFromShape, (1, 3, 8, 8), "a:out", "Tensor.view", ".view(b, c // 2"),
    (QkvHeads, (2, 5, 16), "inp:out", "Tensor.reshape", "d // self.h"),
    (SizeInReshape, (1, 3, 8, 8), "a:out", "Tensor.reshape", "u.size(1)"),
    (HeadsFromLastDim, (2, 5, 8), "emb:out", "Tensor.reshape", "e.shape[-1] // self.heads"),
    (ChunkByShape, (1, 3, 8, 8), "a:out", "torch.chunk", "torch.chunk("),
]
IDS = ["view", "qkv-reshape", "size", "shape-div-heads", "chunk"]


@pytest.mark.parametrize(("cls", "shape", "culprit", "op", "marker"), CASES, ids=IDS)
def test_shape_derived_size_pins_its_group_with_op_and_source_line(
    cls: type[nn.Module], shape: tuple[int, ...], culprit: str, op: str, marker: str
) -> None:
    model, x = cls(), torch.randn(shape)
    # pruned without shrink's own check; asserts output shapes and the independent oracle
    res = prune_checked(model, x, 0.5)
    reason = res.analysis.group(culprit).pinned
    assert reason is not None
    assert f"test_probe.py:{_line(cls, marker)} in forward" in reason
    assert op in reason
    assert "shape probe" in reason
    assert kept(res, culprit) == res.analysis.group(culprit).size
    assert kept(res, "m1:out") < res.analysis.group("m1:out").size  # the bystander still prunes
    assert n_params(res.model) < n_params(model)
    assert reason in str(res.report)  # the report shows why
    assert any(culprit in d.message and reason in d.message for d in res.analysis.diagnostics)


@pytest.mark.parametrize(("cls", "shape"), [(c[0], c[1]) for c in CASES], ids=IDS)
def test_compress_verifies_models_with_shape_derived_sizes(
    cls: type[nn.Module], shape: tuple[int, ...]
) -> None:
    model, x = cls().eval(), torch.randn(shape)
    small = shrink.compress(model, 0.5, (x,), round_to=1)  # verify=True: the oracle holds
    with torch.no_grad():
        dense, pruned = model(x), small(x)
    assert [t.shape for t in pruned] == [t.shape for t in dense]
    assert n_params(small) < n_params(model)


def test_global_policy_gives_the_pinned_groups_budget_to_the_others() -> None:
    model, x = ViewFromShape(), torch.randn(1, 3, 8, 8)
    res = prune_checked(model, x, 0.5, scope="global")
    assert res.analysis.group("a:out").pinned is not None
    prunable = [g for g in res.analysis.groups if g.prunable]
    dropped = sum(g.size - kept(res, g.id) for g in prunable)
    assert dropped == round(0.5 * sum(g.size for g in prunable))


def test_macs_target_is_solved_around_the_pinned_group() -> None:
    model, x = HeadsFromLastDim().eval(), torch.randn(2, 5, 8)
    res = shrink.prune(model, (x,), shrink.PruneConfig(0.1, target="macs", round_to=1))
    assert res.analysis.group("emb:out").pinned is not None
    assert res.report is not None
    assert res.report.mac_ratio < 1.0
    assert_matches_masked_original(model, res.model, res.plan, (x,))


class TwoCulprits(nn.Module):
    """Eight independent conv pairs; pairs 2 and 6 size another tensor by their channels."""

    def __init__(self) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3, 8, 1) for _ in range(8))
        self.heads = nn.ModuleList(nn.Conv2d(8, 2, 1) for _ in range(8))
        self.c = nn.Conv2d(3, 8, 1)

    def forward(self, x: torch.Tensor) -> Any:
        ys = [conv(x) for conv in self.convs]
        z = self.c(x)
        sized = [z.reshape(z.shape[0], ys[k].shape[1], -1) for k in (2, 6)]
        return [h(torch.relu(y)) for h, y in zip(self.heads, ys, strict=True)], sized


def test_bisection_finds_every_culprit_in_log_steps() -> None:
    model, x = TwoCulprits().eval(), torch.randn(1, 3, 4, 4)
    analysis = shrink.analyze(shrink.capture(model, (x,)))
    scores = shrink.score(analysis.groups, model, shrink.PruneConfig(0.5).criterion)
    plan = select(analysis.groups, scores, Uniform(0.5), analysis.model)
    n = len(plan.decisions)
    assert n == 8
    probe = ShapeProbe(model, (x,))
    found = probe.culprits(plan)
    assert sorted(found) == ["convs.2:out", "convs.6:out"]
    line = _line(TwoCulprits, "ys[k].shape[1]")
    assert all(f"test_probe.py:{line}" in why for why in found.values())
    # one run of the whole plan, a bisection per culprit, one run of what is left after each
    assert probe.runs <= 2 * (math.ceil(math.log2(n)) + 1) + 1
    rest = Plan(plan.model, plan.groups,
                tuple(d for d in plan.decisions if d.group not in found))
    assert probe.culprits(rest) == {}


class ExtraParamConv(nn.Conv2d):
    """A Conv2d subclass with a parameter of its own: nothing says how it shrinks."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, 1)
        self.gain = nn.Parameter(torch.ones(c_out))


def test_layer_that_cannot_be_rebuilt_pins_its_groups_with_its_name() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.ReLU(), ExtraParamConv(16, 16), nn.ReLU(),
                          nn.Conv2d(16, 8, 1), nn.ReLU(), nn.Conv2d(8, 4, 1))
    res = prune_checked(model, torch.randn(1, 3, 4, 4), 0.5)
    for gid in ("0:out", "2:out"):  # the groups that resize layer 2
        reason = res.analysis.group(gid).pinned
        assert reason is not None
        assert "'2' (ExtraParamConv)" in reason
        assert "gain" in reason
    assert kept(res, "4:out") < res.analysis.group("4:out").size  # the rest still prunes


def test_verify_calls_layers_that_do_not_fit_an_invariant_error_not_a_numeric_one() -> None:
    model, x = HeadsFromLastDim().eval(), torch.randn(2, 5, 8)
    analysis = shrink.analyze(shrink.capture(model, (x,)))
    scores = shrink.score(analysis.groups, model, shrink.PruneConfig(0.5).criterion)
    plan = select(analysis.groups, scores, Uniform(0.5), analysis.model)  # by hand: not probed
    pruned = shrink.apply(model, plan)
    with pytest.raises(InvariantError, match="ShapeProbe") as info:
        shrink.verify(model, pruned, plan, (x,))
    assert not isinstance(info.value, shrink.VerificationError)


def test_a_model_that_cannot_run_on_meta_is_probed_on_real_tensors(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, x = ViewFromShapeNotOnMeta(), torch.randn(1, 3, 8, 8)
    with caplog.at_level("INFO", logger="shrink.probe"):
        res = prune_checked(model, x, 0.5)
    assert "probing on real tensors" in caplog.text
    reason = res.analysis.group("a:out").pinned
    assert reason is not None
    assert f"test_probe.py:{_line(ViewFromShapeNotOnMeta, '.view(b, c // 2')}" in reason
    assert kept(res, "m1:out") < res.analysis.group("m1:out").size


def test_sensitivity_leaves_out_a_group_that_breaks_a_shape(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, x = HeadsFromLastDim().eval(), torch.randn(2, 5, 8)

    def evaluate(m: nn.Module) -> float:
        with torch.no_grad():
            return float(m(x)[2].abs().mean())

    table = shrink.sensitivity(model, (x,), evaluate, ratios=(0.5,))
    measured = {row.group for row in table.rows}
    assert "emb:out" not in measured
    assert "m1:out" in measured
    assert "emb:out" in caplog.text
    assert "Tensor.reshape" in caplog.text


def test_from_masks_keeps_dead_channels_that_forward_reads_as_a_size() -> None:
    model = ViewFromShape().eval()
    x = torch.randn(1, 3, 8, 8)
    dead = torch.arange(16) % 2 == 0  # half the channels of a (the culprit) and of m1
    for conv in (model.a, model.m1):
        tprune.custom_from_mask(conv, "weight", (~dead).float().view(16, 1, 1, 1).expand_as(
            conv.weight))
        tprune.custom_from_mask(conv, "bias", (~dead).float())
    res = shrink.from_masks(model, (x,))
    assert res.analysis.group("a:out").pinned is not None
    assert res.plan.group("a:out").pinned == res.analysis.group("a:out").pinned
    assert res.model.a.out_channels == 16
    assert res.model.m1.out_channels == int((~dead).sum())
    assert any("a:out" in note and "Tensor.view" in note for note in res.report.diagnostics)


def test_probing_on_real_tensors_leaves_the_callers_model_in_its_mode() -> None:
    """A model that cannot run on meta is probed as it is: its train/eval modes come back."""
    model, x = ViewFromShapeNotOnMeta().train(), torch.randn(1, 3, 8, 8)
    shrink.prune(model, x, shrink.PruneConfig(0.5, verify=False))
    assert model.training and all(m.training for m in model.modules())


@pytest.mark.parametrize(("cls", "shape"), [(c[0], c[1]) for c in CASES], ids=IDS)
def test_report_macs_counted_on_the_probe_runs_equal_count_macs(
    cls: type[nn.Module], shape: tuple[int, ...]
) -> None:
    from shrink.report import count_macs

    model, x = cls().eval(), torch.randn(shape)
    res = shrink.prune(model, (x,), shrink.PruneConfig(0.5, round_to=1))
    assert res.report is not None
    assert res.report.macs_before == count_macs(model, (x,))
    assert res.report.macs_after == count_macs(res.model, (x,))
    probe = ShapeProbe(model, (x,))
    assert probe.culprits(res.plan) == {}
    dense = probe.dense_run()
    assert dense is not None
    assert dense.macs == res.report.macs_before
    assert probe.pruned_macs(res.plan) == res.report.macs_after
    other = res.plan.with_decisions(res.plan.decisions)
    assert probe.pruned_macs(other) is None  # only the plan that last fitted
