"""The op-rule protocol: everything shrink knows about one family of ops lives in one rule.

A *module rule* (registered for ``nn.Module`` types) says how channel ids flow through the layer
(``propagate``), how long its IN/OUT axes are (``extent``), which parameter slices score a channel
(``score_params``), which input axis carries its input channels (``in_axis``, used by the masked
oracle), and how to rebuild it smaller (``shrink``, through the layer's constructor so PyTorch
re-validates it). A *function rule* (registered for an fx call target) only propagates ids.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
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
            x = x.index_fill(rule.in_axis(mod, x.ndim), idx.to(x.device), 0)
            return (x, *args[1:])

        m.register_forward_pre_hook(hook)

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        raise NotImplementedError(f"{type(self).__name__} has no prunable axes")


def copy_param_(dst: torch.Tensor | None, src: torch.Tensor | None) -> None:
    """Copy ``src`` into the freshly constructed ``dst`` without recording autograd history."""
    if dst is None or src is None:
        return
    with torch.no_grad():
        dst.copy_(src)


def set_param_(m: nn.Module, name: str, value: torch.Tensor | None,
               like: torch.Tensor | None) -> None:
    """Set parameter ``name`` of ``m``, a layer its rule constructed on the meta device (so the
    constructor validated the sizes without drawing random weights that would be overwritten),
    to ``value``: a new tensor sliced from ``like``, keeping ``like``'s ``requires_grad``.

    Raises:
        InvariantError: ``value`` does not have the shape the constructor gave the parameter.
    """
    if value is None or like is None:
        return
    built = getattr(m, name)
    if tuple(built.shape) != tuple(value.shape):
        raise InvariantError(
            f"the rebuilt {type(m).__name__}.{name} has shape {tuple(built.shape)} but its kept "
            f"slice has {tuple(value.shape)}; this is a shrink bug, please report it"
        )
    setattr(m, name, nn.Parameter(value.detach().contiguous(), requires_grad=like.requires_grad))


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


def construct(m: M, bases: tuple[type[nn.Module], ...], *args: Any, **kwargs: Any) -> M:
    """A new layer of ``m``'s class, built by the constructor of its torch base in ``bases``.

    The torch constructor re-validates the smaller layer (channel counts, groups). A subclass may
    have a constructor of its own with other arguments (torchvision's ``Conv3DSimple(in_planes,
    out_planes, midplanes, stride, padding)``), so it is never called: the base class builds the
    layer, which is then recast to ``type(m)`` through ``type(m).__new__``, keeping ``m``'s
    other attributes (deep copied). The registry hands a subclass to its base's rule only when
    it does not override ``forward``, so the base's state is all that forward reads.

    Raises:
        RewriteError: the subclass holds parameters, buffers or submodules the base layer does
            not: nothing says how they shrink with the channels.
        InvariantError: ``m`` derives from none of ``bases``.
    """
    cls = type(m)
    base = next((k for k in cls.__mro__ if k in bases), None)
    if base is None:
        raise InvariantError(f"{cls.__name__} derives from none of "
                             f"{[b.__name__ for b in bases]}; register its rule for those")
    new = _on_meta(base, *args, **kwargs) if kwargs.get("device") == "meta" else base(
        *args, **kwargs)
    if cls is base:
        return new  # type: ignore[return-value]
    extra = sorted(
        name for slot in ("_parameters", "_buffers", "_modules")
        for name, value in getattr(m, slot).items()
        if value is not None and name not in getattr(new, slot)
    )
    if extra:
        raise RewriteError(
            f"{cls.__name__} subclasses {base.__name__} and adds {extra}; shrink cannot tell "
            "how they shrink with the channels. Pass ignore=[that layer] or register a rule "
            f"for {cls.__name__} (shrink.register_rule)."
        )
    out = cls.__new__(cls)
    own = {k: v for k, v in vars(m).items() if k not in vars(new)}
    vars(out).update(copy.deepcopy(own))
    vars(out).update(vars(new))
    return out


def _on_meta(base: type[M], *args: Any, **kwargs: Any) -> M:
    """``base(*args, **kwargs)`` for a layer built on the meta device, without its
    ``reset_parameters``: the constructor runs (and validates) as ever, but the random
    initialisation it ends with would only fill meta tensors, which hold no values and which the
    rule replaces with sliced real ones (:func:`set_param_`; apply checks none is left). That
    initialisation was a third of the cost of rebuilding a conv."""
    new = base.__new__(base)
    new.__class__ = _without_init(base)  # type: ignore[assignment, arg-type]
    try:
        base.__init__(new, *args, **kwargs)
    finally:
        new.__class__ = base
    return new


@cache
def _without_init(base: type[nn.Module]) -> type[nn.Module]:
    """A subclass of ``base`` whose ``reset_parameters`` does nothing (only ever the class of a
    layer while its constructor runs, see :func:`_on_meta`)."""
    return type(f"_{base.__name__}WithoutInit", (base,),
                {"reset_parameters": lambda self: None, "__module__": __name__})


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
    new.train(old.training)
    return new
