"""Prune a vision transformer two ways and compare: exact (heads + MLP) vs residual stream too.

    python examples/04_transformers.py [vit_b_16|swin_t|convnext_tiny|maxvit_t]

``exact_only=True`` removes half the attention heads and half of every MLP's hidden width; the
result equals the original with those heads and neurons masked (checked). The default also
prunes the residual stream, which runs through LayerNorm: more than twice the saving, but the
LayerNorm statistics change, so the report gives the measured deviation from the masked
original (fine-tune afterwards). Both are exported to ONNX and timed in onnxruntime.
"""

import sys
import tempfile
from pathlib import Path

import torch
import torchvision

import shrink
from shrink.testing import randomize_

name = sys.argv[1] if len(sys.argv) > 1 else "swin_t"
torch.set_num_threads(1)
model = randomize_(torchvision.models.get_model(name, weights=None)).eval()
x = (torch.randn(1, 3, 224, 224),)
variants = {}
for label, exact_only in (("exact_only", True), ("default", False)):
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, exact_only=exact_only))
    print(f"--- {name}, ratio 0.5, {label}\n{res.report}\n")
    variants[label] = res.model

heads = [(n, m.num_heads) for n, m in variants["exact_only"].named_modules()
         if isinstance(getattr(m, "num_heads", None), int)][:4]
print("heads after exact_only pruning (first layers):", heads)

with tempfile.TemporaryDirectory() as d:
    for label, small in variants.items():
        shrink.export_onnx(small, x, Path(d) / f"{label}.onnx")  # onnxruntime parity checked
    bench = shrink.compare(model, variants["default"], x,
                           others={"exact_only": variants["exact_only"]},
                           seconds=3.0, clock="thread", dynamo=False, name=name)
print(bench.table())
