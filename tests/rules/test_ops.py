"""One tiny model per op family: conv -> op -> conv. Each either prunes exactly or pins."""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from tests.helpers import prune_checked


class Sandwich(nn.Module):
    def __init__(self, op: Callable[[torch.Tensor], torch.Tensor] | nn.Module, c_mid: int = 8,
                 c_head: int | None = None, head: str = "conv") -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.op = op if isinstance(op, nn.Module) else None
        self.fn = None if isinstance(op, nn.Module) else op
        c_head = c_mid if c_head is None else c_head
        self.head = nn.Conv2d(c_head, 2, 1) if head == "conv" else nn.Linear(c_head, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = self.op(y) if self.op is not None else self.fn(y)
        return self.head(y)


PRESERVING: dict[str, Callable[[], Sandwich]] = {
    "relu": lambda: Sandwich(nn.ReLU()),
    "relu6": lambda: Sandwich(nn.ReLU6()),
    "silu": lambda: Sandwich(nn.SiLU()),
    "gelu": lambda: Sandwich(nn.GELU()),
    "hardswish": lambda: Sandwich(nn.Hardswish()),
    "hardsigmoid": lambda: Sandwich(nn.Hardsigmoid()),
    "sigmoid": lambda: Sandwich(nn.Sigmoid()),
    "tanh": lambda: Sandwich(nn.Tanh()),
    "leaky_relu": lambda: Sandwich(nn.LeakyReLU(0.1)),
    "dropout": lambda: Sandwich(nn.Dropout(0.3)),
    "dropout2d": lambda: Sandwich(nn.Dropout2d(0.3)),
    "identity": lambda: Sandwich(nn.Identity()),
    "bn2d": lambda: Sandwich(nn.BatchNorm2d(8)),
    "maxpool": lambda: Sandwich(nn.MaxPool2d(2)),
    "avgpool": lambda: Sandwich(nn.AvgPool2d(2)),
    "adaptive_avg": lambda: Sandwich(nn.AdaptiveAvgPool2d(2)),
    "adaptive_max": lambda: Sandwich(nn.AdaptiveMaxPool2d(1)),
    "f_relu": lambda: Sandwich(F.relu),
    "f_gelu": lambda: Sandwich(F.gelu),
    "f_max_pool": lambda: Sandwich(lambda y: F.max_pool2d(y, 2)),
    "f_interpolate": lambda: Sandwich(lambda y: F.interpolate(y, scale_factor=2.0)),
    "f_pad": lambda: Sandwich(lambda y: F.pad(y, (1, 1, 2, 0))),
    "clamp": lambda: Sandwich(lambda y: y.clamp(-1, 1)),
    "scalar_mul": lambda: Sandwich(lambda y: y * 2.0 + 1.0),
    "self_mul": lambda: Sandwich(lambda y: y * torch.sigmoid(y)),
    "spatial_mean": lambda: Sandwich(lambda y: y.mean((2, 3), keepdim=True)),
    "spatial_amax": lambda: Sandwich(lambda y: torch.amax(y, dim=(2, 3), keepdim=True)),
    "softmax_spatial": lambda: Sandwich(lambda y: torch.softmax(y.flatten(2), -1).view_as(y)),
    "permute_roundtrip": lambda: Sandwich(
        lambda y: y.permute(0, 2, 3, 1).contiguous().permute(0, 3, 1, 2)),
    "transpose_linear": lambda: Sandwich(lambda y: y.flatten(2).transpose(1, 2), head="linear"),
    "getitem_spatial": lambda: Sandwich(lambda y: y[:, :, 1:, ::2]),
    "unsqueeze_squeeze": lambda: Sandwich(lambda y: y.unsqueeze(2).squeeze(2)),
    "stack_mean": lambda: Sandwich(lambda y: torch.stack([y, y.relu()], 0).mean(0)),
    "cat_spatial": lambda: Sandwich(lambda y: torch.cat([y, y], dim=3)),
    "flatten_linear": lambda: Sandwich(lambda y: F.adaptive_avg_pool2d(y, 1).flatten(1),
                                       head="linear"),
    "expand": lambda: Sandwich(lambda y: y.mean((2, 3), keepdim=True).expand(-1, -1, 3, 3)),
}


@pytest.mark.parametrize("name", sorted(PRESERVING))
def test_channel_preserving_op_prunes_exactly(name: str) -> None:
    model = PRESERVING[name]()
    res = prune_checked(model, torch.randn(2, 3, 6, 6))
    g = res.analysis.group("a:out")
    assert g.pinned is None, g.pinned
    assert res.model.a.out_channels == 4


PINNING: dict[str, tuple[Callable[[], Sandwich], str]] = {
    "layernorm": (lambda: Sandwich(lambda y: F.layer_norm(y, y.shape[1:])), "layer_norm"),
    "layernorm_module": (lambda: Sandwich(nn.LayerNorm([8, 6, 6])), "(LayerNorm)"),
    "channel_softmax": (lambda: Sandwich(lambda y: torch.softmax(y, dim=1)), "across"),
    "channel_sum": (lambda: Sandwich(lambda y: y.sum(1, keepdim=True).expand_as(y)), "across"),
    "channel_slice": (lambda: Sandwich(lambda y: y[:, :4], c_mid=4), "fixed bounds"),
    "unbind": (lambda: Sandwich(lambda y: torch.stack(y.unbind(1), 1)), "unbind"),
    "roll": (lambda: Sandwich(lambda y: torch.roll(y, 1, 1)), "roll"),
    "pixel_shuffle": (lambda: Sandwich(lambda y: F.pixel_shuffle(y, 2), c_mid=2, c_head=2),
                      "pixel_shuffle"),
}


@pytest.mark.parametrize("name", sorted(PINNING))
def test_channel_mixing_or_unknown_op_pins_and_says_which(name: str) -> None:
    make, word = PINNING[name]
    assert word  # every row names what the reason must say
    res = prune_checked(make(), torch.randn(2, 3, 6, 6))
    g = res.analysis.group("a:out")
    assert g.pinned is not None
    assert word in g.pinned
    assert res.model.a.out_channels == 8


def test_bn1d_and_bn3d_follow_their_producers() -> None:
    m1 = nn.Sequential(nn.Conv1d(3, 8, 3), nn.BatchNorm1d(8), nn.ReLU(), nn.Conv1d(8, 2, 1))
    res = prune_checked(m1, torch.randn(2, 3, 10))
    assert res.model[1].num_features == 4
    m3 = nn.Sequential(nn.Conv3d(3, 8, 3), nn.BatchNorm3d(8), nn.ReLU(), nn.Conv3d(8, 2, 1))
    res = prune_checked(m3, torch.randn(1, 3, 5, 5, 5))
    assert res.model[1].num_features == 4
    assert res.model[1].running_mean.shape == (4,)


def test_frozen_bn_follows_its_producer() -> None:
    """torchvision's FrozenBatchNorm2d (pretrained detectors' backbones): its buffers are
    sliced with the conv before it, not folded into constants that pin the channels."""
    frozen = pytest.importorskip("torchvision.ops.misc").FrozenBatchNorm2d(8)
    gen = torch.Generator().manual_seed(3)
    for name, lo in (("weight", 0.5), ("bias", -0.5), ("running_mean", -0.5), ("running_var", 0.5)):
        getattr(frozen, name).copy_(torch.rand(8, generator=gen) + lo)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), frozen, nn.ReLU(), nn.Conv2d(8, 2, 1))
    res = prune_checked(model, torch.randn(2, 3, 10, 10))
    assert res.analysis.group("0:out").prunable
    assert res.model[1].running_var.shape == res.model[1].weight.shape == (4,)
    assert res.model[0].out_channels == res.model[3].in_channels == 4


def test_linear_on_tokens_prunes_hidden_features() -> None:
    model = nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Linear(16, 6))
    res = prune_checked(model, torch.randn(2, 5, 6))
    assert res.model[0].out_features == 8
    assert res.model[2].in_features == 8
