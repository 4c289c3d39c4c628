"""Normalisation layers.

BatchNorm1d/2d/3d (and InstanceNorm with per-channel affine) normalise each channel on its own,
so their one axis (dim 1 of the input, dim 0 of every parameter and running statistic) is the
same channel space as their input and output: exact under the masked oracle. So does
torchvision's FrozenBatchNorm2d.

LayerNorm and RMSNorm over one channel axis (``nn.LayerNorm(C)``, ``nn.RMSNorm(C)``, and the
channels-first ``LayerNorm2d`` of torchvision's ConvNeXt and of timm) compute statistics across
channels: removing one changes every other output, so pruning through them cannot equal the
masked original. By default their channels are still pruned, as an *inexact* group: the rebuilt
norm normalises over the kept channels, the masked oracle does the same (``mask_``), so the
rewrite is still checked exactly, and :func:`shrink.verify` measures how far the pruned model is
from the plainly masked original (``Report.deviation``). ``exact_only=True`` pins them instead.
GroupNorm loses whole groups (exact); LocalResponseNorm and multi-axis LayerNorms stay pinned.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from shrink.ids import Call, Tracker, channel_ids
from shrink.plan import Side
from shrink.rules.base import (
    Keep,
    ModuleRule,
    check_shape,
    finish,
    index,
    narrow,
    recast,
    sliced_copy,
)
from shrink.rules.pointwise import ElementwiseModuleRule
from shrink.rules.registry import register_rule, register_rule_by_name, rule_for

_STATE = ("weight", "bias", "running_mean", "running_var")


def batch_norms(model: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """The batch norms of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
            and m.track_running_stats and m.running_mean is not None]


@torch.no_grad()
def reestimate_batch_norms_(model: nn.Module, passes: Iterable[Callable[[], Any]], *,
                            whole_model: bool = False) -> int:
    """Reset the running statistics of every batch norm of ``model`` and re-estimate them as a
    cumulative average over ``passes`` (each call runs the model once), with the norms in
    training mode and, with ``whole_model``, every other module too (dropout, stochastic
    depth); the others in eval mode otherwise. Modes and momenta are restored. Returns the
    number of norms.

    Example:
        >>> reestimate_batch_norms_(copy, [lambda: copy(x) for x in calibration])
    """
    norms = batch_norms(model)
    if not norms:
        return 0
    modes = [(m, m.training) for m in model.modules()]
    momenta = [(m, m.momentum) for m in norms]
    model.train(whole_model)
    for m in norms:
        m.reset_running_stats()
        m.momentum = None   # a cumulative average
        m.train()
    try:
        for run in passes:
            run()
    finally:
        for bn, momentum in momenta:
            bn.momentum = momentum
        for mod, training in modes:
            mod.training = training
    return len(norms)


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
        bn = narrow(m, nn.modules.batchnorm._BatchNorm)
        tensors: dict[str, torch.Tensor | None] = {}
        for name in _STATE:
            old = getattr(bn, name)
            tensors[name] = None if old is None else check_shape(
                bn, name, index(old.detach(), 0, kout), (len(kout),))
        counted = bn.num_batches_tracked
        tensors["num_batches_tracked"] = None if counted is None else counted.detach().clone()
        new = recast(bn, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm),
                     tensors, num_features=len(kout))
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
        kout = keep.resolve(Side.OUT, int(m.num_features))  # type: ignore[arg-type]
        new = sliced_copy(narrow(m, nn.modules.batchnorm._BatchNorm), _STATE, 0, kout)
        new.num_features = len(kout)
        return finish(new, m)


@register_rule_by_name("torchvision.ops.misc.FrozenBatchNorm2d")
class FrozenBatchNormRule(BatchNormRule):
    """torchvision's BatchNorm with frozen statistics (the backbones of its pretrained
    detectors): the same channel axis, with all four tensors as buffers and no
    ``num_features``; rebuilt by slicing a copy."""

    def extent(self, m: nn.Module, side: Side) -> int | None:
        return _buffer_size(m) if side is Side.OUT else None

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kout = keep.resolve(Side.OUT, _buffer_size(m))
        return finish(sliced_copy(m, _STATE, 0, kout), m)


def _buffer_size(m: nn.Module) -> int:
    weight = m.get_buffer("weight")
    return int(weight.shape[0])


def inexact_member(t: Tracker, fqn: str, cid: Any, what: str) -> None:
    """The OUT channels of a layer that normalises over them: an inexact member (pruning
    changes its statistics), or pinned with ``exact_only``."""
    t.member(fqn, Side.OUT, cid)
    why = f"{what}: pruning them changes its statistics"
    if t.exact_only:
        t.pin(cid, why + " (exact_only=True keeps them)")
    else:
        t.mark_inexact(cid, why + ", so the pruned model differs from the masked original "
                       "by the deviation the report gives (exact_only=True keeps them)")


@register_rule(nn.LayerNorm, nn.RMSNorm)
@register_rule_by_name("timm.layers.norm.LayerNorm", "timm.layers.norm.LayerNormFp32",
                       "timm.layers.norm.RmsNorm", "timm.layers.norm.RmsNormFp32")
class LayerNormRule(ModuleRule):
    """LayerNorm/RMSNorm over the last axis: an inexact member (see the module docstring)."""

    exact = False
    channel_axis = -1

    def _axis(self, ndim: int, m: nn.Module | None = None) -> int:
        """The normalised (channel) axis of an ``ndim`` input of ``m``."""
        return self.channel_axis % ndim

    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        x = call.args[0]
        if len(m.normalized_shape) != 1 or len(call.args) > 1:  # type: ignore[arg-type]
            return ChannelMixingNormRule().propagate(t, fqn, m, call)
        cid = channel_ids(t, x, self._axis(x.ndim, m))
        inexact_member(t, fqn, cid, f"{fqn} ({type(m).__name__}) at {call.where} normalises "
                       "over channels")
        return x

    def extent(self, m: nn.Module, side: Side) -> int | None:
        return int(m.normalized_shape[0]) if side is Side.OUT else None  # type: ignore[index]

    def in_axis(self, m: nn.Module, ndim: int) -> int:
        return self._axis(ndim, m)

    def mask_(self, m: nn.Module, side: Side, dropped: Sequence[int]) -> None:
        """The oracle normalises over the kept channels only, as the pruned layer does."""
        n = int(self.extent(m, Side.OUT) or 0)
        gone = set(dropped)
        kept = torch.as_tensor([i for i in range(n) if i not in gone], dtype=torch.long)
        small = self.shrink(m, Keep(out=tuple(kept.tolist())))
        rule = self

        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            x = args[0]
            axis = rule._axis(x.ndim, mod)
            k = kept.to(x.device)
            # follow the oracle's dtype/device: verify re-runs it in float64 on a converted
            # copy, and `small` is not a submodule that .to() would reach
            small.to(device=x.device, dtype=x.dtype)
            y = type(small).forward(small, x.index_select(axis, k))
            return torch.zeros_like(out).index_copy(axis, k, y)

        m.register_forward_hook(hook)

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kout = keep.resolve(Side.OUT, int(m.normalized_shape[0]))  # type: ignore[index]
        new = sliced_copy(narrow(m, nn.LayerNorm), ("weight", "bias"), 0, kout)
        new.normalized_shape = (len(kout),)
        return finish(new, m)


@register_rule_by_name("torchvision.models.convnext.LayerNorm2d", "timm.layers.norm.LayerNorm2d",
                       "timm.layers.norm.LayerNorm2dFp32", "timm.layers.norm.RmsNorm2d",
                       "timm.layers.norm.RmsNorm2dFp32")
class LayerNorm2dRule(LayerNormRule):
    """Channels-first LayerNorm (normalises dim 1 of NCHW)."""

    channel_axis = 1


@register_rule(nn.GroupNorm)
@register_rule_by_name("timm.layers.norm.GroupNorm", "timm.layers.norm.GroupNorm1")
class GroupNormRule(ModuleRule):
    """GroupNorm normalises each group of ``C / G`` channels on its own: dropping a whole group
    is exact (the others' statistics do not change), dropping part of one is not. So the
    channels of each group are tied into one group channel, and the rebuilt layer has fewer
    groups of the same width.

    One group (timm's ``GroupNorm1``, MobileViTv2's norm) normalises over every channel, like a
    channels-first LayerNorm: its channels are an inexact member instead (the report gives the
    deviation; ``exact_only=True`` keeps them)."""

    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        x = call.args[0]
        cid = channel_ids(t, x, 1)
        if int(m.num_groups) == 1 and int(m.num_channels) > 1:  # type: ignore[arg-type]
            inexact_member(t, fqn, cid, f"{fqn} ({type(m).__name__}) at {call.where} "
                           "normalises over all channels")
            return x
        for block in np.split(cid, int(m.num_groups)):  # type: ignore[arg-type]
            t.union_all(block)
        t.member(fqn, Side.OUT, cid)
        return x

    def extent(self, m: nn.Module, side: Side) -> int | None:
        return int(m.num_channels) if side is Side.OUT else None  # type: ignore[arg-type]

    def exact_for(self, m: nn.Module) -> bool:
        return int(m.num_groups) != 1  # type: ignore[arg-type]

    def mask_(self, m: nn.Module, side: Side, dropped: Sequence[int]) -> None:
        if int(m.num_groups) != 1:  # type: ignore[arg-type]
            super().mask_(m, side, dropped)
            return
        # one group: the oracle normalises over the kept channels only, as the pruned layer does
        gone = set(dropped)
        kept = torch.as_tensor([i for i in range(int(m.num_channels))  # type: ignore[arg-type]
                                if i not in gone], dtype=torch.long)

        def hook(mod: nn.Module, args: tuple[Any, ...], out: torch.Tensor) -> torch.Tensor:
            x, k = args[0], kept.to(args[0].device)
            weight, bias = mod.weight, mod.bias
            w = weight.index_select(0, k) if isinstance(weight, torch.Tensor) else None
            b = bias.index_select(0, k) if isinstance(bias, torch.Tensor) else None
            y = F.group_norm(x.index_select(1, k), 1, w, b, mod.eps)  # type: ignore[arg-type]
            return torch.zeros_like(out).index_copy(1, k, y)

        m.register_forward_hook(hook)

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        c, g = int(m.num_channels), int(m.num_groups)  # type: ignore[arg-type]
        kout = keep.resolve(Side.OUT, c)
        if g == 1:
            new = sliced_copy(narrow(m, nn.GroupNorm), ("weight", "bias"), 0, kout)
            new.num_channels = len(kout)
            return finish(new, m)
        width = c // g
        if len(kout) % width or any(k // width != kout[i - i % width] // width
                                    for i, k in enumerate(kout)):
            raise ValueError(f"GroupNorm({g}, {c}) can only lose whole groups of {width} channels")
        new = sliced_copy(narrow(m, nn.GroupNorm), ("weight", "bias"), 0, kout)
        new.num_channels, new.num_groups = len(kout), len(kout) // width
        return finish(new, m)


@register_rule(nn.LocalResponseNorm)
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
