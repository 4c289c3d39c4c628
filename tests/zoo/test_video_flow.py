"""torchvision's video and optical-flow models compress at ratio 0.5 (issue 11).

Marked ``slow`` like the rest of the zoo. Each model is built with random weights (re-randomised
and BN-calibrated, so outputs depend on the input), pruned with ``verify=False`` and the default
``capture="auto"`` (RAFT and swin3d need torch.export: fx cannot trace RAFT, and swin3d's fx
graph cannot run), then: the output structure is unchanged, the independent masked oracle of
tests/helpers.py holds, MACs are at most 0.8 of the dense model's, pinned groups say why and are
not pruned, and the pruned model exports to ONNX with onnxruntime parity wherever the dense
model exports.
"""

from __future__ import annotations

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

# the smallest input each model takes: s3d's last pooling needs 16 frames of 224 px, MViT's
# positional embeddings fix 16 x 224 x 224
VIDEO = {
    "r3d_18": (1, 3, 8, 64, 64),
    "mc3_18": (1, 3, 8, 64, 64),
    "r2plus1d_18": (1, 3, 8, 64, 64),
    "s3d": (1, 3, 16, 224, 224),
    "mvit_v1_b": (1, 3, 16, 224, 224),
    "mvit_v2_s": (1, 3, 16, 224, 224),
    "swin3d_t": (1, 3, 8, 64, 64),
}
FLOW = ("raft_small", "raft_large")


def _flat(v: object) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, (list, tuple)):
        return [t for item in v for t in _flat(item)]
    return []


def _check(model: torch.nn.Module, x: tuple[torch.Tensor, ...], tmp_path: Path,
           name: str, double: bool = True) -> shrink.Result:
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, verify=False))
    with torch.no_grad():
        out, ref = _flat(res.model(*x)), _flat(model(*x))
    assert [o.shape for o in out] == [r.shape for r in ref]
    # RAFT builds float32 coordinate grids inside forward: its oracle runs in float32
    assert_matches_masked_original(model, res.model, res.plan, x, rtol=1e-6 if double else 1e-4,
                                   double=double)
    assert_pinned_groups_kept(model, res)
    assert count_macs(res.model, x) <= 0.8 * count_macs(model, x)
    path = tmp_path / f"{name}.onnx"
    try:
        export_onnx(res.model, x, path, dynamic_batch=False, check=False)
    except Exception:
        # only acceptable where the dense model does not export either
        with pytest.raises(Exception):  # noqa: B017
            export_onnx(model, x, tmp_path / "dense.onnx", dynamic_batch=False, check=False)
        return res
    assert ort_relative_error(path, res.model, x) < 1e-4
    return res


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", sorted(VIDEO))
def test_video_model_compresses(name: str, tmp_path: Path) -> None:
    model = torchvision.models.get_model(name, weights=None)
    shape = VIDEO[name]
    randomize_(model, seed=4)
    calibrate_bn_(model, lambda: (torch.randn(*shape),), steps=1)
    res = _check(model.eval(), (torch.randn(*shape),), tmp_path, name)
    if name in ("r3d_18", "mc3_18", "r2plus1d_18"):
        # their Conv3DSimple / Conv3DNoTemporal / Conv2Plus1D layers have constructors of their
        # own; the rebuilt layers keep those classes
        for fqn, m in model.named_modules():
            assert type(res.model.get_submodule(fqn)) is type(m), fqn


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.timeout(900)
@pytest.mark.parametrize("name", FLOW)
def test_optical_flow_model_compresses(name: str, tmp_path: Path) -> None:
    model = torchvision.models.get_model(name, weights=None)
    randomize_(model, seed=4)
    images = (torch.randn(1, 3, 128, 128), torch.randn(1, 3, 128, 128))
    calibrate_bn_(model, lambda: images, steps=1)
    _check(model.eval(), images, tmp_path, name, double=False)
