"""The op-rule protocol: everything shrink knows about one family of ops lives in one rule.

A *module rule* (registered for ``nn.Module`` types) says how channel ids flow through the layer
(``propagate``), how long its IN/OUT axes are (``extent``), which parameter slices score a channel
(``score_params``), which input axis carries its input channels (``in_axis``, used by the masked
oracle), and how to rebuild it smaller (``shrink``: a copy with the kept slices,
:func:`recast`). A *function rule* (registered for an fx call target) only propagates ids.
"""

from __future__ import annotations

import contextlib
import copy
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, ClassVar, TypeVar

import torch
from torch import nn

from shrink.errors import InvariantError, RewriteError
from shrink.ids import Call, Tracker
from shrink.plan import Side

M = TypeVar("M", bound=nn.Module)


@dataclass(frozen=True, slots=True)
class Keep:
    """Positions to keep on each axis of a module; None means the axis is unchanged."""

    in_: tuple[int, ...] | None = None
    out: tuple[int, ...] | None = None
    heads: tuple[int, ...] | None = None

    def resolve(self, side: Side, extent: int) -> list[int]:
        keep = {Side.IN: self.in_, Side.OUT: self.out, Side.HEADS: self.heads}[side]
        return list(range(extent)) if keep is None else list(keep)


@dataclass(frozen=True, slots=True)
class LayerOp:
    """What one call of a layer computes, as the latency model sees it (:mod:`shrink.latency`).

    An ONNX-level description, independent of the PyTorch class: ``kind`` is ``"conv"`` (ONNX
    ``Conv``, any number of spatial dims) or ``"linear"`` (``MatMul`` + bias over the last axis).

    Attributes:
        kind: ``"conv"`` or ``"linear"``.
        c_in: input channels (features).
        c_out: output channels (features).
        spatial: conv: the input's spatial size; linear: the dims between batch and features
            (tokens), ``()`` for a 2-D input.
        kernel, stride, dilation: per spatial dim (conv only).
        pads: ONNX ``pads``: begins then ends (conv only).
        groups: conv groups.
        bias: whether the layer adds a bias.
    """

    kind: str
    c_in: int
    c_out: int
    spatial: tuple[int, ...] = ()
    kernel: tuple[int, ...] = ()
    stride: tuple[int, ...] = ()
    pads: tuple[int, ...] = ()
    dilation: tuple[int, ...] = ()
    groups: int = 1
    bias: bool = True


@dataclass(frozen=True, slots=True)
class InnerLayer:
    """A child layer of a unit whose channels the unit's members own (the q/k/v/o projections
    of an attention layer), for the latency model: the child's input channels follow the
    unit's ``in_side`` and its output channels its ``out_side`` (None: they stay).

    Attributes:
        path: the child's path below the unit (``"q_proj"``).
        in_side, out_side: :class:`~shrink.plan.Side` of the unit, or None.
        units: with a HEADS side: the child has this many head units on that axis and follows
            the heads group only when the group has that many channels (key/value projections
            shrink when whole KV groups go, not when query heads go inside every group); None:
            it follows whatever the heads group keeps.
    """

    path: str
    in_side: Side | None
    out_side: Side | None
    units: int | None = None


class ModuleRule:
    """Base class of rules keyed by module type. Subclasses override what applies."""

    types: ClassVar[tuple[type[nn.Module], ...]] = ()
    exact: ClassVar[bool] = True

    def exact_for(self, m: nn.Module) -> bool:
        """Whether pruning ``m`` equals masking it (``exact``, unless the layer's
        configuration says otherwise: a one-group GroupNorm normalises over all channels)."""
        return self.exact

    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        raise NotImplementedError

    def extent(self, m: nn.Module, side: Side) -> int | None:
        """Length of the IN or OUT axis; None when the module has no such prunable axis."""
        return None

    def recorded_sides(self, m: nn.Module) -> tuple[Side, ...]:
        """Axes that analysis records whenever it records any axis of ``m``: a plan that lists
        some of ``m``'s axes but not these lost a member, and :func:`shrink.apply` refuses it."""
        return tuple(s for s in (Side.IN, Side.OUT) if self.extent(m, s) is not None)

    def score_params(self, m: nn.Module, side: Side) -> Sequence[tuple[torch.Tensor, int]]:
        """(tensor, dim) pairs whose slice ``i`` along ``dim`` belongs to axis position ``i``."""
        return ()

    def input_weights(self, m: nn.Module) -> Sequence[tuple[torch.Tensor, int]]:
        """(parameter, dim) pairs of a layer that is a linear map of its first input: slice ``j``
        along ``dim`` multiplies input channel ``j`` (on :meth:`in_axis`) and nothing else
        (Linear, Conv1D, a dense conv; not a grouped conv, not attention). Activation-weighted
        magnitude scales these slices by the input channels' norms. Empty for other layers."""
        return ()

    def scale_params(self, m: nn.Module) -> Sequence[torch.Tensor]:
        """Per-channel scale factors on the OUT axis (BN gamma), for the BN-scale criterion."""
        return ()

    def example_input_shape(self, m: nn.Module) -> tuple[int, ...] | None:
        """Shape of a typical input when ``m`` is a model's first layer (for inferred inputs)."""
        return None

    def in_axis(self, m: nn.Module, ndim: int) -> int:
        """Axis of the layer's first input that carries the IN channels."""
        return 1

    def layer_op(self, m: nn.Module, input_shape: tuple[int, ...]) -> LayerOp | None:
        """What a call of ``m`` on an input of ``input_shape`` computes, for the latency model;
        None (the default) makes the layer a constant there (its time does not depend on the
        kept channels)."""
        return None

    def inner_layers(self, m: nn.Module) -> Sequence[InnerLayer]:
        """Child layers whose channels follow this unit's sides (see :class:`InnerLayer`); the
        latency model times them with the unit's groups. Empty by default."""
        return ()

    def mask_(self, m: nn.Module, side: Side, dropped: Sequence[int]) -> None:
        """Make ``m`` (a copy) ignore the ``dropped`` positions of ``side``: the masked oracle.

        The default zeroes dropped IN channels at the layer's input, so they are still computed
        upstream but nothing reads them. OUT-only layers need nothing: their consumers mask.
        """
        if side is not Side.IN:
            return
        idx = torch.as_tensor(list(dropped), dtype=torch.long)
        rule = self

        def hook(mod: nn.Module, args: tuple[Any, ...]) -> Any:
            x = args[0]
            # silent to recording_calls: a plain op, with torch-function handling off where
            # no tensor subclass needs it
            with (torch._C.DisableTorchFunction() if type(x) is torch.Tensor
                  else contextlib.nullcontext()):
                x = x.index_fill(rule.in_axis(mod, x.ndim), idx.to(x.device), 0)
            return (x, *args[1:])

        hook.silent = True  # type: ignore[attr-defined]
        m.register_forward_pre_hook(hook)

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} has no prunable axes")


def copy_param_(dst: torch.Tensor | None, src: torch.Tensor | None) -> None:
    """Copy ``src`` into the freshly constructed ``dst`` without recording autograd history."""
    if dst is None or src is None:
        return
    with torch.no_grad():
        dst.copy_(src)


def index(t: torch.Tensor, dim: int, keep: Sequence[int]) -> torch.Tensor:
    return t.index_select(dim, _positions(tuple(keep), t.device))


@lru_cache(maxsize=64)
def _positions(keep: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """``keep`` as an index tensor, made once for the several tensors of a layer (a norm's
    four) and the layers of a group that keep the same positions; only ever read. Made
    outside inference mode, so that autograd may save it wherever it is used later."""
    with torch.inference_mode(False):
        return torch.as_tensor(keep, dtype=torch.long, device=device)


def sliced_copy(m: M, names: Sequence[str], dim: int, keep: Sequence[int]) -> M:
    """A deep copy of a small layer (a norm, a PReLU, an embedding) with the parameters and
    buffers ``names`` sliced to ``keep`` along ``dim``; its class, hooks and extras stay."""
    new = copy.deepcopy(m)
    for name in names:
        old = getattr(m, name, None)
        if old is None:
            continue
        sliced = index(old.detach(), dim, keep).clone()
        if isinstance(old, nn.Parameter):
            setattr(new, name, nn.Parameter(sliced, requires_grad=old.requires_grad))
        else:
            new.register_buffer(name, sliced)
    return new


def recast(m: M, bases: tuple[type[nn.Module], ...], tensors: dict[str, torch.Tensor | None],
           **attrs: Any) -> M:
    """A smaller copy of the layer ``m``: same class and attributes, ``attrs`` (the channel
    counts) set anew, and the parameters and buffers named in ``tensors`` replaced by the given
    slices of them (new tensors; a parameter keeps its ``requires_grad``).

    Nothing else about a layer changes with its channels, so copying it keeps everything torch
    and the caller set on it (hooks of every kind, extra attributes), where rebuilding it
    through its constructor cost twice the slicing. The rule checks what the constructor would
    (the counts fit the groups); this checks that each slice has the shape the new counts give
    it (``shapes``, as the rule computes them).

    A subclass whose ``forward`` is its torch base's (the registry hands over no other) is
    copied the same way, but must hold no parameters, buffers or submodules beyond the base's
    (those in ``tensors``): nothing says how they shrink with the channels.

    Raises:
        RewriteError: the subclass holds tensors or submodules the base layer does not.
        InvariantError: ``m`` derives from none of ``bases``.
    """
    cls = type(m)
    base = next((k for k in cls.__mro__ if k in bases), None)
    if base is None:
        raise InvariantError(f"{cls.__name__} derives from none of "
                             f"{[b.__name__ for b in bases]}; register its rule for those")
    extra = sorted(
        name for slot in ("_parameters", "_buffers", "_modules")
        for name, value in getattr(m, slot).items()
        if value is not None and name not in tensors
    )
    if extra:
        raise RewriteError(
            f"{cls.__name__} subclasses {base.__name__} and adds {extra}; shrink cannot tell "
            "how they shrink with the channels. Pass ignore=[that layer] or register a rule "
            f"for {cls.__name__} (shrink.register_rule)."
        )
    state: dict[str, Any] = dict(vars(m))  # atoms stay as they are; the rest is replaced
    memo: dict[int, Any] = {}
    for key, value in state.items():  # (values of existing keys only: safe while iterating)
        kind = type(value)
        if kind in _ATOMS:
            continue
        if kind in _TABLES:
            state[key] = kind(value)  # hook and tensor tables: new tables, the same entries
        elif kind in (tuple, list) and all(type(v) in _ATOMS for v in value):
            if kind is list:
                state[key] = list(value)
        else:
            state[key] = copy.deepcopy(value, memo)
    params, buffers = m._parameters, m._buffers
    for name, value in tensors.items():
        old = params[name] if name in params else (
            buffers[name] if name in buffers else getattr(m, name))
        if old is None or value is None:
            continue
        table = "_parameters" if name in params else "_buffers"
        state[table][name] = (nn.Parameter(value, requires_grad=old.requires_grad)
                              if isinstance(old, nn.Parameter) else value)
    state.update(attrs)
    new = cls.__new__(cls)
    new.__dict__.update(state)
    return new


_ATOMS = frozenset({int, float, bool, str, type(None), torch.dtype, torch.device})
_TABLES = (dict, OrderedDict, set)


def check_shape(layer: nn.Module, name: str, value: torch.Tensor,
                want: tuple[int, ...]) -> torch.Tensor:
    """``value``, the kept slice of ``layer.<name>``, when it has the shape ``want`` that the
    rebuilt layer's channel counts give it.

    Raises:
        InvariantError: it does not.
    """
    if tuple(value.shape) != want:
        raise InvariantError(
            f"the rebuilt {type(layer).__name__}.{name} needs shape {want} but its kept slice "
            f"has {tuple(value.shape)}; this is a shrink bug, please report it"
        )
    return value


def narrow(m: nn.Module, tp: type[M]) -> M:
    """``m`` as the layer type its rule was registered for (the registry only hands over those).

    Raises:
        InvariantError: ``m`` is not a ``tp``: a rule was registered for the wrong type.
    """
    if not isinstance(m, tp):
        raise InvariantError(f"a rule for {tp.__name__} was given a {type(m).__name__}; "
                             "register it for the types it handles")
    return m


def finish(new: nn.Module, old: nn.Module) -> nn.Module:
    """Carry the mode of ``old`` over to ``new``."""
    if (new.training is not old.training or new._modules
            or type(new).train is not nn.Module.train):
        new.train(old.training)  # (else a no-op: a recast layer has its flag already)
    return new
