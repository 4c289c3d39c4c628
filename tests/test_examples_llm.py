"""examples/06_tiny_llm.py --quick, run as a user runs it: every method gives a smaller model
with finite perplexities, and the table says so."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
METHODS = ("ln", "activation", "taylor", "depth", "tp")


def test_tiny_llm_quick_prunes_every_method_and_reports_finite_perplexity(
    tmp_path: Path,
) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("torch_pruning")
    out = tmp_path / "tiny_llm.md"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "06_tiny_llm.py"), "--quick",
         "--ratios", "0.3", "--out", str(out)],
        capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    result = json.loads(out.with_suffix(".json").read_text())
    rows = {(r["method"], r["ratio"]): r for r in result["rows"]}
    assert set(rows) == {("dense", 0.0)} | {(m, 0.3) for m in METHODS}
    errors = {k: r["error"] for k, r in rows.items() if "error" in r}
    assert not errors  # a method that used to work and now fails is a regression

    dense = rows[("dense", 0.0)]
    assert dense["params"] == result["dense_params"]
    # 30 steps on real text: well below the 256 of a uniform guess, far from perfect
    assert 2.0 < math.exp(dense["loss_pruned"]) < 128.0
    for key, r in rows.items():
        for loss in (r["loss_pruned"], r["loss_finetuned"]):
            assert math.isfinite(loss), key
            assert loss > 0, key
        if key[0] == "dense":
            continue
        assert r["params"] < dense["params"], key  # really smaller
        if key[0] in ("ln", "activation", "taylor", "tp"):  # solved for the parameter target
            assert r["kept"] == pytest.approx(0.7, abs=0.03), key
    # shrink's MLP pruning costs little before the fine-tune; removing a layer costs more
    assert rows[("ln", 0.3)]["loss_pruned"] < rows[("depth", 0.3)]["loss_pruned"]

    md = out.read_text()
    assert md.startswith("# Tiny Llama")
    assert "06_tiny_llm.py --quick --ratios 0.3" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 1 + len(METHODS)  # header + dense + one row per method
    assert "n/a" not in "\n".join(table)
