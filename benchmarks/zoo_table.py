"""Generate docs/zoo.md: every torchvision classifier (<= 150M params) through shrink at 0.5,
with torch-pruning 1.6's result on the same model next to it.

    python benchmarks/zoo_table.py [--models resnet18,vit_b_16] [--tp-timeout 120]
        [--out docs/zoo.md] [--quiet]

Each model runs in its own subprocess with a timeout, so a hang cannot stall the run. shrink:
ratio 0.5, L2, oracle verified. torch-pruning: MetaPruner, MagnitudeImportance(p=2), ratio 0.5,
final classifier ignored; "ok" means it returned a model whose forward runs with the right
output shape. Models whose default run prunes inexact (LayerNorm-normalised) groups report the
measured deviation and are pruned a second time with ``exact_only=True`` for its MACs ratio.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

CHILD = r'''
import json, sys, time, warnings
warnings.filterwarnings("ignore")
import torch, torchvision
torch.set_num_threads(1)
name, which = sys.argv[1], sys.argv[2]
kw = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
model = torchvision.models.get_model(name, weights=None, **kw).eval()
params = sum(p.numel() for p in model.parameters())
if params > 150e6:
    print(json.dumps({"skip": True})); sys.exit()
size = (299 if name == "inception_v3"
        else 224 if any(k in name for k in ("vit_", "swin", "maxvit")) else 64)
x = torch.randn(1, 3, size, size)
if which == "shrink":
    import shrink
    from shrink.testing import calibrate_bn_, randomize_
    randomize_(model, 1)
    calibrate_bn_(model, lambda: (torch.randn(2, 3, size, size),), 1)
    t = time.perf_counter()
    res = shrink.prune(model, (x,), shrink.PruneConfig(0.5))
    r = res.report
    seconds = time.perf_counter() - t
    other = [g.pinned for g in res.analysis.pinned
             if not g.pinned.startswith(("model input", "model output"))]
    pins = sorted(set(other))
    exact_macs = None
    if r.deviation is not None:
        # inexact (LayerNorm-normalised) groups were pruned: what does exact_only leave?
        r2 = shrink.prune(model, (x,), shrink.PruneConfig(0.5, exact_only=True)).report
        exact_macs = [r2.macs_before, r2.macs_after]
    print(json.dumps({"seconds": seconds, "params": [r.params_before, r.params_after],
                      "macs": [r.macs_before, r.macs_after], "err": r.max_rel_error,
                      "deviation": r.deviation, "exact_only_macs": exact_macs,
                      "pinned": len(res.analysis.pinned), "pinned_other": len(other),
                      "n_reasons": len(pins), "reasons": pins[:3]}))
else:
    import torch_pruning as tp
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 1000]
    t = time.perf_counter()
    pruner = tp.pruner.MetaPruner(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                                  pruning_ratio=0.5, ignored_layers=head[-1:])
    pruner.step()
    with torch.no_grad():
        out = model(x)
    ok = tuple(out.shape) == (1, 1000)
    print(json.dumps({"seconds": time.perf_counter() - t, "ok": ok,
                      "params": sum(p.numel() for p in model.parameters())}))
'''


def run_inprocess(name: str, which: str, timeout: float) -> dict[str, object]:
    """Same as :func:`run` without a subprocess (faster); a SIGALRM cuts hangs."""
    import contextlib
    import io
    import signal

    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"timeout after {timeout:.0f}s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(int(timeout))
    out = io.StringIO()
    argv = sys.argv
    try:
        sys.argv = ["child", name, which]
        with contextlib.redirect_stdout(out):
            exec(compile(CHILD.replace("sys.exit()", "raise SystemExit"), "<child>", "exec"), {})
    except SystemExit:
        pass
    except BaseException as e:  # any failure of the peer is a table entry
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:160]}
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
        sys.argv = argv
    lines = [ln for ln in out.getvalue().splitlines() if ln.startswith("{")]
    return json.loads(lines[-1]) if lines else {"error": "no result"}


def run(name: str, which: str, timeout: float) -> dict[str, object]:
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, name, which], capture_output=True,
                             text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"error": f"timeout after {timeout:.0f}s"}
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"error": err[:160]}
    return json.loads(lines[-1])


def main() -> None:
    import torchvision

    from shrink.cli import terminal_progress
    from shrink.progress import step

    ap = argparse.ArgumentParser()
    ap.add_argument("--models", default="")
    ap.add_argument("--timeout", type=float, default=900)
    ap.add_argument("--tp-timeout", type=float, default=180)
    ap.add_argument("--out", default="docs/zoo.md")
    ap.add_argument("--json", default="benchmarks/results/zoo.json")
    ap.add_argument("--subprocess", action="store_true", help="isolate each run in a subprocess")
    ap.add_argument("--merge", action="store_true", help="update rows of an existing --json")
    ap.add_argument("--date", default=time.strftime("%Y-%m-%d"), help="date in the header")
    ap.add_argument("--note", default="", help="a caveats paragraph under the header")
    ap.add_argument("-q", "--quiet", action="store_true",
                    help="no per-model progress lines (shown on stderr only when it is a terminal)")
    args = ap.parse_args()
    runner = run if args.subprocess else run_inprocess
    names = args.models.split(",") if args.models else sorted(
        torchvision.models.list_models(module=torchvision.models))
    rows: dict[str, dict[str, dict[str, object]]] = {}
    if args.merge and Path(args.json).exists():
        rows = json.loads(Path(args.json).read_text())
    # one line per model on a terminal (stderr; stdout keeps the JSON lines):
    # [3/8] mobilenet_v2 ... done in 12.3 s
    with terminal_progress(sys.stderr, quiet=args.quiet, prefix="", max_depth=1):
        for i, name in enumerate(names, 1):
            with step(i, len(names), name):
                s = runner(name, "shrink", args.timeout)
                t = None if s.get("skip") else runner(name, "tp", args.tp_timeout)
            if t is None:
                continue
            rows[name] = {"shrink": s, "tp": t}
            print(name, json.dumps(rows[name])[:300], flush=True)
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(rows, indent=1))
            render(rows, args.out, args.date, args.note)


def render(rows: dict[str, dict[str, dict[str, object]]], out: str, date: str,
           note: str = "") -> None:
    lines = [
        "# Model zoo: every torchvision classifier up to 150M parameters at ratio 0.5",
        "",
        f"Generated by `python benchmarks/zoo_table.py` on {date} "
        "(torch 2.14.1, torchvision 0.29.1, torch-pruning 1.6.1, random init, CPU). shrink: "
        "L2, ratio 0.5, default options (LayerNorm-normalised channels pruned as inexact "
        "groups), masked oracle verified (max relative error shown). deviation: max relative "
        "deviation of the pruned model from the plainly masked original, blank when only exact "
        "groups were pruned. exact_only MACs kept: the same run with `exact_only=True`, for "
        "models with inexact groups. torch-pruning: MetaPruner + MagnitudeImportance(p=2), "
        "ratio 0.5.",
        "",
        *([note, ""] if note else []),
        "| model | params before | params after | MACs before | MACs after | MACs kept | "
        "oracle err | deviation | exact_only MACs kept | shrink s | torch-pruning | "
        "pinned groups (besides input/output): why |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    ok = 0
    for name, r in rows.items():
        s, t = r["shrink"], r["tp"]
        if "error" in s:
            lines.append(f"| {name} | | | | | | | | | | | FAILED: {s['error']} |")
            continue
        ok += 1
        (pb, pa), (mb, ma) = s["params"], s["macs"]
        tp_cell = (f"ok {t['seconds']:.1f}s" if t.get("ok") else
                   ("wrong output" if "ok" in t else f"fails: {t.get('error', '?')}"))
        reasons = "; ".join(x.replace("|", "/")[:200] for x in s["reasons"]) or "none"
        more = s.get("n_reasons", len(s["reasons"])) - len(s["reasons"])
        reasons += f" (+{more} more)" if more > 0 else ""
        dev = s.get("deviation")
        exact = s.get("exact_only_macs")
        lines.append(
            f"| {name} | {pb / 1e6:.2f}M | {pa / 1e6:.2f}M | {mb / 1e9:.3f}G | {ma / 1e9:.3f}G | "
            f"{ma / mb:.2f} | {s['err']:.1e} | {'' if dev is None else f'{dev:.2e}'} | "
            f"{'' if not exact else f'{exact[1] / exact[0]:.2f}'} | {s['seconds']:.1f} | "
            f"{tp_cell} | {s.get('pinned_other', s['pinned'] - 2)} : {reasons} |"
        )
    tp_ok = sum(1 for r in rows.values() if r["tp"].get("ok"))
    lines += ["", f"shrink: {ok} of {len(rows)} models compressed; torch-pruning: {tp_ok}."]
    Path(out).write_text("\n".join(lines) + "\n" + _later_sections(Path(out)))


def _later_sections(path: Path) -> str:
    """The ``## `` sections other benchmarks appended to the file (the real-world zoo, the
    transformers table), kept when this table is written again."""
    if not path.exists():
        return ""
    text = path.read_text()
    at = text.find("\n## ")
    return "" if at < 0 else text[at:].lstrip("\n").join(("\n", ""))

if __name__ == "__main__":
    main()
