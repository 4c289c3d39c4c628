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
with any number of heads of the original ``head_dim``. The embed dim (the residual stream) is
not pruned through attention: its channels are pinned, as for ``nn.MultiheadAttention``.

timm and torchvision are matched by qualified name, so ``import shrink`` imports neither.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from shrink.ids import Call, Ids, Tracker, channel_ids, ids_on_axis, iter_ids
from shrink.plan import Side
from shrink.rules.base import Keep, ModuleRule, finish
from shrink.rules.registry import register_rule, register_rule_by_name

TIMM_ATTENTION = ("timm.layers.attention.Attention", "timm.models.vision_transformer.Attention")
MAXVIT_ATTENTION = "torchvision.models.maxvit.RelativePositionalMultiHeadAttention"


def head_rows(kept: Sequence[int], head_dim: int, width: int, parts: int) -> torch.Tensor:
    """Rows of a ``parts x width`` stacked projection (q, k, v) that belong to ``kept`` heads."""
    per_part = [torch.arange(h * head_dim, (h + 1) * head_dim) for h in kept]
    one = torch.cat(per_part) if per_part else torch.zeros(0, dtype=torch.long)
    return torch.cat([one + s * width for s in range(parts)])


def _idx(keep: Sequence[int] | None) -> torch.Tensor | None:
    return None if keep is None else torch.as_tensor(list(keep), dtype=torch.long)


def sliced_linear(
    src: nn.Linear, rows: torch.Tensor | None, cols: torch.Tensor | None
) -> nn.Linear:
    """A new Linear holding ``src``'s weight at ``rows`` x ``cols`` (None: all)."""
    w = src.weight if rows is None else src.weight[rows]
    w = w if cols is None else w[:, cols]
    new = nn.Linear(w.shape[1], w.shape[0], bias=src.bias is not None,
                    device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if src.bias is not None:
            new.bias.copy_(src.bias if rows is None else src.bias[rows])
    return new


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


def pin_all_inputs(t: Tracker, call: Call, why: str, skip_first: bool = False) -> None:
    for x in iter_ids((call.args[1:] if skip_first else call.args, call.kwargs)):
        t.pin(x.a, why)


def pinned_output(t: Tracker, fqn: str, call: Call, why: str) -> Ids:
    """Fresh ids, one per output channel (last axis), all pinned."""
    shape = tuple(call.out.shape)
    out = ids_on_axis(t.fresh(shape[-1], f"{fqn}:out"), shape, -1)
    t.pin(out.a, why)
    return out


class PrunedTimmAttention(nn.Module):
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
        self.qkv = sliced_linear(src.qkv, qkv_rows, _idx(kept_in))
        self.q_norm: nn.Module = copy.deepcopy(src.q_norm)  # over head_dim: shared by all heads
        self.k_norm: nn.Module = copy.deepcopy(src.k_norm)
        self.attn_drop: nn.Dropout = copy.deepcopy(src.attn_drop)
        self.norm: nn.Module = copy.deepcopy(src.norm)
        src_gate = getattr(src, "gate", None)
        self.gate = None if src_gate is None else sliced_linear(src_gate, gate_rows, _idx(kept_in))
        self.proj = sliced_linear(src.proj, _idx(kept_out), gate_rows)
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


class PrunedRelativePositionalMultiHeadAttention(nn.Module):
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
        self.to_qkv = sliced_linear(src.to_qkv, head_rows(kept, d, h * d, 3), _idx(kept_in))
        self.merge = sliced_linear(src.merge, _idx(kept_out), rows)
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


class _HeadsRule(ModuleRule):
    """Shared shape of both rules: pinned embed dim in and out, a HEADS axis in between.

    Subclasses name the layer's head count, head width, qkv and output projections.
    """

    label = ""

    def heads_of(self, m: nn.Module) -> tuple[int, int, int]:
        """(heads, head_dim, merged width) of ``m``."""
        raise NotImplementedError

    def blocker(self, m: nn.Module) -> str | None:
        return None

    def projections(self, m: nn.Module) -> tuple[nn.Linear, nn.Linear, tuple[nn.Linear, ...]]:
        """(qkv, output projection, other per-channel producers of the merged width)."""
        raise NotImplementedError

    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        # the embed dim follows the residual stream: IN = qkv (and gate) columns, OUT = the
        # output projection's rows
        x = call.arg(0, "x")
        pin_all_inputs(t, call, f"{fqn} ({self.label}) does not prune its mask input",
                       skip_first=True)
        if isinstance(x, Ids):
            t.member(fqn, Side.IN, channel_ids(t, x, -1))
        heads = t.fresh(self.heads_of(m)[0], f"{fqn}:heads")
        t.member(fqn, Side.HEADS, heads)
        blocker = self.blocker(m)
        if blocker:
            t.pin(heads, f"heads of {fqn} stay: {blocker}")
        shape = tuple(call.out.shape)
        out = t.fresh(shape[-1], f"{fqn}:out")
        t.member(fqn, Side.OUT, out)
        return ids_on_axis(out, shape, -1)

    def extent(self, m: nn.Module, side: Side) -> int | None:
        qkv, proj, _ = self.projections(m)
        return {Side.HEADS: self.heads_of(m)[0], Side.IN: qkv.in_features,
                Side.OUT: proj.out_features}.get(side)

    def in_axis(self, m: nn.Module, ndim: int) -> int:
        return ndim - 1

    def score_params(self, m: nn.Module, side: Side) -> Sequence[tuple[torch.Tensor, int]]:
        if side is Side.IN:
            qkv, _, others = self.projections(m)
            return ((qkv.weight, 1), *((lin.weight, 1) for lin in others))
        if side is Side.OUT:
            return ((self.projections(m)[1].weight, 0),)
        if side is not Side.HEADS:
            return ()
        h, d, _ = self.heads_of(m)
        qkv, proj, others = self.projections(m)
        out = [
            (qkv.weight.reshape(3, h, d, -1), 1),
            (proj.weight.reshape(-1, h, d), 1),
            *((lin.weight.reshape(h, d, -1), 0) for lin in others),
        ]
        if qkv.bias is not None:
            out.append((qkv.bias.reshape(3, h, d), 1))
        return tuple(out)

    def mask_(self, m: nn.Module, side: Side, dropped: Sequence[int]) -> None:
        if side is Side.IN:
            super().mask_(m, side, dropped)  # zero the dropped input channels
            return
        if side is not Side.HEADS:
            return
        d = self.heads_of(m)[1]
        proj = self.projections(m)[1]
        with torch.no_grad():
            for h in dropped:
                proj.weight[:, h * d : (h + 1) * d] = 0


@register_rule_by_name(*TIMM_ATTENTION)
class TimmAttentionRule(_HeadsRule):
    """timm's ViT ``Attention`` (vit_*, deit*, deit3, pit, twins, hybrid ViTs, ...)."""

    label = "timm Attention"

    def heads_of(self, m: nn.Module) -> tuple[int, int, int]:
        a: Any = m
        h, d = int(a.num_heads), int(a.head_dim)
        return h, d, int(getattr(a, "attn_dim", h * d))

    def blocker(self, m: nn.Module) -> str | None:
        if not isinstance(m.norm, nn.Identity):
            name = type(m.norm).__name__
            return f"its {name} over all attention channels (scale_norm) mixes heads"
        return None

    def projections(self, m: nn.Module) -> tuple[nn.Linear, nn.Linear, tuple[nn.Linear, ...]]:
        gate = getattr(m, "gate", None)
        return m.qkv, m.proj, () if gate is None else (gate,)  # type: ignore[return-value]

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kept = keep.resolve(Side.HEADS, self.heads_of(m)[0])
        return finish(PrunedTimmAttention(m, kept, keep.in_, keep.out), m)


@register_rule_by_name(MAXVIT_ATTENTION)
class MaxVitAttentionRule(_HeadsRule):
    """torchvision MaxViT's ``RelativePositionalMultiHeadAttention`` (block and grid attention)."""

    label = "MaxViT attention"

    def heads_of(self, m: nn.Module) -> tuple[int, int, int]:
        a: Any = m
        h, d = int(a.n_heads), int(a.head_dim)
        return h, d, h * d

    def projections(self, m: nn.Module) -> tuple[nn.Linear, nn.Linear, tuple[nn.Linear, ...]]:
        return m.to_qkv, m.merge, ()  # type: ignore[return-value]

    def score_params(self, m: nn.Module, side: Side) -> Sequence[tuple[torch.Tensor, int]]:
        base = super().score_params(m, side)
        if side is not Side.HEADS:
            return base
        table: torch.Tensor = m.relative_position_bias_table  # type: ignore[assignment]
        return (*base, (table, 1))

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kept = keep.resolve(Side.HEADS, self.heads_of(m)[0])
        return finish(PrunedRelativePositionalMultiHeadAttention(m, kept, keep.in_, keep.out), m)


@register_rule(PrunedTimmAttention, PrunedRelativePositionalMultiHeadAttention)
class PrunedHeadsRule(ModuleRule):
    """An already pruned attention layer is opaque: its embed dim and heads stay."""

    def extent(self, m: nn.Module, side: Side) -> int | None:
        """Its sizes, so a saved plan can be checked against the model it produced."""
        a: Any = m
        if isinstance(m, PrunedTimmAttention):
            sizes = (a.num_heads, a.qkv.in_features, a.proj.out_features)
        else:
            sizes = (a.n_heads, a.to_qkv.in_features, a.merge.out_features)
        return dict(zip((Side.HEADS, Side.IN, Side.OUT), sizes, strict=True)).get(side)

    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        why = f"{fqn} ({type(m).__name__}) is not pruned again"
        pin_all_inputs(t, call, why)
        return pinned_output(t, fqn, call, why)
