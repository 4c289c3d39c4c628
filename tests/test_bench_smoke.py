"""A tiny run of the benchmark suite and of the benchmark API, so neither can rot (< 60 s)."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import shrink
from shrink.deploy.bench import compare
from shrink.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def _toy() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(16, 4)).eval()


def test_compare_on_torch_backend_reports_ideal_and_skips_missing_cuda() -> None:
    dense = _toy()
    x = (torch.randn(1, 3, 16, 16),)
    small = shrink.compress(dense, 0.5, x)
    res = compare(dense, small, x, backends=("torch-cpu", "torch-cuda"), batches=(1, 3),
                  seconds=0.02, min_calls=3, name="toy")
    assert {(r.variant, r.batch) for r in res.rows if r.backend == "torch-cpu"} == {
        ("dense", 1), ("pruned", 1), ("dense", 3), ("pruned", 3)}
    pruned = res.row("pruned", "torch-cpu", batch=3)
    assert pruned.calls >= 3
    assert pruned.min_ms <= pruned.median_ms <= pruned.p90_ms
    assert pruned.ideal == pytest.approx(res.row("dense", "torch-cpu").macs / pruned.macs)
    assert pruned.efficiency == pytest.approx(pruned.speedup / pruned.ideal)
    assert pruned.throughput == pytest.approx(3000 / pruned.min_ms)
    if not torch.cuda.is_available():
        assert dict(res.skipped)["torch-cuda"].startswith("torch.cuda.is_available()")
    data = json.loads(res.to_json())
    assert len(data["rows"]) == len(res.rows)
    assert data["environment"]["torch"] == torch.__version__
    assert res.to_csv().count("\n") == len(res.rows) + 1
    assert "pruned" in res.table()


def test_compare_rejects_bad_settings() -> None:
    with pytest.raises(ConfigError, match="unknown backend"):
        compare(_toy(), _toy(), torch.randn(1, 3, 8, 8), backends=("tpu",))
    with pytest.raises(ConfigError, match="ints >= 1"):
        compare(_toy(), _toy(), torch.randn(1, 3, 8, 8), batches=(0,))
    with pytest.raises(ConfigError, match="may not use the labels"):
        compare(_toy(), _toy(), torch.randn(1, 3, 8, 8), others={"dense": _toy()})
    with pytest.raises(ConfigError, match="needs example_inputs"):
        compare(_toy(), _toy(), None)


@pytest.mark.onnx
def test_latency_suite_smoke_run_writes_json_csv_and_plot(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "pytest", "benchmarks/test_latency.py", "--benchmark-only",
           "-k", "resnet18 and r0.5", "-q", "-p", "no:cacheprovider",
           "--suite-seconds", "0.05", "--suite-settings", "1x1,2x1", "--suite-size", "32",
           "--suite-results", str(tmp_path), "--suite-exporter", "torchscript",
           "--suite-clock", "auto", "--benchmark-disable-gc"]
    # under pytest-xdist the worker's variables would make pytest-benchmark think it runs in
    # xdist too (and disable itself, refusing --benchmark-only)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTEST_XDIST", "PYTEST_"))}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert {p.name for p in tmp_path.iterdir()} >= {"latency.json", "latency.csv", "latency.png"}
    rows = json.loads((tmp_path / "latency.json").read_text())["rows"]
    variants = {(r["variant"], r["batch"]) for r in rows}
    assert variants == {(v, b) for v in ("dense", "shrink", "torch-pruning") for b in (1, 2)}
    assert all(r["model"] == "resnet18" and r["ratio"] == 0.5 for r in rows)
    assert {r["clock"] for r in rows} == {"thread"}
    with (tmp_path / "latency.csv").open() as f:
        assert len(list(csv.DictReader(f))) == len(rows)
    assert (tmp_path / "latency.png").read_bytes()[:4] == b"\x89PNG"


def test_round_to_does_not_cancel_grouped_conv_pruning() -> None:
    """Regression (found by the latency suite on regnet_y_400mf): with 13 groups of 8 channels,
    round_to=8 used to round every group's kept count to whole blocks, pruning nothing."""
    conv = nn.Sequential(nn.Conv2d(8, 104, 1), nn.ReLU(), nn.Conv2d(104, 104, 3, groups=13),
                         nn.ReLU(), nn.Conv2d(104, 8, 1)).eval()
    x = torch.randn(1, 8, 6, 6)
    res = shrink.prune(conv, (x,), shrink.PruneConfig(0.5, round_to=8))
    assert res.model[2].out_channels == 52
    assert res.model[2].groups == 13
    assert res.model[0].out_channels == 52
