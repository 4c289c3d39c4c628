"""Element-wise ops: activations, dropout, identity, casts, and binary ops with broadcasting.

A unary element-wise op keeps every element's channel: its output carries its input's ids.
A binary op (add, sub, mul, div, ...) combines the elements that meet after broadcasting, so
their ids are unioned: a residual add ties both branches' channels, a squeeze-excitation
``x * gate`` ties the gate's channels to ``x``'s. A scalar, or a tensor of one element, meets
every channel equally and carries no channel identity (id -1).
"""

from __future__ import annotations

import operator
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from shrink.ids import Call, Ids, Tracker, compress
from shrink.rules.base import ModuleRule
from shrink.rules.registry import register_function, register_rule

_UNARY_MODULES = (
    nn.ReLU, nn.ReLU6, nn.SiLU, nn.GELU, nn.Hardswish, nn.Hardsigmoid, nn.Sigmoid, nn.Tanh,
    nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Mish, nn.Softplus, nn.Hardtanh, nn.Tanhshrink,
    nn.Softsign, nn.LogSigmoid, nn.Threshold, nn.Identity, nn.Dropout, nn.Dropout1d,
    nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout,
)

_UNARY_FUNCTIONS: tuple[Any, ...] = (
    F.relu, F.relu_, F.relu6, F.silu, F.gelu, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh,
    F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.softplus, F.hardtanh, F.dropout, F.dropout1d,
    F.dropout2d, F.dropout3d, F.alpha_dropout, F.feature_alpha_dropout, F.logsigmoid,
    torch.relu, torch.relu_, torch.sigmoid, torch.tanh, torch.exp, torch.log, torch.sqrt,
    torch.rsqrt, torch.abs, torch.neg, torch.clamp, torch.clip, torch.square, torch.erf,
    torch.nn.functional.hardtanh_, torch.nn.functional.elu_, torch.nn.functional.leaky_relu_,
    torch.clone, torch.detach, torch.nan_to_num, torch.reciprocal, operator.neg, operator.pos,
    "relu", "relu_", "relu6", "sigmoid", "sigmoid_", "tanh", "tanh_", "exp", "log", "sqrt",
    "rsqrt", "abs", "neg", "clamp", "clamp_", "clamp_min", "clamp_min_", "clamp_max", "clip",
    "square", "erf", "contiguous", "clone", "detach", "float", "half", "double", "bfloat16",
    "to", "type", "type_as", "requires_grad_", "nan_to_num", "reciprocal", "hardswish",
    "hardsigmoid", "silu", "gelu", "sign", "exp_", "floor", "ceil", "round",
    # torchvision's StochasticDepth scales whole samples (identity in eval): channel-preserving
    "torchvision.ops.stochastic_depth.stochastic_depth",
)

_BINARY: tuple[Any, ...] = (
    operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
    operator.imul, operator.itruediv, operator.pow, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum, torch.pow, torch.true_divide, torch.multiply, torch.subtract,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum", "pow",
    "pow_", "true_divide", "multiply",
)


@register_function(*_UNARY_FUNCTIONS)
def unary(t: Tracker, call: Call) -> Any:
    x = call.args[0]
    if isinstance(x, Ids):
        return x
    return broadcast(t, call)


@register_rule(*_UNARY_MODULES)
class ElementwiseModuleRule(ModuleRule):
    def propagate(self, t: Tracker, fqn: str, m: nn.Module, call: Call) -> Any:
        return call.args[0]


@register_function(*_BINARY, torch.where, "where", torch.lerp, "lerp", torch.addcmul, "addcmul")
def broadcast(t: Tracker, call: Call) -> Any:
    """Union the ids of all tensor operands at every broadcast position."""
    operands = [a for a in list(call.args) + list(call.kwargs.values()) if isinstance(a, Ids)]
    if not operands:
        return call.out  # arithmetic on sizes
    shape = tuple(call.out.shape)
    arrays = [_align(a, len(shape)) for a in operands]
    out = np.broadcast_arrays(*arrays)[0].copy()
    for arr in arrays[1:]:
        t.union(out, arr)
        b = np.broadcast_to(arr, out.shape) if arr.ndim == out.ndim else arr
        out = np.where(out >= 0, out, b)
    return Ids(compress(out), shape)


def _align(ids: Ids, ndim: int) -> np.ndarray:
    a = ids.a
    if a.size == 1 and int(np.prod(ids.shape)) == 1:
        a = np.full_like(a, -1)  # a one-element tensor meets every channel equally
    return a.reshape((1,) * (ndim - a.ndim) + a.shape)
