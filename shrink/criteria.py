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
* :class:`Taylor` (first order, data-driven): the mean over user batches of ``|w * dL/dw|``
  summed over every weight slice removed with the channel, the same slices :class:`LnNorm`
  reads. It estimates how much the loss moves when those weights vanish (Molchanov et al. 2019).
* :class:`Activation` (data-driven): the mean ``|x|`` of the channel in the inputs its consumers
  read, i.e. exactly the values the masked oracle zeroes when the channel is removed.

Group reduction. A channel's score combines its member slices as documented per criterion:
``sum`` for norms, Taylor and BN scale (more coupled weights mean more removed), ``amax`` for
``LnNorm(p=inf)`` and ``mean`` for :class:`Activation` (an average activation magnitude over every
consumer position that reads the channel, e.g. the ``H*W`` columns of a flatten into a Linear).

Normalisation. Criteria return raw, non-negative scores. Local selection only compares channels
within a group, so no normalisation is needed; :class:`~shrink.select.Global` divides each
group's scores by their mean before ranking across groups.

Data-driven criteria implement ``prepare(model, groups)``: :func:`score` calls it once per model
to run the user's batches on a deep copy (the user's model, its gradients and BN statistics are
never touched) and gets back a pure per-axis criterion (:class:`AxisScores`).
"""

from __future__ import annotations

import copy
import logging
import math
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
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
        chans.append(torch.as_tensor(member.index_map.channel, dtype=torch.long))
        picked.append(vals[torch.as_tensor(member.index_map.index, dtype=torch.long)])
    total.scatter_reduce_(0, torch.cat(chans), torch.cat(picked), reduce=reduce,
                          include_self=False)


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


def split_batch(batch: Any) -> tuple[tuple[Any, ...], Any]:
    """``(inputs, target)`` of one batch: a tensor is an input alone; a tuple or list is
    ``(*inputs, target)`` as a ``DataLoader`` over a ``TensorDataset`` yields it (one element:
    an input without target).

    Raises:
        ConfigError: for any other batch type.
    """
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if isinstance(batch, (tuple, list)) and batch:
        if len(batch) == 1:
            return (batch[0],), None
        return tuple(batch[:-1]), batch[-1]
    raise ConfigError(
        f"a data batch must be a tensor or a (inputs..., target) tuple/list, got "
        f"{type(batch).__name__}. Wrap the data so it yields (x, y) pairs, e.g. "
        "DataLoader(TensorDataset(x, y), batch_size=32)."
    )


def _batches(data: Iterable[Any], max_batches: int | None, who: str) -> Iterable[Any]:
    n = 0
    for batch in data:
        if max_batches is not None and n >= max_batches:
            return
        n += 1
        yield batch
    if n == 0:
        raise ConfigError(
            f"{who}: data yielded no batches. Pass a non-empty, re-iterable loader (a DataLoader "
            "or a list of batches; a generator is exhausted after its first use)."
        )


def _check_data(data: Any, max_batches: int | None, who: str, example: str) -> None:
    if data is None:
        raise ConfigError(
            f"{who} importance needs data: it scores channels from the model's behaviour on real "
            f"batches, and none were given. Pass {example}, or use a data-free criterion such as "
            "importance='l1'."
        )
    if isinstance(data, (torch.Tensor, str, bytes)) or not isinstance(data, Iterable):
        raise ConfigError(
            f"{who}: data must be an iterable of batches (a DataLoader or a list of (x, y) "
            f"tuples), got {type(data).__name__}"
        )
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise ConfigError(f"{who}: max_batches must be an int >= 1 or None, got {max_batches!r}")


def _rules(model: nn.Module, fqns: set[str]) -> list[tuple[str, nn.Module, Any]]:
    out = []
    for fqn, mod in model.named_modules():
        rule = rule_for(mod) if fqn in fqns else None
        if rule is not None:
            out.append((fqn, mod, rule))
    return out


@dataclass(frozen=True, slots=True, eq=False)
class Taylor:
    """First-order Taylor importance: ``mean_b sum_slices |w * dL_b/dw|`` (Molchanov et al. 2019).

    For every batch ``b`` the loss ``L_b = loss_fn(model(*inputs), target)`` is back-propagated
    on a deep copy of the model (in the model's current mode). The score of channel ``c`` is
    ``(1/B) sum_b sum_{members} sum_{slice of c} |w * grad_b|`` over the same weight slices as
    :class:`LnNorm` (producer filters and dense consumer columns), i.e. the group reduction is a
    sum over members; flatten members contribute every column the channel owns.

    Attributes:
        data: re-iterable batches of ``(*inputs, target)``, e.g. a ``DataLoader``, on the
            model's device. Required.
        loss_fn: ``loss_fn(output, target) -> scalar tensor``, e.g. ``F.cross_entropy``.
        max_batches: use at most this many batches (None: all of ``data``).

    Raises:
        ConfigError: without ``data`` or ``loss_fn``, when a batch has no target, or when no
            prunable weight gets a gradient.

    Example:
        >>> crit = shrink.Taylor(loader, torch.nn.functional.cross_entropy, max_batches=8)
        >>> res = shrink.prune(model, x, shrink.PruneConfig(criterion=crit))
    """

    data: Iterable[Any] | None = None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    max_batches: int | None = None

    def __post_init__(self) -> None:
        example = "data=loader (batches of (x, y)) and loss_fn=torch.nn.functional.cross_entropy"
        _check_data(self.data, self.max_batches, "Taylor", example)
        if self.loss_fn is None or not callable(self.loss_fn):
            raise ConfigError(
                "Taylor importance needs loss_fn(output, target) -> scalar loss to differentiate, "
                f"got {self.loss_fn!r}. Pass e.g. loss_fn=torch.nn.functional.cross_entropy."
            )

    def __call__(
        self, group: ChannelGroup, modules: Mapping[str, nn.Module]
    ) -> torch.Tensor | None:
        raise ConfigError("Taylor must be prepared on a model first: use shrink.score or prune")

    def prepare(self, model: nn.Module, groups: tuple[ChannelGroup, ...]) -> AxisScores:
        assert self.data is not None  # both checked in __post_init__
        assert self.loss_fn is not None
        work = copy.deepcopy(model)
        work.zero_grad(set_to_none=True)
        targets = _rules(work, {m.module for g in groups for m in g.members})
        acc: dict[AxisKey, torch.Tensor] = {}
        n = 0
        for batch in _batches(self.data, self.max_batches, "Taylor"):
            inputs, target = split_batch(batch)
            if target is None:
                raise ConfigError(
                    "Taylor: a batch has no target, so there is no loss to differentiate. Yield "
                    "(x, y) pairs, or use importance='activation', which needs inputs only."
                )
            loss = self.loss_fn(work(*inputs), target)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ConfigError(f"Taylor: loss_fn must return a scalar tensor, got {loss!r}")
            loss.backward()  # type: ignore[no-untyped-call]
            with torch.no_grad():
                for fqn, mod, rule in targets:
                    for side in Side:
                        for t, dim in rule.score_params(mod, side):
                            if t.grad is None:
                                continue
                            v = (t * t.grad).abs().movedim(dim, 0).reshape(t.shape[dim], -1)
                            v = v.sum(dim=1).double().cpu()
                            acc[(fqn, side)] = acc[(fqn, side)] + v if (fqn, side) in acc else v
            work.zero_grad(set_to_none=True)
            n += 1
        if not acc:
            raise ConfigError(
                "Taylor: no prunable weight received a gradient from loss_fn over "
                f"{n} batch(es). Are the parameters frozen (requires_grad=False) or the loss "
                "detached from the output? Unfreeze them for scoring, or use importance='l1'."
            )
        log.debug("Taylor: scored %d module axes over %d batches", len(acc), n)
        return AxisScores({k: v / n for k, v in acc.items()}, reduce="sum")


@dataclass(frozen=True, slots=True, eq=False)
class Activation:
    """Mean absolute activation the group's consumers read, per channel.

    Forward pre-hooks on every consumer (a member on the IN side: conv, linear) record
    ``mean |x|`` over the batch and every non-channel axis of the input the consumer reads, at
    the axis its rule names. Removing a channel zeroes exactly those values (the masked oracle),
    so a channel whose inputs are near zero (dead ReLUs) costs little. Group reduction: the mean
    over every consumer position that carries the channel. Groups with no consumer are left out.

    Attributes:
        data: re-iterable batches on the model's device: tensors, or ``(*inputs, target)``
            tuples (target ignored).
        max_batches: use at most this many batches (None: all of ``data``).

    Raises:
        ConfigError: without ``data``.

    Example:
        >>> res = shrink.prune(model, x, shrink.make_config(0.5, importance="activation",
        ...                                                  data=loader))
    """

    data: Iterable[Any] | None = None
    max_batches: int | None = None

    def __post_init__(self) -> None:
        example = "data=loader (batches of x or (x, y))"
        _check_data(self.data, self.max_batches, "Activation", example)

    def __call__(
        self, group: ChannelGroup, modules: Mapping[str, nn.Module]
    ) -> torch.Tensor | None:
        raise ConfigError("Activation must be prepared on a model first: use shrink.score or prune")

    def prepare(self, model: nn.Module, groups: tuple[ChannelGroup, ...]) -> AxisScores:
        assert self.data is not None  # checked in __post_init__
        work = copy.deepcopy(model)
        consumers = {m.module for g in groups for m in g.members if m.side is Side.IN}
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def hook(fqn: str, rule: Any) -> Callable[..., None]:
            def record(mod: nn.Module, args: tuple[Any, ...]) -> None:
                x = args[0].detach()
                rows = x.abs().movedim(rule.in_axis(mod, x.ndim), 0)
                v = rows.reshape(rows.shape[0], -1).double().sum(dim=1).cpu()
                sums[fqn] = sums[fqn] + v if fqn in sums else v
                counts[fqn] = counts.get(fqn, 0) + rows[0].numel()
            return record

        handles = [mod.register_forward_pre_hook(hook(fqn, rule))
                   for fqn, mod, rule in _rules(work, consumers)]
        try:
            with torch.no_grad():
                for batch in _batches(self.data, self.max_batches, "Activation"):
                    inputs, _ = split_batch(batch)
                    work(*inputs)
        finally:
            for h in handles:
                h.remove()
        return AxisScores({(f, Side.IN): s / counts[f] for f, s in sums.items()}, reduce="mean")


def score(
    groups: tuple[ChannelGroup, ...], model: nn.Module, criterion: Criterion
) -> dict[str, torch.Tensor]:
    """Score every prunable group. Groups the criterion has no opinion on are left out.

    A :class:`DataCriterion` (:class:`Taylor`, :class:`Activation`) is first prepared on
    ``model``: its data runs through a deep copy, so ``model`` is never modified.

    Example:
        >>> scores = shrink.score(analysis.prunable, model, shrink.LnNorm(p=1))
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
