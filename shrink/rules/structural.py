"""Shape ops: concat, split/chunk, indexing, reshape/flatten/permute, pooling, reductions.

These ops move elements without mixing them, so ids move exactly as data does:

* ``cat`` concatenates ids (a consumer of ``cat([a, b])`` sees a's channels at offset 0 and b's
  at ``len(a)``); ``stack`` and the pieces of ``chunk`` must shrink identically, so their ids
  are unioned piece by piece.
* ``flatten``/``view``/``reshape`` reshape the id array: ``(C, H, W) -> C*H*W`` gives each
  channel a block of ``H*W`` positions. A *literal* size in the target shape cannot follow a
  pruned axis: if another axis can absorb the change (the ``groups`` axis of a channel
  shuffle), the literal axis is coupled so every slice shrinks identically; otherwise the
  channels are pinned.
* Slicing, ``split`` with fixed sizes, ``unbind`` and any reduction or softmax across an axis
  whose ids vary (that is, across channels) pin those channels: after pruning the code would
  compute something else.
* Pooling, interpolation and padding act on spatial axes only.
"""

from __future__ import annotations

import builtins
import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import fx, nn

from shrink.ids import Call, Ids, Tracker, compress, iter_ids, make_ids
from shrink.plan import Side
from shrink.rules.base import ModuleRule
from shrink.rules.registry import register_function, register_rule

_MAX_MATERIALISE = 64_000_000


def _shape(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def _dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def _pin_all(t: Tracker, call: Call, why: str) -> Any:
    reason = f"{call.name} at {call.where} {why}"
    for ids in iter_ids(list(call.args) + list(call.kwargs.values())):
        t.pin(ids.a, reason)
    return _fresh_like(t, call.out, call.name, reason)


def _fresh_like(t: Tracker, out: Any, label: str, reason: str) -> Any:
    if isinstance(out, torch.Tensor):
        return t.fresh_pinned(_shape(out), label, reason)
    if isinstance(out, (tuple, list)):
        return tuple(_fresh_like(t, o, label, reason) for o in out)
    return out


# ---------------------------------------------------------------------- concat / stack
@register_function(torch.cat, torch.concat, torch.concatenate)
def cat(t: Tracker, call: Call) -> Any:
    pieces = [p for p in call.arg(0, "tensors") if isinstance(p, Ids)]
    out_shape = _shape(call.out)
    dim = _dim(call.arg(1, "dim", 0), len(out_shape))
    target = [max(p.a.shape[d] for p in pieces) for d in range(len(out_shape))]
    arrays = []
    for p in pieces:
        shape = list(target)
        shape[dim] = p.shape[dim]
        arrays.append(np.broadcast_to(p.a, shape))
    return make_ids(np.concatenate(arrays, axis=dim), out_shape)


@register_function(torch.stack)
def stack(t: Tracker, call: Call) -> Any:
    pieces = [p for p in call.arg(0, "tensors") if isinstance(p, Ids)]
    out_shape = _shape(call.out)
    dim = _dim(call.arg(1, "dim", 0), len(out_shape))
    for p in pieces[1:]:
        t.union(pieces[0].a, p.a)
    return Ids(np.expand_dims(pieces[0].a, dim), out_shape)


# ---------------------------------------------------------------------- split / chunk
def _pieces(x: Ids, dim: int, outs: list[torch.Tensor]) -> tuple[Ids, ...]:
    res = []
    start = 0
    for o in outs:
        n = int(o.shape[dim])
        a = x.a if not x.varies(dim) else x.a.take(range(start, start + n), axis=dim)
        res.append(Ids(compress(a), _shape(o)))
        start += n
    return tuple(res)


def _split_like(t: Tracker, call: Call, dim: int, equal_ok: bool, why: str) -> Any:
    x: Ids = call.args[0]
    outs = list(call.out)
    dim = _dim(dim, x.ndim)
    pieces = _pieces(x, dim, outs)
    if not x.varies(dim):
        return pieces
    sizes = {int(o.shape[dim]) for o in outs}
    if equal_ok and len(sizes) == 1:
        # after pruning every piece must keep the same count: tie piece k's i-th channel to
        # piece 0's
        for p in pieces[1:]:
            t.union(pieces[0].a, p.a)
        return pieces
    reason = f"{call.name} at {call.where} {why}"
    t.pin_if_channel_axis(x.a, dim, reason)
    return pieces


@register_function(torch.chunk, "chunk")
def chunk(t: Tracker, call: Call) -> Any:
    return _split_like(t, call, call.arg(2, "dim", 0), True, "splits channels unevenly")


@register_function(torch.split, "split", torch.tensor_split, "tensor_split")
def split(t: Tracker, call: Call) -> Any:
    size_arg = call.node_arg(1, "split_size_or_sections")
    if size_arg is None:
        size_arg = call.node_arg(1, "split_size")
    dynamic = isinstance(size_arg, fx.Node)
    return _split_like(
        t, call, call.arg(2, "dim", 0), dynamic,
        "splits channels into pieces of literal sizes, which cannot follow pruning",
    )


@register_function(torch.unbind, "unbind")
def unbind(t: Tracker, call: Call) -> Any:
    x: Ids = call.args[0]
    dim = _dim(call.arg(1, "dim", 0), x.ndim)
    if x.varies(dim):
        t.pin(x.a, f"{call.name} at {call.where} unbinds a channel axis into separate tensors")
    pieces = []
    for k, o in enumerate(call.out):
        a = x.a.take([k if x.varies(dim) else 0], axis=dim)
        pieces.append(Ids(np.squeeze(a, axis=dim), _shape(o)))
    return tuple(pieces)


# ---------------------------------------------------------------------- indexing
@register_function(operator.getitem)
def getitem(t: Tracker, call: Call) -> Any:
    obj, idx = call.args[0], call.args[1]
    if not isinstance(obj, Ids):
        return obj[idx]
    items = idx if isinstance(idx, tuple) else (idx,)
    if any(i is Ellipsis for i in items):
        k = items.index(Ellipsis)
        n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
        items = items[:k] + (slice(None),) * (obj.ndim - n_real) + items[k + 1 :]
    np_idx: list[Any] = []
    d = 0
    for i in items:
        if i is None:
            np_idx.append(None)
            continue
        if not isinstance(i, (int, slice)):
            return _pin_all(t, call, "indexes a tensor with a tensor or list")
        size = obj.shape[d]
        if obj.varies(d):
            full = isinstance(i, slice) and range(size)[i] == range(size)
            if not full:
                t.pin_if_channel_axis(obj.a, d, f"{call.name} at {call.where} slices a channel "
                                      "axis with fixed bounds")
            np_idx.append(i)
        else:
            np_idx.append(0 if isinstance(i, int) else slice(None))
        d += 1
    return make_ids(obj.a[tuple(np_idx)], _shape(call.out))


# ---------------------------------------------------------------------- reshapes
def _target_args(call: Call) -> list[Any]:
    """The fx-level target shape arguments of view/reshape (Nodes or literals)."""
    node = call.node
    args = list(node.args[1:]) or list(node.kwargs.get("shape", node.kwargs.get("size", ())))
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        args = list(args[0])
    return args


_WIDTH_WORDS = ("dim", "channel", "feature", "width", "embed", "hidden", "planes")


def _size_attribute(call: Call, value: int) -> str | None:
    """``"<owner fqn>.<name>"`` when exactly one int attribute of the module whose ``forward``
    made this call equals the literal ``value`` (``self.hidden_dim``), else None."""
    stack = call.node.meta.get("nn_module_stack") or {}
    owner_fqn = ""
    if stack:
        entry = list(stack.values())[-1]
        owner_fqn = entry[0] if isinstance(entry, tuple) else str(entry)
    gm = call.node.graph.owning_module
    root = getattr(gm, "_shrink_source", None)
    try:
        owner = root.get_submodule(owner_fqn) if root is not None else None
    except AttributeError:
        return None
    if owner is None or value < 2:
        return None
    names = [k for k, v in vars(owner).items()
             if type(v) is int and v == value and not k.startswith("_")]
    if len(names) > 1:  # ViT(image_size=32, hidden_dim=32): prefer the one named like a width
        names = [k for k in names if any(h in k.lower() for h in _WIDTH_WORDS)]
    if len(names) != 1:
        return None
    return f"{owner_fqn}.{names[0]}" if owner_fqn else names[0]


def _reshape(t: Tracker, call: Call, literal_args: list[Any] | None) -> Any:
    x: Ids = call.args[0]
    out_shape = _shape(call.out)
    if int(np.prod(out_shape)) > _MAX_MATERIALISE and x.a.size > 1:
        return _pin_all(t, call, "reshapes a tensor too large to analyse")
    arr = compress(np.ascontiguousarray(x.full()).reshape(out_shape))
    if literal_args is not None and len(literal_args) == len(out_shape):
        varying = [d for d in range(len(out_shape)) if arr.shape[d] > 1]
        fixed = [
            d for d in varying
            if not isinstance(literal_args[d], fx.Node) and literal_args[d] != -1
        ]
        free = [d for d in varying if d not in fixed]
        attr = _size_attribute(call, out_shape[fixed[0]]) if len(fixed) == 1 and not free else None
        if attr is not None:
            # the literal is an int attribute of the module doing the reshape: it follows
            # pruning when rewritten to the kept count
            d = fixed[0]
            line = arr[tuple(slice(None) if k == d else slice(0, 1) for k in range(arr.ndim))]
            t.union(np.broadcast_to(line, arr.shape), arr)
            t.member(attr, Side.ATTR, line.ravel())
        elif fixed and not free:
            t.pin(arr, f"{call.name} at {call.where} reshapes channels to the literal size "
                       f"{out_shape[fixed[0]]}, which cannot follow pruning")
        elif len(free) > 1:
            t.pin(arr, f"{call.name} at {call.where} spreads channels over several computed axes")
        else:
            for d in fixed:  # e.g. the `groups` axis of a channel shuffle: tie its slices
                t.union(arr.take([0], axis=d), arr)
    return Ids(arr, out_shape)


@register_function("view", "reshape", torch.reshape)
def view(t: Tracker, call: Call) -> Any:
    return _reshape(t, call, _target_args(call))


@register_function(torch.flatten, "flatten", "squeeze", "unsqueeze", torch.squeeze,
                   torch.unsqueeze, "squeeze_", "unsqueeze_", "view_as", "reshape_as",
                   torch.ravel, "ravel")
def reshape_free(t: Tracker, call: Call) -> Any:
    return _reshape(t, call, None)


@register_function("permute", torch.permute)
def permute(t: Tracker, call: Call) -> Any:
    x: Ids = call.args[0]
    given = call.arg(1, "dims")
    dims = given if isinstance(given, (tuple, list)) else call.args[1:]
    dims = [_dim(int(d), x.ndim) for d in dims]
    return Ids(np.transpose(x.a, dims), _shape(call.out))


@register_function("transpose", torch.transpose, "swapaxes", torch.swapaxes, "transpose_")
def transpose(t: Tracker, call: Call) -> Any:
    x: Ids = call.args[0]
    d0, d1 = _dim(call.arg(1, "dim0"), x.ndim), _dim(call.arg(2, "dim1"), x.ndim)
    return Ids(np.swapaxes(x.a, d0, d1), _shape(call.out))


@register_function("t", torch.t)
def t_(t: Tracker, call: Call) -> Any:
    x: Ids = call.args[0]
    return Ids(x.a.T, _shape(call.out))


@register_function("expand", "expand_as")
def expand(t: Tracker, call: Call) -> Any:
    x: Ids = call.args[0]
    out_shape = _shape(call.out)
    a = x.a.reshape((1,) * (len(out_shape) - x.ndim) + x.a.shape)
    return Ids(a, out_shape)


# ---------------------------------------------------------------------- spatial ops
def _spatial(t: Tracker, call: Call, nspatial: int | None) -> Any:
    x: Ids = call.args[0]
    out = call.out[0] if isinstance(call.out, tuple) else call.out
    out_shape = _shape(out)
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
    padding = call.arg(1, "pad")
    return _spatial(t, call, len(padding) // 2)


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
        return _reshape(t, call, None)


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
        return _pin_all(t, call, "has no rule for these arguments")
    dims = call.arg(1, "dim")
    if isinstance(dims, Ids):  # torch.max(a, b): element-wise
        from shrink.rules.pointwise import broadcast

        return broadcast(t, call)
    keepdim = bool(call.arg(2, "keepdim", False))
    if dims is None:
        dims = tuple(range(x.ndim))
    dims = (dims,) if isinstance(dims, int) else tuple(dims)
    dims = tuple(sorted({_dim(int(d), x.ndim) for d in dims}))
    a = x.a
    t.pin_if_channel_axis(a, dims, f"{call.name} at {call.where} reduces across channels")
    for d in dims:
        a = a.take([0], axis=d)
    if not keepdim:
        a = a.reshape([s for d, s in enumerate(a.shape) if d not in dims])
    out = call.out
    if isinstance(out, tuple):  # values, indices
        return tuple(Ids(a, _shape(o)) for o in out)
    return Ids(a, _shape(out))


@register_function(F.softmax, F.log_softmax, torch.softmax, torch.log_softmax, "softmax",
                   "log_softmax", torch.cumsum, "cumsum")
def along_dim(t: Tracker, call: Call) -> Any:
    x: Ids = call.args[0]
    d = call.arg(1, "dim")
    why = f"{call.name} at {call.where} mixes values across a channel axis"
    if d is None or x.shape != _shape(call.out):
        t.pin(x.a, why)
        if x.shape != _shape(call.out):
            return _fresh_like(t, call.out, call.name, "output of a channel-mixing op")
        return x
    t.pin_if_channel_axis(x.a, _dim(int(d), x.ndim), why)
    return x


@register_rule(nn.Softmax, nn.LogSoftmax)
class SoftmaxModuleRule(ModuleRule):
    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        x: Ids = call.args[0]
        d = m.dim if m.dim is not None else -1  # type: ignore[union-attr]
        t.pin_if_channel_axis(x.a, _dim(int(d), x.ndim),  # type: ignore[arg-type]
                              f"{fqn} ({type(m).__name__}) at {call.where} mixes channels")
        return x


# ---------------------------------------------------------------------- metadata
@register_function("size", "dim", "numel", "nelement", "stride", "is_contiguous", "ndimension",
                   "get_device", builtins.len, torch.numel, "element_size")
def metadata(t: Tracker, call: Call) -> Any:
    return call.out


@register_function(builtins.getattr)
def getattr_(t: Tracker, call: Call) -> Any:
    obj, name = call.args[0], call.args[1]
    if not isinstance(call.out, torch.Tensor):
        return call.out
    if isinstance(obj, Ids) and name == "data":
        return obj
    return _pin_all(t, call, f"reads tensor attribute {name!r}, which has no rule")
