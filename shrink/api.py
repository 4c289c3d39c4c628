"""The user's entry points: :func:`compress` (one call) and :func:`prune` (returns the plan too)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping
from typing import Any, NamedTuple

import torch
from torch import nn

from shrink.analysis import Analysis, analyze
from shrink.capture import capture, normalize_inputs
from shrink.config import PruneConfig, as_tuple
from shrink.criteria.data import Activation, Taylor
from shrink.criteria.weight import BNScale, Criterion, LnNorm, Random, UserScores, score
from shrink.errors import ConfigError
from shrink.plan import Plan
from shrink.progress import stage
from shrink.report import Report
from shrink.rewrite import apply
from shrink.rules import rule_for
from shrink.select import Global, Metric, Target, Uniform, select
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


def _criterion(importance: Any, norm: float, seed: int, options: Mapping[str, Any]) -> Criterion:
    data_options = {k: options[k] for k in ("data", "loss_fn", "max_batches") if k in options}
    if isinstance(importance, str):
        key = importance.lower()
        if key == "taylor":
            return Taylor(**data_options)
        if key in ("activation", "act"):
            data_options.pop("loss_fn", None)
            return Activation(**data_options)
        if key in ("ln", "l1", "l2", "linf", "magnitude"):
            p = {"l1": 1.0, "l2": 2.0, "linf": math.inf}.get(key, norm)
            if p not in (1, 2, math.inf):
                raise ConfigError(f"norm must be 1, 2 or inf (as in ln_structured), got {norm!r}")
            return LnNorm(float(p))
        if key == "random":
            return Random(seed)
        if key in ("bn", "bn_scale", "slimming"):
            return BNScale()
        raise ConfigError(
            f"importance={importance!r} is unknown. Use 'ln' (with norm=1, 2 or inf), 'random' "
            "(with seed=), 'bn_scale', 'taylor' (with data= and loss_fn=), 'activation' (with "
            "data=), a {module_name: scores} mapping, or a callable fn(group, modules) -> scores."
        )
    if isinstance(importance, Mapping) or callable(importance):
        if not isinstance(importance, Mapping) and hasattr(importance, "__dataclass_fields__"):
            return importance  # type: ignore[no-any-return]  # a Criterion instance
        return UserScores(importance)
    raise ConfigError(f"importance must be a string, mapping or callable, got {importance!r}")


_OPTIONS = ("norm", "importance", "seed", "scope", "ignore", "round_to", "verify", "min_keep",
            "max_ratio", "rtol", "leaf_types", "data", "loss_fn", "max_batches", "min_ratio",
            "overrides", "target", "grouped_convs", "exact_only")


def _overrides(value: Any) -> tuple[tuple[str, float | int], ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        return tuple((str(k), v) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return tuple(tuple(item) for item in value)  # type: ignore[misc]
    raise ConfigError(
        f"overrides must be a {{pattern: ratio}} dict, e.g. {{'layer4.*': 0.2}}; got {value!r}"
    )


def make_config(ratio: float | int, **options: Any) -> PruneConfig:
    """Build a :class:`PruneConfig` from :func:`compress`'s keyword options."""
    unknown = sorted(set(options) - set(_OPTIONS))
    if unknown:
        raise ConfigError(f"unknown option(s) {unknown}; valid options are {list(_OPTIONS)}")
    norm = options.get("norm", 2)
    if norm in ("inf", "fro"):
        norm = math.inf if norm == "inf" else 2
    criterion = _criterion(options.get("importance", "ln"), norm, int(options.get("seed", 0)),
                           options)
    if "data" in options and not isinstance(criterion, (Taylor, Activation)):
        raise ConfigError("data= is used only by importance='taylor' or 'activation'")
    target = options.get("target", "channels")
    if target not in ("channels", "macs", "params"):
        raise ConfigError(
            f"target must be 'channels' (ratio = fraction of channels removed per group), 'macs' "
            f"or 'params' (ratio = fraction of MACs/parameters removed); got {target!r}"
        )
    scope = options.get("scope", "local" if target == "channels" else "global")
    # "auto" rounds kept counts to onnxruntime-friendly multiples (select.auto_step); a MACs or
    # params target needs fine steps to be met, so it does not round unless asked to
    round_to = options.get("round_to", "auto" if target == "channels" else 1)
    min_keep = options.get("min_keep", 1)
    overrides = _overrides(options.get("overrides"))
    channel_ratio = 0.0 if target != "channels" else ratio
    if scope == "local":
        policy: Uniform | Global | Target = Uniform(channel_ratio, round_to=round_to,
                                                    min_keep=min_keep, overrides=overrides)
    elif scope == "global":
        policy = Global(channel_ratio, round_to=round_to, min_keep=min_keep,
                        max_ratio=options.get("max_ratio", 0.9),
                        min_ratio=options.get("min_ratio", 0.0), overrides=overrides)
    else:
        raise ConfigError(f"scope must be 'local' or 'global', got {scope!r}")
    if "min_ratio" in options and scope != "global":
        raise ConfigError("min_ratio (per-group floor) applies to scope='global' only")
    if target != "channels":
        policy = Target(ratio, Metric(target), policy)  # type: ignore[arg-type]  # checked there
    return PruneConfig(
        policy=policy,
        criterion=criterion,
        ignore=as_tuple(options.get("ignore")),
        verify=bool(options.get("verify", True)),
        rtol=float(options.get("rtol", 1e-5)),
        leaf_types=as_tuple(options.get("leaf_types")),
        grouped_convs=options.get("grouped_convs", "channels"),
        exact_only=bool(options.get("exact_only", False)),
    )


def prune(model: nn.Module, example_inputs: Any, config: PruneConfig) -> Result:
    """capture → analyze → score → select → apply → verify, returning every artefact.

    The caller's model is never modified.

    Example:
        >>> res = shrink.prune(model, (x,), shrink.PruneConfig(policy=shrink.Uniform(0.3)))
        >>> print(res.report)
    """
    inputs = normalize_inputs(example_inputs)
    with stage("capture"):
        captured = capture(model, inputs, leaf_types=config.leaf_types, on_meta=True)
    with stage("analyze"):
        analysis = analyze(captured, ignore=config.ignore, source=model,
                           grouped_convs=config.grouped_convs, exact_only=config.exact_only)
    with stage("score"):
        scores = score(analysis.groups, model, config.criterion)
    policy = config.policy
    if isinstance(policy, Target):
        from shrink.allocate import solve_target

        with stage("solve target"):
            policy = solve_target(model, inputs, analysis.groups, scores, policy,
                                  analysis.model).policy
    with stage("select"):
        plan = select(analysis.groups, scores, policy, analysis.model)
    with stage("apply"):
        pruned = apply(model, plan)
    report = None
    if config.verify:
        with stage("verify"):
            report = verify_(model, pruned, plan, inputs, rtol=config.rtol)
        log.info("shrink: %s", report)
    return Result(pruned, plan, analysis, report)


def compress(
    model: nn.Module,
    ratio: float | int,
    example_inputs: Any = None,
    **options: Any,
) -> nn.Module:
    """Return a new, physically smaller copy of ``model``.

    Args:
        model: any traceable ``nn.Module``; it is never modified.
        ratio: float in [0, 1): fraction of channels removed from every prunable group; int:
            number of channels removed from every group (as ``amount`` in torch.nn.utils.prune).
        example_inputs: a tensor or tuple of inputs; inferred for image models when omitted.
        **options: ``norm`` (1, 2 or inf; default 2), ``importance`` ('ln', 'random',
            'bn_scale', 'taylor', 'activation', {module: scores} or a callable), ``data``
            (batches for 'taylor'/'activation'), ``loss_fn`` ('taylor'), ``max_batches``,
            ``seed``, ``scope`` ('local' or 'global'), ``target`` ('channels', or 'macs' /
            'params': ``ratio`` is then the fraction of MACs/parameters removed and shrink
            solves for the channel ratio; scope defaults to 'global'), ``overrides``
            ({name or glob: ratio}), ``ignore`` (names, globs or types kept intact),
            ``round_to`` (kept counts rounded up to a multiple; default ``"auto"``),
            ``min_keep``, ``max_ratio``
            (global ceiling per group), ``min_ratio`` (global floor per group), ``verify``
            (default True), ``rtol``, ``leaf_types``, ``grouped_convs`` (``"channels"``, the
            default: every conv group loses channels equally; ``"groups"``: grouped convs lose
            whole conv groups), ``exact_only`` (default False: channels normalised by a
            LayerNorm, such as a transformer's residual stream, are pruned too and the report
            gives the measured deviation from the masked original; True keeps them, so only
            exact groups such as heads and MLP widths shrink).

    Returns:
        The pruned model, in the same mode, dtype and device as ``model``.

    Raises:
        ConfigError: bad ratio or options. CaptureError: untraceable model or bad inputs.
        VerificationError: the pruned model is not equivalent (never returned silently wrong).

    Example:
        >>> small = shrink.compress(torchvision.models.resnet50(), 0.5)
    """
    config = make_config(ratio, **options)
    inputs = infer_inputs(model) if example_inputs is None else example_inputs
    return prune(model, inputs, config).model


ImportanceFn = Callable[..., torch.Tensor]
