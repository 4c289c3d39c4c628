"""The oracle's reduced input: taken only where the model allows it, and as strict."""

from __future__ import annotations

import dataclasses
import logging
import sys
from typing import Any

import pytest
import torch
from torch import nn

import shrink
from shrink.plan import Plan
from shrink.probe import ShapeProbe
from shrink.reduced import reduced_inputs
from shrink.testing import randomize_
from shrink.verify import _check, _shared_reference, relative_error


class _Pooled(nn.Module):
    """conv → BN → ReLU, a residual pair, a concat, adaptive pooling and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.BatchNorm2d(16),
                                  nn.ReLU())
        self.a = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 12, 3, stride=2, padding=1), nn.ReLU())
        self.c = nn.Conv2d(16, 8, 3, stride=2, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(20, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.a(y)
        y = torch.cat([self.b(y), self.c(y)], 1)
        return self.fc(self.pool(y).flatten(1))


class _Flat(nn.Module):
    """A flatten into a Linear: its input size fixes the spatial size."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=4, padding=1)
        self.fc = nn.Linear(8 * 16 * 16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class _Maps(nn.Module):
    """Returns feature maps: the output's shape follows the input's."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


class _Branchy(nn.Module):
    """A layer that runs only on large inputs: the same output shape, other layer calls."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.extra, self.b = nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 4, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        if x.shape[-1] > 40:
            y = torch.relu(self.extra(y))
        return self.pool(self.b(y)).flatten(1)


class _FunctionBranch(_Branchy):
    """A function, not a layer, that runs only on large inputs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        if x.shape[-1] > 40:
            y = torch.flip(y, [1])  # the channels reach self.b in another order
        return self.pool(self.b(y)).flatten(1)


def _prune(model: nn.Module, x: torch.Tensor) -> tuple[nn.Module, Plan]:
    model = randomize_(model, seed=0).eval()
    res = shrink.prune(model, (x,), shrink.PruneConfig(0.5, round_to=1, verify=False))
    assert res.plan.decisions
    return res.model, res.plan


def test_reduced_input_stacks_the_even_and_the_odd_pixels_of_one_large_image() -> None:
    x = torch.randn(2, 3, 65, 64)
    (small,) = reduced_inputs((x,)) or (None,)
    assert small is not None
    assert small.shape == (4, 3, 32, 32)
    torch.testing.assert_close(small[:2], x[:, :, 0:64:2, 0:64:2])
    torch.testing.assert_close(small[2:], x[:, :, 1:64:2, 1:64:2])


@pytest.mark.parametrize("inputs", [
    (torch.randn(1, 3, 63, 224),),  # a side below MIN_SIDE
    (torch.randn(1, 3, 224, 224), torch.randn(1, 3, 224, 224)),  # two inputs
    (torch.randint(0, 9, (1, 3, 224, 224)),),  # not floating
    (torch.randn(4, 512),),  # no spatial axis
], ids=["small_side", "two_inputs", "integer", "tokens"])
def test_other_inputs_are_not_reduced(inputs: tuple[Any, ...]) -> None:
    assert reduced_inputs(inputs) is None


def test_a_pooled_conv_net_is_verified_on_the_reduced_input() -> None:
    model, x = _Pooled(), torch.randn(1, 3, 64, 64)
    pruned, plan = _prune(model, x)
    report = shrink.verify(randomize_(model, seed=0).eval(), pruned, plan, (x,))
    assert report.oracle_input == "2x3x32x32"
    assert "2x3x32x32" in str(report)


@pytest.mark.parametrize("make", [_Flat, _Maps, _Branchy, _FunctionBranch],
                         ids=["flatten", "maps", "layer_branch", "function_branch"])
def test_models_that_change_with_the_size_are_verified_on_the_example_input(
    make: type[nn.Module],
) -> None:
    model, x = randomize_(make(), seed=0).eval(), torch.randn(1, 3, 64, 64)
    res = shrink.prune(model, (x,), shrink.PruneConfig(0.5, round_to=1, verify=False,
                                                       capture="export"))
    report = shrink.verify(model, res.model, res.plan, (x,))
    assert report.oracle_input is None
    assert report.max_rel_error is not None
    assert report.max_rel_error <= 1e-5


def _one_wrong_index(plan: Plan, group: str, k: int = 0) -> Plan:
    """``plan`` with ``group`` keeping its ``k``-th dropped channel instead of its ``k``-th kept
    one."""
    decisions = []
    for d in plan.decisions:
        if d.group == group:
            dropped = [c for c in range(plan.group(group).size) if c not in d.keep]
            i = k % len(d.keep)
            d = dataclasses.replace(d, keep=tuple(sorted(
                [*d.keep[:i], *d.keep[i + 1:], dropped[k % len(dropped)]])))
        decisions.append(d)
    return plan.with_decisions(decisions)


def _models() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    import torchvision

    return {
        "pooled": (_Pooled(), torch.randn(1, 3, 64, 64)),
        "resnet18": (torchvision.models.resnet18(), torch.randn(1, 3, 224, 224)),
        "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small(),
                               torch.randn(1, 3, 224, 224)),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_the_reduced_input_catches_every_wrong_kept_index_the_example_input_catches(
    name: str,
) -> None:
    # In squeeze-excitation blocks a layer sees one pooled position per image, so a wrong index
    # between two channels that ReLU zeroes for that image goes unseen at any size (the example
    # input misses some here); the reduced input's two views give two chances per image.
    model, x = _models()[name]
    model = randomize_(model, seed=0).eval()
    res = shrink.prune(model, (x,), shrink.PruneConfig(0.5, round_to=1, verify=False))
    small = reduced_inputs((x,))
    assert small is not None
    ref = _shared_reference(model, res.plan)
    assert _check(ref, res.model.eval(), small, ()).error <= 1e-5  # the right plan passes
    with torch.no_grad():
        want = {"reduced": ref(*small), "example": ref(x)}
    groups = [d.group for d in res.plan.decisions
              if len(d.keep) < res.plan.group(d.group).size]
    assert len(groups) >= 3
    caught = {"example": 0, "reduced": 0}
    for group in groups:
        for k in range(2):
            wrong = shrink.apply(model, _one_wrong_index(res.plan, group, k)).eval()
            with torch.no_grad():
                on_reduced = relative_error(wrong(*small), want["reduced"]) > 1e-5
                on_example = relative_error(wrong(x), want["example"]) > 1e-5
            assert on_reduced or not on_example, (group, k)
            caught["reduced"] += on_reduced
            caught["example"] += on_example
    assert caught["reduced"] >= caught["example"] >= len(groups)
    with pytest.raises(shrink.VerificationError):
        shrink.verify(model, shrink.apply(model, _one_wrong_index(res.plan, groups[0])),
                      res.plan, (x,))


class _Transposed(nn.Module):
    """An encoder-decoder: a transposed convolution's MACs follow its input, not its output."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(3, 16, 3, stride=2, padding=1), nn.ReLU(),
                                  nn.Conv2d(16, 24, 3, stride=2, padding=1), nn.ReLU())
        self.up = nn.ConvTranspose2d(24, 12, 2, stride=2)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Linear(48, 6))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.up(self.down(x))))


class _SizeFromShape(_Pooled):
    """``c``'s output viewed with a channel count read from ``b``'s output shape (as
    ``test_probe.ViewFromShape``): pruning either breaks the view."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.stem(x)
        y = y + self.a(y)
        z, w = self.b(y), self.c(y)
        w = w.view(w.shape[0], z.shape[1] - 4, w.shape[2], w.shape[3])
        return self.fc(self.pool(torch.cat([z, w], 1)).flatten(1))


@pytest.mark.parametrize("name", ["pooled", "transposed", "resnet18", "mobilenet_v3_small"])
def test_pruned_macs_from_the_reduced_check_equal_count_macs(
    name: str, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from shrink.report import count_macs

    model, x = {**_models(), "transposed": (_Transposed(), torch.randn(1, 3, 64, 64))}[name]
    model = randomize_(model, seed=0).eval()

    def no_meta_run(*_: Any) -> Any:
        raise AssertionError("the pruned model ran on meta")

    # prune's oracle runs the pruned model on the reduced input: no other run is needed
    with monkeypatch.context() as patch:
        patch.setattr(ShapeProbe, "fits", no_meta_run)
        patch.setattr(sys.modules["shrink.verify"], "count_macs", no_meta_run)
        res = shrink.prune(model, (x,), shrink.PruneConfig(0.5, round_to=1))
    assert res.report is not None
    assert res.report.oracle_input is not None
    assert res.report.macs_before == count_macs(model, (x,))
    assert res.report.macs_after == count_macs(res.model, (x,))
    assert res.report.macs_after < res.report.macs_before


def test_a_plan_that_breaks_a_shape_is_probed_when_the_oracle_cannot_run_it(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # prune's first plan is built but not probed (the oracle's run tells whether it fits); it
    # fails in the oracle, so the probe pins what breaks and the model is planned again
    from shrink.report import count_macs

    model, x = randomize_(_SizeFromShape(), seed=0).eval(), torch.randn(1, 3, 64, 64)
    with caplog.at_level(logging.INFO, logger="shrink.api"):
        res = shrink.prune(model, (x,), shrink.PruneConfig(0.5, round_to=1))
    assert "the unprobed plan does not run" in caplog.text
    pinned = {g.id: g.pinned for g in res.analysis.groups if g.pinned}
    assert pinned.keys() & {"b.0:out", "c:out"}
    assert all("shape probe" in pinned[g] and "view" in pinned[g]
               for g in pinned.keys() & {"b.0:out", "c:out"})
    assert any(d.group == "stem.0:out" and len(d.keep) < 16 for d in res.plan.decisions)
    assert res.report is not None
    assert res.report.max_rel_error is not None
    assert res.report.max_rel_error <= 1e-5
    assert res.report.oracle_input == "2x3x32x32"
    assert res.report.macs_after == count_macs(res.model, (x,))
    with torch.no_grad():
        assert res.model(x).shape == model(x).shape


def test_recording_calls_lists_layers_and_forward_functions_but_not_hooks() -> None:
    from torch.nn.modules import module as torch_module

    from shrink.reduced import layer_macs, recording_calls

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 1), nn.ReLU())
            self.head = nn.Conv2d(4, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.flatten(self.head(self.body(x)), 1)

    net = Net()
    net.head.register_forward_pre_hook(lambda m, a: (torch.neg(a[0]),))  # the oracle's kind
    net.body[1].register_forward_hook(lambda m, a, out: torch.abs(out))
    before = (len(torch_module._global_forward_pre_hooks),
              len(torch_module._global_forward_hooks))
    with layer_macs(net) as macs, recording_calls(net) as calls:
        net(torch.randn(1, 3, 4, 4))
    flatten = [c for c in calls if c.startswith("torch:") and "flatten" in c]
    assert [c for c in calls if not c.startswith("torch:")] == [
        "", "body", "body.0", "body.1", "head"]
    assert len(flatten) == 1
    assert calls.index(flatten[0]) == len(calls) - 1  # after head returns, in Net.forward
    assert not any("neg" in c or "abs" in c for c in calls)  # the hooks' calls
    assert macs == {"body.0": 4 * 16 * 3, "head": 2 * 16 * 4}
    assert (len(torch_module._global_forward_pre_hooks),
            len(torch_module._global_forward_hooks)) == before


def test_the_oracles_masks_are_silent_to_the_call_record() -> None:
    """The masks are hooks whose op the record leaves out: the masked original records the
    calls the plain model records, so the reduced input stays usable."""
    from shrink.modcopy import shared_copy
    from shrink.reduced import recording_calls

    model = _Pooled().eval()
    x = torch.randn(1, 3, 64, 64)
    plan = shrink.prune(model, (x,), shrink.PruneConfig(0.5)).plan
    ref, plain = _shared_reference(model, plan), shared_copy(model)
    masked = [f for f, m in ref.named_modules() if m._forward_pre_hooks]
    assert masked  # the consumers of dropped channels carry masks
    with torch.no_grad(), recording_calls(plain) as want:
        plain(x)
    with torch.no_grad(), recording_calls(ref) as got:
        ref(x)
    assert got == want and any(c.startswith("torch:") for c in got)
