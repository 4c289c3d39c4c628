"""``copy.deepcopy`` of a module tree, without its per-object overhead.

The pipeline copies whole models several times per call (a meta copy to trace, one for the shape
probe, the pruned result, the oracle's copies), usually with a memo that maps the weights to
themselves or to meta tensors, so what is left is Python: ``deepcopy`` reduces every module and
every one of its fifteen hook dicts through ``__reduce_ex__``, about 500 calls per layer.

:func:`copy_module` gives the same result as ``copy.deepcopy(module, memo)``. For a module
whose class copies the way ``nn.Module`` does (no ``__deepcopy__``, ``__reduce__``, slots or
``__getstate__`` of its own, nothing in ``copyreg``), ``deepcopy`` makes ``cls.__new__(cls)``,
deep-copies ``__getstate__()`` (the ``__dict__`` without a compiled forward) and calls the
class's ``__setstate__``; this does the same, but answers the common values directly: atoms and
tuples of atoms are shared (``deepcopy`` returns them as they are), empty dicts and sets are
new, parameters and buffers are looked up in the memo, child modules recurse. Everything else,
and every module of another kind, goes to ``copy.deepcopy`` with the same memo.

:func:`shared_copy` builds on it: a copy for running forward that shares the weights of layers
whose forward only reads them.
"""

from __future__ import annotations

import copy
import copyreg
import itertools
from collections import OrderedDict
from collections.abc import Collection, Iterable
from typing import Any

import torch
from torch import nn

_ATOMS = frozenset({int, float, bool, str, bytes, type(None), torch.dtype, torch.device,
                    torch.memory_format, torch.layout})
_EMPTY = frozenset({dict, OrderedDict, set})


def copy_module(module: nn.Module, memo: dict[int, Any] | None = None) -> nn.Module:
    """``copy.deepcopy(module, memo)``, faster (see the module docstring).

    Example:
        >>> shared = copy_module(model, {id(p): p for p in model.parameters()})
    """
    memo = {} if memo is None else memo
    found = memo.get(id(module))
    if found is not None:
        return found  # type: ignore[no-any-return]
    if not _copies_plainly(type(module)):
        return copy.deepcopy(module, memo)
    new = type(module).__new__(type(module))
    memo[id(module)] = new
    # What this function memoises (the module, its dicts, its empty containers) is held by
    # ``module``, which outlives the copy, so unlike ``deepcopy`` it need not keep it alive
    # through the memo (``deepcopy`` does so for the objects it makes along the way).
    # a new dict, which nothing else can refer to: its values are replaced in place (atoms
    # stay, being what deepcopy returns for them)
    copied = module.__getstate__()
    for key, value in copied.items():
        kind = type(value)
        if kind in _ATOMS:
            continue
        if kind in _EMPTY and not value and id(value) not in memo:
            copied[key] = memo[id(value)] = kind()  # the hook dicts, mostly
        elif key == "_modules" and kind is dict:
            children: dict[str, Any] = {}
            memo[id(value)] = children
            for name, child in value.items():
                children[name] = child if child is None else copy_module(child, memo)
            copied[key] = children
        elif key in ("_parameters", "_buffers") and kind is dict:
            copied[key] = _tensors(value, memo)
        else:
            copied[key] = _value(value, memo)
    new.__setstate__(copied)
    return new


def _tensors(tensors: dict[str, Any], memo: dict[int, Any]) -> dict[str, Any]:
    """A module's ``_parameters`` or ``_buffers``: what ``deepcopy`` makes of the dict, with the
    memo's tensors looked up directly."""
    new: dict[str, Any] = {}
    memo[id(tensors)] = new
    for name, t in tensors.items():
        found = memo.get(id(t), _MISSING)
        new[name] = found if found is not _MISSING else copy.deepcopy(t, memo)
    return new


_MISSING = object()


def _value(value: Any, memo: dict[int, Any]) -> Any:
    kind = type(value)
    if kind in _ATOMS:
        return value
    if kind is tuple and all(type(v) in _ATOMS for v in value):
        return value
    if kind in _EMPTY and not value and id(value) not in memo:
        new = memo[id(value)] = kind()
        return new
    return copy.deepcopy(value, memo)


_PLAIN: dict[type, bool] = {}


def _copies_plainly(cls: type) -> bool:
    """Whether ``deepcopy`` copies instances of ``cls`` exactly as ``nn.Module`` instances:
    ``cls.__new__``, then the class's own ``__setstate__`` (conv's sets a default padding mode)
    on the deep-copied ``__getstate__``."""
    known = _PLAIN.get(cls)
    if known is None:
        known = _PLAIN[cls] = (
            getattr(cls, "__deepcopy__", None) is None
            and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__
            and getattr(cls, "__getstate__", None) is nn.Module.__getstate__
            and cls not in copyreg.dispatch_table
            and cls not in copy._deepcopy_dispatch  # type: ignore[attr-defined]
            and not copyreg._slotnames(cls)  # type: ignore[attr-defined]
        )
    return known


def set_eval(model: nn.Module) -> nn.Module:
    """``model.eval()``, faster where that is all it would do: when no module of the tree
    overrides ``train`` (nor the root ``eval``), each one's flag is set directly instead of
    through ``Module.__setattr__``, module by module (about 2 us each).

    Example:
        >>> runner = set_eval(copy_module(model))
    """
    modules = list(model.modules())
    if type(model).eval is not nn.Module.eval or any(
            type(m).train is not nn.Module.train or type(m).__setattr__ is not nn.Module.__setattr__
            for m in modules):
        return model.eval()
    for m in modules:
        m.__dict__["training"] = False
    return model


def set_modes(modes: Iterable[tuple[nn.Module, bool]]) -> None:
    """Put back the ``training`` flags ``[(module, flag), ...]`` that a run changed (directly
    where ``Module.__setattr__`` would only store it)."""
    for m, training in modes:
        if type(m).__setattr__ is nn.Module.__setattr__:
            m.__dict__["training"] = training
        else:
            m.training = training


def shared_copy(model: nn.Module, own: Collection[str] = ()) -> nn.Module:
    """A copy of ``model`` in eval mode (new module objects: they take their own mode flags and
    hooks) that shares the tensors of layers whose eval-mode forward only reads them, and copies
    the rest.

    The masked oracle runs copies of the caller's models; sharing saves copying their weights
    (530 MB for VGG-11) twice per verification. A parameter or buffer is shared only when every
    module holding it is one of the torch layers in ``_READS_ONLY`` (exactly that class, so no
    subclass's forward), without hooks and not named in ``own`` (with its submodules); anything
    a forward may write (``nn.Embedding(max_norm=...)`` renormalises its rows in place, a hook
    may do anything, other modules' buffers may hold running state) is copied, as
    ``copy.deepcopy`` would. (BatchNorm updates its statistics in training mode only.)

    Example:
        >>> ref = shared_copy(model)   # model's flags, hooks and tensors untouched
    """
    inside = tuple(f"{fqn}." for fqn in own)
    readers: dict[int, tuple[torch.Tensor, bool]] = {}  # every tensor: shared if all read only
    for fqn, mod in model.named_modules(remove_duplicate=False):
        reads_only = _reads_only(mod) and (
            not own or (fqn not in own and not fqn.startswith(inside)))
        for t in itertools.chain(mod._parameters.values(), mod._buffers.values()):
            if t is not None:
                seen = readers.get(id(t))
                readers[id(t)] = (t, reads_only if seen is None else seen[1] and reads_only)
    memo: dict[int, Any] = {i: t for i, (t, shared) in readers.items() if shared}
    return set_eval(copy_module(model, memo))


_READS_ONLY = frozenset({
    nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d,
    nn.Linear, nn.modules.linear.NonDynamicallyQuantizableLinear, nn.Bilinear,
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm,
    nn.PReLU, nn.Embedding, nn.MultiheadAttention,
})
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")


def _reads_only(mod: nn.Module) -> bool:
    state = mod.__dict__  # (Module.__getattr__ is slow for a name it does not hold)
    if type(mod) not in _READS_ONLY or any(state.get(h) for h in _HOOKS):
        return False
    return state.get("max_norm") is None  # nn.Embedding renormalises rows in place
