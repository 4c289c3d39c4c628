"""Ultralytics YOLOv8n and YOLO11n (detect, segment, pose, classify) from their yaml, random
weights, nothing downloaded (``tests/yolo_helpers.py``). Marked ``slow`` like the other zoos.

A pruned model must keep working inside Ultralytics: put back into its ``YOLO`` object, it
predicts on a numpy image and exports to ONNX through Ultralytics' own exporter, whose file
agrees with the fused PyTorch module in onnxruntime.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import shrink
from tests import yolo_helpers as yh
from tests.helpers import assert_matches_masked_original, assert_pinned_groups_kept, n_params

pytest.importorskip("ultralytics")
pytest.importorskip("onnxruntime")

IMGSZ = 320


@pytest.mark.slow
@pytest.mark.timeout(300)
@pytest.mark.parametrize("name", yh.ALL)
def test_hand_pruned_yolo_works_in_ultralytics(name: str, tmp_path: Path) -> None:
    """The glue itself, on a reference pruning (C2f/C3k2 hidden widths halved by hand)."""
    yolo = yh.build(name, imgsz=IMGSZ)
    dense = yolo.model
    small = copy.deepcopy(dense)
    assert yh.prune_c2f_by_hand_(small, 0.5)
    assert n_params(small) < n_params(dense)
    out = yh.check_in_ultralytics(yolo, small, tmp_path, IMGSZ)
    assert yolo.model is small
    assert out["onnx"].is_file()
    assert out["rel_err"] < 1e-4
    result = out["result"]  # conf=0: every task's post-processing sees boxes
    if name.endswith("-cls"):
        assert result.probs is not None
        assert result.probs.data.shape == (1000,)
    else:
        assert len(result.boxes) > 0
        for task, attr in (("-seg", "masks"), ("-pose", "keypoints")):
            if name.endswith(task):
                assert len(getattr(result, attr)) == len(result.boxes)


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_stale_hidden_width_breaks_ultralytics_export(tmp_path: Path) -> None:
    """Why a pruner must update ``C2f.c``: the exporter swaps in ``forward_split``, which splits
    by ``(self.c, self.c)``; predict (``chunk(2, 1)``) does not notice."""
    yolo = yh.build("yolov8n", imgsz=IMGSZ)
    small = copy.deepcopy(yolo.model)
    yh.prune_c2f_by_hand_(small, 0.5, sync=False)
    yh.put_back(yolo, small)
    yh.predict(yolo, IMGSZ)
    with pytest.raises(Exception, match="split"):
        yh.export_onnx(yolo, tmp_path, IMGSZ)
    assert yh.sync_hidden_widths_(small)
    yh.export_onnx(yolo, tmp_path, IMGSZ)


@pytest.mark.slow
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", yh.ALL)
def test_yolo_compresses_and_works_in_ultralytics(name: str, tmp_path: Path) -> None:
    yolo = yh.build(name, imgsz=IMGSZ)
    model = yolo.model
    x = yh.example_inputs(IMGSZ)
    with yh.deploy_outputs(model):  # the head's deploy outputs only (no neck features)
        with torch.no_grad():
            want = model(*x)
        res = shrink.prune(model, x, shrink.PruneConfig(0.5, verify=False, capture="export"))
    small = res.model.eval()
    yh.head_of(small).export = False  # copied while the original's was set
    with yh.deploy_outputs(model), yh.deploy_outputs(small):
        with torch.no_grad():
            got = small(*x)
        assert [t.shape for t in _flat(got)] == [t.shape for t in _flat(want)]
        assert_matches_masked_original(model, small, res.plan, x, rtol=1e-9, double=True)
        report = shrink.verify(model, small, res.plan, x, strict=False)
    assert report.macs_after <= 0.8 * report.macs_before
    assert_pinned_groups_kept(model, res)
    out = yh.check_in_ultralytics(yolo, small, tmp_path, IMGSZ)
    assert out["rel_err"] < 1e-4


def _flat(v: object) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for item in v for t in _flat(item)]
    return []
