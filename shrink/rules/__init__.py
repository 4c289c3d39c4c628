"""Op knowledge: one rule per op family, looked up by module type or fx call target.

:mod:`~shrink.rules.registry` holds the lookup tables; each family module registers its rules
when imported, and this package imports every family, so ``from shrink.rules import rule_for``
always sees them all.
"""

from shrink.rules import (
    aten,
    attention,
    axes,
    conv,
    heads,
    hf,
    layers,
    linear,
    norm,
    pointwise,
    structural,
    swin,
)
from shrink.rules.base import InnerLayer, Keep, LayerOp, ModuleRule
from shrink.rules.registry import (
    function_rule,
    register_function,
    register_rule,
    register_rule_by_name,
    rule_for,
    supported_ops,
)

FAMILIES = (aten, attention, axes, conv, heads, hf, layers, linear, norm, pointwise, structural,
            swin)
"""The registered rule families (imported for their registrations)."""

__all__ = [
    "FAMILIES",
    "InnerLayer",
    "Keep",
    "LayerOp",
    "ModuleRule",
    "function_rule",
    "register_function",
    "register_rule",
    "register_rule_by_name",
    "rule_for",
    "supported_ops",
]
