"""Issue 13: perplexity at equal measured latency, ``target="latency"`` vs a uniform ratio,
on the tiny Llama of ``examples/06_tiny_llm.py``, after the same fine-tune.

    python benchmarks/latency_lm.py --steps 938                   # the example's training replayed
    python benchmarks/latency_lm.py --quick                       # ~5 min smoke run, no files

Per seed:

1. Train the dense tiny LM exactly as the example does (its ``FULL`` setup, ``--steps`` replays a
   run; ``--quick`` uses its ``QUICK`` setup and 30 steps).
2. Prune it with ``shrink.prune(..., PruneConfig(ratio, target="latency",
   runtime="onnxruntime-cpu", threads=1, capture="export", importance=<--importance>,
   data=<the example's calibration batches>))`` for every ``--ratios`` (fraction of measured
   latency removed). The deployment shape is batch 1 x ``seq`` tokens (128: one prefill of the
   example's window), the example's own example input.
3. Search a *uniform* plan (same importance and data, ``scope="local"``: every group loses the
   same fraction of its channels; ``round_to`` is the default of both, the runtime's block)
   whose measured latency equals the latency-aware model's: ``benchmarks/latency_eval.py``'s
   ``search`` (power-law step, then bisection) on measured kept latency, within ``--tol``. When
   no uniform ratio lands within it, the two nearest measured neighbours (one slower, one
   faster) are both kept, as ``latency_eval.py digits`` does.
4. Every model (dense too, as the reference) gets the example's fine-tune: the same batches,
   steps (``--finetune-fraction`` of training) and learning rate; held-out perplexity is
   measured after pruning and after the fine-tune.
5. Final timing: all fine-tuned variants of the seed against the dense model in one process,
   interleaved, ``--final`` times (``latency_eval.py``'s ``Timer``: ``shrink.compare`` on
   ONNX files, onnxruntime 1 intra-op thread, best-of on the thread clock, flush-to-zero).

The ONNX files are exported with the dynamo exporter at a fixed batch of 1 (the TorchScript
exporter has no ``aten::diff``, which transformers' mask code uses; the latency loop falls back
to the same exporter). The latency tables start cold (a fresh ``SHRINK_CACHE_DIR`` per run).

The JSON goes to ``benchmarks/results/latency_lm.json`` (``latency_lm_exact.json`` with
``--exact-only``: the same experiment with the hidden size kept, a diagnostic) and the markdown,
rendered from both, to ``--out`` (default ``docs/tiny_llm_latency.md``; nothing is written with
``--quick``). ``--render`` only re-renders the markdown; a ``## Conclusion`` section written by
hand at the end of the file is kept.

    python benchmarks/latency_lm.py --steps 938 --exact-only     # the diagnostic
    python benchmarks/latency_lm.py --steps 938 --scores         # mean raw score per group
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import io
import json
import logging
import math
import os
import shlex
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shrink  # noqa: E402
from benchmarks.latency_eval import Timer, search  # noqa: E402
from shrink.report import count_params  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
log = logging.getLogger("latency_lm")


def load_example() -> Any:
    """``examples/06_tiny_llm.py`` as a module (its data, model, training and evaluation)."""
    spec = importlib.util.spec_from_file_location("tiny_llm", ROOT / "examples" / "06_tiny_llm.py")
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules["tiny_llm"] = mod  # dataclasses look their module up while the class is built
    spec.loader.exec_module(mod)
    return mod


tiny = load_example()


class LMTimer(Timer):
    """``latency_eval.Timer`` with the exporter that works on this model: dynamo, batch fixed."""

    def export(self, model: nn.Module) -> Path:
        self.n += 1
        path = self.workdir / f"m{self.n}.onnx"
        with contextlib.redirect_stderr(io.StringIO()):  # torch.export's warnings
            shrink.export_onnx(model, self.x, path, dynamo=True, dynamic_batch=False)
        return path


def calibration(importance: str, batches: list[torch.Tensor]) -> list[dict] | None:
    """The example's calibration data for ``importance`` (taylor: the model's own loss)."""
    if importance == "taylor":
        return [{"input_ids": ids, "labels": ids} for ids in batches]
    if importance == "ln":
        return None
    return [{"input_ids": ids} for ids in batches]


def prune(dense: nn.Module, x: tuple[torch.Tensor, ...], cfg: shrink.PruneConfig) -> Any:
    with contextlib.redirect_stderr(io.StringIO()):  # torch.export's warnings
        return shrink.prune(dense, x, cfg)


def run_seed(args: argparse.Namespace, setup: Any, seed: int, data: tuple) -> dict[str, Any]:
    train_data, windows = data
    t0 = time.perf_counter()
    dense = tiny.train(tiny.build_model(setup, seed), tiny.batches(train_data, args.steps, setup,
                                                                  seed), setup.lr)
    train_s = time.perf_counter() - t0
    ft_steps = max(1, round(args.finetune_fraction * args.steps))
    ft_data = tiny.batches(train_data, ft_steps, setup, seed + 1)
    calib = tiny.batches(train_data, setup.calib_batches, setup, seed + 2)
    x = (calib[0][:1],)  # batch 1 x seq tokens: the example's example input, the timed shape
    cal = calibration(args.importance, calib)
    p0 = count_params(dense)
    common: dict[str, Any] = {"capture": "export", "importance": args.importance, "data": cal,
                              "exact_only": args.exact_only}
    out: dict[str, Any] = {"seed": seed, "train_s": train_s, "finetune_steps": ft_steps,
                           "prompt": list(x[0].shape), "dense_params": p0, "variants": []}
    out["dense_loss"] = tiny.held_out_loss(dense, windows, setup.batch)
    log.info("seed %d: dense trained in %.0f s, loss %.4f", seed, train_s, out["dense_loss"])
    variants: dict[str, nn.Module] = {}
    rows: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        timer = LMTimer(dense, x, Path(tmp), args.seconds)
        for ratio in args.ratios:
            t1 = time.perf_counter()
            lat_kw: dict[str, Any] = {"valuation": "scores"}
            if args.valuation == "loss":  # the latency allocation only: measured loss
                lat_kw = {"valuation": "loss", "max_batches": args.loss_batches,
                          "data": [{"input_ids": ids, "labels": ids} for ids in calib]}
            res = prune(dense, x, shrink.PruneConfig(ratio, target="latency",
                                                     runtime="onnxruntime-cpu", threads=1,
                                                     **{**common, **lat_kw}))
            lat = res.report.latency
            plan_s = time.perf_counter() - t1
            goal = timer.kept(res.model)["pruned"]
            log.info("  latency %.2f: report kept %.3f, timer %.3f, %s (%.0f s)", ratio,
                     lat.measured, goal, tiny.shape_of(res.model), plan_s)
            name = f"latency@{ratio:g}"
            variants[name] = res.model
            rows[name] = {"kind": "latency", "latency_ratio": ratio, "plan_s": plan_s,
                          "report_kept": lat.measured, "report_converged": lat.converged,
                          "report_corrections": lat.corrections, "kept_search": goal,
                          "deviation": res.report.deviation}

            def uniform(r: float) -> nn.Module:
                return prune(dense, x, shrink.PruneConfig(r, scope="local", **common)).model

            t2 = time.perf_counter()
            found = search(uniform, goal, timer, tol=args.tol, tries=args.tries)
            search_s = time.perf_counter() - t2
            picks = {"uniform": (found["ratio"], found["kept_search"], found["model"])}
            if "bracket" in found:  # no uniform ratio within tol: keep both neighbours
                picks = {"uniform (slower)": found["bracket"][0],
                         "uniform (faster)": found["bracket"][1]}
            for label, (r, kept, model) in picks.items():
                name = f"{label}@{ratio:g}"
                variants[name] = model
                rows[name] = {"kind": label, "latency_ratio": ratio, "channel_ratio": r,
                              "kept_search": kept, "goal": goal, "search_tries": found["tries"],
                              "search_s": search_s}
                log.info("  %s: channel ratio %.4f, kept %.3f (goal %.3f)", name, r, kept, goal)
        variants = {"dense": copy.deepcopy(dense), **variants}
        rows = {"dense": {"kind": "dense"}, **rows}
        tuned: dict[str, nn.Module] = {}
        for name, model in variants.items():
            row = rows[name]
            row.update(name=name, params=count_params(model), params_kept=count_params(model) / p0,
                       shape=tiny.shape_of(model),
                       loss_pruned=tiny.held_out_loss(model, windows, setup.batch))
            torch.manual_seed(seed)  # the example's fine-tune: same batches, steps, lr
            tuned[name] = tiny.train(copy.deepcopy(model), ft_data, setup.finetune_lr)
            row["loss_finetuned"] = tiny.held_out_loss(tuned[name], windows, setup.batch)
            log.info("  %-24s params %.3f  ppl %.3f -> %.3f", name, row["params_kept"],
                     math.exp(row["loss_pruned"]), math.exp(row["loss_finetuned"]))
        # final timing: every fine-tuned variant against the dense one, interleaved, --final times
        names = [k for k in tuned if k != "dense"]
        paths = {f"v{i}": timer.export(tuned[k]) for i, k in enumerate(names)}
        first, *others = paths
        finals = [timer.kept(paths[first], {k: paths[k] for k in others})
                  for _ in range(args.final)]
        for key, name in zip(paths, names, strict=True):
            rows[name]["kept_final"] = [f["pruned" if key == first else key] for f in finals]
        out["dense_ms"] = [f["dense_ms"] for f in finals]
    out["variants"] = list(rows.values())
    out["seconds"] = time.perf_counter() - t0
    return out


def group_scores(args: argparse.Namespace, setup: Any, seed: int) -> list[str]:
    """Per prunable group: size and mean raw ``--importance`` score per channel, and the
    normalised value the latency allocation gives it (its size: each channel counts about 1)."""
    train_data, _, _ = tiny.stdlib_bytes(setup.data_bytes)
    dense = tiny.train(tiny.build_model(setup, seed), tiny.batches(train_data, args.steps, setup,
                                                                  seed), setup.lr)
    calib = tiny.batches(train_data, setup.calib_batches, setup, seed + 2)
    cfg = shrink.PruneConfig(0.3, capture="export", importance=args.importance,
                             data=calibration(args.importance, calib), exact_only=args.exact_only)
    groups = prune(dense, (calib[0][:1],), cfg).analysis.groups
    scores = shrink.score(groups, dense, cfg.criterion)
    lines = ["| group | channels | mean raw score per channel | normalised value, all kept |",
             "|---|---|---|---|"]
    for g in groups:
        if g.id in scores:
            sc = scores[g.id].double()
            lines.append(f"| `{g.id}` | {g.size} | {float(sc.mean()):.3e} | {g.size} |")
    return lines


# ---------------------------------------------------------------- report

def ppl(loss: float) -> str:
    return f"{math.exp(loss):.3f}"


def kept_final(row: dict[str, Any]) -> float:
    return statistics.mean(row["kept_final"])


def table(result: dict[str, Any]) -> str:
    lines = ["| seed | latency removed (target) | variant | channel ratio | shape | params kept "
             "| latency kept: search / final (mean of runs) | ppl after prune "
             "| ppl after fine-tune |", "|---|---|---|---|---|---|---|---|---|"]
    for s in result["seeds"]:
        for r in s["variants"]:
            if r["kind"] == "dense":
                lines.append(f"| {s['seed']} | - | dense | - | {r['shape']} | {r['params']:,} "
                             f"(1.000) | 1 ({', '.join(f'{m:.3f}' for m in s['dense_ms'])} ms) "
                             f"| {ppl(r['loss_pruned'])} | {ppl(r['loss_finetuned'])} |")
                continue
            ch = "-" if r["kind"] == "latency" else f"{r['channel_ratio']:.3f}"
            kind = 'target="latency"' if r["kind"] == "latency" else r["kind"]
            if r["kind"] == "uniform" and abs(r["kept_search"] / r["goal"] - 1) > result["tol"]:
                kind += f" (nearest: not within {result['tol']:.0%})"
            runs = ", ".join(f"{k:.3f}" for k in r["kept_final"])
            lines.append(f"| {s['seed']} | {r['latency_ratio']:.0%} | {kind} | {ch} | "
                         f"{r['shape']} | {r['params']:,} ({r['params_kept']:.3f}) | "
                         f"{r['kept_search']:.3f} / {kept_final(r):.3f} ({runs}) | "
                         f"{ppl(r['loss_pruned'])} | {ppl(r['loss_finetuned'])} |")
    return "\n".join(lines)


def comparisons(result: dict[str, Any]) -> list[dict[str, Any]]:
    """Per seed and ratio: latency-aware vs the uniform plan(s) at the same measured latency."""
    out = []
    for s in result["seeds"]:
        for ratio in result["ratios"]:
            at = [r for r in s["variants"] if r.get("latency_ratio") == ratio]
            lat = next(r for r in at if r["kind"] == "latency")
            for u in (r for r in at if r["kind"] != "latency"):
                out.append({"seed": s["seed"], "ratio": ratio, "uniform": u["kind"],
                            "lat_ppl": math.exp(lat["loss_finetuned"]),
                            "uni_ppl": math.exp(u["loss_finetuned"]),
                            "lat_ppl_pruned": math.exp(lat["loss_pruned"]),
                            "uni_ppl_pruned": math.exp(u["loss_pruned"]),
                            "lat_kept": kept_final(lat), "uni_kept": kept_final(u),
                            "lat_params": lat["params_kept"], "uni_params": u["params_kept"]})
    return out


def summary(result: dict[str, Any]) -> list[str]:
    lines = []
    for c in comparisons(result):
        rel = c["lat_ppl"] / c["uni_ppl"] - 1
        who = "target=\"latency\" lower" if rel < 0 else "uniform lower" if rel > 0 else "equal"
        lines.append(
            f"- seed {c['seed']}, {c['ratio']:.0%} of latency removed, vs {c['uniform']}: "
            f"perplexity after fine-tune {c['lat_ppl']:.3f} vs {c['uni_ppl']:.3f} ({rel:+.1%}, "
            f"{who}); after pruning {c['lat_ppl_pruned']:.3f} vs {c['uni_ppl_pruned']:.3f}; "
            f"latency kept {c['lat_kept']:.3f} vs {c['uni_kept']:.3f}; params kept "
            f"{c['lat_params']:.3f} vs {c['uni_params']:.3f}.")
    return lines


def interpolated(result: dict[str, Any]) -> list[str]:
    """Where the uniform ratio could not land: the uniform perplexity after fine-tune linearly
    interpolated between its slower and faster neighbours at the latency-aware model's final
    latency (an estimate, marked as one)."""
    out = []
    for s in result["seeds"]:
        for ratio in result["ratios"]:
            at = {r["kind"]: r for r in s["variants"] if r.get("latency_ratio") == ratio}
            slow, fast = at.get("uniform (slower)"), at.get("uniform (faster)")
            if slow is None or fast is None:
                continue
            lat = at["latency"]
            a, b, x = kept_final(slow), kept_final(fast), kept_final(lat)
            if not b < x < a:
                out.append(f"- seed {s['seed']}, {ratio:.0%}: the final timing does not put "
                           f"target=\"latency\" ({x:.3f}) between the uniform neighbours "
                           f"({b:.3f}, {a:.3f}); no interpolation.")
                continue
            t = (a - x) / (a - b)
            est = math.exp(slow["loss_finetuned"] + t * (fast["loss_finetuned"]
                                                        - slow["loss_finetuned"]))
            rel = math.exp(lat["loss_finetuned"]) / est - 1
            out.append(f"- seed {s['seed']}, {ratio:.0%}: uniform interpolated at latency kept "
                       f"{x:.3f} (log-perplexity linear in latency between {b:.3f} and {a:.3f}): "
                       f"perplexity {est:.3f}; target=\"latency\" "
                       f"{math.exp(lat['loss_finetuned']):.3f} ({rel:+.1%}).")
    return out


def mean_lines(result: dict[str, Any]) -> list[str]:
    """Mean over seeds of the perplexity ratio latency / uniform, per ratio and uniform kind."""
    out = []
    comps = comparisons(result)
    for ratio in result["ratios"]:
        for kind in dict.fromkeys(c["uniform"] for c in comps if c["ratio"] == ratio):
            cs = [c for c in comps if c["ratio"] == ratio and c["uniform"] == kind]
            rel = [c["lat_ppl"] / c["uni_ppl"] - 1 for c in cs]
            wins = sum(r < 0 for r in rel)
            out.append(f"- {ratio:.0%} of latency removed, vs {kind}: perplexity after "
                       f"fine-tune {statistics.mean(rel):+.1%} on average (target=\"latency\" "
                       f"lower on {wins} of {len(cs)} seed(s)); latency kept "
                       f"{statistics.mean(c['lat_kept'] for c in cs):.3f} vs "
                       f"{statistics.mean(c['uni_kept'] for c in cs):.3f}, params kept "
                       f"{statistics.mean(c['lat_params'] for c in cs):.3f} vs "
                       f"{statistics.mean(c['uni_params'] for c in cs):.3f}.")
    return out


def section(result: dict[str, Any]) -> list[str]:
    """The table and the generated comparison of one run."""
    return [table(result), "",
            "`shape`: layers, hidden size, query/KV heads and MLP width per layer. "
            "`channel ratio`: the uniform fraction of channels removed per group. Dense "
            "latency: the dense model's best-of milliseconds in each final timing.", "",
            "Generated from the table: each seed, then the mean over seeds.", "",
            *summary(result), "", *mean_lines(result), "",
            "Uniform neighbours interpolated (an estimate: where no uniform ratio lands on the "
            "latency, the two neighbours' log-perplexities after fine-tune, linear in final "
            "latency kept):", "", *(interpolated(result) or ["- none (every search landed)."])]


CONCLUSION = "## Conclusion"


def markdown(result: dict[str, Any], exact: dict[str, Any] | None, keep: str) -> str:
    """The document: setup, the main run, the ``--exact-only`` run when there is one, and
    ``keep`` (the hand-written conclusion of the file being replaced)."""
    s = result["setup"]
    seeds = result["seeds"]
    extra: list[str] = []
    if exact is not None:
        extra = ["## Diagnostic: hidden size kept (`exact_only=True`, both methods)", "",
                 "```bash", exact["command"], "```", "",
                 f"{exact['seconds'] / 60:.1f} min. The same experiment with `exact_only=True` "
                 "for both methods: the RMSNorm-normalised hidden size (an inexact group) is "
                 "kept, so only query/KV heads and MLP widths are pruned.", "",
                 *section(exact), ""]
    return "\n".join([
        "# Tiny Llama: perplexity at equal measured latency, target=\"latency\" vs uniform", "",
        "```bash", result["command"], "```", "",
        f"{result['seconds'] / 60:.1f} min in all on {os.cpu_count()} CPU cores shared with "
        "other work; " + ", ".join(f"{k} {v}" for k, v in result["versions"].items()) + ". "
        "Written by `benchmarks/latency_lm.py` (JSON in `benchmarks/results/latency_lm*.json`); "
        "the conclusion at the end is kept when the file is rewritten.", "",
        "**Setup.** The model, data, training and fine-tune of `examples/06_tiny_llm.py` "
        f"([tiny_llm.md](tiny_llm.md)): `LlamaForCausalLM`, {s['layers']} layers, hidden "
        f"{s['hidden']}, {s['heads']} query / {s['kv_heads']} KV heads, MLP {s['intermediate']}, "
        f"{seeds[0]['dense_params']:,} parameters, trained {result['steps']} steps of "
        f"{s['batch']} x {s['seq']} bytes (seed {', '.join(str(x['seed']) for x in seeds)}). "
        f"Deployment shape timed: batch {seeds[0]['prompt'][0]} x {seeds[0]['prompt'][1]} tokens "
        "(one prefill, logits of every position), onnxruntime CPU, 1 intra-op thread. "
        f"Importance `{result['importance']}` on the example's {s['calib_batches']} calibration "
        "batches for both methods, `capture=\"export\"`.", "",
        "* `target=\"latency\"`: `shrink.prune(model, (prompt,), PruneConfig(ratio, "
        "target=\"latency\", runtime=\"onnxruntime-cpu\", threads=1, capture=\"export\", "
        f"importance=\"{result['importance']}\", data=...))`, ratio = fraction of measured "
        "latency removed; the latency cache starts cold.",
        "* uniform: the same importance and data with `scope=\"local\"` (every group, hidden "
        "size included, loses the same fraction of its channels; kept counts rounded to the "
        "runtime's block of 16, the default of both methods). Its channel ratio is searched "
        "(`benchmarks/latency_eval.py`'s `search`: power-law step, then bisection) until its "
        f"measured latency is within {result['tol']:.0%} of the latency-aware model's; when no "
        "ratio lands there, the nearest measured neighbours on both sides are both kept "
        "(`uniform (slower)`, `uniform (faster)`).",
        f"* Every model, and the dense one as the reference, is then fine-tuned "
        f"{seeds[0]['finetune_steps']} steps (the example's fine-tune: same batches, schedule, "
        f"peak lr {s['finetune_lr']}); held-out perplexity per byte on the example's "
        f"{s['eval_windows']} held-out windows, after pruning and after the fine-tune.",
        "* Latency kept: `shrink.compare` on `shrink.export_onnx` files (dynamo exporter, batch "
        "fixed at 1), dense and variants interleaved in one process, best-of on the thread "
        f"clock, {result['seconds_per_timing']:g} s per timing. *search*: the timing that chose "
        f"the plan; *final*: all fine-tuned variants of the seed timed together, "
        f"{result['final']} times (runs listed).", "",
        *section(result), "", *extra, keep])


def previous_conclusion(path: Path) -> str:
    """The hand-written conclusion of an existing document (kept when it is rewritten)."""
    if not path.exists():
        return ""
    text = path.read_text()
    at = text.find(CONCLUSION)
    return text[at:] if at >= 0 else ""


def write(out: Path) -> None:
    """Render ``out`` from the JSON results (the main run, and the diagnostic if present)."""
    main = json.loads((RESULTS / "latency_lm.json").read_text())
    path = RESULTS / "latency_lm_exact.json"
    exact = json.loads(path.read_text()) if path.exists() else None
    out.write_text(markdown(main, exact, previous_conclusion(out)).rstrip() + "\n")


# ---------------------------------------------------------------- main

def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (938 replays docs/tiny_llm.md); default: --minutes")
    p.add_argument("--minutes", type=float, default=3.0, help="training time budget")
    p.add_argument("--ratios", type=lambda s: [float(r) for r in s.split(",")], default=None,
                   help="fractions of measured latency removed (default 0.3,0.5; --quick 0.3)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--importance", default="taylor",
                   choices=("ln", "activation", "activation_weighted", "taylor"))
    p.add_argument("--valuation", choices=("scores", "loss"), default="scores",
                   help="the latency target's valuation (loss: measured on the calibration "
                        "batches, with labels)")
    p.add_argument("--loss-batches", type=int, default=None,
                   help="--valuation loss: at most this many calibration batches")
    p.add_argument("--json", type=Path, default=None,
                   help="results JSON (default benchmarks/results/latency_lm[_exact].json)")
    p.add_argument("--finetune-fraction", type=float, default=0.2)
    p.add_argument("--tol", type=float, default=0.02, help="uniform search: relative tolerance")
    p.add_argument("--tries", type=int, default=8, help="uniform search: plans measured")
    p.add_argument("--exact-only", action="store_true",
                   help="both methods with exact_only=True (hidden size kept: a diagnostic)")
    p.add_argument("--seconds", type=float, default=2.0, help="seconds per interleaved timing")
    p.add_argument("--final", type=int, default=2, help="final interleaved timings per seed")
    p.add_argument("--quick", action="store_true", help="tiny model and data, no files")
    p.add_argument("--scores", action="store_true",
                   help="only train the first seed and print every group's mean raw score")
    p.add_argument("--render", action="store_true",
                   help="only rewrite the markdown from benchmarks/results/latency_lm*.json")
    p.add_argument("--out", type=Path, default=None,
                   help="markdown path (default docs/tiny_llm_latency.md; none with --quick)")
    args = p.parse_args(argv)
    if args.ratios is None:
        args.ratios = [0.3] if args.quick else [0.3, 0.5]
    if args.quick:
        args.steps = args.steps or 30
        args.tries = min(args.tries, 3)
        args.seconds = min(args.seconds, 0.5)
        args.final = 1
    if args.out is None and not args.quick:
        args.out = ROOT / "docs" / "tiny_llm_latency.md"
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    torch.set_num_threads(1)
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    for noisy in ("onnx_ir", "onnxscript", "torch", "shrink"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    tiny.transformers.logging.set_verbosity_error()
    args = parse(argv)
    if args.render:
        write(args.out)
        return {}
    command = "python benchmarks/latency_lm.py " + " ".join(
        shlex.quote(a) for a in (sys.argv[1:] if argv is None else argv))
    setup = tiny.QUICK if args.quick else tiny.FULL
    if args.scores:
        args.steps = args.steps or tiny.steps_for(args.minutes, setup,
                                                  tiny.stdlib_bytes(setup.data_bytes)[0],
                                                  args.seeds[0])
        print("\n".join(group_scores(args, setup, args.seeds[0])))
        return {}
    started = time.perf_counter()
    train_data, held, _ = tiny.stdlib_bytes(setup.data_bytes)
    windows = tiny.eval_windows(held, setup)
    if args.steps is None:
        args.steps = tiny.steps_for(args.minutes, setup, train_data, args.seeds[0])
    with tempfile.TemporaryDirectory(prefix="shrink-cache-") as cache:
        os.environ["SHRINK_CACHE_DIR"] = cache  # cold latency tables, shared by the run
        seeds = [run_seed(args, setup, seed, (train_data, windows)) for seed in args.seeds]
    result = {"setup": setup.__dict__, "steps": args.steps, "ratios": args.ratios,
              "importance": args.importance, "tol": args.tol, "final": args.final,
              "exact_only": args.exact_only, "valuation": args.valuation,
              "command": command.strip(),
              "seconds_per_timing": args.seconds, "seeds": seeds,
              "seconds": time.perf_counter() - started,
              "versions": {"torch": torch.__version__,
                           "transformers": tiny.transformers.__version__,
                           "shrink": shrink.__version__, "python": sys.version.split()[0]}}
    result["comparisons"] = comparisons(result)
    print(table(result))
    print("\n".join(summary(result) + interpolated(result)))
    print(f"total {result['seconds']:.0f} s")
    if args.out is not None:
        js = args.json or RESULTS / ("latency_lm_exact.json" if args.exact_only
                                     else "latency_lm.json")
        js.parent.mkdir(parents=True, exist_ok=True)
        js.write_text(json.dumps(result, indent=1) + "\n")
        if args.json is None:
            write(args.out)
        print(f"wrote {js} and {args.out}")
    return result


if __name__ == "__main__":
    main()
