"""From propagated ids to channel groups.

After propagation every id has a union-find root; a root is one *group channel*. Two roots are in
the same *group* when they were allocated by the same producer (the ids of one ``fresh`` batch:
a conv's output channels, a model input): so a consumer of ``cat([a, b])`` has members in a's
group and in b's, while a residual add puts both branches' producers in one group.

Invariant (checked): every position of every recorded module axis belongs to exactly one group.
"""

from __future__ import annotations

from collections import defaultdict

import numpy as np

from shrink.errors import InvariantError
from shrink.ids import Tracker, smallest_connected
from shrink.plan import ChannelGroup, IndexMap, Member, Side


def build_groups(t: Tracker, extents: dict[tuple[str, Side], int]) -> tuple[ChannelGroup, ...]:
    n = t.n
    root = t.roots(np.arange(n, dtype=np.int64))
    cluster = _clusters(t, root)  # id -> its cluster: the smallest root sharing a batch with it

    cluster_channels, channel_of, label_of = _channels(t, root, cluster)

    # members
    members: dict[int, list[Member]] = defaultdict(list)
    spans: dict[int, tuple[int, ...]] = {}  # tuple(range(n)), shared by the axes of length n
    for (fqn, side), rec in sorted(t.members.items(), key=lambda kv: kv[1].order):
        cl = cluster[rec.ids]
        extent = extents.get((fqn, side), len(rec.ids))
        if extent != len(rec.ids):
            raise InvariantError(
                f"{fqn} {side.value}-axis has {extent} positions but analysis saw {len(rec.ids)}"
            )
        chans = channel_of[root[rec.ids]]
        if cl.size and cl.min() == cl.max():  # the usual case: the axis is one group's
            span = spans.get(len(cl))
            if span is None:
                span = spans[len(cl)] = tuple(range(len(cl)))
            members[int(cl[0])].append(Member(fqn, side, extent, IndexMap(
                span, tuple(chans.tolist()))))
            continue
        _, firsts = np.unique(cl, return_index=True)
        for c in cl[np.sort(firsts)].tolist():  # groups in order of their first position
            pos = np.flatnonzero(cl == c)
            members[c].append(Member(fqn, side, extent, IndexMap(
                tuple(pos.tolist()), tuple(chans[pos].tolist()))))

    # pins, inexactness, block constraints
    pin_reasons: dict[int, list[str]] = defaultdict(list)
    for i, reason in t.pins.items():
        c = int(cluster[i])
        if reason not in pin_reasons[c]:
            pin_reasons[c].append(reason)
    inexact = {int(cluster[i]) for i in t.inexact}
    blocks: dict[int, tuple[int, ...]] = {}
    for fqn, ids, nblocks in t.blocks:
        _apply_blocks(fqn, ids, nblocks, root, cluster, channel_of, cluster_channels, blocks,
                      pin_reasons)

    groups = []
    seen: dict[str, int] = {}
    for c, chans in sorted(cluster_channels.items(), key=lambda kv: _first_batch(kv[1], root, t)):
        if not any(m.side.tensor_axis is None and m.side is not Side.ATTR
                   for m in members.get(c, ())):
            continue  # no layer: only tensors/attributes that follow whatever owns the channels
        label = label_of[c]
        k = seen.get(label, 0)
        seen[label] = k + 1
        gid = label if k == 0 else f"{label}#{k + 1}"
        reasons = pin_reasons.get(c)
        groups.append(
            ChannelGroup(
                id=gid,
                size=len(chans),
                members=tuple(members[c]),
                pinned="; ".join(reasons[:3]) + (" ..." if len(reasons) > 3 else "")
                if reasons else None,
                exact=c not in inexact,
                blocks=blocks.get(c, ()) if not reasons else (),
            )
        )
    return tuple(groups)


def _clusters(t: Tracker, root: np.ndarray) -> np.ndarray:
    """The cluster of every id: roots allocated in one batch (the ids of one ``fresh``) are in
    one cluster, transitively, and a cluster is named by its smallest root.

    Computed as the connected components of the roots, with an edge from the root of every
    id to the root of its batch's first id.
    """
    if len(t.batches) == 0:
        return root.copy()
    # roots ascending, and node: id -> the index of its root among them (roots are ids, so a
    # presence mask over the ids numbers them without sorting)
    present = np.zeros(len(root), dtype=bool)
    present[root] = True
    roots = np.flatnonzero(present)
    node = (np.cumsum(present) - 1)[root]
    starts = np.fromiter((b.start for b in t.batches), dtype=np.int64, count=len(t.batches))
    sizes = np.diff(np.r_[starts, len(root)])
    first = node[np.repeat(starts, sizes)]  # the node of each id's batch's first id
    edge = node != first
    return roots[smallest_connected(len(roots), node[edge], first[edge])][node]


def _first_batch(chans: list[int], root: np.ndarray, t: Tracker) -> int:
    return min(chans)


def _channels(t: Tracker, root: np.ndarray, cluster: np.ndarray
              ) -> tuple[dict[int, list[int]], np.ndarray, dict[int, str]]:
    """Group channels: each root is one channel of its cluster, numbered in order of first
    appearance over the ids (which is batch order: batches are allocated one after another);
    a cluster's label is the label of the batch its first id belongs to.

    Returns ``{cluster: roots in channel order}``, the channel of every root (an array indexed
    by root id; -1 elsewhere) and ``{cluster: label}``.
    """
    roots, first = np.unique(root, return_index=True)  # every root and its first id
    by_cluster = np.lexsort((first, cluster[first]))  # by cluster, then first appearance
    clusters = cluster[first][by_cluster]
    starts = np.flatnonzero(np.r_[True, clusters[1:] != clusters[:-1]])
    rank = np.arange(len(by_cluster)) - np.repeat(starts, np.diff(np.r_[starts, len(clusters)]))
    channel_of = np.full(len(root), -1, dtype=np.int64)
    channel_of[roots[by_cluster]] = rank
    batch_starts = np.asarray([b.start for b in t.batches], dtype=np.int64)
    ordered = roots[by_cluster].tolist()
    ends = [*starts[1:].tolist(), len(ordered)]
    batches = (np.searchsorted(batch_starts, first[by_cluster[starts]], side="right") - 1
               ).tolist()
    cluster_channels: dict[int, list[int]] = {}
    label_of: dict[int, str] = {}
    for s, e, c, batch in zip(starts.tolist(), ends, clusters[starts].tolist(), batches,
                              strict=True):
        cluster_channels[c] = ordered[s:e]
        label_of[c] = t.batches[batch].label
    return cluster_channels, channel_of, label_of


def _apply_blocks(fqn: str, ids: np.ndarray, nblocks: int, root: np.ndarray,
                  cluster: np.ndarray, channel_of: np.ndarray,
                  cluster_channels: dict[int, list[int]], blocks: dict[int, tuple[int, ...]],
                  pin_reasons: dict[int, list[str]]) -> None:
    """Turn 'these positions form nblocks equal blocks' into a block label per group channel."""
    per = len(ids) // nblocks
    clusters = set(cluster[ids].tolist())
    why = None
    labels: dict[int, tuple[int, ...]] = {}
    if len(clusters) > 1:
        why = f"grouped conv {fqn} spans channels of several groups"
    elif clusters:
        (c,) = clusters
        chans = channel_of[root[ids]]
        block = np.arange(len(ids), dtype=np.int64) // per if per else np.zeros(len(ids), np.int64)
        size = len(cluster_channels[c])
        lo = np.full(size, np.iinfo(np.int64).max, dtype=np.int64)
        hi = np.full(size, -1, dtype=np.int64)
        np.minimum.at(lo, chans, block)
        np.maximum.at(hi, chans, block)
        seen = hi >= 0
        if bool((lo[seen] != hi[seen]).any()):
            why = f"grouped conv {fqn} would need one channel in two of its conv groups"
        elif not bool(seen.all()):
            why = f"grouped conv {fqn} covers only part of its channel group"
        else:
            labels[c] = tuple(lo.tolist())
    for c in clusters:
        if why is None:
            lab = labels[c]
            if blocks.get(c, lab) != lab:
                why = (f"grouped conv {fqn} and another grouped conv split the channels "
                       "differently")
            else:
                blocks[c] = lab
        if why is not None:
            pin_reasons[c].append(why)
