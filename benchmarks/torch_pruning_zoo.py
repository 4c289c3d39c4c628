"""torch-pruning on the real-world vision zoo of issue 11: YOLO, detection, video, optical flow.

    python benchmarks/torch_pruning_zoo.py [--models yolov8n,raft_small] [--timeout 240]
        [--json benchmarks/results/zoo_torch_pruning.json] [--out docs/zoo_torch_pruning.md]

Every model runs in its own subprocess (``--child NAME``) with a timeout, so a hang or a crash
is a table row, not a stalled run. Each child builds the model with random weights and nothing
downloaded, runs torch-pruning's ``BasePruner`` (``MetaPruner``) with
``MagnitudeImportance(p=2)``, ``pruning_ratio=0.5`` and the task's output layers ignored (as
torch-pruning's docs recommend: classifier, box/class/mask/keypoint predictors, flow head), then
checks that the pruned model runs on the example input and returns the same output structure
(containers, keys and every tensor's shape after the first axis: detection box counts may
differ). MACs come from ``tp.utils.count_ops_and_params`` before and after. For YOLO rows the
pruned module is also put back into its ``ultralytics.YOLO`` object, which must predict on a
numpy image and export to ONNX through Ultralytics' own exporter.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

YOLO = ("yolov8n", "yolov8n-seg", "yolov8n-pose", "yolov8n-cls",
        "yolo11n", "yolo11n-seg", "yolo11n-pose", "yolo11n-cls")
DETECTION = ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn", "fcos_resnet50_fpn",
             "ssd300_vgg16", "ssdlite320_mobilenet_v3_large", "maskrcnn_resnet50_fpn",
             "keypointrcnn_resnet50_fpn")
VIDEO = ("r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v1_b", "mvit_v2_s", "swin3d_t")
FLOW = ("raft_small", "raft_large")
TIMM = ("mobilevit_s", "mobilevitv2_050")
MODELS = YOLO + DETECTION + VIDEO + FLOW + TIMM
FAMILY = {**dict.fromkeys(YOLO, "YOLO"), **dict.fromkeys(DETECTION, "detection"),
          **dict.fromkeys(VIDEO, "video"), **dict.fromkeys(FLOW, "optical flow"),
          **dict.fromkeys(TIMM, "timm")}

# Detection predictors whose output channels are the task's (classes, boxes, masks, keypoints).
_DET_OUTPUTS = ("cls_logits", "bbox_pred", "cls_score", "bbox_reg", "bbox_ctrness",
                "mask_fcn_logits", "kps_score_lowres", "classification_head.module_list",
                "regression_head.module_list")
# RAFT: the flow head's last conv (2 channels) and the upsampling-mask predictor (8*8*9).
_FLOW_OUTPUTS = ("flow_head.conv2", "mask_predictor.conv")


def build(name: str) -> tuple[Any, tuple[Any, ...], list[Any], Any]:
    """``(model, example_inputs, ignored_layers, yolo_object_or_None)``, eval mode."""
    import torch
    from torch import nn

    if name in YOLO:
        sys.path.insert(0, str(ROOT))
        from tests import yolo_helpers as yh

        yolo = yh.build(name, imgsz=320)
        model = yolo.model
        yh.head_of(model).export = True  # deploy outputs only (see yh.deploy_outputs)
        return model, yh.example_inputs(320), yh.ignored_layers(model), yolo
    if name in TIMM:
        import timm

        model = timm.create_model(name, pretrained=False).eval()
        return model, (torch.randn(1, 3, 256, 256),), [model.get_classifier()], None
    import torchvision

    if name in DETECTION:
        size = 320
        kw = {"min_size": size, "max_size": size} if "ssd" not in name else {}
        model = torchvision.models.get_model(name, weights=None, weights_backbone=None,
                                             **kw).eval()
        ignored = [m for n, m in model.named_modules()
                   if any(n.endswith(s) or f"{s}." in n for s in _DET_OUTPUTS)
                   and isinstance(m, (nn.Conv2d, nn.Linear, nn.ConvTranspose2d))]
        return model, ([torch.rand(3, size, size)],), ignored, None
    if name in VIDEO:
        model = torchvision.models.get_model(name, weights=None).eval()
        big = name in ("s3d", "mvit_v1_b", "mvit_v2_s")  # fixed 16x224x224 (pooling/pos. emb.)
        shape = (1, 3, 16, 224, 224) if big else (1, 3, 8, 112, 112)
        head = [m for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv3d))][-1]
        return model, (torch.randn(shape),), [head], None
    if name in FLOW:
        model = torchvision.models.get_model(name, weights=None).eval()
        ignored = [m for n, m in model.named_modules()
                   if any(n.endswith(s) for s in _FLOW_OUTPUTS)]
        imgs = (torch.rand(1, 3, 128, 128), torch.rand(1, 3, 128, 128))
        return model, imgs, ignored, None
    raise SystemExit(f"unknown model {name!r}; known: {', '.join(MODELS)}")


def structure(v: Any) -> Any:
    """Containers, keys and tensor shapes without the first axis (box counts may vary)."""
    import torch

    if isinstance(v, torch.Tensor):
        return ("tensor", str(v.dtype), tuple(v.shape[1:]))
    if isinstance(v, dict):
        return ("dict", tuple((k, structure(x)) for k, x in v.items()))
    if isinstance(v, (list, tuple)):
        return (type(v).__name__, tuple(structure(x) for x in v))
    return type(v).__name__


def child(name: str) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch_pruning as tp

    torch.set_num_threads(1)
    torch.manual_seed(0)
    model, x, ignored, yolo = build(name)
    for p in model.parameters():  # torch-pruning traces autograd; the DFL's conv is frozen
        if p.dtype.is_floating_point:
            p.requires_grad_(True)
    row: dict[str, Any] = {"ignored": len(ignored)}
    with torch.no_grad():
        before = structure(model(*x))
    row.update(_counts(model, x, "before"))
    pruner_cls = getattr(tp.pruner, "BasePruner", None) or tp.pruner.MetaPruner
    t0 = time.perf_counter()
    try:
        pruner = pruner_cls(model, x, importance=tp.importance.MagnitudeImportance(p=2),
                            pruning_ratio=0.5, ignored_layers=ignored)
        pruner.step()
    except Exception as e:  # the peer's failure is the table entry
        row.update(stage="prune", error=_first_line(e), seconds=time.perf_counter() - t0)
        return row
    row["seconds"] = time.perf_counter() - t0
    try:
        with torch.no_grad():
            after = structure(model(*x))
    except Exception as e:
        row.update(stage="pruned forward", error=_first_line(e))
        return row
    row["same_structure"] = after == before
    if after != before:
        row["structure_diff"] = _first_difference(before, after)
    row.update(_counts(model, x, "after"))
    if yolo is not None:
        row["ultralytics"] = _ultralytics(yolo, model)
    return row


def _counts(model: Any, x: tuple[Any, ...], when: str) -> dict[str, int]:
    """Params, MACs and, for detectors, the backbone's MACs (data-independent).

    MACs are counted at the aten level (``shrink.report.count_macs``: FlopCounterMode over
    conv/mm/bmm/attention), not with ``tp.utils.count_ops_and_params``, whose per-module-type
    hooks miss layer subclasses (torchvision's ``Conv3DSimple``: r3d_18 counted at 0.78 G
    instead of 20 G). A two-stage detector's RoI heads run once per proposal/detection, so its
    total depends on how many survive; the backbone (+ FPN) count does not.
    """
    import torch

    from shrink.report import count_macs

    out = {f"params_{when}": sum(p.numel() for p in model.parameters()),
           f"macs_{when}": count_macs(model, x)}
    if hasattr(model, "backbone") and hasattr(model, "transform"):
        with torch.no_grad():
            images, _ = model.transform(*x)
        out[f"backbone_macs_{when}"] = count_macs(model.backbone, (images.tensors,))
    return out


def _ultralytics(yolo: Any, model: Any) -> str:
    """Put the pruned module back into its YOLO object: predict, then export to ONNX."""
    import tempfile

    from tests import yolo_helpers as yh

    yh.head_of(model).export = False
    yh.put_back(yolo, model)
    try:
        yh.predict(yolo)
    except Exception as e:
        return f"predict fails: {_first_line(e)}"
    with tempfile.TemporaryDirectory() as d:
        try:
            yh.export_onnx(yolo, d)
        except Exception as e:
            return f"export fails: {_first_line(e)}"
    return "predict + ONNX export ok"


def _first_difference(a: Any, b: Any, path: str = "out") -> str:
    if type(a) is not type(b) or not isinstance(a, tuple) or len(a) != len(b):
        return f"{path}: {a} -> {b}"
    for i, (x, y) in enumerate(zip(a, b, strict=True)):
        if x != y:
            return _first_difference(x, y, f"{path}[{i}]")
    return path


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"[:200]


def run(name: str, timeout: float, script: str = __file__) -> dict[str, Any]:
    """One model in a subprocess (``script --child NAME --timeout T``, which prints its row as
    a JSON line). At ``timeout`` the child dumps its stack and exits, and the row names the
    innermost torch-pruning function it was in (where it hangs)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}  # this checkout's shrink
    t0 = time.perf_counter()
    cmd = [sys.executable, script, "--child", name, "--timeout", str(timeout)]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout + 60,
                             env=env, cwd=ROOT)
    except subprocess.TimeoutExpired:
        return {"stage": "timeout", "error": f"timeout after {timeout:.0f} s"}
    wall = time.perf_counter() - t0
    lines = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if "most recent call first" in out.stderr:
        return {"stage": "timeout", "wall": wall, "error": f"timeout after {timeout:.0f} s"
                f"{_where(out.stderr)}"}
    if out.returncode != 0 or not lines:
        err = (out.stderr.strip().splitlines() or ["?"])[-1]
        return {"stage": "child", "error": err[:200], "wall": wall}
    return {**json.loads(lines[-1]), "wall": wall}


def _where(dump: str) -> str:
    """`` in torch_pruning <outer frame> ... <inner frame>`` from a faulthandler dump."""
    frames = []
    for line in dump.splitlines():  # innermost first
        if "torch_pruning/" in line and '", line ' in line:
            func = line.rsplit(" in ", 1)[-1]
            if not func.startswith("<"):  # skip <listcomp>, <lambda>, <genexpr>
                path = line.split("torch_pruning/", 1)[1].split('"')[0]
                frames.append(f"{path} {func}")
    if not frames:
        return ""
    return f" in torch_pruning {frames[-1]}" + (f" ... {frames[0]}" if len(frames) > 1 else "")


def verdict(r: dict[str, Any]) -> str:
    if "error" in r:
        return f"fails ({r.get('stage', '?')})"
    if not r.get("same_structure"):
        return "wrong output structure"
    return "ok"


def render(rows: dict[str, dict[str, Any]], command: str, env: str) -> str:
    lines = [
        "# torch-pruning on the real-world vision zoo (issue 11)",
        "",
        f"Generated by `{command}`",
        "",
        f"{env}. Random weights, nothing downloaded, CPU, one thread, each model in its own "
        "subprocess. torch-pruning: `BasePruner`/`MetaPruner`, `MagnitudeImportance(p=2)`, "
        "`pruning_ratio=0.5`, the task's output layers ignored (classifier; box, class, mask "
        "and keypoint predictors; RAFT's flow head and upsampling mask). *ok* = the pruned "
        "model runs on the example input and returns the same output structure (containers, "
        "keys, tensor shapes past the first axis). MACs: `shrink.report.count_macs` (aten "
        "conv/mm/bmm/attention; `tp.utils.count_ops_and_params` misses layer subclasses such "
        "as torchvision's `Conv3DSimple`); for detectors also the backbone + FPN alone, "
        "because two-stage RoI heads run once per surviving proposal/detection, which random "
        "weights make vary. "
        "Prune s = pruner construction + `step()`. Inputs: YOLO 1x3x320x320; detection one "
        "3x320x320 image (`min_size=max_size=320`; SSD at its native size); video "
        "1x3x8x112x112 (s3d, mvit: 1x3x16x224x224); RAFT two 1x3x128x128 images; timm "
        "1x3x256x256. YOLO: the pruned module is put back into its `YOLO` object, then "
        "`predict` on a numpy image and `export(format='onnx')`.",
        "",
        "| model | family | torch-pruning | MACs before | MACs after | MACs kept | "
        "backbone MACs kept | params kept | prune s | Ultralytics (YOLO) | error / note |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---|---|",
    ]
    for name, r in rows.items():
        mb, ma = r.get("macs_before"), r.get("macs_after")
        pb, pa = r.get("params_before"), r.get("params_after")
        note = r.get("error") or r.get("structure_diff") or ""
        secs = f"{r['seconds']:.1f}" if "seconds" in r else ""
        bb0, bb1 = r.get("backbone_macs_before"), r.get("backbone_macs_after")
        bb = f"{bb1 / bb0:.2f}" if bb0 and bb1 else ""
        lines.append(
            f"| {name} | {FAMILY.get(name, '')} | {verdict(r)} | "
            f"{f'{mb / 1e9:.3f}G' if mb else ''} | {f'{ma / 1e9:.3f}G' if ma else ''} | "
            f"{f'{ma / mb:.2f}' if mb and ma else ''} | {bb} | "
            f"{f'{pa / pb:.2f}' if pb and pa else ''} | "
            f"{secs} | {r.get('ultralytics', '')} | "
            f"{note.replace('|', '/')} |")
    ok = sum(verdict(r) == "ok" for r in rows.values())
    under = sum(verdict(r) == "ok" and r.get("backbone_macs_after", r["macs_after"])
                <= 0.8 * r.get("backbone_macs_before", r["macs_before"]) for r in rows.values())
    lines += ["", f"torch-pruning: {ok} of {len(rows)} models pruned with the same output "
              f"structure; {under} of them at most 0.8 of the dense MACs (detectors: backbone "
              "+ FPN)."]
    return "\n".join(lines) + "\n"


def environment(pkgs: tuple[str, ...] = ("torch", "torchvision", "torch-pruning", "ultralytics",
                                         "timm")) -> str:
    import importlib.metadata as md

    def v(p: str) -> str:
        try:
            return md.version(p)
        except md.PackageNotFoundError:
            return "-"

    return ", ".join(f"{p} {v(p)}" for p in pkgs) + f", {time.strftime('%Y-%m-%d')}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--timeout", type=float, default=120, help="seconds per model")
    ap.add_argument("--json", default="benchmarks/results/zoo_torch_pruning.json")
    ap.add_argument("--out", default="docs/zoo_torch_pruning.md")
    ap.add_argument("--merge", action="store_true", help="update rows of an existing --json")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        import faulthandler

        faulthandler.dump_traceback_later(args.timeout, exit=True)
        print(json.dumps(child(args.child)), flush=True)
        return
    names = args.models.split(",") if args.models else list(MODELS)
    jpath, out = ROOT / args.json, ROOT / args.out
    rows: dict[str, dict[str, Any]] = {}
    if args.merge and jpath.exists():
        rows = json.loads(jpath.read_text())["rows"]
    command = "python " + " ".join(
        [str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]])
    env = environment()
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
        rows[name] = run(name, args.timeout)
        print(f"  {verdict(rows[name])} {json.dumps(rows[name])[:240]}", file=sys.stderr,
              flush=True)
        ordered = {n: rows[n] for n in MODELS if n in rows} | {
            n: r for n, r in rows.items() if n not in MODELS}
        jpath.parent.mkdir(parents=True, exist_ok=True)
        jpath.write_text(json.dumps({"command": command, "environment": env,
                                     "rows": ordered}, indent=1))
        out.write_text(render(ordered, command, env))


if __name__ == "__main__":
    main()
