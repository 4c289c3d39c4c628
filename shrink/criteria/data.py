"""Data-driven criteria: scores from the model's behaviour on the user's batches.

* :class:`Taylor` (first order): the saliency of a weight is ``mean_b |w * dL_b/dw|``; a
  channel's score sums it over every weight slice removed with the channel (Molchanov et al.
  2019). It estimates how much the loss moves when those weights vanish.
* :class:`ActivationWeighted` (Wanda, Sun et al. 2023): the saliency of a weight is
  ``|W_ij| * ||X_j||``, its magnitude times the RMS of the input feature it multiplies over the
  calibration tokens; a channel's score sums it over the same slices.
* :class:`Activation`: the mean ``|x|`` of the channel in the inputs its consumers read, i.e.
  exactly the values the masked oracle zeroes when the channel is removed.

All implement :class:`~shrink.criteria.DataCriterion`: :func:`shrink.score` calls
``prepare(model, groups)`` once, which runs the batches on a deep copy of the model (in its
current mode; the user's weights, gradients and BN statistics are never touched). ``Taylor`` and
``ActivationWeighted`` then score through saliency substitution
(:mod:`shrink.criteria.saliency`): every slice the rules score with ``LnNorm``, attention heads
included, is scored. ``Activation`` returns an :class:`~shrink.criteria.AxisScores` over the IN
axes of the consumers.

Batches are tensors, ``(*inputs, target)`` tuples or dicts of keyword arguments
(:mod:`shrink.criteria.batches`).
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shrink.criteria.batches import LOSS_FN_FIX, Batch, batch_loss, check_data, iter_batches
from shrink.criteria.saliency import SaliencyScores, substitute
from shrink.criteria.weight import AxisScores
from shrink.errors import ConfigError, InvariantError
from shrink.plan import ChannelGroup, Side
from shrink.rules import rule_for

log = logging.getLogger(__name__)



def _rules(model: nn.Module, fqns: set[str]) -> list[tuple[str, nn.Module, Any]]:
    out = []
    for fqn, mod in model.named_modules():
        rule = rule_for(mod) if fqn in fqns else None
        if rule is not None:
            out.append((fqn, mod, rule))
    return out


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)  # bf16/fp16 models sum in fp32


@dataclass(frozen=True, slots=True, eq=False)
class Taylor:
    """First-order Taylor importance: ``mean_b sum_slices |w * dL_b/dw|`` (Molchanov et al. 2019).

    For every batch ``b`` the loss ``L_b`` is back-propagated on a deep copy of the model (in the
    model's current mode), and the saliency of every parameter is ``(1/B) sum_b |w * grad_b|``
    (the absolute value per batch, then the mean). The score of channel ``c`` sums the saliency
    over the same weight slices as :class:`~shrink.criteria.LnNorm`: producer filters, dense
    consumer columns, every column a flatten consumer gives ``c``, and each head's slices of an
    attention layer's projections (see :mod:`shrink.criteria.saliency`). A parameter that no
    gradient reaches contributes 0, and a group whose slices all lack one is left out.

    The loss of a batch is:

    * ``loss_fn(output, target)`` for a ``(*inputs, target)`` batch;
    * ``loss_fn(output, batch["labels"])`` for a dict batch (``model(**batch)``);
    * ``output.loss`` when ``loss_fn`` is None and the output has one: a Hugging Face model
      called with a dict batch that holds ``labels``.

    Attributes:
        data: re-iterable batches on the model's device, e.g. a ``DataLoader``. Required.
        loss_fn: ``loss_fn(output, target) -> scalar tensor``, e.g. ``F.cross_entropy``; None
            to use ``output.loss``.
        max_batches: use at most this many batches (None: all of ``data``).

    Raises:
        ConfigError: without ``data``; when ``loss_fn`` is not callable; when a batch has no
            target for ``loss_fn``, or there is no ``loss_fn`` and the output has no ``.loss``;
            when no scored weight gets a gradient.

    Example:
        >>> crit = Taylor(loader, torch.nn.functional.cross_entropy, max_batches=8)
        >>> res = shrink.prune(model, x, shrink.PruneConfig(criterion=crit))
    """

    data: Iterable[Any] | None = None
    loss_fn: Callable[[Any, Any], torch.Tensor] | None = None
    max_batches: int | None = None

    def __post_init__(self) -> None:
        example = "data=loader (batches of (x, y)) and loss_fn=torch.nn.functional.cross_entropy"
        check_data(self.data, self.max_batches, "Taylor", example)
        if self.loss_fn is not None and not callable(self.loss_fn):
            raise ConfigError(
                "Taylor importance needs loss_fn(output, target) -> scalar loss to differentiate, "
                f"got {self.loss_fn!r}. {LOSS_FN_FIX}"
            )

    def __call__(
        self, group: ChannelGroup, modules: Mapping[str, nn.Module]
    ) -> torch.Tensor | None:
        raise ConfigError("Taylor must be prepared on a model first: use shrink.score or prune")

    def _loss(self, work: nn.Module, batch: Batch) -> torch.Tensor:
        return batch_loss(work, batch, self.loss_fn)

    def prepare(self, model: nn.Module, groups: tuple[ChannelGroup, ...]) -> SaliencyScores:
        """Back-propagate every batch on a copy; the copy then holds each weight's saliency."""
        assert self.data is not None  # checked in __post_init__
        work = copy.deepcopy(model)
        work.zero_grad(set_to_none=True)
        params = dict(work.named_parameters())
        acc: dict[str, torch.Tensor] = {}
        n = 0
        for batch in iter_batches(self.data, self.max_batches, "Taylor"):
            self._loss(work, batch).backward()  # type: ignore[no-untyped-call]
            with torch.no_grad():
                for name, p in params.items():
                    if p.grad is None:
                        continue
                    v = (p.detach() * p.grad).abs()
                    if name in acc:
                        acc[name] += v
                    else:
                        acc[name] = v.to(_accumulate_dtype(v.dtype))
            work.zero_grad(set_to_none=True)
            n += 1
        scores = substitute(work, lambda name, _: acc.pop(name).div_(n) if name in acc else None)
        if groups and not any(scores.covers(g) for g in groups):
            raise ConfigError(
                "Taylor: no prunable weight received a gradient from the loss over "
                f"{n} batch(es). Are the parameters frozen (requires_grad=False) or the loss "
                "detached from the output? Unfreeze them for scoring, or use importance='l1'."
            )
        log.debug("Taylor: saliency of %d parameters over %d batches", len(scores.scored), n)
        return scores


@dataclass(frozen=True, slots=True, eq=False)
class ActivationWeighted:
    """Activation-weighted magnitude (Wanda, Sun et al. 2023): ``sum_slices |W_ij| * ||X_j||``.

    Forward pre-hooks on a deep copy record, for every layer that is a linear map of its input
    (its rule's ``input_weights``: ``nn.Linear``, a conv with ``groups == 1``, Hugging Face's
    transposed ``Conv1D``), the sum of ``x_j ** 2`` per input feature ``j`` and the number of
    rows (batch, tokens, spatial positions) over the calibration batches. With
    ``||X_j|| = sqrt(sum x_j ** 2 / rows)`` (the RMS over the calibration tokens, padding
    included), the saliency of such a weight is ``|W| * ||X||`` broadcast along its input axis
    (Linear: dim 1; Conv1D: dim 0; conv: dim 1, over the kernel too). Every other parameter
    (embeddings, attention projections that their layer applies itself, a layer that never ran
    on the data) keeps ``|p|``.

    A channel's score is the L1 norm of the saliency over every slice removed with it, as
    :class:`~shrink.criteria.LnNorm` ``(p=1)`` reads them: a producer's rows weighted by the
    producer's own input norms, a consumer's columns by the consumer's input norm of the
    channel (so a channel that is always zero where it is read scores 0 there), heads with
    their projections' slices (see :mod:`shrink.criteria.saliency`).

    Attributes:
        data: re-iterable batches on the model's device: tensors, ``(*inputs, target)`` tuples
            (target ignored) or dicts of keyword arguments (``model(**batch)``).
        max_batches: use at most this many batches (None: all of ``data``).

    Raises:
        ConfigError: without ``data``.

    Example:
        >>> cfg = shrink.PruneConfig(0.3, importance="activation_weighted", data=batches)
        >>> res = shrink.prune(model, (ids,), cfg)
    """

    data: Iterable[Any] | None = None
    max_batches: int | None = None

    def __post_init__(self) -> None:
        example = "data=loader (batches of x, (x, y) or dicts of model keyword arguments)"
        check_data(self.data, self.max_batches, "ActivationWeighted", example)

    def __call__(
        self, group: ChannelGroup, modules: Mapping[str, nn.Module]
    ) -> torch.Tensor | None:
        raise ConfigError(
            "ActivationWeighted must be prepared on a model first: use shrink.score or prune"
        )

    def prepare(self, model: nn.Module, groups: tuple[ChannelGroup, ...]) -> SaliencyScores:
        """Record input norms on a copy; the copy then holds each weight's saliency."""
        assert self.data is not None  # checked in __post_init__
        work = copy.deepcopy(model)
        norms = _input_norms(work, self.data, self.max_batches)

        def saliency(name: str, p: nn.Parameter) -> torch.Tensor:
            s = p.detach().abs().to(_accumulate_dtype(p.dtype))
            if id(p) in norms:
                dim, rms = norms[id(p)]
                if rms.numel() != s.shape[dim]:
                    raise InvariantError(
                        f"{name} has {s.shape[dim]} input features on dim {dim}, but its "
                        f"layer's input has {rms.numel()} channels; the rule's input_weights or "
                        "in_axis is wrong"
                    )
                shape = [1] * s.ndim
                shape[dim] = -1
                s.mul_(rms.to(s).reshape(shape))
            return s

        return substitute(work, saliency)


def _input_norms(work: nn.Module, data: Iterable[Any],
                 max_batches: int | None) -> dict[int, tuple[int, torch.Tensor]]:
    """``{id(weight): (input dim, RMS per input feature)}`` of every layer linear in its input."""
    sums: dict[str, torch.Tensor] = {}
    rows: dict[str, int] = {}

    def hook(fqn: str, rule: Any) -> Callable[..., None]:
        def record(mod: nn.Module, args: tuple[Any, ...]) -> None:
            if not args or not isinstance(args[0], torch.Tensor):
                return  # input passed by keyword: not seen, the weight keeps |W|
            x = args[0].detach()
            x = x.movedim(rule.in_axis(mod, x.ndim), 0)
            x = x.reshape(x.shape[0], -1).double()
            sq = x.pow(2).sum(dim=1)
            sums[fqn] = sums[fqn] + sq if fqn in sums else sq
            rows[fqn] = rows.get(fqn, 0) + x.shape[1]
        return record

    layers = []
    for fqn, mod in work.named_modules():
        rule = rule_for(mod)
        weights = () if rule is None else tuple(rule.input_weights(mod))
        if rule is not None and weights:
            layers.append((fqn, weights, mod.register_forward_pre_hook(hook(fqn, rule))))
    try:
        with torch.no_grad():
            for batch in iter_batches(data, max_batches, "ActivationWeighted"):
                batch.run(work)
    finally:
        for *_, handle in layers:
            handle.remove()
    norms: dict[int, tuple[int, torch.Tensor]] = {}
    for fqn, weights, _ in layers:
        if fqn not in sums:
            log.debug("ActivationWeighted: %s never ran on the data; its weight keeps |W|", fqn)
            continue
        rms = (sums[fqn] / max(rows[fqn], 1)).sqrt()
        for w, dim in weights:
            norms[id(w)] = (dim, rms)
    return norms


@dataclass(frozen=True, slots=True, eq=False)
class Activation:
    """Mean absolute activation the group's consumers read, per channel.

    Forward pre-hooks on every consumer (a member on the IN side: conv, linear) record
    ``mean |x|`` over the batch and every non-channel axis of the input the consumer reads, at
    the axis its rule names. Removing a channel zeroes exactly those values (the masked oracle),
    so a channel whose inputs are near zero (dead ReLUs) costs little. Group reduction: the mean
    over every consumer position that carries the channel.

    Only groups with a consumer are scored; the others (the heads of an attention layer, whose
    per-head activations live inside the layer; a group read by no scored layer) are left out
    and keep their channels. :class:`ActivationWeighted` scores those too.

    Attributes:
        data: re-iterable batches on the model's device: tensors, ``(*inputs, target)``
            tuples (target ignored) or dicts of keyword arguments (``model(**batch)``).
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
        check_data(self.data, self.max_batches, "Activation", example)

    def __call__(
        self, group: ChannelGroup, modules: Mapping[str, nn.Module]
    ) -> torch.Tensor | None:
        raise ConfigError("Activation must be prepared on a model first: use shrink.score or prune")

    def prepare(self, model: nn.Module, groups: tuple[ChannelGroup, ...]) -> AxisScores:
        """Record ``mean |x|`` at every consumer's input on a copy."""
        assert self.data is not None  # checked in __post_init__
        work = copy.deepcopy(model)
        consumers = {m.module for g in groups for m in g.members if m.side is Side.IN}
        sums: dict[str, torch.Tensor] = {}
        counts: dict[str, int] = {}

        def hook(fqn: str, rule: Any) -> Callable[..., None]:
            def record(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                # the layer's first input; Hugging Face calls its layers with keywords
                first = args[0] if args else next(iter(kwargs.values()), None)
                x = kwargs.get("hidden_states", first) if not args else first
                if not isinstance(x, torch.Tensor):
                    return
                x = x.detach()
                rows = x.abs().movedim(rule.in_axis(mod, x.ndim), 0)
                v = rows.reshape(rows.shape[0], -1).double().sum(dim=1).cpu()
                sums[fqn] = sums[fqn] + v if fqn in sums else v
                counts[fqn] = counts.get(fqn, 0) + rows[0].numel()
            return record

        handles = [mod.register_forward_pre_hook(hook(fqn, rule), with_kwargs=True)
                   for fqn, mod, rule in _rules(work, consumers)]
        try:
            with torch.no_grad():
                for batch in iter_batches(self.data, self.max_batches, "Activation"):
                    batch.run(work)
        finally:
            for h in handles:
                h.remove()
        return AxisScores({(f, Side.IN): s / counts[f] for f, s in sums.items()}, reduce="mean")
