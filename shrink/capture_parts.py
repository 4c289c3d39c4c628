"""Partial capture: when a model cannot be traced whole, trace the largest submodules that can.

A detector's post-processing (anchor matching, NMS, ``ImageList``) defeats tracing, yet its
backbone, FPN and heads are what people prune. :func:`capture_parts` runs the model once on the
example inputs (a deep copy, eval mode, ``no_grad``) with forward pre-hooks that record every
submodule's calls, then walks the module tree top-down: a module becomes a *part* when each of
its calls can be traced; otherwise it is split into its children.

**Namespace.** A part's graph calls its layers by their FQNs in the whole model (its root is the
whole copied model), so rules, analysis, plans and the rewrite see one namespace.

**Boundaries.** Each graph takes one recorded call's tensors as placeholders and returns that
call's outputs. Analysis pins both ("boundary of captured part X"), so a pruned channel never
leaves a part; a layer outside every part is never a member of a group and keeps its size.

**Repeated calls.** A module called k times (a head applied to each FPN level) becomes k graphs,
one per call, each on its own recorded inputs. Analysis unions a layer's channels across its
calls, as for any layer called twice, so every call agrees whatever its structure, and nothing is
assumed about calls that were not traced.

**Refusals.** A module is not a part (it is split, or reported as not captured) when it was not
called, when a call passes anything but tensors, ``None`` and Python scalars (nested in tuples,
lists and dicts; scalars are baked into that call's graph, as tracing the whole model would), when
a layer inside it is also called from outside it (that other caller would read pruned channels),
or when tracing fails. A layer whose parameters are shared with another layer is pinned.

**Checks.** The shape probe and :func:`shrink.verify` run the recorded part calls (each part of
the pruned model on the masked original's inputs), not only the whole model, whose outputs
may depend on data (how many boxes survive NMS).

**Limits.** Calls are seen through module hooks: code outside every part that reads a layer's
parameters directly (``F.conv2d(x, self.head.conv.weight)``) is not seen, and only the whole
model's comparison in :func:`shrink.verify` would notice. Only the eval-mode graph is captured.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from shrink.errors import CaptureError

#: ``trace(flat_module, flat_inputs, name) -> GraphModule``: one part's tracer. ``flat_module``
#: is a :class:`FlatCall` (its forward takes the call's tensors positionally); the graph's
#: ``call_module``/``get_attr`` targets are relative to it.
TracePart = Callable[[nn.Module, tuple[torch.Tensor, ...], str], fx.GraphModule]

_CONSTANTS = (type(None), bool, int, float, str)


@dataclass(frozen=True, slots=True)
class PartsSummary:
    """What partial capture captured, what it split, and what it left as it is."""

    #: the whole model's tracing error (its first line)
    whole: str
    #: module FQNs captured as parts, in call order
    captured: tuple[str, ...]
    #: (module FQN, why it was not captured whole): split into its children
    split: tuple[tuple[str, str], ...] = ()
    #: (module FQN, why): modules whose parameters were not captured and keep their size
    missed: tuple[tuple[str, str], ...] = ()
    #: (layer FQN, reason): layers inside parts whose channels must stay
    pins: tuple[tuple[str, str], ...] = ()

    def describe(self) -> str:
        missed = "; ".join(f"{_name(f)} (why: {w})" for f, w in self.missed) or "none"
        split = "; ".join(f"{_name(f)} (why: {w})" for f, w in self.split)
        return (
            f"captured in parts: {', '.join(self.captured)}; not captured (parameters keep "
            f"their size): {missed}; split into parts: {split}. Each part's inputs and outputs "
            "are pinned (the whole model could not be traced; pruning happens inside parts)"
        )


def _name(fqn: str) -> str:
    return fqn or "<model>"


def first_line(e: BaseException | str, limit: int = 160) -> str:
    """The first line of an error message, cut to ``limit`` characters."""
    line = str(e).splitlines()[0] if str(e) else type(e).__name__
    return line if len(line) <= limit else line[: limit - 3].rstrip() + "..."


@dataclass(frozen=True, slots=True, eq=False)
class Parts:
    """The graphs of a partially captured model, each with the inputs of its recorded call."""

    graph_modules: tuple[fx.GraphModule, ...]
    inputs: tuple[tuple[torch.Tensor, ...], ...]
    summary: PartsSummary


class FlatCall(nn.Module):
    """One recorded call of ``part`` with its tensors as positional inputs.

    ``forward(x0, ..., xn)`` (generated per call by :func:`flat_call`, so tracers see one named
    placeholder per tensor) rebuilds the call's ``(args, kwargs)``, with its constants baked in,
    and calls ``part``.
    """

    def __init__(self, part: nn.Module, spec: pytree.TreeSpec, leaves: list[Any],
                 slots: list[bool]) -> None:
        super().__init__()
        self.part = part
        self._spec, self._leaves, self._slots = spec, leaves, slots

    def call(self, *tensors: Any) -> Any:
        args, kwargs = self.arguments(tensors)
        return self.part(*args, **kwargs)

    def arguments(self, tensors: Sequence[Any]) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The call's ``(args, kwargs)`` with ``tensors`` in their places."""
        it = iter(tensors)
        leaves = [next(it) if slot else c for slot, c in zip(self._slots, self._leaves,
                                                               strict=True)]
        args, kwargs = pytree.tree_unflatten(leaves, self._spec)
        return tuple(args), dict(kwargs)


def flat_call(part: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]
              ) -> tuple[FlatCall, tuple[torch.Tensor, ...]]:
    """A :class:`FlatCall` of ``part(*args, **kwargs)`` and the call's tensors, in order."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    slots = [isinstance(v, torch.Tensor) for v in leaves]
    tensors = tuple(v for v in leaves if isinstance(v, torch.Tensor))
    names = ", ".join(f"x{i}" for i in range(len(tensors)))
    scope: dict[str, Any] = {}
    exec(f"def forward(self, {names}):\n    return self.call({names})", scope)
    cls = type(f"FlatCall_{type(part).__name__}", (FlatCall,), {"forward": scope["forward"]})
    consts = [None if s else v for s, v in zip(slots, leaves, strict=True)]
    return cls(part, spec, consts, slots), tensors


@dataclass(slots=True)
class _Record:
    """Every module call of one run of the model."""

    order: dict[str, int] = field(default_factory=dict)  # FQN -> index of its first call
    count: Counter[str] = field(default_factory=Counter)
    inside: dict[str, Counter[str]] = field(default_factory=dict)  # FQN -> calls made inside it
    calls: dict[str, list[tuple[tuple[Any, ...], dict[str, Any]]]] = field(default_factory=dict)
    bad: dict[str, str] = field(default_factory=dict)  # FQN -> why its inputs are not a part's


def _unsupported(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
    for leaf in pytree.tree_leaves((args, kwargs)):
        if not isinstance(leaf, (torch.Tensor, *_CONSTANTS)):
            return f"called with {type(leaf).__name__}, not tensors"
        if isinstance(leaf, torch.Tensor) and not leaf.numel():
            return f"called with an empty tensor {tuple(leaf.shape)}"
    return None


def _record(model: nn.Module, inputs: tuple[Any, ...], keep: Callable[[str], bool],
            store: Callable[[Any], Any]) -> _Record:
    """Run ``model`` once, recording each call of each submodule (``store``d when ``keep``)."""
    rec = _Record()
    stack: list[str] = []

    def pre(fqn: str) -> Callable[..., None]:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            rec.order.setdefault(fqn, len(rec.order))
            rec.count[fqn] += 1
            for outer in stack:
                rec.inside.setdefault(outer, Counter())[fqn] += 1
            stack.append(fqn)
            why = _unsupported(args, kwargs)
            if why is not None:
                rec.bad.setdefault(fqn, why)
            elif keep(fqn):
                rec.calls.setdefault(fqn, []).append(pytree.tree_map(store, (args, kwargs)))
        return hook

    def post(_m: nn.Module, _args: Any, _out: Any) -> None:
        stack.pop()

    handles = []
    for fqn, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(pre(fqn), with_kwargs=True))
        handles.append(m.register_forward_hook(post, always_call=True))
    try:
        with torch.no_grad():
            model(*inputs)
    except Exception as e:
        raise CaptureError(
            f"{type(model).__name__} could not be traced whole and fails on the example inputs "
            f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}), so its parts "
            "cannot be recorded either. fix: pass example_inputs the model accepts."
        ) from e
    finally:
        for h in handles:
            h.remove()
    return rec


def _to_meta(v: Any) -> Any:
    return torch.empty_like(v, device="meta") if isinstance(v, torch.Tensor) else v


def _detach(v: Any) -> Any:
    return v.detach() if isinstance(v, torch.Tensor) else v


def _has_state(m: nn.Module) -> bool:
    """Whether ``m`` holds tensors pruning could slice (parameters, or buffers: FrozenBN)."""
    return any(True for _ in itertools.chain(m.parameters(), m.buffers()))


def capture_parts(model: nn.Module, copied: nn.Module, inputs: tuple[Any, ...],
                  whole: CaptureError, trace: TracePart) -> Parts:
    """Capture the largest submodules of ``model`` that ``trace`` can capture.

    Args:
        model: the caller's model; it is not modified (it is run on a deep copy).
        copied: the eval-mode copy to trace (on the meta device or real); parts' graphs are
            rooted at it.
        inputs: the whole model's example inputs.
        whole: why the whole model could not be captured.
        trace: the tracer of one part (:data:`TracePart`).

    Returns:
        One graph per call of each part, with that call's inputs (meta tensors when ``copied``
        is on the meta device), and a summary for the report.

    Raises:
        CaptureError: when no part could be captured, or the model fails on ``inputs``.
    """
    on_meta = any(t.is_meta for t in copied.parameters())
    runner = copy.deepcopy(model).eval()
    rec = _record(runner, inputs, lambda _f: True, _to_meta)
    walk = _Walk(copied, rec, trace)
    walk.visit("", copied, why=first_line(whole))
    if not walk.found:
        raise CaptureError(
            f"{whole}\n  partial capture found no submodule with parameters that can be "
            f"captured either: {walk.describe_missed()}"
        ) from whole
    found = sorted(walk.found, key=lambda f: rec.order[f])
    if not on_meta:  # record the real inputs of the parts only
        wanted = set(found)
        rec = _record(runner, inputs, wanted.__contains__, _detach)
        if any(len(rec.calls.get(f, ())) != len(walk.found[f]) for f in found):
            raise CaptureError(f"{type(model).__name__} calls its layers differently from one "
                               "run to the next on the same inputs; it cannot be captured")
    gms: list[fx.GraphModule] = []
    flat_inputs: list[tuple[torch.Tensor, ...]] = []
    for fqn in found:
        for k, gm in enumerate(walk.found[fqn]):
            args, kwargs = rec.calls[fqn][k]
            flat_inputs.append(flat_call(copied.get_submodule(fqn), args, kwargs)[1])
            gms.append(gm)
    summary = PartsSummary(first_line(whole), tuple(found), tuple(walk.split),
                           tuple(walk.missed), _shared_parameter_pins(copied, found))
    return Parts(tuple(gms), tuple(flat_inputs), summary)


class _Walk:
    """The top-down walk: try a module, split it into its children when it fails."""

    def __init__(self, root: nn.Module, rec: _Record, trace: TracePart) -> None:
        self.root, self.rec, self.trace = root, rec, trace
        self.found: dict[str, list[fx.GraphModule]] = {}
        self.split: list[tuple[str, str]] = []
        self.missed: list[tuple[str, str]] = []
        self.graphs = 0
        self.stateful = {f for f, m in root.named_modules() if _has_state(m)}

    def visit(self, fqn: str, module: nn.Module, why: str | None = None) -> None:
        if not _has_state(module):
            return
        if why is None:
            why = self._refusal(fqn)
        if why is None:
            try:
                self.found[fqn] = self._trace_calls(fqn, module)
                return
            except CaptureError as e:
                why = first_line(e)
        children = [(n, c) for n, c in module.named_children() if _has_state(c)]
        if not children or (fqn and not any(f.startswith(fqn + ".") for f in self.rec.count)):
            self.missed.append((fqn, why))  # nothing below it was called: reported once, here
            return
        if any(True for _ in module.parameters(recurse=False)):
            self.missed.append((f"{_name(fqn)} (its own parameters)", why))
        self.split.append((fqn, why))
        for name, child in children:
            self.visit(f"{fqn}.{name}" if fqn else name, child)

    def _refusal(self, fqn: str) -> str | None:
        rec = self.rec
        if not rec.count[fqn]:
            return "not called on the example inputs"
        if fqn in rec.bad:
            return rec.bad[fqn]
        inside = rec.inside.get(fqn, Counter())
        for sub, n in rec.count.items():
            if sub.startswith(fqn + ".") and inside[sub] != n and sub in self.stateful:
                return f"{sub} inside it is also called from outside it"
        return None

    def _trace_calls(self, fqn: str, module: nn.Module) -> list[fx.GraphModule]:
        gms = []
        for k, (args, kwargs) in enumerate(self.rec.calls[fqn]):
            flat, tensors = flat_call(module, args, kwargs)
            n = self.rec.count[fqn]
            name = fqn if n == 1 else f"{fqn} (call {k + 1} of {n})"
            gm = rebase(self.trace(flat, tensors, type(module).__name__), fqn, self.root, name,
                        self.graphs)
            object.__setattr__(gm, "_shrink_call", (fqn, flat))
            gms.append(gm)
            self.graphs += 1
        return gms

    def describe_missed(self) -> str:
        return "; ".join(f"{_name(f)}: {w}" for f, w in self.missed) or "no parameters"


def rebase(flat_gm: fx.GraphModule, prefix: str, root: nn.Module, part: str,
           tag: int) -> fx.GraphModule:
    """The graph of a :class:`FlatCall` of ``root.get_submodule(prefix)``, re-rooted at
    ``root``: every target and module-stack entry becomes the layer's FQN in ``root``.

    Tensors the tracer attached to its own root (constants it folded) keep a top-level name,
    made unique with ``tag`` (analysis keys the tensors used in forward by name).
    """
    def moved(path: str) -> str | None:
        if path == "part" or path.startswith("part."):
            return prefix + path[len("part"):]
        return None

    objects: dict[str, Any] = {}
    graph = flat_gm.graph
    for node in graph.nodes:
        if node.op in ("call_module", "get_attr"):
            old = str(node.target)
            new = moved(old)
            if new is None:
                new, obj = f"{old}_part{tag}", _attr(flat_gm, old)
            else:
                obj = root.get_submodule(new) if node.op == "call_module" else _attr(root, new)
            objects[new] = obj
            node.target = new
        stack = node.meta.get("nn_module_stack")
        if stack:
            node.meta["nn_module_stack"] = {
                k: (moved(v[0]) or v[0], *v[1:]) if isinstance(v, tuple) else v
                for k, v in stack.items()
            }
    gm = fx.GraphModule(objects, graph, type(root.get_submodule(prefix)).__name__)
    for attr in ("_shrink_leaf_types", "_shrink_frontend"):
        if hasattr(flat_gm, attr):
            object.__setattr__(gm, attr, getattr(flat_gm, attr))
    object.__setattr__(gm, "_shrink_source", root)
    object.__setattr__(gm, "_shrink_part", part)
    return gm


def _attr(obj: Any, path: str) -> Any:
    for atom in path.split("."):
        obj = getattr(obj, atom)
    return obj


def _shared_parameter_pins(root: nn.Module, parts: list[str]) -> tuple[tuple[str, str], ...]:
    """Layers in parts whose parameters another module also owns: tied weights stay."""
    owners: dict[int, list[str]] = {}
    for fqn, m in root.named_modules(remove_duplicate=False):
        for p in m.parameters(recurse=False):
            owners.setdefault(id(p), []).append(fqn)
    pins = []
    for fqns in owners.values():
        if len(set(fqns)) < 2:
            continue
        for f in dict.fromkeys(fqns):
            if any(f == p or f.startswith(p + ".") for p in parts):
                others = [o for o in fqns if o != f]
                pins.append((f, f"{f} shares a parameter with {others}: tied weights stay"))
    return tuple(pins)


def part_calls(captured_graphs: Sequence[fx.GraphModule], inputs: Sequence[Sequence[Any]]
               ) -> list[tuple[str, tuple[Any, ...], dict[str, Any]]]:
    """``(part FQN, args, kwargs)`` of the recorded call each part graph was traced from, with
    the graph's inputs in their places: to run a part of another copy of the model (a pruned
    one) as the model ran it."""
    calls = []
    for gm, xs in zip(captured_graphs, inputs, strict=True):
        fqn, flat = gm._shrink_call  # type: ignore[misc]
        calls.append((fqn, *flat.arguments(xs)))
    return calls
