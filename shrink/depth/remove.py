"""remove_layers: a new model without the least important blocks of each stack.

Removing block ``i`` of a stack is exactly running the original model with block ``i``'s
forward replaced by the identity on the hidden state: a forward hook that returns the block's
input hidden state in the structure of its output (a tensor, or element 0 of a tuple or
``ModelOutput``, the rest kept). That masked original is the oracle the pruned model is checked
against. A block that hands later blocks something besides the hidden state (T5's first block
computes the relative position bias the others reuse) cannot be removed: such blocks are kept
whatever their score. Any other such block the check would catch: the masked original keeps
that side output, the pruned model does not, and the check raises
:class:`~shrink.errors.VerificationError`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shrink.depth.influence import (
    Inputs,
    as_inputs,
    batches,
    first_output,
    hidden_of,
    influences,
    run,
    same_shape,
)
from shrink.depth.stacks import blocks_of, find_layer_stacks, resolve_stacks, update_configs
from shrink.errors import ConfigError, VerificationError
from shrink.verify import relative_error

log = logging.getLogger(__name__)

#: ``fn(model, stack_fqn, index) -> score``; higher means more important
ScoreFn = Callable[[nn.Module, str, int], float]


@dataclass(frozen=True, slots=True)
class DepthResult:
    """What :func:`remove_layers` returns.

    Attributes:
        model: the new model without the removed blocks (same class as the original).
        removed: ``{stack FQN: indices removed}``, ascending, in the original numbering.
        scores: ``{stack FQN: score of every block}``, in the original order.
        max_rel_error: max relative error against the masked original on the checked inputs,
            or None when nothing was checked.
    """

    model: nn.Module
    removed: dict[str, tuple[int, ...]]
    scores: dict[str, tuple[float, ...]]
    max_rel_error: float | None = None

    def describe(self) -> str:
        """One line for reports, e.g. ``depth: model.layers 4 -> 3 blocks (removed [2]) ...``."""
        stacks = "; ".join(
            f"{fqn} {len(self.scores[fqn])} -> {len(self.scores[fqn]) - len(idx)} blocks "
            f"(removed {list(idx)}, scores {', '.join(f'{self.scores[fqn][i]:.3g}' for i in idx)})"
            if idx else f"{fqn} {len(self.scores[fqn])} blocks (none removed)"
            for fqn, idx in self.removed.items()
        )
        check = ("not checked against the masked original" if self.max_rel_error is None else
                 f"masked-oracle max relative error {self.max_rel_error:.2e}")
        return f"depth: {stacks}; {check}"


def remove_layers(
    model: nn.Module,
    amount: int | float,
    *,
    data: Iterable[Any] | None = None,
    example_inputs: Any = None,
    criterion: str | ScoreFn | Sequence[float] | Mapping[str, Sequence[float]]
    = "block_influence",
    stack: str | Sequence[str] | None = None,
    max_batches: int | None = None,
    verify: bool = True,
    rtol: float = 1e-5,
) -> DepthResult:
    """Return a new model with the least important blocks of each stack removed.

    The model is deep-copied and each stack replaced by a new ``nn.ModuleList`` (or
    ``nn.Sequential``) of the kept blocks, in order. Every ``layer_idx`` attribute inside a kept
    block is renumbered to its new position, and every ``config`` object above a stack is
    replaced by a copy with the layer count and per-layer lists (``layer_types``) updated (the
    caller's model and config are never modified). Blocks are removed lowest score first, ties
    by lowest index.

    Args:
        model: the model; not modified.
        amount: blocks removed from every stack: an int, or a float in [0, 1) for that fraction
            of each stack's blocks, rounded down. At least one block of each stack stays.
        data: calibration batches for ``criterion="block_influence"``: a tensor (the first
            input), a ``(*inputs, target)`` tuple or a dict of keyword inputs per batch.
        example_inputs: inputs for the oracle check (a tensor, a tuple of positional inputs
            or a dict of keyword inputs); also the one calibration batch when ``data`` is None.
        criterion: ``"block_influence"``, a callable ``fn(model, stack_fqn, index) -> float``,
            a sequence of scores (one stack) or ``{stack_fqn: scores}``; higher is more
            important.
        stack: the FQN(s) of the stacks to prune (an ``nn.ModuleList`` or ``nn.Sequential``);
            default: every stack :func:`find_layer_stacks` finds.
        max_batches: use at most this many batches of ``data``.
        verify: check the result against the masked original (the original with the removed
            blocks' forwards replaced by the identity) on ``example_inputs`` or the first batch
            of ``data``; skipped when neither is given.
        rtol: largest allowed ``max|pruned - masked| / max|masked|`` of that check.

    Returns:
        :class:`DepthResult` with the new model, removed indices, scores and the oracle error.

    Raises:
        ConfigError: bad amount, criterion, scores or data; no stack found or named.
        VerificationError: the pruned model differs from the masked original (relative error
            above ``rtol``); the model is not returned.

    Example:
        >>> res = shrink.remove_layers(llama, 2, data=[ids])
        >>> res.model.config.num_hidden_layers, res.removed
        (30, {'model.layers': (24, 27)})
    """
    stacks = resolve_stacks(model, stack)
    lengths = {s: len(blocks_of(model, s)) for s in stacks}
    counts = {s: _drop_count(amount, s, n) for s, n in lengths.items()}
    scores = _scores(model, stacks, lengths, criterion, data, example_inputs, max_batches)
    kept = {s: _shared_state_blocks(model, s) for s in stacks}
    for s in stacks:
        if kept[s]:
            log.info("depth: %s keeps blocks %s (they compute state later blocks reuse, e.g. "
                     "T5's relative position bias)", s, kept[s])
        if counts[s] > lengths[s] - max(len(kept[s]), 1):
            raise ConfigError(
                f"depth: cannot remove {counts[s]} of the {lengths[s]} blocks of {s}: blocks "
                f"{kept[s]} compute state later blocks reuse and stay; ask for fewer"
            )
    removed = {s: _lowest(scores[s], counts[s], kept[s]) for s in stacks}
    pruned = _without(model, removed, find_layer_stacks(model))
    error = None
    batch = (as_inputs(example_inputs) if example_inputs is not None
             else next(batches(data, None), None) if data is not None else None)
    if verify and batch is not None:
        error = _oracle_error(model, pruned, removed, batch)
        if not error <= rtol:
            raise VerificationError(
                f"removing blocks {removed} changes the output: the pruned model differs from "
                f"the original with those blocks replaced by the identity (max relative error "
                f"{error:.3e} > rtol {rtol:.1e}). A removed block hands later blocks something "
                "besides the hidden state (e.g. T5's first block computes the position bias the "
                "others reuse); keep it with criterion= scores that rank it highest. The model "
                "was not returned."
            )
    elif verify:
        log.info("depth: no example_inputs or data; the result is not checked")
    return DepthResult(pruned, removed, {s: tuple(scores[s]) for s in stacks}, error)


def _lowest(scores: Sequence[float], n: int, keep: Sequence[int] = ()) -> tuple[int, ...]:
    """The indices of the ``n`` lowest scores (never one in ``keep``), ascending; ties go to
    the lower index."""
    order = sorted((i for i in range(len(scores)) if i not in keep),
                   key=lambda i: (scores[i], i))
    return tuple(sorted(order[:n]))


def _shared_state_blocks(model: nn.Module, stack: str) -> list[int]:
    """Blocks that compute something later blocks reuse besides the hidden state: T5's first
    block owns the relative position bias every other block of its stack adds."""
    return [i for i, b in enumerate(blocks_of(model, stack))
            if any(getattr(m, "has_relative_attention_bias", False) is True
                   for m in b.modules())]


def _drop_count(amount: Any, fqn: str, n: int) -> int:
    if isinstance(amount, bool) or not isinstance(amount, (int, float)):
        raise ConfigError(f"depth amount must be an int (blocks removed from every stack) or a "
                          f"fraction in [0, 1), got {amount!r}")
    if isinstance(amount, float):
        if not 0.0 <= amount < 1.0:
            raise ConfigError(f"depth amount {amount} is out of range: a float is the fraction "
                              "of each stack's blocks removed, in [0, 1); pass an int for a count")
        return int(amount * n)
    if amount < 0 or amount >= n:
        raise ConfigError(
            f"depth amount {amount}: stack {fqn!r} has {n} blocks, so at most {n - 1} can be "
            "removed (at least one block stays); pass a smaller amount or a fraction"
        )
    return amount


def _scores(model: nn.Module, stacks: tuple[str, ...], lengths: Mapping[str, int],
            criterion: Any, data: Any, example_inputs: Any,
            max_batches: int | None) -> dict[str, list[float]]:
    if isinstance(criterion, str):
        if criterion != "block_influence":
            raise ConfigError(
                f"criterion={criterion!r} is unknown: use 'block_influence', a callable "
                "fn(model, stack_fqn, index) -> float, or scores (higher = more important)"
            )
        if data is None and example_inputs is None:
            raise ConfigError(
                "criterion='block_influence' needs data= (calibration batches) or "
                "example_inputs=: it scores blocks by how much they change their input"
            )
        inputs = (batches(data, max_batches) if data is not None
                  else iter([as_inputs(example_inputs)]))
        bi = influences(model, stacks, inputs)
        raw: dict[str, Any] = {s: bi[s].tolist() for s in stacks}
    elif callable(criterion):
        raw = {s: [criterion(model, s, i) for i in range(lengths[s])] for s in stacks}
    elif isinstance(criterion, Mapping):
        missing = [s for s in stacks if s not in criterion]
        if missing:
            raise ConfigError(f"criterion scores name no stack {missing}; give {{stack: scores}} "
                              f"for each of {list(stacks)}")
        raw = {s: criterion[s] for s in stacks}
    elif isinstance(criterion, (Sequence, torch.Tensor)):
        if len(stacks) != 1:
            raise ConfigError(f"one sequence of scores for {len(stacks)} stacks {list(stacks)}: "
                              "pass criterion={stack: scores} or stack=")
        raw = {stacks[0]: criterion}
    else:
        raise ConfigError(f"criterion must be 'block_influence', a callable or scores, got "
                          f"{type(criterion).__name__}")
    out: dict[str, list[float]] = {}
    for s in stacks:
        values = [float(v) for v in raw[s]]
        if len(values) != lengths[s] or any(v != v for v in values):
            raise ConfigError(f"stack {s!r} has {lengths[s]} blocks but got {len(values)} scores "
                              f"{values[:8]} (one non-NaN float per block expected)")
        out[s] = values
    return out


def _without(model: nn.Module, removed: Mapping[str, tuple[int, ...]],
             all_stacks: tuple[str, ...]) -> nn.Module:
    """A deep copy of ``model`` without the removed blocks (renumbered, config updated)."""
    new = copy.deepcopy(model)
    before = {s: len(blocks_of(new, s)) for s in removed}
    for s, drop in removed.items():
        old = blocks_of(new, s)
        kept = [b for i, b in enumerate(old) if i not in drop]
        for j, block in enumerate(kept):
            for m in block.modules():
                idx = m.__dict__.get("layer_idx")
                if isinstance(idx, int) and not isinstance(idx, bool):
                    m.__dict__["layer_idx"] = j  # a plain int attribute, set where it lives
        new.set_submodule(s, nn.Sequential(*kept) if isinstance(old, nn.Sequential)
                          else nn.ModuleList(kept))
    update_configs(new, {s: (before[s], d) for s, d in removed.items()},
                   tuple(dict.fromkeys((*all_stacks, *removed))))
    return new


def _identity(where: str) -> Callable[..., Any]:
    """A forward hook that makes a block the identity on its hidden state, keeping the
    structure of its output (element 0 of a tuple or ``ModelOutput`` replaced, the rest kept)."""

    def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> Any:
        x = hidden_of(args, kwargs, where)
        same_shape(x, first_output(output), where)
        if isinstance(output, torch.Tensor):
            return x
        if isinstance(output, tuple):
            rest = tuple(output[1:])
            return type(output)(x, *rest) if hasattr(output, "_fields") else (x, *rest)
        if isinstance(output, list):
            return [x, *output[1:]]
        out = copy.copy(output)  # a dict or ModelOutput: replace its first entry
        out[next(iter(output))] = x
        return out

    return hook


def _comparable(output: Any) -> Any:
    """The model outputs the oracle compares: per-block entries (hidden-state tuples, caches)
    have one item per block, so only the top-level tensors count."""
    if isinstance(output, Mapping):
        tensors = [v for v in output.values() if isinstance(v, torch.Tensor)]
        return tensors or _comparable(first_output(output))
    if isinstance(output, (tuple, list)) and output:
        if all(isinstance(v, torch.Tensor) for v in output):
            return list(output)
        return _comparable(output[0])
    return output


def _oracle_error(model: nn.Module, pruned: nn.Module,
                  removed: Mapping[str, tuple[int, ...]],
                  inputs: Inputs) -> float:
    """Max relative error of ``pruned`` against the masked original, both in eval mode."""
    ref = copy.deepcopy(model).eval()
    for s, drop in removed.items():
        for i in drop:
            blocks_of(ref, s)[i].register_forward_hook(_identity(f"{s}.{i}"), with_kwargs=True)
    modes = {m: m.training for m in pruned.modules()}
    pruned.eval()
    try:
        with torch.no_grad():
            expected = _comparable(run(ref, inputs))
            actual = _comparable(run(pruned, inputs))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return relative_error(actual, expected)
