"""A pruned Hugging Face model stays a Hugging Face model: its config describes it.

After :func:`shrink.apply`, :func:`settle_config` gives the pruned model a config of its own
(the caller's is never touched) with the sizes the model now has: hidden size, attention and
key/value heads, head dim and MLP width. It accepts the new config only when a model built from
it (on the meta device, so nothing is allocated) has exactly the pruned model's parameter
names and shapes; ``save_pretrained`` then ``from_pretrained`` rebuilds the same model.

When layers differ (a global ranking gave them different widths) or a size has no config field
(BERT derives the head width as ``hidden_size / num_attention_heads``), no config can describe
the model: the config keeps the original sizes, :func:`settle_config` returns the reason, and
``shrink.save`` / ``shrink.load`` (plan + safetensors) round-trip it instead.

Nothing here imports transformers: models are recognised by a ``config`` with ``to_dict``.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from shrink.plan import Side
from shrink.rules import rule_for
from shrink.rules.hf import layout_of, sizes

log = logging.getLogger(__name__)

NOTE_ATTR = "_shrink_config_note"

HIDDEN = ("hidden_size", "d_model", "n_embd", "dim", "embed_dim")
HEADS = ("num_attention_heads", "n_head", "num_heads", "n_heads", "encoder_attention_heads",
         "decoder_attention_heads")
KV_HEADS = ("num_key_value_heads",)
HEAD_DIM = ("head_dim", "d_kv")
MLP = ("intermediate_size", "n_inner", "d_ff", "hidden_dim", "ffn_dim", "encoder_ffn_dim",
       "decoder_ffn_dim")


def is_hf(model: nn.Module) -> bool:
    cfg = getattr(model, "config", None)
    return cfg is not None and hasattr(cfg, "to_dict") and hasattr(type(model), "config_class")


def settle_config(original: nn.Module, pruned: nn.Module) -> str | None:
    """Give ``pruned`` a config that describes it; return why not when none can.

    Every module of ``pruned`` that held one of ``original``'s config objects gets the pruned
    model's own copy of it.
    """
    if not is_hf(original):
        return None
    _share_configs(original, pruned)
    cfg = pruned.config
    values, why = _measure(original, pruned)
    if why is None:
        trial = copy.deepcopy(cfg)
        for field, value in values.items():
            setattr(trial, field, value)
        why = _describes(pruned, trial)
        if why is None:
            for field, value in values.items():
                setattr(cfg, field, value)
            for mod in pruned.modules():  # layers that needed a config of their own (Phi-3)
                own = getattr(mod, "config", None)
                if own is not None and own is not cfg and hasattr(own, "to_dict") and \
                        type(own) is type(cfg) and layout_of(mod) is not None:
                    mod.config = cfg
            return None
    note = (f"the config of {type(pruned).__name__} cannot describe the pruned model ({why}); "
            "it keeps the original sizes: save with shrink.save(model, path) and load with "
            "shrink.load(path, original_architecture) instead of save_pretrained")
    pruned.__dict__[NOTE_ATTR] = note
    return note


def _share_configs(original: nn.Module, pruned: nn.Module) -> None:
    """Layers rebuilt by a rule still point at the original's config objects: point them at
    the pruned model's copies (matched through the modules that were deep copied)."""
    mine = dict(pruned.named_modules())
    mapping: dict[int, Any] = {}
    for fqn, mod in original.named_modules():
        old = getattr(mod, "config", None)
        new = getattr(mine.get(fqn), "config", None)
        if old is not None and new is not None and new is not old:
            mapping.setdefault(id(old), new)
    for mod in pruned.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and id(cfg) in mapping:
            mod.config = mapping[id(cfg)]


def _uniform(values: Iterable[int]) -> int | str | None:
    vals = sorted(set(values))
    if not vals:
        return None
    return vals[0] if len(vals) == 1 else f"{vals}"


def _measure(original: nn.Module, pruned: nn.Module) -> tuple[dict[str, int], str | None]:
    """Config fields and their new values; or why layers differ."""
    cfg = original.config
    out: dict[str, int] = {}
    fields = {f for f in (*HIDDEN, *HEADS, *KV_HEADS, *HEAD_DIM, *MLP)
              if isinstance(getattr(cfg, f, None), int) or f in ("head_dim", "n_inner")}
    # hidden size: the input embedding's width
    old_emb, new_emb = _embedding_width(original), _embedding_width(pruned)
    old_hidden = next((getattr(cfg, f) for f in HIDDEN if isinstance(getattr(cfg, f, None), int)),
                      None)
    if new_emb is not None and old_emb == old_hidden and new_emb != old_emb:
        for f in HIDDEN:
            if f in fields and getattr(cfg, f) == old_hidden:
                out[f] = new_emb
    # attention: every layer of a family the rules know
    mods = dict(pruned.named_modules())
    for f in (*HEADS, *KV_HEADS, *HEAD_DIM):
        if f not in fields:
            continue
        scope = f.split("_")[0] + "." if f.startswith(("encoder_", "decoder_")) else ""
        found = []
        for fqn, mod in mods.items():
            lay = layout_of(mod)
            if lay is None or (scope and scope not in fqn + "."):
                continue
            s = sizes(mod, lay)
            found.append(s.kv_heads if f in KV_HEADS else s.head_dim if f in HEAD_DIM
                         else s.heads)
        u = _uniform(found)
        if isinstance(u, str):
            return {}, f"attention layers differ in {f}: {u}"
        if u is not None and (getattr(cfg, f, None) != u or f in HEAD_DIM):
            out[f] = u
    # MLP width: layers that read the hidden size and wrote the old width
    for f in MLP:
        old = getattr(cfg, f, None)
        if f == "n_inner" and old is None and old_hidden is not None:
            old = 4 * old_hidden
        if not isinstance(old, int) or old_hidden is None:
            continue
        scope = f.split("_")[0] + "." if f.startswith(("encoder_", "decoder_")) else ""
        found = []
        for fqn, mod in original.named_modules():
            if scope and scope not in fqn + ".":
                continue
            dims = _linear_dims(mod)
            new = _linear_dims(mods[fqn]) if fqn in mods else None
            if new is not None and dims == (old_hidden, old):
                found.append(new[1])
            elif new is not None and dims == (old_hidden, 2 * old):  # fused gate and up (Phi-3)
                found.append(new[1] // 2)
        u = _uniform(found)
        if isinstance(u, str):
            return {}, f"MLP layers differ in width ({f}): {u}"
        if u is not None and u != old:
            out[f] = u
    return out, _scaled_embeddings(pruned, out)


def _embedding_width(model: nn.Module) -> int | None:
    """The output width of the input embedding (a vision model's patch embedding: of its
    first layer with an output axis), read through the layers' rules."""
    get = getattr(model, "get_input_embeddings", None)
    try:
        emb = get() if callable(get) else None
    except (NotImplementedError, AttributeError):
        return None
    if not isinstance(emb, nn.Module):
        return None
    for c in emb.modules():
        rule = rule_for(c)
        out = None if rule is None else rule.extent(c, Side.OUT)
        if out is not None:
            return out
    return None


def _linear_dims(m: nn.Module) -> tuple[int, int] | None:
    """(input, output) channels of a layer whose rule has both axes (Linear, Conv1D, conv;
    not attention), else None."""
    rule = rule_for(m)
    if rule is None or layout_of(m) is not None:
        return None
    i, o = rule.extent(m, Side.IN), rule.extent(m, Side.OUT)
    return None if i is None or o is None else (i, o)


def _scaled_embeddings(model: nn.Module, values: dict[str, int]) -> str | None:
    """Gemma scales its embeddings by ``sqrt(hidden_size)``, recomputed from the config when a
    model is built: a smaller hidden size would change it."""
    hidden = next((values[f] for f in HIDDEN if f in values), None)
    if hidden is None:
        return None
    for fqn, mod in model.named_modules():
        scale = getattr(mod, "scalar_embed_scale", None)
        if isinstance(scale, float) and abs(scale - hidden ** 0.5) > 1e-6 * scale:
            return (f"{fqn} scales embeddings by {scale:g}, which a config with hidden size "
                    f"{hidden} would make {hidden ** 0.5:g}")
    return None


def first_line(text: str) -> str:
    return next((ln.strip() for ln in text.splitlines() if ln.strip()), "")


def _describes(model: nn.Module, cfg: Any) -> str | None:
    """None when ``cfg`` passes its class's own checks (transformers validates a config when
    it is made and saved, e.g. Llama's hidden size a multiple of its heads) and a model built
    from it has ``model``'s parameter names and shapes."""
    validate = getattr(cfg, "validate", None)
    try:
        if callable(validate):
            validate()
    except Exception as e:
        cause = e.__cause__ or e
        return f"{type(cfg).__name__} refuses the new sizes: {first_line(str(cause))}"
    try:
        with torch.device("meta"):
            fresh = type(model)(cfg)
    except Exception as e:  # the config refuses the new sizes (e.g. hidden % heads != 0)
        return (f"{type(cfg).__name__} refuses the new sizes: {type(e).__name__}: "
                f"{first_line(str(e))}")
    want = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in fresh.state_dict().items()}
    diff = [k for k in want if got.get(k) != want[k]] + [k for k in got if k not in want]
    if diff:
        k = diff[0]
        return (f"a model built from it differs in {len(diff)} tensor(s), e.g. {k}: "
                f"{got.get(k)} instead of {want.get(k)}")
    return None
