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
outputs, any number of heads, and computes with ``scaled_dot_product_attention``. The shared
maths and propagation live in :mod:`shrink.rules.attention_base`.
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from shrink.ids import Call
from shrink.rules.attention_base import (
    AlreadyPrunedRule,
    AttentionHeadsRule,
    PerHead,
    Projections,
    PrunedHeads,
    head_rows,
    sliced_linear,
)
from shrink.rules.registry import register_rule


class PrunedMultiheadAttention(PrunedHeads):
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
        e, h = int(src.embed_dim), int(src.num_heads)
        d = e // h
        self.embed_dim = e if kept_out is None else len(kept_out)
        self.num_heads, self.head_dim = len(kept_heads), d
        self.batch_first = src.batch_first
        self.dropout = src.dropout
        self.orig_num_heads = h
        self.kept_heads: torch.Tensor
        self.register_buffer("kept_heads", torch.as_tensor(list(kept_heads)), persistent=False)
        rows = head_rows(kept_heads, d, e, 1)
        w = src.in_proj_weight if src._qkv_same_embed_dim else None
        qkv = (w[:e], w[e : 2 * e], w[2 * e :]) if w is not None else (
            src.q_proj_weight, src.k_proj_weight, src.v_proj_weight)
        b = src.in_proj_bias
        biases = (None,) * 3 if b is None else (b[:e], b[e : 2 * e], b[2 * e :])
        # self-attention: q, k and v read the same (pruned) input
        self.q_proj, self.k_proj, self.v_proj = (
            sliced_linear(wp, bp, rows, kept_in) for wp, bp in zip(qkv, biases, strict=True))
        self.out_proj = sliced_linear(src.out_proj.weight, src.out_proj.bias, kept_out, rows)
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

    def sizes(self) -> tuple[int, int, int]:
        return self.num_heads, self.q_proj.in_features, self.out_proj.out_features

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
class MultiheadAttentionRule(AttentionHeadsRule):
    """``nn.MultiheadAttention``: a fused ``in_proj_weight`` (q, k, v stacked) or separate
    ``q/k/v_proj_weight`` (``kdim``/``vdim``), and ``out_proj``."""

    label = "MultiheadAttention"
    replacement = PrunedMultiheadAttention

    def projections(self, m: nn.Module) -> Projections:
        a: Any = m
        out = a.out_proj.weight
        if a._qkv_same_embed_dim:
            inp = PerHead(a.in_proj_weight, parts=3)
        else:
            inp = PerHead(a.q_proj_weight)
        return Projections(inputs=(inp.tensor,), output=out, per_head=(inp, PerHead(out, dim=1)))

    def qkv_inputs(self, call: Call) -> tuple[Any, ...]:
        return tuple(call.arg(i, n) for i, n in enumerate(("query", "key", "value")))

    def embed_blocker(self, m: nn.Module, call: Call) -> str | None:
        a: Any = m
        nodes = [call.node_arg(i, n) for i, n in enumerate(("query", "key", "value"))]
        if not (a._qkv_same_embed_dim and nodes[0] is nodes[1] is nodes[2]):
            return "it is not self-attention (query, key and value differ); its heads are pruned"
        if a.bias_k is not None or a.add_zero_attn:
            return "add_bias_kv/add_zero_attn are not supported"
        return None

    def heads_blocker(self, m: nn.Module, call: Call) -> str | None:
        a: Any = m
        if a.bias_k is not None or a.add_zero_attn:
            return "add_bias_kv/add_zero_attn are not supported"
        need = call.arg(4, "need_weights", True)
        if need and call.out[1] is not None:
            uses = [u for u in call.node.users
                    if not (u.target is operator.getitem and u.args[1] == 0)]
            if uses:
                return "the attention weights (averaged over heads) are used"
        return None


register_rule(PrunedMultiheadAttention)(AlreadyPrunedRule)
