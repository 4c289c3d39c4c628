"""Normalisation layers.

BatchNorm1d/2d/3d (and InstanceNorm with per-channel affine) normalise each channel on its own,
so their one axis (dim 1 of the input, dim 0 of every parameter and running statistic) is the
same channel space as their input and output: exact under the masked oracle.

LayerNorm and GroupNorm compute statistics across channels: removing one changes every other
output, so the channels they normalise are pinned (the report names the layer).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shrink.ids import Call, Tracker, channel_ids
from shrink.plan import Side
from shrink.rules import register_rule, register_rule_by_name, rule_for
from shrink.rules.base import Keep, ModuleRule, copy_param_, finish, index
from shrink.rules.pointwise import ElementwiseModuleRule

_STATE = ("weight", "bias", "running_mean", "running_var")


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
class BatchNormRule(ModuleRule):
    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        x = call.args[0]
        t.member(fqn, Side.OUT, channel_ids(t, x, 1))
        return x

    def extent(self, m: nn.Module, side: Side) -> int | None:
        return int(m.num_features) if side is Side.OUT else None  # type: ignore[arg-type]

    def scale_params(self, m: nn.Module) -> Sequence[torch.Tensor]:
        return (m.weight,) if m.weight is not None else ()  # type: ignore[return-value]

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kout = keep.resolve(Side.OUT, m.num_features)  # type: ignore[arg-type]
        ref = m.weight if m.weight is not None else m.running_mean
        new = type(m)(
            len(kout), eps=m.eps, momentum=m.momentum, affine=m.affine,  # type: ignore[arg-type]
            track_running_stats=m.track_running_stats,  # type: ignore[arg-type]
            device=None if ref is None else ref.device,  # type: ignore[union-attr]
            dtype=None if ref is None else ref.dtype,  # type: ignore[union-attr]
        )
        for name in _STATE:
            old = getattr(m, name)
            if old is not None:
                copy_param_(getattr(new, name), index(old, 0, kout))
                if isinstance(old, nn.Parameter):
                    getattr(new, name).requires_grad_(old.requires_grad)
        if m.num_batches_tracked is not None:
            copy_param_(new.num_batches_tracked, m.num_batches_tracked)  # type: ignore[arg-type]
        return finish(new, m)


@register_rule_by_name("timm.layers.norm_act.BatchNormAct2d", "timm.layers.norm_act.BatchNormAct1d")
class BatchNormActRule(BatchNormRule):
    """timm's BatchNorm + drop + activation in one layer: exact when drop and act are
    element-wise (their own rules say so); rebuilt by slicing a copy, since the constructor
    takes the activation as a factory."""

    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        x = call.args[0]
        ids = channel_ids(t, x, 1)
        for part in ("drop", "act"):
            sub = getattr(m, part, None)
            if sub is not None and not isinstance(rule_for(sub), ElementwiseModuleRule):
                t.pin(ids, f"{fqn}.{part} ({type(sub).__name__}) is not a known element-wise op")
        t.member(fqn, Side.OUT, ids)
        return x

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kout = keep.resolve(Side.OUT, m.num_features)  # type: ignore[arg-type]
        new = copy.deepcopy(m)
        for name in _STATE:
            old = getattr(m, name)
            if old is None:
                continue
            sliced = index(old.detach(), 0, kout).clone()
            if isinstance(old, nn.Parameter):
                setattr(new, name, nn.Parameter(sliced, requires_grad=old.requires_grad))
            else:
                new.register_buffer(name, sliced)
        new.num_features = len(kout)
        return finish(new, m)


@register_rule(nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm, nn.RMSNorm)
class ChannelMixingNormRule(ModuleRule):
    """Pins the channels it normalises: statistics over channels are not channel-separable."""

    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        x = call.args[0]
        reason = (
            f"{fqn} ({type(m).__name__}) at {call.where} computes statistics across channels, "
            "so removing a channel changes the others"
        )
        t.pin(x.a, reason)
        return x
