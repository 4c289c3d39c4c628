"""The ``config`` side of depth pruning: layer counts and per-layer lists of Hugging Face-style
configs, found and edited by duck typing (``transformers`` is never imported).

A config is any object held as ``.config`` by a module at or above a stack of blocks that has an
int layer count (:data:`COUNT_ATTRS`). After blocks are removed from a stack, each such config
is replaced, in every module that held it, by a copy whose counts that equalled the stack's old
length hold the new one and whose per-layer lists (:data:`PER_LAYER_LISTS`) keep the entries of
the kept blocks. A config above both an encoder and a decoder stack (T5's, BART's) says which
count is whose by name: ``decoder_layers``/``num_decoder_layers`` belong to the stack whose path
names a decoder, the others to the rest.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping
from typing import Any

from torch import nn

log = logging.getLogger(__name__)

COUNT_ATTRS = ("num_hidden_layers", "n_layer", "num_layers", "encoder_layers", "decoder_layers",
               "num_decoder_layers")
DECODER_ATTRS = ("decoder_layers", "num_decoder_layers")
#: one entry per block, e.g. ``layer_types = ["sliding_attention", "full_attention", ...]``
PER_LAYER_LISTS = ("layer_types", "mlp_layer_types", "layers_block_type", "no_rope_layers",
                   "num_attention_heads_per_layer")


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
            mod.config = copies[id(held)]
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
