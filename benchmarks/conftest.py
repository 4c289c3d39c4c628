"""pytest-benchmark wiring for the latency suite: options, and writing results at session end."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from benchmarks.suite import RESULTS, write_results
from shrink.deploy.bench import BenchResult


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("shrink suite")
    group.addoption("--suite-seconds", type=float, default=6.0,
                    help="interleaved timing budget per (model, ratio, setting)")
    group.addoption("--suite-settings", default="1x1,1x2,32x1",
                    help="BATCHxTHREADS list timed for ratio 0.5 (other ratios: 1x1 only)")
    group.addoption("--suite-size", type=int, default=224, help="input side in pixels")
    group.addoption("--suite-round-to", default="1", help="round_to values (comma list)")
    group.addoption("--suite-results", type=Path, default=RESULTS, help="output directory")
    group.addoption("--suite-exporter", default="dynamo", choices=("dynamo", "torchscript"),
                    help="torchscript: faster exports (smoke runs)")
    group.addoption("--suite-clock", default="wall", choices=("wall", "thread", "auto"),
                    help="auto: CPU time of the timing thread for 1-thread settings (loaded "
                    "machines), wall time otherwise")


@pytest.fixture(scope="session")
def suite_results(request: pytest.FixtureRequest) -> Iterator[list[BenchResult]]:
    results: list[BenchResult] = []
    yield results
    if results:
        write_results(results, request.config.getoption("--suite-results"))
