"""count_macs (MacCounter with fast_meta) must count exactly what FlopCounterMode counts on a
meta copy (its count before MacCounter; attention may count differently on real tensors)."""

from typing import Any

import pytest
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from shrink.capture import meta_copy, to_meta
from shrink.report import count_macs


def _flop_counter_macs(model: nn.Module, inputs: tuple[Any, ...]) -> int:
    fast = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            meta_copy(model).eval()(*to_meta(inputs))
    finally:
        torch.backends.mha.set_fastpath_enabled(fast)
    return int(counter.get_total_flops()) // 2


def _models() -> dict[str, tuple[nn.Module, tuple[Any, ...]]]:
    import torchvision

    conv = nn.Sequential(nn.Conv2d(3, 8, 3, groups=1), nn.BatchNorm2d(8), nn.Hardswish(),
                         nn.Conv2d(8, 8, 3, groups=8), nn.ReLU6(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 4))
    layer = nn.TransformerEncoderLayer(16, 4, 32, batch_first=True)
    return {
        "conv_net": (conv, (torch.randn(2, 3, 12, 12),)),
        "transformer_layer": (layer, (torch.randn(2, 5, 16),)),
        "mha": (nn.MultiheadAttention(16, 4, batch_first=True),
                (torch.randn(1, 5, 16),) * 3),
        "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small(),
                               (torch.randn(1, 3, 64, 64),)),
    }


@pytest.mark.parametrize("name", list(_models()))
def test_count_macs_equals_flop_counter_mode(name: str) -> None:
    model, inputs = _models()[name]
    assert count_macs(model, inputs) == _flop_counter_macs(model, inputs)
