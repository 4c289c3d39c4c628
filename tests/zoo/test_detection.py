"""torchvision detectors: captured in parts (their post-processing defeats torch.fx and
torch.export), pruned inside the parts.

Marked ``slow``: run with ``python -m pytest -m slow tests/zoo/test_detection.py``. Each detector
(random weights, one 3x256x256 image, ``min_size=max_size=256``) compresses at ratio 0.5 with
shrink's own verification on (each captured part against the masked original, on the masked
original's inputs), then: the model is untouched, the backbone and heads were captured, the
output has the same structure (a list of dicts with the same keys), the independent masked
oracle of tests/helpers.py holds on the whole model's outputs in float64, pinned groups are
kept, and MACs are at most 0.8 of the dense model's (both counted on the masked path: how many
boxes survive NMS decides the ROI heads' work).
"""

from __future__ import annotations

import time
from typing import Any

import pytest
import torch

import shrink
from shrink.testing import assert_unchanged, calibrate_bn_, randomize_, state_snapshot
from tests.helpers import assert_matches_masked_original, assert_pinned_groups_kept

torchvision = pytest.importorskip("torchvision")

_RCNN = {"rpn_pre_nms_top_n_test": 200, "rpn_post_nms_top_n_test": 100,
         "box_detections_per_img": 10}
_DENSE = {"detections_per_img": 20, "topk_candidates": 100}
_FPN_HEADS = ("backbone", "head")
_ROI = ("backbone", "rpn.head", "roi_heads.box_head")

# name -> (constructor options, parts that must be captured)
MODELS: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
    "fasterrcnn_resnet50_fpn": (_RCNN, _ROI),
    "maskrcnn_resnet50_fpn": (_RCNN, (*_ROI, "roi_heads.mask_head", "roi_heads.mask_predictor")),
    "keypointrcnn_resnet50_fpn": ({**_RCNN, "box_detections_per_img": 4},
                                  (*_ROI, "roi_heads.keypoint_head")),
    "retinanet_resnet50_fpn": (_DENSE, _FPN_HEADS),
    "fcos_resnet50_fpn": (_DENSE, _FPN_HEADS),
    "ssd300_vgg16": (_DENSE, _FPN_HEADS),
    "ssdlite320_mobilenet_v3_large": (_DENSE, _FPN_HEADS),
}


def build(name: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    """A randomised detector whose post-processing keeps boxes.

    Random He-scaled box regressors move every box off the image, so nothing survives and the
    ROI heads never run; their weights are scaled by 1e-3 (boxes stay near their anchors).
    Every other layer keeps its random weights; BN statistics are calibrated on the backbone.
    """
    options, _ = MODELS[name]
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, **options}
    if not name.startswith("ssd"):
        kwargs.update(min_size=256, max_size=256)
    model = torchvision.models.get_model(name, **kwargs).eval()
    randomize_(model, seed=1)
    size = getattr(model.transform, "fixed_size", None) or (256, 256)
    calibrate_bn_(model.backbone, lambda: (torch.randn(2, 3, *size),), steps=2)
    with torch.no_grad():
        for fqn, mod in model.named_modules():
            if "bbox" in fqn.rpartition(".")[2] or "regression_head.module_list." in fqn:
                for p in mod.parameters(recurse=False):
                    p.mul_(1e-3)
    return model, ([torch.randn(3, 256, 256)],)


def _structure(out: Any) -> list[tuple[str, torch.dtype, tuple[int, ...]]]:
    """Keys, dtypes and per-box shapes of a detector's list of dicts (box counts may differ)."""
    return [(k, v.dtype, tuple(v.shape[1:])) for d in out for k, v in sorted(d.items())]


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("name", sorted(MODELS))
def test_detector_compresses_in_parts(name: str) -> None:
    model, x = build(name)
    snap = state_snapshot(model)
    start = time.perf_counter()
    res = shrink.prune(model, x, shrink.PruneConfig(0.5))  # verify=True: part by part
    seconds = time.perf_counter() - start
    assert_unchanged(model, snap)
    report = res.report
    assert report is not None
    assert report.max_rel_error is not None
    assert report.max_rel_error <= 1e-5
    note = next(d for d in report.diagnostics if d.startswith("partial capture: "))
    captured = note.split("captured in parts: ", 1)[1].split(";", 1)[0].split(", ")
    assert set(MODELS[name][1]) <= set(captured), captured
    with torch.no_grad():
        out, small = model(*x), res.model(*x)
    assert len(out) == len(small) == 1
    assert _structure(out) == _structure(small)
    assert small[0]["boxes"].shape[0] > 0  # the heads ran on boxes
    assert_matches_masked_original(model, res.model, res.plan, x, rtol=1e-9, double=True)
    assert_pinned_groups_kept(model, res)
    assert report.mac_ratio <= 0.8, report.mac_ratio
    print(f"{name}: parts {captured}, MACs {report.mac_ratio:.3f}, "
          f"params {report.param_ratio:.3f}, prune+verify {seconds:.1f} s")
