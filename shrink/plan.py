"""The plan: the only value that crosses from deciding what to prune to doing it.

A :class:`Plan` is plain data, keyed by module FQNs, and serialises to canonical JSON (sorted keys,
run-length encoded index maps) so plans diff cleanly, replay as goldens and never execute code when
loaded.

Channel coordinates. A :class:`ChannelGroup` of ``size`` channels is a set of tensor axes that must
shrink together. Each :class:`Member` is one module axis (``side`` IN or OUT of module ``module``);
its :class:`IndexMap` lists, for every axis position that belongs to the group, which group channel
it carries. A group channel may own several positions of one axis (``cat([x, x])``, or a flatten
into a Linear where channel ``c`` owns the block ``[c*H*W, (c+1)*H*W)``).
"""

from __future__ import annotations

import enum
import hashlib
import json
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from torch import nn

from shrink.errors import PlanError

SCHEMA = 1
MAX_POSITIONS = 1 << 24
"""Most channel positions (and the largest group) a plan may describe: run-length encoding lets a
few bytes of JSON ask for billions, so :meth:`Plan.from_dict` checks before expanding."""


class Side(enum.Enum):
    """Which axis a member is: a module's input channels, output channels or attention heads,
    axis ``k`` of a parameter/buffer used directly in ``forward`` (``DIM0`` ...; the member's
    ``module`` is then the tensor's FQN, e.g. ``"encoder.pos_embedding"``), or an int attribute
    that ``forward`` uses as a channel count (``ATTR``; ``module`` is ``"<owner>.<name>"``, e.g.
    a ViT's ``"hidden_dim"`` in ``x.reshape(n, self.hidden_dim, -1)``: it is set to the kept
    count)."""

    IN = "in"
    OUT = "out"
    HEADS = "heads"
    DIM0 = "dim0"
    DIM1 = "dim1"
    DIM2 = "dim2"
    DIM3 = "dim3"
    DIM4 = "dim4"
    DIM5 = "dim5"
    ATTR = "attr"

    @property
    def tensor_axis(self) -> int | None:
        """The axis of a tensor member, None for module members."""
        return int(self.value[3:]) if self.value.startswith("dim") else None

    @staticmethod
    def dim(axis: int) -> Side:
        return Side(f"dim{axis}")


@dataclass(frozen=True, slots=True)
class IndexMap:
    """Axis positions of one member and the group channel each carries.

    ``index[k]`` is a position on the module axis, ``channel[k]`` the group channel stored there.
    """

    index: tuple[int, ...]
    channel: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.index) != len(self.channel):
            raise PlanError(
                f"IndexMap has {len(self.index)} positions but {len(self.channel)} channels; "
                "they must pair up. The plan file is corrupt: re-create it with shrink.select."
            )

    def positions(self, channels: Iterable[int]) -> list[int]:
        """Axis positions carrying any of ``channels``."""
        wanted = set(channels)
        return [i for i, c in zip(self.index, self.channel, strict=False) if c in wanted]

    def to_runs(self) -> list[list[int]]:
        """Run-length encode as ``[index_start, length, channel_start, channel_step]`` rows."""
        runs: list[list[int]] = []
        for i, c in zip(self.index, self.channel, strict=False):
            if runs:
                start, n, c0, step = runs[-1]
                if i == start + n:
                    if n == 1 and c - c0 in (0, 1):
                        runs[-1] = [start, 2, c0, c - c0]
                        continue
                    if n > 1 and c == c0 + step * n:
                        runs[-1][1] += 1
                        continue
            runs.append([i, 1, c, 1])
        return runs

    @classmethod
    def from_runs(cls, runs: Iterable[Iterable[int]]) -> IndexMap:
        """Inverse of :meth:`to_runs`."""
        index: list[int] = []
        channel: list[int] = []
        for run in runs:
            start, n, c0, step = (int(v) for v in run)
            if n < 0 or step not in (0, 1):
                raise PlanError(
                    f"invalid index run {list(run)!r}: length must be >= 0, step 0 or 1"
                )
            index.extend(range(start, start + n))
            channel.extend(c0 + step * k for k in range(n))
        return cls(tuple(index), tuple(channel))


@dataclass(frozen=True, slots=True)
class Member:
    """One module axis that shrinks with a group.

    Attributes:
        module: FQN of the module, e.g. ``"layer1.0.conv1"``.
        side: IN (input channels/features) or OUT (output channels/features).
        extent: length of that axis in the original model, checked when the plan is applied.
        index_map: which positions of the axis belong to the group, and which channel each carries.
    """

    module: str
    side: Side
    extent: int
    index_map: IndexMap


@dataclass(frozen=True, slots=True)
class ChannelGroup:
    """Channels that must be removed together, with every module axis they touch.

    Attributes:
        id: stable name, ``"<first producer fqn>:out"`` or the producing node's name.
        size: number of group channels.
        members: the module axes that shrink with the group.
        pinned: why the group may not shrink, or None when it is prunable.
        exact: whether the masked oracle holds exactly along this group.
        blocks: block label per channel when grouped convolutions require that every block
            (conv group) drops the same number of channels; empty when unconstrained.
    """

    id: str
    size: int
    members: tuple[Member, ...]
    pinned: str | None = None
    exact: bool = True
    blocks: tuple[int, ...] = ()

    @property
    def prunable(self) -> bool:
        return self.pinned is None and self.size > 1


@dataclass(frozen=True, slots=True)
class Decision:
    """The channels of one group that stay, strictly ascending, in group coordinates."""

    group: str
    keep: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Plan:
    """A self-contained pruning plan: groups, decisions and the fingerprint of the model."""

    model: str
    groups: tuple[ChannelGroup, ...]
    decisions: tuple[Decision, ...]
    schema: int = SCHEMA
    _by_id: dict[str, ChannelGroup] = field(default_factory=dict, compare=False, repr=False)
    # computed on first use; init=False: dataclasses.replace makes a plan with an empty one
    _drops: dict[tuple[str, Side], list[int]] = field(default_factory=dict, init=False,
                                                      compare=False, repr=False)

    def __post_init__(self) -> None:
        by_id = {g.id: g for g in self.groups}
        if len(by_id) != len(self.groups):
            raise PlanError("plan has duplicate group ids; re-create it with shrink.select")
        self._by_id.update(by_id)
        if not positions_checked(self.groups):
            _check_positions(self.groups)
            mark_positions_checked(self.groups)
        self._check_decisions()

    def _check_decisions(self) -> None:
        by_id = self._by_id
        for d in self.decisions:
            g = by_id.get(d.group)
            if g is None:
                raise PlanError(f"decision names unknown group {d.group!r}")
            if not d.keep or list(d.keep) != sorted(set(d.keep)) or d.keep[-1] >= g.size:
                raise PlanError(
                    f"decision for group {d.group!r} must keep a non-empty, strictly ascending "
                    f"subset of range({g.size}); got {len(d.keep)} indices"
                )
            if g.pinned is not None and len(d.keep) != g.size:
                raise PlanError(f"decision drops channels of pinned group {d.group!r}: {g.pinned}")

    def __deepcopy__(self, memo: dict[int, object]) -> Plan:
        """A plan is an immutable value (its caches are derived from it), so a deep copy of a
        model that carries its plans (:mod:`shrink.provenance`) shares them."""
        return self

    def with_decisions(self, decisions: Iterable[Decision]) -> Plan:
        """This plan's groups with other decisions (the groups are not checked again).

        Example:
            >>> half = plan.with_decisions(plan.decisions[: len(plan.decisions) // 2])
        """
        new = object.__new__(Plan)
        values: tuple[object, ...] = (self.model, self.groups, tuple(decisions), self.schema,
                                      self._by_id, {})
        for name, value in zip(("model", "groups", "decisions", "schema", "_by_id", "_drops"),
                               values, strict=True):
            object.__setattr__(new, name, value)
        new._check_decisions()
        return new

    def group(self, gid: str) -> ChannelGroup:
        return self._by_id[gid]

    def drops(self) -> dict[tuple[str, Side], list[int]]:
        """Axis positions to remove, per (module FQN, side), ascending (computed once per
        plan: treat the lists as read-only)."""
        if not self._drops:
            self._drops.update(self._compute_drops())
        return dict(self._drops)

    def _compute_drops(self) -> dict[tuple[str, Side], list[int]]:
        out: dict[tuple[str, Side], set[int]] = {}
        for d in self.decisions:
            g = self._by_id[d.group]
            dropped = set(range(g.size)) - set(d.keep)
            if not dropped:
                continue
            for m in g.members:
                im = m.index_map
                # a member whose positions carry the channels of the same number (the usual
                # case): its dropped positions are the dropped channels it has
                out.setdefault((m.module, m.side), set()).update(
                    dropped.intersection(im.index) if im.index == im.channel
                    else im.positions(dropped))
        ordered = sorted(out.items(), key=lambda kv: (kv[0][0], kv[0][1].value))
        return {k: sorted(v) for k, v in ordered}

    def extents(self) -> dict[tuple[str, Side], int]:
        return {(m.module, m.side): m.extent for g in self.groups for m in g.members}

    # ------------------------------------------------------------------ JSON
    def to_dict(self) -> dict[str, object]:
        return {
            "schema": self.schema,
            "model": self.model,
            "groups": [
                {
                    "id": g.id,
                    "size": g.size,
                    "pinned": g.pinned,
                    "exact": g.exact,
                    "blocks": list(g.blocks),
                    "members": [
                        {
                            "module": m.module,
                            "side": m.side.value,
                            "extent": m.extent,
                            "runs": m.index_map.to_runs(),
                        }
                        for m in g.members
                    ],
                }
                for g in self.groups
            ],
            "decisions": [{"group": d.group, "keep": list(d.keep)} for d in self.decisions],
        }

    def to_json(self) -> str:
        """Canonical JSON: sorted keys, compact index runs."""
        return json.dumps(self.to_dict(), sort_keys=True, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes) -> Plan:
        """Parse a plan; raises :class:`PlanError` on anything malformed. Never executes code."""
        try:
            data = json.loads(text)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise PlanError(f"plan is not valid JSON ({e}); was the file truncated?") from e
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: object) -> Plan:
        if not isinstance(data, Mapping):
            raise PlanError("plan JSON must be an object with 'schema', 'model', 'groups'")
        schema = data.get("schema")
        if schema != SCHEMA:
            raise PlanError(
                f"plan schema {schema!r} is not supported (this shrink reads schema {SCHEMA}); "
                "re-create the plan with this version of shrink"
            )
        _check_size(data)
        try:
            groups = tuple(
                ChannelGroup(
                    id=str(g["id"]),
                    size=int(g["size"]),
                    pinned=None if g.get("pinned") is None else str(g["pinned"]),
                    exact=bool(g.get("exact", True)),
                    blocks=tuple(int(b) for b in g.get("blocks", ())),
                    members=tuple(
                        Member(
                            module=str(m["module"]),
                            side=Side(m["side"]),
                            extent=int(m["extent"]),
                            index_map=IndexMap.from_runs(m["runs"]),
                        )
                        for m in g["members"]
                    ),
                )
                for g in data["groups"]
            )
            decisions = tuple(
                Decision(group=str(d["group"]), keep=tuple(int(k) for k in d["keep"]))
                for d in data["decisions"]
            )
            return cls(model=str(data["model"]), groups=groups, decisions=decisions)
        except PlanError:
            raise
        except (KeyError, TypeError, ValueError, AttributeError, OverflowError) as e:
            raise PlanError(f"plan JSON is malformed: {type(e).__name__}: {e}") from e


#: the last group tuples that passed :func:`_check_positions`, by id (held, so that an id stays
#: theirs): plans made of one analysis's groups (a select, the probe's re-plans) check them once
_CHECKED: dict[int, tuple[ChannelGroup, ...]] = {}
_CHECKED_LOCK = threading.Lock()


def positions_checked(groups: tuple[ChannelGroup, ...]) -> bool:
    """Whether ``groups`` (this very tuple) passed :func:`_check_positions` or was vouched
    for with :func:`mark_positions_checked`."""
    return _CHECKED.get(id(groups)) is groups


def mark_positions_checked(groups: tuple[ChannelGroup, ...]) -> None:
    """Record that ``groups`` satisfy :func:`_check_positions`, so plans over them skip it.

    For groups valid by construction: the analysis's (:func:`shrink.analysis.groups.build_groups`
    takes each position from its axis and each channel from its group, and the analysis checks
    that no position is in two groups), and the same groups with some pinned
    (:func:`shrink.probe.pin` changes no position). A plan read from JSON is always checked.
    """
    with _CHECKED_LOCK:  # plans may be made in several threads
        _CHECKED[id(groups)] = groups
        while len(_CHECKED) > 8:
            _CHECKED.pop(next(iter(_CHECKED)))


def _check_positions(groups: Sequence[ChannelGroup]) -> None:
    """Every index map stays inside its axis and its group; no axis position is listed twice.

    (An out-of-range position would otherwise be ignored by apply on one layer but not on the
    layers it must fit, building a model that fails at run time.) Checked with set and min/max
    over whole maps; :func:`_find_bad_position` names the first bad position.
    """
    seen: dict[tuple[str, Side], set[int]] = {}
    for g in groups:
        for m in g.members:
            index, channel = m.index_map.index, m.index_map.channel
            axis = seen.setdefault((m.module, m.side), set())
            before = len(axis)
            axis.update(index)
            if index and (len(axis) != before + len(index) or min(index) < 0
                          or max(index) >= m.extent or min(channel) < 0
                          or max(channel) >= g.size):
                _find_bad_position(groups)


def _find_bad_position(groups: Sequence[ChannelGroup]) -> None:
    seen: set[tuple[str, Side, int]] = set()
    for g in groups:
        for m in g.members:
            for i, c in zip(m.index_map.index, m.index_map.channel, strict=True):
                if not (0 <= i < m.extent and 0 <= c < g.size) or (m.module, m.side, i) in seen:
                    raise PlanError(
                        f"group {g.id!r} maps channel {c} to position {i} of {m.module!r} "
                        f"({m.side.value}put axis of {m.extent}, group of {g.size}): outside the "
                        "axis or group, or listed twice. The plan is corrupt: re-create it with "
                        "shrink.prune."
                    )
                seen.add((m.module, m.side, i))


def _check_size(data: Mapping[str, object]) -> None:
    """Refuse plans that would expand to more than MAX_POSITIONS positions, before expanding.

    Sizes and index runs must be JSON integers (what :meth:`Plan.to_dict` writes).
    """
    total = 0
    groups = data.get("groups")
    for g in groups if isinstance(groups, list) else ():
        if not isinstance(g, Mapping):
            continue
        size = g.get("size", 0)
        if not isinstance(size, int) or not 0 <= size <= MAX_POSITIONS:
            raise PlanError(f"plan JSON is malformed: group size {size!r} must be an integer "
                            f"in [0, {MAX_POSITIONS}]")
        members = g.get("members")
        for m in members if isinstance(members, list) else ():
            runs = m.get("runs") if isinstance(m, Mapping) else None
            for run in runs if isinstance(runs, list) else ():
                if not (isinstance(run, list) and all(isinstance(v, int) for v in run)):
                    raise PlanError(f"plan JSON is malformed: index run {str(run)[:40]} must be "
                                    "a list of integers")
                total += max(run[1], 0) if len(run) > 1 else 0
                if total > MAX_POSITIONS:
                    raise PlanError(
                        f"plan JSON is malformed: it lists more than {MAX_POSITIONS} channel "
                        "positions (corrupt or hostile)"
                    )


def fingerprint(model: nn.Module, *, caches: bool = False) -> str:
    """sha256 over the sorted (name, shape, dtype) of every parameter and persistent buffer.

    Non-persistent buffers are caches a forward may replace (timm's ConViT sets
    ``rel_indices`` to the token grid it first sees), so a model's fingerprint must not depend
    on them. ``caches=True``: include them, as plans saved before 2026-11-30 did
    (:func:`fits`)."""
    items = []
    params: set[int] = set()
    buffers: set[int] = set()
    # named_parameters() + named_buffers() in one walk: each lists a tensor once, by the name
    # of its first holder in named_modules() order
    for prefix, mod in model.named_modules():
        dot = f"{prefix}." if prefix else ""
        skip = () if caches else mod._non_persistent_buffers_set
        for tensors, seen in ((mod._parameters, params), (mod._buffers, buffers)):
            for name, t in tensors.items():
                if t is not None and id(t) not in seen and name not in skip:
                    seen.add(id(t))
                    items.append((dot + name, tuple(t.shape), str(t.dtype)))
    items.sort()
    return hashlib.sha256(repr(items).encode()).hexdigest()[:16]


def fits(model: nn.Module, fp: str) -> bool:
    """Whether a plan fingerprinted ``fp`` was made for ``model``'s architecture (by today's
    :func:`fingerprint` or by the older one that counted non-persistent buffers)."""
    return fp == fingerprint(model) or fp == fingerprint(model, caches=True)
