"""Issue 2's model list: every model compresses at 0.5, exactly, and loses >= 40% of params.

Exactness is checked against the independent masked oracle of tests/helpers.py (pruned with
``verify=False``), in float64 so that float32 rounding in deep nets cannot hide or fake an error.
"""

from __future__ import annotations

import pytest
import torch

import shrink
from shrink.testing import assert_unchanged, calibrate_bn_, randomize_, state_snapshot
from tests.helpers import assert_matches_masked_original, assert_pinned_groups_kept, n_params

torchvision = pytest.importorskip("torchvision")

MODELS = [
    "resnet18", "resnet50", "resnext50_32x4d", "wide_resnet50_2", "mobilenet_v2",
    "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0", "efficientnet_v2_s",
    "densenet121", "googlenet", "inception_v3", "squeezenet1_0", "shufflenet_v2_x1_0",
    "regnet_y_400mf", "regnet_x_400mf", "vgg11_bn", "mnasnet0_5", "alexnet",
]


def build(name: str, size: int = 64) -> tuple[torch.nn.Module, tuple[torch.Tensor, ...]]:
    kwargs = {"init_weights": False} if name in ("googlenet", "inception_v3") else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs)
    size = 299 if name == "inception_v3" else size
    randomize_(model, seed=1)
    calibrate_bn_(model, lambda: (torch.randn(4, 3, size, size),), steps=2)
    return model.eval(), (torch.randn(2, 3, size, size),)


@pytest.mark.zoo
@pytest.mark.parametrize("name", MODELS)
def test_torchvision_model_compresses_exactly(name: str) -> None:
    model, x = build(name)
    snap = state_snapshot(model)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, verify=False))
    assert_unchanged(model, snap)
    with torch.no_grad():
        out = model(*x)
        small = res.model(*x)
    assert small.shape == out.shape
    # the output depends on the input (random weights can hide bugs otherwise)
    assert float((out[0] - out[1]).abs().max()) > 1e-3 * float(out.abs().max())
    assert_matches_masked_original(model, res.model, res.plan, x, rtol=1e-9, double=True)
    assert_pinned_groups_kept(model, res)
    assert n_params(res.model) <= 0.6 * n_params(model)
