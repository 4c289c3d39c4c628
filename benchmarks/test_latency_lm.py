"""Smoke run of ``benchmarks/latency_lm.py --quick`` (on demand: ``pytest
benchmarks/test_latency_lm.py -m slow``; about 1-2 minutes, it trains, prunes and times).

Only the structure is checked: which variant wins on a 30-step model says nothing.
"""

from __future__ import annotations

import math

import pytest

pytest.importorskip("transformers")
pytest.importorskip("onnxruntime")


@pytest.mark.slow
def test_quick_run_compares_latency_and_uniform_at_equal_latency() -> None:
    from benchmarks import latency_lm

    result = latency_lm.main(["--quick"])
    (seed,) = result["seeds"]
    kinds = [v["kind"] for v in seed["variants"]]
    assert kinds[:2] == ["dense", "latency"]
    assert set(kinds[2:]) <= {"uniform", "uniform (slower)", "uniform (faster)"}
    assert kinds[2:]
    for v in seed["variants"]:
        assert math.isfinite(v["loss_pruned"])
        assert math.isfinite(v["loss_finetuned"])
        if v["kind"] != "dense":
            assert all(0 < k < 1.5 for k in v["kept_final"])
    assert result["comparisons"]
