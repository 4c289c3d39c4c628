"""Latency suite: dense vs shrink vs torch-pruning, interleaved, on torchvision models.

Run it as a script (the numbers in the README come from this)::

    python -m benchmarks.suite --ratios 0.5 --seconds 6 --settings 1x1,1x2,32x1
    python -m benchmarks.suite --models resnet18 --ratios 0.25,0.5,0.75 --round-to 1,8

or through pytest-benchmark (``pytest benchmarks/ --benchmark-only``, see ``test_latency.py``).
Results go to ``benchmarks/results/`` as JSON, CSV and a PNG plot of realized vs ideal speedup.

Every model gets He-scaled random weights (:func:`shrink.testing.randomize_`) and BN statistics
calibrated on random data (:func:`shrink.testing.calibrate_bn_`), before pruning and again after
(for every variant alike), so that no variant runs on denormal activations.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

import shrink
from shrink.cli import terminal_progress
from shrink.deploy.bench import BenchResult, compare
from shrink.progress import step
from shrink.testing import calibrate_bn_, randomize_

log = logging.getLogger("benchmarks.suite")

SUITE = ("resnet18", "resnet50", "mobilenet_v2", "mobilenet_v3_large", "efficientnet_b0",
         "densenet121", "regnet_y_400mf", "vgg11_bn")
RATIOS = (0.25, 0.5, 0.75)
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Case:
    """One model at one ratio: the dense model and its pruned variants, ready to time."""

    name: str
    ratio: float
    inputs: tuple[torch.Tensor, ...]
    dense: nn.Module
    variants: dict[str, nn.Module]


def torchvision_model(name: str) -> nn.Module:
    import torchvision

    return torchvision.models.get_model(name, weights=None).eval()


def calibrated(model: nn.Module, inputs: tuple[torch.Tensor, ...], seed: int = 0) -> nn.Module:
    """Randomise weights and calibrate BN on random data shaped like ``inputs`` (batch 8)."""
    randomize_(model, seed)
    recalibrate(model, inputs, seed)
    return model.eval()


def recalibrate(model: nn.Module, inputs: tuple[torch.Tensor, ...], seed: int = 0) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    shape = (8, *inputs[0].shape[1:])
    calibrate_bn_(model, lambda: (torch.randn(*shape, generator=gen),), steps=3)
    return model.eval()


def final_classifier(model: nn.Module) -> nn.Module:
    """The last Linear (or, without one, the last Conv) in registration order."""
    last_conv = None
    last_linear = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last_linear = m
        elif isinstance(m, nn.Conv2d):
            last_conv = m
    found = last_linear or last_conv
    if found is None:
        raise ValueError(f"{type(model).__name__} has no Linear or Conv2d layer")
    return found


def torch_pruning_prune(model: nn.Module, inputs: tuple[torch.Tensor, ...],
                        ratio: float) -> nn.Module:
    """torch-pruning 1.6 reference: MetaPruner, MagnitudeImportance(p=2), classifier ignored."""
    import torch_pruning as tp

    model = copy.deepcopy(model)
    pruner = tp.pruner.MetaPruner(
        model, inputs[0] if len(inputs) == 1 else inputs,
        importance=tp.importance.MagnitudeImportance(p=2),
        pruning_ratio=ratio, ignored_layers=[final_classifier(model)],
    )
    pruner.step()
    return model.eval()


def build_case(name: str, ratio: float, *, round_to: Sequence[int | str] = ("auto",),
               with_torch_pruning: bool = True, size: int = 224,
               factory: Callable[[str], nn.Module] = torchvision_model,
               exact_only: bool = False) -> Case:
    """Dense model plus ``shrink-r<k>`` variants (one per ``round_to``) and torch-pruning's;
    with ``exact_only`` also a ``shrink-exact`` variant (LayerNorm-normalised channels kept)."""
    inputs = (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)),)
    dense = calibrated(factory(name), inputs)
    variants: dict[str, nn.Module] = {}
    for k in round_to:
        label = "shrink" if len(round_to) == 1 else f"shrink-r{k}"
        t0 = time.perf_counter()
        small = shrink.compress(dense, ratio, inputs, norm=2, round_to=k)
        log.info("%s@%.2f: %s in %.1f s", name, ratio, label, time.perf_counter() - t0)
        variants[label] = recalibrate(small, inputs)
    if exact_only:
        small = shrink.compress(dense, ratio, inputs, norm=2, round_to=round_to[0],
                                exact_only=True)
        variants["shrink-exact"] = recalibrate(small, inputs)
    if with_torch_pruning:
        variants["torch-pruning"] = recalibrate(torch_pruning_prune(dense, inputs, ratio), inputs)
    return Case(name, ratio, inputs, dense, variants)


def run_case(case: Case, *, seconds: float, settings: Sequence[tuple[int, int]],
             backends: Sequence[str] = ("ort-cpu",), clock: str = "wall",
             dynamo: bool = True) -> BenchResult:
    """Time the case's variants interleaved with the dense model at every (batch, threads)."""
    labels = list(case.variants)
    first, others = labels[0], {k: case.variants[k] for k in labels[1:]}
    res = compare(case.dense, case.variants[first], case.inputs, others=others,
                  backends=backends, settings=settings, seconds=seconds, min_calls=3,
                  clock=clock, dynamo=dynamo, name=f"{case.name}@{case.ratio}")
    # the primary variant is called "pruned" by compare(); give it its real label back
    rows = tuple(r if r.variant != "pruned" else _relabel(r, first) for r in res.rows)
    return BenchResult(res.name, rows, res.environment, res.skipped)


def _relabel(row: Any, label: str) -> Any:
    from dataclasses import replace

    return replace(row, variant=label)


def flat_rows(results: Sequence[BenchResult]) -> list[dict[str, Any]]:
    out = []
    for res in results:
        model, ratio = res.name.rsplit("@", 1)
        for r in res.to_dict()["rows"]:
            out.append({"model": model, "ratio": float(ratio), **r})
    return out


def write_results(results: Sequence[BenchResult], outdir: Path = RESULTS,
                  stem: str = "latency") -> dict[str, Path]:
    """Write ``<stem>.json``, ``<stem>.csv`` and ``<stem>.png`` into ``outdir``."""
    import csv

    outdir.mkdir(parents=True, exist_ok=True)
    rows = flat_rows(results)
    env = dict(results[0].environment) if results else {}
    paths = {"json": outdir / f"{stem}.json", "csv": outdir / f"{stem}.csv",
             "png": outdir / f"{stem}.png"}
    paths["json"].write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    with paths["csv"].open("w", newline="") as f:
        if rows:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
    plot(rows, paths["png"])
    return paths


def plot(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Realized (solid) and ideal (dashed) speedup vs ratio; one panel per model, ORT b1 1 thr."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sel = [r for r in rows if r["backend"] == "ort-cpu" and r["batch"] == 1 and r["threads"] == 1
           and r["variant"] != "dense"]
    models = sorted({r["model"] for r in sel}) or ["(no data)"]
    cols = min(4, len(models))
    nrows = (len(models) + cols - 1) // cols
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.2 * nrows), squeeze=False)
    for ax, model in zip(axes.flat, models, strict=False):
        for variant in sorted({r["variant"] for r in sel if r["model"] == model}):
            pts = sorted((r["ratio"], r["speedup"], r["ideal"]) for r in sel
                         if r["model"] == model and r["variant"] == variant)
            xs = [p[0] for p in pts]
            line = ax.plot(xs, [p[1] for p in pts], "o-", label=f"{variant} realized")[0]
            ax.plot(xs, [p[2] for p in pts], "x--", color=line.get_color(), alpha=0.6,
                    label=f"{variant} ideal")
        ax.set_title(model)
        ax.set_xlabel("pruning ratio")
        ax.set_ylabel("speedup vs dense")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(models):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    fig.suptitle("ORT CPU, batch 1, 1 thread: realized (solid) vs ideal = MACs ratio (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def summary(results: Sequence[BenchResult], threads: int = 1, batch: int = 1) -> str:
    """Per model and ratio: dense ms, each variant's ms, realized, ideal and efficiency."""
    lines = [f"ORT CPU, batch {batch}, {threads} thread(s), min latency over interleaved rounds",
             f"{'model':<20} {'ratio':>5} {'variant':<14} {'dense ms':>9} {'ms':>9} "
             f"{'realized':>8} {'ideal':>6} {'eff':>5}"]
    for res in results:
        model, ratio = res.name.rsplit("@", 1)
        for r in res.rows:
            if r.backend != "ort-cpu" or r.threads != threads or r.batch != batch:
                continue
            if r.variant == "dense":
                dense_ms = r.min_ms
                continue
            lines.append(f"{model:<20} {float(ratio):>5.2f} {r.variant:<14} {dense_ms:>9.2f} "
                         f"{r.min_ms:>9.2f} {r.speedup or 0:>7.2f}x {r.ideal or 0:>5.2f}x "
                         f"{r.efficiency or 0:>5.2f}")
    return "\n".join(lines)


def markdown(rows: Sequence[dict[str, Any]], ratio: float, batch: int, threads: int) -> str:
    """One markdown table per setting: dense ms, then ms/realized/ideal/efficiency per variant."""
    sel = [r for r in rows if r["ratio"] == ratio and r["batch"] == batch
           and r["threads"] == threads and r["backend"] == "ort-cpu"]
    variants = list(dict.fromkeys(r["variant"] for r in sel if r["variant"] != "dense"))
    clock = ", ".join(sorted({r.get("clock", "wall") for r in sel})) or "-"
    head = ["model", "dense ms"]
    for v in variants:
        head += [f"{v} ms", f"{v} realized", f"{v} ideal", f"{v} eff"]
    lines = [f"ratio {ratio}, batch {batch}, {threads} thread(s), clock {clock}",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    effs: dict[str, list[float]] = {v: [] for v in variants}
    for model in dict.fromkeys(r["model"] for r in sel):
        by = {r["variant"]: r for r in sel if r["model"] == model}
        cells = [model, f"{by['dense']['min_ms']:.2f}"]
        for v in variants:
            r = by.get(v)
            if r is None:
                cells += ["-"] * 4
                continue
            effs[v].append(r["efficiency"])
            cells += [f"{r['min_ms']:.2f}", f"{r['speedup']:.2f}x", f"{r['ideal']:.2f}x",
                      f"{r['efficiency']:.2f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for v, e in effs.items():
        if e:
            lines.append(f"{v}: median efficiency {statistics.median(e):.2f}, min {min(e):.2f}")
    return "\n".join(lines)


def _parse_settings(text: str) -> list[tuple[int, int]]:
    out = []
    for item in text.split(","):
        batch, threads = item.lower().split("x")
        out.append((int(batch), int(threads)))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default=",".join(SUITE))
    p.add_argument("--ratios", default=",".join(map(str, RATIOS)))
    p.add_argument("--round-to", default="auto",
                   help="comma list of ints or 'auto' (the default); one shrink variant per value")
    p.add_argument("--no-torch-pruning", action="store_true")
    p.add_argument("--exact-only", action="store_true",
                   help="also time shrink with exact_only=True (transformers: heads and MLP only)")
    p.add_argument("--seconds", type=float, default=6.0, help="interleaved budget per setting")
    p.add_argument("--settings", default="1x1", help="BATCHxTHREADS list, e.g. 1x1,1x2,32x1")
    p.add_argument("--backends", default="ort-cpu")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--exporter", choices=("dynamo", "torchscript"), default="dynamo",
                   help="torchscript: faster exports for exploratory runs")
    p.add_argument("--clock", choices=("wall", "thread", "auto"), default="wall",
                   help="thread: CPU time of the timing thread (1-thread settings only); "
                   "auto: thread for 1-thread settings, wall otherwise")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--stem", default="latency")
    p.add_argument("--table-from", type=Path, default=None,
                   help="print markdown tables from a results JSON instead of measuring")
    p.add_argument("-q", "--quiet", action="store_true",
                   help="no per-model progress lines (shown on stderr only when it is a terminal)")
    args = p.parse_args(argv)
    if args.table_from is not None:
        rows = json.loads(args.table_from.read_text())["rows"]
        for ratio in sorted({r["ratio"] for r in rows}):
            for batch, threads in sorted({(r["batch"], r["threads"]) for r in rows
                                          if r["ratio"] == ratio}, key=lambda s: (s[1], s[0])):
                sys.stdout.write(markdown(rows, ratio, batch, threads) + "\n\n")
        return 0
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("onnx_ir", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    results = []
    round_to = [k if k == "auto" else int(k) for k in args.round_to.split(",")]
    cases = [(name, ratio) for name in args.models.split(",")
             for ratio in map(float, args.ratios.split(","))]
    # one line per case on a terminal: [3/8] mobilenet_v2@0.5 ... done in 12.3 s
    with terminal_progress(sys.stderr, quiet=args.quiet, prefix="", max_depth=1):
        for i, (name, ratio) in enumerate(cases, 1):
            with step(i, len(cases), f"{name}@{ratio}"):
                case = build_case(name, ratio, round_to=round_to,
                                  with_torch_pruning=not args.no_torch_pruning, size=args.size,
                                  exact_only=args.exact_only)
                res = run_case(case, seconds=args.seconds,
                               settings=_parse_settings(args.settings),
                               backends=args.backends.split(","), clock=args.clock,
                               dynamo=args.exporter == "dynamo")
            log.info("\n%s", res.table())
            results.append(res)
            write_results(results, args.out, args.stem)  # keep partial results of long runs
    paths = write_results(results, args.out, args.stem)
    for threads, batch in sorted({(t, b) for b, t in _parse_settings(args.settings)}):
        sys.stdout.write(summary(results, threads, batch) + "\n\n")
    sys.stdout.write(f"wrote {', '.join(str(v) for v in paths.values())}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
