"""torchvision Swin Transformer window attention (V1 and V2): prune whole heads.

``ShiftedWindowAttention(V2)`` projects tokens with ``qkv`` (``C -> 3C``), attends within
(shifted) windows, and mixes heads back with ``proj`` (``C -> C``). Head ``h`` (head dim
``d = C // num_heads``) owns rows ``[p*C + h*d, p*C + (h+1)*d)`` of ``qkv`` for each of its
q, k and v parts ``p``, column ``h`` of the relative position bias (V1: the bias table; V2: the
rows of ``cpb_mlp``'s last Linear), ``logit_scale[h]`` (V2), and columns ``[h*d, (h+1)*d)`` of
``proj``. Heads are independent until ``proj`` sums them, so dropping a head is exact: the
masked oracle zeroes its ``proj`` columns. The embed dim ``C`` (the residual stream) is pinned.

torchvision's ``shifted_window_attention`` derives the head dim as ``C // num_heads`` from the
input width and reshapes the result back to ``C``, so the pruned layer cannot be the original
class with fewer heads: :class:`PrunedShiftedWindowAttention` computes the same window attention
with an inner width ``num_heads * head_dim`` that differs from ``C``.

The rule is registered by qualified name, so importing shrink never imports torchvision.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from shrink.ids import Call, Ids, Tracker
from shrink.rules.attention_base import (
    AlreadyPrunedRule,
    AttentionHeadsRule,
    PerHead,
    Projections,
    PrunedHeads,
    head_rows,
    sliced_linear,
)
from shrink.rules.registry import register_function, register_rule, register_rule_by_name

_TV = "torchvision.models.swin_transformer"


def _region(coord: torch.Tensor, size: int, window: int, shift: int) -> torch.Tensor:
    """Which of the three shifted-window regions (0, 1, 2) each row or column falls in.

    The regions are ``[0, size - window)``, ``[size - window, size - shift)`` and
    ``[size - shift, size)``; an axis that is not shifted is one region.
    """
    if shift == 0:
        return torch.zeros_like(coord)
    return (coord >= size - window).long() + (coord >= size - shift).long()


def _shift_mask(height: int, width: int, window: tuple[int, int], shift: tuple[int, int],
                like: torch.Tensor) -> torch.Tensor:
    """(windows, N, N) additive mask: -100 between tokens that the cyclic shift made neighbours."""
    wh, ww = window
    rows = _region(torch.arange(height, device=like.device), height, wh, shift[0])
    cols = _region(torch.arange(width, device=like.device), width, ww, shift[1])
    label = rows[:, None] * 3 + cols[None, :]
    label = label.view(height // wh, wh, width // ww, ww).permute(0, 2, 1, 3).reshape(-1, wh * ww)
    apart = label[:, None, :] != label[:, :, None]
    zeros = torch.zeros(apart.shape, dtype=like.dtype, device=like.device)
    return zeros.masked_fill(apart, -100.0)


def window_attention(
    x: torch.Tensor,
    qkv_weight: torch.Tensor,
    qkv_bias: torch.Tensor | None,
    proj_weight: torch.Tensor,
    proj_bias: torch.Tensor | None,
    position_bias: torch.Tensor,
    logit_scale: torch.Tensor | None,
    window: tuple[int, int],
    shift: tuple[int, int],
    heads: int,
    head_dim: int,
    attention_dropout: float,
    dropout: float,
    training: bool,
) -> torch.Tensor:
    """Shifted-window multi-head self-attention on ``x`` of shape (B, H, W, C).

    Same maths as torchvision's ``shifted_window_attention``, with the head dim given rather than
    derived from ``C``. Pad H and W to window multiples, roll by ``-shift`` (only along an axis
    larger than one window), split into windows of N = wh*ww tokens, attend per head with
    ``position_bias`` (1, heads, N, N) added (V1: ``q k^T / sqrt(d)``; V2, when ``logit_scale``
    is given: cosine similarity times ``exp(min(logit_scale, log 100))``, with the k bias
    zeroed), add the -100 shift mask, softmax, project, then undo windows, roll and padding.
    """
    b, h, w, c = x.shape
    wh, ww = window
    pad_b, pad_r = (wh - h % wh) % wh, (ww - w % ww) % ww
    x = F.pad(x, (0, 0, 0, pad_r, 0, pad_b))
    ph, pw = h + pad_b, w + pad_r
    sh, sw = (shift[0] if wh < ph else 0), (shift[1] if ww < pw else 0)
    shifted = sh + sw > 0
    if shifted:
        x = torch.roll(x, shifts=(-sh, -sw), dims=(1, 2))
    nh, nw, n = ph // wh, pw // ww, wh * ww
    tokens = x.view(b, nh, wh, nw, ww, c).permute(0, 1, 3, 2, 4, 5).reshape(b * nh * nw, n, c)

    if logit_scale is not None and qkv_bias is not None:
        inner = heads * head_dim
        qkv_bias = torch.cat([qkv_bias[:inner], torch.zeros_like(qkv_bias[inner : 2 * inner]),
                              qkv_bias[2 * inner :]])
    q, k, v = (
        F.linear(tokens, qkv_weight, qkv_bias)
        .reshape(b * nh * nw, n, 3, heads, head_dim)
        .permute(2, 0, 3, 1, 4)
        .unbind(0)
    )
    if logit_scale is not None:
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(logit_scale, max=math.log(100.0)).exp()
    else:
        attn = (q * head_dim**-0.5) @ k.transpose(-2, -1)
    attn = attn + position_bias
    if shifted:
        mask = _shift_mask(ph, pw, window, (sh, sw), attn)
        attn = (attn.view(b, nh * nw, heads, n, n) + mask[None, :, None]).view(-1, heads, n, n)
    attn = F.dropout(F.softmax(attn, dim=-1), p=attention_dropout, training=training)
    out = (attn @ v).transpose(1, 2).reshape(b * nh * nw, n, heads * head_dim)
    out = F.dropout(F.linear(out, proj_weight, proj_bias), p=dropout, training=training)

    c_out = out.shape[-1]  # the output width (the input's unless the embed dim was pruned)
    out = out.view(b, nh, nw, wh, ww, c_out).permute(0, 1, 3, 2, 4, 5).reshape(b, ph, pw, c_out)
    if shifted:
        out = torch.roll(out, shifts=(sh, sw), dims=(1, 2))
    return out[:, :h, :w, :].contiguous()


# Shapes decide padding and shifting: plain fx tracing keeps the call whole (as torchvision does).
torch.fx.wrap("window_attention")


class PrunedShiftedWindowAttention(PrunedHeads):
    """Swin window attention (V1 or V2) with fewer heads than ``embed_dim // head_dim``.

    Drop-in for ``ShiftedWindowAttention``/``ShiftedWindowAttentionV2`` after head pruning: same
    forward signature ((B, H, W, C) in and out) and parameter names (``qkv``, ``proj``,
    ``relative_position_bias_table`` for V1, ``logit_scale`` and ``cpb_mlp`` for V2). ``head_dim``
    is the original's, so the inner width ``num_heads * head_dim`` is smaller than ``embed_dim``.
    ``kept_heads`` records which heads of the original layer remain.
    """

    def __init__(self, src: Any, kept_heads: Sequence[int], kept_in: Sequence[int] | None = None,
                 kept_out: Sequence[int] | None = None) -> None:
        super().__init__()
        qkv_src: nn.Linear = src.qkv
        proj_src: nn.Linear = src.proj
        c, h = int(proj_src.out_features), int(src.num_heads)
        d = c // h
        kept = [int(k) for k in kept_heads]
        self.embed_dim = c if kept_out is None else len(kept_out)
        self.num_heads, self.head_dim = len(kept), d
        self.kept_heads = tuple(kept)
        self.window_size = [int(s) for s in src.window_size]
        self.shift_size = [int(s) for s in src.shift_size]
        self.attention_dropout = float(src.attention_dropout)
        self.dropout = float(src.dropout)
        cols = head_rows(kept, d, c, 1)
        self.qkv = sliced_linear(qkv_src.weight, qkv_src.bias, head_rows(kept, d, c, 3), kept_in)
        self.proj = sliced_linear(proj_src.weight, proj_src.bias, kept_out, cols)
        self.register_buffer("relative_position_index", src.relative_position_index.clone())
        heads = torch.tensor(kept, device=qkv_src.weight.device)
        self.v2 = getattr(src, "logit_scale", None) is not None
        if self.v2:
            self.logit_scale = nn.Parameter(src.logit_scale.detach()[heads].clone())
            first, last = src.cpb_mlp[0], src.cpb_mlp[-1]
            self.cpb_mlp = nn.Sequential(sliced_linear(first.weight, first.bias),
                                         nn.ReLU(inplace=True),
                                         sliced_linear(last.weight, last.bias, heads))
            self.register_buffer("relative_coords_table", src.relative_coords_table.clone())
        else:
            table = src.relative_position_bias_table
            self.relative_position_bias_table = nn.Parameter(table.detach()[:, heads].clone())
        self.train(src.training)

    def get_relative_position_bias(self) -> torch.Tensor:
        """(1, heads, N, N) bias added to the attention logits of every window."""
        n = self.window_size[0] * self.window_size[1]
        if self.v2:
            table = self.cpb_mlp(self.relative_coords_table).view(-1, self.num_heads)
        else:
            table = self.relative_position_bias_table
        bias = table[self.relative_position_index].view(n, n, -1).permute(2, 0, 1).unsqueeze(0)
        return 16 * torch.sigmoid(bias) if self.v2 else bias.contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return window_attention(
            x, self.qkv.weight, self.qkv.bias, self.proj.weight, self.proj.bias,
            self.get_relative_position_bias(),
            self.logit_scale if self.v2 else None,
            (self.window_size[0], self.window_size[1]), (self.shift_size[0], self.shift_size[1]),
            self.num_heads, self.head_dim, self.attention_dropout, self.dropout, self.training,
        )

    def sizes(self) -> tuple[int, int, int]:
        return self.num_heads, self.qkv.in_features, self.proj.out_features


@register_rule_by_name(f"{_TV}.ShiftedWindowAttention", f"{_TV}.ShiftedWindowAttentionV2")
class ShiftedWindowAttentionRule(AttentionHeadsRule):
    """torchvision's Swin V1/V2 window attention: fused ``qkv`` (C -> 3C) and ``proj``."""

    label = "ShiftedWindowAttention"
    replacement = PrunedShiftedWindowAttention

    def projections(self, m: nn.Module) -> Projections:
        a: Any = m
        qkv = PerHead(a.qkv.weight, parts=3)
        return Projections((qkv.tensor,), a.proj.weight, (qkv, PerHead(a.proj.weight, dim=1)))

    def embed_blocker(self, m: nn.Module, call: Call) -> str | None:
        a: Any = m
        c, h = int(a.proj.out_features), int(a.num_heads)
        if c % h or a.qkv.out_features != 3 * c:
            return f"qkv {tuple(a.qkv.weight.shape)} does not split into {h} heads of width {c}"
        mlp = getattr(a, "cpb_mlp", None)
        if mlp is not None and not (
            isinstance(mlp, nn.Sequential) and len(mlp) == 3 and isinstance(mlp[0], nn.Linear)
            and isinstance(mlp[1], nn.ReLU) and isinstance(mlp[2], nn.Linear)
        ):
            return "cpb_mlp is not torchvision's Linear-ReLU-Linear"
        return None

    heads_blocker = embed_blocker


register_rule(PrunedShiftedWindowAttention)(AlreadyPrunedRule)


@register_function(f"{_TV}._patch_merging_pad")
def patch_merging_pad(t: Tracker, call: Call) -> Any:
    """torchvision's Swin patch merging: pad H and W to even, then concatenate the four 2x2
    phases along channels, so output channel ``k * C + c`` carries input channel ``c``."""
    x = call.args[0]
    out_shape = tuple(call.out.shape)
    if not isinstance(x, Ids) or x.ndim < 3 or x.a.shape[-3] > 1 or x.a.shape[-2] > 1:
        why = f"{call.name} at {call.where}: patch merging of ids that vary along H or W"
        if isinstance(x, Ids):
            t.pin(x.a, why)
        return t.fresh_pinned(out_shape, call.name, why)
    a = np.concatenate([x.a] * 4, axis=-1)
    return Ids(a, out_shape)
