"""analyze(captured) -> Analysis: the channel groups of a model and why some are pinned."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from torch import nn

from shrink.analysis.groups import build_groups
from shrink.analysis.propagate import MetaUnsupportedError, pin_special_modules, propagate
from shrink.capture import Captured, capture
from shrink.errors import CaptureError, ConfigError, InvariantError
from shrink.ids import Tracker
from shrink.plan import ChannelGroup, Side, mark_positions_checked
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
    frontend: str = "fx"
    """How the model was captured: ``"fx"``, ``"export"``, ``"parts"``, or ``"none"`` when
    nothing was (depth pruning alone)."""
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


def analyze(
    captured: Captured,
    *,
    ignore: Sequence[Ignore] = (),
    check: bool = True,
    source: nn.Module | None = None,
    grouped_convs: str = "channels",
    exact_only: bool = False,
    gqa: str = "groups",
) -> Analysis:
    """Find every group of channels that must be removed together.

    Args:
        captured: the output of :func:`shrink.capture`.
        ignore: module FQNs, glob patterns (``"layer4.*"``) or module types whose channels stay.
        check: verify the partition invariant (every module axis position in exactly one group).
        source: the original model, to re-capture on real tensors when a meta capture hits an
            op that cannot run on the meta device.
        grouped_convs: ``"channels"`` (default): every conv group loses the same number of
            channels and the layer keeps its group count; ``"groups"``: grouped convolutions
            lose whole conv groups and keep their group width (fewer, wider groups; on
            onnxruntime's CPU provider this measured slower, see ``shrink/rules/conv.py``).
        exact_only: pin channels that cannot be pruned exactly (normalised by a LayerNorm or
            RMSNorm) instead of making them inexact groups.
        gqa: grouped-query attention (Hugging Face Llama, Qwen, Mistral, ...): ``"groups"``
            (default) removes whole KV groups (a key/value head with its query heads; the KV
            cache shrinks too); ``"query"`` removes the same query heads from every KV group
            and keeps every key/value head.

    Returns:
        The groups (sorted in graph order) and diagnostics.

    Raises:
        ConfigError: when an ``ignore`` entry matches no module.

    Example:
        >>> a = shrink.analyze(shrink.capture(model, x))
        >>> [g.id for g in a.prunable][:3]
    """
    if grouped_convs not in ("groups", "channels"):
        raise ConfigError(f"grouped_convs must be 'groups' or 'channels', got {grouped_convs!r}")
    if gqa not in ("groups", "query"):
        raise ConfigError(f"gqa must be 'groups' (whole KV groups) or 'query' (query heads "
                          f"inside every KV group), got {gqa!r}")
    t = Tracker(grouped_convs=grouped_convs, exact_only=exact_only, gqa=gqa)
    try:
        propagate(captured, t)
    except MetaUnsupportedError as e:
        if source is None:
            raise CaptureError(
                f"an op of the model cannot run on the meta device ({e.__cause__}); capture "
                "with on_meta=False or pass source= to analyze"
            ) from e
        frontend = getattr(captured.graph_module, "_shrink_frontend", "fx")
        captured = capture(source, captured.example_inputs, leaf_types=_leaf_types(captured),
                           frontend=frontend)
        t = Tracker(grouped_convs=grouped_convs, exact_only=exact_only, gqa=gqa)
        propagate(captured, t)
    t.resolve_deferred()
    _tensor_members(t)
    for g in captured.graph_modules:
        pin_special_modules(g, t)
    _pin_ignored(captured.graph_modules, t, ignore)
    if captured.parts is not None:  # captured in parts (shrink.capture_parts)
        t.diagnose("partial capture", captured.parts.describe())
        for (fqn, _side), rec in t.members.items():
            for layer, reason in captured.parts.pins:
                if fqn == layer:
                    t.pin(rec.ids, reason)
    modules = {f: m for g in captured.graph_modules for f, m in g.named_modules()}
    extents: dict[tuple[str, Side], int] = {}
    for fqn, side in t.members:
        if side.tensor_axis is not None:
            extents[(fqn, side)] = int(t.tensors[fqn][0].shape[side.tensor_axis])
            continue
        if side is Side.ATTR:
            extents[(fqn, side)] = len(t.members[(fqn, side)].ids)
            continue
        rule = rule_for(modules[fqn])
        ext = None if rule is None else rule.extent(modules[fqn], side)
        if ext is None:
            raise InvariantError(f"{fqn} recorded a {side.value} axis its rule does not define")
        extents[(fqn, side)] = ext
    groups = build_groups(t, extents)
    if check:
        _check_partition(groups)
        mark_positions_checked(groups)  # positions in range by construction, none twice
    diags = tuple(Diagnostic(sev, msg) for sev, msg in dict.fromkeys(t.diagnostics))
    return Analysis(captured.fingerprint, groups, diags, frontend=captured.frontend)


def _tensor_members(t: Tracker) -> None:
    """A parameter/buffer used directly in forward (a ViT's position embedding, ConvNeXt's layer
    scale) had an id per element. If its ids line up with one axis (every slice along the others
    is one channel, distinct channels along it), that axis is a member and the tensor is sliced
    with its group; otherwise nothing says how to slice it, so its channels are pinned."""
    for name, (full, reason) in t.tensors.items():
        roots = t.roots(full.ravel()).reshape(full.shape)
        axis = None
        for a in sorted(range(full.ndim), key=lambda d: (-full.shape[d], d)):
            if full.shape[a] < 2:
                continue
            line = roots[tuple(slice(None) if d == a else slice(0, 1) for d in range(full.ndim))]
            if np.array_equal(np.broadcast_to(line, roots.shape), roots) and len(
                np.unique(line)
            ) == full.shape[a]:
                axis = a
                break
        if axis is None or axis > 5:
            t.pin(full.ravel(), reason + " and its elements do not line up with one channel axis")
            continue
        t.member(name, Side.dim(axis), line.ravel())


def _leaf_types(captured: Captured) -> tuple[type[nn.Module], ...]:
    tracer = getattr(captured.graph_module, "_shrink_leaf_types", ())
    return tuple(tracer)


def _pin_ignored(gms: Sequence[nn.Module], t: Tracker, ignore: Sequence[Ignore]) -> None:
    if not ignore:
        return
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
    """Every position of every module axis is in exactly one group."""
    per_axis: dict[tuple[str, Side], list[tuple[tuple[int, ...], str]]] = {}
    for g in groups:
        for m in g.members:
            per_axis.setdefault((m.module, m.side), []).append((m.index_map.index, g.id))
    for (module, side), parts in per_axis.items():
        if len(parts) == 1 and len(set(parts[0][0])) == len(parts[0][0]):
            continue  # one member, no position twice: the usual case
        counts: dict[int, str] = {}
        for index, gid in parts:
            for i in index:
                if i in counts:
                    raise InvariantError(
                        f"position {i} of {module} {side.value}-axis is in groups "
                        f"{counts[i]!r} and {gid!r}: grouping is not a partition"
                    )
                counts[i] = gid
