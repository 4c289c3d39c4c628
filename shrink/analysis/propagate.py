"""Run the captured graph once, propagating channel ids alongside the real values.

The real execution gives every rule the exact shapes and the concrete values of non-tensor
arguments (``x.size(1) // 2``). Each node is dispatched to the rule for its module type or call
target; a node without a rule pins every id it touches and produces pinned ids (fail closed).
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import fx, nn

from shrink.capture import Captured, describe, to_meta
from shrink.errors import CaptureError
from shrink.fastmeta import fast_meta
from shrink.ids import Call, Ids, Tracker, ids_on_axis, iter_ids, map_values, source_location
from shrink.plan import Side
from shrink.rules import function_rule, rule_for


def _has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (tuple, list)):
        return any(_has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(_has_tensor(v) for v in value.values())
    return False


def _matches(ids: Any, out: Any) -> bool:
    """Whether a rule's result mirrors the runtime output's tensors."""
    if isinstance(out, torch.Tensor):
        return isinstance(ids, Ids) and ids.shape == tuple(out.shape)
    if isinstance(out, (tuple, list)):
        return isinstance(ids, (tuple, list)) and len(ids) == len(out) and all(
            _matches(i, o) for i, o in zip(ids, out, strict=False)
        )
    if isinstance(out, dict):
        return isinstance(ids, dict) and all(_matches(ids.get(k), v) for k, v in out.items())
    return True


_MAX_PARAM_IDS = 65_536
_MAX_TENSOR_IDS = 1 << 22  # per tensor used directly in forward
_MAX_TENSOR_IDS_TOTAL = 1 << 24  # over all of them (the union-find grows by one id per element)


class Propagator(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, tracker: Tracker) -> None:
        super().__init__(gm, garbage_collect_values=True)
        self.t = tracker
        self.ids: dict[fx.Node, Any] = {}
        self.modules: dict[str, nn.Module] = self.submodules  # fx walked the modules once
        part = getattr(gm, "_shrink_part", None)  # a model captured in parts: its boundary
        self.boundary = "" if part is None else f" (boundary of captured part {part!r})"
        self._source = getattr(gm, "_shrink_source", gm)
        self._model_tensors: set[str] | None = None

    @property
    def model_tensors(self) -> set[str]:
        """Names of the model's parameters and buffers (what a ``get_attr`` node may slice);
        listed when the first such node asks."""
        if self._model_tensors is None:
            source = self._source
            self._model_tensors = {f for f, _ in source.named_parameters()} | {
                f for f, _ in source.named_buffers()}
        return self._model_tensors

    def fetch_attr(self, target: str) -> Any:
        """A module by its name from the table fx made (its own walk of the path costs a
        ``Module.__getattr__`` per name part, per call); anything else as fx fetches it."""
        found = self.submodules.get(target)
        return found if found is not None else super().fetch_attr(target)

    def run_node(self, n: fx.Node) -> Any:
        self.current = n  # named by propagate() when the model fails on the example inputs
        out = super().run_node(n)
        self.ids[n] = self._propagate(n, out)
        return out

    def _propagate(self, n: fx.Node, out: Any) -> Any:
        t = self.t
        if n.op == "placeholder":
            reason = f"model input {n.name!r}{self.boundary}"
            return map_values(
                lambda v: t.fresh_pinned(tuple(v.shape), f"input:{n.name}", reason)
                if isinstance(v, torch.Tensor) else v,
                out,
            )
        if n.op == "get_attr":
            if not isinstance(out, torch.Tensor):
                return out
            if out.numel() == 1:
                return Ids(torch.full((1,) * out.ndim, -1).numpy(), tuple(out.shape))
            if str(n.target).startswith("_shrink_constant_"):
                return t.fresh_pinned(tuple(out.shape), n.name,
                                      f"constant {n.name!r} created in forward at "
                                      f"{source_location(n)}")
            reason = (
                f"tensor {n.target!r} is used directly in forward at {source_location(n)}, "
                "not through a layer with a rule"
            )
            shape = tuple(out.shape)
            if str(n.target) not in self.model_tensors:  # folded by the tracer: cannot slice
                return t.fresh_pinned(shape, n.name, f"{reason}; it is a constant the tracer "
                                      "computed, not a parameter or buffer of the model")
            if str(n.target) in t.tensors:  # used again
                return Ids(t.tensors[str(n.target)][0], shape)
            used = sum(full.size for full, _ in t.tensors.values())
            if (out.is_floating_point() and out.numel() <= _MAX_TENSOR_IDS
                    and used + out.numel() <= _MAX_TENSOR_IDS_TOTAL):
                # an id per element; analysis later finds the axis they line up with
                full = t.fresh(out.numel(), str(n.target)).reshape(shape)
                t.tensors[str(n.target)] = (full, reason)
                return Ids(full, shape)
            # ids vary along the tensor's longest axis (its likely channel axis), so the report
            # shows true group sizes without an id per element
            axis = max(range(len(shape)), key=lambda d: (shape[d], d)) if shape else 0
            if not shape or shape[axis] > _MAX_PARAM_IDS:
                return t.fresh_pinned(shape, n.name, reason)
            along = t.fresh(shape[axis], str(n.target))
            t.pin(along, reason)
            return ids_on_axis(along, shape, axis)
        if n.op == "output":
            for ids in iter_ids(fx.node.map_arg(n.args, lambda a: self.ids[a])):
                t.pin(ids.a, f"model output{self.boundary}")
            return None

        args = fx.node.map_arg(n.args, lambda a: self.ids[a])
        kwargs = fx.node.map_arg(n.kwargs, lambda a: self.ids[a])
        call = Call(tuple(args), dict(kwargs), out, n, describe(n))
        result: Any = None
        handled = False
        if n.op == "call_module":
            module = self.modules[str(n.target)]
            rule = rule_for(module)
            if rule is not None:
                result, handled = rule.propagate(t, str(n.target), module, call), True
        else:
            frule = function_rule(n.target)
            if frule is not None:
                result, handled = frule(t, call), True
        if handled and _matches(result, out):
            return result
        return self._unknown(n, call, out, handled)

    def _unknown(self, n: fx.Node, call: Call, out: Any, handled: bool) -> Any:
        t = self.t
        has_ids = any(True for _ in iter_ids([call.args, call.kwargs]))
        if not has_ids and not _has_tensor(out):
            return out
        what = describe(n)
        if n.op == "call_module":
            what += f" ({type(self.modules[str(n.target)]).__name__})"
        why = "whose rule did not understand this call" if handled else "which has no rule"
        reason = f"flows through {what} at {call.where}, {why}"
        if has_ids:
            t.diagnose("pinned", reason)
        for ids in iter_ids([call.args, call.kwargs]):
            t.pin(ids.a, reason)
        return map_values(
            lambda v: t.fresh_pinned(tuple(v.shape), n.name, f"output of {what}, which has no rule")
            if isinstance(v, torch.Tensor) else v,
            out,
        )


class MetaUnsupportedError(Exception):
    """An op could not run on the meta device: analysis retries on a real copy."""


def propagate(captured: Captured, tracker: Tracker) -> None:
    """Fill ``tracker`` by running the captured graph on its example inputs."""
    with torch.no_grad():
        for k, gm in enumerate(captured.graph_modules):
            if k:  # a train-mode graph: its structure is what matters; run its layers in eval
                gm.eval()
            inputs = captured.graph_inputs[k] if captured.graph_inputs else captured.example_inputs
            if getattr(gm, "_shrink_frontend", "fx") == "export":
                from shrink.capture_export import flat_inputs

                inputs = tuple(flat_inputs(inputs))
            if captured.on_meta:
                inputs = to_meta(inputs)
            prop = Propagator(gm, tracker)
            try:
                with fast_meta() if captured.on_meta else contextlib.nullcontext():
                    prop.run(*inputs)
            except Exception as e:
                if captured.on_meta:
                    raise MetaUnsupportedError from e
                shapes = [f"{tuple(x.shape)} {str(x.dtype).replace('torch.', '')}"
                          if isinstance(x, torch.Tensor) else type(x).__name__
                          for x in inputs]
                node = getattr(prop, "current", None)
                at = "" if node is None else f" at node {describe(node)}"
                if node is not None and node.op == "call_module":
                    at = f" in layer {node.target!r} " \
                         f"({type(gm.get_submodule(str(node.target))).__name__})"
                mode = "training-mode graph (it uses layers that only run in training)" if k \
                    else "model"
                if captured.graph_inputs:
                    mode = f"captured part {getattr(gm, '_shrink_part', '')!r}"
                raise CaptureError(
                    f"the {mode} failed on example_inputs {shapes}{at}: {type(e).__name__}: "
                    f"{str(e).splitlines()[0] if str(e) else ''}\n"
                    "  fix: pass example_inputs of the shape and dtype the model expects in "
                    "training and inference (e.g. the model's native resolution)."
                ) from e


def pin_special_modules(gm: nn.Module, tracker: Tracker) -> None:
    """Pin layers whose parameters are shared with another layer, or that carry hooks."""
    owners: dict[int, list[str]] = {}
    modules = dict(gm.named_modules())
    for fqn, mod in modules.items():
        for pid in {id(p) for p in mod._parameters.values() if p is not None}:
            owners.setdefault(pid, []).append(fqn)
    hooked = {
        fqn for fqn, mod in modules.items()
        if mod._forward_hooks or mod._forward_pre_hooks
    }
    shared: dict[str, list[str]] = {}
    for fqns in owners.values():
        if len(fqns) > 1:
            for f in fqns:
                shared.setdefault(f, []).extend(o for o in fqns if o != f)
    tied = _tie_members(modules, tracker, owners)
    for (fqn, side), rec in tracker.members.items():
        if fqn in shared and (fqn, side) not in tied:
            tracker.pin(rec.ids, f"{fqn} shares a parameter with {shared[fqn]}: tied weights stay")
        if any(fqn == h or fqn.startswith(h + ".") or not h for h in hooked):
            tracker.pin(rec.ids, f"{fqn} has forward hooks shrink cannot see through")


def _tie_members(modules: dict[str, nn.Module], tracker: Tracker,
                 owners: dict[int, list[str]]) -> set[Any]:
    """Tied weights (a language model's input embedding and ``lm_head``): module axes that
    slice one shared parameter along the same dim are one channel per position, so they shrink
    together and :func:`shrink.apply` ties the sliced copies again. Returns the ``(fqn, side)``
    members that touch shared parameters only that way; any other member of a layer that
    shares a parameter is pinned by the caller. ``modules``: the graph module's
    ``named_modules()``."""
    uses: dict[int, list[tuple[tuple[str, Side], int]]] = {}
    touching: dict[tuple[str, Side], set[int]] = {}
    for key in tracker.members:
        fqn, side = key
        mod = modules.get(fqn)
        rule = None if mod is None else rule_for(mod)
        if rule is None or mod is None:
            continue
        for t, dim in rule.score_params(mod, side):
            if id(t) in owners and len(owners[id(t)]) > 1:
                uses.setdefault(id(t), []).append((key, dim))
                touching.setdefault(key, set()).add(id(t))
    tied_on: dict[tuple[str, Side], set[int]] = {}
    for pid, found in uses.items():
        owners_here = {k[0] for k, _ in found}
        for dim in {d for _, d in found}:
            keys = [k for k, d in found if d == dim]
            if {k[0] for k in keys} != set(owners[pid]) or len(owners_here) < 2:
                continue  # one owner slices it on an axis the other does not have
            first = tracker.members[keys[0]].ids
            if any(len(tracker.members[k].ids) != len(first) for k in keys):
                continue
            for k in keys[1:]:
                tracker.union(first, tracker.members[k].ids)
            for k in keys:
                tied_on.setdefault(k, set()).add(pid)
    return {k for k, pids in tied_on.items() if pids == touching[k]}
