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
  concatenated dim.

Only contiguous meta tensors of the exact class ``torch.Tensor`` (or ``nn.Parameter``) take
these paths, where the default kernel also returns contiguous results; anything else, and any
case that would raise, goes to the default kernel, so errors (which the shape probe reports)
read as before.
``tests/unit/test_fastmeta.py`` checks each path against the default kernel.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
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


def _fast(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The result of ``func`` when it is one of the simple cases, else ``NotImplemented``."""
    if func in _UNARY or func in _UNARY_INPLACE:
        x = args[0]
        if not (_plain(x) and x.is_floating_point()):
            return NotImplemented
        return x if func in _UNARY_INPLACE else torch.empty_like(x)
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
    return torch.empty_like(x), stat, torch.empty_like(stat)


class _FastMeta(TorchDispatchMode):
    def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        out = _fast(func, args, kwargs)
        return func(*args, **kwargs) if out is NotImplemented else out


@contextmanager
def fast_meta() -> Iterator[None]:
    """Run the block with the fast meta paths above (other ops and devices are untouched).

    Example:
        >>> with torch.no_grad(), fast_meta():
        ...     out = meta_model(*meta_inputs)
    """
    with _FastMeta():
        yield
