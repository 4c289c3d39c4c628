"""Shape-only runs on the meta device, without torch's slowest meta kernels.

The analysis, the shape probe and the MAC counter run whole models on the meta device. Most
aten ops compute their meta result in C++, but eval-mode batch norm and the clamping
activations (``hardtanh`` = ReLU6, ``hardswish``, ``hardsigmoid``) go through Python
decompositions that cost 0.5-2 ms a call: a meta forward of MobileNetV2 took 70 ms, four times
its real forward. :func:`fast_meta` answers those ops directly, for the cases where the result
is plain to state:

* a pointwise op of one tensor: a new tensor like its input (or the input itself, in place);
* ``add``/``sub``/``mul``/``div`` of two tensors of one dtype: the broadcast shape;
* eval-mode batch norm: the input's shape, after checking that every per-channel tensor has
  ``input.size(1)`` elements;
* ``mean`` over some dims, and ``cat`` of tensors of one dtype and rank that agree off the
  concatenated dim;
* a convolution (not transposed) of a contiguous input and weight: its output shape, and with
  ``count`` its flops by FlopCounterMode's own formula;
* ``mm`` and ``addmm`` (a Linear layer on a batch of vectors) of two matrices of one dtype,
  of any strides (the weight comes transposed): the contiguous ``(n, p)`` result, counted by
  the registry's formula (the default meta ``addmm`` is a Python decomposition: 0.7 ms a
  call).

Only contiguous meta tensors of the exact class ``torch.Tensor`` (or ``nn.Parameter``) take
these paths, where the default kernel also returns contiguous results; anything else, and any
case that would raise, goes to the default kernel, so errors (which the shape probe reports)
read as before.
``tests/unit/test_fastmeta.py`` checks each path against the default kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

_UNARY = {
    aten.hardtanh.default, aten.hardswish.default, aten.hardsigmoid.default,
    aten.relu.default, aten.silu.default, aten.sigmoid.default, aten.gelu.default,
}
_UNARY_INPLACE = {
    aten.hardtanh_.default, aten.hardswish_.default, aten.hardsigmoid_.default,
    aten.relu_.default, aten.silu_.default, aten.sigmoid_.default,
}
_BINARY = {aten.add.Tensor, aten.sub.Tensor, aten.mul.Tensor, aten.div.Tensor}
_BINARY_INPLACE = {aten.add_.Tensor, aten.sub_.Tensor, aten.mul_.Tensor, aten.div_.Tensor}
_BATCH_NORM = {aten.native_batch_norm.default,
               aten._native_batch_norm_legit_no_training.default}


_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _plain(t: Any) -> bool:
    return type(t) in _PLAIN and t.is_meta and t.is_contiguous()


def _like(x: torch.Tensor) -> torch.Tensor:
    """``torch.empty_like(x)`` of a dense meta tensor (same shape, strides and dtype), without
    the Python meta kernel that makes ``empty_like`` cost 60 us a call on meta."""
    return torch.empty_strided(x.shape, x.stride(), dtype=x.dtype, device="meta")


def _fast(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The result of ``func`` when it is one of the simple cases, else ``NotImplemented``."""
    if func in _UNARY or func in _UNARY_INPLACE:
        x = args[0]
        if not (_plain(x) and x.is_floating_point()):
            return NotImplemented
        return x if func in _UNARY_INPLACE else _like(x)
    if func in _BINARY or func in _BINARY_INPLACE:
        if len(args) != 2 or not all(_plain(a) and a.is_floating_point() for a in args):
            return NotImplemented
        a, b = args
        if a.dtype != b.dtype:
            return NotImplemented
        try:
            shape = torch.broadcast_shapes(a.shape, b.shape)
        except RuntimeError:
            return NotImplemented  # the default kernel raises the user-facing error
        if func in _BINARY_INPLACE:
            return a if shape == a.shape else NotImplemented
        return torch.empty(shape, dtype=a.dtype, device="meta")
    if func in _BATCH_NORM:
        return _batch_norm(func, args, kwargs)
    if func is aten.mean.dim:
        return _mean(*args, **kwargs)
    if func is aten.cat.default:
        return _cat(*args, **kwargs)
    return NotImplemented


def _mean(x: Any, dim: Any = None, keepdim: bool = False, *, dtype: Any = None) -> Any:
    if dtype is not None or not (_plain(x) and x.is_floating_point() and x.dim() > 0):
        return NotImplemented
    n = x.dim()
    if dim is None or len(dim) == 0:
        dims = set(range(n))
    elif all(isinstance(d, int) and -n <= d < n for d in dim):
        dims = {d % n for d in dim}
        if len(dims) != len(dim):
            return NotImplemented  # a dim listed twice: the default kernel raises
    else:
        return NotImplemented
    shape = [1 if d in dims else s for d, s in enumerate(x.shape) if keepdim or d not in dims]
    return torch.empty(shape, dtype=x.dtype, device="meta")


def _cat(tensors: Any, dim: int = 0) -> Any:
    if not tensors or not all(_plain(t) for t in tensors):
        return NotImplemented
    first = tensors[0]
    n = first.dim()
    if n == 0 or not isinstance(dim, int) or not -n <= dim < n:
        return NotImplemented
    d = dim % n
    for t in tensors:
        if t.dtype != first.dtype or t.dim() != n or any(
                a != b for k, (a, b) in enumerate(zip(t.shape, first.shape, strict=True))
                if k != d):
            return NotImplemented
    shape = list(first.shape)
    shape[d] = sum(t.shape[d] for t in tensors)
    return torch.empty(shape, dtype=first.dtype, device="meta")


def _conv(x: Any, w: Any, bias: Any, stride: Any, padding: Any, dilation: Any,
          transposed: Any, output_padding: Any, groups: Any) -> Any:
    """``aten.convolution`` of a contiguous meta input and weight (not transposed): the output
    shape of ``meta_conv``, whose Python costs half a meta forward of a conv net."""
    if transposed or not (_plain(x) and _plain(w) and x.is_floating_point()):
        return NotImplemented
    n = x.dim() - 2
    if n < 1 or w.dim() != n + 2 or w.dtype != x.dtype or type(groups) is not int:
        return NotImplemented
    if not all(_ints(v, n) for v in (stride, padding, dilation)):
        return NotImplemented
    if groups < 1 or w.shape[0] % groups or w.shape[1] * groups != x.shape[1] or 0 in x.shape:
        return NotImplemented
    if bias is not None and not (_plain(bias) and bias.dtype == x.dtype
                                 and tuple(bias.shape) == (w.shape[0],)):
        return NotImplemented
    shape = [x.shape[0], w.shape[0]]
    for side, k, s, p, d in zip(x.shape[2:], w.shape[2:], stride, padding, dilation,
                                strict=True):
        if s < 1 or d < 1 or p < 0 or side + 2 * p < d * (k - 1) + 1:
            return NotImplemented  # the default kernel raises the user-facing error
        shape.append((side + 2 * p - d * (k - 1) - 1) // s + 1)
    return torch.empty(shape, dtype=x.dtype, device="meta")


_MATMUL = {aten.mm.default, aten.addmm.default}


def _matmul(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """``mm(a, b)`` or ``addmm(bias, a, b)`` (``beta``/``alpha`` numbers) of meta matrices of
    the exact tensor class and one floating dtype: an empty contiguous ``(n, p)``."""
    if func is aten.addmm.default:
        if len(args) != 3 or any(k not in ("beta", "alpha") or type(v) not in (int, float)
                                 for k, v in kwargs.items()):
            return NotImplemented
        bias, a, b = args
    else:
        if len(args) != 2 or kwargs:
            return NotImplemented
        bias, (a, b) = None, args
    for t in (a, b) if bias is None else (bias, a, b):
        if type(t) not in _PLAIN or not t.is_meta or not t.is_floating_point():
            return NotImplemented
    if a.dim() != 2 or b.dim() != 2 or a.dtype != b.dtype or a.shape[1] != b.shape[0]:
        return NotImplemented  # the default kernel raises the user-facing error
    shape = (a.shape[0], b.shape[1])
    if bias is not None:
        if bias.dtype != a.dtype or bias.dim() > 2:
            return NotImplemented
        try:
            if torch.broadcast_shapes(bias.shape, shape) != shape:
                return NotImplemented
        except RuntimeError:
            return NotImplemented
    return torch.empty(shape, dtype=a.dtype, device="meta")


def _ints(v: Any, n: int) -> bool:
    return type(v) in (list, tuple) and len(v) == n and all(type(i) is int for i in v)


@cache
def _conv_flop_count() -> Any:
    from torch.utils.flop_counter import conv_flop_count

    return conv_flop_count


def _conv_flops(x: torch.Size, w: torch.Size, out: torch.Size) -> int:
    return int(_conv_flop_count()(x, w, out, transposed=False))


def _batch_norm(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    if kwargs or len(args) < 5:
        return NotImplemented
    x, *per_channel = args[:5]
    if func is aten.native_batch_norm.default and args[5] is not False:
        return NotImplemented  # training statistics: not what eval-mode runs ask
    if func is not aten.native_batch_norm.default and None in (args[3], args[4]):
        return NotImplemented  # the no-training op needs running statistics: let it raise
    if not (_plain(x) and x.dim() >= 2 and x.is_floating_point()):
        return NotImplemented
    c = x.shape[1]
    for t in per_channel:
        if t is not None and not (_plain(t) and t.dtype == x.dtype and t.shape == (c,)):
            return NotImplemented
    stat = torch.empty((c,), dtype=x.dtype, device="meta")
    return _like(x), stat, _like(stat)


class FastMeta(TorchDispatchMode):
    """The mode behind :func:`fast_meta`; with ``count``, it also counts MACs as
    FlopCounterMode does (see :func:`shrink.report.count_run`)."""

    def __init__(self, count: bool = False) -> None:
        super().__init__()
        self.count = count
        self.flops = 0
        self._decomposes: dict[Any, bool] = {}

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = _fast(func, args, kwargs)  # the ops answered here have no flop formula
        if out is not NotImplemented:
            return out
        if func is aten.convolution.default and not kwargs:
            out = _conv(*args)
            if out is not NotImplemented:
                if self.count:  # FlopCounterMode's formula (conv_flop), on the same shapes
                    self.flops += int(_conv_flops(args[0].shape, args[1].shape, out.shape))
                return out
        if func in _MATMUL:
            out = _matmul(func, args, kwargs)
            if out is not NotImplemented:
                if self.count:
                    from torch.utils.flop_counter import flop_registry

                    self.flops += int(_flops(flop_registry[func._overloadpacket], args,
                                             kwargs, out))
                return out
        if not self.count:
            return func(*args, **kwargs)
        return self._counted(func, args, kwargs)

    def _counted(self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        """FlopCounterMode's dispatch without its per-module table (whose module tracker
        doubles the cost of a meta run): size queries pass, an op with a composite kernel is
        decomposed (its parts come back here), any other runs and adds its formula's flops.
        A higher-order op raises: :func:`shrink.report.count_run` then uses FlopCounterMode."""
        from torch.utils.flop_counter import flop_registry

        if func in _SIZE_QUERIES:
            return NotImplemented
        if isinstance(func, torch._ops.HigherOrderOperator):
            raise NotImplementedError(f"the lean MAC counter does not count {func}")
        decomposes = self._decomposes.get(func)
        if decomposes is None:  # what OpOverload.decompose looks up, once per op
            key = torch._C.DispatchKey.CompositeImplicitAutograd
            decomposes = self._decomposes[func] = func is not torch.ops.prim.device.default and (
                key in func.py_kernels
                or torch._C._dispatch_has_kernel_for_dispatch_key(func.name(), key))
        if decomposes:
            with self:
                out = func.decompose(*args, **kwargs)
            if out is not NotImplemented:
                return out
        out = func(*args, **kwargs)
        formula = flop_registry.get(func._overloadpacket)
        if formula is not None:
            self.flops += int(_flops(formula, args, kwargs, out))
        return out


def _flops(formula: Any, args: tuple[Any, ...], kwargs: dict[str, Any], out: Any) -> Any:
    """``formula(*args, **kwargs, out_val=out)``. Most formulas are wrapped by flop_counter's
    ``shape_wrapper``, which maps every tensor to its shape with ``pytree.tree_map`` (about
    half the cost of a meta conv); when the values are plain (tensors, atoms, lists, tuples
    and dicts of them) the same mapping is done here and the unwrapped formula called."""
    raw = getattr(formula, "__wrapped__", None)
    if raw is None or getattr(formula, "__code__", None) is not _shape_wrapper_code():
        return formula(*args, **kwargs, out_val=out)
    try:
        shapes = _shapes((args, kwargs, out))
    except _NotPlainError:
        return formula(*args, **kwargs, out_val=out)
    a, k, out_shape = shapes
    return raw(*a, out_shape=out_shape, **k)


class _NotPlainError(Exception):
    """A value :func:`_shapes` leaves to pytree."""


_PLAIN_VALUES = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device,
                           torch.memory_format, torch.layout})


def _shapes(value: Any) -> Any:
    """``pytree.tree_map(get_shape, value)`` for the plain values of aten calls (raises
    :class:`_NotPlainError` on anything else, which pytree may treat as a container)."""
    kind = type(value)
    if kind in _PLAIN_VALUES:
        return value
    if isinstance(value, torch.Tensor):
        return value.shape
    if kind is tuple or kind is list:
        return kind(_shapes(v) for v in value)
    if kind is dict:
        return {k: _shapes(v) for k, v in value.items()}
    raise _NotPlainError


@cache
def _shape_wrapper_code() -> Any:
    from torch.utils.flop_counter import shape_wrapper

    return shape_wrapper(lambda: 0).__code__


#: queries FlopCounterMode hands back to the tensor (NotImplemented), uncounted
_SIZE_QUERIES = frozenset({
    aten.sym_is_contiguous.default, aten.is_contiguous.default,
    aten.is_contiguous.memory_format, aten.is_strides_like_format.default,
    aten.is_non_overlapping_and_dense.default, aten.size.default, aten.sym_size.default,
    aten.stride.default, aten.sym_stride.default, aten.storage_offset.default,
    aten.sym_storage_offset.default, aten.numel.default, aten.sym_numel.default,
    aten.dim.default, torch.ops.prim.layout.default,
})


@contextmanager
def fast_meta(*, count: bool = False) -> Iterator[FastMeta]:
    """Run the block with the fast meta paths above (other ops and devices are untouched).

    With ``count``, the mode also sums the flops of every op with a formula in
    ``torch.utils.flop_counter.flop_registry``, the total FlopCounterMode reports (twice the
    MACs), on meta and real tensors alike.

    Example:
        >>> with torch.no_grad(), fast_meta(count=True) as mode:
        ...     out = meta_model(*meta_inputs)
        >>> macs = mode.flops // 2
    """
    with FastMeta(count) as mode:
        yield mode
