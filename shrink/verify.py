"""The masked oracle: a pruned model must equal the original with dropped channels zeroed.

For every channel-separable path (convs and linears are linear in their input channels; BN in
eval, element-wise ops, residual adds, concat/split and flatten only move channels), physical
pruning equals running the *original* model with the dropped channels zeroed where they are
consumed: at the input of every layer whose IN axis loses them. The dropped channels are still
computed, but nothing reads them. ``verify`` checks exactly that, in the model's own dtype.

Cost. The two models run as copies that share the weights their layers only read
(:func:`~shrink.modcopy.shared_copy`), the dense model's MACs and shapes come from the shape
probe's meta run when :func:`shrink.prune` passes it, and an image model is compared on two
half-resolution views of its input where it runs the same code there (:mod:`shrink.reduced`).
The pruned model's MACs at the example size then follow from the per-layer MACs of the two runs
(:func:`shrink.reduced.pruned_macs`), so :func:`shrink.prune` need not run the pruned model on
meta: this run shows that it fits, and a pruned model that does not run here is sent back to the
shape probe (``InvariantError``, see ``shrink.api._plan``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.utils import _pytree as pytree

from shrink.errors import InvariantError, VerificationError
from shrink.modcopy import copy_module, set_eval, shared_copy
from shrink.plan import Plan, Side
from shrink.reduced import (
    VIEWS,
    DenseRun,
    dense_run,
    describe,
    layer_macs,
    pruned_macs,
    recording_calls,
    reduced_inputs,
    signature,
)
from shrink.report import GroupRow, Report, count_macs, count_params
from shrink.rules import rule_for
from shrink.rules.base import ModuleRule

if TYPE_CHECKING:
    from shrink.probe import ShapeProbe


def masked_reference(original: nn.Module, plan: Plan, *, renormalize: bool = True) -> nn.Module:
    """A deep copy of ``original`` (eval mode) whose layers zero the inputs the plan drops.

    With ``renormalize`` (the oracle), layers that normalise over channels (LayerNorm) compute
    their statistics over the kept channels, as the pruned model does; without it they see the
    zeroed channels, which is the plainly masked original the inexact deviation is measured to.
    """
    return _mask(set_eval(copy_module(original)), plan, renormalize)


def _mask(ref: nn.Module, plan: Plan, renormalize: bool) -> nn.Module:
    modules = dict(ref.named_modules(remove_duplicate=False))
    for (fqn, side), dropped in plan.drops().items():
        if side.tensor_axis is not None or side is Side.ATTR:
            continue  # a tensor used in forward: its dropped entries are never read downstream
        mod = modules[fqn] if fqn in modules else ref.get_submodule(fqn)
        rule = rule_for(mod)
        if rule is None:
            raise VerificationError(
                f"plan prunes {fqn!r} ({type(mod).__name__}), which has no rule"
            )
        if renormalize or rule.exact_for(mod):
            rule.mask_(mod, side, dropped)
    return ref


def _shared_reference(original: nn.Module, plan: Plan, *, renormalize: bool = True) -> nn.Module:
    """:func:`masked_reference` on a :func:`~shrink.modcopy.shared_copy`: the masks are hooks on
    new module objects, so ``original``'s shared weights are only read; the layers whose rule
    masks by writing to weights (attention heads: :meth:`ModuleRule.mask_` overridden) get their
    own copies."""
    writes = set()
    modules = dict(original.named_modules(remove_duplicate=False))
    for (fqn, side) in plan.drops():
        if side.tensor_axis is None and side is not Side.ATTR:
            rule = rule_for(modules[fqn] if fqn in modules else original.get_submodule(fqn))
            if rule is not None and type(rule).mask_ is not ModuleRule.mask_:
                writes.add(fqn)
    return _mask(shared_copy(original, writes), plan, renormalize)


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
    parts: Sequence[str] = (),
    probe: ShapeProbe | None = None,
) -> Report:
    """Check ``pruned`` against the masked original and measure params and MACs.

    A model captured in parts (``parts``: their FQNs, ``Captured.parts.captured``) is checked
    part by part: every call of each part in the pruned model runs on the inputs the masked
    original gave that call, and must return its outputs. The whole model's outputs are compared
    too, but only reported: between parts runs code that was not captured, often data-dependent
    (top-k, NMS, score thresholds), where rounding can change which boxes are kept.

    An image model is checked first on two half-resolution views of its input (the even and
    the odd pixels), where its outputs, layers and torch calls are the same as on the example
    inputs (:mod:`shrink.reduced`); the example inputs decide otherwise.

    Args:
        original: the unpruned model (not modified).
        pruned: the model returned by :func:`shrink.apply`.
        plan: the plan that produced it.
        example_inputs: inputs to compare on.
        rtol: largest allowed ``max|pruned - masked| / max|masked|``.
        strict: raise when the error exceeds ``rtol``; otherwise only report it.
        parts: the module FQNs of a model captured in parts.
        probe: the shape probe that vetted ``plan`` (:func:`shrink.prune` passes its own):
            its meta runs give both models' MACs and the dense model's layer calls, so no meta
            run is needed here.

    Raises:
        VerificationError: when the error exceeds rtol: the numbers differ.
        InvariantError: when the pruned model fails to run or its outputs differ in structure
            or shape (its layers do not fit: see :mod:`shrink.probe`).

    Example:
        >>> print(shrink.verify(model, pruned, plan, (x,)))
    """
    versions = _versions(original, pruned)
    ref = _shared_reference(original, plan)
    test = shared_copy(pruned)
    dense = None if parts or probe is None else probe.dense_run()
    small = None if parts else reduced_inputs(example_inputs)
    check = None
    if small is not None:
        dense = dense or dense_run(original, example_inputs)
        check = _check_reduced(ref, test, small, dense, rtol)
    if check is None:
        check = _check(ref, test, example_inputs, parts)
        if not check.error <= rtol and check.dtype in ("float32", "float16", "bfloat16"):
            # Deep nets with large activations lose more than rtol to fp32 rounding alone; a
            # real mismatch stays O(1) in float64, rounding does not.
            check64 = _check(_to64(ref), _to64(test), _to64(example_inputs), parts)
            if check64.error <= rtol:
                check = dataclasses.replace(check64, dtype="float64")
    err, oracle_dtype = check.error, check.dtype
    inexact = [d.group for d in plan.decisions if not plan.group(d.group).exact]
    deviation = None
    if inexact:
        plain = _shared_reference(original, plan, renormalize=False)
        deviation = _check(plain, test, example_inputs, parts).error
    _check_untouched(versions, original, pruned)
    if strict and not err <= rtol:
        scale = max((float(t.detach().abs().max()) for t in _tensors(check.expected)
                     if t.is_floating_point() and t.numel()), default=0.0)
        hint = (
            f" The reference output reaches {scale:.1e}: activations that large (e.g. random "
            "weights with uncalibrated BatchNorm statistics) lose more than rtol to rounding "
            "even in float64; calibrate the model or raise rtol."
            if scale > 1e6 else " Unless forward uses a tensor's size as a number (`y * "
            "x.size(1)`, which the analysis cannot follow: pass ignore= for that layer), this "
            "is a shrink bug: please report it with the model."
        )
        where = f" (captured part {check.worst!r})" if check.worst else ""
        raise VerificationError(
            f"pruned model differs from the masked original{where}: max relative error "
            f"{err:.3e} > rtol {rtol:.1e} (checked in {oracle_dtype}).{hint} The model was not "
            "returned."
        )
    kept = {d.group: len(d.keep) for d in plan.decisions}
    rows = tuple(GroupRow(g.id, kept.get(g.id, g.size), g.size, g.pinned, g.exact)
                 for g in plan.groups)
    return Report(
        params_before=count_params(original),
        params_after=count_params(test),
        # the original, not the masked reference: the reference's renormalising attention for
        # inexact groups is not seen by the MAC counter (tiny ViT: 754k instead of 828k). In
        # parts, the plainly masked original: it takes the pruned model's data-dependent path
        # (the boxes NMS keeps decide a detector's ROI-head work), the original may not
        macs_before=dense.macs if dense is not None else count_macs(
            _shared_reference(original, plan, renormalize=False) if parts else original,
            example_inputs),
        macs_after=_pruned_macs(probe, plan, test, example_inputs, check),
        groups=rows,
        max_rel_error=err,
        oracle_dtype=oracle_dtype,
        oracle_input=check.input,
        diagnostics=() if not parts else (check.note(rtol),),
        deviation=deviation,
    )


@dataclass(frozen=True, slots=True)
class _Check:
    error: float  # the whole model's, or the worst part's for a model captured in parts
    dtype: str
    expected: Any  # the reference's outputs that ``error`` compares to
    worst: str | None = None  # the part with the largest error
    whole: float | None = None  # the whole model's error, for a model captured in parts
    whole_why: str = ""  # why the whole model's outputs cannot be compared
    input: str | None = None  # the reduced input compared on; None: the example inputs
    macs_after: int | None = None  # the pruned model's MACs at the example size, where known

    def note(self, rtol: float) -> str:
        checked = (f"each captured part equals its masked original on the masked original's "
                   f"inputs (max relative error {self.error:.1e}, {self.dtype})")
        if self.whole is not None and self.whole <= rtol:
            return f"{checked}; the whole model's outputs agree too ({self.whole:.1e})"
        why = self.whole_why or f"max relative error {self.whole:.1e}"
        return (
            f"{checked}. The whole model's outputs differ from the masked original's ({why}): "
            "they pass through code outside the captured parts, where data-dependent steps "
            "(top-k, NMS, score thresholds) can keep other elements after rounding differences"
        )


def _check_reduced(ref: nn.Module, test: nn.Module, small: tuple[torch.Tensor],
                   dense: DenseRun, rtol: float) -> _Check | None:
    """The check on the reduced input, when :mod:`shrink.reduced`'s conditions hold and it
    passes; None to check on the example inputs instead."""
    recording = recording_calls(ref)
    try:  # the layers' MAC hooks go on before the recording's (which wrap them)
        with layer_macs(ref) as ref_macs, layer_macs(test) as test_macs:
            check = _check(ref, test, small, (), around_ref=recording)
    except Exception:  # the model does not run at this size: the example inputs decide
        return None
    calls = recording.calls
    if tuple(calls) != dense.calls or signature(check.expected, VIEWS) != dense.outputs:
        return None
    if not check.error <= rtol:
        return None
    return dataclasses.replace(check, input=describe(small),
                               macs_after=pruned_macs(dense, ref_macs, test_macs))


def _pruned_macs(probe: ShapeProbe | None, plan: Plan, test: nn.Module,
                 inputs: tuple[Any, ...], check: _Check) -> int:
    """The pruned model's MACs on the example inputs, from the probe's run of it, else from the
    reduced check's layer counts (:func:`shrink.reduced.pruned_macs`), else counted."""
    counted = None if probe is None else probe.pruned_macs(plan)
    if counted is None:
        counted = check.macs_after
    return counted if counted is not None else count_macs(test, inputs)


def _check(ref: nn.Module, test: nn.Module, inputs: tuple[Any, ...],
           parts: Sequence[str],
           around_ref: AbstractContextManager[Any] | None = None) -> _Check:
    """Run both models; compare the whole outputs or, with ``parts``, each part's calls.
    ``around_ref``: a context the reference's run alone runs in."""
    calls: dict[str, list[tuple[Any, Any, Any]]] = {p: [] for p in parts}
    handles = [h for p in parts for h in _recorder(ref.get_submodule(p), calls[p])]
    try:
        with torch.no_grad(), around_ref or contextlib.nullcontext():
            expected = ref(*inputs)
    finally:
        for h in handles:
            h.remove()
    with torch.no_grad():
        try:
            actual = test(*inputs)
            outs = {p: [test.get_submodule(p)(*a, **k) for a, k, _ in calls[p]] for p in parts}
        except (RuntimeError, IndexError, ValueError) as e:
            raise InvariantError(
                f"the pruned model fails on the example inputs ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}): its layers do not fit together. "
                f"{_NOT_PROBED}"
            ) from e
    if not parts:
        _check_structure(actual, expected)
        return _Check(relative_error(actual, expected), _dtype_name(actual), expected)
    for p in parts:
        for out, (_a, _k, ref_out) in zip(outs[p], calls[p], strict=True):
            _check_structure(out, ref_out)
    errors = {p: max((relative_error(o, c[2]) for o, c in zip(outs[p], calls[p], strict=True)),
                     default=0.0) for p in parts}
    worst = max(errors, key=lambda p: errors[p]) if errors else None
    try:  # after the parts, data-dependent code may keep other boxes: not an error
        whole, why = relative_error(actual, expected), ""
    except VerificationError as e:
        whole, why = None, str(e)
    return _Check(max(errors.values(), default=0.0), _dtype_name(actual),
                  [c[2] for p in parts for c in calls[p]], worst, whole, why)


def _recorder(part: nn.Module, calls: list[tuple[Any, Any, Any]]) -> list[Any]:
    """Hooks that append ``(args, kwargs, output)`` of each call of ``part``, cloned (later
    in-place ops must not change them)."""
    def clone(v: Any) -> Any:
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, v)

    def pre(_m: nn.Module, args: Any, kwargs: Any) -> None:
        calls.append((clone(args), clone(kwargs), None))

    def post(_m: nn.Module, _args: Any, out: Any) -> None:
        a, k, _ = calls[-1]
        calls[-1] = (a, k, clone(out))

    return [part.register_forward_pre_hook(pre, with_kwargs=True),
            part.register_forward_hook(post)]


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


def _to64(v: Any) -> Any:
    """A float64 CPU copy of a model, or of inputs (floating tensors only)."""
    if isinstance(v, nn.Module):
        memo: dict[int, Any] = {}
        for t in itertools.chain(v.parameters(), v.buffers()):
            if id(t) not in memo:
                c = _to64(t) if t.is_floating_point() else t.detach().to("cpu").clone()
                memo[id(t)] = nn.Parameter(c, t.requires_grad) if isinstance(
                    t, nn.Parameter) else c
        return copy_module(v, memo)
    if isinstance(v, torch.Tensor) and v.is_floating_point():
        return v.detach().to("cpu", torch.float64)
    if isinstance(v, (tuple, list)):
        return type(v)(_to64(i) for i in v)
    if isinstance(v, dict):
        return {k: _to64(i) for k, i in v.items()}
    return v


def _versions(*models: nn.Module) -> list[tuple[torch.Tensor, int]]:
    return [(t, t._version) for m in models for mod in m.modules()
            for t in itertools.chain(mod._parameters.values(), mod._buffers.values())
            if t is not None]


def _check_untouched(versions: list[tuple[torch.Tensor, int]], *models: nn.Module) -> None:
    """The oracle's copies share with the caller's models the tensors of layers whose forward
    only reads them (:func:`~shrink.modcopy.shared_copy`); should a forward write one anyway
    (a hook added since, a torch that changed), it is reported, never passed over."""
    written = {id(t) for t, version in versions if t._version != version}
    if not written:
        return
    for m in models:
        for name, t in itertools.chain(m.named_parameters(), m.named_buffers()):
            if id(t) in written:
                raise InvariantError(
                    f"the forward pass wrote to tensor {name!r} of {type(m).__name__} in "
                    "place during verification, so the model has changed; verify a copy "
                    "(copy.deepcopy(model)) of a model whose forward updates its parameters"
                )
