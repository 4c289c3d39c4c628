"""Channel identities: the abstract value that analysis propagates through the graph.

Every element of every tensor in the captured graph carries an integer *id*. A producer (a conv's
output channels, a model input, an op shrink does not understand) allocates fresh ids; every other
op moves ids around exactly as it moves data (cat concatenates, flatten repeats, transpose
permutes, split slices) or *unions* them when two elements must be removed together (a residual
add, a depthwise conv, a module called twice). After propagation, the union-find roots are the
group channels and the allocation batches they share are the groups.

Ids are stored compressed: an array with the tensor's rank where a dim along which ids do not vary
(spatial dims, the batch) has length 1. Only reshapes materialise the full array.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from shrink.plan import Side


@dataclass(frozen=True, slots=True, eq=False)
class Ids:
    """Channel ids of a tensor: ``a`` broadcasts to ``shape``."""

    a: np.ndarray
    shape: tuple[int, ...]

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def full(self) -> np.ndarray:
        return np.broadcast_to(self.a, self.shape)

    def varies(self, dim: int) -> bool:
        return self.a.shape[dim] > 1

    def with_shape(self, shape: tuple[int, ...]) -> Ids:
        """Same ids, viewed with a new shape where only non-varying dims may change size."""
        return Ids(self.a, tuple(shape))


def compress(arr: np.ndarray) -> np.ndarray:
    """Shrink every dim along which ``arr`` is constant to length 1."""
    out = arr
    for d in range(out.ndim):
        if out.shape[d] > 1:
            first = out.take([0], axis=d)
            if np.array_equal(np.broadcast_to(first, out.shape), out):
                out = first
    return np.ascontiguousarray(out)


def make_ids(arr: np.ndarray, shape: tuple[int, ...]) -> Ids:
    return Ids(compress(np.asarray(arr, dtype=np.int64)), tuple(int(s) for s in shape))


@dataclass(slots=True)
class Batch:
    start: int
    size: int
    label: str
    order: int


@dataclass(slots=True)
class MemberRecord:
    ids: np.ndarray  # 1-D, one id per axis position
    order: int


class Tracker:
    """Union-find over channel ids plus what analysis records about them."""

    def __init__(self, *, grouped_convs: str = "channels", exact_only: bool = False,
                 gqa: str = "groups") -> None:
        #: pin channels whose pruning cannot be exact (LayerNorm statistics) instead of pruning
        #: them as inexact groups
        self.exact_only = exact_only
        #: parameters/buffers used directly in forward: an id per element; analysis makes them
        #: members along the one axis their channels line up with (else they pin)
        self.tensors: dict[str, tuple[np.ndarray, str]] = {}
        self.deferred: list[tuple[np.ndarray, tuple[int, ...], str]] = []
        #: how grouped convolutions shrink: "groups" drops whole conv groups (each group's
        #: input and output channels are one group channel, the layer keeps its group width);
        #: "channels" drops the same number of channels inside every conv group
        self.grouped_convs = grouped_convs
        #: grouped-query attention: "groups" drops whole KV groups, "query" drops the same
        #: query heads of every KV group (shrink.rules.hf)
        self.gqa = gqa
        self._parent = np.arange(4096, dtype=np.int64)
        self.n = 0
        self.batches: list[Batch] = []
        self.pins: dict[int, str] = {}
        self.inexact: dict[int, str] = {}
        self.members: dict[tuple[str, Side], MemberRecord] = {}
        self.blocks: list[tuple[str, np.ndarray, int]] = []
        self.diagnostics: list[tuple[str, str]] = []

    # -------------------------------------------------------------- allocation
    def fresh(self, n: int, label: str) -> np.ndarray:
        start = self.n
        if start + n > len(self._parent):
            grown = np.arange(max(2 * len(self._parent), start + n), dtype=np.int64)
            grown[:start] = self._parent[:start]
            self._parent = grown
        self.n = start + n
        self.batches.append(Batch(start, n, label, len(self.batches)))
        return np.arange(start, start + n, dtype=np.int64)

    def fresh_pinned(self, shape: tuple[int, ...], label: str, reason: str) -> Ids:
        """One pinned id for a whole tensor: nothing about its layout is known."""
        ids = self.fresh(1, label)
        self.pins.setdefault(int(ids[0]), reason)
        return Ids(ids.reshape((1,) * len(shape)), tuple(shape))

    # -------------------------------------------------------------- union-find
    def find(self, i: int) -> int:
        return int(self.roots(np.asarray([i]))[0])

    def roots(self, arr: np.ndarray) -> np.ndarray:
        """Union-find roots of every id in ``arr`` (vectorised, with path compression)."""
        parent = self._parent
        r = parent[arr]
        while True:
            rr = parent[r]
            if np.array_equal(rr, r):
                break
            r = rr
        parent[arr] = r
        return r

    def union(self, a: np.ndarray, b: np.ndarray) -> None:
        """Union ``a`` and ``b`` elementwise (after broadcasting); negative ids are ignored."""
        a, b = np.broadcast_arrays(np.asarray(a, dtype=np.int64), np.asarray(b, dtype=np.int64))
        a, b = a.ravel(), b.ravel()
        keep = (a >= 0) & (b >= 0)
        if not keep.all():
            a, b = a[keep], b[keep]
        ra, rb = self.roots(a), self.roots(b)
        diff = ra != rb
        if not diff.any():
            return
        keys = np.unique((ra[diff] << 32) | rb[diff])
        if len(keys) <= 8:
            for key in keys.tolist():
                self._link(key >> 32, key & 0xFFFFFFFF)
            return
        # many pairs of roots (a channel-wise union): link each component of the pairs to its
        # smallest root at once, which is where linking pair by pair ends up too
        nodes, node = np.unique(np.concatenate([keys >> 32, keys & 0xFFFFFFFF]),
                                return_inverse=True)
        label = smallest_connected(len(nodes), node[: len(keys)], node[len(keys):])
        self._parent[nodes] = nodes[label]

    def union_all(self, arr: np.ndarray) -> None:
        flat = np.unique(arr)
        flat = flat[flat >= 0]
        if len(flat) > 1:
            self.union(np.full(len(flat) - 1, flat[0]), flat[1:])

    def _link(self, x: int, y: int) -> None:
        parent = self._parent
        while parent[x] != x:
            x = int(parent[x])
        while parent[y] != y:
            y = int(parent[y])
        if x != y:
            if x < y:
                x, y = y, x
            parent[x] = y  # the smaller id is the root: roots follow allocation order

    # -------------------------------------------------------------- records
    def pin(self, arr: np.ndarray, reason: str) -> None:
        for x in np.unique(arr).tolist():
            if x >= 0:
                self.pins.setdefault(x, reason)

    def pin_if_channel_axis(self, arr: np.ndarray, dims: tuple[int, ...] | int,
                            reason: str) -> None:
        """Pin ``arr`` unless, once propagation is done, its ids along ``dims`` all belong to
        one channel (their roots agree), i.e. unless those axes are not channel axes after all.

        Ids can vary along an axis that never shrinks: a position embedding has an id per
        element, and only the later unions show its token axis carries one channel per column.
        Slicing or reducing such an axis is safe; slicing a real channel axis is not.
        """
        dims = (dims,) if isinstance(dims, int) else tuple(dims)
        if any(arr.shape[d] > 1 for d in dims):
            self.deferred.append((np.array(arr, copy=True), dims, reason))

    def resolve_deferred(self) -> None:
        for arr, dims, reason in self.deferred:
            roots = self.roots(arr.ravel()).reshape(arr.shape)
            for d in dims:
                if not np.array_equal(np.broadcast_to(roots.take([0], axis=d), roots.shape), roots):
                    self.pin(arr, reason)
                    break
        self.deferred.clear()

    def mark_inexact(self, arr: np.ndarray, reason: str) -> None:
        for x in np.unique(arr).tolist():
            if x >= 0:
                self.inexact.setdefault(x, reason)

    def member(self, fqn: str, side: Side, ids: np.ndarray) -> None:
        """Record that axis ``side`` of module ``fqn`` carries ``ids`` (one per position).

        A module called more than once (shared weights) has one axis: its calls are unioned.
        """
        ids = np.asarray(ids, dtype=np.int64).ravel()
        prev = self.members.get((fqn, side))
        if prev is None:
            self.members[(fqn, side)] = MemberRecord(ids.copy(), len(self.members))
        else:
            self.union(prev.ids, ids)

    def block_constraint(self, fqn: str, ids: np.ndarray, nblocks: int) -> None:
        """Positions of ``ids`` fall into ``nblocks`` equal blocks that must shrink equally."""
        self.blocks.append((fqn, np.asarray(ids, dtype=np.int64).ravel(), nblocks))

    def diagnose(self, severity: str, message: str) -> None:
        self.diagnostics.append((severity, message))


def smallest_connected(n: int, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """For nodes ``0..n-1`` joined by the edges ``a[k]``-``b[k]``: the smallest node of each
    node's connected component.

    The smallest label is propagated along the edges, with pointer jumping (a label's label is
    in the same component and no larger), until nothing changes: then labels agree across
    every edge, so each component has one label, which is its smallest node (a node's label is
    never larger than the node).
    """
    label = np.arange(n, dtype=np.int64)
    while len(a):
        low = np.minimum(label[a], label[b])
        new = label.copy()
        np.minimum.at(new, a, low)
        np.minimum.at(new, b, low)
        while True:
            jumped = new[new]
            if np.array_equal(jumped, new):
                break
            new = jumped
        if np.array_equal(new, label):
            break
        label = new
    return label


# ------------------------------------------------------------------ helpers on values
def channel_ids(t: Tracker, ids: Ids, dim: int) -> np.ndarray:
    """The 1-D ids of axis ``dim``; ids that vary along other dims are unioned per channel.

    A conv or linear consumes every element of a channel slice as one channel, so whatever ids
    those elements carry must go together.
    """
    dim = dim % ids.ndim
    arr = np.moveaxis(ids.a, dim, 0)
    flat = arr.reshape(arr.shape[0], -1)
    if flat.shape[1] > 1:
        t.union(flat[:, :1], flat)
    col0 = np.broadcast_to(flat[:, 0], (ids.shape[dim],)).copy()
    if (col0 < 0).any():  # a one-element tensor feeding a layer: its one channel stays
        col0[col0 < 0] = t.fresh(1, "constant")[0]
        t.pin(col0, "a constant tensor feeds this layer")
    return col0


def ids_on_axis(ids1d: np.ndarray, shape: tuple[int, ...], dim: int) -> Ids:
    """A tensor whose ids vary only along ``dim``."""
    dim = dim % len(shape)
    view = [1] * len(shape)
    view[dim] = len(ids1d)
    return Ids(np.asarray(ids1d, dtype=np.int64).reshape(view), tuple(shape))


def map_values(fn: Callable[[Any], Any], value: Any) -> Any:
    """Apply ``fn`` to every leaf of a (tuple/list/dict) structure."""
    if isinstance(value, (tuple, list)):
        mapped = [map_values(fn, v) for v in value]
        return type(value)(mapped) if isinstance(value, list) else tuple(mapped)
    if isinstance(value, dict):
        return {k: map_values(fn, v) for k, v in value.items()}
    return fn(value)


def iter_ids(value: Any) -> Iterator[Ids]:
    """Every :class:`Ids` inside a structure."""
    if isinstance(value, Ids):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from iter_ids(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from iter_ids(v)


@dataclass(slots=True)
class Call:
    """What a rule sees of one graph node.

    ``args``/``kwargs`` hold :class:`Ids` where the runtime value was a tensor and the runtime
    value itself otherwise; ``out`` is the node's runtime output (for shapes); ``node`` is the fx
    node (to tell literal arguments from computed ones).
    """

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    out: Any
    node: Any
    name: str
    extra: dict[str, Any] = field(default_factory=dict)
    _where: str | None = None

    @property
    def where(self) -> str:
        """The user's source line that made the node (``file.py:LINE in fn``), for reasons:
        found from the node's stack trace when a rule first asks."""
        if self._where is None:
            self._where = source_location(self.node)
        return self._where

    def arg(self, i: int, name: str, default: Any = None) -> Any:
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def node_arg(self, i: int, name: str) -> Any:
        if len(self.node.args) > i:
            return self.node.args[i]
        return self.node.kwargs.get(name)


_FRAME = re.compile(r'File "([^"]+)", line (\d+), in (\S+)')


#: ``node.meta`` key of the user's source line that made an fx node (``file.py:LINE in fn``),
#: where shrink's tracer recorded it (:class:`shrink.capture._Tracer`)
WHERE = "shrink_where"


def source_location(node: Any) -> str:
    """``file.py:LINE in fn`` of the user code that created the fx ``node``, or its name."""
    where = node.meta.get(WHERE)
    if where is not None:
        return str(where)
    trace = node.stack_trace or ""
    frames = [f for f in _FRAME.findall(trace) if "/torch/" not in f[0] and "/shrink/" not in f[0]]
    if not frames:
        return f"node {node.name!r}"
    path, line, fn = frames[-1]
    return f"{path.rsplit('/', 1)[-1]}:{line} in {fn}"

