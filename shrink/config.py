"""Every option of :func:`shrink.compress` and :func:`shrink.prune`, in one frozen dataclass.

There is one way to configure pruning: ``compress(model, 0.5, norm=1)`` builds
``PruneConfig(0.5, norm=1)`` and runs :func:`shrink.prune` with it, so the option names,
defaults and validation are the same whichever way a config is made.

``ratio`` is always a *fraction* in [0, 1). An absolute number of channels removed from every
group is ``amount=N`` (``torch.nn.utils.prune``'s int ``amount``); an int ``ratio`` such as
``compress(model, 1)`` is refused rather than silently read as "one channel".

The selection policy (:mod:`shrink.select`) and the criterion (:mod:`shrink.criteria`) are
derived from the options by :attr:`PruneConfig.policy` and :attr:`PruneConfig.criterion`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any

from torch import nn

from shrink.criteria.data import Activation, ActivationWeighted, Taylor
from shrink.criteria.weight import BNScale, Criterion, LnNorm, Random, UserScores
from shrink.errors import ConfigError
from shrink.latency.options import LatencyTarget, LossValuation, Runtime
from shrink.select import Global, Metric, Policy, Target, Uniform

_TARGETS = ("channels", "macs", "params", "latency")
_RUNTIMES = tuple(r.value for r in Runtime)
_NORMS = {"l1": 1.0, "l2": 2.0, "linf": math.inf}


@dataclass(frozen=True, slots=True)
class PruneConfig:
    """Everything :func:`shrink.prune` needs besides the model and its inputs.

    Attributes:
        ratio: fraction removed, in [0, 1): of each group's channels (``target="channels"``),
            of the model's MACs/parameters (``target="macs"``/``"params"``) or of its measured
            latency (``target="latency"``).
        amount: instead of ``ratio``, a number of channels: removed from every group
            (``scope="local"``), or in total, ranked across groups (``scope="global"``).
        importance: ``"ln"`` (with ``norm``), ``"random"`` (with ``seed``), ``"bn_scale"``,
            ``"taylor"`` (with ``data`` and ``loss_fn``, or dict batches with ``labels`` for a
            model that returns ``.loss``), ``"activation_weighted"`` (Wanda: ``|W| * ||X||``;
            aliases ``"wanda"``, ``"aw"``; with ``data``), ``"activation"`` (with ``data``), a
            ``{module name: scores}`` mapping, a callable ``fn(group, modules) -> scores``, or a
            criterion object from :mod:`shrink.criteria`.
        norm: the Ln norm of ``importance="ln"``: 1, 2 or ``math.inf`` (as ``ln_structured``).
        seed: seed of ``importance="random"``.
        data: re-iterable batches for ``"taylor"``, ``"activation_weighted"`` and
            ``"activation"`` (a DataLoader or a list): tensors, ``(*inputs, target)`` tuples or
            dicts of keyword arguments.
        loss_fn: ``loss_fn(output, target)`` for ``"taylor"``; None uses ``output.loss``.
        max_batches: at most this many batches of ``data``.
        scope: ``"local"`` (every group loses ``ratio``) or ``"global"`` (channels ranked
            across groups); default ``"local"``, or ``"global"`` for a MACs/params/latency
            target (a latency target is always allocated across groups).
        target: ``"channels"`` (default), ``"macs"``, ``"params"`` or ``"latency"`` (see
            :mod:`shrink.latency`; needs example inputs, whose shape is what is timed).
        runtime: ``target="latency"``: where latency is measured: ``"onnxruntime-cpu"``
            (default), ``"torch-cpu"``, ``"onnxruntime-cuda"`` or ``"torch-cuda"``.
        threads: ``target="latency"``: intra-op threads of the runtime (default 1).
        batch: ``target="latency"``: batch size timed (default: the example inputs' batch).
        valuation: ``target="latency"``: what keeping ``k`` channels of a group is worth to the
            allocation: ``"scores"`` (the sum of its ``k`` best channel scores) or ``"loss"``
            (the measured loss of pruning that group alone to ``k`` on ``data``, with
            ``loss_fn`` and ``max_batches``: slower, and on trained models it keeps the layers
            whose cuts cost accuracy; see :mod:`shrink.latency.value`). Default: ``"loss"``
            when ``data`` and ``loss_fn`` are given, else ``"scores"``.
        round_to: kept counts rounded up to a multiple; ``"auto"`` (default for
            ``target="channels"`` and ``"latency"``) rounds groups of 16+ channels to 16 (for
            a latency target: the runtime's channel block); 1 (default for a MACs/params
            target, which needs fine steps) does not round.
        min_keep: every group keeps at least this many channels.
        max_ratio: ``scope="global"``: no group loses more than this fraction.
        min_ratio: ``scope="global"``: every group loses at least this fraction.
        overrides: per-group fractions, ``{group id or module glob: ratio}``.
        ignore: module names, globs or types whose channels stay.
        exact_only: keep channels a LayerNorm/RMSNorm normalises (transformer residual
            streams), so the result equals the masked original; by default they are pruned as
            inexact groups and the report gives the measured deviation.
        grouped_convs: ``"channels"`` (every conv group loses the same number of channels) or
            ``"groups"`` (whole conv groups go).
        gqa: grouped-query attention (Hugging Face Llama, Qwen, Mistral, ...): ``"groups"``
            (default: whole KV groups go, so the KV cache shrinks too) or ``"query"`` (every KV
            group loses the same query heads; key/value heads stay).
        verify: check the result against the masked oracle (raises on mismatch).
        rtol: tolerance of that check.
        leaf_types: module types kept opaque during capture.
        capture: the capture front-end: ``"auto"`` (torch.fx, then torch.export when fx cannot
            trace the model, then the model in parts when neither can), ``"fx"`` or
            ``"export"``.
        depth: whole blocks (encoder/decoder layers) removed from every stack of blocks before
            the channels are pruned, by :func:`shrink.remove_layers` scored by block influence
            on ``data`` (or the example inputs): an int count, or a fraction in [0, 1) of each
            stack. With ``depth`` set, ``ratio``/``amount`` may be omitted (depth only); the
            width options then apply to the depth-pruned model.

    Raises:
        ConfigError: an option is out of range or options contradict each other; the message
            names the option and the valid values.

    Example:
        >>> cfg = shrink.PruneConfig(0.5, norm=1, scope="global")
        >>> res = shrink.prune(model, (x,), cfg)
    """

    ratio: float | None = None
    amount: int | None = None
    importance: Any = "ln"
    norm: float = 2.0
    seed: int = 0
    data: Iterable[Any] | None = None
    loss_fn: Callable[..., Any] | None = None
    max_batches: int | None = None
    scope: str | None = None
    target: str = "channels"
    runtime: str | None = None
    threads: int | None = None
    batch: int | None = None
    valuation: str | None = None
    round_to: int | str | None = None
    min_keep: int = 1
    max_ratio: float = 0.9
    min_ratio: float = 0.0
    overrides: Any = ()
    ignore: Any = ()
    exact_only: bool = False
    grouped_convs: str = "channels"
    gqa: str = "groups"
    verify: bool = True
    rtol: float = 1e-5
    leaf_types: Any = ()
    capture: str = "auto"
    depth: int | float | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # normalising inputs of a frozen dataclass
        set_(self, "ignore", as_tuple(self.ignore))
        set_(self, "leaf_types", as_tuple(self.leaf_types))
        set_(self, "overrides", _overrides(self.overrides))
        if self.norm in ("inf", "fro"):
            set_(self, "norm", math.inf if self.norm == "inf" else 2.0)
        _check_depth(self.depth)
        _check_amounts(self.ratio, self.amount, self.target, self.depth is not None)
        if self.target not in _TARGETS:
            raise ConfigError(
                f"target must be 'channels' (ratio = fraction of channels removed per group), "
                f"'macs' or 'params' (ratio = fraction of MACs/parameters removed) or 'latency' "
                f"(ratio = fraction of measured latency removed); got {self.target!r}"
            )
        _check_latency_options(self)
        if self.scope not in (None, "local", "global"):
            raise ConfigError(f"scope must be 'local' or 'global', got {self.scope!r}")
        if self.min_ratio and self.resolved_scope != "global":
            raise ConfigError("min_ratio (per-group floor) applies to scope='global' only")
        if self.gqa not in ("groups", "query"):
            raise ConfigError(f"gqa must be 'groups' (whole KV groups) or 'query' (query heads "
                              f"inside every KV group), got {self.gqa!r}")
        if self.grouped_convs not in ("groups", "channels"):
            raise ConfigError(
                f"grouped_convs must be 'groups' or 'channels', got {self.grouped_convs!r}"
            )
        if self.capture not in ("auto", "fx", "export"):
            raise ConfigError(
                f"capture must be 'auto', 'fx' or 'export', got {self.capture!r}"
            )
        if not self.rtol > 0:
            raise ConfigError(f"rtol must be > 0, got {self.rtol}")
        if self.data is not None and self.depth is None and not _uses_data(self.importance) \
                and self.resolved_valuation != "loss":
            raise ConfigError(
                "data= is used only by importance='taylor', 'activation_weighted' or "
                f"'activation', by depth= (block influence) and by target='latency' with "
                f"valuation='loss' (its default when loss_fn= is given too); got "
                f"importance={self.importance!r}"
            )
        self.criterion  # noqa: B018  # validates importance/norm now, not at prune time
        self.policy  # noqa: B018

    @property
    def resolved_valuation(self) -> str | None:
        """``valuation``, or its default for a latency target: ``"loss"`` when ``data`` and
        ``loss_fn`` are given (labelled calibration data: measured losses allocate better
        than channel scores, docs/latency.md), else ``"scores"``; None for other targets."""
        if self.target != "latency":
            return None
        if self.valuation is not None:
            return self.valuation
        return "loss" if self.data is not None and self.loss_fn is not None else "scores"

    @property
    def resolved_scope(self) -> str:
        """``scope``, or its default: ``"local"``, ``"global"`` for a MACs/params target."""
        return self.scope or ("local" if self.target == "channels" else "global")

    @property
    def policy(self) -> Policy | LatencyTarget:
        """The selection policy these options describe (:mod:`shrink.select`)."""
        round_to = self.round_to
        if round_to is None:
            round_to = "auto" if self.target in ("channels", "latency") else 1
        removed: float | int = self.amount if self.amount is not None else float(self.ratio or 0)
        per_group = removed if self.target == "channels" else 0.0
        base: Uniform | Global
        if self.resolved_scope == "local":
            base = Uniform(per_group, round_to=round_to, min_keep=self.min_keep,
                           overrides=self.overrides)
        else:
            base = Global(per_group, round_to=round_to, min_keep=self.min_keep,
                          max_ratio=self.max_ratio, min_ratio=self.min_ratio,
                          overrides=self.overrides)
        if self.target == "channels":
            return base
        if self.target == "latency":
            assert isinstance(base, Global)  # _check_latency_options refuses scope="local"
            valuation = None if self.resolved_valuation != "loss" or self.data is None else \
                LossValuation(self.data, self.loss_fn, self.max_batches)
            return LatencyTarget(float(self.ratio or 0), Runtime(self.runtime or "onnxruntime-cpu"),
                                 threads=1 if self.threads is None else self.threads,
                                 batch=self.batch, policy=base, valuation=valuation)
        return Target(float(self.ratio or 0), Metric(self.target), base)

    @property
    def criterion(self) -> Criterion:
        """The importance criterion these options describe (:mod:`shrink.criteria`)."""
        return _criterion(self)


def option_names() -> tuple[str, ...]:
    """The keyword options of :func:`shrink.compress` (the fields of :class:`PruneConfig`)."""
    return tuple(f.name for f in fields(PruneConfig))


def _check_latency_options(cfg: PruneConfig) -> None:
    if cfg.target != "latency":
        given = [n for n in ("runtime", "threads", "batch", "valuation")
                 if getattr(cfg, n) is not None]
        if given:
            raise ConfigError(f"{', '.join(given)} apply to target='latency' only (they say "
                              f"where latency is measured); got target={cfg.target!r}")
        return
    if cfg.runtime is not None and cfg.runtime not in _RUNTIMES:
        raise ConfigError(f"runtime={cfg.runtime!r} is unknown: a latency target is measured "
                          f"on one of {list(_RUNTIMES)}")
    if cfg.valuation not in (None, "scores", "loss"):
        raise ConfigError(f"valuation must be 'scores' (channel scores) or 'loss' (the measured "
                          f"loss of pruning each group alone, on data=); got {cfg.valuation!r}")
    if cfg.valuation == "loss" and cfg.data is None:
        raise ConfigError("valuation='loss' measures the loss of pruned copies on calibration "
                          "data: pass data= (batches of (x, y), or dicts with 'labels') and "
                          "loss_fn= (e.g. torch.nn.functional.cross_entropy)")
    if cfg.scope == "local":
        raise ConfigError("scope='local' does not apply to target='latency': latency is "
                          "allocated across groups (scope='global'); use overrides= to fix "
                          "some groups' ratios")
    if cfg.depth is not None:
        raise ConfigError("depth= cannot be combined with target='latency' yet; run "
                          "shrink.remove_layers first, then prune the result to a latency")
    if cfg.ratio is None or cfg.ratio <= 0:
        raise ConfigError(f"target='latency' needs ratio= in (0, 1), the fraction of measured "
                          f"latency removed; got ratio={cfg.ratio!r}")


def _check_depth(depth: Any) -> None:
    if depth is None:
        return
    if isinstance(depth, bool) or not isinstance(depth, (int, float)) \
            or (isinstance(depth, int) and depth < 0) \
            or (isinstance(depth, float) and not 0.0 <= depth < 1.0):
        raise ConfigError(
            f"depth must be an int >= 0 (blocks removed from every stack of blocks) or a "
            f"fraction in [0, 1) of each stack's blocks, got {depth!r}"
        )


def _check_amounts(ratio: Any, amount: Any, target: str, depth: bool = False) -> None:
    if ratio is None and amount is None and not depth:
        raise ConfigError(
            "say how much to remove: ratio= (a fraction in [0, 1), e.g. 0.5), amount= (a "
            "number of channels removed from every group) or depth= (whole layers)"
        )
    if ratio is not None and amount is not None:
        raise ConfigError(f"give ratio= or amount=, not both (got ratio={ratio!r}, "
                          f"amount={amount!r})")
    if ratio is not None:
        if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
            raise ConfigError(f"ratio must be a fraction in [0, 1), got {type(ratio).__name__} "
                              f"{ratio!r}")
        if isinstance(ratio, int) and ratio != 0:
            raise ConfigError(
                f"ratio={ratio} is an int: ratio is the fraction removed, in [0, 1). To remove "
                f"{ratio} channel(s) from every group, pass amount={ratio}; for a fraction, pass "
                "a float such as 0.5."
            )
        if not 0.0 <= ratio < 1.0:
            raise ConfigError(
                f"ratio={ratio} is out of range: it is the fraction removed, in [0, 1) (1.0 "
                "would remove everything)."
            )
    if amount is not None:
        if isinstance(amount, bool) or not isinstance(amount, int) or amount < 0:
            raise ConfigError(f"amount must be an int >= 0 (channels removed from every group), "
                              f"got {amount!r}")
        if target != "channels":
            raise ConfigError(f"amount= counts channels; with target={target!r} pass ratio= "
                              "(the fraction of the metric removed)")


_DATA_IMPORTANCE = ("taylor", "activation", "act", "activation_weighted", "wanda", "aw")


def _uses_data(importance: Any) -> bool:
    if isinstance(importance, str):
        return importance.lower() in _DATA_IMPORTANCE
    return isinstance(importance, (Taylor, ActivationWeighted, Activation))


def _criterion(cfg: PruneConfig) -> Criterion:
    importance = cfg.importance
    data_options: dict[str, Any] = {"data": cfg.data, "loss_fn": cfg.loss_fn,
                                    "max_batches": cfg.max_batches}
    if isinstance(importance, str):
        key = importance.lower()
        if key == "taylor":
            return Taylor(**{k: v for k, v in data_options.items() if v is not None})
        if key in ("activation", "act"):
            data_options.pop("loss_fn")
            return Activation(**{k: v for k, v in data_options.items() if v is not None})
        if key in ("activation_weighted", "wanda", "aw"):
            data_options.pop("loss_fn")
            return ActivationWeighted(**{k: v for k, v in data_options.items() if v is not None})
        if key in ("ln", "l1", "l2", "linf", "magnitude"):
            p = _NORMS.get(key, cfg.norm)
            if p not in (1, 2, math.inf):
                raise ConfigError(
                    f"norm must be 1, 2 or inf (as in ln_structured), got {cfg.norm!r}"
                )
            return LnNorm(float(p))
        if key == "random":
            return Random(cfg.seed)
        if key in ("bn", "bn_scale", "slimming"):
            return BNScale()
        raise ConfigError(
            f"importance={importance!r} is unknown. Use 'ln' (with norm=1, 2 or inf), 'random' "
            "(with seed=), 'bn_scale', 'taylor' (with data= and loss_fn=), "
            "'activation_weighted' (aliases 'wanda', 'aw'; with data=), 'activation' (with "
            "data=), a {module_name: scores} mapping, or a callable fn(group, modules) -> scores."
        )
    if isinstance(importance, Mapping) or callable(importance):
        if not isinstance(importance, Mapping) and hasattr(importance, "__dataclass_fields__"):
            return importance  # type: ignore[no-any-return]  # a Criterion instance
        return UserScores(importance)
    raise ConfigError(f"importance must be a string, mapping or callable, got {importance!r}")


def _overrides(value: Any) -> tuple[tuple[str, float], ...]:
    if value is None:
        return ()
    if isinstance(value, Mapping):
        items = [(str(k), v) for k, v in value.items()]
    elif isinstance(value, (list, tuple)) and all(
        isinstance(i, (list, tuple)) and len(i) == 2 for i in value
    ):
        items = [(str(i[0]), i[1]) for i in value]
    else:
        raise ConfigError(
            f"overrides must be a {{pattern: ratio}} dict, e.g. {{'layer4.*': 0.2}}; got {value!r}"
        )
    for pattern, r in items:
        if isinstance(r, int) and not isinstance(r, bool) and r != 0:
            raise ConfigError(
                f"overrides[{pattern!r}]={r} is an int: override ratios are fractions in [0, 1) "
                "(use amount= for a channel count on every group)"
            )
    return tuple((p, float(r) if isinstance(r, int) and not isinstance(r, bool) else r)
                 for p, r in items)


def as_tuple(value: str | type[nn.Module] | Sequence[str | type[nn.Module]] | None) -> tuple:  # type: ignore[type-arg]
    """``None`` → ``()``, one name or type → a 1-tuple, a sequence → a tuple."""
    if value is None:
        return ()
    if isinstance(value, (str, type)):
        return (value,)
    return tuple(value)
