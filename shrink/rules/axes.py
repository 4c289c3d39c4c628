"""Ops over axes: pooling, interpolation and padding (spatial axes only), reductions and softmax.

Spatial ops act on the trailing spatial axes, so channels pass through unchanged; a spatial op
whose window would mix positions carrying different channels pins them. A reduction or softmax
over an axis pins only if, once the analysis is done, that axis really carries different
channels (a token or spatial axis does not); over the channel axis it always pins, since after
pruning it would compute something else.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from shrink.ids import Call, Ids, Tracker
from shrink.rules.base import ModuleRule
from shrink.rules.registry import register_function, register_rule
from shrink.rules.structural import fresh_like, norm_dim, pin_all, reshape_ids, shape_of


# ---------------------------------------------------------------------- spatial ops
def _spatial(t: Tracker, call: Call, nspatial: int | None) -> Any:
    x: Ids = call.args[0]
    out = call.out[0] if isinstance(call.out, tuple) else call.out
    out_shape = shape_of(out)
    k = nspatial if nspatial is not None else max(x.ndim - 2, 0)
    a = x.a
    for d in range(x.ndim - k, x.ndim):
        if a.shape[d] > 1:
            t.pin(a, f"{call.name} at {call.where} mixes positions whose channels differ")
            a = a.take([0], axis=d)
    ids = Ids(a, out_shape)
    return (ids, ids) if isinstance(call.out, tuple) else ids


def _spatial_rule(n: int | None) -> Any:
    def rule(t: Tracker, call: Call) -> Any:
        return _spatial(t, call, n)

    return rule


register_function(F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d,
                  F.lp_pool1d, F.max_pool1d_with_indices)(_spatial_rule(1))
register_function(F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d,
                  F.lp_pool2d, F.max_pool2d_with_indices)(_spatial_rule(2))
register_function(F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d,
                  F.max_pool3d_with_indices)(_spatial_rule(3))
register_function(F.interpolate, F.upsample, F.upsample_bilinear, F.upsample_nearest)(
    _spatial_rule(None)
)


@register_function(F.pad, "pad")
def pad(t: Tracker, call: Call) -> Any:
    padding = list(call.arg(1, "pad"))
    x = call.args[0]
    if not isinstance(x, Ids):
        return pin_all(t, call, "pads a value shrink cannot follow")
    # pairs run from the last axis backwards; an axis padded by (0, 0) is untouched (Swin pads
    # (B, H, W, C) with (0, 0, 0, pad_w, 0, pad_h): its channel axis passes through)
    touched = [x.ndim - 1 - k for k in range(len(padding) // 2)
               if padding[2 * k] or padding[2 * k + 1]]
    a = x.a
    for d in touched:
        if a.shape[d] > 1:
            t.pin(a, f"{call.name} at {call.where} mixes positions whose channels differ")
            a = a.take([0], axis=d)
    return Ids(a, shape_of(call.out))


_SPATIAL_MODULES: dict[type[nn.Module], int | None] = {
    nn.MaxPool1d: 1, nn.AvgPool1d: 1, nn.AdaptiveAvgPool1d: 1, nn.AdaptiveMaxPool1d: 1,
    nn.MaxPool2d: 2, nn.AvgPool2d: 2, nn.AdaptiveAvgPool2d: 2, nn.AdaptiveMaxPool2d: 2,
    nn.LPPool2d: 2, nn.MaxPool3d: 3, nn.AvgPool3d: 3, nn.AdaptiveAvgPool3d: 3,
    nn.AdaptiveMaxPool3d: 3, nn.Upsample: None, nn.UpsamplingNearest2d: 2,
    nn.UpsamplingBilinear2d: 2, nn.ZeroPad2d: 2, nn.ConstantPad1d: 1, nn.ConstantPad2d: 2,
    nn.ConstantPad3d: 3, nn.ReflectionPad1d: 1, nn.ReflectionPad2d: 2, nn.ReplicationPad1d: 1,
    nn.ReplicationPad2d: 2, nn.ReplicationPad3d: 3,
}


@register_rule(*_SPATIAL_MODULES)
class SpatialModuleRule(ModuleRule):
    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        return _spatial(t, call, _SPATIAL_MODULES.get(type(m)))


@register_rule(nn.Flatten)
class FlattenModuleRule(ModuleRule):
    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        return reshape_ids(t, call, None)


# ---------------------------------------------------------------------- reductions
_REDUCTIONS: tuple[Any, ...] = (
    torch.mean, torch.sum, torch.amax, torch.amin, torch.max, torch.min, torch.std, torch.var,
    torch.prod, torch.logsumexp, torch.norm, torch.linalg.vector_norm, torch.nansum,
    "mean", "sum", "amax", "amin", "max", "min", "std", "var", "prod", "logsumexp", "norm",
    "nansum",
)


@register_function(*_REDUCTIONS)
def reduce(t: Tracker, call: Call) -> Any:
    x = call.args[0]
    if not isinstance(x, Ids):
        return pin_all(t, call, "has no rule for these arguments")
    dims = call.arg(1, "dim")
    if isinstance(dims, Ids):  # torch.max(a, b): element-wise
        from shrink.rules.pointwise import broadcast

        return broadcast(t, call)
    keepdim = bool(call.arg(2, "keepdim", False))
    if dims is None:
        dims = tuple(range(x.ndim))
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    dims = tuple(sorted({norm_dim(int(d), x.ndim) for d in dims}))
    a = x.a
    t.pin_if_channel_axis(a, dims, f"{call.name} at {call.where} reduces across channels")
    for d in dims:
        a = a.take([0], axis=d)
    if not keepdim:
        a = a.reshape([s for d, s in enumerate(a.shape) if d not in dims])
    out = call.out
    if isinstance(out, tuple):  # values, indices
        return tuple(Ids(a, shape_of(o)) for o in out)
    return Ids(a, shape_of(out))


@register_function(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax",
                   "log_softmax", torch.cumsum, "cumsum")
def alongnorm_dim(t: Tracker, call: Call) -> Any:
    x: Ids = call.args[0]
    d = call.arg(1, "dim")
    why = f"{call.name} at {call.where} mixes values across a channel axis"
    if d is None or x.shape != shape_of(call.out):
        t.pin(x.a, why)
        if x.shape != shape_of(call.out):
            return fresh_like(t, call.out, call.name, "output of a channel-mixing op")
        return x
    t.pin_if_channel_axis(x.a, norm_dim(int(d), x.ndim), why)
    return x


@register_rule(nn.Softmax, nn.LogSoftmax)
class SoftmaxModuleRule(ModuleRule):
    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        x: Ids = call.args[0]
        d = m.dim if m.dim is not None else -1  # type: ignore[union-attr]
        t.pin_if_channel_axis(x.a, norm_dim(int(d), x.ndim),  # type: ignore[arg-type]
                              f"{fqn} ({type(m).__name__}) at {call.where} mixes channels")
        return x
