"""One base for attention layers whose heads are pruned: what a head owns, and how it goes.

A layer has ``H`` head units of width ``w``. Attention mixes tokens within a unit and never
across units, so unit ``h`` owns:

* rows ``p * (H * w_p) + [h * w_p, (h + 1) * w_p)`` of every head-major input projection made
  of ``parts`` stacked blocks ``p`` (a fused qkv weight: ``parts = 3``, ``w_p = w``; a separate
  q, k, v or gate projection: ``parts = 1``), and the same entries of its bias;
* columns ``[h * w, (h + 1) * w)`` of the output projection;
* slice ``h`` of any other per-head tensor (a relative-position bias table, a logit scale).

The units are independent until the output projection sums them, so dropping unit ``h`` is
exact: the masked oracle zeroes its output-projection columns, and :class:`AttentionHeadsRule`
records the HEADS axis as an exact group.

For self-attention (one input feeds q, k and v), the embed dim follows the residual stream:
the input channels (IN) are the columns of every input projection and the output channels (OUT)
the rows of the output projection. Otherwise (cross-attention, ``kdim``/``vdim``, a layer that
cannot shrink it) the embed dim is pinned, with the reason.

A concrete rule states only what differs between layers (see :class:`AttentionHeadsRule`):
where q/k/v and the output projection live, the layout of the fused qkv weight, the head count
attribute, and the pruned replacement class. A grouped-query layer (Hugging Face Llama/Mistral:
separate ``q_proj``/``k_proj``/``v_proj``/``o_proj``, ``num_key_value_heads`` < ``num_heads``)
would prune whole key/value groups: one unit is one kv head and its ``n_rep = num_heads //
num_key_value_heads`` query heads, so ``w = n_rep * head_dim`` for ``q_proj`` rows and
``o_proj`` columns and ``head_dim`` for ``k_proj``/``v_proj`` rows. Its rule would be::

    class LlamaAttentionRule(AttentionHeadsRule):
        label = "Llama attention"
        replacement = PrunedLlamaAttention  # (src, kept_groups, kept_in, kept_out)

        def num_heads(self, m):
            return m.config.num_key_value_heads
        def qkv_inputs(self, call):
            return (call.arg(0, "hidden_states"),)
        def projections(self, m):
            q, k, v, o = m.q_proj.weight, m.k_proj.weight, m.v_proj.weight, m.o_proj.weight
            return Projections(inputs=(q, k, v), output=o,
                               per_head=(PerHead(q), PerHead(k), PerHead(v), PerHead(o, dim=1)))

``head_rows(kept, n_rep * head_dim, q_width, 1)`` and ``head_rows(kept, head_dim, kv_width, 1)``
then give the rows that :func:`sliced_linear` keeps in the replacement.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from shrink.ids import Call, Ids, Tracker, channel_ids, ids_on_axis, iter_ids
from shrink.plan import Side
from shrink.rules.base import Keep, ModuleRule, finish

Rows = Sequence[int] | torch.Tensor | None


def head_rows(kept: Sequence[int], head_width: int, part_width: int, parts: int) -> torch.Tensor:
    """Positions owned by the ``kept`` heads along a head-major axis of ``parts`` blocks.

    Head ``h`` owns ``p * part_width + [h * head_width, (h + 1) * head_width)`` for each block
    ``p < parts``; the result lists block 0's positions (in ``kept`` order), then block 1's ...

    Example:
        >>> head_rows([0, 2], 2, 6, 2).tolist()
        [0, 1, 4, 5, 6, 7, 10, 11]
    """
    per_head = [torch.arange(h * head_width, (h + 1) * head_width) for h in kept]
    one = torch.cat(per_head) if per_head else torch.zeros(0, dtype=torch.long)
    return torch.cat([one + p * part_width for p in range(parts)])


def sliced_linear(weight: torch.Tensor, bias: torch.Tensor | None, rows: Rows = None,
                  cols: Rows = None) -> nn.Linear:
    """A new Linear holding ``weight[rows][:, cols]`` and ``bias[rows]`` (None: all of an axis)."""
    w = weight.detach()
    b = None if bias is None else bias.detach()
    if rows is not None:
        r = torch.as_tensor(rows, dtype=torch.long, device=w.device)
        w, b = w[r], (None if b is None else b[r])
    if cols is not None:
        w = w[:, torch.as_tensor(cols, dtype=torch.long, device=w.device)]
    new = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device=w.device, dtype=w.dtype)
    with torch.no_grad():
        new.weight.copy_(w)
        if b is not None:
            new.bias.copy_(b)
    return new


@dataclass(frozen=True, slots=True)
class PerHead:
    """A tensor whose axis ``dim`` is ``parts`` blocks of one slice per head, head-major."""

    tensor: torch.Tensor
    dim: int = 0
    parts: int = 1

    def view(self, heads: int) -> tuple[torch.Tensor, int]:
        """The tensor with a heads axis exposed, and that axis (for ``score_params``)."""
        t, d = self.tensor, self.dim
        blocks = (heads, -1) if self.parts == 1 else (self.parts, heads, -1)
        return t.reshape(*t.shape[:d], *blocks, *t.shape[d + 1 :]), d + len(blocks) - 2


@dataclass(frozen=True, slots=True)
class Projections:
    """Where a layer's channels live.

    ``inputs``: weights whose columns read the embed dim (IN): q, k, v, a fused qkv, a gate.
    ``output``: the output projection's weight; rows are OUT, columns ``[h*w, (h+1)*w)`` head h's.
    ``per_head``: every tensor scored per head, in scoring order (the output projection included).
    """

    inputs: tuple[torch.Tensor, ...]
    output: torch.Tensor
    per_head: tuple[PerHead, ...]


class AttentionHeadsRule(ModuleRule):
    """Heads (and, for self-attention, the embed dim) of one attention layer.

    A subclass defines :attr:`label`, :attr:`replacement` (called as ``replacement(src,
    kept_heads, kept_in, kept_out)``; None for an unchanged axis), :meth:`projections`, and
    :attr:`heads_attr` (the layer's attribute that counts its heads) or :meth:`num_heads`. It
    may override :meth:`qkv_inputs` (the arguments that feed q, k and v; default the first),
    :meth:`embed_blocker` and :meth:`heads_blocker` (why the embed dim or the heads cannot
    shrink; default: nothing stops them).
    """

    label: ClassVar[str] = "attention"
    replacement: ClassVar[Callable[..., nn.Module]]
    heads_attr: ClassVar[str] = "num_heads"

    def num_heads(self, m: nn.Module) -> int:
        return int(getattr(m, self.heads_attr))

    def projections(self, m: nn.Module) -> Projections:
        raise NotImplementedError

    def qkv_inputs(self, call: Call) -> tuple[Any, ...]:
        return (call.arg(0, "x"),)

    def embed_blocker(self, m: nn.Module, call: Call) -> str | None:
        return None

    def heads_blocker(self, m: nn.Module, call: Call) -> str | None:
        return None

    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        qkv = self.qkv_inputs(call)
        for ids in iter_ids((call.args, call.kwargs)):
            if not any(ids is x for x in qkv):
                t.pin(ids.a, f"{fqn} ({self.label}) does not prune its mask input")
        blocker = self.embed_blocker(m, call)
        why = f"{fqn} ({self.label}) keeps its embed dim: {blocker}"
        if blocker is None and isinstance(qkv[0], Ids):
            t.member(fqn, Side.IN, channel_ids(t, qkv[0], -1))
        elif blocker is not None:
            for x in qkv:
                if isinstance(x, Ids):
                    t.pin(channel_ids(t, x, -1), why)
        heads = t.fresh(self.num_heads(m), f"{fqn}:heads")
        t.member(fqn, Side.HEADS, heads)
        stays = self.heads_blocker(m, call)
        if stays:
            t.pin(heads, f"heads of {fqn} stay: {stays}")
        out, *rest = call.out if isinstance(call.out, tuple) else (call.out,)
        shape = tuple(out.shape)
        out_1d = t.fresh(shape[-1], f"{fqn}:out")
        out_ids = ids_on_axis(out_1d, shape, -1)
        if blocker is None:
            t.member(fqn, Side.OUT, out_1d)
        else:
            t.pin(out_ids.a, why)
        if not isinstance(call.out, tuple):
            return out_ids
        extra = [None if not isinstance(r, torch.Tensor) else
                 t.fresh_pinned(tuple(r.shape), f"{fqn}:weights", "attention weights")
                 for r in rest]
        return (out_ids, *extra)

    def extent(self, m: nn.Module, side: Side) -> int | None:
        p = self.projections(m)
        sizes = {Side.HEADS: self.num_heads(m), Side.IN: int(p.inputs[0].shape[1]),
                 Side.OUT: int(p.output.shape[0])}
        return sizes.get(side)

    def recorded_sides(self, m: nn.Module) -> tuple[Side, ...]:
        return (Side.HEADS,)  # the embed dim (IN/OUT) is not recorded when something blocks it

    def in_axis(self, m: nn.Module, ndim: int) -> int:
        return ndim - 1

    def score_params(self, m: nn.Module, side: Side) -> Sequence[tuple[torch.Tensor, int]]:
        p = self.projections(m)
        if side is Side.IN:
            return tuple((w, 1) for w in p.inputs)
        if side is Side.OUT:
            return ((p.output, 0),)
        if side is Side.HEADS:
            return tuple(ph.view(self.num_heads(m)) for ph in p.per_head)
        return ()

    def mask_(self, m: nn.Module, side: Side, dropped: Sequence[int]) -> None:
        """IN: zero the dropped channels of the input (every argument that is that tensor: q, k
        and v of self-attention). HEADS: zero the heads' output-projection columns."""
        if side is Side.IN:
            idx = torch.as_tensor(list(dropped), dtype=torch.long)

            def hook(mod: nn.Module, args: tuple[Any, ...]) -> Any:
                x = args[0]
                y = x.index_fill(-1, idx.to(x.device), 0)
                return tuple(y if a is x else a for a in args)

            m.register_forward_pre_hook(hook)
        elif side is Side.HEADS:
            out = self.projections(m).output
            w = out.shape[1] // self.num_heads(m)
            with torch.no_grad():
                for h in dropped:
                    out[:, h * w : (h + 1) * w] = 0

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kept = keep.resolve(Side.HEADS, self.num_heads(m))
        return finish(type(self).replacement(m, kept, keep.in_, keep.out), m)


class PrunedHeads(nn.Module):
    """Base of the pruned replacement layers: they report their sizes for plan checks."""

    def sizes(self) -> tuple[int, int, int]:
        """(heads, input channels, output channels)."""
        raise NotImplementedError


class AlreadyPrunedRule(ModuleRule):
    """An already pruned attention layer is opaque: its inputs, heads and output stay.

    Registered by each family for its :class:`PrunedHeads` classes.
    """

    def extent(self, m: nn.Module, side: Side) -> int | None:
        """Its sizes, so a saved plan can be checked against the model it produced."""
        if not isinstance(m, PrunedHeads):
            return None
        return dict(zip((Side.HEADS, Side.IN, Side.OUT), m.sizes(), strict=True)).get(side)

    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        why = f"{fqn} ({type(m).__name__}) is not pruned again"
        for x in iter_ids((call.args, call.kwargs)):
            t.pin(x.a, why)
        out, *rest = call.out if isinstance(call.out, tuple) else (call.out,)
        shape = tuple(out.shape)
        ids = ids_on_axis(t.fresh(shape[-1], f"{fqn}:out"), shape, -1)
        t.pin(ids.a, why)
        if not isinstance(call.out, tuple):
            return ids
        return (ids, *(None if not isinstance(r, torch.Tensor) else
                       t.fresh_pinned(tuple(r.shape), f"{fqn}:w", "weights") for r in rest))
