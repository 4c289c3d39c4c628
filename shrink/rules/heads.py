"""Head pruning for attention layers that hard-code their shapes: timm's and MaxViT's.

Both layers compute ``qkv = Linear(x)``, split it into ``3 x heads x head_dim``, attend per
head, merge the heads back to ``heads * head_dim`` channels and project with a last Linear. Head
``h`` owns rows ``s * inner + [h*d, (h+1)*d)`` of the qkv projection (``s`` in q, k, v; ``inner``
the merged width), the same rows of timm's optional gate, and columns ``[h*d, (h+1)*d)`` of the
output projection (MaxViT: one column ``h`` of its relative-position bias table too). Heads are
independent until the output projection sums them, so dropping a head is exact: the masked oracle
zeroes the head's output-projection columns.

The layers' forwards rebuild shapes from the input width (``reshape(B, N, C)``), so a smaller
layer needs another class: :class:`PrunedTimmAttention` and
:class:`PrunedRelativePositionalMultiHeadAttention` have the same call signature and outputs,
with any number of heads of the original ``head_dim``. Both are self-attention, so the embed dim
follows the residual stream: IN is the columns of qkv (and the gate), OUT the rows of the output
projection. The shared maths and propagation live in :mod:`shrink.rules.attention_base`.

timm and torchvision are matched by qualified name, so ``import shrink`` imports neither.
"""

from __future__ import annotations

import copy
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
from shrink.rules.registry import register_rule, register_rule_by_name

TIMM_ATTENTION = ("timm.layers.attention.Attention", "timm.models.vision_transformer.Attention")
MAXVIT_ATTENTION = "torchvision.models.maxvit.RelativePositionalMultiHeadAttention"


@torch.fx.wrap
def kept_heads_of_mask(
    mask: torch.Tensor | None, orig_heads: int, kept: torch.Tensor
) -> torch.Tensor | None:
    """A mask made for ``orig_heads`` heads (dim -3, broadcasting as in SDPA), for the kept ones.

    Masks that broadcast over heads are returned as they are. fx records this function as one
    call (it inspects the mask's shape, which a traced mask does not have).
    """
    if mask is not None and mask.dim() >= 3 and mask.shape[-3] == orig_heads and orig_heads > 1:
        return mask.index_select(-3, kept.to(mask.device))
    return mask


@torch.fx.wrap
def add_mask(scores: torch.Tensor, mask: torch.Tensor | None, is_causal: bool) -> torch.Tensor:
    """Apply an SDPA-style mask (bool: True attends; float: added) or a causal mask to scores."""
    if is_causal:
        n, s = scores.shape[-2:]
        return scores + scores.new_full((n, s), float("-inf")).triu_(1)
    if mask is None:
        return scores
    if mask.dtype == torch.bool:
        return scores.masked_fill(~mask, float("-inf"))
    return scores + mask


class PrunedTimmAttention(PrunedHeads):
    """timm's ``Attention`` with ``len(kept_heads)`` heads of the original ``head_dim``.

    Same forward signature (``x, attn_mask=None, is_causal=False``) and output. A per-head
    ``attn_mask`` made for the original head count (dim -3 of length ``orig_num_heads``) is
    reduced to the kept heads; masks that broadcast over heads are used as they are.
    """

    def __init__(self, src: Any, kept_heads: Sequence[int], kept_in: Sequence[int] | None = None,
                 kept_out: Sequence[int] | None = None) -> None:
        super().__init__()
        h, d = int(src.num_heads), int(src.head_dim)
        width = int(getattr(src, "attn_dim", h * d))
        kept = sorted(kept_heads)
        if not isinstance(src.norm, nn.Identity) and len(kept) != h:
            raise ValueError(
                f"{type(src.norm).__name__} over all {width} attention channels mixes the heads; "
                "drop no heads of a layer with scale_norm"
            )
        self.orig_num_heads = h
        self.num_heads, self.head_dim = len(kept), d
        self.attn_dim = len(kept) * d
        self.scale = float(src.scale)
        self.fused_attn = bool(src.fused_attn)
        self.kept_heads: torch.Tensor
        kept_t = torch.as_tensor(kept, dtype=torch.long)
        self.register_buffer("kept_heads", kept_t, persistent=False)
        qkv_rows = head_rows(kept, d, width, 3)
        gate_rows = head_rows(kept, d, width, 1)
        self.qkv = sliced_linear(src.qkv.weight, src.qkv.bias, qkv_rows, kept_in)
        self.q_norm: nn.Module = copy.deepcopy(src.q_norm)  # over head_dim: shared by all heads
        self.k_norm: nn.Module = copy.deepcopy(src.k_norm)
        self.attn_drop: nn.Dropout = copy.deepcopy(src.attn_drop)
        self.norm: nn.Module = copy.deepcopy(src.norm)
        src_gate = getattr(src, "gate", None)
        self.gate = None if src_gate is None else sliced_linear(
            src_gate.weight, src_gate.bias, gate_rows, kept_in)
        self.proj = sliced_linear(src.proj.weight, src.proj.bias, kept_out, gate_rows)
        self.proj_drop: nn.Module = copy.deepcopy(src.proj_drop)
        self.train(src.training)

    def forward(
        self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False
    ) -> torch.Tensor:
        b, n, _ = x.shape
        gate = self.gate(x).sigmoid() if self.gate is not None else None
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k = self.q_norm(q), self.k_norm(k)
        attn_mask = kept_heads_of_mask(attn_mask, self.orig_num_heads, self.kept_heads)
        if self.fused_attn:
            p = self.attn_drop.p if self.training else 0.0
            x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=p,
                                               is_causal=is_causal)
        else:
            attn = add_mask((q * self.scale) @ k.transpose(-2, -1), attn_mask, is_causal)
            x = self.attn_drop(attn.softmax(dim=-1)) @ v
        x = self.norm(x.transpose(1, 2).reshape(b, n, self.attn_dim))
        if gate is not None:
            x = x * gate
        out: torch.Tensor = self.proj_drop(self.proj(x))
        return out

    def sizes(self) -> tuple[int, int, int]:
        return self.num_heads, self.qkv.in_features, self.proj.out_features


class PrunedRelativePositionalMultiHeadAttention(PrunedHeads):
    """torchvision MaxViT's relative-position attention with ``len(kept_heads)`` heads.

    Input and output are ``[B, G, P, D]`` as in the original; the attention scale stays the
    original ``feat_dim ** -0.5`` and each kept head keeps its column of the bias table.
    """

    def __init__(self, src: Any, kept_heads: Sequence[int], kept_in: Sequence[int] | None = None,
                 kept_out: Sequence[int] | None = None) -> None:
        super().__init__()
        h, d = int(src.n_heads), int(src.head_dim)
        kept = sorted(kept_heads)
        self.orig_n_heads = h
        self.n_heads, self.head_dim = len(kept), d
        self.size, self.max_seq_len = int(src.size), int(src.max_seq_len)
        self.scale_factor = float(src.scale_factor)
        rows = head_rows(kept, d, h * d, 1)
        self.to_qkv = sliced_linear(src.to_qkv.weight, src.to_qkv.bias,
                                    head_rows(kept, d, h * d, 3), kept_in)
        self.merge = sliced_linear(src.merge.weight, src.merge.bias, kept_out, rows)
        table = src.relative_position_bias_table.detach()
        idx = torch.as_tensor(kept, dtype=torch.long, device=table.device)
        self.relative_position_bias_table = nn.Parameter(table.index_select(1, idx).clone())
        self.relative_position_index: torch.Tensor
        self.register_buffer("relative_position_index", src.relative_position_index.clone())
        self.train(src.training)

    def get_relative_positional_bias(self) -> torch.Tensor:
        index = self.relative_position_index.view(-1)
        bias = self.relative_position_bias_table[index].view(self.max_seq_len, self.max_seq_len, -1)
        return bias.permute(2, 0, 1).contiguous().unsqueeze(0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, g, p, _ = x.shape
        h, dh = self.n_heads, self.head_dim
        q, k, v = torch.chunk(self.to_qkv(x), 3, dim=-1)
        q = q.reshape(b, g, p, h, dh).permute(0, 1, 3, 2, 4)
        k = k.reshape(b, g, p, h, dh).permute(0, 1, 3, 2, 4) * self.scale_factor
        v = v.reshape(b, g, p, h, dh).permute(0, 1, 3, 2, 4)
        attn = F.softmax(q @ k.transpose(-2, -1) + self.get_relative_positional_bias(), dim=-1)
        out = (attn @ v).permute(0, 1, 3, 2, 4).reshape(b, g, p, h * dh)
        return self.merge(out)

    def sizes(self) -> tuple[int, int, int]:
        return self.n_heads, self.to_qkv.in_features, self.merge.out_features


@register_rule_by_name(*TIMM_ATTENTION)
class TimmAttentionRule(AttentionHeadsRule):
    """timm's ViT ``Attention`` (vit_*, deit*, deit3, pit, twins, hybrid ViTs, ...)."""

    label = "timm Attention"
    replacement = PrunedTimmAttention

    def heads_blocker(self, m: nn.Module, call: Call) -> str | None:
        if not isinstance(m.norm, nn.Identity):
            name = type(m.norm).__name__
            return f"its {name} over all attention channels (scale_norm) mixes heads"
        return None

    def projections(self, m: nn.Module) -> Projections:
        a: Any = m
        gate = getattr(a, "gate", None)
        return _fused(a.qkv, a.proj, () if gate is None else (gate.weight,))


@register_rule_by_name(MAXVIT_ATTENTION)
class MaxVitAttentionRule(AttentionHeadsRule):
    """torchvision MaxViT's ``RelativePositionalMultiHeadAttention`` (block and grid attention)."""

    label = "MaxViT attention"
    replacement = PrunedRelativePositionalMultiHeadAttention
    heads_attr = "n_heads"

    def projections(self, m: nn.Module) -> Projections:
        a: Any = m
        p = _fused(a.to_qkv, a.merge, ())
        table = PerHead(a.relative_position_bias_table, dim=1)
        return Projections(p.inputs, p.output, (*p.per_head, table))


def _fused(qkv: nn.Linear, proj: nn.Linear, gates: tuple[torch.Tensor, ...]) -> Projections:
    """A fused ``qkv`` Linear (rows: q, k, v blocks, head-major), optional per-head gates over
    the merged width, and the output projection ``proj``."""
    per_head = [PerHead(qkv.weight, parts=3), PerHead(proj.weight, dim=1),
                *(PerHead(g) for g in gates)]
    if qkv.bias is not None:
        per_head.append(PerHead(qkv.bias, parts=3))
    return Projections((qkv.weight, *gates), proj.weight, tuple(per_head))


register_rule(PrunedTimmAttention, PrunedRelativePositionalMultiHeadAttention)(AlreadyPrunedRule)
