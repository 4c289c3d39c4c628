"""The torch.export front-end: same groups as fx where both capture, and models fx cannot trace.

Every pruned model is checked against the independently masked original (tests/helpers.py).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import shrink
from shrink.errors import CaptureError, ConfigError
from tests.helpers import n_params, prune_checked


def _signature(analysis: shrink.Analysis) -> list[tuple[str, int, bool, frozenset[str]]]:
    """What a plan can do with a model: every group's id, size, whether it is prunable and
    the axes it spans."""
    return sorted(
        (g.id, g.size, g.prunable, frozenset(f"{m.module}:{m.side.value}" for m in g.members))
        for g in analysis.groups
    )


class Residual(nn.Module):
    """conv/bn/relu, a residual add, a module called twice, attention called with kwargs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.act = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.proj = nn.Linear(16, 32)
        self.mha = nn.MultiheadAttention(32, 4, batch_first=True)
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.act(self.bn(self.conv(x)))
        y = self.conv2(y) + y
        y = self.conv2(y)
        t = self.proj(y.flatten(2).transpose(1, 2))
        t = t + self.mha(t, t, t, need_weights=False)[0]
        return self.head(t.mean(1))


def test_export_finds_the_groups_fx_finds() -> None:
    torch.manual_seed(0)
    model, x = Residual().eval(), torch.randn(2, 3, 8, 8)
    fx_groups = _signature(shrink.analyze(shrink.capture(model, x, frontend="fx")))
    export_groups = _signature(shrink.analyze(shrink.capture(model, x, frontend="export")))
    assert export_groups == fx_groups
    assert sum(p for _, _, p, _ in export_groups) >= 3  # conv, proj/mha embed, heads


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small"])
def test_export_matches_fx_on_torchvision(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, 64, 64)
    fx_groups = _signature(shrink.analyze(shrink.capture(model, x, frontend="fx")))
    export_groups = _signature(shrink.analyze(shrink.capture(model, x, frontend="export")))
    assert export_groups == fx_groups


class ShapeBranch(nn.Module):
    """Python control flow on a traced size: torch.fx refuses it, torch.export runs it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv1(x))
        if y.shape[-1] % 2:  # fx: "symbolically traced variables cannot be used as inputs"
            y = F.pad(y, (0, 1, 0, 1))
        y = F.relu(self.conv2(y))
        return self.fc(y.mean((2, 3)))


def test_auto_falls_back_to_export_when_fx_cannot_trace() -> None:
    model, x = ShapeBranch().eval(), torch.randn(2, 3, 9, 9)
    with pytest.raises(CaptureError, match="torch.fx could not trace"):
        shrink.capture(model, x, frontend="fx")
    captured = shrink.capture(model, x)  # auto
    assert captured.graph_module._shrink_frontend == "export"  # type: ignore[attr-defined]
    res = prune_checked(model, x, 0.5)  # default capture="auto"
    assert res.analysis.frontend == "export" and captured.frontend == "export"
    assert res.model.conv1.out_channels == 8 and res.model.conv2.out_channels == 8
    assert n_params(res.model) < n_params(model)


def test_forcing_fx_on_an_untraceable_model_says_what_to_do() -> None:
    with pytest.raises(CaptureError, match="leaf_types"):
        shrink.compress(ShapeBranch().eval(), 0.5, torch.randn(1, 3, 9, 9), capture="fx")
    with pytest.raises(ConfigError, match="capture must be"):
        shrink.PruneConfig(0.5, capture="dynamo")


class Cache:
    """Not a pytree type: export cannot return it."""

    def __init__(self, t: torch.Tensor) -> None:
        self.t = t


class WithCache(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(8, 32)
        self.fc2 = nn.Linear(32, 8)
        self.k = nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> dict[str, object]:
        if x.shape[0] > 0:  # keeps fx out
            h = self.fc2(F.gelu(self.fc1(x)))
        return {"out": h, "cache": Cache(self.k(x))}


def test_outputs_export_cannot_flatten_are_left_out() -> None:
    model, x = WithCache().eval(), torch.randn(3, 8)
    captured = shrink.capture(model, x, frontend="export")
    analysis = shrink.analyze(captured)
    assert [g.id for g in analysis.prunable] == ["fc1:out"]
    small = shrink.compress(model, 0.5, x, capture="export", round_to=1)
    assert small.fc1.out_features == 16
    with torch.no_grad():
        assert torch.allclose(small(x)["out"].abs().sum(), small(x)["out"].abs().sum())
        assert small(x)["out"].shape == model(x)["out"].shape


class ConstantScale(nn.Module):
    """A per-channel constant made in forward has a literal size: its channels stay."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.c = nn.Conv2d(8, 4, 1)
        self.d = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = torch.tensor([1.0, 2, 3, 4, 5, 6, 7, 8]).view(1, 8, 1, 1)
        return self.c(self.a(x) * scale) + self.d(F.relu(self.b(x)))


def test_constants_made_in_forward_pin_their_channels() -> None:
    model, x = ConstantScale().eval(), torch.randn(1, 3, 4, 4)
    analysis = shrink.analyze(shrink.capture(model, x, frontend="export"))
    (a_group,) = [g for g in analysis.groups if any(m.module == "a" and m.side.value == "out" for m in g.members)]
    assert "created in forward" in (a_group.pinned or "")
    assert "test_export_frontend.py" in (a_group.pinned or "")  # the user's line
    assert any(g.id == "b:out" for g in analysis.prunable)
    res = prune_checked(model, x, 0.5, capture="export")
    assert res.model.a.out_channels == 8 and res.model.b.out_channels == 4


def test_export_capture_does_not_touch_the_model() -> None:
    model = Residual().eval()
    forward = model.forward
    before = {k: v.clone() for k, v in model.state_dict().items()}
    shrink.capture(model, torch.randn(1, 3, 8, 8), frontend="export")
    assert model.forward == forward and "forward" not in vars(model)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


class SplitByAttribute(nn.Module):
    """Ultralytics' C2f/C2PSA: ``split((self.c, self.c), 1)`` with the hidden width as an int
    attribute. Pieces shrink together and ``c`` is rewritten to the kept count."""

    def __init__(self, c: int = 8) -> None:
        super().__init__()
        self.c = c
        self.cv1 = nn.Conv2d(3, 2 * c, 1)
        self.m = nn.Conv2d(c, c, 3, padding=1)
        self.cv2 = nn.Conv2d(2 * c, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.cv1(x).split((self.c, self.c), 1)
        return self.cv2(torch.cat((a, self.m(b)), 1))


@pytest.mark.parametrize("frontend", ["fx", "export"])
def test_split_sizes_held_in_an_attribute_follow_pruning(frontend: str) -> None:
    model, x = SplitByAttribute().eval(), torch.randn(1, 3, 8, 8)
    res = prune_checked(model, x, 0.5, capture=frontend)
    assert res.model.c == 4 and res.model.cv1.out_channels == 8
    assert res.model.cv2.in_channels == 8 and model.c == 8


class NoGradInside(nn.Module):
    """``torch.no_grad()`` in forward: export makes it a higher-order op with a graph body."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 8)
        self.c = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.b(F.relu(self.a(x)))
        with torch.no_grad():
            scale = h.abs().mean(-1, keepdim=True) + 1
        if x.shape[0] > 0:  # keeps fx out
            h = h / scale
        return self.c(h)


def test_a_no_grad_block_in_forward_is_captured_and_pinned_not_a_crash() -> None:
    model, x = NoGradInside().eval(), torch.randn(3, 8)
    analysis = shrink.analyze(shrink.capture(model, x, frontend="export"))
    assert any(g.id == "a:out" for g in analysis.prunable)  # before the block: free
    res = prune_checked(model, x, 0.5, capture="export")
    assert res.model.a.out_features == 8 and res.model.b.out_features == 8
