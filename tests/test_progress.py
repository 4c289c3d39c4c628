"""shrink.progress: what a listener receives, and that nothing happens without one."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

import shrink
import shrink.progress
from shrink.progress import Event, listen, stage, step


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        return self.head(torch.relu(self.conv2(y)).mean((2, 3)))


def _pairs(events: list[Event]) -> list[tuple[str, str]]:
    return [(e.phase, e.name) for e in events]


def _stages(*names: str) -> list[tuple[str, str]]:
    return [pair for n in names for pair in (("start", n), ("end", n))]


def test_stage_reports_start_then_end_with_elapsed_seconds(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(shrink.progress.time, "perf_counter", lambda: next(clock))
    events: list[Event] = []
    with listen(events.append), stage("capture"):
        pass
    assert events == [Event("start", "capture"), Event("end", "capture", seconds=2.5)]


def test_nested_stages_carry_their_depth() -> None:
    events: list[Event] = []
    with listen(events.append), stage("bench"):
        with stage("export"):
            pass
        with stage("check"):
            pass
    assert _pairs(events) == [("start", "bench"), *_stages("export", "check"), ("end", "bench")]
    assert [e.depth for e in events] == [0, 1, 1, 1, 1, 0]


def test_a_raising_stage_ends_failed_and_the_error_propagates() -> None:
    events: list[Event] = []
    with listen(events.append), pytest.raises(KeyError), stage("outer"), stage("inner"):
        raise KeyError("boom")
    assert _pairs(events) == [("start", "outer"), *_stages("inner"), ("end", "outer")]
    assert [e.failed for e in events if e.phase == "end"] == [True, True]
    with listen(events.append), stage("next"):
        pass
    assert events[-1].depth == 0  # the failure did not leave the depth raised
    assert not events[-1].failed


def test_step_carries_its_position_in_the_title() -> None:
    events: list[Event] = []
    with listen(events.append):
        for i, name in enumerate(["resnet18", "mobilenet_v2"], 1):
            with step(i, 2, name):
                pass
    assert [e.title for e in events] == ["[1/2] resnet18", "[1/2] resnet18",
                                         "[2/2] mobilenet_v2", "[2/2] mobilenet_v2"]
    assert Event("start", "plain").title == "plain"


def test_without_a_listener_a_stage_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_clock() -> float:
        raise AssertionError("a stage without a listener must not read the clock")

    events: list[Event] = []
    with listen(events.append):
        pass
    monkeypatch.setattr(shrink.progress.time, "perf_counter", no_clock)
    with stage("capture"), step(1, 2, "model"):
        pass
    assert events == []


def test_listen_replaces_the_outer_listener_and_restores_it() -> None:
    outer: list[Event] = []
    inner: list[Event] = []
    with listen(outer.append):
        with listen(inner.append), stage("a"):
            pass
        with stage("b"):
            pass
    assert _pairs(inner) == _stages("a")
    assert _pairs(outer) == _stages("b")


def test_the_listener_belongs_to_its_thread() -> None:
    events: list[Event] = []

    def work() -> None:
        with stage("elsewhere"):
            pass

    with listen(events.append):
        t = threading.Thread(target=work)
        t.start()
        t.join()
        with stage("here"):
            pass
    assert _pairs(events) == _stages("here")


@pytest.mark.parametrize(
    ("options", "expected"),
    [
        ({}, ("capture", "analyze", "score", "select", "probe", "apply", "verify")),
        ({"verify": False}, ("capture", "analyze", "score", "select", "probe", "apply")),
        ({"target": "macs"},
         ("capture", "analyze", "score", "solve target", "select", "probe", "apply", "verify")),
    ],
    ids=["uniform", "no-verify", "macs-target"],
)
def test_prune_reports_its_stages_in_order(options: dict[str, object],
                                           expected: tuple[str, ...]) -> None:
    model = Tiny().eval()
    x = torch.randn(1, 3, 8, 8)
    events: list[Event] = []
    with listen(events.append):
        res = shrink.prune(model, (x,), shrink.PruneConfig(0.5, round_to=1, **options))
    assert _pairs(events) == _stages(*expected)
    assert all(e.depth == 0 and not e.failed for e in events)
    params = [sum(p.numel() for p in m.parameters()) for m in (model, res.model)]
    assert params[1] < params[0]  # the stages did run the pipeline
