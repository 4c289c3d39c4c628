"""Which channels of a channel group are dead: the evidence :func:`shrink.from_masks` uses.

See :mod:`shrink.interop.masks` for the policy. Readers are the IN members that consume a group into
another channel space; writers are the OUT members with filters (conv/linear); a layer with both
sides in the group and no IN weights (a depthwise conv) only carries it. Zero weights come from
each rule's ``score_params`` (and ``scale_params`` for votes), so no layer type is named here.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shrink.plan import ChannelGroup, Member, Side
from shrink.rules import rule_for


class Reconcile(enum.Enum):
    """How a group's members reconcile their masks (see :mod:`shrink.interop.masks`)."""

    ALL = "all"
    UNION = "union"


def readers(g: ChannelGroup, weights: Weights) -> list[Member]:
    """IN members that read the group into another channel space.

    A layer with both sides in the group and no weights on its IN axis (a depthwise conv)
    only *carries* the group: what it outputs on channel c is read by the group's readers.
    """
    out_mods = {m.module for m in g.members if m.side is Side.OUT}
    readers = []
    for m in g.members:
        if m.side is not Side.IN:
            continue
        if m.module in out_mods and weights.zero(m) is None:
            continue
        readers.append(m)
    return readers


def arrives_zero(
    folded: nn.Module, weights: Weights, groups: Sequence[ChannelGroup],
    probes: Sequence[tuple[Any, ...]],
) -> dict[str, torch.Tensor]:
    """Per reader module: whether each input-axis position is exactly 0 on every probe."""
    fqns = sorted({m.module for g in groups if g.prunable for m in readers(g, weights)})
    zero: dict[str, torch.Tensor] = {}
    handles = []
    for fqn in fqns:
        mod = folded.get_submodule(fqn)
        rule = rule_for(mod)
        if rule is None:
            continue

        def hook(m: nn.Module, args: tuple[Any, ...], fqn: str = fqn, rule: Any = rule) -> None:
            x = args[0]
            if not isinstance(x, torch.Tensor):
                return
            axis = rule.in_axis(m, x.ndim)
            z = (x.detach().movedim(axis, 0).reshape(x.shape[axis], -1) == 0).all(dim=1).cpu()
            zero[fqn] = z if fqn not in zero else zero[fqn] & z

        handles.append(folded.get_submodule(fqn).register_forward_pre_hook(hook))
    modes = [(m, m.training) for m in folded.modules()]
    try:
        folded.eval()
        with torch.no_grad():
            for x in probes:
                folded(*x)
    finally:
        for h in handles:
            h.remove()
        for m, mode in modes:
            m.training = mode
    return zero


def per_channel(g: ChannelGroup, member: Member, pos_zero: torch.Tensor) -> torch.Tensor:
    """Channel c is True when every position of ``member`` carrying c is True.

    Channels the member does not carry are True: neutral for the ANDs this feeds.
    """
    out = torch.ones(g.size, dtype=torch.bool)
    if not member.index_map.index:
        return out
    idx = torch.as_tensor(member.index_map.index, dtype=torch.long)
    ch = torch.as_tensor(member.index_map.channel, dtype=torch.long)
    vals = pos_zero[idx].to(torch.int8)
    res = torch.ones(g.size, dtype=torch.int8).scatter_reduce(0, ch, vals, reduce="amin")
    return res.bool()


class Weights:
    """Which axis positions of the folded model's layers have all-zero weights (memoised)."""

    def __init__(self, folded: nn.Module) -> None:
        self.modules = dict(folded.named_modules())
        self._memo: dict[tuple[str, Side, bool], torch.Tensor | None] = {}

    def zero(self, member: Member, *, scales: bool = False) -> torch.Tensor | None:
        key = (member.module, member.side, scales)
        if key not in self._memo:
            mod = self.modules.get(member.module)
            # a tensor used in forward or a size attribute has no layer weights to inspect: the
            # probes (arrives_zero) see what it adds to the channel
            self._memo[key] = None if mod is None else zero_slices(mod, member, scales)
        return self._memo[key]


def carried(g: ChannelGroup, member: Member) -> torch.Tensor:
    """Channels of ``g`` that ``member`` has at least one axis position for."""
    out = torch.zeros(g.size, dtype=torch.bool)
    out[torch.as_tensor(member.index_map.channel, dtype=torch.long)] = True
    return out


def zero_slices(mod: nn.Module, member: Member, scales: bool) -> torch.Tensor | None:
    """Per axis position: the layer's weights on it are all zero; None when it has none.

    Weights are the rule's ``score_params`` (conv/linear filters and input columns) and, with
    ``scales``, its per-channel scales on the OUT axis (a BatchNorm weight).
    """
    rule = rule_for(mod)
    params: Sequence[tuple[torch.Tensor, int]] = (
        rule.score_params(mod, member.side) if rule is not None else ())
    if scales and member.side is Side.OUT and rule is not None:
        params = (*params, *((p, 0) for p in rule.scale_params(mod)))
    if not params:
        return None
    zero = torch.ones(member.extent, dtype=torch.bool)
    for tensor, dim in params:
        t = tensor.detach().movedim(dim, 0)
        zero &= (t.reshape(t.shape[0], -1) == 0).all(dim=1).cpu()
    return zero


def dead_channels(
    g: ChannelGroup, weights: Weights, zero_at: dict[str, torch.Tensor], policy: Reconcile
) -> tuple[list[int], str]:
    """Dead channels of ``g`` under ``policy`` and, when some were masked but stay, why."""
    in_mods = {m.module for m in g.members if m.side is Side.IN}
    votes = torch.zeros(g.size, dtype=torch.bool)
    writers_silent = torch.ones(g.size, dtype=torch.bool)
    n_writers = 0
    ignores: dict[str, torch.Tensor] = {}
    for m in g.members:
        scaled = weights.zero(m, scales=True)
        if scaled is not None:  # channels the member does not carry get no vote
            votes |= per_channel(g, m, scaled) & carried(g, m)
        zero = weights.zero(m)
        if zero is None:  # a BatchNorm (or a depthwise conv's IN side) only carries the group
            continue
        per = per_channel(g, m, zero)
        if m.side is Side.IN:
            ignores[m.module] = per
        elif m.module not in in_mods or weights.zero(_as_in(m, g)) is not None:
            # a layer with an IN member but no IN weights (depthwise) only carries the group
            writers_silent &= per
            n_writers += 1
    if policy is Reconcile.UNION:
        return [c for c in range(g.size) if votes[c]], ""
    if n_writers == 0:
        writers_silent[:] = False
    dead = torch.ones(g.size, dtype=torch.bool)
    constant: dict[str, int] = {}  # reader -> masked-filter channels arriving nonzero there
    unmasked: dict[str, int] = {}  # reader -> channels other readers ignore but it reads
    group_readers = readers(g, weights)
    for r in group_readers:
        ignored = ignores.get(r.module, torch.zeros(g.size, dtype=torch.bool))
        arrived = zero_at.get(r.module)
        zero = writers_silent & per_channel(g, r, arrived) if arrived is not None else \
            torch.zeros(g.size, dtype=torch.bool)
        ok = ignored | zero
        if bool((writers_silent & ~ok).any()):
            constant[r.module] = int((writers_silent & ~ok).sum())
        if bool((votes & ~writers_silent & ~ok).any()):
            unmasked[r.module] = int((votes & ~writers_silent & ~ok).sum())
        dead &= ok
    if not group_readers:
        dead = writers_silent.clone()
    stay = int((votes & ~dead).sum())
    reasons = []
    if constant:
        fqn, n = next(iter(constant.items()))
        reasons.append(
            f"{n} channel(s) with masked filters reach {fqn!r} as a nonzero constant (a bias, a "
            "BatchNorm shift or an op with f(0) != 0), which it reads: mask the bias and the "
            "following BatchNorm's weight and bias too")
    if unmasked:
        fqn, n = next(iter(unmasked.items()))
        reasons.append(f"{n} channel(s) masked elsewhere in the group are still read by {fqn!r}: "
                       "mask them there too")
    why = ""
    if stay:
        why = (f"{stay} masked channel(s) stay because removing them would change the output: "
               + "; ".join(reasons or ["a layer of the group still reads them"])
               + " (or use policy='union')")
    return [c for c in range(g.size) if dead[c]], why


def _as_in(m: Member, g: ChannelGroup) -> Member:
    for other in g.members:
        if other.module == m.module and other.side is Side.IN:
            return other
    return m


def keep_channels(g: ChannelGroup, dead: list[int]) -> tuple[tuple[int, ...], str]:
    """Channels to keep: all but ``dead``, but every layer axis keeps at least one channel.

    A group can span several producers (``cat([a(x), b(x)])`` followed by a residual add): a
    layer whose every channel is dead still needs one, as PyTorch layers cannot be empty.
    """
    keep, note = _keep_blocks(g, dead)
    kept = set(keep)
    rescued = set()
    for m in g.members:
        if m.index_map.channel and not kept.intersection(m.index_map.channel):
            rescued.add(min(m.index_map.channel))
    if not rescued:
        return keep, note
    if g.blocks:  # keeping one more channel in a block would unbalance the blocks: keep all
        return tuple(range(g.size)), "dead channels stay: removing them would empty a layer"
    why = (f"{len(rescued)} dead channel(s) stay because removing them would leave a layer "
           "with no channels")
    return tuple(sorted(kept | rescued)), "; ".join(filter(None, [note, why]))


def _keep_blocks(g: ChannelGroup, dead: list[int]) -> tuple[tuple[int, ...], str]:
    """All channels but ``dead``, respecting grouped-conv blocks and never empty."""
    gone = set(dead)
    if g.blocks:
        labels = sorted(set(g.blocks))
        per_block = {b: [c for c in range(g.size) if g.blocks[c] == b] for b in labels}
        n = min(sum(c in gone for c in chans) for chans in per_block.values())
        n = min(n, min(len(chans) for chans in per_block.values()) - 1)
        drop = {c for chans in per_block.values() for c in [c for c in chans if c in gone][:n]}
        keep = tuple(c for c in range(g.size) if c not in drop)
        note = "" if len(drop) == len(gone) else (
            f"{len(gone) - len(drop)} dead channel(s) stay so that every conv group "
            "(block) keeps the same number of channels")
        return keep, note
    keep = tuple(c for c in range(g.size) if c not in gone)
    if not keep:
        return (0,), "every channel is dead; channel 0 stays because a layer needs one"
    return keep, ""
