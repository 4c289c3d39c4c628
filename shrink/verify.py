"""The masked oracle: a pruned model must equal the original with dropped channels zeroed.

For every channel-separable path (convs and linears are linear in their input channels; BN in
eval, element-wise ops, residual adds, concat/split and flatten only move channels), physical
pruning equals running the *original* model with the dropped channels zeroed where they are
consumed: at the input of every layer whose IN axis loses them. The dropped channels are still
computed, but nothing reads them. ``verify`` checks exactly that, in the model's own dtype.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from shrink.errors import InvariantError, VerificationError
from shrink.plan import Plan, Side
from shrink.report import GroupRow, Report, count_macs, count_params
from shrink.rules import rule_for


def masked_reference(original: nn.Module, plan: Plan, *, renormalize: bool = True) -> nn.Module:
    """A deep copy of ``original`` (eval mode) whose layers zero the inputs the plan drops.

    With ``renormalize`` (the oracle), layers that normalise over channels (LayerNorm) compute
    their statistics over the kept channels, as the pruned model does; without it they see the
    zeroed channels, which is the plainly masked original the inexact deviation is measured to.
    """
    ref = copy.deepcopy(original).eval()
    for (fqn, side), dropped in plan.drops().items():
        if side.tensor_axis is not None or side is Side.ATTR:
            continue  # a tensor used in forward: its dropped entries are never read downstream
        mod = ref.get_submodule(fqn)
        rule = rule_for(mod)
        if rule is None:
            raise VerificationError(
                f"plan prunes {fqn!r} ({type(mod).__name__}), which has no rule"
            )
        if renormalize or rule.exact_for(mod):
            rule.mask_(mod, side, dropped)
    return ref


def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (tuple, list)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for k in sorted(value, key=str):
            yield from _tensors(value[k])


def relative_error(actual: Any, expected: Any) -> float:
    """max |a - e| / max |e| over every output tensor (shapes must match)."""
    worst = 0.0
    acts, exps = list(_tensors(actual)), list(_tensors(expected))
    if len(acts) != len(exps):
        raise VerificationError(f"pruned model returns {len(acts)} tensors, original {len(exps)}")
    for a, e in zip(acts, exps, strict=False):
        if a.shape != e.shape:
            raise VerificationError(
                f"pruned model output has shape {tuple(a.shape)}, original {tuple(e.shape)}"
            )
        if not a.is_floating_point():
            worst = max(worst, float((a != e).any()))
            continue
        a64, e64 = a.double(), e.double()
        scale = float(e64.abs().max()) if e64.numel() else 0.0
        diff = float((a64 - e64).abs().max()) if e64.numel() else 0.0
        if diff != diff:  # NaN
            return float("inf")
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


def verify(
    original: nn.Module,
    pruned: nn.Module,
    plan: Plan,
    example_inputs: tuple[Any, ...],
    *,
    rtol: float = 1e-5,
    strict: bool = True,
) -> Report:
    """Check ``pruned`` against the masked original and measure params and MACs.

    Args:
        original: the unpruned model (not modified).
        pruned: the model returned by :func:`shrink.apply`.
        plan: the plan that produced it.
        example_inputs: inputs to compare on.
        rtol: largest allowed ``max|pruned - masked| / max|masked|``.
        strict: raise when the error exceeds ``rtol``; otherwise only report it.

    Raises:
        VerificationError: when the error exceeds rtol: the numbers differ.
        InvariantError: when the pruned model fails to run or its outputs differ in structure
            or shape (its layers do not fit: see :mod:`shrink.probe`).

    Example:
        >>> print(shrink.verify(model, pruned, plan, (x,)))
    """
    ref = masked_reference(original, plan)
    test = copy.deepcopy(pruned).eval()
    with torch.no_grad():
        expected = ref(*example_inputs)
        try:
            actual = test(*example_inputs)
        except (RuntimeError, IndexError, ValueError) as e:
            raise InvariantError(
                f"the pruned model fails on the example inputs ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}): its layers do not fit together. "
                f"{_NOT_PROBED}"
            ) from e
    _check_structure(actual, expected)
    err = relative_error(actual, expected)
    oracle_dtype = _dtype_name(actual)
    if not err <= rtol and oracle_dtype in ("float32", "float16", "bfloat16"):
        # Deep nets with large activations lose more than rtol to fp32 rounding alone; a real
        # mismatch stays O(1) in float64, rounding does not.
        err64 = _error_in_double(ref, test, example_inputs)
        if err64 <= rtol:
            err, oracle_dtype = err64, "float64"
    inexact = [d.group for d in plan.decisions if not plan.group(d.group).exact]
    deviation = None
    if inexact:
        with torch.no_grad():
            deviation = relative_error(actual, masked_reference(original, plan,
                                                                renormalize=False)(*example_inputs))
    if strict and not err <= rtol:
        scale = max((float(t.detach().abs().max()) for t in _tensors(expected)
                     if t.is_floating_point() and t.numel()), default=0.0)
        hint = (
            f" The reference output reaches {scale:.1e}: activations that large (e.g. random "
            "weights with uncalibrated BatchNorm statistics) lose more than rtol to rounding "
            "even in float64; calibrate the model or raise rtol."
            if scale > 1e6 else " Unless forward uses a tensor's size as a number (`y * "
            "x.size(1)`, which the analysis cannot follow: pass ignore= for that layer), this "
            "is a shrink bug: please report it with the model."
        )
        raise VerificationError(
            f"pruned model differs from the masked original: max relative error {err:.3e} > "
            f"rtol {rtol:.1e} (checked in {oracle_dtype}).{hint} The model was not returned."
        )
    kept = {d.group: len(d.keep) for d in plan.decisions}
    rows = tuple(GroupRow(g.id, kept.get(g.id, g.size), g.size, g.pinned, g.exact)
                 for g in plan.groups)
    return Report(
        params_before=count_params(original),
        params_after=count_params(test),
        # the original, not the masked reference: the reference's renormalising attention for
        # inexact groups is not seen by the MAC counter (tiny ViT: 754k instead of 828k)
        macs_before=count_macs(original, example_inputs),
        macs_after=count_macs(test, example_inputs),
        groups=rows,
        max_rel_error=err,
        oracle_dtype=oracle_dtype,
        deviation=deviation,
    )


_NOT_PROBED = (
    "shrink.prune runs every plan's architecture on meta first (the shape probe) and pins the "
    "groups that break a shape, so after shrink.prune this is a shrink bug: please report it "
    "with the model. A plan made by hand (shrink.select, then shrink.apply) is not probed: "
    "shrink.probe.ShapeProbe(model, inputs).culprits(plan) names the groups to pin (ignore=)."
)


def _check_structure(actual: Any, expected: Any) -> None:
    """Outputs of the same structure and shapes, or an InvariantError: that the layers fit is
    the shape probe's promise, not a numeric difference."""
    acts, exps = list(_tensors(actual)), list(_tensors(expected))
    shapes = [tuple(t.shape) for t in acts], [tuple(t.shape) for t in exps]
    if shapes[0] != shapes[1]:
        raise InvariantError(
            f"the pruned model returns outputs of shapes {shapes[0]}, the original "
            f"{shapes[1]}. {_NOT_PROBED}"
        )


def _dtype_name(value: Any) -> str:
    for t in _tensors(value):
        if t.is_floating_point():
            return str(t.dtype).replace("torch.", "")
    return "none"


def _error_in_double(ref: nn.Module, test: nn.Module, inputs: tuple[Any, ...]) -> float:
    def to64(v: Any) -> Any:
        if isinstance(v, torch.Tensor) and v.is_floating_point():
            return v.detach().to("cpu", torch.float64)
        if isinstance(v, (tuple, list)):
            return type(v)(to64(i) for i in v)
        if isinstance(v, dict):
            return {k: to64(i) for k, i in v.items()}
        return v

    ref64 = copy.deepcopy(ref).to("cpu", torch.float64)
    test64 = copy.deepcopy(test).to("cpu", torch.float64)
    with torch.no_grad():
        return relative_error(test64(*to64(inputs)), ref64(*to64(inputs)))
