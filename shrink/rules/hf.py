"""Hugging Face transformers: attention heads, GQA groups and RMSNorms, matched by class name.

``import shrink`` never imports transformers: every class here is matched by its qualified name
and read through plain attributes, so one table entry (:data:`ATTENTION`) describes a family.

Attention. Transformers v5 attention layers compute ``q = q_proj(x).view(..., -1, head_dim)``,
so the head counts follow the projections' widths and a smaller layer stays the same class:
shrink slices the projections and sets the few count attributes forward reads
(``num_key_value_groups``, GPT-2's ``split_size``, T5's ``n_heads``/``inner_dim``, ...).

* The HEADS axis has one position per *query* head. Which query heads go together depends on
  the layer's grouped-query layout (``n_rep = num_heads // num_key_value_heads`` query heads
  share one key/value head) and on the analysis option ``gqa``:

  - ``"groups"`` (default): a group channel is one KV group, its key/value head and its
    ``n_rep`` query heads. Every kept group keeps all its query heads, so ``n_rep`` stays and
    the KV cache shrinks with the model;
  - ``"query"``: a group channel is query head ``r`` of *every* KV group, so every group loses
    the same query heads (``n_rep`` shrinks evenly) and the key/value heads all stay.

  With plain multi-head attention (``n_rep == 1``) both are one head per channel. Both keep the
  layer consistent; the config can describe the model when every layer keeps the same counts
  (:mod:`shrink.interop.hf`).
* Dropping query head ``h`` is exact: the masked oracle zeroes its columns of the output
  projection (or, for layers whose output projection is another module, as BERT's, the
  consumer's input columns, which carry the heads' ids).
* Self-attention: the embed dim follows the residual stream (IN: columns of q, k and v; OUT:
  rows of the output projection). Cross-attention (``key_value_states`` /
  ``encoder_hidden_states``) keeps its embed dims, and says so.
* Per-head tensors beside the projections (T5's relative attention bias) are sliced with the
  heads. T5 passes one layer's position bias (heads on dim 1) to the next layers, which ties the
  heads of those layers together.

Scoring: the HEADS axis scores every slice a query head owns (q rows, o columns) and its key and
value rows (counted once per query head of the group: within a layer every channel counts them
equally often, so local rankings are unaffected).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from shrink.errors import RewriteError
from shrink.ids import Call, Ids, Tracker, channel_ids, ids_on_axis, iter_ids
from shrink.plan import Side
from shrink.rules.attention_base import head_rows
from shrink.rules.base import InnerLayer, Keep, ModuleRule, finish, index, sliced_copy
from shrink.rules.layers import EmbeddingRule
from shrink.rules.norm import LayerNormRule, inexact_member
from shrink.rules.registry import register_rule_by_name

TF = "transformers.models"


@dataclass(frozen=True, slots=True)
class Layout:
    """Where one attention family keeps its projections and counts.

    Attributes:
        q, k, v: child Linear (or transposed ``Conv1D``) names; ignored when ``qkv`` is set.
        o: the output projection, or None when it is another module (BERT's ``output.dense``).
        qkv: one fused projection whose rows are q, then k, then v (Phi-3, GPT-2).
        transposed: weights stored ``[in, out]`` (GPT-2's ``Conv1D``).
        head_dim: attribute names that hold the head width (the first one present is used).
        counts: ``(attribute, quantity)`` pairs that forward reads, set on the smaller layer;
            quantities: ``heads``, ``kv_heads``, ``groups`` (query heads per KV head), ``width``
            (heads x head_dim), ``kv_width``.
        config_counts: forward reads head counts from ``self.config`` (Phi-3): a layer whose
            counts differ from the model's config gets a config of its own.
        per_head: ``(parameter path, dim)`` of tensors with one slice per query head.
    """

    q: str = "q_proj"
    k: str = "k_proj"
    v: str = "v_proj"
    o: str | None = "o_proj"
    qkv: str | None = None
    transposed: bool = False
    head_dim: tuple[str, ...] = ("head_dim",)
    counts: tuple[tuple[str, str], ...] = ()
    config_counts: bool = False
    per_head: tuple[tuple[str, int], ...] = ()


_LLAMA = Layout(counts=(("num_key_value_groups", "groups"), ("num_heads", "heads"),
                        ("num_key_value_heads", "kv_heads")))
_BERT = Layout(q="query", k="key", v="value", o=None, head_dim=("attention_head_size",),
               counts=(("num_attention_heads", "heads"), ("all_head_size", "width")))

#: attention classes by qualified name, and their layout
ATTENTION: dict[str, Layout] = {
    **{f"{TF}.{m}.modeling_{m}.{c}Attention": _LLAMA for m, c in (
        ("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"),
        ("gemma", "Gemma"), ("gemma2", "Gemma2"), ("olmo", "Olmo"), ("olmo2", "Olmo2"),
        ("granite", "Granite"), ("smollm3", "SmolLM3"), ("qwen2_moe", "Qwen2Moe"),
        ("mixtral", "Mixtral"), ("cohere", "Cohere"), ("glm", "Glm"), ("helium", "Helium"),
    )},
    f"{TF}.phi3.modeling_phi3.Phi3Attention": Layout(
        qkv="qkv_proj", config_counts=True,
        counts=(("num_key_value_groups", "groups"), ("num_key_value_heads", "kv_heads"))),
    **{f"{TF}.{m}.modeling_{m}.{c}Attention": Layout(counts=(("num_attention_heads", "heads"),))
       for m, c in (("vit", "ViT"), ("deit", "DeiT"), ("vit_mae", "ViTMAE"),
                    ("dinov2", "Dinov2"))},
    **{f"{TF}.{m}.modeling_{m}.{c}SelfAttention": _BERT for m, c in (
        ("bert", "Bert"), ("roberta", "Roberta"), ("vit", "ViT"), ("deit", "DeiT"),
        ("electra", "Electra"), ("camembert", "Camembert"), ("xlm_roberta", "XLMRoberta"),
        ("data2vec", "Data2VecText"), ("dinov2", "Dinov2"), ("vit_mae", "ViTMAE"),
    )},
    f"{TF}.distilbert.modeling_distilbert.DistilBertSelfAttention": Layout(
        q="q_lin", k="k_lin", v="v_lin", o="out_lin", head_dim=("attention_head_size",),
        counts=(("n_heads", "heads"), ("dim", "width"))),
    f"{TF}.gpt2.modeling_gpt2.GPT2Attention": Layout(
        qkv="c_attn", o="c_proj", transposed=True,
        counts=(("num_heads", "heads"), ("split_size", "width"), ("embed_dim", "width"))),
    **{f"{TF}.{m}.modeling_{m}.{c}Attention": Layout(
        o="out_proj", counts=(("num_heads", "heads"), ("embed_dim", "width")))
       for m, c in (("bart", "Bart"), ("mbart", "MBart"), ("marian", "Marian"),
                    ("pegasus", "Pegasus"), ("whisper", "Whisper"))},
    f"{TF}.swin.modeling_swin.SwinAttention": Layout(
        counts=(("num_attention_heads", "heads"),),
        per_head=(("relative_position_bias.relative_position_bias_table", 1),)),
    f"{TF}.t5.modeling_t5.T5Attention": Layout(
        q="q", k="k", v="v", o="o", head_dim=("key_value_proj_dim",),
        counts=(("n_heads", "heads"), ("inner_dim", "width")),
        per_head=(("relative_attention_bias.weight", 1),)),
}

#: RMSNorm classes (``weight * x / rms(x)``; Gemma's ``(1 + weight)``): inexact over channels
RMS_NORMS = (*(
    f"{TF}.{m}.modeling_{m}.{c}RMSNorm" for m, c in (
        ("llama", "Llama"), ("mistral", "Mistral"), ("qwen2", "Qwen2"), ("qwen3", "Qwen3"),
        ("gemma", "Gemma"), ("gemma2", "Gemma2"), ("phi3", "Phi3"), ("olmo2", "Olmo2"),
        ("granite", "Granite"), ("smollm3", "SmolLM3"), ("qwen2_moe", "Qwen2Moe"),
        ("mixtral", "Mixtral"), ("glm", "Glm"), ("helium", "Helium"),
    )
), f"{TF}.t5.modeling_t5.T5LayerNorm")


def layout_of(m: nn.Module) -> Layout | None:
    """The layout of an attention layer of a family in :data:`ATTENTION`, else None."""
    for klass in type(m).__mro__:
        lay = ATTENTION.get(f"{klass.__module__}.{klass.__qualname__}")
        if lay is not None:
            return lay
    return None


# ----------------------------------------------------------------------------- projections


def _w(lin: nn.Module) -> torch.Tensor:
    return lin.weight  # type: ignore[return-value]


def _rows(t: torch.Tensor, transposed: bool) -> int:
    """The output width of a projection weight."""
    return int(t.shape[1] if transposed else t.shape[0])


@dataclass(frozen=True, slots=True)
class Sizes:
    """One attention layer's head layout."""

    heads: int
    kv_heads: int
    head_dim: int
    hidden_in: int
    hidden_out: int | None

    @property
    def rep(self) -> int:
        return self.heads // self.kv_heads


def sizes(m: nn.Module, lay: Layout) -> Sizes:
    hd = next(int(getattr(m, a)) for a in lay.head_dim if getattr(m, a, None) is not None)
    t = lay.transposed
    if lay.qkv is not None:
        w = _w(getattr(m, lay.qkv))
        total = _rows(w, t) // hd
        kv = int(getattr(m, "num_key_value_heads", 0) or 0) or total // 3
        q, hidden_in = total - 2 * kv, int(w.shape[0] if t else w.shape[1])
    else:
        wq, wk = _w(getattr(m, lay.q)), _w(getattr(m, lay.k))
        q, kv = _rows(wq, t) // hd, _rows(wk, t) // hd
        hidden_in = int(wq.shape[0] if t else wq.shape[1])
    out = None if lay.o is None else _rows(_w(getattr(m, lay.o)), t)
    return Sizes(q, kv, hd, hidden_in, out)


def _blocks(m: nn.Module, lay: Layout, s: Sizes) -> list[tuple[str, str, torch.Tensor, int, int]]:
    """``(child, role, tensor, offset, out_dim)`` of every head-major slice of q, k and v:
    role ``q``/``k``/``v`` rows start at ``offset`` along ``out_dim``."""
    out = []
    qw, kw = s.heads * s.head_dim, s.kv_heads * s.head_dim
    for name, role, off in ((lay.qkv, "q", 0), (lay.qkv, "k", qw), (lay.qkv, "v", qw + kw)) \
            if lay.qkv is not None else ((lay.q, "q", 0), (lay.k, "k", 0), (lay.v, "v", 0)):
        lin = getattr(m, name)
        out.append((name, role, _w(lin), off, 1 if lay.transposed else 0))
        if getattr(lin, "bias", None) is not None:
            out.append((name, role, lin.bias, off, 0))
    return out


def _head_view(t: torch.Tensor, dim: int, off: int, n: int, width: int,
               rep: int) -> tuple[torch.Tensor, int]:
    """Slices ``[off, off + n * width)`` of ``t`` along ``dim`` with one slice per query head
    (a key/value head is repeated for the ``rep`` query heads that read it)."""
    part = t.narrow(dim, off, n * width)
    v = part.reshape(*t.shape[:dim], n, width, *t.shape[dim + 1:])
    if rep > 1:
        v = v.repeat_interleave(rep, dim=dim)
    return v, dim


# ----------------------------------------------------------------------------- the rule


class HFAttentionRule(ModuleRule):
    """Heads (query heads, grouped by KV group or by position) and embed dims of a Hugging Face
    attention layer described by a :class:`Layout`."""

    def _lay(self, m: nn.Module) -> Layout:
        lay = layout_of(m)
        assert lay is not None, type(m)  # registered only for classes in ATTENTION
        return lay

    # ---- analysis
    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        lay = self._lay(m)
        s = sizes(m, lay)
        x = call.arg(0, "hidden_states")
        kv_in = next((call.kwargs[k] for k in ("key_value_states", "encoder_hidden_states")
                      if isinstance(call.kwargs.get(k), Ids)), None)
        bias_in = call.kwargs.get("position_bias")
        label = f"{fqn} ({type(m).__name__})"
        for ids in iter_ids((call.args, call.kwargs)):
            if ids is not x and ids is not kv_in and ids is not bias_in:
                t.pin(ids.a, f"{label} does not prune its mask or position inputs")
        # heads: query-head positions; which ones share a group channel is the gqa option
        rep = s.rep
        if getattr(t, "gqa", "groups") == "query" and rep > 1:
            heads = np.tile(t.fresh(rep, f"{fqn}:heads"), s.kv_heads)
        else:
            heads = np.repeat(t.fresh(s.kv_heads, f"{fqn}:heads"), rep)
        t.member(fqn, Side.HEADS, heads)
        if isinstance(bias_in, Ids):  # T5: a position bias made by an earlier layer
            t.union(channel_ids(t, bias_in, 1), heads)
        cross = kv_in is not None
        why = f"{label} is cross-attention: its embed dims stay"
        if isinstance(x, Ids):
            if cross:
                t.pin(channel_ids(t, x, -1), why)
            else:
                t.member(fqn, Side.IN, channel_ids(t, x, -1))
        if isinstance(kv_in, Ids):
            t.pin(channel_ids(t, kv_in, -1), why)
        outs = call.out if isinstance(call.out, tuple) else (call.out,)
        first = outs[0]
        shape = tuple(first.shape)
        if lay.o is None:  # the output is the heads, head_dim wide each
            out_ids = ids_on_axis(np.repeat(heads, s.head_dim), shape, -1)
        else:
            out_1d = t.fresh(shape[-1], f"{fqn}:out")
            out_ids = ids_on_axis(out_1d, shape, -1)
            if cross:
                t.pin(out_1d, why)
            else:
                t.member(fqn, Side.OUT, out_1d)
        rest: list[Any] = []
        for r in outs[1:]:
            if isinstance(r, torch.Tensor) and lay.per_head and r.dim() == 4 \
                    and r.shape[1] == s.heads:  # T5's position bias
                rest.append(ids_on_axis(heads, tuple(r.shape), 1))
            elif isinstance(r, torch.Tensor):
                rest.append(t.fresh_pinned(tuple(r.shape), f"{fqn}:weights",
                                           "attention weights"))
            else:
                rest.append(None)
        return (out_ids, *rest) if isinstance(call.out, tuple) else out_ids

    def extent(self, m: nn.Module, side: Side) -> int | None:
        s = sizes(m, self._lay(m))
        return {Side.HEADS: s.heads, Side.IN: s.hidden_in, Side.OUT: s.hidden_out}.get(side)

    def recorded_sides(self, m: nn.Module) -> tuple[Side, ...]:
        return (Side.HEADS,)

    def inner_layers(self, m: nn.Module) -> Sequence[InnerLayer]:
        """q, k and v (or the fused qkv) read the embed dim and write heads; o reads heads and
        writes the output dim. Key/value rows follow whole KV groups only."""
        lay = self._lay(m)
        s = sizes(m, lay)
        kv = s.kv_heads if s.rep > 1 else None
        inputs = ((lay.qkv, kv),) if lay.qkv is not None else (
            (lay.q, None), (lay.k, kv), (lay.v, kv))
        out = [InnerLayer(path, Side.IN, Side.HEADS, units) for path, units in inputs]
        if lay.o is not None:
            out.append(InnerLayer(lay.o, Side.HEADS, Side.OUT))
        return out

    def in_axis(self, m: nn.Module, ndim: int) -> int:
        return ndim - 1

    def score_params(self, m: nn.Module, side: Side) -> Sequence[tuple[torch.Tensor, int]]:
        lay = self._lay(m)
        s = sizes(m, lay)
        tr = lay.transposed
        o = None if lay.o is None else getattr(m, lay.o)
        if side is Side.IN:
            return tuple((w, 0 if tr else 1) for _, _, w, _, d in _blocks(m, lay, s)
                         if w.dim() == 2)
        if side is Side.OUT:
            if o is None:
                return ()
            ps = [(_w(o), 1 if tr else 0)]
            if getattr(o, "bias", None) is not None:
                ps.append((o.bias, 0))
            return tuple(ps)
        if side is not Side.HEADS:
            return ()
        out: list[tuple[torch.Tensor, int]] = []
        for _, role, w, off, d in _blocks(m, lay, s):
            n, rep = (s.heads, 1) if role == "q" else (s.kv_heads, s.rep)
            out.append(_head_view(w, d, off, n, s.head_dim, rep))
        if o is not None:
            out.append(_head_view(_w(o), 0 if tr else 1, 0, s.heads, s.head_dim, 1))
        for path, dim in lay.per_head:
            p = _param(m, path)
            if p is not None:
                out.append(_head_view(p, dim, 0, s.heads, 1, 1))
        return tuple(out)

    def mask_(self, m: nn.Module, side: Side, dropped: Sequence[int]) -> None:
        """IN: zero the dropped channels of ``hidden_states``. HEADS: zero the dropped query
        heads' columns of the output projection (without one, the consumer masks them)."""
        lay = self._lay(m)
        if side is Side.IN:
            idx = torch.as_tensor(list(dropped), dtype=torch.long)

            def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
                if args:
                    x = args[0]
                    return (x.index_fill(-1, idx.to(x.device), 0), *args[1:]), kwargs
                x = kwargs["hidden_states"]
                return args, {**kwargs, "hidden_states": x.index_fill(-1, idx.to(x.device), 0)}

            m.register_forward_pre_hook(hook, with_kwargs=True)
        elif side is Side.HEADS and lay.o is not None:
            s = sizes(m, lay)
            w = _w(getattr(m, lay.o))
            cols = head_rows(sorted(dropped), s.head_dim, s.heads * s.head_dim, 1)
            with torch.no_grad():
                w.index_fill_(0 if lay.transposed else 1, cols.to(w.device), 0)

    # ---- rewrite
    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        lay = self._lay(m)
        s = sizes(m, lay)
        kept_q = keep.resolve(Side.HEADS, s.heads)
        kept_kv = sorted({h // s.rep for h in kept_q})
        per_group = {g: sum(1 for h in kept_q if h // s.rep == g) for g in kept_kv}
        if len(set(per_group.values())) > 1:
            raise RewriteError(
                f"{type(m).__name__}: the kept query heads {kept_q} leave KV groups with "
                f"different numbers of query heads {per_group}; grouped-query attention needs "
                "the same number in every group (a plan edited by hand?)"
            )
        rep = per_group[kept_kv[0]] if kept_kv else 0
        q_rows = head_rows(kept_q, s.head_dim, s.heads * s.head_dim, 1)
        kv_rows = head_rows(kept_kv, s.head_dim, s.kv_heads * s.head_dim, 1)
        cols = None if keep.in_ is None else list(keep.in_)
        memo: dict[int, Any] = {}
        if lay.qkv is not None:
            qw, kw = s.heads * s.head_dim, s.kv_heads * s.head_dim
            rows = torch.cat([q_rows, kv_rows + qw, kv_rows + qw + kw])
            memo[id(getattr(m, lay.qkv))] = _slice(getattr(m, lay.qkv), rows, cols, lay.transposed)
        else:
            for name, rows in ((lay.q, q_rows), (lay.k, kv_rows), (lay.v, kv_rows)):
                memo[id(getattr(m, name))] = _slice(getattr(m, name), rows, cols, lay.transposed)
        if lay.o is not None:
            o = getattr(m, lay.o)
            memo[id(o)] = _slice(o, None if keep.out is None else list(keep.out), q_rows,
                                 lay.transposed)
        cfg = getattr(m, "config", None)
        if cfg is not None:
            memo[id(cfg)] = cfg  # shared with the model; shrink.interop.hf settles it
        for path, dim in lay.per_head:
            p = _param(m, path)
            if p is not None:
                owner, _, attr = path.rpartition(".")
                mod = m.get_submodule(owner)
                memo[id(mod)] = sliced_copy(mod, (attr,), dim, kept_q)
                if isinstance(mod, nn.Embedding):
                    memo[id(mod)].embedding_dim = len(kept_q)
        new = copy.deepcopy(m, memo)
        values = {"heads": len(kept_q), "kv_heads": len(kept_kv), "groups": rep,
                  "width": len(kept_q) * s.head_dim, "kv_width": len(kept_kv) * s.head_dim}
        for attr, qty in lay.counts:
            if hasattr(new, attr):
                setattr(new, attr, values[qty])
        if lay.config_counts and cfg is not None and (
                len(kept_q), len(kept_kv)) != (s.heads, s.kv_heads):
            own = copy.copy(cfg)
            own.num_attention_heads, own.num_key_value_heads = len(kept_q), len(kept_kv)
            new.config = own
        return finish(new, m)


def _param(m: nn.Module, path: str) -> torch.Tensor | None:
    owner, _, attr = path.rpartition(".")
    try:
        mod = m.get_submodule(owner)
    except AttributeError:
        return None
    return getattr(mod, attr, None)


def _slice(src: nn.Module, rows: Sequence[int] | torch.Tensor | None,
           cols: Sequence[int] | torch.Tensor | None, transposed: bool) -> nn.Module:
    """A copy of a Linear (or transposed Conv1D) with output ``rows`` and input ``cols`` kept;
    its class and other attributes stay."""
    lin: Any = src
    new: Any = copy.copy(lin)
    new._parameters = dict(lin._parameters)
    new._buffers = dict(lin._buffers)
    new._modules = dict(lin._modules)
    out_dim, in_dim = (1, 0) if transposed else (0, 1)
    w = lin.weight.detach()
    b = None if getattr(lin, "bias", None) is None else lin.bias.detach()
    if rows is not None:
        w = index(w, out_dim, [int(i) for i in rows])
        b = None if b is None else index(b, 0, [int(i) for i in rows])
    if cols is not None:
        w = index(w, in_dim, [int(i) for i in cols])
    new.weight = nn.Parameter(w.clone(), requires_grad=lin.weight.requires_grad)
    if b is not None:
        new.bias = nn.Parameter(b.clone(), requires_grad=lin.bias.requires_grad)
    if isinstance(new, nn.Linear):
        new.in_features, new.out_features = int(w.shape[1]), int(w.shape[0])
    elif transposed:
        new.nf = int(w.shape[1])
        if hasattr(new, "nx"):
            new.nx = int(w.shape[0])
    return new


register_rule_by_name(*ATTENTION)(HFAttentionRule)


@register_rule_by_name(*RMS_NORMS)
class HFRMSNormRule(LayerNormRule):
    """A Hugging Face RMSNorm over the last axis (a ``weight`` per channel): inexact like
    LayerNorm (whose oracle masking it shares); the smaller layer is a copy of the same class
    with the weight sliced."""

    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        x = call.args[0]
        cid = channel_ids(t, x, self._axis(x.ndim))
        inexact_member(t, fqn, cid, f"{fqn} ({type(m).__name__}) at {call.where} normalises "
                       "over channels")
        return x

    def extent(self, m: nn.Module, side: Side) -> int | None:
        return int(m.weight.shape[0]) if side is Side.OUT else None  # type: ignore[index]

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kout = keep.resolve(Side.OUT, int(m.weight.shape[0]))  # type: ignore[index]
        return finish(sliced_copy(m, ("weight",), 0, kout), m)



#: nn.Embedding subclasses whose forward scales the rows (by a constant) or looks up positions:
#: their output features are the embedding's columns all the same
register_rule_by_name(*(f"{TF}.{m}.modeling_{m}.{c}" for m, c in (
    ("bart", "BartScaledWordEmbedding"), ("bart", "BartLearnedPositionalEmbedding"),
    ("mbart", "MBartScaledWordEmbedding"), ("mbart", "MBartLearnedPositionalEmbedding"),
    ("gemma", "GemmaTextScaledWordEmbedding"), ("gemma2", "Gemma2TextScaledWordEmbedding"),
    ("gemma3", "Gemma3TextScaledWordEmbedding"),
)))(EmbeddingRule)


@register_rule_by_name(f"{TF}.convnext.modeling_convnext.ConvNextLayerNorm",
                       f"{TF}.convnextv2.modeling_convnextv2.ConvNextV2LayerNorm")
class HFConvNextLayerNormRule(LayerNormRule):
    """ConvNeXt's LayerNorm: channels last, or channels first (``data_format``)."""

    def _axis(self, ndim: int, m: nn.Module | None = None) -> int:
        first = getattr(m, "data_format", "channels_last") == "channels_first"
        return 1 if first else ndim - 1
