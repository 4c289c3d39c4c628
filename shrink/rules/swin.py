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

from shrink.ids import Call, Ids, Tracker, channel_ids, ids_on_axis
from shrink.plan import Side
from shrink.rules.base import Keep, ModuleRule, copy_param_, finish
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


class PrunedShiftedWindowAttention(nn.Module):
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
        kin = list(range(c)) if kept_in is None else [int(i) for i in kept_in]
        kout = list(range(c)) if kept_out is None else [int(i) for i in kept_out]
        self.embed_dim, self.num_heads, self.head_dim = len(kout), len(kept), d
        self.kept_heads = tuple(kept)
        self.window_size = [int(s) for s in src.window_size]
        self.shift_size = [int(s) for s in src.shift_size]
        self.attention_dropout = float(src.attention_dropout)
        self.dropout = float(src.dropout)
        ref = qkv_src.weight
        dev, dt = ref.device, ref.dtype
        cols = torch.tensor([k * d + i for k in kept for i in range(d)], device=ref.device)
        rows = torch.cat([cols + p * c for p in range(3)])
        inner = len(kept) * d
        ins, outs = torch.tensor(kin, device=ref.device), torch.tensor(kout, device=ref.device)
        self.qkv = nn.Linear(len(kin), 3 * inner, bias=qkv_src.bias is not None, device=dev,
                             dtype=dt)
        self.proj = nn.Linear(inner, len(kout), bias=proj_src.bias is not None, device=dev,
                              dtype=dt)
        copy_param_(self.qkv.weight, qkv_src.weight[rows][:, ins])
        copy_param_(self.qkv.bias, None if qkv_src.bias is None else qkv_src.bias[rows])
        copy_param_(self.proj.weight, proj_src.weight[outs][:, cols])
        copy_param_(self.proj.bias, None if proj_src.bias is None else proj_src.bias[outs])
        self.register_buffer("relative_position_index", src.relative_position_index.clone())
        heads = torch.tensor(kept, device=ref.device)
        self.v2 = getattr(src, "logit_scale", None) is not None
        if self.v2:
            self.logit_scale = nn.Parameter(src.logit_scale.detach()[heads].clone())
            first, last = src.cpb_mlp[0], src.cpb_mlp[-1]
            hidden = nn.Linear(first.in_features, first.out_features,
                               bias=first.bias is not None, device=dev, dtype=dt)
            out = nn.Linear(last.in_features, len(kept), bias=last.bias is not None,
                            device=dev, dtype=dt)
            copy_param_(hidden.weight, first.weight)
            copy_param_(hidden.bias, first.bias)
            copy_param_(out.weight, last.weight[heads])
            copy_param_(out.bias, None if last.bias is None else last.bias[heads])
            self.cpb_mlp = nn.Sequential(hidden, nn.ReLU(inplace=True), out)
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


def _dims(m: Any) -> tuple[int, int, int]:
    """(embed dim C, heads, head dim) of a torchvision window attention."""
    c, h = int(m.proj.out_features), int(m.num_heads)
    return c, h, c // h


@register_rule_by_name(f"{_TV}.ShiftedWindowAttention", f"{_TV}.ShiftedWindowAttentionV2")
class ShiftedWindowAttentionRule(ModuleRule):
    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        # the embed dim follows the residual stream: IN = qkv columns, OUT = proj rows
        x = call.arg(0, "x")
        c, h, _ = _dims(m)
        blocker = self._blocker(m)
        why = f"{fqn} ({type(m).__name__}) keeps its embed dim: {blocker}"
        if isinstance(x, Ids):
            if blocker:
                t.pin(channel_ids(t, x, -1), why)
            else:
                t.member(fqn, Side.IN, channel_ids(t, x, -1))
        heads = t.fresh(h, f"{fqn}:heads")
        t.member(fqn, Side.HEADS, heads)
        if blocker:
            t.pin(heads, f"heads of {fqn} stay: {blocker}")
        out_1d = t.fresh(c, f"{fqn}:out")
        out = ids_on_axis(out_1d, tuple(call.out.shape), -1)
        if blocker:
            t.pin(out.a, why)
        else:
            t.member(fqn, Side.OUT, out_1d)
        return out

    @staticmethod
    def _blocker(m: Any) -> str | None:
        c, h, _ = _dims(m)
        if c % h or m.qkv.out_features != 3 * c:
            return f"qkv {tuple(m.qkv.weight.shape)} does not split into {h} heads of width {c}"
        mlp = getattr(m, "cpb_mlp", None)
        if mlp is not None and not (
            isinstance(mlp, nn.Sequential) and len(mlp) == 3 and isinstance(mlp[0], nn.Linear)
            and isinstance(mlp[1], nn.ReLU) and isinstance(mlp[2], nn.Linear)
        ):
            return "cpb_mlp is not torchvision's Linear-ReLU-Linear"
        return None

    def extent(self, m: nn.Module, side: Side) -> int | None:
        return _dims(m)[1] if side is Side.HEADS else _dims(m)[0]

    def in_axis(self, m: nn.Module, ndim: int) -> int:
        return ndim - 1

    def score_params(self, m: nn.Module, side: Side) -> Sequence[tuple[torch.Tensor, int]]:
        sw: Any = m
        if side is Side.IN:
            return ((sw.qkv.weight, 1),)
        if side is Side.OUT:
            return ((sw.proj.weight, 0),)
        c, h, d = _dims(m)
        qkv = sw.qkv.weight.reshape(3, h, d, c).transpose(0, 1)  # head, (q k v), d, C
        proj = sw.proj.weight.reshape(c, h, d).transpose(0, 1)  # head, C, d
        return ((qkv, 0), (proj, 0))

    def mask_(self, m: nn.Module, side: Side, dropped: Sequence[int]) -> None:
        if side is Side.IN:
            super().mask_(m, side, dropped)  # zero the dropped input channels
            return
        if side is not Side.HEADS:
            return
        sw: Any = m
        d = _dims(m)[2]
        with torch.no_grad():
            for h in dropped:
                sw.proj.weight[:, h * d : (h + 1) * d] = 0

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kept = keep.resolve(Side.HEADS, _dims(m)[1])
        return finish(PrunedShiftedWindowAttention(m, kept, keep.in_, keep.out), m)


@register_rule(PrunedShiftedWindowAttention)
class PrunedShiftedWindowAttentionRule(ModuleRule):
    """An already pruned window attention is opaque: its embed dim and heads stay."""

    def extent(self, m: nn.Module, side: Side) -> int | None:
        """Its sizes, so a saved plan can be checked against the model it produced."""
        a: Any = m
        return {Side.HEADS: a.num_heads, Side.IN: a.qkv.in_features,
                Side.OUT: a.proj.out_features}.get(side)

    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        x = call.arg(0, "x")
        if isinstance(x, Ids):
            t.pin(x.a, f"{fqn} (PrunedShiftedWindowAttention) is not pruned again")
        return t.fresh_pinned(tuple(call.out.shape), f"{fqn}:out",
                              "PrunedShiftedWindowAttention output")


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
