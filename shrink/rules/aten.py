"""ATen ops, as torch.export records them: the same semantics as the torch-level rules.

The torch.export front-end (:mod:`shrink.capture_export`) keeps every module that has a rule as
one ``call_module`` node; what runs outside those modules is ATen ops. Most are the torch-level
functions under another name, so they share the rules of :mod:`~shrink.rules.structural`,
:mod:`~shrink.rules.pointwise` and :mod:`~shrink.rules.axes`. Rules are registered on the
overload packet (``aten.view``), so every overload (``aten.view.default``) finds them.

One difference matters: export records every size as a literal, even one forward computed from
a tensor's shape (``x.view(b, c // 2, -1)`` records ``[1, 32, -1]``), so a reshape or split that
depends on a channel count cannot be told from one with a fixed size. The rules treat an equal
split as a chunk (pieces shrink together) and a literal reshape size as fixed; where that guess
is wrong, the pruned model does not fit and the shape probe pins those channels.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import torch

from shrink.ids import Call, Ids, Tracker, make_ids
from shrink.rules import axes, pointwise, structural
from shrink.rules.registry import register_function
from shrink.rules.structural import norm_dim, reshape_ids

aten = torch.ops.aten


def _packets(*names: str) -> list[Any]:
    """The overload packets that exist in this torch version (older ones lack a few)."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


register_function(*_packets(
    "relu", "relu_", "relu6", "silu", "silu_", "gelu", "gelu_", "sigmoid", "sigmoid_", "tanh",
    "tanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "leaky_relu",
    "leaky_relu_", "elu", "elu_", "selu", "celu", "mish", "mish_", "softplus", "hardtanh",
    "hardtanh_", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clamp_max_", "exp",
    "log", "sqrt", "rsqrt", "abs", "neg", "erf", "sign", "floor", "ceil", "round", "reciprocal",
    "square", "contiguous", "clone", "detach", "detach_", "alias", "lift_fresh_copy",
    "_to_copy", "to", "type_as", "dropout", "feature_dropout", "alpha_dropout", "nan_to_num",
    "zeros_like", "ones_like", "empty_like", "full_like", "rand_like", "randn_like",
    "logical_not", "bitwise_not", "log_sigmoid", "erfc", "expm1", "log1p", "sin", "cos",
    "clip", "clip_", "exp_", "log_", "sqrt_", "rsqrt_", "abs_", "neg_", "erf_", "sign_",
    "floor_", "ceil_", "round_", "reciprocal_", "square_", "nan_to_num_", "sin_", "cos_",
    "selu_", "celu_", "feature_alpha_dropout",
))(pointwise.unary)

register_function(*_packets(
    "add", "add_", "sub", "sub_", "rsub", "mul", "mul_", "div", "div_", "maximum", "minimum",
    "pow", "pow_", "where", "lerp", "addcmul", "eq", "ne", "gt", "ge", "lt", "le",
    "logical_and", "logical_or", "bitwise_and", "bitwise_or", "remainder", "fmod",
    "floor_divide", "masked_fill", "masked_fill_", "copysign", "atan2", "multiply", "multiply_",
    "subtract", "subtract_", "true_divide", "true_divide_",
))(pointwise.broadcast)

register_function(*_packets("view", "reshape", "_unsafe_view"))(structural.view)
register_function(*_packets("flatten", "squeeze", "squeeze_", "unsqueeze", "unsqueeze_",
                            "ravel", "view_as", "reshape_as"))(structural.reshape_free)
register_function(*_packets("permute"))(structural.permute)
register_function(*_packets("transpose", "transpose_", "swapaxes"))(structural.transpose)
register_function(*_packets("t", "numpy_T"))(structural.t_)
register_function(*_packets("expand", "expand_as"))(structural.expand)
register_function(*_packets("cat", "concat", "concatenate"))(structural.cat)
register_function(*_packets("stack"))(structural.stack)
register_function(*_packets("unbind"))(structural.unbind)
register_function(*_packets(
    "mean", "sum", "amax", "amin", "max", "min", "prod", "logsumexp", "nansum",
))(axes.reduce)
register_function(*_packets("softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum"))(
    axes.alongnorm_dim
)
register_function(*_packets(
    "max_pool1d", "max_pool1d_with_indices", "avg_pool1d", "adaptive_avg_pool1d",
    "adaptive_max_pool1d",
))(axes._spatial_rule(1))
register_function(*_packets(
    "max_pool2d", "max_pool2d_with_indices", "avg_pool2d", "adaptive_avg_pool2d",
    "_adaptive_avg_pool2d", "adaptive_max_pool2d",
))(axes._spatial_rule(2))
register_function(*_packets(
    "max_pool3d", "max_pool3d_with_indices", "avg_pool3d", "adaptive_avg_pool3d",
    "_adaptive_avg_pool3d", "adaptive_max_pool3d",
))(axes._spatial_rule(3))
register_function(*_packets(
    "upsample_nearest1d", "upsample_nearest2d", "upsample_nearest3d", "upsample_linear1d",
    "upsample_bilinear2d", "upsample_bicubic2d", "upsample_trilinear3d",
    "_upsample_nearest_exact1d", "_upsample_nearest_exact2d", "_upsample_nearest_exact3d",
    "_upsample_bilinear2d_aa", "_upsample_bicubic2d_aa",
))(axes._spatial_rule(None))
register_function(*_packets("pad", "constant_pad_nd", "reflection_pad1d", "reflection_pad2d",
                            "replication_pad1d", "replication_pad2d", "replication_pad3d"))(
    axes.pad
)
register_function(*_packets(
    "_assert_tensor_metadata", "_assert_scalar", "_assert_async", "sym_size", "sym_numel",
    "sym_stride", "sym_storage_offset", "sym_constrain_range", "sym_constrain_range_for_size",
))(structural.metadata)


@register_function(*_packets("chunk"))
def chunk(t: Tracker, call: Call) -> Any:
    return structural._split_like(t, call, call.arg(2, "dim", 0), True,
                                  "splits channels unevenly")


@register_function(*_packets("split", "split_with_sizes", "unsafe_split",
                             "unsafe_split_with_sizes", "tensor_split"))
def split(t: Tracker, call: Call) -> Any:
    """Pieces of equal size shrink together, as a chunk's do (export cannot say whether the
    size was a literal or computed from the tensor's shape; a literal one fails the probe).
    ``tensor_split(x, n, dim)`` is a chunk; its split-index overload, a split."""
    return structural._split_like(
        t, call, call.arg(2, "dim", 0), True,
        "splits channels into pieces of unequal sizes, which cannot follow pruning",
    )


@register_function(*_packets("std", "var"))
def std_var(t: Tracker, call: Call) -> Any:
    """``aten.std``/``aten.var``: the ``.dim`` overloads take ``unbiased`` before ``keepdim``
    (``var.dim(x, dim, unbiased, keepdim)``) and ``.default`` takes only ``unbiased`` (every
    axis), where :func:`~shrink.rules.axes.reduce` reads ``(x, dim, keepdim)``."""
    overload = getattr(call.node.target, "_overloadname", "")
    x, rest = call.args[0], call.args[1:]
    if overload == "default":
        rest = ()
    elif overload == "dim":
        rest = rest[:1] + rest[2:3]
    return axes.reduce(t, dataclasses.replace(call, args=(x, *rest)))


@register_function(*_packets("linalg_vector_norm", "norm"))
def vector_norm(t: Tracker, call: Call) -> Any:
    """``aten.linalg_vector_norm(x, ord, dim, keepdim)`` and ``aten.norm(x, p, dim, keepdim)``
    (``F.normalize``, ``x.norm(dim=1)``): a reduction whose order comes before its axes."""
    return axes.reduce(t, dataclasses.replace(call, args=(call.args[0], *call.args[2:])))


@register_function(*_packets("unflatten"))
def unflatten(t: Tracker, call: Call) -> Any:
    """``aten.unflatten(x, dim, sizes)``: a reshape whose new axes have literal sizes."""
    x: Ids = call.args[0]
    dim = norm_dim(int(call.arg(1, "dim")), x.ndim)
    sizes = list(call.arg(2, "sizes"))
    literal = [-1] * dim + sizes + [-1] * (x.ndim - dim - 1)
    return reshape_ids(t, call, literal)


def _along(t: Tracker, call: Call, dim: int, index: int | slice) -> Any:
    """Index one axis (``aten.slice``/``aten.select``): the getitem rule on ``x[..., index]``."""
    x = call.args[0]
    if not isinstance(x, Ids):
        return structural.pin_all(t, call, "indexes a value shrink cannot follow")
    idx = (slice(None),) * norm_dim(dim, x.ndim) + (index,)
    return structural.getitem(t, dataclasses.replace(call, args=(x, idx)))


@register_function(*_packets("slice"))
def slice_(t: Tracker, call: Call) -> Any:
    x = call.args[0]
    start, end, step = call.arg(2, "start"), call.arg(3, "end"), call.arg(4, "step", 1)
    if isinstance(x, Ids) and end is not None and end > x.shape[norm_dim(call.arg(1, "dim", 0),
                                                                          x.ndim)]:
        end = None  # INT64_MAX: to the end
    return _along(t, call, int(call.arg(1, "dim", 0)), slice(start, end, step))


@register_function(*_packets("select"))
def select(t: Tracker, call: Call) -> Any:
    return _along(t, call, int(call.arg(1, "dim")), int(call.arg(2, "index")))


@register_function(*_packets("new_full", "new_zeros", "new_ones", "new_empty", "new_tensor",
                             "new_empty_strided"))
def new_tensor(t: Tracker, call: Call) -> Any:
    """``x.new_zeros(size)``: only ``x``'s dtype and device are used, so ``x``'s channels are
    free; the new tensor has a literal size, so its own channels stay."""
    return structural.fresh_like(t, call.out, call.name,
                                 f"{call.name} at {call.where} makes a tensor of literal size")


@register_function(*_packets("roll"), torch.roll, "roll")
def roll(t: Tracker, call: Call) -> Any:
    """``roll(x, shifts, dims)`` along axes the channel ids do not vary on (Swin's spatial
    shift) leaves them as they are. Rolled along a channel axis, the shift would wrap around a
    different number of channels once some are pruned, so those channels stay."""
    x = call.args[0]
    if not isinstance(x, Ids):
        return None
    shifts, dims = call.arg(1, "shifts"), call.arg(2, "dims", ())
    full = x.full()
    flat = dims in (None, (), [])
    rolled_dims = range(x.ndim) if flat else [
        norm_dim(int(d), x.ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if any(x.varies(d) for d in rolled_dims):
        t.pin(x.a, f"{call.name} at {call.where} rolls along a channel axis: its shift would "
                   "wrap around fewer channels once some are pruned")
    if flat:
        rolled = np.roll(full.ravel(), int(shifts if not isinstance(shifts, (list, tuple))
                                           else shifts[0])).reshape(full.shape)
    else:
        sh = tuple(int(s) for s in (shifts if isinstance(shifts, (list, tuple)) else [shifts]))
        ds = tuple(int(d) for d in (dims if isinstance(dims, (list, tuple)) else [dims]))
        rolled = np.roll(full, sh, ds)
    return make_ids(rolled, x.shape)


@register_function(*_packets("flip"), torch.flip, "flip")
def flip(t: Tracker, call: Call) -> Any:
    """``flip(x, dims)`` reverses ``dims``: channel ids move with their elements (reversing the
    kept channels of a pruned axis is the same reversal restricted to them, so it is exact)."""
    x = call.args[0]
    if not isinstance(x, Ids):
        return None
    dims = call.arg(1, "dims")
    ds = tuple(int(d) for d in (dims if isinstance(dims, (list, tuple)) else [dims]))
    return make_ids(np.flip(x.full(), ds), x.shape)
