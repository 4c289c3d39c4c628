"""Compiler speed: shrink vs torch-pruning wall time to prune the core zoo (issue 2's 19 models).

Per model, in one process and side by side: ``shrink.prune`` with and without the masked-oracle
verification, and torch-pruning 1.6 (``MetaPruner``, ``MagnitudeImportance(p=2)``, classifier
ignored), all at the same ratio. Reports wall time, parameters and MACs after, and success
(the pruned model runs and returns the dense model's output shape)::

    python -m benchmarks.bench_compile_time                   # all 19 models, ratio 0.5
    python -m benchmarks.bench_compile_time --models resnet50,densenet121 --repeat 3

Times are the minimum over ``--repeat`` rounds, the tools interleaved within each round.
torch-pruning prunes in place; it is timed without the copy (the model is copied outside the
timer) and with it (``torch-pruning + deepcopy``: what a caller who keeps the original pays;
shrink returns a new model and its times include making it). Results go to
benchmarks/results/compile_time.*.
"""

from __future__ import annotations

import argparse
import copy
import csv
import json
import logging
import math
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shrink
from benchmarks.suite import RESULTS, final_classifier
from shrink.report import count_macs, count_params
from shrink.testing import randomize_

ZOO = ("resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2",
       "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s",
       "densenet121", "googlenet", "inception_v3", "squeezenet1_0", "shufflenet_v2_x1_0",
       "regnet_y_400mf", "regnet_x_400mf", "vgg11_bn", "mnasnet0_5", "alexnet")

log = logging.getLogger("benchmarks.compile_time")


def build(name: str) -> tuple[nn.Module, tuple[torch.Tensor, ...]]:
    import torchvision

    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet",
                                                                      "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    randomize_(model)
    side = 299 if name == "inception_v3" else 224
    return model, (torch.randn(1, 3, side, side),)


def timed(fn: Callable[[], nn.Module]) -> tuple[float, float, nn.Module | None, str]:
    """Wall and process-CPU seconds of one call (CPU time is robust to load), its result, and
    the error message of a failure (a failure is a result here)."""
    t0, c0 = time.perf_counter(), time.process_time()
    try:
        out = fn()
    except Exception as e:
        return (time.perf_counter() - t0, time.process_time() - c0, None,
                f"{type(e).__name__}: {str(e)[:200]}")
    return time.perf_counter() - t0, time.process_time() - c0, out, ""


TOOLS = ("shrink (verify)", "shrink (no verify)", "torch-pruning",
         "torch-pruning + deepcopy")


def measure(name: str, ratio: float, repeat: int) -> list[dict[str, Any]]:
    """Each tool ``repeat`` times, interleaved round by round (the machine's state drifts
    between rounds, not between the tools of one round); the minimum over rounds.

    torch-pruning prunes in place: its own column copies the model outside the timer, the
    ``+ deepcopy`` column inside it, as a caller who keeps the original model must (shrink
    never modifies the caller's model, and its times include making the new one)."""
    model, inputs = build(name)
    with torch.no_grad():
        want = model(*inputs).shape
    macs0, params0 = count_macs(model, inputs), count_params(model)
    tools: dict[str, Callable[[], nn.Module]] = {
        "shrink (verify)": lambda: shrink.prune(model, inputs,
                                                shrink.PruneConfig(ratio, norm=2)).model,
        "shrink (no verify)": lambda: shrink.prune(
            model, inputs, shrink.PruneConfig(ratio, norm=2, verify=False)).model,
        "torch-pruning + deepcopy": lambda: torch_pruning_prune_inplace(
            copy.deepcopy(model), inputs, ratio),
    }
    best: dict[str, list[float]] = {t: [math.inf, math.inf] for t in TOOLS}
    outs: dict[str, nn.Module | None] = {}
    errors: dict[str, str] = {}
    for _ in range(repeat):
        copied = copy.deepcopy(model)  # torch-pruning's own column: copied outside the timer
        for tool in TOOLS:
            if tool in errors:
                continue
            fn = tools.get(tool) or (lambda m=copied: torch_pruning_prune_inplace(m, inputs,
                                                                                  ratio))
            seconds, cpu, out, err = timed(fn)
            if err:
                errors[tool], outs[tool] = err, None
                continue
            outs[tool] = out
            best[tool] = [min(best[tool][0], seconds), min(best[tool][1], cpu)]
    rows = []
    for tool in TOOLS:
        out, err = outs.get(tool), errors.get(tool, "")
        ok = out is not None
        if ok and out is not None:
            with torch.no_grad():
                ok = out.eval()(*inputs).shape == want
            err = err or ("" if ok else "output shape changed")
        seconds, cpu = best[tool]
        rows.append({
            "model": name, "tool": tool, "ratio": ratio, "seconds": seconds, "cpu_seconds": cpu,
            "success": ok,
            "params_before": params0, "macs_before": macs0,
            "params_after": count_params(out) if out is not None else None,
            "macs_after": count_macs(out, inputs) if ok and out is not None else None,
            "error": err,
        })
        log.info("%-20s %-26s %7.3f s wall %7.3f s cpu %s", name, tool, seconds, cpu,
                 "ok" if ok else err)
    return rows


def torch_pruning_prune_inplace(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                                ratio: float) -> nn.Module:
    """:func:`suite.torch_pruning_prune` without its deepcopy (done outside the timer)."""
    import torch_pruning as tp

    pruner = tp.pruner.MetaPruner(model, inputs[0],
                                  importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=ratio, ignored_layers=[final_classifier(model)])
    pruner.step()
    return model


def table(rows: Sequence[dict[str, Any]]) -> str:
    tools = list(TOOLS)
    head = (f"{'model':<20} " + " ".join(f"{t:>24}" for t in tools)
            + f" {'params shrink/tp (M)':>21} {'GMACs shrink/tp':>16}")
    lines = ["wall seconds (process CPU seconds in brackets), min over repeats", head,
             "-" * len(head)]
    for name in dict.fromkeys(r["model"] for r in rows):
        by = {r["tool"]: r for r in rows if r["model"] == name}
        cells = [f"{by[t]['seconds']:>12.3f} s ({by[t]['cpu_seconds']:>6.3f})"
                 if by[t]["success"] else f"{'FAILED':>24}" for t in tools]
        s, t = by["shrink (verify)"], by["torch-pruning"]
        params = f"{_m(s['params_after'])}/{_m(t['params_after'])}"
        macs = f"{_g(s['macs_after'])}/{_g(t['macs_after'])}"
        lines.append(f"{name:<20} " + " ".join(cells) + f" {params:>21} {macs:>16}")
    return "\n".join(lines)


def _m(v: int | None) -> str:
    return f"{v / 1e6:.2f}" if v else "-"


def _g(v: int | None) -> str:
    return f"{v / 1e9:.3f}" if v else "-"


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(ZOO))
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--repeat", type=int, default=1)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    logging.getLogger("shrink").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    rows: list[dict[str, Any]] = []
    for name in args.models.split(","):
        rows += measure(name, args.ratio, args.repeat)
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "compile_time.json").write_text(json.dumps(rows, indent=1))
    with (args.out / "compile_time.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    sys.stdout.write(table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
