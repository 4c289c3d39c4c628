"""The train-prune-fine-tune workflow of examples/02_digits_workflow.py, run as a test."""

import importlib.util
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), EXAMPLES / name)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_digits_half_the_channels_recovers_dense_accuracy_within_one_point(
    record_property: Callable[[str, object], None],
) -> None:
    """Deterministic claims only; the latency claim is benchmarks/test_digits_speed.py."""
    pytest.importorskip("sklearn")
    digits = _example("02_digits_workflow.py")
    start = time.perf_counter()
    r = digits.run(importance="l2", ratio=0.5, epochs=15, finetune_epochs=5, seed=0,
                   bench_seconds=0)
    for key in ("acc_dense", "acc_pruned", "acc_finetuned"):
        record_property(key, r[key])
    record_property("seconds", time.perf_counter() - start)
    assert r["speedup"] is None  # not timed here
    assert r["acc_dense"] >= 97.0  # the dense CNN is a real classifier, not chance
    assert r["acc_pruned"] < r["acc_dense"]  # pruning alone costs accuracy ...
    assert r["acc_finetuned"] >= r["acc_dense"] - 1.0  # ... which fine-tuning recovers
    params_kept = r["params"][1] / r["params"][0]
    macs_kept = r["macs"][1] / r["macs"][0]
    assert params_kept < 0.3  # half the channels on both sides of a conv: about a quarter
    assert macs_kept < 0.3


def test_digits_run_is_deterministic_for_a_seed() -> None:
    pytest.importorskip("sklearn")
    digits = _example("02_digits_workflow.py")
    a, b = (digits.run(epochs=2, finetune_epochs=1, seed=3, bench_seconds=0) for _ in range(2))
    assert a == b


def test_digits_plot_shows_accuracies_and_ratios(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    digits = _example("02_digits_workflow.py")
    result = {"importance": "l2", "acc_dense": 99.0, "acc_pruned": 80.0, "acc_finetuned": 98.5,
              "params": (100, 25), "macs": (1000, 260), "speedup": 2.5, "ideal_speedup": 3.8}
    digits.plot(result, str(tmp_path / "digits.png"))
    assert (tmp_path / "digits.png").stat().st_size > 10_000


def test_workflow_api_keeps_import_shrink_lean() -> None:
    code = ("import sys, shrink; shrink.sensitivity; shrink.prune_iteratively; shrink.criteria.Taylor; "
            "print([m for m in ('sklearn', 'matplotlib', 'torchvision') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"
