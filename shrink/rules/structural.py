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
from torch import fx

from shrink.ids import Call, Ids, Tracker, compress, iter_ids, make_ids
from shrink.plan import Side
from shrink.rules.registry import register_function

_MAX_MATERIALISE = 64_000_000


def shape_of(x: Any) -> tuple[int, ...]:
    return tuple(int(s) for s in x.shape)


def norm_dim(d: int, ndim: int) -> int:
    return d % ndim if ndim else 0


def pin_all(t: Tracker, call: Call, why: str) -> Any:
    reason = f"{call.name} at {call.where} {why}"
    for ids in iter_ids(list(call.args) + list(call.kwargs.values())):
        t.pin(ids.a, reason)
    return fresh_like(t, call.out, call.name, reason)


def fresh_like(t: Tracker, out: Any, label: str, reason: str) -> Any:
    if isinstance(out, torch.Tensor):
        return t.fresh_pinned(shape_of(out), label, reason)
    if isinstance(out, (tuple, list)):
        return tuple(fresh_like(t, o, label, reason) for o in out)
    return out


# ---------------------------------------------------------------------- concat / stack
@register_function(torch.cat, torch.concat, torch.concatenate)
def cat(t: Tracker, call: Call) -> Any:
    out_shape = shape_of(call.out)
    # torch.cat skips empty 1-d tensors (an empty KV cache), whatever the others' rank
    pieces = [p for p in call.arg(0, "tensors") if isinstance(p, Ids)
              and not (p.shape == (0,) and len(out_shape) != 1)]
    dim = norm_dim(call.arg(1, "dim", 0), len(out_shape))
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
    out_shape = shape_of(call.out)
    dim = norm_dim(call.arg(1, "dim", 0), len(out_shape))
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
        res.append(Ids(compress(a), shape_of(o)))
        start += n
    return tuple(res)


def _split_like(t: Tracker, call: Call, dim: int, equal_ok: bool, why: str) -> Any:
    x: Ids = call.args[0]
    outs = list(call.out)
    dim = norm_dim(dim, x.ndim)
    pieces = _pieces(x, dim, outs)
    if not x.varies(dim):
        return pieces
    sizes = {int(o.shape[dim]) for o in outs}
    attr = _size_attribute(call, next(iter(sizes))) if len(sizes) == 1 else None
    if (equal_ok or attr is not None) and len(sizes) == 1:
        # after pruning every piece must keep the same count: tie piece k's i-th channel to
        # piece 0's
        for p in pieces[1:]:
            t.union(pieces[0].a, p.a)
        if attr is not None:
            # the piece size is an int attribute of the module splitting (Ultralytics' C2f and
            # C2PSA: ``split((self.c, self.c), 1)``): it is rewritten to the kept count
            line = pieces[0].a[tuple(slice(None) if k == dim else 0
                                     for k in range(pieces[0].a.ndim))]
            t.member(attr, Side.ATTR, line.ravel())
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
    dim = norm_dim(call.arg(1, "dim", 0), x.ndim)
    if x.varies(dim):
        t.pin(x.a, f"{call.name} at {call.where} unbinds a channel axis into separate tensors")
    pieces = []
    for k, o in enumerate(call.out):
        a = x.a.take([k if x.varies(dim) else 0], axis=dim)
        pieces.append(Ids(np.squeeze(a, axis=dim), shape_of(o)))
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
            return pin_all(t, call, "indexes a tensor with a tensor or list")
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
    return make_ids(obj.a[tuple(np_idx)], shape_of(call.out))


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


def _line(a: np.ndarray, d: int) -> np.ndarray:
    return a[tuple(slice(None) if k == d else 0 for k in range(a.ndim))]


def _kept_axis_in_export(call: Call, x: Ids, arr: np.ndarray, d: int) -> bool:
    """In a torch.export graph every size is a literal, even ``C = x.shape[1]``. An output axis
    that carries exactly the channels of one input axis, in order, is taken to be computed
    from that axis's size (it follows pruning); a true literal there makes the pruned model
    compute something else, which the shape probe or the oracle catches."""
    gm = call.node.graph.owning_module
    if getattr(gm, "_shrink_frontend", "fx") != "export":
        return False
    out_line = _line(arr, d)
    if len(np.unique(out_line)) != len(out_line):
        return False
    return any(x.a.shape[k] == len(out_line) and np.array_equal(_line(x.a, k), out_line)
               for k in range(x.a.ndim))


def reshape_ids(t: Tracker, call: Call, literal_args: list[Any] | None) -> Any:
    x: Ids = call.args[0]
    out_shape = shape_of(call.out)
    if int(np.prod(out_shape)) > _MAX_MATERIALISE and x.a.size > 1:
        return pin_all(t, call, "reshapes a tensor too large to analyse")
    arr = compress(np.ascontiguousarray(x.full()).reshape(out_shape))
    if literal_args is not None and len(literal_args) == len(out_shape):
        varying = [d for d in range(len(out_shape)) if arr.shape[d] > 1]
        fixed = [
            d for d in varying
            if not isinstance(literal_args[d], fx.Node) and literal_args[d] != -1
            and not _kept_axis_in_export(call, x, arr, d)
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
    return reshape_ids(t, call, _target_args(call))


@register_function(torch.flatten, "flatten", "squeeze", "unsqueeze", torch.squeeze,
                   torch.unsqueeze, "squeeze_", "unsqueeze_", "view_as", "reshape_as",
                   torch.ravel, "ravel")
def reshape_free(t: Tracker, call: Call) -> Any:
    return reshape_ids(t, call, None)


@register_function("permute", torch.permute)
def permute(t: Tracker, call: Call) -> Any:
    x: Ids = call.args[0]
    given = call.arg(1, "dims")
    dims = given if isinstance(given, (tuple, list)) else call.args[1:]
    dims = [norm_dim(int(d), x.ndim) for d in dims]
    return Ids(np.transpose(x.a, dims), shape_of(call.out))


@register_function("transpose", torch.transpose, "swapaxes", torch.swapaxes, "transpose_")
def transpose(t: Tracker, call: Call) -> Any:
    x: Ids = call.args[0]
    d0, d1 = norm_dim(call.arg(1, "dim0"), x.ndim), norm_dim(call.arg(2, "dim1"), x.ndim)
    return Ids(np.swapaxes(x.a, d0, d1), shape_of(call.out))


@register_function("t", torch.t)
def t_(t: Tracker, call: Call) -> Any:
    x: Ids = call.args[0]
    return Ids(x.a.T, shape_of(call.out))


@register_function("expand", "expand_as")
def expand(t: Tracker, call: Call) -> Any:
    x: Ids = call.args[0]
    out_shape = shape_of(call.out)
    a = x.a.reshape((1,) * (len(out_shape) - x.ndim) + x.a.shape)
    return Ids(a, out_shape)


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
    return pin_all(t, call, f"reads tensor attribute {name!r}, which has no rule")
