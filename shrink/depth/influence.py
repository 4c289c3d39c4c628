"""Block influence (ShortGPT, Men et al. 2024): how much a block turns its input.

For block ``i`` with input hidden state ``x`` and output ``y``::

    BI_i = 1 - mean over tokens t of cos(x_t, y_t)

over every position of every calibration batch (padding included), accumulated in float64. A
block that barely changes its input has a low BI and is the first to go. The hidden state is a
block's first positional argument or its ``hidden_states`` keyword; its output is a tensor or
the first element of a tuple or ``ModelOutput`` (the block conventions of Hugging Face stacks).
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any, TypeAlias

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from shrink.criteria.batches import check_data, iter_batches
from shrink.depth.stacks import blocks_of
from shrink.errors import ConfigError

Inputs: TypeAlias = tuple[Any, ...] | Mapping[str, Any]
"""A model's inputs: positional (``model(*inputs)``) or keyword (``model(**inputs)``)."""


def block_influence(model: nn.Module, stack: str, data: Iterable[Any],
                    max_batches: int | None = None) -> torch.Tensor:
    """ShortGPT's block influence of every block of one stack: ``1 - mean cos(input, output)``.

    The batches run on a deep copy of ``model`` in eval mode under ``no_grad``; forward hooks
    read each block's hidden state and output.

    Args:
        model: the model; not modified.
        stack: the FQN of the ``nn.ModuleList`` of blocks, e.g. ``"model.layers"``.
        data: an iterable of batches: a tensor (the first input, e.g. ``input_ids``), a
            ``(*inputs, target)`` tuple or a dict of keyword inputs.
        max_batches: use at most this many batches (None: all of ``data``).

    Returns:
        float64 tensor ``[len(stack)]``; low means the block changes its input little.

    Raises:
        ConfigError: bad ``data`` or ``stack``, a block that never ran on the data, or one that
            changes the hidden state's shape.

    Example:
        >>> bi = shrink.depth.block_influence(llama, "model.layers", [ids])
    """
    blocks_of(model, stack)
    return influences(model, (stack,), batches(data, max_batches))[stack]


def influences(model: nn.Module, stacks: tuple[str, ...],
               inputs: Iterator[Inputs]) -> dict[str, torch.Tensor]:
    """Block influence of every block of ``stacks`` over one pass of ``inputs``."""
    work = copy.deepcopy(model).eval()
    sums = {s: torch.zeros(len(blocks_of(work, s)), dtype=torch.float64) for s in stacks}
    counts = {s: torch.zeros_like(v) for s, v in sums.items()}

    def hook(s: str, i: int) -> Callable[..., None]:
        where = f"{s}.{i}"

        def record(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   output: Any) -> None:
            x = hidden_of(args, kwargs, where)
            y = same_shape(x, first_output(output), where)
            cos = F.cosine_similarity(x.reshape(-1, x.shape[-1]).double(),
                                      y.reshape(-1, y.shape[-1]).double(), dim=-1)
            sums[s][i] += cos.sum().cpu()
            counts[s][i] += cos.numel()
        return record

    for s in stacks:
        for i, block in enumerate(blocks_of(work, s)):
            block.register_forward_hook(hook(s, i), with_kwargs=True)
    with torch.no_grad():
        for one in inputs:
            run(work, one)
    idle = [f"{s}.{i}" for s in stacks for i in range(len(counts[s])) if counts[s][i] == 0]
    if idle:
        raise ConfigError(f"blocks {idle} never ran on the data, so they have no block "
                          "influence; give batches that run the whole model (an encoder-"
                          "decoder needs decoder inputs too) or scores as criterion=")
    return {s: 1.0 - sums[s] / counts[s] for s in stacks}


def batches(data: Any, max_batches: int | None) -> Iterator[Inputs]:
    """The inputs of at most ``max_batches`` batches of ``data``: a tensor batch is the first
    input, a tuple or list is ``(*inputs, target)``, a dict holds keyword inputs
    (:func:`~shrink.criteria.batches.split_batch`). ``data`` is checked now and read lazily.

    Raises:
        ConfigError: ``data`` is not an iterable of batches, or yields none.
    """
    check_data(data, max_batches, "depth", "data=[input_ids, ...]")
    return (dict(b.kwargs) if b.kwargs else b.args
            for b in iter_batches(data, max_batches, "depth"))


def as_inputs(example_inputs: Any) -> Inputs:
    """Example inputs as positional inputs (a tensor or tuple) or keyword inputs (a dict).

    Raises:
        ConfigError: for anything else.
    """
    if isinstance(example_inputs, Mapping):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ConfigError(f"example_inputs must be a tensor, a tuple of positional inputs or a dict "
                      f"of keyword inputs, got {type(example_inputs).__name__}")


def run(model: nn.Module, inputs: Inputs) -> Any:
    """``model(**inputs)`` or ``model(*inputs)``."""
    return model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)


def hidden_of(args: tuple[Any, ...], kwargs: Mapping[str, Any], where: str) -> torch.Tensor:
    """The hidden state a block was called with: its first positional argument or
    ``hidden_states=``.

    Raises:
        ConfigError: neither is a tensor.
    """
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        raise ConfigError(
            f"block {where} was called without a hidden-state tensor as its first argument or "
            "as hidden_states=; depth pruning needs blocks that map a hidden state to one of "
            "the same shape"
        )
    return x


def first_output(output: Any) -> Any:
    """A block's output hidden state: the output, or the first entry of a tuple/list/dict
    (``ModelOutput`` is a dict)."""
    if isinstance(output, Mapping):
        return next(iter(output.values()), None)
    if isinstance(output, (tuple, list)):
        return output[0] if output else None
    return output


def same_shape(x: torch.Tensor, y: Any, where: str) -> torch.Tensor:
    """``y``, checked to be a tensor shaped like the hidden state ``x``.

    Raises:
        ConfigError: the block changes the hidden state's shape (it cannot be removed).
    """
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(
            f"block {where} maps a hidden state of shape {tuple(x.shape)} to {got}: only blocks "
            "that keep the hidden state's shape can be removed"
        )
    return y
