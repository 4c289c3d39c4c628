"""Issue 11: torchvision's video ResNets compress at 0.5, exactly, and keep their layer classes.

Their convolutions are nn.Conv3d subclasses with constructors of their own
(``Conv3DSimple(in_planes, out_planes, midplanes, stride, padding)``); the rewrite must rebuild
them without calling those constructors.
"""

from __future__ import annotations

import pytest
import torch

import shrink
from shrink.testing import assert_unchanged, calibrate_bn_, randomize_, state_snapshot
from tests.helpers import assert_matches_masked_original, n_params

torchvision = pytest.importorskip("torchvision")

SHAPE = (2, 3, 4, 64, 64)


@pytest.mark.slow
@pytest.mark.zoo
@pytest.mark.parametrize("name", ["r3d_18", "mc3_18", "r2plus1d_18"])
def test_issue11_video_resnet_compresses_exactly_and_keeps_layer_classes(name: str) -> None:
    model = getattr(torchvision.models.video, name)(weights=None)
    randomize_(model, seed=1)
    calibrate_bn_(model, lambda: (torch.randn(*SHAPE),), steps=2)
    model.eval()
    x = (torch.randn(*SHAPE),)
    snap = state_snapshot(model)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5))  # verify=True: shrink's oracle
    assert_unchanged(model, snap)
    assert_matches_masked_original(model, res.model, res.plan, x, rtol=1e-9, double=True)
    with torch.no_grad():
        out, small = model(*x), res.model(*x)
    assert small.shape == out.shape
    assert float((out[0] - out[1]).abs().max()) > 1e-3 * float(out.abs().max())
    for fqn, m in model.named_modules():
        assert type(res.model.get_submodule(fqn)) is type(m), fqn
    assert n_params(res.model) <= 0.6 * n_params(model)
    assert res.report is not None
    assert res.report.mac_ratio <= 0.8
