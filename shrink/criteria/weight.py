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
* :class:`~shrink.criteria.data.Taylor`, :class:`~shrink.criteria.data.ActivationWeighted` and
  :class:`~shrink.criteria.data.Activation` need data; they live in :mod:`shrink.criteria.data`.

Group reduction. A channel's score combines its member slices as documented per criterion:
``sum`` for norms, Taylor, activation-weighted magnitude and BN scale (more coupled weights
mean more removed), ``amax`` for ``LnNorm(p=inf)`` and ``mean`` for Activation (an average
activation magnitude over every consumer position that reads the channel, e.g. the ``H*W``
columns of a flatten into a Linear).

Normalisation. Criteria return raw, non-negative scores. Local selection only compares channels
within a group, so no normalisation is needed; :class:`~shrink.select.Global` divides each
group's scores by their mean before ranking across groups.

Data-driven criteria implement ``prepare(model, groups)``: :func:`score` calls it once per model
to run the user's batches on a deep copy (the user's model, its gradients and BN statistics are
never touched) and gets back a pure criterion: :class:`AxisScores` (per-axis statistics) or
:class:`~shrink.criteria.saliency.SaliencyScores` (per-weight saliencies read through the
rules, as :class:`LnNorm` reads weights).
"""

from __future__ import annotations

import logging
import math
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from shrink.errors import ConfigError
from shrink.plan import ChannelGroup, Side
from shrink.rules import rule_for

log = logging.getLogger(__name__)

Scores = Mapping[str, torch.Tensor]
AxisKey = tuple[str, Side]


class Criterion(Protocol):
    """Anything that scores the channels of one group (higher means more important)."""

    def __call__(
        self, group: ChannelGroup, modules: Mapping[str, nn.Module]
    ) -> torch.Tensor | None:
        """Scores (float64, ``[group.size]``) or None when the criterion has no opinion."""
        ...


@runtime_checkable
class DataCriterion(Protocol):
    """A criterion that must see the model run on data before it can score groups."""

    def prepare(self, model: nn.Module, groups: tuple[ChannelGroup, ...]) -> Criterion:
        """Run the data through (a copy of) ``model`` and return a pure criterion."""
        ...


def _scatter(total: torch.Tensor, group: ChannelGroup, member_vals: list[tuple[Any, torch.Tensor]],
             reduce: str) -> None:
    # one scatter over every member's positions: with include_self=False, "mean" averages only
    # the values that reach a channel, and separate calls would overwrite each other
    if not member_vals:
        return
    chans, picked = [], []
    for member, vals in member_vals:
        imap = member.index_map
        whole = _positions(len(imap.index))  # most members: position k carries channel k
        chans.append(torch.arange(len(whole)) if imap.channel == whole
                     else torch.as_tensor(imap.channel, dtype=torch.long))
        picked.append(vals if imap.index == whole and len(vals) == len(whole)
                      else vals[torch.as_tensor(imap.index, dtype=torch.long)])
    total.scatter_reduce_(0, torch.cat(chans), torch.cat(picked), reduce=reduce,
                          include_self=False)


@lru_cache(maxsize=256)
def _positions(n: int) -> tuple[int, ...]:
    return tuple(range(n))


def slice_norms(t: torch.Tensor, dim: int, p: float) -> torch.Tensor:
    """Per position of axis ``dim``: the sum of ``|x|^p`` over its slice of ``t`` (the max of
    ``|x|`` for ``p = inf``), in float64 on the CPU.

    A weight's input axis (a 1x1 conv's or a Linear's axis 1) is strided: moving it first costs a
    copy of the weight, five times the reduction. Where nothing follows the axis, the slices are
    the columns of a ``(rows, n)`` matrix and reduce over its rows in place.
    """
    n = t.shape[dim]
    rows = math.prod(t.shape[:dim])
    if dim > 0 and t.numel() == rows * n and t.is_contiguous():
        a = t.reshape(rows, n)
        if p == math.inf:
            v = a.abs().amax(0)
        else:
            v = (a.square() if p == 2 else a.abs() if p == 1 else a.abs().pow(p)).sum(0)
        return v.double().cpu()
    v = torch.linalg.vector_norm(t.movedim(dim, 0).reshape(n, -1), ord=p, dim=1).double().cpu()
    return v if p == math.inf else v.pow(p)


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
            mod = modules.get(m.module)
            rule = None if mod is None else rule_for(mod)
            for tensor, dim in rule.score_params(mod, m.side) if rule and mod is not None else ():
                vals.append((m, slice_norms(tensor.detach(), dim, self.p)))
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
            rule = rule_for(modules[m.module]) if m.module in modules else None
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

    def __call__(
        self, group: ChannelGroup, modules: Mapping[str, nn.Module]
    ) -> torch.Tensor | None:
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
                    "output channels. Give one score per output channel (or a weight-shaped "
                    "tensor)."
                )
            vals.append((m, s))
        if not vals:
            return None
        _scatter(total, group, vals, "sum")
        return total


@dataclass(frozen=True, slots=True)
class AxisScores:
    """Precomputed scores per module axis position, reduced into groups through index maps.

    Attributes:
        values: ``(module fqn, side) -> tensor[extent]``: a score per axis position.
        reduce: how positions carrying the same channel combine: ``"sum"``, ``"mean"`` or
            ``"amax"``.
    """

    values: Mapping[AxisKey, torch.Tensor]
    reduce: str = "sum"

    def __post_init__(self) -> None:
        if self.reduce not in ("sum", "mean", "amax"):
            raise ConfigError(
                f"AxisScores.reduce must be 'sum', 'mean' or 'amax', got {self.reduce!r}"
            )

    def __call__(
        self, group: ChannelGroup, modules: Mapping[str, nn.Module]
    ) -> torch.Tensor | None:
        vals = [(m, self.values[(m.module, m.side)]) for m in group.members
                if (m.module, m.side) in self.values]
        if not vals:
            return None
        total = torch.zeros(group.size, dtype=torch.float64)
        _scatter(total, group, vals, self.reduce)
        return total


def score(
    groups: tuple[ChannelGroup, ...], model: nn.Module, criterion: Criterion
) -> dict[str, torch.Tensor]:
    """Score every prunable group. Groups the criterion has no opinion on are left out.

    A :class:`DataCriterion` (``Taylor``, ``ActivationWeighted``, ``Activation``) is first
    prepared on ``model``: its data runs through a deep copy, so ``model`` is never modified.

    Example:
        >>> scores = shrink.score(analysis.prunable, model, LnNorm(p=1))
    """
    if isinstance(criterion, DataCriterion):
        criterion = criterion.prepare(model, tuple(g for g in groups if g.prunable))
    modules = dict(model.named_modules())
    out: dict[str, torch.Tensor] = {}
    for g in groups:
        if not g.prunable:
            continue
        s = criterion(g, modules)
        if s is not None:
            out[g.id] = s
    return out
