"""Binding a plan to a live model: the extent of each plan member in that model.

:mod:`shrink.plan` is pure data; reading a member's current length needs the layer rules
(``ModuleRule.extent``), so it lives here, above :mod:`shrink.rules`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn

from shrink.plan import Plan, Side
from shrink.rules import rule_for


def axis_length(model: nn.Module, fqn: str, side: Side) -> int | None:
    """Current length of a member's axis in ``model`` (a layer side, a tensor axis or a size
    attribute); None when the model has no such axis."""
    if side is Side.ATTR:
        owner, _, attr = fqn.rpartition(".")
        try:
            value = getattr(model.get_submodule(owner), attr, None)
        except AttributeError:
            return None
        return value if type(value) is int else None
    if side.tensor_axis is not None:
        tensors = dict(model.named_parameters()) | dict(model.named_buffers())
        t = tensors.get(fqn)
        return None if t is None or side.tensor_axis >= t.ndim else int(t.shape[side.tensor_axis])
    mod = dict(model.named_modules()).get(fqn)
    rule = None if mod is None else rule_for(mod)
    return None if rule is None or mod is None else rule.extent(mod, side)


def describe_mismatch(plan_model: nn.Module, extents: Mapping[tuple[str, Side], int]) -> str | None:
    """First plan extent that does not match the model, as a sentence; None when all match."""
    modules = dict(plan_model.named_modules())
    tensors: dict[str, Any] | None = None  # made for the first tensor member, if any
    for (fqn, side), extent in extents.items():
        if side is Side.ATTR:
            owner, _, attr = fqn.rpartition(".")
            value = getattr(modules.get(owner), attr, None)
            if value != extent:
                return f"the plan expects attribute {fqn!r} to be {extent}, the model has {value!r}"
            continue
        if side.tensor_axis is not None:
            if tensors is None:
                tensors = dict(plan_model.named_parameters()) | dict(plan_model.named_buffers())
            t = tensors.get(fqn)
            if t is None:
                return f"the plan prunes tensor {fqn!r}, which the model does not have"
            if side.tensor_axis >= t.ndim or t.shape[side.tensor_axis] != extent:
                return (f"the plan expects tensor {fqn!r} to have {extent} entries on axis "
                        f"{side.tensor_axis}, the model's has shape {tuple(t.shape)}")
            continue
        mod = modules.get(fqn)
        if mod is None:
            return f"the plan prunes module {fqn!r}, which the model does not have"
        rule = rule_for(mod)
        actual = None if rule is None else rule.extent(mod, side)
        if actual != extent:
            return (
                f"the plan expects {fqn!r} ({type(mod).__name__}) to have {extent} "
                f"{side.value}put channels, the model has {actual}"
            )
    return None


def describe_gaps(model: nn.Module, plan: Plan) -> str | None:
    """First layer axis that the plan covers only in part, as a sentence; None when none.

    Analysis puts every position of every axis it records into exactly one group, and records
    the axes a layer's rule lists in ``ModuleRule.recorded_sides`` together. A plan with a
    partly covered axis, or with some of a layer's axes but not all of those, lost a member (or
    part of one): applying it would shrink one side of a connection and not the other.
    """
    covered: dict[tuple[str, Side], int] = {}
    extents: dict[tuple[str, Side], int] = {}
    for g in plan.groups:
        for m in g.members:
            key = (m.module, m.side)
            covered[key] = covered.get(key, 0) + len(m.index_map.index)
            extents[key] = m.extent
    for (fqn, side), n in covered.items():
        if n != extents[(fqn, side)]:
            return (f"its groups cover {n} of the {extents[(fqn, side)]} positions of "
                    f"{fqn!r} ({side.value} axis): a group lost part of a member")
    modules = dict(model.named_modules())
    for fqn in dict.fromkeys(f for f, s in covered if s.tensor_axis is None and s is not Side.ATTR):
        mod = modules.get(fqn)
        rule = None if mod is None else rule_for(mod)
        if mod is None or rule is None:
            continue  # describe_mismatch names it
        missing = [s.value for s in rule.recorded_sides(mod) if (fqn, s) not in covered]
        if missing:
            return (f"no group has {fqn!r} ({type(mod).__name__}) {missing[0]} channels, though "
                    "the plan has its other axes: a group lost a member")
    return None
