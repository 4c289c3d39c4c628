"""Every torchvision classification model up to 150M parameters compresses at ratio 0.5.

Marked ``slow``: run with ``python -m pytest -m slow tests/zoo`` (CI runs it as a second step);
``-n 2`` (pytest-xdist) ran the whole zoo in 13.4 min on 2 cores, 28 min serially (2026-11-28).
Each model (pruned with ``verify=False``): output shape unchanged, the independent masked oracle
of tests/helpers.py holds in float64, pinned groups are the model's inputs/outputs plus ones that
say why and are not pruned, MACs down >= 25%, and the pruned model exports to ONNX with a fresh
onnxruntime session matching PyTorch (< 1e-4) at the test's input.
Transformers (ViT, Swin, MaxViT) prune their LayerNorm-normalised residual streams as inexact
groups, so their report carries a finite deviation; with ``exact_only=True`` it is ``None``.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

import shrink
from shrink.deploy.export import export_onnx
from shrink.report import count_macs
from shrink.testing import calibrate_bn_, randomize_
from tests.helpers import (
    assert_matches_masked_original,
    assert_pinned_groups_kept,
    ort_relative_error,
)

torchvision = pytest.importorskip("torchvision")
pytest.importorskip("onnxruntime")

TRANSFORMER_KEYS = ("vit_", "swin", "maxvit")
# exact_only=True is checked on two small transformers only: it is a second full prune.
EXACT_ONLY_MODELS = ("swin_t", "vit_b_32")


def _names() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def _size(name: str) -> int:
    if name == "inception_v3":
        return 299
    return 224 if any(k in name for k in TRANSFORMER_KEYS) else 64


def _params_on_meta(name: str, kwargs: dict[str, bool]) -> int:
    """Parameter count without allocating weights (building vit_h_14 for real takes 6 s);
    0 when the model's init cannot run on the meta device (then the real build counts)."""
    try:
        with torch.device("meta"):
            meta = torchvision.models.get_model(name, weights=None, **kwargs)
    except NotImplementedError:  # an init that copies data (regnet_y_128gf)
        return 0
    return sum(p.numel() for p in meta.parameters())


def build(name: str) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]] | None:
    kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    if _params_on_meta(name, kwargs) > 150e6:
        return None
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    if sum(p.numel() for p in model.parameters()) > 150e6:
        return None
    size = _size(name)
    randomize_(model, seed=2)
    calibrate_bn_(model, lambda: (torch.randn(2, 3, size, size),), steps=1)
    return model.eval(), (torch.randn(2, 3, size, size),)


def assert_onnx_parity(model: torch.nn.Module, x: tuple[torch.Tensor, ...], path: Path) -> None:
    """The pruned model exports (default exporter) and onnxruntime matches it at ``x`` (checked
    here, in a fresh session: export's own parity check would raise above its rtol)."""
    export_onnx(model, x, path, dynamic_batch=False, check=False)
    assert ort_relative_error(path, model, x) < 1e-4


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", _names())
def test_every_torchvision_classifier_compresses(name: str, tmp_path: Path) -> None:
    built = build(name)
    if built is None:
        pytest.skip(f"{name} has more than 150M parameters")
    model, x = built
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, verify=False))
    with torch.no_grad():
        assert res.model(*x).shape == model(*x).shape
    assert_matches_masked_original(model, res.model, res.plan, x, rtol=1e-9, double=True)
    assert_pinned_groups_kept(model, res)
    assert count_macs(res.model, x) <= 0.75 * count_macs(model, x)
    if any(name.startswith(k) for k in TRANSFORMER_KEYS):
        deviation = shrink.verify(model, res.model, res.plan, x, strict=False).deviation
        assert isinstance(deviation, float)
        assert math.isfinite(deviation)
    assert_onnx_parity(res.model, x, tmp_path / f"{name}.onnx")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", EXACT_ONLY_MODELS)
def test_exact_only_transformer_has_no_deviation(name: str) -> None:
    built = build(name)
    assert built is not None
    model, x = built
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, exact_only=True, verify=False))
    assert all(res.plan.group(d.group).exact for d in res.plan.decisions)
    assert_matches_masked_original(model, res.model, res.plan, x, rtol=1e-9, double=True)
    report = shrink.verify(model, res.model, res.plan, x, strict=False)
    assert report.deviation is None
    assert report.macs_after < report.macs_before


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize(
    "name", sorted(torchvision.models.list_models(module=torchvision.models.segmentation))
)
def test_segmentation_models_compress(name: str, tmp_path: Path) -> None:
    model = torchvision.models.get_model(name, weights=None, weights_backbone=None)
    randomize_(model, seed=2)
    calibrate_bn_(model, lambda: (torch.randn(2, 3, 64, 64),), steps=1)
    model.eval()
    x = (torch.randn(1, 3, 64, 64),)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, verify=False))
    assert_matches_masked_original(model, res.model, res.plan, x, rtol=1e-9, double=True)
    assert count_macs(res.model, x) <= 0.75 * count_macs(model, x)
    with torch.no_grad():
        out, ref = res.model(*x), model(*x)
    assert out.keys() == ref.keys()
    assert all(out[k].shape == ref[k].shape for k in ref)
    assert_onnx_parity(res.model, x, tmp_path / f"{name}.onnx")
