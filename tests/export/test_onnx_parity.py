"""onnxruntime agrees with PyTorch on every pruned model of the core zoo (issue 2's 19 models).

Each model gets realistic random weights (``randomize_`` + ``calibrate_bn_``), is pruned at 0.5,
exported with the dynamo exporter and a dynamic batch axis, and run in onnxruntime at batch 1
and 4 against the pruned PyTorch model.
"""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import shrink
from shrink.testing import calibrate_bn_, randomize_

pytestmark = pytest.mark.onnx

torchvision = pytest.importorskip("torchvision")
ort = pytest.importorskip("onnxruntime")

ZOO = {  # model -> smallest convenient input side (inception_v3 needs >= 75 px)
    "resnet18": 64, "resnet50": 64, "resnext50_32x4d": 64, "wide_resnet50_2": 64,
    "mobilenet_v2": 64, "mobilenet_v3_small": 64, "mobilenet_v3_large": 64,
    "efficientnet_b0": 64, "efficientnet_v2_s": 64, "densenet121": 64, "googlenet": 64,
    "inception_v3": 80, "squeezenet1_0": 64, "shufflenet_v2_x1_0": 64, "regnet_y_400mf": 64,
    "regnet_x_400mf": 64, "vgg11_bn": 64, "mnasnet0_5": 64, "alexnet": 64,
}


def _pruned(name: str, side: int) -> tuple[torch.nn.Module, torch.nn.Module, torch.Tensor]:
    kwargs = {"aux_logits": False, "init_weights": False} if name in ("googlenet",
                                                                      "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    randomize_(model, seed=0)
    gen = torch.Generator().manual_seed(1)
    calibrate_bn_(model, lambda: (torch.randn(4, 3, side, side, generator=gen),), steps=2)
    x = torch.randn(1, 3, side, side, generator=gen)
    # the masked-oracle check of pruning itself is the zoo tests' job; this file tests export
    small = shrink.compress(model, 0.5, (x,), verify=False)
    return model, small.eval(), x


def _rel(a: np.ndarray, b: torch.Tensor) -> float:
    ref = b.double()
    return float((torch.from_numpy(a).double() - ref).abs().max() / ref.abs().max())


@pytest.mark.parametrize("name", sorted(ZOO))
def test_pruned_model_runs_in_onnxruntime_like_torch_at_batch_1_and_4(
        name: str, tmp_path: Path) -> None:
    model, small, x = _pruned(name, ZOO[name])
    path = tmp_path / f"{name}.onnx"
    result = shrink.export_onnx(small, (x,), path)
    assert result.exporter == "dynamo", result.fallback_reason
    assert result.parity is not None
    assert result.parity.batches == (1, 4)
    # independent check: batch 1 and a batch of 4 distinct samples through a fresh session
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (inp,) = session.get_inputs()
    assert not isinstance(inp.shape[0], int)  # symbolic batch
    for batch in (1, 4):
        xb = torch.randn(batch, *x.shape[1:], generator=torch.Generator().manual_seed(batch))
        (got,) = session.run(None, {inp.name: xb.numpy()})
        with torch.no_grad():
            want = small(xb)
        assert got.shape == tuple(want.shape) == (batch, 1000)
        assert _rel(got, want) < 1e-4
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in model.parameters())


class CachesOnItself(nn.Module):
    """Like Ultralytics' Detect: forward caches the input shape and a tensor on the module."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.shape: object = None
        self.anchors = torch.empty(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.shape != x.shape:
            self.anchors = torch.arange(x.shape[-1], dtype=x.dtype)
            self.shape = x.shape
        return self.conv(x) + self.anchors


def test_export_leaves_a_self_caching_model_as_it_was(tmp_path: Path) -> None:
    model, x = CachesOnItself().eval(), torch.randn(2, 3, 5, 5)
    with torch.no_grad():
        model(x)
    anchors, shape = model.anchors, model.shape
    out = shrink.export_onnx(model, x, tmp_path / "c.onnx", check=False)
    assert model.anchors is anchors and model.shape is shape  # no fake tensors left behind
    # torch.export fixed the batch (shape comparison): the TorchScript path keeps it dynamic
    assert out.exporter == "torchscript" and "batch" in (out.fallback_reason or "")
    checked = shrink.export_onnx(copy.deepcopy(model), x, tmp_path / "d.onnx")
    assert checked.parity is not None and checked.parity.batches == (2, 4)  # x, and batch 4


class CachesInADict(nn.Module):
    """Like timm's TinyViT/EfficientViT attention: in eval, forward fills a dict cache only when
    the device's entry is missing, and ``train()``/``eval()`` replace the cache by an empty one
    (so the one export sees is empty, and export fills it with a fake tensor)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)
        self.bias = nn.Parameter(torch.randn(4, 1, 1))
        self.cache: dict[str, torch.Tensor] = {}

    def train(self, mode: bool = True) -> CachesInADict:
        super().train(mode)
        self.cache = {}
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        key = str(x.device)
        if key not in self.cache:
            self.cache[key] = self.bias * 2
        return self.conv(x) + self.cache[key]


def test_export_leaves_no_fake_tensor_in_a_dict_cache_filled_in_place(tmp_path: Path) -> None:
    model, x = CachesInADict().eval(), torch.randn(2, 3, 5, 5)
    out = shrink.export_onnx(model, x, tmp_path / "c.onnx")  # parity runs the model again
    assert out.parity is not None
    assert all(type(t) is torch.Tensor for t in model.cache.values())
    with torch.no_grad():
        torch.testing.assert_close(model(x), model.conv(x) + model.bias * 2)
