"""Selection policies: turn scores into a :class:`~shrink.plan.Plan`.

* :class:`Uniform` removes the same fraction (or absolute number) of channels from every
  prunable group (``scope="local"``).
* :class:`Global` ranks channels across groups by their score divided by the group's mean score,
  and removes the lowest ``ratio`` of all prunable channels, never more than ``max_ratio`` of any
  one group.

Both round the kept count up to a multiple of ``round_to`` (capped at the group size), keep at
least ``min_keep`` channels, and respect grouped-conv blocks (every block drops the same number).
Ties are broken by channel index (lower index dropped first), so plans are deterministic.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

from shrink.errors import ConfigError
from shrink.plan import ChannelGroup, Decision, Plan


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
    round_to: int = 1
    min_keep: int = 1

    def __post_init__(self) -> None:
        _check_ratio(self.ratio)
        _check_round(self.round_to, self.min_keep)


@dataclass(frozen=True, slots=True)
class Global:
    """Remove the globally least important ``ratio`` of all prunable channels."""

    ratio: float | int
    round_to: int = 1
    min_keep: int = 1
    max_ratio: float = 0.9

    def __post_init__(self) -> None:
        _check_ratio(self.ratio)
        _check_round(self.round_to, self.min_keep)
        if not 0.0 < self.max_ratio < 1.0:
            raise ConfigError(f"max_ratio must be in (0, 1), got {self.max_ratio}")


Policy = Uniform | Global


def _check_round(round_to: int, min_keep: int) -> None:
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise ConfigError(f"round_to must be an int >= 1, got {round_to!r}")
    if isinstance(min_keep, bool) or not isinstance(min_keep, int) or min_keep < 1:
        raise ConfigError(f"min_keep must be an int >= 1, got {min_keep!r}")


def _n_keep(g: ChannelGroup, n_drop: int, round_to: int, min_keep: int) -> int:
    keep = g.size - n_drop
    if round_to > 1:
        keep = min(g.size, math.ceil(keep / round_to) * round_to)
    return max(keep, min(min_keep, g.size))


def _pick(g: ChannelGroup, scores: torch.Tensor, n_keep: int, round_to: int) -> tuple[int, ...]:
    s = scores.tolist()
    if not g.blocks:
        order = sorted(range(g.size), key=lambda i: (s[i], i))
        return tuple(sorted(order[g.size - n_keep :]))
    labels = sorted(set(g.blocks))
    per_block = [[i for i in range(g.size) if g.blocks[i] == b] for b in labels]
    size_b = len(per_block[0])
    kb = max(1, min(size_b, round(n_keep / len(labels))))
    step = round_to // math.gcd(round_to, len(labels))
    if step > 1:
        kb = min(size_b, math.ceil(kb / step) * step)
    keep: list[int] = []
    for members in per_block:
        order = sorted(members, key=lambda i: (s[i], i))
        keep.extend(order[len(members) - kb :])
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
    targets = [g for g in groups if g.prunable and g.id in scores]
    n_drop: dict[str, int] = {}
    if isinstance(policy, Uniform):
        for g in targets:
            if isinstance(policy.ratio, float):
                n_drop[g.id] = int(round(policy.ratio * g.size))
            else:
                if policy.ratio >= g.size:
                    raise ConfigError(
                        f"removing {policy.ratio} channels would empty group {g.id!r}, which has "
                        f"{g.size}. Use a smaller count, a float ratio, or ignore= that layer."
                    )
                n_drop[g.id] = policy.ratio
    else:
        n_drop = _global_drops(targets, scores, policy)
    decisions = []
    for g in targets:
        if n_drop.get(g.id, 0) <= 0:
            continue
        n_keep = _n_keep(g, n_drop[g.id], policy.round_to, policy.min_keep)
        keep = _pick(g, scores[g.id], n_keep, policy.round_to)
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
    budget = int(round(policy.ratio * total)) if isinstance(policy.ratio, float) else policy.ratio
    cap = {g.id: g.size - max(policy.min_keep, math.ceil(g.size * (1 - policy.max_ratio)))
           for g in targets}
    drops: dict[str, int] = dict.fromkeys(cap, 0)
    for _v, _k, gid in sorted(entries):
        if budget <= 0:
            break
        if drops[gid] < cap[gid]:
            drops[gid] += 1
            budget -= 1
    return drops
