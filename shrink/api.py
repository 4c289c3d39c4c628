"""The user's entry points: :func:`compress` (one call) and :func:`prune` (returns the plan too)."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from shrink.allocate import solve_target
from shrink.analysis import Analysis, Diagnostic, analyze
from shrink.capture import Captured, capture, normalize_inputs
from shrink.capture_parts import part_calls
from shrink.config import PruneConfig, option_names
from shrink.criteria.weight import score
from shrink.depth import DepthResult, remove_layers
from shrink.errors import CaptureError, ConfigError, InvariantError
from shrink.interop import hf
from shrink.latency import LatencyTarget, solve_latency
from shrink.plan import Plan, fingerprint
from shrink.probe import ShapeProbe, pin
from shrink.progress import stage
from shrink.report import LatencyReport, Report, count_macs, count_params
from shrink.rewrite import apply, apply_unchecked
from shrink.rules import rule_for
from shrink.select import Global, Policy, Target, Uniform, select
from shrink.verify import verify as verify_

log = logging.getLogger(__name__)


class Result(NamedTuple):
    """What :func:`prune` returns: the pruned model, its plan, the analysis and the report."""

    model: nn.Module
    plan: Plan
    analysis: Analysis
    report: Report | None


def infer_inputs(model: nn.Module) -> tuple[torch.Tensor, ...]:
    """A random example input built from the model's first leaf layer with parameters.

    The layer's rule says what input it takes (``ModuleRule.example_input_shape``): a conv gives
    ``(1, in_channels, 224, 224)`` (1-D: 1024, 3-D: 16x112x112), a linear ``(1, in_features)``.

    Raises:
        ConfigError: when that layer has no such rule (pass ``example_inputs``).
    """
    for _fqn, m in model.named_modules():
        params = list(m.parameters(recurse=False))
        if not params or next(m.children(), None) is not None:
            continue  # containers may own tensors (a ViT's class token); layers are leaves
        rule = rule_for(m)
        shape = None if rule is None else rule.example_input_shape(m)
        if shape is None:
            break
        return (torch.randn(shape, dtype=params[0].dtype, device=params[0].device),)
    raise ConfigError(
        f"cannot infer an example input for {type(model).__name__}: it does not start with a "
        "Conv or Linear layer. Pass example_inputs=(tensor, ...) with the shapes the model takes."
    )


def prune(model: nn.Module, example_inputs: Any, config: PruneConfig) -> Result:
    """capture → analyze → score → select → probe → apply → verify, returning every artefact.

    The shape probe (:mod:`shrink.probe`) runs the pruned architecture on the meta device
    before anything real is built; groups whose pruning breaks a shape (a size computed in
    forward from a tensor's shape) are pinned with the reason, and the plan is made again.
    The caller's model is never modified.

    With ``config.depth``, whole blocks are removed first (:func:`shrink.remove_layers`, checked
    against its own oracle) and the channels of the result are pruned only when ``ratio`` or
    ``amount`` is given; without them the plan is empty and nothing is captured. The report
    and the analysis carry the depth step as a note, and the report's "before" columns are the
    original model's. The plan describes only the channel step (on the depth-pruned model), so
    :func:`shrink.load` cannot rebuild such a model from the original architecture: save a
    Hugging Face model with ``save_pretrained``, or run ``remove_layers`` again before loading.

    Example:
        >>> res = shrink.prune(model, (x,), shrink.PruneConfig(0.3, norm=1))
        >>> print(res.report)
    """
    inputs = normalize_inputs(example_inputs)
    if config.depth is None:
        return _prune_width(model, inputs, config)
    with stage("depth"):
        depth = remove_layers(model, config.depth, data=config.data, example_inputs=inputs,
                              max_batches=config.max_batches, verify=config.verify,
                              rtol=config.rtol)
    note = Diagnostic("note", depth.describe())
    log.info("shrink: %s", note.message)
    if config.ratio is None and config.amount is None:
        return _depth_only(model, inputs, depth, note, config.verify)
    res = _prune_width(depth.model, inputs, config)
    analysis = Analysis(res.analysis.model, res.analysis.groups,
                        (note, *res.analysis.diagnostics), frontend=res.analysis.frontend)
    report = res.report
    if report is not None:
        report = dataclasses.replace(
            report, params_before=count_params(model), macs_before=count_macs(model, inputs),
            diagnostics=(note.message, *report.diagnostics))
    return Result(res.model, res.plan, analysis, report)


def _depth_only(model: nn.Module, inputs: tuple[Any, ...], depth: DepthResult,
                note: Diagnostic, with_report: bool) -> Result:
    """The result of depth pruning alone: an empty plan for the depth-pruned model."""
    fp = fingerprint(depth.model)
    report = None
    if with_report:
        dtype = next((str(p.dtype).replace("torch.", "") for p in model.parameters()
                      if p.is_floating_point()), None)
        report = Report(count_params(model), count_params(depth.model),
                        count_macs(model, inputs), count_macs(depth.model, inputs),
                        max_rel_error=depth.max_rel_error, oracle_dtype=dtype,
                        diagnostics=(note.message,))
    return Result(depth.model, Plan(fp, (), ()), Analysis(fp, (), (note,), frontend="none"),
                  report)


def _prune_width(model: nn.Module, inputs: tuple[Any, ...], config: PruneConfig) -> Result:
    captured, analysis = _capture_and_analyze(model, inputs, config, config.capture)
    with stage("score"):
        scores = score(analysis.groups, model, config.criterion)
    analyzed = analysis
    plan, analysis, latency, probe, built, unprobed = _plan(
        model, inputs, analyzed, scores, config.policy, captured, defer_fit=config.verify)
    with stage("apply"):
        pruned = apply(model, plan) if built is None else built
    report = None
    if config.verify:
        parts = () if captured.parts is None else captured.parts.captured
        with stage("verify"):
            try:
                report = verify_(model, pruned, plan, inputs, rtol=config.rtol, parts=parts,
                                 probe=probe)
            except InvariantError:
                if not unprobed:
                    raise
                # the pruned model does not fit: the probe finds the groups to pin
                log.info("shrink: the unprobed plan does not run; probing it")
                plan, analysis, latency, probe, built, _ = _plan(
                    model, inputs, analyzed, scores, config.policy, captured,
                    defer_fit=False)
                pruned = apply(model, plan) if built is None else built
                report = verify_(model, pruned, plan, inputs, rtol=config.rtol, parts=parts,
                                 probe=probe)
        note = pruned.__dict__.get(hf.NOTE_ATTR)
        if note:
            report = dataclasses.replace(report, diagnostics=(note, *report.diagnostics))
        if captured.parts is not None:
            report = dataclasses.replace(report, diagnostics=(
                f"partial capture: {captured.parts.describe()}", *report.diagnostics))
        if latency is not None:
            report = dataclasses.replace(report, latency=latency)
        log.info("shrink: %s", report)
    return Result(pruned, plan, analysis, report)


def _plan(model: nn.Module, inputs: tuple[Any, ...], analysis: Analysis,
          scores: Mapping[str, torch.Tensor], policy: Policy | LatencyTarget,
          captured: Captured, *, defer_fit: bool = False
          ) -> tuple[Plan, Analysis, LatencyReport | None, ShapeProbe, nn.Module | None, bool]:
    """select, then the shape probe: pin the groups whose pruning breaks a shape and select
    again (the budget goes to the other groups), until the pruned architecture fits. A model
    captured in parts is probed part by part, on each part's recorded inputs.

    Returns the plan, the analysis with the probe's pins (and a diagnostic for each, and one
    for the latency target's outcome), the latency report of a latency target, the probe
    (whose runs tell verify the MACs and the dense model's layer calls), and the pruned model
    when the first plan fitted (it was built for the probe to check), else None.

    ``defer_fit`` (the caller verifies the result): the first plan, once built, is not run on
    meta to see that it fits. The oracle runs the pruned model anyway (:func:`shrink.verify`,
    on the reduced input or the example inputs, with the same layer calls as the dense model at
    the example size), and its run tells the same: the last value returned is True, and should
    the oracle find that the pruned model does not run or returns other shapes
    (:class:`~shrink.errors.InvariantError`), the caller plans again without deferring. Not for
    a model captured in parts, or a latency target (its plan is measured, not only built).
    """
    parts = () if captured.parts is None else part_calls(captured.graph_modules,
                                                          captured.graph_inputs)
    # the meta copy torch.fx traced: only read since, so the probe need not make another
    traced = getattr(captured.graph_module, "_shrink_source", None) if (
        captured.on_meta and captured.frontend == "fx") else None
    probe = ShapeProbe(model, inputs, parts,
                       base=traced if isinstance(traced, nn.Module) else None)
    groups = analysis.groups
    pinned: dict[str, str] = {}
    latency: list[LatencyReport] = []
    losses: dict[Any, float] = {}   # valuation='loss': measured once, kept across re-solves

    def make_plan() -> Plan:  # a target is solved over the current groups
        if isinstance(policy, LatencyTarget):
            sol = solve_latency(model, inputs, groups, scores, policy, analysis.model,
                                memo=losses)
            latency.append(sol.report)
            return sol.plan
        return select(groups, scores, concrete(), analysis.model)

    def concrete() -> Uniform | Global:
        if isinstance(policy, Target):
            return solve_target(model, inputs, groups, scores, policy, analysis.model).policy
        assert not isinstance(policy, LatencyTarget)
        return policy

    def vet() -> None:  # solving measures many trial plans: vet every group first
        nonlocal groups
        pinned.update(probe.culprits(select(groups, scores, Uniform(0.5), analysis.model)))
        groups = pin(groups, pinned)

    if isinstance(policy, LatencyTarget):
        with stage("solve target"):
            vet()
            plan = make_plan()
    else:
        chosen: Policy = policy
        if isinstance(policy, Target):
            with stage("solve target"):
                vet()
                chosen = concrete()
        with stage("select"):
            plan = select(groups, scores, chosen, analysis.model)
    with stage("probe"):
        built = _build(model, plan, oracle=defer_fit) if probe.on_meta else None
        unprobed = (defer_fit and built is not None and not parts
                    and not isinstance(policy, LatencyTarget))
        if built is None or not (unprobed or probe.fits(plan, built)):
            unprobed = False
            built = None
            while found := probe.culprits(plan):
                pinned.update(found)
                groups = pin(groups, found)
                plan = make_plan()
    notes = tuple(Diagnostic("pinned", f"{gid}: {why}") for gid, why in pinned.items())
    if latency:
        report = latency[-1]
        notes += (Diagnostic("note" if report.converged else "warning", str(report)),)
    if notes:
        analysis = Analysis(analysis.model, groups, (*analysis.diagnostics, *notes),
                            frontend=analysis.frontend)
    return plan, analysis, latency[-1] if latency else None, probe, built, unprobed


def _build(model: nn.Module, plan: Plan, *, oracle: bool = False) -> nn.Module | None:
    """``apply(model, plan)``, built before the shape probe has passed the plan so that the
    probe can check it (:meth:`ShapeProbe.fits`) instead of applying the plan to a meta copy
    too; None when it cannot be built (the probe then finds what breaks, and the apply stage
    raises what it raised) or for a Hugging Face model, whose config the real apply settles
    and the probe's meta apply does not. ``oracle``: the oracle will run the result, so the
    plan (made from ``model`` in this call) is not checked against it first
    (:func:`shrink.rewrite.apply_unchecked`)."""
    if hf.is_hf(model):
        return None
    try:
        return apply_unchecked(model, plan) if oracle else apply(model, plan)
    except Exception:  # the probe and the apply stage report it, as without this step
        return None


def _capture_and_analyze(model: nn.Module, inputs: tuple[Any, ...], config: PruneConfig,
                         frontend: str) -> tuple[Captured, Analysis]:
    """Capture and analyze. With ``capture="auto"``, a model that fx traces but whose fx graph
    cannot run (torchvision's swin3d mutates a list fx made immutable) is captured again with
    torch.export; the fx error is raised when export cannot run it either."""
    with stage("capture"):
        captured = capture(model, inputs, leaf_types=config.leaf_types, on_meta=True,
                           frontend=frontend)
    used = getattr(captured.graph_module, "_shrink_frontend", "fx")
    try:
        with stage("analyze"):
            return captured, analyze(captured, ignore=config.ignore, source=model,
                                     grouped_convs=config.grouped_convs, gqa=config.gqa,
                                     exact_only=config.exact_only)
    except CaptureError as fx_error:
        if frontend != "auto" or used != "fx":
            raise
        log.info("shrink: the fx graph of %s failed (%s); retrying with torch.export",
                 type(model).__name__, str(fx_error).splitlines()[0])
        try:
            return _capture_and_analyze(model, inputs, config, "export")
        except CaptureError:
            raise fx_error from None


def compress(
    model: nn.Module,
    ratio: float | None = None,
    example_inputs: Any = None,
    **options: Any,
) -> nn.Module:
    """Return a new, physically smaller copy of ``model``.

    ``compress(model, ratio, x, **options)`` is ``prune(model, x, PruneConfig(ratio,
    **options)).model``: the options are the fields of :class:`~shrink.config.PruneConfig`,
    with the same names and defaults.

    Args:
        model: any traceable ``nn.Module``; it is never modified.
        ratio: fraction removed, in [0, 1): of every prunable group's channels, of the
            model's MACs/parameters with ``target="macs"``/``"params"``, or of its measured
            latency with ``target="latency"``. An int is refused:
            to remove N channels from every group pass ``amount=N``.
        example_inputs: a tensor or tuple of inputs; inferred for image models when omitted
            (required with ``target="latency"``: their shape is what is timed).
        **options: any field of :class:`~shrink.config.PruneConfig`: ``amount``, ``norm``
            (1, 2 or inf; default 2), ``importance`` ('ln', 'random', 'bn_scale', 'taylor',
            'activation_weighted' (or 'wanda'), 'activation', {module: scores} or a callable),
            ``data``, ``loss_fn``,
            ``max_batches``, ``seed``, ``scope`` ('local' or 'global'), ``target``
            ('channels', 'macs', 'params' or 'latency', with ``runtime``, ``threads`` and
            ``batch``), ``overrides`` ({name or glob: ratio}),
            ``ignore``, ``round_to`` (default ``"auto"``), ``min_keep``, ``max_ratio``,
            ``min_ratio``, ``exact_only``, ``grouped_convs``, ``gqa`` ('groups' or
            'query'), ``verify`` (default True), ``rtol``, ``leaf_types``, ``capture``
            (``"auto"``, ``"fx"`` or ``"export"``), ``depth`` (whole layers removed from
            every stack of blocks first: a count or a fraction; with ``ratio=None`` only
            layers go).

    Returns:
        The pruned model, in the same mode, dtype and device as ``model``. It remembers the
        plan that made it, so ``shrink.save(small, "small.safetensors")`` works directly.

    Raises:
        ConfigError: bad ratio or options. CaptureError: untraceable model or bad inputs.
        VerificationError: the pruned model is not equivalent (never returned silently wrong).

    Example:
        >>> small = shrink.compress(torchvision.models.resnet50(), 0.5)
        >>> shrink.save(small, "resnet50-half.safetensors")
    """
    unknown = sorted(set(options) - set(option_names()))
    if unknown:
        raise ConfigError(
            f"unknown option(s) {unknown}; valid options are {list(option_names())}"
        )
    config = PruneConfig(ratio, **options)
    if example_inputs is None and config.target == "latency":
        raise ConfigError(
            "target='latency' times the model on its example inputs, so their shape must be "
            "the one you deploy: pass example_inputs, e.g. compress(model, 0.5, "
            "(torch.randn(1, 3, 224, 224),), target='latency')")
    inputs = infer_inputs(model) if example_inputs is None else example_inputs
    return prune(model, inputs, config).model
