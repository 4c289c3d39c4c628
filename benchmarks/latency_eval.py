"""Evaluate ``target="latency"`` (issue 13, item 4): suite table, equal latency, digits, plot.

    python benchmarks/latency_eval.py models --size 128            # parts 1 and 2, 8 models
    python benchmarks/latency_eval.py digits --seeds 0 1 2 3 4      # part 3 (--data hard)
    python benchmarks/latency_eval.py plot --models resnet18        # part 4: the PNG in docs/
    python benchmarks/latency_eval.py tables                        # markdown from the JSON files

Every model runs in its own subprocess with a timeout. Timing is the suite's protocol:
onnxruntime CPU, one intra-op thread, BN-calibrated random weights (before pruning and again
after, for every variant), ``shrink.export_onnx`` files (TorchScript exporter), dense and
variants in interleaved rounds, best-of on the thread clock (``shrink.compare(clock="auto")``).

"Importance kept" is the same for every variant: shrink's groups and L2 scores on the dense
model (``shrink.score(groups, dense, LnNorm(2))``); a variant keeps, per prunable group, the
scores of the channels it keeps. ``imp`` sums raw scores, ``imp_norm`` divides each group's
scores by the group's mean first (what the latency allocation and ``Global`` rank by). For
torch-pruning the kept channels are read from its pruned weights: every slice of a pruned
conv/linear weight along a group's output axis starts with a value found in exactly one slice
of the dense weight (random floats), which names the dense channel it came from.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import TensorDataset

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shrink  # noqa: E402
from shrink.criteria import LnNorm  # noqa: E402
from shrink.plan import Side  # noqa: E402
from shrink.report import count_macs, count_params  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("latency_eval")


# ---------------------------------------------------------------- importance accounting

def dense_scores(dense: nn.Module, x: tuple[torch.Tensor, ...]) -> tuple[Any, dict]:
    groups = shrink.prune(dense, x, shrink.PruneConfig(0.5)).analysis.groups
    groups = tuple(g for g in groups if g.prunable)
    return groups, shrink.score(groups, dense, LnNorm(2.0))


def kept_importance(groups: Any, scores: dict, keep: dict[str, set[int]]) -> dict[str, float]:
    """Fraction of summed raw / group-mean-normalised scores kept (groups absent: all kept)."""
    tot = kept = tot_n = kept_n = 0.0
    for g in groups:
        s = scores.get(g.id)
        if s is None:
            continue
        s = s.double()
        k = keep.get(g.id)
        sk = s if k is None else s[sorted(k)]
        mean = float(s.mean()) or 1.0
        tot += float(s.sum())
        kept += float(sk.sum())
        tot_n += float(s.sum()) / mean
        kept_n += float(sk.sum()) / mean
    return {"imp": kept / tot, "imp_norm": kept_n / tot_n}


def plan_keep(plan: Any) -> dict[str, set[int]]:
    return {d.group: set(d.keep) for d in plan.decisions}


def tp_keep(groups: Any, dense: nn.Module, pruned: nn.Module) -> tuple[dict[str, set[int]], int]:
    """Kept channels per group of a torch-pruning model; returns (keep, groups not mapped)."""
    dmods, pmods = dict(dense.named_modules()), dict(pruned.named_modules())
    keep: dict[str, set[int]] = {}
    missed = 0
    for g in groups:
        got = None
        for m in g.members:
            dm, pm = dmods.get(m.module), pmods.get(m.module)
            w = getattr(dm, "weight", None)
            if m.side is not Side.OUT or w is None or w.ndim < 2 or pm is None:
                continue
            pos = _slices_kept(w.detach(), pm.weight.detach())
            if pos is None:
                continue
            chan = dict(zip(m.index_map.index, m.index_map.channel, strict=False))
            got = {chan[p] for p in pos if p in chan}
            break
        if got is None:
            missed += 1
        else:
            keep[g.id] = got
    return keep, missed


def _slices_kept(dense_w: torch.Tensor, pruned_w: torch.Tensor) -> list[int] | None:
    """Dense dim-0 positions of the pruned weight's dim-0 slices, by a unique first value."""
    if pruned_w.shape[0] == dense_w.shape[0]:
        return list(range(dense_w.shape[0]))
    where: dict[float, int] = {}
    dup = set()
    for i, row in enumerate(dense_w.reshape(dense_w.shape[0], -1).tolist()):
        for v in row:
            if v in where and where[v] != i:
                dup.add(v)
            where[v] = i
    out = []
    for row in pruned_w.reshape(pruned_w.shape[0], -1):
        hits = [where[v] for v in row[:8].tolist() if v in where and v not in dup]
        if not hits:
            return None
        out.append(hits[0])
    return out


# ---------------------------------------------------------------- timing

class Timer:
    """Dense ONNX file exported once; each variant exported and timed against it.

    Timed at the batch of ``x`` (``shrink.compare`` re-batches to ``batches``, whose default
    is 1).
    """

    def __init__(self, dense: nn.Module, x: tuple[torch.Tensor, ...], workdir: Path,
                 seconds: float) -> None:
        self.x, self.workdir, self.seconds, self.n = x, workdir, seconds, 0
        self.batch = int(x[0].shape[0])
        self.dense_path = self.export(dense)

    def export(self, model: nn.Module) -> Path:
        self.n += 1
        path = self.workdir / f"m{self.n}.onnx"
        try:  # TorchScript: ~5x faster; dynamo where it cannot (vgg's 7x7 pool of a 4x4 map)
            shrink.export_onnx(model, self.x, path, dynamo=False)
        except shrink.ExportError:
            shrink.export_onnx(model, self.x, path, dynamo=True)
        return path

    def kept(self, model: nn.Module | Path, others: dict[str, Any] | None = None) -> dict:
        path = model if isinstance(model, Path) else self.export(model)
        oth = {k: (v if isinstance(v, Path) else self.export(v)) for k, v in (others or {}).items()}
        res = shrink.compare(self.dense_path, path, self.x, others=oth or None,
                             batches=(self.batch,),
                             seconds=self.seconds, clock="auto", dynamo=False,
                             flush_denormals=True, workdir=self.workdir)
        out = {"pruned": 1 / res.row("pruned", batch=self.batch).speedup}
        for k in oth:
            out[k] = 1 / res.row(k, batch=self.batch).speedup
        out["dense_ms"] = res.row("dense", batch=self.batch).min_ms
        return out


def search(make, goal: float, timer: Timer, tol: float = 0.02, tries: int = 5) -> dict:
    """Ratio ``r`` of ``make(r)`` whose measured kept latency is within ``tol`` of ``goal``.

    Starts from ``r = 1 - sqrt(goal)`` (a uniform ratio keeps about ``(1-r)^2`` of the MACs)
    and updates ``1 - r`` by ``sqrt(goal / kept)`` (the same power law, recalibrated), with
    bisection once two measured ratios bracket the goal.
    """
    r = 1 - goal ** 0.5
    lo, hi = 0.0, 0.95       # kept(lo) > goal > kept(hi)
    seen: list[tuple[float, float, Any]] = []
    for _ in range(tries):
        model = make(r)
        kept = timer.kept(model)["pruned"]
        seen.append((r, kept, model))
        log.info("  r=%.4f kept=%.4f (goal %.4f)", r, kept, goal)
        if abs(kept / goal - 1) <= tol:
            break
        if kept > goal:
            lo = max(lo, r)
        else:
            hi = min(hi, r)
        nxt = 1 - (1 - r) * (goal / kept) ** 0.5
        r = nxt if lo < nxt < hi else (lo + hi) / 2
    r, kept, model = min(seen, key=lambda t: abs(t[1] / goal - 1))
    out = {"ratio": r, "kept_search": kept, "tries": len(seen), "model": model,
           "tried": [t[:2] for t in seen]}
    if abs(kept / goal - 1) > tol:  # the nearest measured plans on either side of the goal
        above = [t for t in seen if t[1] >= goal]
        below = [t for t in seen if t[1] < goal]
        if above and below:
            out["bracket"] = (min(above, key=lambda t: t[1]), max(below, key=lambda t: t[1]))
    return out


# ---------------------------------------------------------------- part 1 + 2: one model

def one_model(name: str, size: int, ratio: float, seconds: float) -> dict:
    sys.path.insert(0, str(ROOT))
    from benchmarks.suite import calibrated, recalibrate, torch_pruning_prune, torchvision_model

    x = (torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(1)),)
    dense = calibrated(torchvision_model(name), x)
    p0, m0 = count_params(dense), count_macs(dense, x)
    groups, scores = dense_scores(dense, x)
    row: dict[str, Any] = {"model": name, "size": size, "ratio": ratio}
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        t0 = time.perf_counter()
        try:
            res = shrink.prune(dense, x, shrink.PruneConfig(ratio, target="latency"))
        except Exception as e:  # recorded in the table: the point is to see every failure
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
            return row
        lat = res.report.latency
        row.update(plan_s=time.perf_counter() - t0, lat_s=lat.seconds,
                   corrections=lat.corrections, converged=lat.converged,
                   kept_report=lat.measured, predicted=lat.predicted,
                   shapes=lat.layer_shapes, history=lat.history)
        latm = recalibrate(res.model, x)
        timer = Timer(dense, x, workdir, seconds)
        lat_path = timer.export(latm)
        checks = [timer.kept(lat_path)["pruned"] for _ in range(2)]
        goal = sum(checks) / 2
        row.update(kept_checks=checks, kept=goal, dense_ms=timer.kept(lat_path)["dense_ms"],
                   within5=abs(goal / (1 - ratio) - 1) <= 0.05,
                   params_kept=count_params(latm) / p0, macs_kept=count_macs(latm, x) / m0,
                   **kept_importance(groups, scores, plan_keep(res.plan)))
        # part 2: uniform and torch-pruning searched to the same measured latency
        t1 = time.perf_counter()
        plans: dict[str, Any] = {}

        def uniform(r: float) -> nn.Module:
            u = shrink.prune(dense, x, shrink.PruneConfig(r))
            plans[f"{r:.6f}"] = u.plan
            return recalibrate(u.model, x)

        eq: dict[str, Any] = {}
        found = {"uniform": search(uniform, goal, timer),
                 "torch-pruning": search(lambda r: recalibrate(torch_pruning_prune(dense, x, r),
                                                               x), goal, timer)}
        final = timer.kept(lat_path, {k: v["model"] for k, v in found.items()})
        eq["latency"] = {"kept_final": final["pruned"]}
        for k, v in found.items():
            m = v.pop("model")
            if "bracket" in v:
                v["bracket"] = [t[:2] for t in v["bracket"]]
            v.update(kept_final=final[k], params_kept=count_params(m) / p0,
                     macs_kept=count_macs(m, x) / m0)
            if k == "uniform":
                v.update(kept_importance(groups, scores, plan_keep(plans[f"{v['ratio']:.6f}"])))
            else:
                keep, missed = tp_keep(groups, dense, torch_pruning_prune(dense, x, v["ratio"]))
                v.update(kept_importance(groups, scores, keep), unmapped_groups=missed)
            eq[k] = v
        row["equal"] = eq
        row["equal_s"] = time.perf_counter() - t1
    return row


def run_models(args: argparse.Namespace) -> None:
    out = args.out or RESULTS / f"latency_eval_{args.size}.json"
    rows = json.loads(out.read_text()) if out.exists() and args.resume else []
    done = {r["model"] for r in rows}
    cache = Path(tempfile.mkdtemp(prefix="shrink-cache-"))   # a cold latency cache
    env = {**os.environ, "SHRINK_CACHE_DIR": str(cache), "OMP_NUM_THREADS": "1"}
    for name in args.models.split(","):
        if name in done:
            continue
        t0 = time.perf_counter()
        cmd = [sys.executable, __file__, "_one", name, "--size", str(args.size),
               "--ratio", str(args.ratio), "--seconds", str(args.seconds)]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout,
                               env=env)
            lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
            row = json.loads(lines[-1]) if lines else {
                "model": name, "error": (p.stderr.strip().splitlines() or ["?"])[-1][:200]}
        except subprocess.TimeoutExpired:
            row = {"model": name, "error": f"timeout after {args.timeout} s"}
        row["wall_s"] = time.perf_counter() - t0
        log.info("%s: %s", name, json.dumps(row)[:400])
        rows.append(row)
        RESULTS.mkdir(exist_ok=True)
        out.write_text(json.dumps(rows, indent=1))


# ---------------------------------------------------------------- part 3: digits

def load_digits_example() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location("digits", ROOT / "examples" /
                                                  "02_digits_workflow.py")
    assert spec is not None
    assert spec.loader is not None
    digits = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(digits)
    return digits


def digits_data(digits: Any, seed: int, data: str, noise: float,
                shift: int) -> tuple[TensorDataset, TensorDataset]:
    """The example's split; ``data="hard"`` moves each image by up to ``shift`` pixels (zeros
    fill) and adds Gaussian noise of std ``noise`` (images in [0, 1]), drawn once per seed."""
    train_set, test_set = digits.load_data(seed)
    if data == "plain":
        return train_set, test_set
    gen = torch.Generator().manual_seed(10_000 + seed)

    def harden(ds: TensorDataset) -> TensorDataset:
        x, y = ds.tensors
        n, _, h, w = x.shape
        pad = nn.functional.pad(x, (shift,) * 4)
        dy = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        dx = torch.randint(0, 2 * shift + 1, (n,), generator=gen)
        out = torch.stack([pad[i, :, dy[i]:dy[i] + h, dx[i]:dx[i] + w] for i in range(n)])
        return TensorDataset(out + noise * torch.randn(out.shape, generator=gen), y)

    return harden(train_set), harden(test_set)


def mobile_digits() -> nn.Module:
    """A MobileNetV2-style CNN for the 8x8 digits (``--arch mobile``): inverted residuals
    (1x1 expansion, depthwise 3x3, squeeze-excitation in the middle stage, 1x1 projection),
    residual adds, a 1x1 head and global pooling: the layer kinds whose latency is not
    proportional to their MACs, where the plain CNN's layers all cost about the same per MAC.
    151k parameters; the stages run at 8x8, 4x4 and 2x2."""
    from torchvision.ops import SqueezeExcitation

    class Inverted(nn.Module):
        def __init__(self, cin: int, cout: int, expand: int, stride: int, se: bool) -> None:
            super().__init__()
            hid = cin * expand
            layers: list[nn.Module] = []
            if expand != 1:
                layers += [nn.Conv2d(cin, hid, 1, bias=False), nn.BatchNorm2d(hid), nn.ReLU6()]
            layers += [nn.Conv2d(hid, hid, 3, stride, 1, groups=hid, bias=False),
                       nn.BatchNorm2d(hid), nn.ReLU6()]
            if se:
                layers.append(SqueezeExcitation(hid, hid // 4))
            layers += [nn.Conv2d(hid, cout, 1, bias=False), nn.BatchNorm2d(cout)]
            self.block = nn.Sequential(*layers)
            self.residual = stride == 1 and cin == cout

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.block(x)
            return x + y if self.residual else y

    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU6(),
        Inverted(16, 16, 1, 1, False), Inverted(16, 24, 4, 1, False),
        Inverted(24, 24, 4, 1, False), Inverted(24, 40, 4, 2, True),
        Inverted(40, 40, 4, 1, True), Inverted(40, 80, 4, 2, False),
        Inverted(80, 80, 4, 1, False),
        nn.Conv2d(80, 256, 1, bias=False), nn.BatchNorm2d(256), nn.ReLU6(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(256, 10),
    )


def widths(model: nn.Module) -> str:
    """Output widths of the convs and linears, e.g. ``16-64-128-128-10``."""
    return "-".join(str(m.out_channels if isinstance(m, nn.Conv2d) else m.out_features)
                    for m in model.modules() if isinstance(m, nn.Conv2d | nn.Linear))


def digits_variants(dense: nn.Module, x: tuple[torch.Tensor, ...], ratio: float,
                    timer: Timer, lat_kw: dict[str, Any],
                    **kw: Any) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """target=latency at ``ratio``, and uniform ratios searched to its measured latency
    (``kw``: more ``PruneConfig`` options, the same for both; ``lat_kw``: for the latency
    target only, e.g. its valuation)."""
    t0 = time.perf_counter()
    res = shrink.prune(dense, x, shrink.PruneConfig(ratio, target="latency", **kw, **lat_kw))
    lat = res.report.latency
    info: dict[str, Any] = {"plan_s": time.perf_counter() - t0, "report_kept": lat.measured,
                            "converged": lat.converged, "corrections": lat.corrections,
                            "history": lat.history}
    goal = timer.kept(res.model)["pruned"]
    found = search(lambda r: shrink.prune(dense, x, shrink.PruneConfig(r, **kw)).model, goal,
                   timer)
    info.update(lat_kept_search=goal, uni_ratio=found["ratio"], uni_kept_search=found[
        "kept_search"], uni_tried=found["tried"])
    variants = {"latency": res.model, "uniform": found["model"]}
    if "bracket" in found:  # uniform cannot land within 2%: keep both neighbours
        (ra, _, ma), (rb, _, mb) = found["bracket"]
        variants.update(uniform_slower=ma, uniform_faster=mb)
        info.update(uni_slower_ratio=ra, uni_faster_ratio=rb)
    return variants, info


def digits_anchor(dense: nn.Module, x: tuple[torch.Tensor, ...], ratio: float,
                  timer: Timer, lat_kw: dict[str, Any],
                  **kw: Any) -> tuple[dict[str, nn.Module], dict[str, Any]]:
    """A uniform ``ratio``, and target=latency asked for the latency that plan measured."""
    uni = shrink.prune(dense, x, shrink.PruneConfig(ratio, **kw)).model
    goal = timer.kept(uni)["pruned"]
    t0 = time.perf_counter()
    res = shrink.prune(dense, x, shrink.PruneConfig(1 - goal, target="latency", **kw,
                                                    **lat_kw))
    lat = res.report.latency
    return {"latency": res.model, "uniform": uni}, {
        "uni_ratio": ratio, "uni_kept_search": goal, "lat_ratio": 1 - goal,
        "plan_s": time.perf_counter() - t0, "report_kept": lat.measured,
        "converged": lat.converged, "corrections": lat.corrections, "history": lat.history}


def digits_evaluate(digits: Any, variants: dict[str, nn.Module], data: tuple[Any, Any],
                    seed: int, args: argparse.Namespace, timer: Timer,
                    dense: nn.Module) -> dict[str, Any]:
    """Accuracy pruned and after each fine-tune, and latency kept (2 interleaved runs)."""
    train_set, test_set = data
    x1 = (timer.x[0][:1],)
    p0, m0 = count_params(dense), count_macs(dense, x1)
    done: dict[int, dict[str, float]] = {}   # a neighbour can also be the nearest
    for m in variants.values():
        if id(m) not in done:
            acc = {"0": digits.accuracy(m, test_set)}
            for ep in args.finetune:   # the same fine-tune for every variant
                tuned = digits.train(copy.deepcopy(m), train_set, ep, lr=5e-4, seed=seed + 1)
                acc[str(ep)] = digits.accuracy(tuned, test_set)
            done[id(m)] = acc
    paths = {k: timer.export(m) for k, m in variants.items()}
    runs = [timer.kept(paths["latency"], {k: v for k, v in paths.items() if k != "latency"})
            for _ in range(2)]
    out: dict[str, Any] = {"variants": {}, "dense_ms": [r["dense_ms"] for r in runs]}
    for k, m in variants.items():
        kept = [r["pruned" if k == "latency" else k] for r in runs]
        out["variants"][k] = {"acc": done[id(m)], "kept_final": kept,
                              "kept": sum(kept) / len(kept), "widths": widths(m),
                              "params": count_params(m) / p0, "macs": count_macs(m, x1) / m0}
    return out


def digits_one_seed(digits: Any, seed: int, args: argparse.Namespace) -> dict[str, Any]:
    torch.manual_seed(seed)
    data = digits_data(digits, seed, args.data, args.noise, args.shift)
    make = mobile_digits if args.arch == "mobile" else digits.make_model
    dense = digits.train(make(), data[0], args.epochs, lr=args.lr, seed=seed)
    x = (data[1].tensors[0][:args.batch],)
    row: dict[str, Any] = {"seed": seed, "acc_dense": digits.accuracy(dense, data[1]),
                           "importance": args.importance, "valuation": args.valuation,
                           "targets": {}, "anchors": {}}
    with tempfile.TemporaryDirectory() as tmp:
        timer = Timer(dense, x, Path(tmp), args.seconds)
        for kind, ratio in [("targets", r) for r in args.targets] + [("anchors", r) for r in
                                                                      args.anchors]:
            t0 = time.perf_counter()
            kw: dict[str, Any] = {"ignore": tuple(args.ignore)} if args.ignore else {}
            if args.importance != "l2":  # the same criterion for every variant
                kw["importance"] = args.importance
            if args.importance in ("taylor", "activation"):
                from torch.utils.data import DataLoader

                kw.update(data=DataLoader(data[0], batch_size=64, shuffle=False),
                          max_batches=8)
                if args.importance == "taylor":
                    kw["loss_fn"] = nn.functional.cross_entropy
            lat_kw: dict[str, Any] = {"valuation": "scores"}   # spelled out: data= with
            # loss_fn= (importance="taylor") would make "loss" the default
            if args.valuation == "loss":   # the latency target's allocation only
                from torch.utils.data import DataLoader

                lat_kw = {"valuation": "loss", "max_batches": 8,
                          "data": DataLoader(data[0], batch_size=64, shuffle=False),
                          "loss_fn": nn.functional.cross_entropy}
                if "data" in kw:
                    lat_kw = {"valuation": "loss"}
            variants, info = (digits_variants if kind == "targets" else digits_anchor)(
                dense, x, ratio, timer, lat_kw, **kw)
            out = {**info, **digits_evaluate(digits, variants, data, seed, args, timer, dense),
                   "wall_s": time.perf_counter() - t0}
            row[kind][str(ratio)] = out
            log.info("seed %d %s %s: %s", seed, kind, ratio, json.dumps(
                {k: (v["widths"], round(v["kept"], 3), v["acc"]) for k, v in
                 out["variants"].items()}))
    return row


def digits_path(args: argparse.Namespace) -> Path:
    arch = "" if args.arch == "cnn" else f"_{args.arch}"
    return args.out or RESULTS / f"latency_eval_digits{arch}_{args.data}_b{args.batch}.json"


def run_digits(args: argparse.Namespace) -> None:
    """Part 3: accuracy at equal measured latency, after the same fine-tune (digits CNN)."""
    if not os.environ.get("SHRINK_CACHE_DIR"):   # a cold latency cache, shared by the seeds
        os.environ["SHRINK_CACHE_DIR"] = tempfile.mkdtemp(prefix="shrink-cache-")
    digits = load_digits_example()
    out = digits_path(args)
    doc = json.loads(out.read_text()) if out.exists() and args.resume else {"rows": []}
    doc["config"] = {k: getattr(args, k) for k in ("arch", "data", "noise", "shift", "batch",
                                                   "epochs", "lr",
                                                   "finetune", "targets", "anchors",
                                                   "seconds", "ignore", "importance",
                                                   "valuation")}
    doc["config"]["command"] = " ".join(["python", "benchmarks/latency_eval.py", *sys.argv[1:]])
    done = {r["seed"] for r in doc["rows"]}
    t0 = time.perf_counter()
    for seed in args.seeds:
        if seed in done:
            continue
        doc["rows"].append(digits_one_seed(digits, seed, args))
        doc["wall_s"] = doc.get("wall_s", 0.0) + time.perf_counter() - t0
        t0 = time.perf_counter()
        RESULTS.mkdir(exist_ok=True)
        out.write_text(json.dumps(doc, indent=1))
    sys.stdout.write(digits_tables(doc))


def _ms(v: list[float]) -> str:
    import statistics

    if len(v) < 2:
        return f"{v[0]:.1f}" if v else "-"
    return f"{statistics.mean(v):.1f} ± {statistics.stdev(v):.1f}"


def _conservative(variants: dict[str, Any]) -> str:
    """The uniform variant at least as slow as the latency-aware one, where one was timed."""
    return "uniform_slower" if "uniform_slower" in variants else "uniform"


def _delta_cells(al: list[float], au: list[float]) -> str:
    d = [a - b for a, b in zip(al, au, strict=True)]
    wtl = (sum(v > 0 for v in d), sum(v == 0 for v in d), sum(v < 0 for v in d))
    return f"{_ms(al)} | {_ms(au)} | {_ms(d)} | {wtl[0]}/{wtl[1]}/{wtl[2]}"


def digits_tables(doc: dict[str, Any]) -> str:
    """Markdown: summaries per (setting, fine-tune epochs), then every configuration per seed."""
    rows, cfg = doc["rows"], doc["config"]
    eps = ["0", *map(str, cfg["finetune"])]
    epname = {e: ("none" if e == "0" else e) for e in eps}
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    lines = [f"data: {cfg['data']}" + (f" (noise {cfg['noise']}, shift {cfg['shift']})"
                                       if cfg["data"] != "plain" else "") +
             f", batch {cfg['batch']}, seeds {[r['seed'] for r in rows]}" +
             (f", ignore {cfg['ignore']}" if cfg.get("ignore") else "") +
             f", dense acc {_ms([r['acc_dense'] for r in rows])}, dense "
             f"{mean([r['targets'][str(cfg['targets'][0])]['dense_ms'][0] for r in rows]):.3f}"
             " ms", "",
             "Goals: target=latency at the ratio; uniform searched to its measured latency "
             "(nearest; the other columns: the slower neighbour where it could not land within "
             "2%, else the nearest).", "",
             "| latency removed | fine-tune epochs | kept: latency / uniform nearest / slower "
             "| acc target=latency | acc uniform nearest | Δ (lat - uni) | wins/ties/losses "
             "| acc target=latency | acc uniform, slower | Δ | w/t/l |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for ratio in cfg["targets"]:
        tr = [r["targets"][str(ratio)]["variants"] for r in rows]
        kl = mean([t["latency"]["kept"] for t in tr])
        ku = mean([t["uniform"]["kept"] for t in tr])
        ks = mean([t[_conservative(t)]["kept"] for t in tr])
        for ep in eps:
            al = [t["latency"]["acc"][ep] for t in tr]
            au = [t["uniform"]["acc"][ep] for t in tr]
            ac = [t[_conservative(t)]["acc"][ep] for t in tr]
            lines.append(f"| {ratio} | {epname[ep]} | {kl:.3f} / {ku:.3f} / {ks:.3f} | "
                         f"{_delta_cells(al, au)} | {_delta_cells(al, ac)} |")
    if cfg.get("anchors") and rows and rows[0].get("anchors"):
        lines += ["", "Anchors: a uniform ratio; target=latency asked for the latency that "
                  "uniform plan measured.", "",
                  "| uniform ratio | uniform widths | fine-tune epochs | kept: latency / "
                  "uniform | acc target=latency | acc uniform | Δ (lat - uni) | "
                  "wins/ties/losses |", "|---|---|---|---|---|---|---|---|"]
        for ratio in cfg["anchors"]:
            tr = [r["anchors"][str(ratio)]["variants"] for r in rows]
            kl = mean([t["latency"]["kept"] for t in tr])
            ku = mean([t["uniform"]["kept"] for t in tr])
            wu = ", ".join(sorted({t["uniform"]["widths"] for t in tr}))
            for ep in eps:
                al = [t["latency"]["acc"][ep] for t in tr]
                au = [t["uniform"]["acc"][ep] for t in tr]
                lines.append(f"| {ratio} | {wu} | {epname[ep]} | {kl:.3f} / {ku:.3f} | "
                             f"{_delta_cells(al, au)} |")
    lines += ["", "| seed | setting | variant | ratio | widths | latency kept (2 runs) | "
              "params | MACs | acc: " + " / ".join("pruned" if e == "0" else f"ft {e}"
                                                   for e in eps) + " |",
              "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        for kind in ("targets", "anchors"):
            for ratio in cfg.get(kind) or []:
                t = r[kind][str(ratio)]
                for k, v in t["variants"].items():
                    rr = {"latency": t.get("lat_ratio", ratio), "uniform": t["uni_ratio"],
                          "uniform_slower": t.get("uni_slower_ratio"),
                          "uniform_faster": t.get("uni_faster_ratio")}[k]
                    kf = ", ".join(f"{q:.3f}" for q in v["kept_final"])
                    lines.append(
                        f"| {r['seed']} | {kind[:-1]} {ratio} | {k} | {rr:.3f} | {v['widths']} "
                        f"| {v['kept']:.3f} ({kf}) | {v['params']:.3f} | {v['macs']:.3f} | " +
                        " / ".join(f"{v['acc'][e]:.1f}" for e in eps) + " |")
    lines += ["", "Uniform ratios tried for each goal (ratio: latency kept in the search):"]
    for r in rows:
        for ratio in cfg["targets"]:
            t = r["targets"][str(ratio)]
            tried = ", ".join(f"{a:.3f}: {b:.3f}" for a, b in t["uni_tried"])
            lines.append(f"* seed {r['seed']}, {ratio} removed (target=latency measured "
                         f"{t['lat_kept_search']:.3f}, its report {t['report_kept']:.3f}, "
                         f"{t['corrections']} corrections): {tried}")
    return "\n".join(lines) + "\n"


def run_digits_tables(args: argparse.Namespace) -> None:
    sys.stdout.write(digits_tables(json.loads(digits_path(args).read_text())))


# ---------------------------------------------------------------- part 4: plot

def run_plot(args: argparse.Namespace) -> None:
    from benchmarks.suite import calibrated, recalibrate, torchvision_model

    data: dict[str, Any] = {}
    for name in args.models.split(","):
        x = (torch.randn(1, 3, args.size, args.size, generator=torch.Generator().manual_seed(1)),)
        dense = calibrated(torchvision_model(name), x)
        groups, scores = dense_scores(dense, x)
        p0 = count_params(dense)
        pts: dict[str, list[dict]] = {"latency": [], "uniform": []}
        with tempfile.TemporaryDirectory() as tmp:
            timer = Timer(dense, x, Path(tmp), args.seconds)
            for kind, ratios in (("latency", (0.3, 0.5, 0.65)),
                                 ("uniform", (0.15, 0.3, 0.45, 0.6))):
                for r in ratios:
                    cfg = shrink.PruneConfig(r, target="latency" if kind == "latency"
                                             else "channels")
                    res = shrink.prune(dense, x, cfg)
                    m = recalibrate(res.model, x)
                    kept = timer.kept(m)["pruned"]
                    pts[kind].append({"ratio": r, "kept": kept,
                                      "params": count_params(m) / p0,
                                      **kept_importance(groups, scores, plan_keep(res.plan))})
                    log.info("%s %s %.2f: %s", name, kind, r, pts[kind][-1])
        data[name] = pts
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "latency_tradeoff.json").write_text(json.dumps(data, indent=1))
    plot(data, ROOT / "docs" / "latency_tradeoff.png", args.size)


def plot(data: dict[str, Any], path: Path, size: int) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(data), 2, figsize=(9, 3.4 * len(data)), squeeze=False)
    for row, (name, pts) in zip(axes, data.items(), strict=False):
        for ax, key, label in ((row[0], "params", "params kept"),
                               (row[1], "imp_norm", "importance kept (normalised L2)")):
            for kind, style in (("uniform", "s--"), ("latency", "o-")):
                p = sorted(pts[kind], key=lambda d: d["kept"])
                ax.plot([d["kept"] for d in p], [d[key] for d in p], style,
                        label="target=latency" if kind == "latency" else "uniform ratio")
            ax.set_xlabel("measured latency kept (onnxruntime, 1 thread)")
            ax.set_ylabel(label)
            ax.set_title(f"{name}, {size}x{size}")
            ax.grid(alpha=0.3)
        row[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---------------------------------------------------------------- tables

def tables(args: argparse.Namespace) -> None:
    rows = json.loads((args.out or RESULTS / f"latency_eval_{args.size}.json").read_text())
    w = sys.stdout.write
    w("| model | dense ms | latency kept (2 checks) | within ±5% | MACs kept | params kept "
      "| importance kept | planning s | corrections | report's kept |\n|---|" + "---|" * 9 + "\n")
    for r in rows:
        if "error" in r and "kept" not in r:
            w(f"| {r['model']} | failed: {r['error']} |" + " |" * 8 + "\n")
            continue
        c = r["kept_checks"]
        w(f"| {r['model']} | {r['dense_ms']:.2f} | {r['kept']:.3f} ({c[0]:.3f}, {c[1]:.3f}) | "
          f"{'yes' if r['within5'] else 'no'} | {r['macs_kept']:.3f} | {r['params_kept']:.3f} | "
          f"{r['imp_norm']:.3f} | {r['plan_s']:.1f} | {r['corrections']} | "
          f"{r['kept_report']:.3f} |\n")
    w("\n| model | variant | ratio | latency kept (search / final run) | params kept | MACs kept "
      "| importance kept (raw L2) | importance kept (normalised) |\n|---|" + "---|" * 7 + "\n")
    for r in rows:
        eq = r.get("equal")
        if not eq:
            continue
        w(f"| {r['model']} | target=latency | {r['ratio']} | {r['kept']:.3f} / "
          f"{eq['latency']['kept_final']:.3f} | {r['params_kept']:.3f} | {r['macs_kept']:.3f} | "
          f"{r['imp']:.3f} | {r['imp_norm']:.3f} |\n")
        for k in ("uniform", "torch-pruning"):
            v = eq[k]
            note = f" ({v['unmapped_groups']} groups unmapped)" if v.get("unmapped_groups") else ""
            off = "" if abs(v["kept_search"] / r["kept"] - 1) <= 0.02 else " (not within 2%)"
            w(f"| | {k} | {v['ratio']:.3f} | {v['kept_search']:.3f}{off} / {v['kept_final']:.3f} | "
              f"{v['params_kept']:.3f} | {v['macs_kept']:.3f} | {v['imp']:.3f}{note} | "
              f"{v['imp_norm']:.3f} |\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("part", choices=("models", "digits", "digits-tables", "plot", "tables",
                                     "_one"))
    p.add_argument("name", nargs="?")
    p.add_argument("--models", default="resnet18,resnet50,mobilenet_v2,mobilenet_v3_large,"
                   "efficientnet_b0,densenet121,regnet_y_400mf,vgg11_bn")
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--seconds", type=float, default=2.0)
    p.add_argument("--timeout", type=float, default=300)
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--batch", type=int, default=64, help="digits: batch timed")
    p.add_argument("--epochs", type=int, default=15, help="digits: dense training epochs")
    p.add_argument("--lr", type=float, default=2e-3, help="digits: dense training rate")
    p.add_argument("--targets", type=float, nargs="+", default=[0.5, 0.7, 0.85],
                   help="digits: fractions of measured latency removed")
    p.add_argument("--anchors", type=float, nargs="+", default=[0.3, 0.45, 0.55, 0.7],
                   help="digits: uniform ratios; target=latency asked for their latency")
    p.add_argument("--finetune", type=int, nargs="+", default=[1, 5],
                   help="digits: fine-tune epochs (each from the pruned model)")
    p.add_argument("--arch", choices=("cnn", "mobile"), default="cnn",
                   help="digits: the example's plain CNN, or a MobileNetV2-style one")
    p.add_argument("--data", choices=("plain", "hard"), default="plain",
                   help="digits: load_digits as is, or shifted and noisy")
    p.add_argument("--ignore", nargs="*", default=[],
                   help="digits: modules kept whole by every variant (PruneConfig ignore)")
    p.add_argument("--importance", default="l2",
                   help="digits: the criterion of every variant (l2, taylor, activation)")
    p.add_argument("--valuation", choices=("scores", "loss"), default="scores",
                   help="digits: the latency target's valuation (loss: measured on 8 training "
                        "batches of 64)")
    p.add_argument("--noise", type=float, default=0.2, help="digits --data hard: noise std")
    p.add_argument("--shift", type=int, default=1, help="digits --data hard: max shift, px")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("onnx_ir", "onnxscript", "torch", "shrink"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if args.part == "_one":
        print(json.dumps(one_model(args.name, args.size, args.ratio, args.seconds)))
    else:
        {"models": run_models, "digits": run_digits, "digits-tables": run_digits_tables,
         "plot": run_plot, "tables": tables}[args.part](args)


if __name__ == "__main__":
    main()
