"""Partial capture: a model fx cannot trace whole is pruned inside the submodules it can trace.

Each test checks the pruned model against the independent masked oracle of tests/helpers.py
(``prune_checked``), and that what was not captured keeps its size.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import shrink
from shrink.errors import CaptureError
from shrink.testing import randomize_
from tests.helpers import assert_matches_masked_original, prune_checked


class Gate(nn.Module):
    """Data-dependent control flow: fx cannot trace it."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)
        self.scale = nn.Parameter(torch.ones(c))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if y.sum() > 0:
            y = y * 2
        return y * self.scale.view(1, -1, 1, 1)


def _block(c_in: int, c_mid: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_mid, 3, padding=1), nn.BatchNorm2d(c_mid), nn.ReLU(),
        nn.Conv2d(c_mid, c_mid, 3, padding=1), nn.BatchNorm2d(c_mid), nn.ReLU(),
        nn.Conv2d(c_mid, c_out, 1),
    )


class Gated(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = _block(3, 16, 8)
        self.gate = Gate(8)
        self.head = _block(8, 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.gate(self.stem(x)))


def test_untraceable_module_keeps_its_size_and_the_rest_is_pruned() -> None:
    model = Gated()
    assert shrink.capture(model, torch.randn(1, 3, 8, 8)).parts is not None  # not whole
    res = prune_checked(model, torch.randn(2, 3, 8, 8))
    small = res.model
    assert small.stem[0].out_channels == 8
    assert small.stem[3].out_channels == 8
    assert small.head[0].out_channels == 8
    assert small.head[3].out_channels == 8
    # the untraceable module and the boundaries of the parts keep their size
    assert small.gate.conv.in_channels == small.gate.conv.out_channels == 8
    assert small.gate.scale.shape == (8,)
    assert small.stem[6].out_channels == 8
    assert small.head[0].in_channels == 8
    assert small.head[6].out_channels == 4
    reasons = [g.pinned or "" for g in res.analysis.pinned]
    assert any("boundary of captured part 'stem'" in r for r in reasons), reasons
    assert any(r.startswith("model output (boundary of captured part 'head'") for r in reasons)


def test_report_names_captured_and_uncaptured_parts() -> None:
    model = randomize_(Gated())
    x = (torch.randn(2, 3, 8, 8),)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, round_to=1))
    assert res.report is not None
    text = str(res.report)
    assert "captured in parts: stem, gate.conv, head;" in text, text
    assert "not captured (parameters keep their size): gate (its own parameters)" in text
    assert "torch.fx could not trace Gate" in text
    assert "each captured part equals its masked original" in text
    notes = [d.message for d in res.analysis.diagnostics if d.severity == "partial capture"]
    assert len(notes) == 1
    assert "captured in parts: stem, gate.conv, head" in notes[0]
    assert res.report.mac_ratio < 0.6


def test_part_graphs_use_the_whole_models_names() -> None:
    model = Gated()
    for on_meta in (False, True):
        cap = shrink.capture(model, torch.randn(1, 3, 8, 8), on_meta=on_meta)
        assert cap.parts is not None
        assert cap.parts.captured == ("stem", "gate.conv", "head")
        assert len(cap.graph_inputs) == len(cap.graph_modules) == 3
        for gm in cap.graph_modules:
            for node in gm.graph.nodes:
                if node.op in ("call_module", "get_attr"):
                    model.get_submodule(str(node.target).rpartition(".")[0]
                                        if node.op == "get_attr" else str(node.target))
        assert all(x.is_meta == on_meta for xs in cap.graph_inputs for x in xs)


class Shared(nn.Module):
    """One head applied to two feature maps by untraceable code (a detector's per-level head)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _block(3, 8, 8)
        self.down = nn.Conv2d(8, 8, 3, stride=2, padding=1)
        self.head = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 3, 1))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        f1 = self.body(x)
        levels = [f1, self.down(f1)]
        outs = [self.head(f) for f in levels]
        return [o for o in outs if o.shape[-1] > 0 and bool(o.abs().sum() >= 0)]


def test_module_called_per_level_is_one_graph_per_call() -> None:
    cap = shrink.capture(Shared(), torch.randn(1, 3, 8, 8))
    assert cap.parts is not None
    assert cap.parts.captured == ("body", "down", "head")
    assert len(cap.graph_modules) == 4  # head: one graph per call
    shapes = [tuple(x[0].shape) for x in cap.graph_inputs]
    assert shapes == [(1, 3, 8, 8), (1, 8, 8, 8), (1, 8, 8, 8), (1, 8, 4, 4)]
    res = prune_checked(Shared(), torch.randn(2, 3, 8, 8))
    assert res.model.head[0].out_channels == res.model.head[2].out_channels == 8
    assert res.model.head[0].in_channels == 8
    assert res.model.head[4].out_channels == 3
    assert res.model.body[0].out_channels == 4


class Custom:
    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class TakesObject(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = _block(8, 16, 8)

    def forward(self, box: Custom) -> torch.Tensor:
        return self.inner(box.t)


class Kwargs(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.out = nn.Conv2d(16, 8, 1)

    def forward(self, x: torch.Tensor, *, skip: torch.Tensor | None = None,
                times: int = 1) -> torch.Tensor:
        y = self.out(F.relu(self.conv(x)))
        for _ in range(times):
            y = y + (0 if skip is None else skip)
        return y


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.obj = TakesObject()
        self.kw = Kwargs()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.obj(Custom(self.stem(x)))
        if y.sum() > 1e30:  # data-dependent: neither fx nor export traces the whole model
            return y
        return self.kw(y, skip=y, times=2) + self.kw(y, skip=None)


def test_inputs_that_are_not_tensors_split_the_module_and_kwargs_are_kept() -> None:
    cap = shrink.capture(Mixed(), torch.randn(1, 3, 8, 8))
    assert cap.parts is not None
    assert cap.parts.captured == ("stem", "obj.inner", "kw"), cap.parts
    assert ("obj", "called with Custom, not tensors") in cap.parts.split
    assert len(cap.graph_modules) == 4  # kw twice: once with skip= and times=2, once without
    assert [len(x) for x in cap.graph_inputs] == [1, 1, 2, 1]
    res = prune_checked(Mixed(), torch.randn(2, 3, 8, 8))
    assert res.model.kw.conv.out_channels == 8
    assert res.model.kw.out.out_channels == 8
    assert res.model.obj.inner[0].out_channels == 8
    assert res.model.obj.inner[6].out_channels == 8


class Escapes(nn.Module):
    """``block.b`` is also called from outside ``block``: ``block`` cannot be one part."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(16, 16, 3, padding=1))
        self.tail = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block(x)
        if y.sum() > 0:
            y = self.block[2](F.relu(y))
        return self.tail(y)


def test_module_whose_layer_is_called_from_outside_it_is_split() -> None:
    x = torch.randn(2, 3, 8, 8).abs()
    model = Escapes()
    with torch.no_grad():
        model.block[2].bias.fill_(1.0)  # the untraced branch runs
    cap = shrink.capture(model, x)
    assert cap.parts is not None
    assert ("block", "block.2 inside it is also called from outside it") in cap.parts.split
    res = prune_checked(model, x)
    assert res.model.block[2].out_channels == 16
    assert res.model.block[0].in_channels == 3


class SharedActivation(nn.Module):
    """One ReLU module used inside ``block`` and by the untraceable root: it holds no
    tensors, so ``block`` is still one part."""

    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(),
                                   nn.Conv2d(16, 8, 3, padding=1))
        self.tail = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.block[1](self.block(x))
        return self.tail(y) if y.sum() >= 0 else y


def test_layer_without_tensors_called_from_outside_does_not_split_its_module() -> None:
    cap = shrink.capture(SharedActivation(), torch.randn(1, 3, 8, 8))
    assert cap.parts is not None
    assert cap.parts.captured == ("block", "tail")
    res = prune_checked(SharedActivation(), torch.randn(2, 3, 8, 8))
    assert res.model.block[0].out_channels == 8


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(),
                                  nn.Conv2d(8, 8, 3, padding=1))
        self.other = nn.Conv2d(3, 8, 3, padding=1)
        self.other.weight = self.body[0].weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        return y if y.sum() > 0 else self.other(x)


def test_layer_tied_to_a_layer_outside_its_part_is_pinned() -> None:
    res = prune_checked(Tied(), torch.randn(2, 3, 8, 8))
    assert res.model.body[0].out_channels == 8
    assert res.model.body[0].weight is res.model.other.weight


class Hopeless(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.w.t() if x.sum() > 0 else x[..., :1]


def test_model_with_no_capturable_part_still_raises() -> None:
    with pytest.raises(CaptureError, match="partial capture found no submodule"):
        shrink.capture(Hopeless(), torch.randn(2, 3))


def test_verify_checks_parts_on_the_masked_originals_inputs() -> None:
    """A data-dependent filter after the parts: the whole outputs cannot always be compared,
    each part's calls can; a wrong part is still caught."""
    model = randomize_(Shared())
    x = (torch.randn(2, 3, 8, 8),)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, round_to=1))
    assert res.report is not None
    assert res.report.max_rel_error is not None
    assert res.report.max_rel_error < 1e-5
    assert_matches_masked_original(model, res.model, res.plan, x)
    broken = res.model
    with torch.no_grad():
        broken.head[2].weight[0].add_(1.0)
    with pytest.raises(shrink.VerificationError, match="captured part 'head'"):
        shrink.verify(model, broken, res.plan, x, parts=("body", "down", "head"))


class Folded(nn.Module):
    """``self.s * 2`` is computed by fx at trace time (a buffer is not proxied): the graph sees
    a constant, not the buffer, so nothing can slice it with the conv's channels."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.register_buffer("s", torch.rand(8) + 0.5)
        self.out = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.conv(x)) * (self.s * 2).reshape(1, -1, 1, 1))


class FoldedInPart(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = Folded()
        self.tail = nn.Sequential(nn.Conv2d(2, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 2, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.inner(x)
        return self.tail(y) if y.sum() > 0 else y


@pytest.mark.parametrize("make", [Folded, FoldedInPart])
def test_constants_the_tracer_folded_pin_their_channels(make: type[nn.Module]) -> None:
    res = prune_checked(make(), torch.randn(2, 3, 8, 8))
    model = res.model if make is Folded else res.model.inner
    assert model.conv.out_channels == 8
    assert any("constant the tracer computed" in (g.pinned or "") for g in res.analysis.pinned)


class PartWithShapeSize(nn.Module):
    """A part whose forward computes a size from a tensor's shape (tests/unit/test_probe.py's
    ViewFromShape), inside a model that cannot be traced whole."""

    def __init__(self) -> None:
        super().__init__()
        from tests.unit.test_probe import ViewFromShape

        self.inner = ViewFromShape()

    def forward(self, x: torch.Tensor) -> Any:
        y, a, s = self.inner(x)
        if a.sum() > 1e30:  # data-dependent: the model is captured in parts
            return a
        return y, a, s


def test_shape_probe_runs_the_parts_and_pins_a_shape_derived_size() -> None:
    res = prune_checked(PartWithShapeSize(), torch.randn(1, 3, 8, 8))
    reason = res.analysis.group("inner.a:out").pinned
    assert reason is not None
    assert "shape probe" in reason
    assert "Tensor.view" in reason
    assert res.model.inner.m1.out_channels == 8  # the rest of the part still prunes


class Filtered(nn.Module):
    """A data-dependent number of outputs after the part (a detector's score threshold)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = _block(3, 16, 8)
        self.threshold = 0.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.body(x)
        if y.sum() > 1e30:
            return y
        return y[y > self.threshold]


def test_data_dependent_output_sizes_neither_pin_groups_nor_fail_verify() -> None:
    """The probe runs the parts, not the whole model (whose output size changes with any
    pruning); verify checks the parts and only reports the whole outputs' mismatch."""
    model = randomize_(Filtered()).eval()
    x = (torch.randn(2, 3, 8, 8),)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, round_to=1))
    with torch.no_grad():
        assert model(*x).shape != res.model(*x).shape  # what a whole-model probe would see
    assert not [g for g in res.analysis.pinned if "shape probe" in (g.pinned or "")]
    assert res.model.body[0].out_channels == 8
    assert "the whole model's outputs agree too" in str(res.report)
    # code outside the parts keeps other elements (as NMS may after rounding): reported only
    res.model.threshold = 0.5
    report = shrink.verify(model, res.model, res.plan, x, parts=("body",))
    assert report.max_rel_error is not None
    assert report.max_rel_error < 1e-5
    assert "The whole model's outputs differ from the masked original's" in report.diagnostics[0]
