"""Stacks of blocks and the configs that count them, found and edited by duck typing.

A *stack* is an ``nn.ModuleList`` of repeated blocks (``model.layers`` of a Llama,
``transformer.h`` of GPT-2, ``encoder.block``/``decoder.block`` of T5). A *config* is any object
held as ``.config`` by a module at or above a stack that has an int layer count
(:data:`COUNT_ATTRS`), as Hugging Face models hold theirs; ``transformers`` is never imported.

After blocks are removed from a stack, each such config is replaced, in every module that held
it, by a copy whose counts that equalled the stack's old length hold the new one and whose
per-layer lists (:data:`PER_LAYER_LISTS`) keep the entries of the kept blocks. A config above
both an encoder and a decoder stack (T5's, BART's) says which count is whose by name:
``decoder_layers``/``num_decoder_layers`` belong to the stack whose path names a decoder, the
other counts to the rest.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from shrink.errors import ConfigError

log = logging.getLogger(__name__)

COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers",
               "num_decoder_layers")
DECODER_ATTRS = ("decoder_layers", "num_decoder_layers")
#: one entry per block, e.g. ``layer_types = ["sliding_attention", "full_attention", ...]``
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "layers_block_type", "no_rope_layers",
                   "num_attention_heads_per_layer")


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
        counts = {_count(cfg, a) for cfg in ancestor_configs(modules, fqn) for a in COUNT_ATTRS}
        if len(mod) in counts:
            found.append(fqn)
    return tuple(found)


def resolve_stacks(model: nn.Module, stack: str | Sequence[str] | None) -> tuple[str, ...]:
    """The stacks to prune: ``stack`` checked, or every stack found when it is None.

    Raises:
        ConfigError: no stack found, or ``stack`` names no list of blocks.
    """
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
        blocks_of(model, a)
        for b in names:
            if b.startswith(f"{a}."):
                raise ConfigError(f"stack {b!r} lies inside stack {a!r}; name one of them")
    return names


def blocks_of(model: nn.Module, fqn: str) -> nn.ModuleList | nn.Sequential:
    """The list of blocks at ``fqn``.

    Raises:
        ConfigError: ``model`` has no such module, or it is not a ModuleList or Sequential.
    """
    try:
        mod = model.get_submodule(fqn)
    except AttributeError:
        raise ConfigError(
            f"stack {fqn!r}: {type(model).__name__} has no module of that name; the stacks found "
            f"are {list(find_layer_stacks(model))}"
        ) from None
    if not isinstance(mod, (nn.ModuleList, nn.Sequential)):
        raise ConfigError(
            f"stack {fqn!r} is a {type(mod).__name__}, not an nn.ModuleList or nn.Sequential of "
            "blocks; name the list that holds the blocks"
        )
    return mod


def _count(cfg: Any, attr: str) -> int | None:
    value = getattr(cfg, attr, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def ancestor_configs(modules: Mapping[str, nn.Module], fqn: str) -> list[Any]:
    """The distinct configs with a layer count held by the modules at and above ``fqn``'s parent,
    outermost first (``modules`` is ``dict(model.named_modules())``)."""
    parts = fqn.split(".")
    found: list[Any] = []
    for k in range(len(parts)):
        cfg = getattr(modules.get(".".join(parts[:k])), "config", None)
        if cfg is None or any(c is cfg for c in found):
            continue
        if any(_count(cfg, a) is not None for a in COUNT_ATTRS):
            found.append(cfg)
    return found


def _role(fqn: str) -> str | None:
    parts = fqn.split(".")
    if any("decoder" in p for p in parts):
        return "decoder"
    return "encoder" if any("encoder" in p for p in parts) else None


def update_configs(model: nn.Module, removed: Mapping[str, tuple[int, tuple[int, ...]]],
                   stacks: tuple[str, ...]) -> None:
    """Give ``model`` (a fresh copy, edited in place) configs that match its pruned stacks.

    Args:
        model: the copy whose stacks were just shortened.
        removed: ``{stack FQN: (old length, indices removed)}``.
        stacks: every stack of the model (the removed ones included), to tell which configs
            serve both encoder and decoder stacks.
    """
    modules = dict(model.named_modules())
    above = {s: ancestor_configs(modules, s) for s in stacks}
    copies: dict[int, Any] = {}
    for s in removed:
        for cfg in above[s]:
            copies.setdefault(id(cfg), copy.deepcopy(cfg))
    for mod in modules.values():
        held = mod.__dict__.get("config")
        if held is not None and id(held) in copies:
            mod.__dict__["config"] = copies[id(held)]
    for s, (n, drop) in removed.items():
        for old in above[s]:
            roles = {_role(t) for t in stacks if any(c is old for c in above[t])}
            _update(copies[id(old)], n, drop, _role(s) if len(roles) > 1 else None)


def _update(cfg: Any, n: int, drop: tuple[int, ...], role: str | None) -> None:
    attrs = [a for a in COUNT_ATTRS if _count(cfg, a) == n]
    if role is not None:  # the config serves an encoder and a decoder: only this side's counts
        attrs = [a for a in attrs if (a in DECODER_ATTRS) == (role == "decoder")]
    for a in attrs:
        setattr(cfg, a, n - len(drop))
    if not attrs:
        return
    for name in PER_LAYER_LISTS:
        values = getattr(cfg, name, None)
        if isinstance(values, (list, tuple)) and len(values) == n:
            kept = [v for i, v in enumerate(values) if i not in drop]
            try:
                setattr(cfg, name, type(values)(kept))
            except AttributeError:  # a read-only property derived from other fields
                log.debug("depth: config.%s is read-only; left to the config", name)
