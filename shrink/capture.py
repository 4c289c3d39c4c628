"""Capture a model as an fx graph: the only file that knows how the graph is obtained.

shrink traces with ``torch.fx`` symbolic tracing. Every module type that has an op rule stays a
``call_module`` node (its target is the module's FQN); everything else is traced through, except
``torch.nn`` built-ins without a rule, which stay opaque leaves (and so pin what they touch).

The caller's model is never touched: tracing and analysis run on a deep copy in eval mode (fx
records the branch that ``self.training`` selects; eval is the deployed graph).
"""

from __future__ import annotations

import copy
import itertools
import logging
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import FrameType
from typing import Any

import torch
from torch import fx, nn
from torch.fx.experimental.symbolic_shapes import GuardOnDataDependentSymNode

from shrink.capture_parts import PartsSummary, capture_parts

try:  # torch's lazily compiled GraphModule (private API: plain GraphModule when it moves)
    from torch.fx._lazy_graph_module import _LazyGraphModule as _GraphModule
except ImportError:  # pragma: no cover
    _GraphModule = fx.GraphModule  # type: ignore[misc,assignment]
from shrink.errors import CaptureError
from shrink.ids import WHERE
from shrink.interop.prune_masks import find_masks
from shrink.modcopy import copy_module, set_eval
from shrink.plan import fingerprint
from shrink.rules import rule_for

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True, eq=False)
class Captured:
    """Traced copies of a model plus the inputs they were traced with. Never serialised.

    ``graph_modules`` holds the eval-mode graph and, when the model has layers that only run in
    training (GoogLeNet's auxiliary heads), the train-mode graph too, so those layers stay
    consistent with the rest of the pruned model.

    A model that cannot be traced whole is captured in parts (:mod:`shrink.capture_parts`):
    then each graph is one call of one submodule, ``graph_inputs`` holds the inputs each graph
    runs on (``example_inputs`` stays the whole model's) and ``parts`` says what was captured.
    """

    graph_modules: tuple[fx.GraphModule, ...]
    example_inputs: tuple[Any, ...]
    fingerprint: str
    on_meta: bool = False
    graph_inputs: tuple[tuple[Any, ...], ...] = ()
    parts: PartsSummary | None = None

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.graph_modules[0]

    @property
    def frontend(self) -> str:
        """How the model was captured: ``"fx"``, ``"export"`` or ``"parts"``."""
        if self.parts is not None:
            return "parts"
        return str(getattr(self.graph_module, "_shrink_frontend", "fx"))


class _Tracer(fx.Tracer):
    def __init__(self, leaf_types: Sequence[type[nn.Module]]) -> None:
        super().__init__()
        self.leaf_types = tuple(leaf_types)
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if rule_for(m) is not None or isinstance(m, self.leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def create_node(self, *args: Any, **kwargs: Any) -> fx.Node:
        """fx's node, with the user's source line that made it in ``node.meta[WHERE]`` (what
        the diagnostics read: :func:`shrink.ids.source_location`) instead of the stack trace
        fx would record: fx symbolises a captured traceback and formats every frame of it per
        node, which was half the cost of tracing, and formatting the live frames a fifth."""
        if not self.record_stack_traces:
            return super().create_node(*args, **kwargs)
        self.record_stack_traces = False
        try:
            node = super().create_node(*args, **kwargs)
        finally:
            self.record_stack_traces = True
        if not node.stack_trace:
            where = _user_line(sys._getframe(1))
            if where is not None:
                node.meta[WHERE] = where
        return node


def _user_line(frame: FrameType | None) -> str | None:
    """``file.py:LINE in fn`` of the innermost frame outside torch and shrink, when it runs
    inside a ``forward`` (it or a frame further out is one); None otherwise (the tracer's own
    placeholder and output nodes)."""
    while frame is not None and _internal(frame.f_code.co_filename):
        frame = frame.f_back
    user = frame
    while frame is not None and frame.f_code.co_name != "forward":
        frame = frame.f_back
    if user is None or frame is None:
        return None
    path = user.f_code.co_filename
    return f"{path.rsplit('/', 1)[-1]}:{user.f_lineno} in {user.f_code.co_name}"


def _internal(path: str) -> bool:
    return "/torch/" in path or "/shrink/" in path


def normalize_inputs(example_inputs: Any) -> tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, list):
        return tuple(example_inputs)
    if isinstance(example_inputs, tuple):
        return example_inputs
    raise CaptureError(
        f"example_inputs must be a tensor or a tuple of positional inputs, got "
        f"{type(example_inputs).__name__}. Pass e.g. example_inputs=(torch.randn(1, 3, 224, 224),)"
    )


def capture(
    model: nn.Module,
    example_inputs: Any,
    *,
    leaf_types: Sequence[type[nn.Module]] = (),
    on_meta: bool = False,
    frontend: str = "auto",
) -> Captured:
    """Trace a deep copy of ``model`` (in eval mode) with torch.fx or torch.export.

    Args:
        model: the model; it is not modified.
        example_inputs: a tensor or a tuple of positional inputs, used to record shapes.
        leaf_types: extra module types to keep opaque (their channels are pinned).
        on_meta: trace a weightless copy on the meta device (analysis then needs no compute);
            analysis falls back to a real copy when an op cannot run on meta.
        frontend: ``"fx"`` (symbolic tracing), ``"export"`` (``torch.export``, non-strict) or
            ``"auto"`` (default): fx, then export when fx cannot trace the model, then the
            model in parts. fx comes first because it records sizes computed from shapes
            (``x.size(1) // 2``) as computations that follow pruning, where export records
            literals.

    Returns:
        The traced copy and the normalised inputs.

    With ``"auto"``, when neither front-end captures the whole model, the largest submodules
    that trace are captured instead, each call as its own graph with pinned inputs and outputs
    (:mod:`shrink.capture_parts`).

    Raises:
        CaptureError: when no front-end can capture the model (with ``"auto"``: nor any part
            of it).
    """
    if not isinstance(model, nn.Module):
        raise CaptureError(f"expected an nn.Module, got {type(model).__name__}")
    if frontend not in FRONTENDS:
        raise CaptureError(f"capture={frontend!r} is not a front-end; use one of {FRONTENDS}")
    _refuse_prune_masks(model)
    inputs = normalize_inputs(example_inputs)
    try:
        trace, gm0, on_meta = _whole(model, inputs, leaf_types, on_meta, frontend)
    except CaptureError as whole:
        if frontend != "auto":  # a forced front-end is what the user asked for
            raise
        copied = set_eval(meta_copy(model) if on_meta else copy.deepcopy(model))
        parts = capture_parts(model, copied, inputs, whole,
                              lambda m, x, name: trace_part(m, x, leaf_types, name))
        return Captured(parts.graph_modules, inputs, fingerprint(model), on_meta,
                        parts.inputs, parts.summary)
    gms = [gm0]
    used = {str(n.target) for n in gm0.graph.nodes if n.op == "call_module"}
    used |= {str(n.target).rpartition(".")[0] for n in gm0.graph.nodes if n.op == "get_attr"}
    unused = [
        f for f, m in gm0._shrink_source.named_modules()  # type: ignore[union-attr]
        if f and f not in used and rule_for(m) is not None
        and any(True for _ in m.parameters(recurse=False))
        and not any(u and f.startswith(u + ".") for u in used)
    ]
    if unused:
        train_copy = (meta_copy(model) if on_meta else copy.deepcopy(model)).train()
        try:
            gms.append(trace(train_copy))
        except CaptureError as e:
            log.warning(
                "shrink: layers %s run only in training and the training-mode graph could not "
                "be traced (%s); the pruned model is verified in eval mode only",
                unused[:5], str(e).splitlines()[0],
            )
    return Captured(tuple(gms), inputs, fingerprint(model), on_meta)


def _whole(model: nn.Module, inputs: tuple[Any, ...], leaf_types: Sequence[type[nn.Module]],
           on_meta: bool, frontend: str) -> tuple[Trace, fx.GraphModule, bool]:
    """The whole model's graph from the chosen front-end (``"auto"``: fx, then export), the
    tracer that made it (for a train-mode copy) and whether it runs on meta."""
    name = type(model).__name__
    fx_trace = _fx_tracer(leaf_types, name)

    def fx_copy() -> fx.GraphModule:
        return fx_trace(set_eval(meta_copy(model) if on_meta else copy.deepcopy(model)))

    if frontend == "fx":
        return fx_trace, fx_copy(), on_meta
    if frontend == "export":
        return _export(model, inputs, leaf_types, on_meta)
    try:
        return fx_trace, fx_copy(), on_meta
    except CaptureError as fx_error:
        try:
            found = _export(model, inputs, leaf_types, on_meta)
        except CaptureError as export_error:
            raise CaptureError(f"{fx_error}\n{export_error}") from export_error
        log.info("shrink: torch.fx could not trace %s; captured it with torch.export", name)
        return found


FRONTENDS = ("auto", "fx", "export")


Trace = Callable[[nn.Module], fx.GraphModule]


def _fx_tracer(leaf_types: Sequence[type[nn.Module]], name: str) -> Trace:
    return lambda copied: _trace(copied, leaf_types, name)


def _export(model: nn.Module, inputs: tuple[Any, ...], leaf_types: Sequence[type[nn.Module]],
            on_meta: bool) -> tuple[Trace, fx.GraphModule, bool]:
    """Export the model, on the meta device when it exports there; a model that mixes devices
    in forward (``torch.tensor(...)`` next to meta weights) is exported from a real copy.
    Returns the tracer (for a train-mode copy), the graph and whether it runs on meta."""
    from shrink.capture_export import trace_export

    name = type(model).__name__
    if on_meta:
        meta_inputs = to_meta(inputs)
        trace: Trace = lambda c: trace_export(c, meta_inputs, leaf_types, name)  # noqa: E731
        try:
            return trace, trace(set_eval(meta_copy(model))), True
        except CaptureError as e:
            if isinstance(e.__cause__, GuardOnDataDependentSymNode):
                raise  # control flow on data: real inputs are traced as fake ones, and fail too
    trace = lambda c: trace_export(c, inputs, leaf_types, name)  # noqa: E731
    return trace, trace(set_eval(copy.deepcopy(model))), False


def _refuse_prune_masks(model: nn.Module) -> None:
    """torch.nn.utils.prune reparametrizations hold non-leaf tensors that cannot be copied."""
    masked = find_masks(model)
    if masked:
        names = [f"{m.module}.{m.name}" if m.module else m.name for m in masked]
        raise CaptureError(
            f"the model carries torch.nn.utils.prune masks on {names[:5]}"
            f"{' ...' if len(names) > 5 else ''}, which shrink cannot trace or copy. To make "
            "those masks physical, use shrink.from_masks(model, example_inputs); to prune on "
            "top of them, fold them first with torch.nn.utils.prune.remove(module, name)."
        )


def meta_copy(model: nn.Module) -> nn.Module:
    """A deep copy whose parameters and buffers live on the meta device (no data is copied)."""
    memo: dict[int, Any] = {}
    for t in itertools.chain(model.parameters(), model.buffers()):
        if id(t) in memo:
            continue
        meta = torch.empty_like(t, device="meta")
        memo[id(t)] = nn.Parameter(meta, t.requires_grad) if isinstance(t, nn.Parameter) else meta
    return copy_module(model, memo)


def to_meta(value: Any) -> Any:
    """Example inputs with every tensor replaced by a meta tensor of the same shape and dtype."""
    if isinstance(value, torch.Tensor):
        return torch.empty_like(value, device="meta")
    if isinstance(value, (tuple, list)):
        return type(value)(to_meta(v) for v in value)
    if isinstance(value, dict):
        return {k: to_meta(v) for k, v in value.items()}
    return value


def _trace(copied: nn.Module, leaf_types: Sequence[type[nn.Module]], name: str) -> fx.GraphModule:
    tracer = _Tracer(leaf_types)
    try:
        graph = tracer.trace(copied)
    except Exception as e:
        raise CaptureError(
            f"torch.fx could not trace {name}: {type(e).__name__}: {e}\n"
            "  why: symbolic tracing cannot follow Python control flow that depends on tensor "
            "values or shapes.\n"
            "  fix: make that code traceable (e.g. torch.fx.wrap a helper), or keep the module "
            "that contains it opaque with leaf_types=[ThatModule] (its channels then stay)."
        ) from e
    # lazily compiled: shrink only interprets the graph, so the Python source fx would
    # generate and compile for forward is made on the first call, if any (same module)
    gm = _GraphModule(copied, graph, name)
    object.__setattr__(gm, "_shrink_leaf_types", tuple(leaf_types))
    # the traced copy with its plain attributes (GraphModule keeps only modules and tensors):
    # rules look up int attributes that forward uses as sizes (shrink.rules.structural)
    object.__setattr__(gm, "_shrink_source", copied)
    return gm


def trace_part(module: nn.Module, inputs: tuple[torch.Tensor, ...],
               leaf_types: Sequence[type[nn.Module]], name: str) -> fx.GraphModule:
    """Trace one part of a model captured in parts: ``module`` is a
    :class:`~shrink.capture_parts.FlatCall` whose forward takes ``inputs`` positionally; the
    graph's targets are relative to it. torch.fx first, then torch.export (a part whose Python
    checks a tensor's ``dim()``, like torchvision's box predictor, exports)."""
    try:
        return _trace(module, leaf_types, name)
    except CaptureError as fx_error:
        from shrink.capture_export import trace_export

        on_meta = any(isinstance(t, torch.Tensor) and t.is_meta for t in inputs)
        try:  # the recorded inputs may be meta tensors: export a weightless copy then
            return trace_export(meta_copy(module) if on_meta else module, inputs, leaf_types,
                                name)
        except CaptureError:
            raise fx_error from None


def describe(node: fx.Node) -> str:
    """Human-readable op name of a node, e.g. ``'cat_1' (torch.cat)``."""
    target = node.target
    if isinstance(target, torch._ops.OpOverload):
        return f"{node.name!r} ({str(target).rsplit('.', 1)[0]})"
    if node.op == "call_method":
        what = f"Tensor.{target}"
    elif node.op == "call_function":
        what = f"{getattr(target, '__module__', '') or ''}.{getattr(target, '__name__', target)}"
        what = what.replace("torch._C._nn.", "F.").replace("_operator.", "operator.").lstrip(".")
    else:
        what = str(target)
    return f"{node.name!r} ({what})"
