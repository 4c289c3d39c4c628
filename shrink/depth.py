"""Depth pruning: remove whole blocks (encoder/decoder layers) from a model's stacks of blocks.

A *stack* is an ``nn.ModuleList`` of repeated blocks, each mapping a hidden state to one of the
same shape (``model.layers`` of a Llama, ``transformer.h`` of GPT-2, ``encoder.block`` and
``decoder.block`` of T5). Removing block ``i`` is exactly running the original model with block
``i``'s forward replaced by the identity on the hidden state; that masked original is the oracle
:func:`remove_layers` checks the pruned model against.

Block influence (ShortGPT, Men et al. 2024) scores a block by how much it turns its input::

    BI_i = 1 - mean over tokens t of cos(x_t, y_t)

with ``x`` the hidden state block ``i`` reads and ``y`` the one it returns, over every position
of every calibration batch (padding included). A block that barely changes its input has a low
BI and is the first to go.

Hugging Face models are handled by duck typing (``transformers`` is never imported): the stacks
are found from the layer counts of ``model.config``; the pruned copy gets a config with those
counts and the per-layer lists (``layer_types``) trimmed, and every ``layer_idx`` attribute of
a kept block renumbered (the KV cache indexes layers by it), so ``generate()`` and
``save_pretrained`` → ``from_pretrained`` work. A block that hands later blocks something
besides the hidden state (T5's first block computes the relative position bias the others
reuse) cannot be removed: the masked original keeps that side output, the pruned model does
not, and the oracle check raises :class:`~shrink.errors.VerificationError`.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from shrink.criteria.data import split_batch
from shrink.depth_config import COUNT_ATTRS, ancestor_configs, update_configs
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


def find_layer_stacks(model: nn.Module) -> tuple[str, ...]:
    """The FQNs of ``model``'s stacks of repeated blocks, in module order.

    A stack is an ``nn.ModuleList`` whose blocks are all of one class and whose length equals a
    layer count (``num_hidden_layers``, ``n_layer``, ``num_layers``, ``encoder_layers``,
    ``decoder_layers``, ``num_decoder_layers``) of a ``config`` held by the model or by a module
    above the list. Lists nested inside a stack (T5's per-block ``layer``) are not stacks.

    Args:
        model: the model, e.g. a Hugging Face ``PreTrainedModel``; not modified.

    Returns:
        The FQNs, e.g. ``("model.layers",)`` for ``LlamaForCausalLM`` or
        ``("encoder.block", "decoder.block")`` for T5; ``()`` for a model without a config.

    Example:
        >>> shrink.depth.find_layer_stacks(GPT2LMHeadModel(GPT2Config()))
        ('transformer.h',)
    """
    modules = dict(model.named_modules())
    found: list[str] = []
    for fqn, mod in modules.items():
        if not isinstance(mod, nn.ModuleList) or len(mod) == 0:
            continue
        if any(fqn.startswith(f"{f}.") for f in found):  # pre-order: outer stacks come first
            continue
        if len({type(b) for b in mod}) != 1:
            continue
        counts = {getattr(cfg, a, None) for cfg in ancestor_configs(modules, fqn)
                  for a in COUNT_ATTRS}
        if len(mod) in counts:
            found.append(fqn)
    return tuple(found)


@torch.no_grad()
def block_influence(model: nn.Module, stack: str, data: Iterable[Any],
                    max_batches: int | None = None) -> torch.Tensor:
    """ShortGPT's block influence of every block of one stack: ``1 - mean cos(input, output)``.

    The batches run on a deep copy of ``model`` in eval mode; forward hooks read each block's
    hidden state (its first positional argument or its ``hidden_states`` keyword) and its output
    (a tensor, or the first element of a tuple or ``ModelOutput``).

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
    _blocks(model, stack)
    return _influences(model, (stack,), _batches(data, max_batches))[stack]


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

    Returns:
        :class:`DepthResult` with the new model, removed indices, scores and the oracle error.

    Raises:
        ConfigError: bad amount, criterion, scores or data; no stack found or named.
        VerificationError: the pruned model differs from the masked original (relative error
            above 1e-5); the model is not returned.

    Example:
        >>> res = shrink.remove_layers(llama, 2, data=[ids])
        >>> res.model.config.num_hidden_layers, res.removed
        (30, {'model.layers': (24, 27)})
    """
    stacks = _resolve_stacks(model, stack)
    lengths = {s: len(_blocks(model, s)) for s in stacks}
    counts = {s: _drop_count(amount, s, n) for s, n in lengths.items()}
    scores = _scores(model, stacks, lengths, criterion, data, example_inputs, max_batches)
    removed = {s: _lowest(scores[s], counts[s]) for s in stacks}
    pruned = _without(model, removed, find_layer_stacks(model))
    error = None
    batch = (_normalize(example_inputs) if example_inputs is not None
             else next(_batches(data, None), None) if data is not None else None)
    if verify and batch is not None:
        error = _oracle_error(model, pruned, removed, batch)
        if not error <= 1e-5:
            raise VerificationError(
                f"removing blocks {removed} changes the output: the pruned model differs from "
                f"the original with those blocks replaced by the identity (max relative error "
                f"{error:.3e} > 1e-5). A removed block hands later blocks something besides "
                "the hidden state (e.g. T5's first block computes the position bias the others "
                "reuse); keep it with criterion= scores that rank it highest. The model was not "
                "returned."
            )
    elif verify:
        log.info("depth: no example_inputs or data; the result is not checked")
    return DepthResult(pruned, removed, {s: tuple(scores[s]) for s in stacks}, error)


def _lowest(scores: Sequence[float], n: int) -> tuple[int, ...]:
    """The indices of the ``n`` lowest scores, ascending; ties go to the lower index."""
    order = sorted(range(len(scores)), key=lambda i: (scores[i], i))
    return tuple(sorted(order[:n]))


def _resolve_stacks(model: nn.Module, stack: str | Sequence[str] | None) -> tuple[str, ...]:
    if stack is None:
        found = find_layer_stacks(model)
        if not found:
            lists = [f"{f!r} ({len(m)})" for f, m in model.named_modules()
                     if isinstance(m, (nn.ModuleList, nn.Sequential)) and len(m) > 1][:8]
            raise ConfigError(
                f"found no stack of blocks in {type(model).__name__}: searched for nn.ModuleLists "
                f"of one block class whose length is a layer count of the model's config "
                f"({', '.join(COUNT_ATTRS)}), and the model has no such config or list. Pass "
                f"stack='...', the FQN of the list of blocks"
                + (f"; its lists are {', '.join(lists)}" if lists else "")
            )
        return found
    names = (stack,) if isinstance(stack, str) else tuple(stack)
    if not names or not all(isinstance(n, str) for n in names):
        raise ConfigError(f"stack must be a module FQN or a sequence of them, got {stack!r}")
    names = tuple(dict.fromkeys(names))
    for a in names:
        _blocks(model, a)
        for b in names:
            if b.startswith(f"{a}."):
                raise ConfigError(f"stack {b!r} lies inside stack {a!r}; name one of them")
    return names


def _blocks(model: nn.Module, fqn: str) -> nn.ModuleList | nn.Sequential:
    try:
        mod = model.get_submodule(fqn)
    except AttributeError:
        found = find_layer_stacks(model)
        raise ConfigError(
            f"stack {fqn!r}: {type(model).__name__} has no module of that name; the stacks found "
            f"are {list(found)}"
        ) from None
    if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
        raise ConfigError(
            f"stack {fqn!r} is a {type(mod).__name__}, not an nn.ModuleList or nn.Sequential of "
            "blocks; name the list that holds the blocks"
        )
    return mod


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
        batches = (_batches(data, max_batches) if data is not None
                   else iter([_normalize(example_inputs)]))
        bi = _influences(model, stacks, batches)
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


def _normalize(example_inputs: Any) -> tuple[Any, ...] | Mapping[str, Any]:
    """Example inputs as a tuple of positional inputs or a dict of keyword inputs."""
    if isinstance(example_inputs, Mapping):
        return example_inputs
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs)
    raise ConfigError(f"example_inputs must be a tensor, a tuple of positional inputs or a dict "
                      f"of keyword inputs, got {type(example_inputs).__name__}")


def _inputs_of(batch: Any) -> tuple[Any, ...] | Mapping[str, Any]:
    """A data batch as inputs: a dict of keyword inputs, or the positional inputs of a tensor
    or ``(*inputs, target)`` batch."""
    if isinstance(batch, Mapping):
        return batch
    return split_batch(batch)[0]


def _run(model: nn.Module, inputs: tuple[Any, ...] | Mapping[str, Any]) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)


def _batches(data: Any, max_batches: int | None) -> Iterator[tuple[Any, ...] | Mapping[str, Any]]:
    """The inputs of at most ``max_batches`` batches of ``data`` (checked now, run lazily)."""
    if isinstance(data, (torch.Tensor, str, bytes, Mapping)) or not isinstance(data, Iterable):
        raise ConfigError(
            f"data must be an iterable of batches (a DataLoader or a list), got "
            f"{type(data).__name__}; wrap one batch in a list: data=[input_ids]"
        )
    if max_batches is not None and (isinstance(max_batches, bool) or max_batches < 1):
        raise ConfigError(f"max_batches must be an int >= 1 or None, got {max_batches!r}")

    def gen() -> Iterator[tuple[Any, ...] | Mapping[str, Any]]:
        n = 0
        for batch in data:
            if max_batches is not None and n >= max_batches:
                break
            n += 1
            yield _inputs_of(batch)
        if n == 0:
            raise ConfigError("data yielded no batches; pass a non-empty, re-iterable loader "
                              "(a DataLoader or a list; a generator is spent after one use)")

    return gen()


def _hidden(args: tuple[Any, ...], kwargs: Mapping[str, Any], where: str) -> torch.Tensor:
    x = args[0] if args else kwargs.get("hidden_states")
    if not isinstance(x, torch.Tensor):
        raise ConfigError(
            f"block {where} was called without a hidden-state tensor as its first argument or "
            "as hidden_states=; depth pruning needs blocks that map a hidden state to one of "
            "the same shape"
        )
    return x


def _first(output: Any) -> Any:
    if isinstance(output, Mapping):
        return next(iter(output.values()), None)
    if isinstance(output, (tuple, list)):
        return output[0] if output else None
    return output


def _same_shape(x: torch.Tensor, y: Any, where: str) -> torch.Tensor:
    if not isinstance(y, torch.Tensor) or y.shape != x.shape:
        got = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
        raise ConfigError(
            f"block {where} maps a hidden state of shape {tuple(x.shape)} to {got}: only blocks "
            "that keep the hidden state's shape can be removed"
        )
    return y


def _influences(model: nn.Module, stacks: tuple[str, ...],
                batches: Iterator[tuple[Any, ...] | Mapping[str, Any]]) -> dict[str, torch.Tensor]:
    work = copy.deepcopy(model).eval()
    sums = {s: torch.zeros(len(_blocks(work, s)), dtype=torch.float64) for s in stacks}
    counts = {s: torch.zeros_like(v) for s, v in sums.items()}

    def hook(s: str, i: int) -> Callable[..., None]:
        def record(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   output: Any) -> None:
            x = _hidden(args, kwargs, f"{s}.{i}")
            y = _same_shape(x, _first(output), f"{s}.{i}")
            cos = F.cosine_similarity(x.reshape(-1, x.shape[-1]).double(),
                                      y.reshape(-1, y.shape[-1]).double(), dim=-1)
            sums[s][i] += cos.sum().cpu()
            counts[s][i] += cos.numel()
        return record

    for s in stacks:
        for i, block in enumerate(_blocks(work, s)):
            block.register_forward_hook(hook(s, i), with_kwargs=True)
    with torch.no_grad():
        for inputs in batches:
            _run(work, inputs)
    idle = [f"{s}.{i}" for s in stacks for i in range(len(counts[s])) if counts[s][i] == 0]
    if idle:
        raise ConfigError(f"blocks {idle} never ran on the data, so they have no block "
                          "influence; give batches that run the whole model (an encoder-"
                          "decoder needs decoder inputs too) or scores as criterion=")
    return {s: 1.0 - sums[s] / counts[s] for s in stacks}


def _without(model: nn.Module, removed: Mapping[str, tuple[int, ...]],
             all_stacks: tuple[str, ...]) -> nn.Module:
    """A deep copy of ``model`` without the removed blocks (renumbered, config updated)."""
    new = copy.deepcopy(model)
    before = {s: len(_blocks(new, s)) for s in removed}
    for s, drop in removed.items():
        old = _blocks(new, s)
        kept = [b for i, b in enumerate(old) if i not in drop]
        for j, block in enumerate(kept):
            for m in block.modules():
                idx = vars(m).get("layer_idx")
                if isinstance(idx, int) and not isinstance(idx, bool):
                    vars(m)["layer_idx"] = j
        new.set_submodule(s, nn.Sequential(*kept) if isinstance(old, nn.Sequential)
                          else nn.ModuleList(kept))
    update_configs(new, {s: (before[s], d) for s, d in removed.items()},
                   tuple(dict.fromkeys((*all_stacks, *removed))))
    return new


def _identity_hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any],
                   output: Any) -> Any:
    """Make a block the identity on its hidden state, keeping its output's structure."""
    x = _hidden(args, kwargs, type(_m).__name__)
    _same_shape(x, _first(output), type(_m).__name__)
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


def _comparable(output: Any) -> Any:
    """The model outputs the oracle compares: per-block entries (hidden-state tuples, caches)
    have one item per block, so only the top-level tensors count."""
    if isinstance(output, Mapping):
        return [v for v in output.values() if isinstance(v, torch.Tensor)]
    if isinstance(output, (tuple, list)) and output:
        if all(isinstance(v, torch.Tensor) for v in output):
            return list(output)
        return _comparable(output[0])
    return output


def _oracle_error(model: nn.Module, pruned: nn.Module,
                  removed: Mapping[str, tuple[int, ...]],
                  inputs: tuple[Any, ...] | Mapping[str, Any]) -> float:
    ref = copy.deepcopy(model).eval()
    for s, drop in removed.items():
        for i in drop:
            _blocks(ref, s)[i].register_forward_hook(_identity_hook, with_kwargs=True)
    modes = {m: m.training for m in pruned.modules()}
    pruned.eval()
    try:
        with torch.no_grad():
            expected = _comparable(_run(ref, inputs))
            actual = _comparable(_run(pruned, inputs))
    finally:
        for m, mode in modes.items():
            m.training = mode
    return relative_error(actual, expected)
