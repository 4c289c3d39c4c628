"""How much can any channel allocation gain over a uniform ratio at equal latency? (issue 13)

On the digits CNN every plan on the 16-channel lattice that ``round_to="auto"`` allows is
built (L2 channel choice inside each group, as both uniform and ``target="latency"`` choose),
exported with ``shrink.export_onnx`` and timed against the dense model: onnxruntime CPU, one
intra-op thread, batch 64, dense and plan interleaved in rounds, best-of. Then, for each
uniform anchor, every plan whose measured latency is within ``--band`` of the uniform plan's
gets the same 5-epoch fine-tune as the uniform plan, and so does the plan
``target="latency"`` (``valuation="loss"``) picks for that latency. The table shows where
uniform and shrink's plan fall among all equal-latency plans, and what the best of them
reaches (chosen with hindsight, on the test set: an upper bound for any allocation method)::

    python benchmarks/latency_headroom.py --seeds 0 1 2 3

Results: ``benchmarks/results/latency_headroom.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import itertools
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shrink  # noqa: E402
from benchmarks.latency_eval import (  # noqa: E402
    RESULTS,
    digits_data,
    load_digits_example,
    widths,
)
from shrink.criteria.batches import Batch  # noqa: E402
from shrink.latency.value import recalibrate_bn  # noqa: E402

log = logging.getLogger("latency_headroom")
GROUPS = {"0:out": 32, "3:out": 64, "7:out": 128, "12:out": 128}   # the digits CNN's groups
ANCHORS = {"0.3": (32, 48, 96, 96), "0.45": (32, 48, 80, 80), "0.55": (16, 32, 64, 64),
           "0.7": (16, 32, 48, 48)}   # the uniform ratios' widths (round_to="auto")


class Clock:
    """Kept latency of an ONNX file against the dense model's: one intra-op thread,
    ``rounds`` interleaved rounds of ``runs`` runs each, best-of."""

    def __init__(self, dense: Path, x: torch.Tensor, rounds: int = 3, runs: int = 20) -> None:
        self.feed, self.rounds, self.runs = x.numpy(), rounds, runs
        self.dense = self._session(dense)
        for _ in range(20):
            self._best(self.dense)

    @staticmethod
    def _session(path: Path) -> Any:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads = opts.inter_op_num_threads = 1
        return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])

    def _best(self, sess: Any) -> float:
        name, best = sess.get_inputs()[0].name, float("inf")
        for _ in range(self.runs):
            t0 = time.perf_counter()
            sess.run(None, {name: self.feed})
            best = min(best, time.perf_counter() - t0)
        return best

    def kept(self, path: Path) -> float:
        sess = self._session(path)
        d = p = float("inf")
        for _ in range(self.rounds):
            d, p = min(d, self._best(self.dense)), min(p, self._best(sess))
        return p / d


def one_seed(seed: int, args: argparse.Namespace) -> dict[str, Any]:
    digits = load_digits_example()
    train, test = digits_data(digits, seed, "hard", 0.2, 1)
    torch.manual_seed(seed)
    dense = digits.train(digits.make_model(), train, 15, lr=2e-3, seed=seed)
    x = (test.tensors[0][:64],)
    loader = DataLoader(train, batch_size=64, shuffle=False)
    batches = [Batch((a,), {}, b) for a, b in itertools.islice(loader, 8)]
    tmp = Path(tempfile.mkdtemp(prefix="headroom-"))
    shrink.export_onnx(dense, x, tmp / "dense.onnx", dynamo=False)
    clock = Clock(tmp / "dense.onnx", x[0])

    def build(w: tuple[int, ...]) -> nn.Module:
        over = {g: 1 - k / size for (g, size), k in zip(GROUPS.items(), w, strict=True)}
        return shrink.prune(dense, x, shrink.PruneConfig(0.0, overrides=over, round_to=1,
                                                         verify=False)).model

    def joint_loss(m: nn.Module) -> float:   # EagleEye: BN re-estimated, then the loss
        m = copy.deepcopy(m)
        recalibrate_bn(m, batches)
        with torch.no_grad():
            return float(np.mean([nn.functional.cross_entropy(m.eval()(*b.args), b.target)
                                  .item() for b in batches]))

    rows: dict[tuple[int, ...], dict[str, Any]] = {}
    t0 = time.perf_counter()
    for w in itertools.product(*(range(16, s + 1, 16) for s in GROUPS.values())):
        m = build(w)
        shrink.export_onnx(m, x, tmp / "p.onnx", dynamo=False)
        rows[w] = {"w": list(w), "kept": clock.kept(tmp / "p.onnx"), "loss": joint_loss(m),
                   "acc0": digits.accuracy(m, test)}
    log.info("seed %d: %d plans timed in %.0f s", seed, len(rows), time.perf_counter() - t0)

    def tuned(w: tuple[int, ...]) -> float:
        if "acc5" not in rows[w]:
            rows[w]["acc5"] = digits.accuracy(digits.train(build(w), train, 5, lr=5e-4,
                                                           seed=seed + 1), test)
        return float(rows[w]["acc5"])

    anchors = {}
    for name, uni in ANCHORS.items():
        goal = rows[uni]["kept"]
        band = [w for w, r in rows.items() if abs(r["kept"] / goal - 1) <= args.band]
        res = shrink.prune(dense, x, shrink.PruneConfig(
            1 - goal, target="latency", valuation="loss", data=loader, max_batches=8,
            loss_fn=nn.functional.cross_entropy))
        ours = tuple(int(v) for v in widths(res.model).split("-")[:len(GROUPS)])
        accs = {w: tuned(w) for w in band}
        best = max(band, key=lambda w: accs[w])
        least = min(band, key=lambda w: rows[w]["loss"])
        anchors[name] = {
            "uniform": list(uni), "kept": goal, "band": [list(w) for w in band],
            "shrink": list(ours), "shrink_kept": rows[ours]["kept"], "acc_shrink": tuned(ours),
            "acc_uniform": tuned(uni), "acc_median": float(np.median(list(accs.values()))),
            "acc_best": accs[best], "best": list(best), "acc_least_loss": accs[least],
            "least_loss": list(least),
            "uniform_rank": sum(a > accs[uni] for a in accs.values()) + 1,
        }
        log.info("seed %d anchor %s: %s", seed, name, json.dumps(anchors[name]))
    return {"seed": seed, "acc_dense": digits.accuracy(dense, test), "anchors": anchors,
            "plans": list(rows.values())}


def table(doc: dict[str, Any]) -> str:
    lines = [
        f"Command: `{doc['command']}`", "",
        "Digits CNN (hard data), every plan of the 16-channel lattice timed (onnxruntime CPU, "
        "1 thread, batch 64, interleaved best-of). Per uniform anchor: the plans within "
        f"{doc['band']:.0%} of uniform's measured latency, all fine-tuned 5 epochs the same "
        "way. 'best' is chosen with hindsight on the test set: no allocation method can "
        "beat it.", "",
        "| seed | anchor (uniform widths) | latency kept | plans in band | uniform | "
        "uniform's rank | shrink target=latency (widths) | median plan | least joint loss "
        "| best (hindsight) | best - uniform |",
        "|---|---|---|---|---|---|---|---|---|---|---|"]
    gaps, ours = [], []
    for row in doc["rows"]:
        for name, a in row["anchors"].items():
            gaps.append(a["acc_best"] - a["acc_uniform"])
            ours.append(a["acc_shrink"] - a["acc_uniform"])
            lines.append(
                f"| {row['seed']} | {name} ({'-'.join(map(str, a['uniform']))}) | "
                f"{a['kept']:.3f} | {len(a['band'])} | {a['acc_uniform']:.1f} | "
                f"{a['uniform_rank']} | {a['acc_shrink']:.1f} "
                f"({'-'.join(map(str, a['shrink']))}) | {a['acc_median']:.1f} | "
                f"{a['acc_least_loss']:.1f} | {a['acc_best']:.1f} | "
                f"{a['acc_best'] - a['acc_uniform']:+.1f} |")
    lines += ["", f"best - uniform: mean {np.mean(gaps):+.2f}, max {max(gaps):+.1f} points "
              f"over {len(gaps)} comparisons; shrink - uniform: mean {np.mean(ours):+.2f}.", ""]
    return "\n".join(lines + rules(doc)) + "\n"


def _alone(plans: dict[tuple[int, ...], dict[str, Any]], w: tuple[int, ...],
           base: tuple[int, ...]) -> float:
    """The summed loss increases of cutting each group of ``base`` alone to ``w``'s count."""
    return sum(plans[(*base[:i], w[i], *base[i + 1:])]["loss"] - plans[base]["loss"]
               for i in range(len(w)))


def rules(doc: dict[str, Any]) -> list[str]:
    """Selection rules applied to the measured band of each anchor (no latency model in the
    way): the plan each rule prefers, its accuracy after the fine-tune minus uniform's."""
    dense = tuple(GROUPS.values())
    found: dict[str, list[float]] = {}
    for row in doc["rows"]:
        plans = {tuple(p["w"]): p for p in row["plans"]}
        for a in row["anchors"].values():
            uni, band = tuple(a["uniform"]), [tuple(w) for w in a["band"]]

            picks = {
                "each group's loss cut alone, summed (valuation='loss')":
                    min(band, key=lambda w, p=plans: _alone(p, w, dense)),   # type: ignore[misc]
                "the same, each group cut alone from the uniform plan":
                    min(band, key=lambda w, p=plans, u=uni: _alone(p, w, u)),   # type: ignore[misc]
                "joint loss, BN re-estimated (EagleEye)": min(band, key=lambda w: plans[w]["loss"]),
                "accuracy before the fine-tune": max(band, key=lambda w: plans[w]["acc0"]),
            }
            for name, w in picks.items():
                found.setdefault(name, []).append(plans[w]["acc5"] - plans[uni]["acc5"])
    out = ["Rules applied to the measured band (every plan in it timed and fine-tuned): accuracy "
           "after the fine-tune of the plan each rule prefers, minus uniform's.", "",
           "| rule | mean | wins/ties/losses |", "|---|---|---|"]
    for name, v in found.items():
        w, t = sum(x > 0.01 for x in v), sum(abs(x) <= 0.01 for x in v)
        out.append(f"| {name} | {np.mean(v):+.2f} | {w}/{t}/{len(v) - w - t} |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    p.add_argument("--band", type=float, default=0.03)
    p.add_argument("--out", type=Path, default=RESULTS / "latency_headroom.json")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(1)
    if not os.environ.get("SHRINK_CACHE_DIR"):   # a cold latency cache, shared by the seeds
        os.environ["SHRINK_CACHE_DIR"] = tempfile.mkdtemp(prefix="shrink-cache-")
    doc = json.loads(args.out.read_text()) if args.out.exists() else {"rows": []}
    doc.update(band=args.band, command=" ".join(["python", "benchmarks/latency_headroom.py",
                                                  *sys.argv[1:]]))
    done = {r["seed"] for r in doc["rows"]}
    for seed in args.seeds:
        if seed not in done:
            doc["rows"].append(one_seed(seed, args))
            RESULTS.mkdir(exist_ok=True)
            args.out.write_text(json.dumps(doc, indent=1))
    doc["rows"].sort(key=lambda r: r["seed"])
    args.out.write_text(json.dumps(doc, indent=1))
    args.out.with_suffix(".md").write_text(table(doc))
    sys.stdout.write(table(doc))


if __name__ == "__main__":
    main()
