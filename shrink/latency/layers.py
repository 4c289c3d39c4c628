"""The model as the latency model sees it: calls of prunable layers, each tied to the groups.

:func:`layer_calls` runs the model once (on a weightless meta copy when it can) with a hook on
every module whose rule describes it (:meth:`shrink.rules.ModuleRule.layer_op`: convs and
linears); identical calls of one module are counted once with their multiplicity. Everything
else (norms folded into convs, activations, pooling, residual adds, reorders) is a constant.

:func:`terms` ties each call's input and output channels to the channel groups: an axis has
``fixed`` positions (pinned groups, unscored groups, positions no group owns) and, for each
*variable* group, ``positions / size`` positions per kept channel (2 for ``cat([x, x])``,
``H*W`` for a flatten into a Linear), so

    c_in = in_fixed + sum(per_channel * kept[group] for the input's variable groups)

and the same for the output. A grouped conv whose input and output are the same groups
(depthwise, or whole conv groups) is *tied*: its output channels and conv groups follow the
input's count. The child layers of a unit that owns their channels (the q/k/v/o projections of
an attention layer, :meth:`shrink.rules.ModuleRule.inner_layers`) follow the unit's groups:
the embed dim on one side, the heads (``positions / kept head``) on the other.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shrink.capture import meta_copy, to_meta
from shrink.latency.table import Axis
from shrink.plan import ChannelGroup, Side
from shrink.rules import InnerLayer, LayerOp, rule_for

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class LayerCall:
    """``calls`` identical calls of module ``module`` computing ``op``."""

    module: str
    op: LayerOp
    calls: int = 1


@dataclass(frozen=True, slots=True)
class Term:
    """One layer call in the allocation: how its channels follow the groups' kept counts.

    Attributes:
        call: the layer call.
        inp: ``(group id, positions per kept channel)`` of each variable group on the input.
        in_fixed: input positions that stay.
        out: the same for the output.
        out_fixed: output positions that stay.
        tied: the output channels (and conv groups) follow the input's count.
        in_axis: the table's input axis.
        out_axis: the table's output axis.
    """

    call: LayerCall
    inp: tuple[tuple[str, float], ...]
    in_fixed: int
    out: tuple[tuple[str, float], ...]
    out_fixed: int
    tied: bool
    in_axis: Axis
    out_axis: Axis

    def signature(self) -> str:
        """What determines this layer's table: the op, the axes and their blocks (the batch
        and the runtime are the cache file's key)."""
        op = self.call.op

        def dims(v: tuple[int, ...]) -> str:
            return "x".join(map(str, v)) or "-"

        def axis(a: Axis) -> str:
            return f"{a.extent}/{a.quantum}{'v' if a.variable else 'f'}"

        return (f"{op.kind} in{axis(self.in_axis)} out{axis(self.out_axis)} at{dims(op.spatial)}"
                f" k{dims(op.kernel)} s{dims(op.stride)} p{dims(op.pads)} d{dims(op.dilation)}"
                f" g{op.groups}{' tied' if self.tied else ''}{' bias' if op.bias else ''}")

    def op_at(self, c_in: int, c_out: int) -> LayerOp:
        """The layer with ``c_in`` input and ``c_out`` output channels (tied: the output and
        the conv groups follow ``c_in``)."""
        op = self.call.op
        if self.tied:
            return dataclasses.replace(op, c_in=c_in, c_out=c_in * op.c_out // op.c_in,
                                       groups=max(1, op.groups * c_in // op.c_in))
        return dataclasses.replace(op, c_in=c_in, c_out=c_out)


def layer_calls(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[LayerCall, ...]:
    """Every call of a layer whose rule describes it, in call order, identical calls merged.

    Runs a meta-device copy (shapes only); a model with ops that cannot run on meta runs on a
    real copy under ``torch.no_grad``.
    """
    try:
        return _record(meta_copy(model).eval(), to_meta(inputs))
    except Exception as e:  # any op without a meta kernel: record on real tensors
        log.info("latency: recording layer shapes on real tensors (meta failed: %s)", e)
        import copy

        return _record(copy.deepcopy(model).eval(), inputs)


def inner_layers(model: nn.Module) -> dict[str, tuple[str, InnerLayer]]:
    """``{child fqn: (unit fqn, how it follows the unit)}`` for every unit whose rule has
    :meth:`~shrink.rules.ModuleRule.inner_layers`."""
    out: dict[str, tuple[str, InnerLayer]] = {}
    for fqn, m in model.named_modules():
        rule = rule_for(m)
        for il in rule.inner_layers(m) if rule is not None else ():
            out[f"{fqn}.{il.path}" if fqn else il.path] = (fqn, il)
    return out


def _record(model: nn.Module, inputs: tuple[Any, ...]) -> tuple[LayerCall, ...]:
    seen: dict[tuple[str, LayerOp], int] = {}
    handles = []
    for fqn, m in model.named_modules():
        rule = rule_for(m)
        if rule is None or not fqn:
            continue

        def hook(mod: nn.Module, args: tuple[Any, ...], fqn: str = fqn, rule: Any = rule) -> None:
            if args and isinstance(args[0], torch.Tensor):
                op = rule.layer_op(mod, tuple(args[0].shape))
                if op is not None:
                    seen[(fqn, op)] = seen.get((fqn, op), 0) + 1

        handles.append(m.register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(*inputs)
    finally:
        for h in handles:
            h.remove()
    return tuple(LayerCall(fqn, op, n) for (fqn, op), n in seen.items())


def terms(calls: Sequence[LayerCall], groups: Sequence[ChannelGroup], variable: Collection[str],
          block: int, inner: Mapping[str, tuple[str, InnerLayer]] | None = None,
          ) -> tuple[Term, ...]:
    """Tie every layer call to the groups; ``variable`` are the ids whose kept count is chosen.

    Args:
        calls: from :func:`layer_calls`.
        groups: every group of the analysis.
        variable: ids of the groups whose kept count the allocation chooses.
        block: the runtime's channel block (the quantum of dense layers' axes).
        inner: from :func:`inner_layers`: child layers that follow their unit's groups.
    """
    owners: dict[tuple[str, Side], list[tuple[ChannelGroup, int]]] = {}
    for g in groups:
        for m in g.members:
            if m.side in (Side.IN, Side.OUT, Side.HEADS):
                owners.setdefault((m.module, m.side), []).append((g, len(m.index_map.index)))
    inner = inner or {}

    def side_owners(module: str, side: Side, extent: int) -> list[tuple[ChannelGroup, int]]:
        if module not in inner:
            return owners.get((module, side), [])
        unit, il = inner[module]
        follows = il.in_side if side is Side.IN else il.out_side
        if follows is None:
            return []
        if follows is not Side.HEADS:
            return owners.get((unit, follows), [])
        # the whole axis is heads: each kept head keeps extent / (the group's heads) positions
        return [(g, extent) for g, _ in owners.get((unit, Side.HEADS), [])
                if il.units is None or g.size == il.units]

    out = []
    for call in calls:
        op = call.op
        inp, in_fixed = _axis_terms(side_owners(call.module, Side.IN, op.c_in), op.c_in,
                                    variable)
        outp, out_fixed = _axis_terms(side_owners(call.module, Side.OUT, op.c_out), op.c_out,
                                      variable)
        tied = op.groups > 1 and bool(inp) and {g for g, _ in inp} == {g for g, _ in outp}
        if tied:
            q = block if op.groups == op.c_in else op.c_in // op.groups
            in_axis, out_axis = Axis(op.c_in, q, True), Axis(op.c_out, 1, False)
        else:
            q = block if op.groups == 1 else op.groups
            in_axis = Axis(op.c_in, q, bool(inp))
            out_axis = Axis(op.c_out, q, bool(outp))
        out.append(Term(call, inp, in_fixed, outp, out_fixed, tied, in_axis, out_axis))
    return tuple(out)


def _axis_terms(owners: list[tuple[ChannelGroup, int]], extent: int,
                variable: Collection[str]) -> tuple[tuple[tuple[str, float], ...], int]:
    per: dict[str, float] = {}
    fixed = extent
    for g, positions in owners:
        if g.id in variable:
            per[g.id] = per.get(g.id, 0.0) + positions / g.size
            fixed -= positions
    return tuple(sorted(per.items())), fixed
