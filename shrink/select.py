"""Selection policies: turn scores into a :class:`~shrink.plan.Plan`.

* :class:`Uniform` removes the same fraction (or absolute number) of channels from every
  prunable group (``scope="local"``).
* :class:`Target` is a budget (remove 50% of MACs or parameters) over a Uniform/Global template;
  :func:`shrink.allocate.solve_target` turns it into a concrete policy.
* a latency budget (:class:`shrink.latency.LatencyTarget`) is solved by
  :func:`shrink.latency.solve_latency`, which chooses every group's kept count among
  :func:`candidate_counts`; :func:`plan_from_counts` turns the counts into a plan.
* :class:`Global` ranks channels across groups by their score divided by the group's mean score,
  and removes the lowest ``ratio`` of all prunable channels, at least ``min_ratio`` (floor) and
  never more than ``max_ratio`` (ceiling) of any one group. Floors are served first, from each
  group's lowest-scored channels, and count against the budget.

``overrides`` (both policies) give some groups their own ratio: ``(("layer4.*", 0.2), ...)``.
A pattern (fnmatch glob or exact name) applies to a group when it matches the group id or a
module whose *output* channels belong to the group (its producers and their norms); the first
matching pattern wins. A pattern matching no prunable group is an error. Under ``Global``,
overridden groups are left out of the ranking and the budget ``ratio`` covers the other groups.

Both round the kept count up to a multiple of ``round_to`` (capped at the group size; ``"auto"``
rounds groups of 16+ channels to 16, see :func:`auto_step`; grouped-conv and head groups are not
rounded), keep at least ``min_keep`` channels, and respect grouped-conv blocks (every block drops
the same number).
Ties are broken by channel index (lower index dropped first), so plans are deterministic.
"""

from __future__ import annotations

import enum
import fnmatch
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from shrink.errors import ConfigError
from shrink.plan import ChannelGroup, Decision, Plan, Side

Ratio = float | int
Overrides = tuple[tuple[str, Ratio], ...]


def _check_ratio(ratio: float | int, name: str = "ratio") -> None:
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
        raise ConfigError(
            f"{name} must be a float in [0, 1) (fraction of channels removed per group) or an int "
            f">= 0 (channels removed per group); got {type(ratio).__name__} {ratio!r}"
        )
    if isinstance(ratio, float) and not (0.0 <= ratio < 1.0):
        raise ConfigError(
            f"{name}={ratio} is out of range: a float ratio must be in [0, 1) "
            "(1.0 would remove every channel). For a channel count, pass an int."
        )
    if isinstance(ratio, int) and ratio < 0:
        raise ConfigError(f"{name}={ratio}: an absolute channel count must be >= 0")


@dataclass(frozen=True, slots=True)
class Uniform:
    """Remove ``ratio`` of each group's channels (or ``ratio`` channels when it is an int)."""

    ratio: float | int
    round_to: int | str = 1
    min_keep: int = 1
    overrides: Overrides = ()

    def __post_init__(self) -> None:
        _check_ratio(self.ratio)
        _check_round(self.round_to, self.min_keep)
        _check_overrides(self.overrides)


@dataclass(frozen=True, slots=True)
class Global:
    """Remove the globally least important ``ratio`` of all prunable channels."""

    ratio: float | int
    round_to: int | str = 1
    min_keep: int = 1
    max_ratio: float = 0.9
    min_ratio: float = 0.0
    overrides: Overrides = ()

    def __post_init__(self) -> None:
        _check_ratio(self.ratio)
        _check_round(self.round_to, self.min_keep)
        _check_overrides(self.overrides)
        if not 0.0 < self.max_ratio < 1.0:
            raise ConfigError(f"max_ratio must be in (0, 1), got {self.max_ratio}")
        if not 0.0 <= self.min_ratio <= self.max_ratio:
            raise ConfigError(
                f"min_ratio={self.min_ratio} must be in [0, max_ratio={self.max_ratio}]: it is the "
                "fraction every group loses at least (floor); max_ratio is the ceiling"
            )


class Metric(enum.Enum):
    """What a :class:`Target` budget counts."""

    MACS = "macs"
    PARAMS = "params"


@dataclass(frozen=True, slots=True)
class Target:
    """Remove ``ratio`` of the model's MACs or parameters; shrink solves for the channel ratio.

    Attributes:
        ratio: fraction of the metric removed, in (0, 1): ``0.5`` keeps 50% of the MACs.
        metric: :attr:`Metric.MACS` (measured on the example inputs) or :attr:`Metric.PARAMS`.
        policy: how channels are chosen; its ``ratio`` is what gets solved (``Global`` by default).
        tolerance: accept a solution whose kept fraction is within this *relative* error of
            ``1 - ratio``.
        max_iter: bisection steps before returning the closest solution found.

    Example:
        >>> cfg = shrink.PruneConfig(0.5, target="macs")   # builds this Target
        >>> res = shrink.prune(model, x, cfg)   # res.report.mac_ratio ~= 0.5
    """

    ratio: float
    metric: Metric = Metric.MACS
    policy: Uniform | Global = field(default_factory=lambda: Global(0.0))
    tolerance: float = 0.005
    max_iter: int = 30

    def __post_init__(self) -> None:
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, float) or not (
            0.0 < self.ratio < 1.0
        ):
            raise ConfigError(
                f"Target.ratio must be a float in (0, 1), the fraction of {self.metric.value} "
                f"removed; got {self.ratio!r}"
            )
        if not isinstance(self.metric, Metric):
            raise ConfigError(f"Target.metric must be a shrink.select.Metric, got {self.metric!r}")
        policy_ok = isinstance(self.policy, (Uniform, Global))
        if not (policy_ok and isinstance(self.policy.ratio, float)):
            raise ConfigError("Target.policy must be a Uniform or Global with a float ratio")
        if not 0.0 < self.tolerance < 0.5:
            raise ConfigError(f"Target.tolerance must be in (0, 0.5), got {self.tolerance}")
        if self.max_iter < 1:
            raise ConfigError(f"Target.max_iter must be >= 1, got {self.max_iter}")


Policy = Uniform | Global | Target


def _check_round(round_to: int | str, min_keep: int) -> None:
    if round_to == AUTO:
        pass
    elif isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to must be an int >= 1 or 'auto', got {round_to!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise ConfigError(f"min_keep must be an int >= 1, got {min_keep!r}")


def _check_overrides(overrides: Overrides) -> None:
    if not isinstance(overrides, tuple):
        raise ConfigError(
            f"overrides must be a tuple of (pattern, ratio) pairs, got {type(overrides).__name__}; "
            "PruneConfig/compress also accept a {pattern: ratio} dict"
        )
    for item in overrides:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise ConfigError(f"overrides entry {item!r} must be a (pattern, ratio) pair")
        _check_ratio(item[1], f"overrides[{item[0]!r}]")


def override_for(g: ChannelGroup, overrides: Overrides) -> Ratio | None:
    """The ratio of the first override whose pattern matches ``g`` (see module doc), or None."""
    names = [g.id, *(m.module for m in g.members if m.side is Side.OUT)]
    for pattern, ratio in overrides:
        if any(n == pattern or fnmatch.fnmatchcase(n, pattern) for n in names):
            return ratio
    return None


def _resolve_overrides(targets: list[ChannelGroup], overrides: Overrides) -> dict[str, Ratio]:
    fixed: dict[str, Ratio] = {}
    for pattern, _ in overrides:
        if not any(override_for(g, ((pattern, 0.0),)) is not None for g in targets):
            raise ConfigError(
                f"overrides pattern {pattern!r} matches no prunable group. Patterns match group "
                f"ids or producer module names, e.g. {[g.id for g in targets][:5]}"
            )
    for g in targets:
        r = override_for(g, overrides)
        if r is not None:
            fixed[g.id] = r
    return fixed


def _drop_count(g: ChannelGroup, ratio: Ratio) -> int:
    if isinstance(ratio, float):
        return round(ratio * g.size)
    if ratio >= g.size:
        raise ConfigError(
            f"removing {ratio} channels would empty group {g.id!r}, which has "
            f"{g.size}. Use a smaller count, a float ratio, or ignore= that layer."
        )
    return ratio


AUTO = "auto"


def auto_step(size: int, block: int = 16) -> int:
    """The ``round_to="auto"`` multiple for a group of ``size`` channels.

    onnxruntime's x86 convolutions (MLAS NCHWc) work in blocks of 16 channels on AVX-512 and pad
    other counts, so kept counts of 16k run fastest (benchmarks/README.md: mobilenet_v2 at 0.5,
    2.52x realized with no rounding vs 2.77x with 16). Rounding 16-31 channel groups to 8
    instead (the previous default) was slower on every mobile net of the suite (mobilenet_v3_large
    2.53x vs 2.83x realized), so every group of 16+ channels rounds to 16; a 16-channel group at
    ratio 0.5 then stays whole. Groups under 16 channels (squeeze-excitation hidden layers) are
    not rounded. ``block`` is the channel block (16; :mod:`shrink.latency` passes the block
    of the runtime it measures).
    """
    return block if size >= block else 1


def channel_width(g: ChannelGroup) -> int:
    """Layer channels per group channel: 1, or a conv group's width when grouped convs lose
    whole conv groups (each group channel is then that many channels of every layer)."""
    widths = [len(m.index_map.index) // max(1, len(set(m.index_map.channel))) for m in g.members]
    return max(1, min(widths, default=1))


def _n_keep(g: ChannelGroup, n_drop: int, round_to: int | str, min_keep: int) -> int:
    keep = g.size - n_drop
    width = channel_width(g)
    if round_to == AUTO:
        round_to = auto_step(g.size * width)
    assert isinstance(round_to, int)
    round_to //= math.gcd(round_to, width)  # the multiple is in layer channels
    if round_to > 1:
        keep = min(g.size, math.ceil(keep / round_to) * round_to)
    return max(keep, min(min_keep, g.size))


def candidate_counts(g: ChannelGroup, policy: Global, block: int = 16) -> tuple[int, ...]:
    """Every kept count :func:`select` could give ``g`` under ``policy``'s bounds, ascending.

    ``round_to`` (``"auto"``: ``block`` for groups of ``block``+ channels) rounds counts up, as
    in :func:`select`; grouped-conv groups keep the same count in every block; ``min_keep``,
    ``max_ratio`` (ceiling) and ``min_ratio`` (floor) bound the count.
    """
    size = g.size
    floor_keep = min(policy.min_keep, size)
    lo = max(floor_keep, math.ceil(size * (1 - policy.max_ratio) - 1e-9))
    hi = max(lo, size - math.ceil(size * policy.min_ratio - 1e-9))
    if g.blocks:
        nb = len(set(g.blocks))
        counts = {kb * nb for kb in range(1, size // nb + 1) if lo <= kb * nb <= hi}
        return tuple(sorted(counts or {nb * max(1, math.ceil(lo / nb))}))
    width = channel_width(g)
    step = policy.round_to
    if any(m.side is Side.HEADS for m in g.members):
        step = 1
    elif step == AUTO:
        step = auto_step(size * width, block)
    assert isinstance(step, int)
    step //= math.gcd(step, width)
    return tuple(sorted({max(min(size, math.ceil(j / step) * step), floor_keep)
                         for j in range(lo, hi + 1)}))


def plan_from_counts(groups: tuple[ChannelGroup, ...], scores: Mapping[str, torch.Tensor],
                     counts: Mapping[str, int], model: str) -> Plan:
    """The plan that keeps ``counts[g.id]`` channels of each group, the highest-scored ones.

    Channels are picked as :func:`select` picks them (per block for grouped convs, ties by
    index); groups missing from ``counts`` stay whole.

    Raises:
        ConfigError: a count is not in ``[1, size]`` or a group cannot be pruned.
    """
    by_id = {g.id: g for g in groups}
    decisions = []
    for gid in sorted(counts):
        g, n = by_id.get(gid), counts[gid]
        if g is None or not g.prunable or gid not in scores or not 1 <= n <= g.size:
            raise ConfigError(f"cannot keep {n} channels of group {gid!r}: it is unknown, "
                              "pinned, unscored or smaller")
        if n < g.size:
            keep = _pick(g, scores[gid], n, 1)
            if len(keep) < g.size:
                decisions.append(Decision(gid, keep))
    return Plan(model=model, groups=tuple(groups), decisions=tuple(decisions))


def _pick(g: ChannelGroup, scores: torch.Tensor, n_keep: int, round_to: int) -> tuple[int, ...]:
    s = scores.tolist()
    if not g.blocks:
        # ascending by score, ties by index: a stable sort, in C (sorted() with a key tuple
        # per channel cost more than the rest of select); NaN sorts as Python sorts it
        order = (sorted(range(g.size), key=lambda i: (s[i], i)) if scores.isnan().any()
                 else torch.sort(scores, stable=True).indices.tolist())
        return _every_layer_keeps_one(g, set(order[g.size - n_keep :]), s)
    blocks = torch.tensor(g.blocks, dtype=torch.long)
    labels, counts = torch.unique(blocks, return_counts=True)  # ascending labels
    size_b = int(counts[0])
    kb = max(1, min(size_b, round(n_keep / len(labels))))
    step = round_to // math.gcd(round_to, len(labels))
    if step > 1:
        kb = min(size_b, math.ceil(kb / step) * step)
    if bool((counts == size_b).all()) and not scores.isnan().any():
        # every block at once, in C: its members ascend (a stable sort by label), then a
        # stable sort of each block's scores
        grid = torch.sort(blocks, stable=True).indices.view(len(labels), size_b)
        top = torch.sort(scores[grid], dim=1, stable=True).indices[:, size_b - kb:]
        return tuple(sorted(grid.gather(1, top).flatten().tolist()))
    by_label: dict[int, list[int]] = {}
    for i, b in enumerate(g.blocks):
        by_label.setdefault(b, []).append(i)
    per_block = [by_label[b] for b in sorted(by_label)]
    keep: list[int] = []
    for members in per_block:
        order = sorted(members, key=lambda i: (s[i], i))
        keep.extend(order[len(members) - kb :])
    return tuple(sorted(keep))


def _every_layer_keeps_one(g: ChannelGroup, keep: set[int], s: list[float]) -> tuple[int, ...]:
    """A group can span several producers (cat([a(x), b(x)]) tied by a residual add): when the
    lowest scores all fall on one of them, keep its best channel, as a layer cannot be empty."""
    for m in g.members:
        if m.index_map.channel and keep.isdisjoint(m.index_map.channel):
            keep.add(max(set(m.index_map.channel), key=lambda i: (s[i], -i)))
    return tuple(sorted(keep))


def select(groups: tuple[ChannelGroup, ...], scores: Mapping[str, torch.Tensor], policy: Policy,
           model: str) -> Plan:
    """Decide which channels of each scored group stay.

    Args:
        groups: every group of the analysis (pinned ones are carried into the plan unchanged).
        scores: group id -> score per channel (from :func:`shrink.score`).
        policy: :class:`Uniform` or :class:`Global`.
        model: fingerprint of the model (``analysis.model``).

    Raises:
        ConfigError: when an absolute count would empty a group.
    """
    if not isinstance(policy, (Uniform, Global)):
        raise ConfigError(
            f"select needs a Uniform or Global policy, got {type(policy).__name__}. "
            "a Target (MACs/params goal) is solved by shrink.prune / shrink.allocate.solve_target, "
            "a LatencyTarget by shrink.prune / shrink.latency.solve_latency."
        )
    targets = [g for g in groups if g.prunable and g.id in scores]
    fixed = _resolve_overrides(targets, policy.overrides)
    n_drop = {gid: _drop_count(next(g for g in targets if g.id == gid), r)
              for gid, r in fixed.items()}
    ranked = [g for g in targets if g.id not in fixed]
    if isinstance(policy, Uniform):
        n_drop.update({g.id: _drop_count(g, policy.ratio) for g in ranked})
    else:
        n_drop.update(_global_drops(ranked, scores, policy))
    decisions = []
    for g in targets:
        if n_drop.get(g.id, 0) <= 0:
            continue
        # Rounding a grouped conv's group would keep whole blocks (regnet_y_400mf: 13 groups of
        # 8, round_to=8 keeps all 104 channels), and onnxruntime runs non-depthwise grouped
        # convs outside its NCHWc layout anyway, so alignment buys nothing there.
        # A head group's channels are whole heads (head_dim wide each): channel rounding does
        # not apply to them.
        round_to: int | str = policy.round_to
        if g.blocks or any(m.side is Side.HEADS for m in g.members):
            round_to = 1
        n_keep = _n_keep(g, n_drop[g.id], round_to, policy.min_keep)
        keep = _pick(g, scores[g.id], n_keep, auto_step(g.size) if round_to == AUTO
                     else int(round_to))
        if len(keep) < g.size:
            decisions.append(Decision(g.id, keep))
    return Plan(model=model, groups=tuple(groups), decisions=tuple(decisions))


def _global_drops(targets: list[ChannelGroup], scores: Mapping[str, torch.Tensor],
                  policy: Global) -> dict[str, int]:
    entries: list[tuple[float, int, str]] = []
    for k, g in enumerate(targets):
        s = scores[g.id]
        mean = float(s.mean())
        normed = (s / mean if mean > 0 else s).tolist()
        entries.extend((v, k, g.id) for v in normed)
    total = len(entries)
    budget = round(policy.ratio * total) if isinstance(policy.ratio, float) else policy.ratio
    cap = {g.id: max(0, g.size - max(policy.min_keep, math.ceil(g.size * (1 - policy.max_ratio))))
           for g in targets}
    floor = {g.id: min(cap[g.id], math.ceil(g.size * policy.min_ratio - 1e-9)) for g in targets}
    drops: dict[str, int] = dict(floor)
    budget -= sum(floor.values())
    seen: dict[str, int] = dict.fromkeys(cap, 0)
    for _v, _k, gid in sorted(entries):
        if budget <= 0:
            break
        seen[gid] += 1
        if seen[gid] <= floor[gid]:
            continue  # one of the group's lowest channels, already dropped by its floor
        if drops[gid] < cap[gid]:
            drops[gid] += 1
            budget -= 1
    return drops
