"""Linear: IN features on weight dim 1 (the input's last axis), OUT features on weight dim 0.

A Linear applies the same map at every leading position, so its output carries fresh ids along
the last axis and the same ids at every position (tokens, batch).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from torch import nn

from shrink.ids import Call, Tracker, channel_ids, ids_on_axis
from shrink.plan import Side
from shrink.rules.base import (
    Keep,
    LayerOp,
    ModuleRule,
    check_shape,
    finish,
    index,
    narrow,
    recast,
)
from shrink.rules.registry import register_rule, register_rule_by_name


@register_rule_by_name("timm.layers.linear.Linear")  # Linear with a dtype cast in forward
@register_rule(nn.Linear)
class LinearRule(ModuleRule):
    """``y = x W^T + b`` over the last axis. A layer of another storage (Hugging Face's
    transposed ``Conv1D``) subclasses it with its own attribute names and weight layout."""

    in_attr: ClassVar[str] = "in_features"
    out_attr: ClassVar[str] = "out_features"
    out_dim: ClassVar[int] = 0  # the weight's axis of output features (the other: inputs)

    def _size(self, m: nn.Module, side: Side) -> int:
        return int(getattr(m, self.in_attr if side is Side.IN else self.out_attr))

    def example_input_shape(self, m: nn.Module) -> tuple[int, ...] | None:
        return (1, self._size(m, Side.IN))

    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        x = call.args[0]
        t.member(fqn, Side.IN, channel_ids(t, x, -1))
        out_ids = t.fresh(self._size(m, Side.OUT), f"{fqn}:out")
        t.member(fqn, Side.OUT, out_ids)
        return ids_on_axis(out_ids, tuple(call.out.shape), -1)

    def extent(self, m: nn.Module, side: Side) -> int | None:
        return self._size(m, side)

    def score_params(self, m: nn.Module, side: Side) -> Sequence[tuple[torch.Tensor, int]]:
        dim = self.out_dim if side is Side.OUT else 1 - self.out_dim
        return ((m.weight, dim),)  # type: ignore[return-value]

    def input_weights(self, m: nn.Module) -> Sequence[tuple[torch.Tensor, int]]:
        return ((m.weight, 1 - self.out_dim),)  # type: ignore[return-value]

    def in_axis(self, m: nn.Module, ndim: int) -> int:
        return ndim - 1

    def layer_op(self, m: nn.Module, input_shape: tuple[int, ...]) -> LayerOp | None:
        if len(input_shape) < 2:
            return None
        return LayerOp("linear", self._size(m, Side.IN), self._size(m, Side.OUT),
                       spatial=tuple(int(d) for d in input_shape[1:-1]),
                       bias=getattr(m, "bias", None) is not None)

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        lin = narrow(m, nn.Linear)
        kin = keep.resolve(Side.IN, lin.in_features)
        kout = keep.resolve(Side.OUT, lin.out_features)
        w = index(index(lin.weight, 0, kout), 1, kin)
        tensors: dict[str, torch.Tensor | None] = {
                   "weight": check_shape(lin, "weight", w, (len(kout), len(kin))),
                   "bias": None if lin.bias is None else index(lin.bias, 0, kout)}
        new = recast(lin, (nn.Linear,), tensors, in_features=len(kin), out_features=len(kout))
        return finish(new, m)


@register_rule_by_name("transformers.pytorch_utils.Conv1D")
class TransposedLinearRule(LinearRule):
    """Hugging Face's ``Conv1D`` (GPT-2, GPT): a Linear whose weight is stored transposed,
    ``(in, out)``, with ``nx`` inputs and ``nf`` outputs. transformers is never imported: the
    rule is matched by name, and the rebuilt layer is a copy of the same class."""

    in_attr = "nx"
    out_attr = "nf"
    out_dim = 1

    def shrink(self, m: nn.Module, keep: Keep) -> nn.Module:
        weight, bias = m.weight, m.bias
        if not isinstance(weight, torch.Tensor) or not isinstance(bias, torch.Tensor):
            raise TypeError(f"{type(m).__name__} without a weight and bias tensor")
        kin = keep.resolve(Side.IN, int(m.nx))  # type: ignore[arg-type]
        kout = keep.resolve(Side.OUT, int(m.nf))  # type: ignore[arg-type]
        new = copy.copy(m)  # same class and attributes; fresh parameter tables below
        new._parameters = {}
        new._buffers = dict(m._buffers)
        new._modules = dict(m._modules)
        new.weight = nn.Parameter(index(index(weight.detach(), 0, kin), 1, kout).clone(),
                                  weight.requires_grad)
        new.bias = nn.Parameter(index(bias.detach(), 0, kout).clone(), bias.requires_grad)
        new.__dict__["nx"], new.__dict__["nf"] = len(kin), len(kout)
        return finish(new, m)
