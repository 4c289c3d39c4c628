"""shrink on issue 11's real-world vision zoo, next to torch-pruning's result on the same models.

    python benchmarks/realworld_zoo.py [--models yolo:yolov8n,flow:raft_small] [--timeout 300]
        [--out docs/zoo_realworld.md]

Each model runs in its own subprocess (one thread, a timeout): random weights (BN calibrated),
``shrink.prune(model, x, PruneConfig(0.5))`` with the default ``capture="auto"`` and shrink's own
verification on (the masked oracle; for detectors, per captured part). The row gives the
capture front-end that was used (fx, export, or parts), MACs and parameters kept, the oracle's
max relative error, prune time, and torch-pruning's outcome on the same model read from
``docs/zoo_torch_pruning.md`` (``benchmarks/torch_pruning_zoo.py``). YOLO models prune their
deploy outputs (``Detect.export = True``, as Ultralytics' exporter does). Same inputs as that
table: YOLO 1x3x320x320, detection one 3x320x320 image, video 8x112x112 (s3d and MViT
16x224x224), RAFT two 1x3x128x128 images, timm 256x256.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHILD = r'''
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
os.environ.setdefault("YOLO_OFFLINE", "1")
sys.path.insert(0, sys.argv[2])
import torch
torch.set_num_threads(1)
import shrink
from shrink.report import count_macs, count_params
from shrink.testing import calibrate_bn_, randomize_
name = sys.argv[1]
kind, _, arch = name.partition(":")
ctx = None
if kind == "yolo":
    from tests import yolo_helpers as yh
    yh.offline()
    model = yh.build(arch).model
    x = yh.example_inputs(320)
    ctx = yh.deploy_outputs(model)
    ctx.__enter__()
else:
    import torchvision
    if kind == "det":
        kw = {} if arch.startswith("ssd") else {"min_size": 320, "max_size": 320}
        model = torchvision.models.get_model(arch, weights=None, weights_backbone=None, **kw)
        x = ([torch.randn(3, 320, 320)],)
    elif kind == "video":
        model = torchvision.models.get_model(arch, weights=None)
        big = arch in ("s3d", "mvit_v1_b", "mvit_v2_s")
        x = (torch.randn(1, 3, 16, 224, 224) if big else torch.randn(1, 3, 8, 112, 112),)
    elif kind == "flow":
        model = torchvision.models.get_model(arch, weights=None)
        x = (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128))
    else:
        import timm
        model = timm.create_model(arch, pretrained=False)
        x = (torch.randn(1, 3, 256, 256),)
    randomize_(model, 1)
    if kind != "det":
        calibrate_bn_(model, lambda: x, steps=1)
model.eval()
out = {"model": name}
try:
    t0 = time.perf_counter()
    res = shrink.prune(model, x, shrink.PruneConfig(0.5))
    seconds = time.perf_counter() - t0
    rep = res.report
    out.update(ok=True, seconds=seconds, macs_kept=rep.macs_after / rep.macs_before,
               params_kept=count_params(res.model) / count_params(model),
               err=rep.max_rel_error, deviation=rep.deviation,
               prunable=len(res.analysis.prunable), groups=len(res.analysis.groups))
    out["capture"] = res.analysis.frontend
except Exception as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    out.update(ok=False, error=f"{type(e).__name__}: {msg}"[:200])
print("RESULT " + json.dumps(out))
'''

MODELS = (
    [f"yolo:{v}{t}" for v in ("yolov8n", "yolo11n") for t in ("", "-seg", "-pose", "-cls")]
    + [f"det:{n}" for n in ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn",
                            "fcos_resnet50_fpn", "ssd300_vgg16", "ssdlite320_mobilenet_v3_large",
                            "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn")]
    + [f"video:{n}" for n in ("r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v1_b",
                              "mvit_v2_s", "swin3d_t")]
    + ["flow:raft_small", "flow:raft_large", "timm:mobilevit_s", "timm:mobilevitv2_050"]
)


def run(name: str, timeout: float) -> dict[str, object]:
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, name, str(ROOT)], cwd=ROOT,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "ok": False, "error": f"timeout after {timeout:.0f} s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": name, "ok": False, "error": tail[:200]}


def torch_pruning_rows(path: Path) -> dict[str, str]:
    """model name -> 'ok, MACs kept 0.30' / 'fails (...)' from the torch-pruning table."""
    rows: dict[str, str] = {}
    if not path.exists():
        return rows
    for line in path.read_text().splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) < 7 or cells[0] in ("model", "---") or set(cells[0]) <= {"-", ":"}:
            continue
        status, kept = cells[2], cells[5]
        rows[cells[0]] = f"{status}, MACs kept {kept}" if status == "ok" and kept else status
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma list (kind:name); default: the whole zoo")
    ap.add_argument("--timeout", type=float, default=300)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args()
    names = args.models.split(",") if args.models else MODELS
    tp = torch_pruning_rows(ROOT / "docs" / "zoo_torch_pruning.md")
    lines = [
        "| model | capture | shrink | MACs kept | params kept | oracle err | prune s | "
        "torch-pruning (same model) |",
        "|---|---|---|---:|---:|---:|---:|---|",
    ]
    for name in names:
        r = run(name, args.timeout)
        short = re.sub(r"^\w+:", "", name)
        if r.get("ok"):
            row = (f"| {short} | {r['capture']} | ok | {r['macs_kept']:.2f} | "
                   f"{r['params_kept']:.2f} | {r['err']:.1e} | {r['seconds']:.1f} | ")
        else:
            row = f"| {short} | | fails: {str(r.get('error', '')).replace('|', '/')} | | | | | "
        row += tp.get(short, "") + " |"
        lines.append(row)
        print(row, flush=True)
    cmd = "python benchmarks/realworld_zoo.py" + (f" --models {args.models}" if args.models
                                                   else "")
    text = "\n".join([f"Command: `{cmd}`", "", *lines]) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
