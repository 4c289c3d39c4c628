"""Capture coverage and time of shrink's two front-ends (torch.fx, torch.export), model by model.

    python benchmarks/capture_frontends.py [--models yolov8n,resnet18] [--timeout 240]
        [--out docs/capture.md] [--json capture.json]

For every model of the zoo (torchvision classification, segmentation, detection, video and
optical flow; a timm sample with the families fx cannot trace; Ultralytics YOLO v8/11 in its four
tasks; Hugging Face transformers built from small configs), each front-end runs in its own
subprocess (one thread, a timeout, so a hang stalls nothing): ``shrink.capture(model, x,
frontend=F, on_meta=True)`` then ``shrink.analyze``. The table gives whether it captured, the
capture time (best of two, the second one warm) and how many channel groups are prunable, so
"which wins where" is measured, not claimed. Random weights; no download.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

CHILD = r'''
import json, os, sys, time, warnings
warnings.filterwarnings("ignore")
os.environ.setdefault("YOLO_OFFLINE", "1")
import torch
torch.set_num_threads(1)
import shrink
name, frontend = sys.argv[1], sys.argv[2]

def build(name):
    kind, _, arch = name.partition(":")
    if kind == "tv":
        import torchvision
        kw = {"init_weights": False} if arch in ("googlenet", "inception_v3") else {}
        m = torchvision.models.get_model(arch, weights=None, **kw)
        size = (299 if arch == "inception_v3" else
                224 if any(k in arch for k in ("vit_", "swin", "maxvit")) else 64)
        return m, (torch.randn(1, 3, size, size),)
    if kind == "seg":
        import torchvision
        m = torchvision.models.get_model(arch, weights=None, weights_backbone=None)
        return m, (torch.randn(1, 3, 64, 64),)
    if kind == "det":
        import torchvision
        kw = {} if arch.startswith("ssd") else {"min_size": 256, "max_size": 256}
        m = torchvision.models.get_model(arch, weights=None, weights_backbone=None, **kw)
        return m, ([torch.randn(3, 256, 256)],)
    if kind == "video":
        import torchvision
        big = arch in ("s3d", "mvit_v1_b", "mvit_v2_s")
        shape = (1, 3, 16, 224, 224) if big else (1, 3, 8, 112, 112) if arch == "swin3d_t" \
            else (1, 3, 8, 64, 64)
        return torchvision.models.get_model(arch, weights=None), (torch.randn(*shape),)
    if kind == "flow":
        import torchvision
        return (torchvision.models.get_model(arch, weights=None),
                (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128)))
    if kind == "timm":
        import timm
        m = timm.create_model(arch, pretrained=False)
        size = min(m.pretrained_cfg.get("input_size", (3, 224, 224))[-1], 224)
        return m, (torch.randn(1, 3, size, size),)
    if kind == "yolo":
        from ultralytics import YOLO
        size = 224 if arch.endswith("-cls") else 320
        return YOLO(arch + ".yaml").model, (torch.randn(1, 3, size, size),)
    if kind == "hf":
        import transformers as T
        small = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, vocab_size=128)
        cfgs = {
            "bert": lambda: T.BertModel(T.BertConfig(**small)),
            "llama": lambda: T.LlamaForCausalLM(T.LlamaConfig(num_key_value_heads=2, **small)),
            "qwen2": lambda: T.Qwen2ForCausalLM(T.Qwen2Config(num_key_value_heads=2, **small)),
            "gpt2": lambda: T.GPT2LMHeadModel(T.GPT2Config(n_embd=64, n_layer=2, n_head=4,
                                                          vocab_size=128)),
            "t5": lambda: T.T5Model(T.T5Config(d_model=64, d_ff=128, num_layers=2, num_heads=4,
                                               d_kv=16, vocab_size=128)),
            "vit": lambda: T.ViTModel(T.ViTConfig(image_size=32, patch_size=8, **small)),
        }
        m = cfgs[arch]()
        if arch == "vit":
            return m, (torch.randn(1, 3, 32, 32),)
        ids = torch.randint(0, 128, (1, 16))
        return m, ((ids, torch.ones_like(ids), ids) if arch == "t5" else (ids,))
    raise SystemExit(f"unknown model {name}")

model, x = build(name)
model.eval()
out = {"model": name, "frontend": frontend}
try:
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        cap = shrink.capture(model, x, frontend=frontend, on_meta=True)
        times.append(time.perf_counter() - t0)
    a = shrink.analyze(cap, source=model)
    out.update(ok=True, seconds=min(times), prunable=len(a.prunable), groups=len(a.groups))
except Exception as e:
    msg = str(e).splitlines()[0] if str(e) else type(e).__name__
    out.update(ok=False, error=f"{type(e).__name__}: {msg}"[:160])
print("RESULT " + json.dumps(out))
'''

TV = [
    "alexnet", "convnext_tiny", "densenet121", "efficientnet_b0", "efficientnet_v2_s",
    "googlenet", "inception_v3", "maxvit_t", "mnasnet0_5", "mobilenet_v2",
    "mobilenet_v3_large", "regnet_y_400mf", "resnet18", "resnet50", "resnext50_32x4d",
    "shufflenet_v2_x1_0", "squeezenet1_0", "swin_t", "swin_v2_t", "vgg11_bn", "vit_b_16",
    "wide_resnet50_2",
]
MODELS = (
    [f"tv:{n}" for n in TV]
    + ["seg:deeplabv3_mobilenet_v3_large", "seg:fcn_resnet50", "seg:lraspp_mobilenet_v3_large"]
    + [f"det:{n}" for n in ("fasterrcnn_resnet50_fpn", "retinanet_resnet50_fpn",
                            "fcos_resnet50_fpn", "ssd300_vgg16", "ssdlite320_mobilenet_v3_large",
                            "maskrcnn_resnet50_fpn", "keypointrcnn_resnet50_fpn")]
    + [f"video:{n}" for n in ("r3d_18", "mc3_18", "r2plus1d_18", "s3d", "mvit_v1_b",
                              "mvit_v2_s", "swin3d_t")]
    + ["flow:raft_small", "flow:raft_large"]
    + [f"timm:{n}" for n in ("resnet18", "efficientnet_b0", "vit_tiny_patch16_224",
                             "mobilevit_xxs", "mobilevitv2_050", "convnext_atto",
                             "swin_tiny_patch4_window7_224", "levit_128s")]
    + [f"yolo:{v}{t}" for v in ("yolov8n", "yolo11n") for t in ("", "-seg", "-pose", "-cls")]
    + [f"hf:{n}" for n in ("bert", "llama", "qwen2", "gpt2", "t5", "vit")]
)


def run(name: str, frontend: str, timeout: float) -> dict[str, object]:
    try:
        proc = subprocess.run([sys.executable, "-c", CHILD, name, frontend], capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"model": name, "frontend": frontend, "ok": False, "error": f"timeout {timeout}s"}
    for line in proc.stdout.splitlines():
        if line.startswith("RESULT "):
            return json.loads(line[7:])
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    return {"model": name, "frontend": frontend, "ok": False, "error": tail[:160]}


def cell(r: dict[str, object]) -> str:
    if not r.get("ok"):
        return "fails: " + str(r.get("error", "")).replace("|", "/")[:90]
    return f"{r['seconds']:.2f} s, {r['prunable']}/{r['groups']} prunable"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", help="comma list (kind:name), default: the whole list")
    ap.add_argument("--timeout", type=float, default=240)
    ap.add_argument("--out", type=Path)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    names = args.models.split(",") if args.models else MODELS
    rows = []
    for name in names:
        fx, ex = run(name, "fx", args.timeout), run(name, "export", args.timeout)
        rows.append((name, fx, ex))
        print(f"{name:40s} fx: {cell(fx):60s} export: {cell(ex)}", flush=True)
    cmd = "python benchmarks/capture_frontends.py" + (f" --models {args.models}"
                                                      if args.models else "")
    lines = [
        "# Capture: torch.fx vs torch.export, model by model", "",
        f"Command: `{cmd}` (one thread, each front-end in its own process; capture time is the "
        "best of two, the second warm; groups from `shrink.analyze`).", "",
        "| model | torch.fx | torch.export |", "|---|---|---|",
    ]
    lines += [f"| {n} | {cell(fx)} | {cell(ex)} |" for n, fx, ex in rows]
    n_fx = sum(1 for _, fx, _ in rows if fx.get("ok"))
    n_ex = sum(1 for _, _, ex in rows if ex.get("ok"))
    n_any = sum(1 for _, fx, ex in rows if fx.get("ok") or ex.get("ok"))
    lines += ["", f"Captured: fx {n_fx}/{len(rows)}, export {n_ex}/{len(rows)}, either "
              f"(capture='auto') {n_any}/{len(rows)}."]
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps([{"model": n, "fx": fx, "export": ex}
                                         for n, fx, ex in rows], indent=1))
    print(text)


if __name__ == "__main__":
    main()
