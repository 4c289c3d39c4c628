"""Data-driven criteria: scores from the model's behaviour on the user's batches.

* :class:`Taylor` (first order): the mean over batches of ``|w * dL/dw|`` summed over every
  weight slice removed with the channel, the same slices :class:`~shrink.criteria.LnNorm` reads.
  It estimates how much the loss moves when those weights vanish (Molchanov et al. 2019).
* :class:`Activation`: the mean ``|x|`` of the channel in the inputs its consumers read, i.e.
  exactly the values the masked oracle zeroes when the channel is removed.

Both implement :class:`~shrink.criteria.DataCriterion`: :func:`shrink.score` calls
``prepare(model, groups)`` once, which runs the batches on a deep copy of the model (in its
current mode; the user's weights, gradients and BN statistics are never touched) and returns an
:class:`~shrink.criteria.AxisScores` that reduces per-position statistics into each group.

A batch is a tensor (an input alone) or a ``(*inputs, target)`` tuple or list, as a
``DataLoader`` over a ``TensorDataset`` yields it. ``data`` must be re-iterable (a ``DataLoader``
or a list), since iterative pruning scores once per step.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shrink.criteria.weight import AxisKey, AxisScores
from shrink.errors import ConfigError
from shrink.plan import ChannelGroup, Side
from shrink.rules import rule_for

log = logging.getLogger(__name__)


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
        >>> crit = Taylor(loader, torch.nn.functional.cross_entropy, max_batches=8)
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
        >>> res = shrink.prune(model, x, shrink.PruneConfig(0.5, importance="activation",
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
