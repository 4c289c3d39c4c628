"""examples/06_tiny_llm.py --quick, run as a user runs it: every method and variant gives a
smaller model with finite perplexities, the options change what they say they change, the
config column tells which models ``save_pretrained`` round-trips, and the table says so."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
IMPORTANCES = ("ln", "activation", "activation_weighted", "taylor")
METHODS = (*IMPORTANCES, "depth", "tp")
VARIANTS = (*(f"{i}+{f}" for i in IMPORTANCES for f in ("query", "exact", "query+exact")),
            *(f"taylor+local{f}" for f in ("", "+query", "+exact", "+query+exact")))
QUICK_HIDDEN, QUICK_KV_HEADS = 64, 2  # the example's QUICK setup


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
    assert set(rows) == {("dense", 0.0)} | {(m, 0.3) for m in (*METHODS, *VARIANTS)}
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
        if key[0] != "depth":  # solved for the parameter target
            assert r["kept"] == pytest.approx(0.7, abs=0.03), key
    assert rows[("depth", 0.3)]["shape"].startswith("1L ")  # one of the two layers removed

    # the options do what they say: exact_only keeps the hidden size, gqa="query" the KV heads
    for (method, _), r in rows.items():
        flags = method.split("+")[1:]
        if "exact" in flags:
            assert f" h{QUICK_HIDDEN} " in r["shape"], method
        if "query" in flags:
            assert f"/kv{QUICK_KV_HEADS} " in r["shape"], method
    # exact width pruning costs little before the fine-tune; removing a layer costs more
    for method in ("ln+exact", "activation_weighted+exact", "taylor+exact"):
        assert rows[(method, 0.3)]["loss_pruned"] < rows[("depth", 0.3)]["loss_pruned"], method

    # config round-trip: models with per-layer sizes cannot be described, uniform ones can
    assert dense["config"] == "yes"
    assert rows[("depth", 0.3)]["config"] == "yes"
    assert rows[("taylor+local+exact", 0.3)]["config"] == "yes"
    for key, r in rows.items():
        assert r["config"] == "yes" or r["config"].startswith("no: "), key
        if "," in r["shape"]:  # per-layer sizes differ
            assert r["config"].startswith("no: "), key
            assert "differ" in r["config"], key

    target = result["target"]
    eligible = [r for (m, _), r in rows.items() if m not in ("dense", "tp") and r["kept"] <= 0.71]
    assert target["best_loss"] == min(r["loss_finetuned"] for r in eligible)
    assert target["met"] == (target["best_loss"] <= dense["loss_finetuned"] + math.log(1.1)
                             and target["best_loss"] < rows[("tp", 0.3)]["loss_finetuned"])

    md = out.read_text()
    assert md.startswith("# Tiny Llama")
    assert "06_tiny_llm.py --quick --ratios 0.3" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + 1 + len(METHODS) + len(VARIANTS)  # header, dense, one row each
    assert "n/a" not in "\n".join(table)
    assert "| shrink taylor, gqa=\"query\", exact_only=True | 30% |" in md
    assert "Target (from the issue)" in md
