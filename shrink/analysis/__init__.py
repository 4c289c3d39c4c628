"""analyze(captured) -> Analysis: the channel groups of a model and why some are pinned."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from shrink.analysis.groups import build_groups
from shrink.ids import Tracker
from shrink.analysis.propagate import pin_special_modules, propagate
from shrink.capture import Captured
from shrink.errors import ConfigError, InvariantError
from shrink.plan import ChannelGroup, Side
from shrink.rules import rule_for

Ignore = str | type[nn.Module]


@dataclass(frozen=True, slots=True)
class Diagnostic:
    """Something analysis wants the user to know (a pinned op, an inexact group)."""

    severity: str
    message: str


@dataclass(frozen=True, slots=True)
class Analysis:
    """Every channel group of a model, pinned ones included, plus diagnostics."""

    model: str
    groups: tuple[ChannelGroup, ...]
    diagnostics: tuple[Diagnostic, ...] = ()
    _by_id: dict[str, ChannelGroup] = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        self._by_id.update({g.id: g for g in self.groups})

    def group(self, gid: str) -> ChannelGroup:
        try:
            return self._by_id[gid]
        except KeyError:
            raise ConfigError(
                f"no channel group {gid!r}; known groups: {sorted(self._by_id)[:10]} ..."
            ) from None

    @property
    def prunable(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.prunable)

    @property
    def pinned(self) -> tuple[ChannelGroup, ...]:
        return tuple(g for g in self.groups if g.pinned is not None)


def analyze(captured: Captured, *, ignore: Sequence[Ignore] = (), check: bool = True) -> Analysis:
    """Find every group of channels that must be removed together.

    Args:
        captured: the output of :func:`shrink.capture`.
        ignore: module FQNs, glob patterns (``"layer4.*"``) or module types whose channels stay.
        check: verify the partition invariant (every module axis position in exactly one group).

    Returns:
        The groups (sorted in graph order) and diagnostics.

    Raises:
        ConfigError: when an ``ignore`` entry matches no module.

    Example:
        >>> a = shrink.analyze(shrink.capture(model, x))
        >>> [g.id for g in a.prunable][:3]
    """
    t = Tracker()
    propagate(captured, t)
    for g in captured.graph_modules:
        pin_special_modules(g, t)
    _pin_ignored(captured.graph_modules, t, ignore)
    modules = {f: m for g in captured.graph_modules for f, m in g.named_modules()}
    extents: dict[tuple[str, Side], int] = {}
    for fqn, side in t.members:
        rule = rule_for(modules[fqn])
        ext = None if rule is None else rule.extent(modules[fqn], side)
        if ext is None:
            raise InvariantError(f"{fqn} recorded a {side.value} axis its rule does not define")
        extents[(fqn, side)] = ext
    groups = build_groups(t, extents)
    if check:
        _check_partition(groups)
    diags = tuple(Diagnostic(sev, msg) for sev, msg in dict.fromkeys(t.diagnostics))
    return Analysis(captured.fingerprint, groups, diags)


def _pin_ignored(gms: Sequence[nn.Module], t: Tracker, ignore: Sequence[Ignore]) -> None:
    modules = {f: m for g in gms for f, m in g.named_modules()}
    for pattern in ignore:
        if isinstance(pattern, type):
            hits = [f for f, m in modules.items() if isinstance(m, pattern)]
        elif isinstance(pattern, str):
            hits = [f for f in modules if f and (f == pattern or fnmatch.fnmatchcase(f, pattern)
                                                 or f.startswith(pattern + "."))]
        else:
            raise ConfigError(
                f"ignore entries must be module names, glob patterns or nn.Module types; "
                f"got {pattern!r}"
            )
        if not hits:
            raise ConfigError(
                f"ignore={pattern!r} matches no module of the model. Use a module name from "
                f"model.named_modules(), e.g. {next(iter(f for f in modules if f), '')!r}."
            )
        hitset = set(hits)
        for (fqn, _side), rec in t.members.items():
            if fqn in hitset:
                t.pin(rec.ids, f"{fqn} is in ignore= ({pattern!r})")


def _check_partition(groups: Sequence[ChannelGroup]) -> None:
    seen: dict[tuple[str, Side, int], str] = {}
    for g in groups:
        for m in g.members:
            for i in m.index_map.index:
                key = (m.module, m.side, i)
                if key in seen:
                    raise InvariantError(
                        f"position {i} of {m.module} {m.side.value}-axis is in groups "
                        f"{seen[key]!r} and {g.id!r}: grouping is not a partition"
                    )
                seen[key] = g.id
