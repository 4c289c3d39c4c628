"""Registry from module types and fx call targets to the rules that know them.

Lookup by module type walks the MRO, but stops at a subclass that overrides ``forward``: such a
layer computes something else than its base class, so it is traced through (or pinned), never
silently given the base class's semantics.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from shrink.ids import Call, Tracker
from shrink.rules.base import ModuleRule

FunctionRule = Callable[[Tracker, Call], Any]

_MODULE_RULES: dict[type[nn.Module], ModuleRule] = {}
_MODULE_RULES_BY_NAME: dict[str, ModuleRule] = {}  # third-party types, matched without importing
_FUNCTION_RULES: dict[Any, FunctionRule] = {}

R = TypeVar("R", bound=type[ModuleRule])
F = TypeVar("F", bound=FunctionRule)


def register_rule(*types: type[nn.Module]) -> Callable[[R], R]:
    """Class decorator: register a :class:`ModuleRule` for ``types``.

    Example:
        >>> @register_rule(MyConv)
        ... class MyConvRule(ModuleRule): ...
    """

    def deco(cls: R) -> R:
        inst = cls()
        for tp in types or cls.types:
            _MODULE_RULES[tp] = inst
        return cls

    return deco


def register_rule_by_name(*qualnames: str) -> Callable[[R], R]:
    """Like :func:`register_rule`, for third-party types named ``"package.module.Class"``."""

    def deco(cls: R) -> R:
        inst = cls()
        for name in qualnames:
            _MODULE_RULES_BY_NAME[name] = inst
        return cls

    return deco


def register_function(*targets: Any) -> Callable[[F], F]:
    """Decorator: register a function rule for fx call targets (callables or method names)."""

    def deco(fn: F) -> F:
        for target in targets:
            _FUNCTION_RULES[target] = fn
        return fn

    return deco


def rule_for(m: nn.Module | type[nn.Module]) -> ModuleRule | None:
    """The rule for a module (or module type), or None."""
    tp = m if isinstance(m, type) else type(m)
    for klass in tp.__mro__:
        rule = _MODULE_RULES.get(klass) or _MODULE_RULES_BY_NAME.get(
            f"{klass.__module__}.{klass.__qualname__}"
        )
        if rule is not None:
            return rule
        if "forward" in vars(klass) and klass is not nn.Module:
            return None
    return None


def function_rule(target: Any) -> FunctionRule | None:
    try:
        rule = _FUNCTION_RULES.get(target)
    except TypeError:  # unhashable target
        return None
    packet = getattr(target, "overloadpacket", None)  # an ATen overload: aten.view.default
    if rule is None and packet is not None:
        rule = _FUNCTION_RULES.get(packet)
    if rule is None and callable(target):
        name = f"{getattr(target, '__module__', '')}.{getattr(target, '__qualname__', '')}"
        rule = _FUNCTION_RULES.get(name)
    return rule


def supported_ops() -> dict[str, list[str]]:
    """Names of every registered module type and call target, for the README table."""
    mods = sorted({f"{t.__module__}.{t.__qualname__}" for t in _MODULE_RULES}
                  | set(_MODULE_RULES_BY_NAME))
    funcs = sorted({t if isinstance(t, str) else getattr(t, "__name__", repr(t))
                    for t in _FUNCTION_RULES})
    return {"modules": mods, "functions": funcs}
