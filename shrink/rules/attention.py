"""nn.MultiheadAttention: prune whole heads.

A head ``h`` owns rows ``[h*d, (h+1)*d)`` of each of the q, k and v projections (``d`` the head
dim) and the same columns of ``out_proj``. Heads are independent until ``out_proj`` sums them, so
dropping a head is exact: the masked oracle zeroes the head's ``out_proj`` columns.

Self-attention (query, key and value the same tensor, one fused ``in_proj_weight``) also lets its
embed dim follow the residual stream: the input channels are the columns of the q, k and v
projections (IN) and the output channels the rows of ``out_proj`` (OUT). Other layouts
(cross-attention, ``kdim``/``vdim``) keep their embed dim pinned.

``nn.MultiheadAttention`` requires ``embed_dim == num_heads * head_dim``, so a model with fewer
heads needs another layer: :class:`PrunedMultiheadAttention` has the same call signature and
outputs, any number of heads, and computes with ``scaled_dot_product_attention``.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from shrink.ids import Call, Ids, Tracker, channel_ids, ids_on_axis
from shrink.plan import Side
from shrink.rules.base import Keep, ModuleRule, finish
from shrink.rules.registry import register_rule


class PrunedMultiheadAttention(nn.Module):
    """Multi-head attention whose inner width (heads x head_dim) differs from ``embed_dim``.

    Drop-in for ``nn.MultiheadAttention`` after head pruning: same forward signature, same
    ``batch_first`` convention, returns ``(output, weights-or-None)``. ``kept_heads`` records
    which heads of the original layer remain, so 3-D attention masks made for the original head
    count still apply.
    """

    def __init__(self, src: nn.MultiheadAttention, kept_heads: Sequence[int],
                 kept_in: Sequence[int] | None = None,
                 kept_out: Sequence[int] | None = None) -> None:
        super().__init__()
        e, h = src.embed_dim, src.num_heads
        d = e // h
        cols = torch.as_tensor(list(range(e)) if kept_in is None else list(kept_in))
        outs = torch.as_tensor(list(range(e)) if kept_out is None else list(kept_out))
        self.embed_dim, self.num_heads, self.head_dim = len(outs), len(kept_heads), d
        self.batch_first = src.batch_first
        self.dropout = src.dropout
        self.orig_num_heads = h
        self.register_buffer("kept_heads", torch.as_tensor(list(kept_heads)), persistent=False)
        rows = torch.cat([torch.arange(k * d, (k + 1) * d) for k in kept_heads])
        inner = len(kept_heads) * d
        w = src.in_proj_weight if src._qkv_same_embed_dim else None
        qw = w[:e] if w is not None else src.q_proj_weight
        kw = w[e : 2 * e] if w is not None else src.k_proj_weight
        vw = w[2 * e :] if w is not None else src.v_proj_weight
        b = src.in_proj_bias
        if kept_in is not None:  # self-attention: q, k and v read the same (pruned) input
            qw, kw, vw = qw[:, cols], kw[:, cols], vw[:, cols]
        kw_ = {"bias": b is not None, "device": qw.device, "dtype": qw.dtype}
        self.q_proj = nn.Linear(qw.shape[1], inner, **kw_)  # type: ignore[arg-type]
        self.k_proj = nn.Linear(kw.shape[1], inner, **kw_)  # type: ignore[arg-type]
        self.v_proj = nn.Linear(vw.shape[1], inner, **kw_)  # type: ignore[arg-type]
        self.out_proj = nn.Linear(inner, len(outs), bias=src.out_proj.bias is not None,
                                  device=qw.device, dtype=qw.dtype)
        with torch.no_grad():
            parts = ((self.q_proj, qw, 0), (self.k_proj, kw, 1), (self.v_proj, vw, 2))
            for proj, weight, k in parts:
                proj.weight.copy_(weight[rows])
                if b is not None:
                    proj.bias.copy_(b[k * e : (k + 1) * e][rows])
            self.out_proj.weight.copy_(src.out_proj.weight[outs][:, rows])
            if src.out_proj.bias is not None:
                self.out_proj.bias.copy_(src.out_proj.bias[outs])
        self.train(src.training)

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        unbatched = query.dim() == 2
        if unbatched:
            axis = 0 if self.batch_first else 1
            query, key, value = (t.unsqueeze(axis) for t in (query, key, value))
        if not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        n, lq, _ = query.shape
        ls = key.shape[1]
        q = self.q_proj(query).view(n, lq, self.num_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(key).view(n, ls, self.num_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(value).view(n, ls, self.num_heads, self.head_dim).transpose(1, 2)
        mask = self._mask(attn_mask, key_padding_mask, n, lq, ls, q.dtype)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = q @ k.transpose(-2, -1) / self.head_dim**0.5
            if is_causal and mask is None:
                causal = torch.ones(lq, ls, dtype=torch.bool, device=q.device).tril()
                scores = scores.masked_fill(~causal, float("-inf"))
            if mask is not None:
                scores = scores + mask
            weights = torch.softmax(scores, dim=-1)
            out = F.dropout(weights, p, self.training) @ v
        else:
            weights = None
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=mask, dropout_p=p, is_causal=is_causal and mask is None
            )
        out = self.out_proj(out.transpose(1, 2).reshape(n, lq, self.num_heads * self.head_dim))
        if not self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(0 if self.batch_first else 1)
        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        return out, weights

    def _mask(self, attn_mask: torch.Tensor | None, kpm: torch.Tensor | None, n: int, lq: int,
              ls: int, dtype: torch.dtype) -> torch.Tensor | None:
        mask = None
        if attn_mask is not None:
            m = attn_mask
            if m.dtype == torch.bool:
                m = torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            if m.dim() == 3:  # (N * orig_heads, L, S)
                m = m.view(n, self.orig_num_heads, lq, ls)[:, self.kept_heads]
            mask = m.to(dtype)
        if kpm is not None:
            k = kpm
            if k.dtype == torch.bool:
                k = torch.zeros(k.shape, dtype=dtype, device=k.device).masked_fill(k, float("-inf"))
            k = k.to(dtype).view(n, 1, 1, ls)
            mask = k if mask is None else mask + k
        return mask


@register_rule(nn.MultiheadAttention)
class MultiheadAttentionRule(ModuleRule):
    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        names = ("query", "key", "value")
        qkv = [call.arg(i, n) for i, n in enumerate(names)]
        nodes = [call.node.args[i] if i < len(call.node.args) else call.node.kwargs.get(n)
                 for i, n in enumerate(names)]
        self_attn = (m._qkv_same_embed_dim and nodes[0] is nodes[1] is nodes[2]
                     and isinstance(qkv[0], Ids) and m.bias_k is None and not m.add_zero_attn)
        why = f"{fqn} (MultiheadAttention) keeps its embed dim; its heads are pruned instead"
        if self_attn:
            t.member(fqn, Side.IN, channel_ids(t, qkv[0], -1))
        else:
            for x in qkv:
                if isinstance(x, Ids):
                    t.pin(channel_ids(t, x, -1), why)
        heads = t.fresh(m.num_heads, f"{fqn}:heads")  # type: ignore[arg-type]
        t.member(fqn, Side.HEADS, heads)
        blocker = self._blocker(m, call)
        if blocker:
            t.pin(heads, f"heads of {fqn} stay: {blocker}")
        out, weights = call.out
        out_1d = t.fresh(m.embed_dim, f"{fqn}:out")  # type: ignore[arg-type]
        out_ids = ids_on_axis(out_1d, tuple(out.shape), -1)
        if self_attn:
            t.member(fqn, Side.OUT, out_1d)
        else:
            t.pin(out_ids.a, why)
        w_ids = None
        if isinstance(weights, torch.Tensor):
            w_ids = t.fresh_pinned(tuple(weights.shape), f"{fqn}:weights", "attention weights")
        return (out_ids, w_ids)

    @staticmethod
    def _blocker(m: Any, call: Call) -> str | None:
        if m.bias_k is not None or m.add_zero_attn:
            return "add_bias_kv/add_zero_attn are not supported"
        need = call.arg(4, "need_weights", True)
        if need and call.out[1] is not None:
            uses = [u for u in call.node.users
                    if not (u.target is operator.getitem and u.args[1] == 0)]
            if uses:
                return "the attention weights (averaged over heads) are used"
        return None

    def extent(self, m: nn.Module, side: Side) -> int | None:
        return int(m.num_heads if side is Side.HEADS else m.embed_dim)  # type: ignore[call-overload]

    def in_axis(self, m: nn.Module, ndim: int) -> int:
        return ndim - 1

    def score_params(self, m: nn.Module, side: Side) -> Sequence[tuple[torch.Tensor, int]]:
        if side is Side.IN:
            return ((m.in_proj_weight, 1),)  # type: ignore[return-value]
        if side is Side.OUT:
            return ((m.out_proj.weight, 0),)  # type: ignore[union-attr, return-value]
        e, h = m.embed_dim, m.num_heads
        d = e // h  # type: ignore[operator]
        out = m.out_proj.weight.reshape(e, h, d).transpose(0, 1)  # type: ignore[union-attr]
        if m._qkv_same_embed_dim:
            inp = m.in_proj_weight.reshape(3, h, d, -1).transpose(0, 1)  # type: ignore[union-attr]
            return ((inp, 0), (out, 0))
        return ((m.q_proj_weight.reshape(h, d, -1), 0), (out, 0))  # type: ignore[union-attr]

    def mask_(self, m: nn.Module, side: Side, dropped: Sequence[int]) -> None:
        if side is Side.IN:  # query, key and value are the same input: zero it in all three
            idx = torch.as_tensor(list(dropped), dtype=torch.long)

            def hook(mod: nn.Module, args: tuple[Any, ...]) -> Any:
                x = args[0].index_fill(-1, idx.to(args[0].device), 0)
                return (x, x, x, *args[3:])

            m.register_forward_pre_hook(hook)
            return
        if side is not Side.HEADS:
            return
        d = m.embed_dim // m.num_heads  # type: ignore[operator]
        with torch.no_grad():
            for h in dropped:
                m.out_proj.weight[:, h * d : (h + 1) * d] = 0  # type: ignore[index]

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kept = keep.resolve(Side.HEADS, m.num_heads)  # type: ignore[arg-type]
        return finish(PrunedMultiheadAttention(m, kept, keep.in_, keep.out), m)  # type: ignore[arg-type]


@register_rule(PrunedMultiheadAttention)
class PrunedAttentionRule(ModuleRule):
    """An already pruned attention layer is opaque: its embed dim and heads stay."""

    def extent(self, m: nn.Module, side: Side) -> int | None:
        """Its sizes, so a saved plan can be checked against the model it produced."""
        a: Any = m
        return {Side.HEADS: a.num_heads, Side.IN: a.q_proj.in_features,
                Side.OUT: a.out_proj.out_features}.get(side)

    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        for x in (call.arg(i, n) for i, n in enumerate(("query", "key", "value"))):
            if isinstance(x, Ids):
                t.pin(x.a, f"{fqn} (PrunedMultiheadAttention) is not pruned again")
        out, weights = call.out
        o = t.fresh_pinned(tuple(out.shape), f"{fqn}:out", "PrunedMultiheadAttention output")
        w = None if weights is None else t.fresh_pinned(tuple(weights.shape), f"{fqn}:w", "weights")
        return (o, w)
