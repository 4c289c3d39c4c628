"""A latency target, measured: resnet18 at 64x64 pruned to half its onnxruntime latency.

The plan is checked by timings of its own (``shrink.compare``: dense and pruned interleaved,
best-of, one thread on the thread clock), not by the allocation's report. On a shared machine
one timing of this model moves by several percent (its pruned weights are about the size of
the last-level cache, so other processes' memory traffic shows), so the check is on the median
of three timings, and up to three rounds of timings are taken (the retry is in the timing;
the assertion, within 5% of the goal, stays).
"""

from __future__ import annotations

import statistics
from pathlib import Path

import pytest
import torch

import shrink
from shrink.testing import calibrate_bn_, randomize_

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("onnxruntime")

GOAL = 0.5
TOLERANCE = 0.05


def _off(kept: float) -> float:
    return abs(kept / (1 - GOAL) - 1)


@pytest.mark.slow
def test_resnet18_pruned_to_half_its_measured_latency(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHRINK_CACHE_DIR", str(tmp_path))     # a cold cache
    model = torchvision.models.resnet18(weights=None)
    randomize_(model, seed=1)
    calibrate_bn_(model, lambda: (torch.randn(4, 3, 64, 64),), steps=2)
    model.eval()
    x = (torch.randn(1, 3, 64, 64),)
    res = shrink.prune(model, x, shrink.PruneConfig(GOAL, target="latency"))
    assert res.report is not None
    assert res.report.max_rel_error is not None  # verified against the masked original
    lat = res.report.latency
    assert lat is not None
    assert lat.converged, lat
    assert _off(lat.measured) <= TOLERANCE
    kept: list[float] = []
    for _ in range(3):
        for _ in range(3):
            bench = shrink.compare(model, res.model, x, seconds=3.0, clock="auto",
                                   dynamo=False, flush_denormals=True, workdir=tmp_path)
            kept.append(1 / bench.row("pruned").speedup)
        if _off(statistics.median(kept)) <= TOLERANCE:
            break
    assert _off(statistics.median(kept)) <= TOLERANCE, (kept, lat)
