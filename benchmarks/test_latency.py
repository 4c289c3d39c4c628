"""Latency suite on pytest-benchmark: ``pytest benchmarks/ --benchmark-only``.

Each test builds one (model, ratio) case: dense, shrink and torch-pruning variants with
calibrated random weights, and times them interleaved in onnxruntime (see
:mod:`benchmarks.suite`). pytest-benchmark records the wall time of the whole measurement; the
latency figures (min/median/p90 per variant, realized/ideal speedup, efficiency) go into the
benchmark's ``extra_info`` and into benchmarks/results/latency.{json,csv,png}.
"""

from __future__ import annotations

from typing import Any

import pytest

from benchmarks.suite import RATIOS, SUITE, _parse_settings, build_case, run_case
from shrink.deploy.bench import BenchResult
from shrink.report import count_macs


@pytest.mark.parametrize("ratio", RATIOS, ids=[f"r{r}" for r in RATIOS])
@pytest.mark.parametrize("name", SUITE)
def test_latency(benchmark: Any, name: str, ratio: float, suite_results: list[BenchResult],
                 request: pytest.FixtureRequest) -> None:
    opt = request.config.getoption
    settings = _parse_settings(opt("--suite-settings")) if ratio == 0.5 else [(1, 1)]
    case = build_case(name, ratio, size=opt("--suite-size"),
                      round_to=[int(k) for k in opt("--suite-round-to").split(",")])
    res = benchmark.pedantic(run_case, args=(case,),
                             kwargs={"seconds": opt("--suite-seconds"), "settings": settings,
                                     "clock": opt("--suite-clock"),
                                     "dynamo": opt("--suite-exporter") == "dynamo"},
                             rounds=1, iterations=1)
    suite_results.append(res)
    for r in res.rows:
        key = f"{r.variant}/b{r.batch}/t{r.threads}"
        benchmark.extra_info[key] = {"min_ms": r.min_ms, "median_ms": r.median_ms,
                                     "p90_ms": r.p90_ms, "speedup": r.speedup, "ideal": r.ideal,
                                     "efficiency": r.efficiency}
    assert_rows_consistent(res, case.inputs, {"dense": case.dense, **case.variants})


def assert_rows_consistent(res: BenchResult, inputs: tuple[Any, ...],
                           models: dict[str, Any]) -> None:
    """Every row's figures follow from the timings and from MACs counted here, per model."""
    one = tuple(t[:1] for t in inputs)
    macs = {label: count_macs(m, one) for label, m in models.items()}
    assert {r.variant for r in res.rows} == set(models)
    for r in res.rows:
        dense = res.row("dense", r.backend, r.batch, r.threads)
        assert 0 < r.min_ms <= r.median_ms <= r.p90_ms
        assert r.macs == macs[r.variant]
        assert r.speedup == pytest.approx(dense.min_ms / r.min_ms)
        assert r.ideal == pytest.approx(macs["dense"] / macs[r.variant])
        assert r.efficiency == pytest.approx(r.speedup / r.ideal)
        if r.variant != "dense":
            assert r.ideal > 1  # every pruned variant does less work
