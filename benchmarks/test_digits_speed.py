"""The digits workflow's latency claim, on demand: ``pytest benchmarks/test_digits_speed.py``.

Wall-clock speedups are flaky on a loaded machine, so they live here and not in tests/
(tests/test_workflow.py checks the workflow's deterministic results).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "02_digits_workflow.py"


def test_digits_half_the_channels_runs_faster_in_onnxruntime(benchmark: Any) -> None:
    pytest.importorskip("sklearn")
    pytest.importorskip("onnxruntime")
    spec = importlib.util.spec_from_file_location("digits_workflow", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    r = benchmark.pedantic(digits.run, kwargs={"importance": "l2", "ratio": 0.5, "epochs": 15,
                                               "finetune_epochs": 5, "seed": 0,
                                               "bench_seconds": 1.0}, rounds=1, iterations=1)
    benchmark.extra_info.update(speedup=r["speedup"], ideal_speedup=r["ideal_speedup"])
    assert r["ideal_speedup"] == pytest.approx(r["macs"][0] / r["macs"][1])
    assert r["speedup"] > 1.2  # measured: onnxruntime, 1 thread, best-of interleaved
