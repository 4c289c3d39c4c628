"""Prune Ultralytics YOLOv8n by half, put it back into Ultralytics, predict, export, time it.

    pip install ultralytics          # AGPL-3.0: only this example uses it, shrink never does
    python examples/05_yolo.py [yolov8n|yolo11n|yolov8n-seg|yolo11n-pose|...] [imgsz]

The model is built from its yaml with random weights (nothing is downloaded) and its BatchNorm
statistics are calibrated on random images, so activations are realistic for timing. torch.fx
cannot trace Ultralytics models; ``capture="export"`` captures them with torch.export.

The pruned module goes back into the same ``YOLO`` object, which predicts on a numpy image and
exports to ONNX through Ultralytics' own exporter, as a user would deploy it. Then dense and
pruned are exported with ``shrink.export_onnx`` (checked in onnxruntime) and timed side by side
in onnxruntime: one intra-op thread, interleaved rounds, best-of (``shrink.compare``).
"""

import os
import sys
import tempfile
from pathlib import Path

# Ultralytics reads these at import: no network, no auto-install, settings in a temp directory
os.environ.setdefault("YOLO_OFFLINE", "1")
os.environ.setdefault("YOLO_AUTOINSTALL", "0")
os.environ.setdefault("YOLO_VERBOSE", "0")
os.environ.setdefault("YOLO_CONFIG_DIR", tempfile.mkdtemp(prefix="yolo-settings-"))

import numpy as np
import torch
from ultralytics import YOLO

import shrink
from shrink.report import count_macs, count_params
from shrink.testing import calibrate_bn_

name = sys.argv[1] if len(sys.argv) > 1 else "yolov8n"
imgsz = int(sys.argv[2]) if len(sys.argv) > 2 else 640
torch.set_num_threads(1)
torch.manual_seed(0)

yolo = YOLO(f"{name}.yaml")  # random weights
model = yolo.model
calibrate_bn_(model, lambda: (torch.rand(2, 3, imgsz, imgsz),), steps=3)
model.eval()
x = (torch.rand(1, 3, imgsz, imgsz),)

# In eval mode the head returns (predictions, {"boxes", "scores", "feats"}): the raw neck
# features are outputs too, and outputs keep their shape. Ultralytics' exporter sets
# `export = True` so that the head returns the predictions only; prune what gets deployed.
model.model[-1].export = True
small = shrink.compress(model, 0.5, x, capture="export")  # verified against the masked original
model.model[-1].export = small.model[-1].export = False

# back into Ultralytics: the same YOLO object predicts and exports the pruned module
yolo.model, yolo.predictor = small, None  # the predictor caches a copy of the old module
image = np.random.default_rng(0).integers(0, 256, (imgsz, imgsz, 3), dtype=np.uint8)
(result,) = yolo.predict(image, imgsz=imgsz, conf=0.01, save=False, verbose=False)
print(f"Ultralytics predict with the pruned {name}: {result.verbose().rstrip(', ')}")

with tempfile.TemporaryDirectory() as d:
    small.pt_path = str(Path(d) / f"{name}-pruned.pt")  # where Ultralytics writes its export
    exported = yolo.export(format="onnx", imgsz=imgsz, simplify=False)
    print(f"Ultralytics export: {Path(exported).name} ({Path(exported).stat().st_size:,} bytes)")

    for m in (model, small):
        m.model[-1].export = True  # deploy outputs, as in Ultralytics' ONNX file
    # the head compares the input shape with a cached one, which fixes torch.export's batch:
    # shrink.export_onnx then falls back to the TorchScript path (as Ultralytics exports)
    files = {label: shrink.export_onnx(m, x, Path(d) / f"{label}.onnx")
             for label, m in (("dense", model), ("pruned", small))}  # onnxruntime parity checked
    bench = shrink.compare(files["dense"], files["pruned"], x, clock="thread", seconds=10.0,
                           name=f"{name} {imgsz}x{imgsz}")
    macs = {label: count_macs(m, x) for label, m in (("dense", model), ("pruned", small))}

print(bench.table())
speedup = bench.row("pruned").speedup
print(f"\n{name} at ratio 0.5: params {count_params(small) / count_params(model):.2f}, "
      f"MACs {macs['pruned'] / macs['dense']:.2f} of dense; onnxruntime (1 thread, best-of) "
      f"{speedup:.2f}x faster than dense (ideal {macs['dense'] / macs['pruned']:.2f}x)")
