"""A latency target, measured: resnet18 at 64x64 pruned to half its onnxruntime latency.

Run on demand, like every timing goal (``pytest benchmarks/test_latency_target.py -m slow``):
its assertions are measured latencies, which a loaded CI machine cannot promise.

The plan is checked by timings of its own (``shrink.compare``: dense and pruned interleaved,
best-of, one thread on the thread clock), not by the allocation's report. On a shared machine
one timing of this model moves by several percent: at half its latency the pruned model's
weights are about the size of the last-level cache (31 MB of 32 here), so whether they stay
cached depends on what other processes do. The retry is generous, and only in what is timed:
up to three rounds of three timings, and a second allocation (with the cache warm) when the
first does not converge or none of its rounds lands; the assertions, the allocation within 5%
of the goal and the median of a round of timings within 5% of it, stay.
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


def _rounds(model: torch.nn.Module, pruned: torch.nn.Module, x: tuple[torch.Tensor, ...],
            workdir: Path) -> list[float]:
    """The median kept fraction of each round of three timings, until one is within."""
    medians = []
    for _ in range(3):
        kept = [1 / shrink.compare(model, pruned, x, seconds=3.0, clock="auto", dynamo=False,
                                   flush_denormals=True, workdir=workdir).row("pruned").speedup
                for _ in range(3)]
        medians.append(statistics.median(kept))
        if _off(medians[-1]) <= TOLERANCE:
            break
    return medians


@pytest.mark.slow
def test_resnet18_pruned_to_half_its_measured_latency(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHRINK_CACHE_DIR", str(tmp_path))     # a cold cache
    model = torchvision.models.resnet18(weights=None)
    randomize_(model, seed=1)
    calibrate_bn_(model, lambda: (torch.randn(4, 3, 64, 64),), steps=2)
    model.eval()
    x = (torch.randn(1, 3, 64, 64),)
    seen = []
    for _ in range(2):
        res = shrink.prune(model, x, shrink.PruneConfig(GOAL, target="latency"))
        assert res.report is not None
        assert res.report.max_rel_error is not None  # verified against the masked original
        lat = res.report.latency
        assert lat is not None
        medians = _rounds(model, res.model, x, tmp_path) if lat.converged else []
        seen.append((lat, medians))
        if medians and _off(medians[-1]) <= TOLERANCE:
            break
    lat, medians = seen[-1]
    assert lat.converged, seen
    assert _off(lat.measured) <= TOLERANCE
    assert _off(medians[-1]) <= TOLERANCE, seen
