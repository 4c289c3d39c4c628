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
from shrink.ids import Tracker
from shrink.plan import ChannelGroup, IndexMap, Member, Side


def build_groups(t: Tracker, extents: dict[tuple[str, Side], int]) -> tuple[ChannelGroup, ...]:
    n = t.n
    root = t.roots(np.arange(n, dtype=np.int64))

    # cluster roots by shared allocation batch
    cparent = {int(r): int(r) for r in np.unique(root)}

    def cfind(x: int) -> int:
        while cparent[x] != x:
            cparent[x] = cparent[cparent[x]]
            x = cparent[x]
        return x

    for b in t.batches:
        rs = np.unique(root[b.start : b.start + b.size]).tolist()
        first = cfind(rs[0])
        for r in rs[1:]:
            cr = cfind(r)
            if cr != first:
                lo, hi = min(first, cr), max(first, cr)
                cparent[hi] = lo
                first = lo

    # vectorised lookup: id -> cluster of its root
    clu = np.zeros(n, dtype=np.int64)
    for r in cparent:
        clu[r] = cfind(r)
    cluster = clu[root]

    cluster_channels, channel_of, label_of = _channels(t, root, cluster)

    # members
    members: dict[int, list[Member]] = defaultdict(list)
    for (fqn, side), rec in sorted(t.members.items(), key=lambda kv: kv[1].order):
        cl = cluster[rec.ids]
        extent = extents.get((fqn, side), len(rec.ids))
        if extent != len(rec.ids):
            raise InvariantError(
                f"{fqn} {side.value}-axis has {extent} positions but analysis saw {len(rec.ids)}"
            )
        chans = channel_of[root[rec.ids]]
        if cl.size and bool((cl == cl[0]).all()):  # the usual case: the axis is one group's
            members[int(cl[0])].append(Member(fqn, side, extent, IndexMap(
                tuple(range(len(cl))), tuple(chans.tolist()))))
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
        _apply_blocks(fqn, ids, nblocks, root, cfind, channel_of, cluster_channels, blocks,
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
    cluster_channels: dict[int, list[int]] = {}
    label_of: dict[int, str] = {}
    for s, e in zip(starts.tolist(), ends, strict=True):
        c = int(clusters[s])
        cluster_channels[c] = ordered[s:e]
        batch = int(np.searchsorted(batch_starts, first[by_cluster[s]], side="right")) - 1
        label_of[c] = t.batches[batch].label
    return cluster_channels, channel_of, label_of


def _apply_blocks(fqn, ids, nblocks, root, cfind, channel_of, cluster_channels, blocks,  # type: ignore[no-untyped-def]
                  pin_reasons) -> None:
    """Turn 'these positions form nblocks equal blocks' into a block label per group channel."""
    per = len(ids) // nblocks
    clusters = {cfind(int(root[i])) for i in ids.tolist()}
    why = None
    labels: dict[int, dict[int, int]] = {c: {} for c in clusters}
    if len(clusters) > 1:
        why = f"grouped conv {fqn} spans channels of several groups"
    else:
        for k, i in enumerate(ids.tolist()):
            r = int(root[i])
            c = cfind(r)
            ch = int(channel_of[r])
            if labels[c].setdefault(ch, k // per) != k // per:
                why = f"grouped conv {fqn} would need one channel in two of its conv groups"
                break
    for c in clusters:
        if why is None:
            size = len(cluster_channels[c])
            if len(labels[c]) != size:
                why = f"grouped conv {fqn} covers only part of its channel group"
            else:
                lab = tuple(labels[c][ch] for ch in range(size))
                if blocks.get(c, lab) != lab:
                    why = (f"grouped conv {fqn} and another grouped conv split the channels "
                           "differently")
                else:
                    blocks[c] = lab
        if why is not None:
            pin_reasons[c].append(why)
