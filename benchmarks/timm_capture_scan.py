"""Which timm families each capture front-end can capture: one small model per family.

    python -m benchmarks.timm_capture_scan [--families mobilevit,resnet] [--timeout 60]
        [--export-all] [--json benchmarks/results/timm_capture_scan.json]
    python -m benchmarks.timm_capture_scan --from-json FILE   # re-print an earlier run's table

A family is the module a model is defined in (``timm.models.<module>``). Its model is the
smallest variant: the four best names by a size heuristic (``atto`` < ``nano`` < ``tiny`` <
``small``..., inputs <= 224 px first, ``test_*`` models last) are built on the meta device and
the one with the fewest parameters wins. Each model is then captured with
``shrink.capture(model, x, frontend="fx", on_meta=True)``, ``x = randn(1, 3, S, S)`` at the
model's default input side capped at 224 (a model whose default is larger is built with
``img_size=S`` where it takes one; where the model itself rejects S, at its default side);
where fx fails, with ``frontend="export"``. Each capture
runs in its own subprocess with a timeout, so a hang cannot stall the scan. Models above 150M
parameters are built on the meta device (no weights); for export that means the meta attempt
only. Prints a markdown table; writes every row as JSON.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

CHILD = r'''
import json, signal, sys, time, warnings
warnings.filterwarnings("ignore")
import logging
logging.disable(logging.WARNING)
import torch, timm
torch.set_num_threads(1)
name, frontends = sys.argv[1], sys.argv[2].split(",")
side, limit = int(sys.argv[3]), int(sys.argv[4])
import shrink

def build(device):
    kw = {}
    if timm.models.get_pretrained_cfg(name).input_size[-1] != side:
        kw["img_size"] = side
    with torch.device(device):
        try:
            return timm.create_model(name, pretrained=False, **kw)
        except TypeError:
            return timm.create_model(name, pretrained=False)

class Timeout(Exception):
    pass

def alarm(signum, frame):
    raise Timeout(f"timeout after {limit} s")

signal.signal(signal.SIGALRM, alarm)
params = sum(p.numel() for p in build("meta").parameters())
meta = params > 150e6
model = build("meta" if meta else "cpu").eval()
x = torch.randn(1, 3, side, side)
for frontend in frontends:
    out = {"frontend": frontend, "params": params, "meta_built": meta}
    t = time.perf_counter()
    signal.alarm(limit)
    try:
        cap = shrink.capture(model, (x,), frontend=frontend, on_meta=True)
        out["ok"] = True
        out["nodes"] = sum(len(g.graph.nodes) for g in cap.graph_modules)
    except Exception as e:
        out["ok"] = False
        msg = str(e).strip().splitlines()
        out["error"] = f"{type(e).__name__}: {msg[0] if msg else ''}"[:300]
    finally:
        signal.alarm(0)
    out["seconds"] = time.perf_counter() - t
    if not out["ok"] and frontend == "export" and not meta:
        try:
            with torch.no_grad():
                model(x)
            out["eager"] = True
        except Exception as e:
            out["eager"] = False
            out["eager_error"] = f"{type(e).__name__}: {str(e).strip()[:200]}"
    print("RESULT " + json.dumps(out), flush=True)
    if out["ok"]:
        break
'''

# name tokens from small to large; a name's rank is its smallest token's
_SIZES = [
    ("zepto", "atto", "femto", "pico", "xxxs", "xxs", "nano", "micro", "mini", "m0", "b0",
     "s0", "t0", "a0", "035", "050", "058", "075"),
    ("xxsmall", "xs", "xsmall", "tiny", "ti", "t", "t1", "s1", "b1", "m1", "lite", "light",
     "100", "s12"),
    ("small", "s", "s2", "b2", "m2", "t2", "s16", "s24", "mobile"),
    ("medium", "m", "b3", "base", "b", "m3", "s3"),
]
_BIG = re.compile(r"large|huge|giant|gigantic|enormous|xlarge|_[0-9]+[bm]_|_1b|_3b|_6b|448|"
                  r"512|518|576|640|1024")


def _name_rank(name: str, side: int) -> tuple[int, int, int, int]:
    tokens = re.split(r"[_.]", name)
    rank = len(_SIZES)
    for i, words in enumerate(_SIZES):
        if any(tok in words for tok in tokens):
            rank = min(rank, i)
    first = re.search(r"\d+", name)  # a depth or width: resnet18 before resnet50
    return (name.startswith("test_") * 2 + bool(_BIG.search(name)), int(side > 224), rank,
            int(first.group()) if first else 0)


def pick_models(families: list[str] | None, n_candidates: int = 5) -> dict[str, str]:
    """family -> its smallest model (fewest parameters among the best-named candidates)."""
    import timm
    import torch

    chosen: dict[str, str] = {}
    for module in sorted(timm.list_modules()):
        if families and module not in families:
            continue
        names = timm.list_models(module=module)
        if not names:
            continue

        def side(n: str) -> int:
            cfg = timm.models.get_pretrained_cfg(n)
            return int(cfg.input_size[-1]) if cfg is not None else 224

        ranked = sorted(names, key=lambda n: (_name_rank(n, side(n)), len(n), n))
        best: tuple[int, str] | None = None
        for n in ranked[:n_candidates]:
            try:
                with torch.device("meta"):
                    m = timm.create_model(n, pretrained=False)
            except Exception:  # a variant that does not build is skipped
                continue
            p = sum(t.numel() for t in m.parameters())
            if best is None or p < best[0]:
                best = (p, n)
        if best is not None:
            chosen[module] = best[1]
    return chosen


def run_child(name: str, frontends: list[str], side: int,
              timeout: float) -> dict[str, dict[str, Any]]:
    """Capture ``name`` with each front-end in turn until one succeeds, in one subprocess;
    each capture is stopped after ``timeout`` seconds (SIGALRM, and the process's own limit as
    a backstop). Returns front-end -> result."""
    start = time.perf_counter()
    limit = int(timeout)
    results: dict[str, dict[str, Any]] = {}
    try:
        proc = subprocess.run(
            [sys.executable, "-c", CHILD, name, ",".join(frontends), str(side), str(limit)],
            capture_output=True, text=True, timeout=60 + limit * len(frontends) + 30,
            check=False)
        stdout, stderr, code = proc.stdout, proc.stderr, proc.returncode
    except subprocess.TimeoutExpired as e:
        stdout = e.stdout.decode() if isinstance(e.stdout, bytes) else (e.stdout or "")
        stderr, code = f"killed after {time.perf_counter() - start:.0f} s", None
    for line in stdout.splitlines():
        if line.startswith("RESULT "):
            r = json.loads(line[len("RESULT "):])
            results[r["frontend"]] = r
    for f in frontends:
        if f in results:
            break
        tail = (stderr.strip().splitlines() or ["no output"])[-1]
        results[f] = {"frontend": f, "ok": False, "error": f"child exited {code}: {tail[:300]}",
                      "seconds": time.perf_counter() - start}
        break
    return results


def scan(families: list[str] | None, timeout: float, export_all: bool) -> list[dict[str, Any]]:
    import timm

    rows = []
    for family, name in pick_models(families).items():
        cfg = timm.models.get_pretrained_cfg(name)
        side = min(int(cfg.input_size[-1]) if cfg is not None else 224, 224)
        row: dict[str, Any] = {"family": family, "model": name, "side": side}
        row.update(run_child(name, ["fx", "export"], side, timeout))
        default = int(cfg.input_size[-1]) if cfg is not None else side
        if row.get("export", {}).get("eager") is False and default != side:
            # the model itself rejects the capped side (crossvit needs 240): its default then
            row = {"family": family, "model": name, "side": default, "capped_side_failed": True}
            row.update(run_child(name, ["fx", "export"], default, timeout))
        if "export" not in row and (export_all or not row["fx"]["ok"]):
            row.update(run_child(name, ["export"], row["side"], timeout))
        row["params"] = row["fx"].get("params")
        rows.append(row)
        print(_line(row), file=sys.stderr, flush=True)
    return rows


def _verdict(row: dict[str, Any]) -> str:
    if row["fx"]["ok"]:
        return "fx"
    exp = row.get("export")
    return "export only" if exp and exp["ok"] else "neither"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _line(row: dict[str, Any]) -> str:
    fx, exp = row["fx"], row.get("export")
    params = f"{row['params'] / 1e6:.1f}M" if row.get("params") else "?"
    fx_cell = f"ok {fx['seconds']:.1f} s" if fx["ok"] else f"fail: `{_cell(fx['error'])}`"
    if exp is None:
        exp_cell = ""
    elif exp["ok"]:
        exp_cell = f"ok {exp['seconds']:.1f} s"
    else:
        eager = " (eager fails too)" if exp.get("eager") is False else ""
        exp_cell = f"fail{eager}: `{_cell(exp['error'])}`"
    return (f"| {row['family']} | {row['model']} | {params} | {row['side']} | {fx_cell} | "
            f"{exp_cell} | {_verdict(row)} |")


def table(rows: list[dict[str, Any]], command: str) -> str:
    counts = {v: sum(_verdict(r) == v for r in rows) for v in ("fx", "export only", "neither")}
    head = [
        "# timm families: torch.fx vs torch.export capture",
        "",
        f"Generated by `{command}` (timm "
        f"{__import__('timm').__version__}, torch {__import__('torch').__version__}).",
        "",
        f"{len(rows)} families: **fx ok {counts['fx']}**, **export only "
        f"{counts['export only']}**, **neither {counts['neither']}**. Capture on the meta "
        "device (`on_meta=True`), batch 1, input side = default capped at 224 (the default "
        "where the model rejects the capped side); times are "
        "wall seconds of `shrink.capture` on a shared 2-core machine (1 thread).",
        "",
        "| family | model | params | side | fx | export | verdict |",
        "|---|---|---|---|---|---|---|",
    ]
    return "\n".join(head + [_line(r) for r in rows]) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", help="comma-separated timm modules (default: all)")
    ap.add_argument("--timeout", type=float, default=60.0)
    ap.add_argument("--export-all", action="store_true",
                    help="also try export where fx succeeds")
    ap.add_argument("--json", default="benchmarks/results/timm_capture_scan.json")
    ap.add_argument("--from-json", help="only print the table of an earlier run's JSON")
    ap.add_argument("--command", help="the command to name in the table's header")
    args = ap.parse_args(argv)
    families = args.families.split(",") if args.families else None
    if args.from_json:
        rows = json.loads(Path(args.from_json).read_text())
    else:
        rows = scan(families, args.timeout, args.export_all)
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(rows, indent=1))
    given = argv if argv is not None else sys.argv[1:]
    cmd = args.command or " ".join(["python -m benchmarks.timm_capture_scan", *given])
    print(table(rows, cmd))
    return 0


if __name__ == "__main__":
    sys.exit(main())
