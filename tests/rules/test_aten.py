"""ATen ops as torch.export records them: aliases of torch-level ops follow channels the way those
do, and reductions read their axes from the right argument.

Each case is ``conv -> op -> conv`` captured with ``capture="export"``: an op that keeps channels
apart leaves the first conv's channels prunable (and the pruned model equals the independently
masked original); one that reduces across them keeps them all.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import shrink
from tests.helpers import prune_checked

Op = Callable[[torch.Tensor], torch.Tensor]


class Sandwich(nn.Module):
    def __init__(self, op: Op) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 1)
        self.c2 = nn.Conv2d(16, 4, 1)
        self.op = op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(self.op(self.c1(x)))


# op -> the ATen op export records for it (asserted, so a case cannot silently test another op)
KEEP_CHANNELS: dict[str, tuple[Op, str]] = {
    "view_as": (lambda y: y.flatten(2).view_as(y), "aten.view_as"),
    "reshape_as": (lambda y: y.flatten(2).reshape_as(y), "aten.reshape_as"),
    "multiply": (lambda y: torch.multiply(y, torch.sigmoid(y)), "aten.multiply"),
    "subtract": (lambda y: torch.subtract(y, 0.5), "aten.subtract"),
    "true_divide": (lambda y: torch.true_divide(y, 3.0), "aten.true_divide"),
    "clip": (lambda y: torch.clip(y, -1, 1), "aten.clip"),
    "clip_": (lambda y: y.clone().clip_(-1, 1), "aten.clip_"),
    "exp_": (lambda y: y.clone().mul(0.1).exp_(), "aten.exp_"),
    "norm_over_hw": (lambda y: y / y.norm(2, (2, 3), keepdim=True), "aten.linalg_vector_norm"),
    "normalize_over_w": (lambda y: F.normalize(y, dim=-1), "aten.linalg_vector_norm"),
    "std_over_hw": (lambda y: y - y.std((2, 3), False, True), "aten.std"),
    "var_over_hw": (lambda y: y * y.var((2, 3), True, True), "aten.var"),
    "tensor_split_halves": (lambda y: torch.cat(torch.tensor_split(y, 2, dim=1)[::-1], 1),
                            "aten.tensor_split"),
    "roll_spatial": (lambda y: torch.roll(y, (1, -2), (2, 3)), "aten.roll"),
    "flip_channels": (lambda y: torch.flip(y, (1, 3)), "aten.flip"),
    "max_pool1d_with_indices": (
        lambda y: F.max_pool1d(y.flatten(2), 2, return_indices=True)[0].unsqueeze(-1),
        "aten.max_pool1d_with_indices"),
}

MIX_CHANNELS: dict[str, tuple[Op, str]] = {
    # the shift would wrap around fewer channels after pruning
    "roll_channels": (lambda y: torch.roll(y, 3, 1), "aten.roll"),
    "roll_flat": (lambda y: torch.roll(y, 5), "aten.roll"),
    "normalize_over_channels": (lambda y: F.normalize(y, dim=1), "aten.linalg_vector_norm"),
    "norm_over_channels": (lambda y: y / y.norm(2, 1, keepdim=True), "aten.linalg_vector_norm"),
    "var_over_channels": (lambda y: y - y.var(1, False, True), "aten.var"),
}


def _recorded(model: nn.Module, x: torch.Tensor) -> set[str]:
    gm = shrink.capture(model, x, frontend="export").graph_module
    return {str(getattr(n.target, "overloadpacket", n.target)) for n in gm.graph.nodes
            if n.op == "call_function"}


@pytest.mark.parametrize("name", sorted(KEEP_CHANNELS))
def test_aten_op_keeps_channels_prunable(name: str) -> None:
    op, aten_name = KEEP_CHANNELS[name]
    torch.manual_seed(0)
    model, x = Sandwich(op).eval(), torch.randn(2, 3, 6, 6)
    assert aten_name in _recorded(model, x)
    group = shrink.analyze(shrink.capture(model, x, frontend="export")).group("c1:out")
    assert group.pinned is None, group.pinned
    res = prune_checked(model, x, 0.5, capture="export")
    assert res.model.c1.out_channels == 8


@pytest.mark.parametrize("name", sorted(MIX_CHANNELS))
def test_aten_reduction_across_channels_keeps_them(name: str) -> None:
    op, aten_name = MIX_CHANNELS[name]
    torch.manual_seed(0)
    model, x = Sandwich(op).eval(), torch.randn(2, 3, 6, 6)
    assert aten_name in _recorded(model, x)
    # the reduced tensor, broadcast back over the channels, ties them all into one channel
    group = shrink.analyze(shrink.capture(model, x, frontend="export")).group("c1:out")
    assert group.pinned is not None or group.size == 1
    res = prune_checked(model, x, 0.5, capture="export")
    assert res.model.c1.out_channels == 16
