"""Importance criteria: a score per group channel; the lowest-scored channels go first.

Every criterion is group-aware: a channel's score gathers every module axis that shrinks with it.

* :class:`LnNorm` (``p`` in 1, 2, inf) is the Ln norm of *all* weights removed with the channel:
  the output filters of every producer and the input columns of every dense consumer in the
  group, ``score_c = (sum_members sum |w|^p) ** (1/p)`` (``max |w|`` for ``p = inf``). For a group
  with one producer and no scored consumer this is exactly ``torch.nn.utils.prune.ln_structured``'s
  norm of the filter.
* :class:`Random` draws reproducible uniform scores from ``seed`` and the group id.
* :class:`BNScale` is |gamma| of the BatchNorm layers in the group (network slimming).
* :class:`UserScores` takes per-module scores (``{fqn: tensor[out_channels]}`` or a tensor shaped
  like the module's weight, as ``importance_scores`` in ``torch.nn.utils.prune``), or a callable
  ``fn(group, modules) -> tensor[group.size]``. Groups without a user score keep every channel.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import nn

from shrink.errors import ConfigError
from shrink.plan import ChannelGroup, Side
from shrink.rules import rule_for

Scores = Mapping[str, torch.Tensor]


class Criterion(Protocol):
    """Anything that scores the channels of one group (higher means more important)."""

    def __call__(self, group: ChannelGroup, modules: Mapping[str, nn.Module]) -> torch.Tensor | None:
        """Scores (float64, ``[group.size]``) or None when the criterion has no opinion."""
        ...


def _scatter(total: torch.Tensor, group: ChannelGroup, member_vals: list[tuple[Any, torch.Tensor]],
             reduce: str) -> None:
    for member, vals in member_vals:
        idx = torch.as_tensor(member.index_map.index, dtype=torch.long)
        ch = torch.as_tensor(member.index_map.channel, dtype=torch.long)
        total.scatter_reduce_(0, ch, vals[idx], reduce=reduce)


@dataclass(frozen=True, slots=True)
class LnNorm:
    """Joint Ln norm of every weight slice removed with a channel."""

    p: float = 2.0

    def __post_init__(self) -> None:
        if not (self.p == math.inf or self.p > 0):
            raise ConfigError(f"LnNorm.p must be > 0 or inf, got {self.p}. Use 1, 2 or inf.")

    def __call__(self, group: ChannelGroup, modules: Mapping[str, nn.Module]) -> torch.Tensor:
        total = torch.zeros(group.size, dtype=torch.float64)
        vals: list[tuple[Any, torch.Tensor]] = []
        for m in group.members:
            mod = modules[m.module]
            rule = rule_for(mod)
            for tensor, dim in rule.score_params(mod, m.side) if rule else ():
                rows = tensor.detach().movedim(dim, 0).reshape(tensor.shape[dim], -1)
                v = torch.linalg.vector_norm(rows, ord=self.p, dim=1).double().cpu()
                vals.append((m, v if self.p == math.inf else v.pow(self.p)))
        _scatter(total, group, vals, "amax" if self.p == math.inf else "sum")
        return total if self.p == math.inf else total.pow(1.0 / self.p)


@dataclass(frozen=True, slots=True)
class Random:
    """Uniform random scores, reproducible from ``seed`` and the group id."""

    seed: int = 0

    def __call__(self, group: ChannelGroup, modules: Mapping[str, nn.Module]) -> torch.Tensor:
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + zlib.crc32(group.id.encode()))
        return torch.rand(group.size, generator=gen, dtype=torch.float64)


@dataclass(frozen=True, slots=True)
class BNScale:
    """|gamma| of the normalisation layers in the group (network slimming); Ln-norm fallback."""

    def __call__(self, group: ChannelGroup, modules: Mapping[str, nn.Module]) -> torch.Tensor:
        total = torch.zeros(group.size, dtype=torch.float64)
        vals = []
        for m in group.members:
            rule = rule_for(modules[m.module])
            if rule is not None and m.side is Side.OUT:
                for p in rule.scale_params(modules[m.module]):
                    vals.append((m, p.detach().double().abs().cpu()))
        if not vals:
            return LnNorm(2.0)(group, modules)
        _scatter(total, group, vals, "sum")
        return total


@dataclass(frozen=True, slots=True)
class UserScores:
    """User-supplied scores: per-module tensors or a callable."""

    scores: Mapping[str, torch.Tensor] | Callable[..., torch.Tensor] | None = None

    def __call__(self, group: ChannelGroup, modules: Mapping[str, nn.Module]) -> torch.Tensor | None:
        if callable(self.scores):
            out = torch.as_tensor(self.scores(group, modules), dtype=torch.float64).flatten()
            if out.numel() != group.size:
                raise ConfigError(
                    f"importance callable returned {out.numel()} scores for group {group.id!r}, "
                    f"which has {group.size} channels"
                )
            return out
        assert self.scores is not None
        total = torch.zeros(group.size, dtype=torch.float64)
        vals = []
        for m in group.members:
            s = self.scores.get(m.module)
            if s is None or m.side is not Side.OUT:
                continue
            s = torch.as_tensor(s).detach().double().cpu()
            if s.ndim > 1:  # shaped like the weight: L2 over everything but the out axis
                s = s.reshape(s.shape[0], -1).norm(dim=1)
            if s.numel() != m.extent:
                raise ConfigError(
                    f"importance[{m.module!r}] has {s.numel()} entries; the layer has {m.extent} "
                    "output channels. Give one score per output channel (or a weight-shaped tensor)."
                )
            vals.append((m, s))
        if not vals:
            return None
        _scatter(total, group, vals, "sum")
        return total


def score(groups: tuple[ChannelGroup, ...], model: nn.Module, criterion: Criterion) -> dict[str, torch.Tensor]:
    """Score every prunable group. Groups the criterion has no opinion on are left out.

    Example:
        >>> scores = shrink.score(analysis.prunable, model, shrink.LnNorm(p=1))
    """
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        if not g.prunable:
            continue
        s = criterion(g, modules)
        if s is not None:
            out[g.id] = s
    return out
