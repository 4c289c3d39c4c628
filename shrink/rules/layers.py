"""More per-channel layers: InstanceNorm, per-channel PReLU, Embedding.

* InstanceNorm1d/2d/3d normalise every channel of every sample on its own (over the spatial
  axes), so like BatchNorm their one axis is the channel space of input and output: exact. Their
  optional affine weight/bias and running statistics are sliced.
* PReLU with one slope per channel (``num_parameters == C``) is element-wise per channel: its
  slopes are sliced; with a single shared slope it is a plain element-wise op.
* Embedding: its output features (the last axis, ``weight[:, j]``) are fresh channels, like a
  Linear's outputs; the integer indices it reads are not channels. With ``max_norm`` the rows
  are renormalised over all features, so its features stay.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shrink.ids import Call, Tracker, channel_ids, ids_on_axis
from shrink.plan import Side
from shrink.rules.base import Keep, ModuleRule, finish, narrow, sliced_copy
from shrink.rules.norm import BatchNormRule
from shrink.rules.registry import register_rule

_SPATIAL: dict[type[nn.Module], int] = {nn.InstanceNorm1d: 1, nn.InstanceNorm2d: 2,
                                         nn.InstanceNorm3d: 3}


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
class InstanceNormRule(BatchNormRule):
    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        x = call.args[0]
        unbatched = x.ndim == _SPATIAL[type(m)] + 1  # (C, *spatial)
        t.member(fqn, Side.OUT, channel_ids(t, x, 0 if unbatched else 1))
        return x

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kout = keep.resolve(Side.OUT, int(m.num_features))  # type: ignore[arg-type]
        new = sliced_copy(narrow(m, nn.modules.instancenorm._InstanceNorm),
                          ("weight", "bias", "running_mean", "running_var"), 0, kout)
        new.num_features = len(kout)
        return finish(new, m)


@register_rule(nn.PReLU)
class PReLURule(ModuleRule):
    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        x = call.args[0]
        if m.num_parameters == 1:  # type: ignore[comparison-overlap]
            return x
        t.member(fqn, Side.OUT, channel_ids(t, x, 1 if x.ndim > 1 else 0))
        return x

    def extent(self, m: nn.Module, side: Side) -> int | None:
        n = int(m.num_parameters)  # type: ignore[arg-type]
        return n if side is Side.OUT and n > 1 else None

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kout = keep.resolve(Side.OUT, int(m.num_parameters))  # type: ignore[arg-type]
        new = sliced_copy(narrow(m, nn.PReLU), ("weight",), 0, kout)
        new.num_parameters = len(kout)
        return finish(new, m)


@register_rule(nn.Embedding)
class EmbeddingRule(ModuleRule):
    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        shape = tuple(call.out.shape)
        out = t.fresh(int(m.embedding_dim), f"{fqn}:out")  # type: ignore[arg-type]
        if m.max_norm is not None:
            t.pin(out, f"{fqn} (Embedding) renormalises rows with max_norm={m.max_norm}, "
                       "which mixes its features")
        t.member(fqn, Side.OUT, out)
        return ids_on_axis(out, shape, -1)

    def extent(self, m: nn.Module, side: Side) -> int | None:
        return int(m.embedding_dim) if side is Side.OUT else None  # type: ignore[arg-type]

    def score_params(self, m: nn.Module, side: Side) -> Sequence[tuple[torch.Tensor, int]]:
        return ((m.weight, 1),) if side is Side.OUT else ()  # type: ignore[return-value]

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        kout = keep.resolve(Side.OUT, int(m.embedding_dim))  # type: ignore[arg-type]
        new = sliced_copy(narrow(m, nn.Embedding), ("weight",), 1, kout)
        new.embedding_dim = len(kout)
        return finish(new, m)
