"""From ``torch.nn.utils.prune`` masks to a physically smaller model.

``torch.nn.utils.prune`` multiplies weights by masks: the model is no smaller and no faster.
:func:`from_masks` folds the masks in (as ``prune.remove`` does, on a deep copy), finds the
channels that are dead, removes them with a :class:`~shrink.plan.Plan`, and checks the result.

When is a channel dead? By the masked-oracle principle (see :mod:`shrink.verify`), removing
channel ``c`` of a group equals running the folded model with ``c`` zeroed at the input of every
*reader* (an IN member: the conv/linear layers that consume the group). So removing ``c`` leaves
the model's function unchanged exactly when, at every reader ``r``, one of these holds:

* **r ignores c**: ``r``'s weights that read ``c`` are all zero (a ``dim=1`` mask on ``r``);
* **c arrives at r as zero**: every *writer* of ``c`` (the conv/linear layers that produce the
  group; depthwise convs inside the group only carry it) has an all-zero filter for ``c``, and
  ``c`` is exactly 0 at ``r``'s input on every probe (the example inputs plus random draws).
  A writer's bias, a BatchNorm shift (``beta - gamma * mean / sqrt(var + eps)``) or an op with
  ``f(0) != 0`` (sigmoid, ``x + 1``) turns a masked filter into a nonzero *constant* channel,
  which the next layer reads: such a channel is not dead, and stays. (Folding the constant into
  the reader's bias is not exact for padded convolutions, so shrink does not.)

:attr:`Reconcile.ALL` (the default) removes exactly those channels: the result equals the masked
model on any input, up to float rounding, and :func:`from_masks` verifies it on the example
inputs and probes. :attr:`Reconcile.UNION` removes a channel as soon as any member's mask zeroes
it (a masked filter, masked input columns, a zero BatchNorm weight). That is what a user who
masked only output filters usually wants, but it is *not* the masked model: it equals the masked
model with those channels also zeroed at every reader. The report gives the measured deviation.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from shrink.analysis import Analysis, Diagnostic, analyze
from shrink.api import Result, infer_inputs
from shrink.capture import capture, normalize_inputs
from shrink.errors import ConfigError, VerificationError
from shrink.interop.dead_channels import (
    Reconcile,
    Weights,
    arrives_zero,
    dead_channels,
    keep_channels,
)
from shrink.interop.prune_masks import fold_masks
from shrink.plan import ChannelGroup, Decision, Plan, fingerprint
from shrink.probe import ShapeProbe, pin
from shrink.rewrite import apply
from shrink.verify import relative_error, verify

log = logging.getLogger(__name__)


def from_masks(
    model: nn.Module,
    example_inputs: Any = None,
    *,
    policy: Reconcile | str = Reconcile.ALL,
    rtol: float = 1e-5,
    probes: int = 2,
    seed: int = 0,
    ignore: Sequence[str | type[nn.Module]] = (),
    leaf_types: Sequence[type[nn.Module]] = (),
) -> Result:
    """Turn ``torch.nn.utils.prune`` masks (or already-removed zeroed channels) into real speed.

    Args:
        model: a model carrying prune reparametrizations (``weight_orig``, ``weight_mask`` and
            their hooks), or with masks already folded in by ``prune.remove``. Not modified.
        example_inputs: a tensor or tuple of inputs; inferred for image models when omitted.
        policy: :attr:`Reconcile.ALL` (``"all"``, default: only channels that provably
            contribute nothing go, so the result equals the masked model) or
            :attr:`Reconcile.UNION` (``"union"``: a channel goes when any member's mask zeroes
            it; the result then differs from the masked model, by the reported error).
        rtol: tolerance of the equality check against the masked model.
        probes: random inputs (besides ``example_inputs``) on which dead channels must arrive
            at every reader as exactly zero.
        seed: seed of those random inputs.
        ignore: module names, globs or types whose channels stay.
        leaf_types: module types to keep opaque during capture.

    Returns:
        :class:`~shrink.Result`: the smaller model (same mode, dtype and device as ``model``,
        plain parameters, no pruning hooks), its plan (made for the *folded* model, i.e. the
        original architecture: it applies to a freshly built one, see :func:`shrink.save`),
        the analysis, and a report whose ``diagnostics`` say what stayed and why (``"nothing
        structural to remove"`` when the masks zero no whole channel).

    Raises:
        ConfigError: bad policy or options. CaptureError: untraceable model or bad inputs.
        VerificationError: the result does not equal the masked model (a shrink bug).

    Example:
        >>> prune.ln_structured(model.conv1, "weight", amount=0.5, n=2, dim=0)
        >>> small = shrink.from_masks(model, (x,)).model
    """
    policy = _policy(policy)
    if isinstance(probes, bool) or not isinstance(probes, int) or probes < 0:
        raise ConfigError(f"probes must be an int >= 0, got {probes!r}")
    folded = fold_masks(model)
    inputs = normalize_inputs(infer_inputs(folded) if example_inputs is None else example_inputs)
    # masks zero channels one by one, so grouped convs lose channels inside their groups; the
    # result must equal the masked model, so channels a LayerNorm normalises stay (exact_only)
    analysis = analyze(capture(folded, inputs, leaf_types=leaf_types), ignore=ignore,
                       grouped_convs="channels", exact_only=True)
    probe_inputs = [inputs, *_random_like(inputs, probes, seed)]
    weights = Weights(folded)
    zero_at = arrives_zero(folded, weights, analysis.groups, probe_inputs)
    decisions, notes = _decide(analysis.groups, weights, zero_at, policy)
    groups = analysis.groups
    # dead channels whose count forward reads as a size (x.view(b, c // 2, -1)) stay
    unfit = ShapeProbe(folded, inputs).culprits(
        Plan(model=fingerprint(folded), groups=groups, decisions=tuple(decisions))
    ) if decisions else {}
    if unfit:
        groups = pin(groups, unfit)
        decisions = [d for d in decisions if d.group not in unfit]
        notes.extend(f"kept the dead channels of {gid}: {why}" for gid, why in unfit.items())
        analysis = Analysis(analysis.model, groups, (*analysis.diagnostics, *(
            Diagnostic("pinned", f"{gid}: {why}") for gid, why in unfit.items())),
            frontend=analysis.frontend)
    plan = Plan(model=fingerprint(folded), groups=groups, decisions=tuple(decisions))
    if not decisions:
        notes.insert(0, "nothing structural to remove: the masks zero no whole channel of a "
                        "prunable group (unstructured masks such as global_unstructured keep "
                        "every channel); returning the folded model unchanged")
    pruned = apply(folded, plan)
    report = verify(folded, pruned, plan, inputs, rtol=rtol, strict=True)
    deviation = 0.0 if not decisions else max(
        _deviation(folded, pruned, x) for x in (inputs, probe_inputs[-1]))
    if policy is Reconcile.ALL and not deviation <= rtol:
        raise VerificationError(
            f"from_masks: the pruned model differs from the masked model by max relative error "
            f"{deviation:.3e} > rtol {rtol:.1e} although every removed channel was proven dead. "
            "This is a shrink bug: please report it with the model."
        )
    if policy is Reconcile.UNION:
        notes.append(f"policy 'union': the result differs from the masked model by max relative "
                     f"error {deviation:.3e} (channels some layer still read were removed)")
    for note in notes:
        log.info("from_masks: %s", note)
    report = dataclasses.replace(report, diagnostics=(*report.diagnostics, *notes))
    return Result(pruned, plan, analysis, report)


def _decide(
    groups: Sequence[ChannelGroup], weights: Weights, zero_at: dict[str, torch.Tensor],
    policy: Reconcile,
) -> tuple[list[Decision], list[str]]:
    """One decision per group with dead channels, and a note per group where masks stay."""
    decisions: list[Decision] = []
    notes: list[str] = []
    for g in groups:
        dead, why = dead_channels(g, weights, zero_at, policy)
        if why:
            notes.append(f"{g.id}: {why}")
        if not dead:
            continue
        if g.pinned is not None or g.size < 2:
            notes.append(f"{g.id}: {len(dead)} dead channel(s) stay: the group is pinned "
                         f"({g.pinned or 'a single channel'})")
            continue
        keep, note = keep_channels(g, dead)
        if note:
            notes.append(f"{g.id}: {note}")
        if len(keep) < g.size:
            decisions.append(Decision(g.id, keep))
    return decisions, notes


def _policy(policy: Reconcile | str) -> Reconcile:
    if isinstance(policy, Reconcile):
        return policy
    try:
        return Reconcile(policy)
    except ValueError:
        raise ConfigError(
            f"policy={policy!r} is unknown: use 'all' (only channels that provably contribute "
            "nothing; equals the masked model) or 'union' (any member's mask removes a channel)"
        ) from None


def _random_like(inputs: tuple[Any, ...], n: int, seed: int) -> list[tuple[Any, ...]]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for k in range(n):
        scale = 3.0 ** k
        out.append(tuple(
            (torch.randn(x.shape, generator=gen, dtype=torch.float64) * scale).to(x)
            if isinstance(x, torch.Tensor) and x.is_floating_point() else x
            for x in inputs
        ))
    return out


def _deviation(folded: nn.Module, pruned: nn.Module, inputs: tuple[Any, ...]) -> float:
    """max relative output difference; in float64 for half-precision models, whose rounding
    (summation order changes with the channel count) would otherwise hide the comparison."""
    if any(p.dtype in (torch.float16, torch.bfloat16) for p in folded.parameters()):
        folded = copy.deepcopy(folded).to(torch.float64)
        pruned = copy.deepcopy(pruned).to(torch.float64)
        inputs = tuple(x.to(torch.float64) if isinstance(x, torch.Tensor)
                       and x.is_floating_point() else x for x in inputs)
    modes = [(m, m.training) for m in (*folded.modules(), *pruned.modules())]
    try:
        folded.eval()
        pruned.eval()
        with torch.no_grad():
            return relative_error(pruned(*inputs), folded(*inputs))
    finally:
        for m, mode in modes:
            m.training = mode


