"""Convolutions: Conv1d/2d/3d and ConvTranspose1d/2d/3d.

* ``groups == 1``: OUT channels are fresh (weight dim 0, bias), IN channels are consumed
  (weight dim 1). The conv mixes channels, so the masked oracle zeroes its dropped inputs.
* depthwise (``groups == in_channels``, ``out = k * in``): output channel ``o`` reads only input
  ``o // k``, so IN and OUT are one channel space: output ``o`` carries the id of input ``o // k``.
* grouped (``1 < groups < in_channels``), two modes (``Tracker.grouped_convs``):
  ``"channels"`` (default) keeps IN and OUT separate spaces with a block constraint on each side
  (every conv group keeps the same number of channels) and keeps ``groups``; ``"groups"`` ties
  the input and output channels of each conv group into one group channel, so whole conv groups
  go and the rebuilt layer has fewer groups of the same width. On onnxruntime's CPU provider
  (1 thread, regnet_y_400mf at 0.5) "channels" ran 2.73-2.83x faster than dense and "groups"
  2.28-2.40x (2.42-2.61x unrounded), so "channels" is the default.
* ConvTranspose: weight is ``[in, out // groups, *k]``; only ``groups == 1`` is prunable.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from shrink.errors import PlanError
from shrink.ids import Call, Tracker, channel_ids, ids_on_axis
from shrink.plan import Side
from shrink.rules.base import (
    Keep,
    LayerOp,
    ModuleRule,
    check_shape,
    finish,
    index,
    narrow,
    recast,
)
from shrink.rules.registry import register_rule

_ConvNd = nn.Conv1d | nn.Conv2d | nn.Conv3d


def _channel_dim(m: nn.Module, ndim: int) -> int:
    return ndim - (len(m.kernel_size) + 1)  # type: ignore[arg-type]


def _kind(m: Any) -> str:
    if m.groups == 1:
        return "dense"
    if m.groups == m.in_channels:
        return "depthwise"
    return "grouped"


_DEFAULT_SPATIAL = {1: (1024,), 2: (224, 224), 3: (16, 112, 112)}


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
class ConvRule(ModuleRule):
    def example_input_shape(self, m: nn.Module) -> tuple[int, ...] | None:
        return (1, int(m.in_channels), *_DEFAULT_SPATIAL[len(m.kernel_size)])  # type: ignore[arg-type]

    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        x = call.args[0]
        cdim = _channel_dim(m, x.ndim)
        in_ids = channel_ids(t, x, cdim)
        t.member(fqn, Side.IN, in_ids)
        kind = _kind(m)
        if kind == "depthwise":
            out_ids = np.repeat(in_ids, m.out_channels // m.in_channels)  # type: ignore[operator]
        else:
            out_ids = t.fresh(m.out_channels, f"{fqn}:out")  # type: ignore[arg-type]
        if kind == "grouped" and t.grouped_convs == "groups":
            g = int(m.groups)  # type: ignore[arg-type]
            for a, b in zip(np.split(in_ids, g), np.split(out_ids, g), strict=True):
                t.union_all(np.concatenate([a, b]))
        elif kind == "grouped":
            t.block_constraint(fqn, in_ids, m.groups)  # type: ignore[arg-type]
            t.block_constraint(fqn, out_ids, m.groups)  # type: ignore[arg-type]
        t.member(fqn, Side.OUT, out_ids)
        return ids_on_axis(out_ids, tuple(call.out.shape), cdim)

    def extent(self, m: nn.Module, side: Side) -> int | None:
        return int(m.in_channels if side is Side.IN else m.out_channels)  # type: ignore[arg-type]

    def score_params(self, m: nn.Module, side: Side) -> Sequence[tuple[torch.Tensor, int]]:
        if side is Side.OUT:
            return ((m.weight, 0),)  # type: ignore[return-value]
        return ((m.weight, 1),) if _kind(m) == "dense" else ()  # type: ignore[return-value]

    def input_weights(self, m: nn.Module) -> Sequence[tuple[torch.Tensor, int]]:
        return ((m.weight, 1),) if _kind(m) == "dense" else ()  # type: ignore[return-value]

    def in_axis(self, m: nn.Module, ndim: int) -> int:
        return _channel_dim(m, ndim)

    def layer_op(self, m: nn.Module, input_shape: tuple[int, ...]) -> LayerOp | None:
        c = narrow(m, nn.modules.conv._ConvNd)
        n = len(c.kernel_size)
        if len(input_shape) < n + 1:
            return None
        return LayerOp("conv", int(c.in_channels), int(c.out_channels),
                       spatial=tuple(int(d) for d in input_shape[-n:]),
                       kernel=tuple(c.kernel_size), stride=tuple(c.stride),
                       pads=_onnx_pads(c), dilation=tuple(c.dilation), groups=int(c.groups),
                       bias=c.bias is not None)

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kin = keep.resolve(Side.IN, m.in_channels)  # type: ignore[arg-type]
        kout = keep.resolve(Side.OUT, m.out_channels)  # type: ignore[arg-type]
        kind = _kind(m)
        groups = {"dense": 1, "depthwise": len(kin), "grouped": 0}[kind] \
            or _kept_groups(m, kin, kout)
        c = narrow(m, nn.modules.conv._ConvNd)
        if len(kin) % groups or len(kout) % groups:
            raise ValueError(f"in_channels ({len(kin)}) and out_channels ({len(kout)}) must be "
                             f"divisible by groups ({groups})")
        w = index(c.weight, 0, kout)
        if kind == "dense":
            w = index(w, 1, kin)
        elif kind == "grouped":
            cols = _grouped_columns(m, kin, kout, w.shape)
            w = w.gather(1, cols) if cols.numel() else w
        tensors = {
            "weight": check_shape(c, "weight", w, (len(kout), len(kin) // groups,
                                                   *c.kernel_size)),
            "bias": None if c.bias is None else index(c.bias, 0, kout),
        }
        new = recast(c, (nn.Conv1d, nn.Conv2d, nn.Conv3d), tensors, in_channels=len(kin),
                     out_channels=len(kout), groups=groups)
        return finish(new, m)


def _onnx_pads(c: nn.modules.conv._ConvNd) -> tuple[int, ...]:
    """ONNX ``pads`` (all begins, then all ends) of a conv; ``padding="same"`` pads the extra
    element at the end, as PyTorch does."""
    if isinstance(c.padding, str):
        if c.padding == "valid":
            return (0,) * (2 * len(c.kernel_size))
        total = [d * (k - 1) for d, k in zip(c.dilation, c.kernel_size, strict=True)]
        return (*(t // 2 for t in total), *(t - t // 2 for t in total))
    pads = tuple(int(p) for p in c.padding)
    return pads + pads


def _kept_groups(m: Any, kin: list[int], kout: list[int]) -> int:
    """Conv groups that keep channels; each must keep the same number of inputs and outputs."""
    g = m.groups
    ipg, opg = m.in_channels // g, m.out_channels // g
    ins = np.bincount(np.asarray(kin, dtype=np.int64) // ipg, minlength=g)
    outs = np.bincount(np.asarray(kout, dtype=np.int64) // opg, minlength=g)
    used = (ins > 0) | (outs > 0)  # the conv groups that keep an input or an output
    shapes = set(zip(ins[used].tolist(), outs[used].tolist(), strict=True))
    if len(shapes) != 1 or 0 in next(iter(shapes)):
        raise PlanError(
            f"{type(m).__name__}(groups={g}): the plan keeps unequal channel counts per conv "
            f"group {sorted(shapes)}; grouped convs need equal (inputs, outputs) in every kept "
            "group. Re-create the plan with shrink.select."
        )
    return int(used.sum())


def _grouped_columns(m: Any, kin: list[int], kout: list[int], wshape: torch.Size) -> torch.Tensor:
    """For each kept output, the local columns of the inputs kept in its conv group."""
    g = m.groups
    ipg, opg = m.in_channels // g, m.out_channels // g
    # (checked by _kept_groups: every conv group that keeps an output keeps the same number
    # n of inputs, and no other group keeps one)
    inputs = np.asarray(kin, dtype=np.int64)
    of = inputs // ipg
    groups = np.unique(of)
    n = len(kin) // len(groups)
    if n == ipg:
        return torch.empty(0)  # whole groups: every column stays
    # row k: the columns group groups[k] keeps, in the order of kin
    local = (inputs[np.argsort(of, kind="stable")] % ipg).reshape(len(groups), n)
    rows = local[np.searchsorted(groups, np.asarray(kout, dtype=np.int64) // opg)]
    idx = torch.from_numpy(rows).to(m.weight.device)
    return idx.reshape(len(kout), -1, *([1] * (len(wshape) - 2))).expand(
        len(kout), n, *wshape[2:]
    )


@register_rule(nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
class ConvTransposeRule(ModuleRule):
    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        x = call.args[0]
        cdim = _channel_dim(m, x.ndim)
        in_ids = channel_ids(t, x, cdim)
        if m.groups != 1 or len(call.args) > 1 or call.kwargs:
            reason = (
                f"{fqn} ({type(m).__name__}) with groups={m.groups} or an output_size argument "
                "is not prunable yet"
            )
            t.pin(in_ids, reason)
            return t.fresh_pinned(tuple(call.out.shape), f"{fqn}:out", reason)
        t.member(fqn, Side.IN, in_ids)
        out_ids = t.fresh(m.out_channels, f"{fqn}:out")  # type: ignore[arg-type]
        t.member(fqn, Side.OUT, out_ids)
        return ids_on_axis(out_ids, tuple(call.out.shape), cdim)

    def extent(self, m: nn.Module, side: Side) -> int | None:
        return int(m.in_channels if side is Side.IN else m.out_channels)  # type: ignore[arg-type]

    def score_params(self, m: nn.Module, side: Side) -> Sequence[tuple[torch.Tensor, int]]:
        return ((m.weight, 1 if side is Side.OUT else 0),)  # type: ignore[return-value]

    def in_axis(self, m: nn.Module, ndim: int) -> int:
        return _channel_dim(m, ndim)

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kin = keep.resolve(Side.IN, m.in_channels)  # type: ignore[arg-type]
        kout = keep.resolve(Side.OUT, m.out_channels)  # type: ignore[arg-type]
        c = narrow(m, nn.modules.conv._ConvTransposeNd)
        w = index(index(c.weight, 0, kin), 1, kout)  # (in, out / groups, *kernel); groups 1
        tensors = {
            "weight": check_shape(c, "weight", w, (len(kin), len(kout), *c.kernel_size)),
            "bias": None if c.bias is None else index(c.bias, 0, kout),
        }
        new = recast(c, (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d), tensors,
                     in_channels=len(kin), out_channels=len(kout))
        return finish(new, m)
