"""A diverse sample of timm models (pretrained=False): CNNs, ViT/DeiT, Swin, hybrids, MLP-Mixer,
PoolFormer, CSP/Res2Net/DPN-style multi-branch nets. Marked ``slow`` like the torchvision zoo.

Each model compresses at 0.5 with the output shape unchanged and the masked oracle holding;
models whose channels are mostly pinned by ops shrink cannot yet prune (literal split sizes,
fixed-bound slices) must still say why for every pinned group.
"""

from __future__ import annotations

import pytest
import torch

import shrink
from shrink.testing import calibrate_bn_, randomize_
from tests.helpers import assert_matches_masked_original, assert_pinned_groups_kept, n_params

timm = pytest.importorskip("timm")

MODELS = [
    "resnet18", "efficientnet_b0", "mobilenetv3_small_100", "convnext_atto", "regnety_002",
    "cspresnet50", "cspdarknet53", "res2net50_14w_8s", "dpn68", "ghostnet_100", "rexnet_100",
    "vit_tiny_patch16_224", "deit_tiny_patch16_224", "swin_tiny_patch4_window7_224",
    "levit_128s", "efficientformer_l1", "mixer_s16_224", "poolformer_s12", "densenet121",
    "hrnet_w18_small", "repvgg_a0", "dla34", "inception_v3", "xception41",
]
TRANSFORMERS = ("vit", "deit", "swin", "levit", "mixer", "efficientformer", "poolformer")


@pytest.mark.slow
@pytest.mark.timeout(600)
@pytest.mark.parametrize("name", MODELS)
def test_timm_model_compresses(name: str) -> None:
    model = timm.create_model(name, pretrained=False)
    size = 224 if any(k in name for k in TRANSFORMERS) else 96
    randomize_(model, seed=3)
    calibrate_bn_(model, lambda: (torch.randn(2, 3, size, size),), steps=1)
    model.eval()
    x = (torch.randn(2, 3, size, size),)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, verify=False))
    with torch.no_grad():
        assert res.model(*x).shape == model(*x).shape
    assert_matches_masked_original(model, res.model, res.plan, x, rtol=1e-9, double=True)
    assert n_params(res.model) < n_params(model)
    assert_pinned_groups_kept(model, res)
