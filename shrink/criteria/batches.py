"""How data-driven criteria read the user's batches.

A batch is one of:

* a tensor: the model's only input, no target;
* a ``(*inputs, target)`` tuple or list, as a ``DataLoader`` over a ``TensorDataset`` yields it
  (one element: an input without a target);
* a mapping of keyword arguments, as a Hugging Face collator yields it: the model is called as
  ``model(**batch)`` (every key, ``labels`` included) and the target is ``batch["labels"]``, or
  None without that key.

``data`` must be re-iterable (a ``DataLoader`` or a list), since iterative pruning scores once
per step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from shrink.errors import ConfigError

LOSS_FN_FIX = ("Pass e.g. loss_fn=torch.nn.functional.cross_entropy, or, for a model that "
               "returns .loss (Hugging Face given labels), dict batches with a 'labels' key.")


@dataclass(frozen=True, slots=True)
class Batch:
    """One batch, split into the model's arguments and the target.

    Attributes:
        args: positional inputs of the model.
        kwargs: keyword inputs of the model (a mapping batch).
        target: what the loss compares the output with; None when the batch has none.
    """

    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    target: Any = None

    def run(self, model: nn.Module) -> Any:
        """``model(*args, **kwargs)``."""
        return model(*self.args, **self.kwargs)


def split_batch(batch: Any) -> Batch:
    """The model's arguments and the target of one batch (see the module docstring).

    Raises:
        ConfigError: for any other batch type.

    Example:
        >>> split_batch((x, y)).target is y
        True
    """
    if isinstance(batch, torch.Tensor):
        return Batch((batch,))
    if isinstance(batch, Mapping):
        if not all(isinstance(k, str) for k in batch):
            raise ConfigError(
                f"a mapping batch must have str keys (the model's keyword arguments), got "
                f"{sorted(map(repr, batch))}"
            )
        return Batch((), dict(batch), batch.get("labels"))
    if isinstance(batch, (tuple, list)) and batch:
        if len(batch) == 1:
            return Batch((batch[0],))
        return Batch(tuple(batch[:-1]), {}, batch[-1])
    raise ConfigError(
        f"a data batch must be a tensor, an (inputs..., target) tuple/list or a dict of keyword "
        f"arguments, got {type(batch).__name__}. Wrap the data so it yields (x, y) pairs, e.g. "
        "DataLoader(TensorDataset(x, y), batch_size=32)."
    )


def iter_batches(data: Iterable[Any], max_batches: int | None, who: str) -> Iterator[Batch]:
    """The first ``max_batches`` batches of ``data`` (all when None), split.

    Raises:
        ConfigError: ``data`` yields nothing, or a batch of an unknown type.
    """
    n = 0
    for batch in data:
        if max_batches is not None and n >= max_batches:
            return
        n += 1
        yield split_batch(batch)
    if n == 0:
        raise ConfigError(
            f"{who}: data yielded no batches. Pass a non-empty, re-iterable loader (a DataLoader "
            "or a list of batches; a generator is exhausted after its first use)."
        )


def check_data(data: Any, max_batches: int | None, who: str, example: str) -> None:
    """Refuse missing or unusable ``data``/``max_batches`` when a criterion is built.

    Raises:
        ConfigError: naming ``who``, what is wrong, and ``example`` as the fix.
    """
    if data is None:
        raise ConfigError(
            f"{who} importance needs data: it scores channels from the model's behaviour on real "
            f"batches, and none were given. Pass {example}, or use a data-free criterion such as "
            "importance='l1'."
        )
    if isinstance(data, (torch.Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise ConfigError(
            f"{who}: data must be an iterable of batches (a DataLoader or a list of (x, y) "
            f"tuples or dicts), got {type(data).__name__}; wrap one batch in a list: "
            "data=[batch]"
        )
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise ConfigError(f"{who}: max_batches must be an int >= 1 or None, got {max_batches!r}")


def batch_loss(model: nn.Module, batch: Batch, loss_fn: Callable[[Any, Any], Any] | None,
               who: str = "Taylor", purpose: str = "differentiate") -> torch.Tensor:
    """The scalar loss of ``model`` on one batch: ``loss_fn(output, target)``, or the output's
    ``.loss`` when ``loss_fn`` is None (a Hugging Face model given ``labels``).

    Args:
        who: what needs the loss, for the error messages (e.g. ``"Taylor"``).
        purpose: what it does with the loss (``"differentiate"``, ``"measure"``).

    Raises:
        ConfigError: a ``loss_fn`` but no target in the batch; no ``loss_fn`` and no ``.loss``;
            a loss that is not a scalar tensor.
    """
    if loss_fn is not None and batch.target is None:
        raise ConfigError(
            f"{who}: a batch has no target, so there is no loss to {purpose}. Yield "
            "(x, y) pairs (or dicts with 'labels'), or use importance='activation', which "
            "needs inputs only."
        )
    out = batch.run(model)
    loss: Any
    if loss_fn is not None:
        loss = loss_fn(out, batch.target)
    else:
        loss = getattr(out, "loss", None)
        if loss is None:
            raise ConfigError(
                f"{who} needs loss_fn(output, target) -> scalar loss to {purpose}, got None, "
                f"and the model's output ({type(out).__name__}) has no .loss. {LOSS_FN_FIX}"
            )
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        raise ConfigError(f"{who}: the loss must be a scalar tensor, got {loss!r}")
    return loss
