"""Binding a plan to a live model: the extent of each plan member in that model.

:mod:`shrink.plan` is pure data; reading a member's current length needs the layer rules
(``ModuleRule.extent``), so it lives here, above :mod:`shrink.rules`.
"""

from __future__ import annotations

from collections.abc import Mapping

from torch import nn

from shrink.plan import Side
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
    tensors = dict(plan_model.named_parameters()) | dict(plan_model.named_buffers())
    for (fqn, side), extent in extents.items():
        if side is Side.ATTR:
            owner, _, attr = fqn.rpartition(".")
            value = getattr(modules.get(owner), attr, None)
            if value != extent:
                return f"the plan expects attribute {fqn!r} to be {extent}, the model has {value!r}"
            continue
        if side.tensor_axis is not None:
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
