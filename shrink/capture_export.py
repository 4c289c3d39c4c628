"""The torch.export front-end: an exported program, turned into the graph analysis reads.

``torch.export.export(model, inputs, strict=False)`` captures models torch.fx cannot trace
(Hugging Face transformers, Ultralytics YOLO, timm's mobilevit): it runs forward on fake tensors,
so Python control flow on shapes is simply executed. Its graph is ATen ops with every module
inlined; shrink's rules want layers as units. So the exported graph is rebuilt:

* every module that has a rule (or is in ``leaf_types``) becomes one ``call_module`` node again.
  The ops one call of such a module recorded are contiguous in the graph and carry that call in
  their ``nn_module_stack`` metadata; a call with one tensor in and one out is replaced by
  ``call_module(fqn, (x,))``. Modules whose ``forward`` takes more than one argument
  (attention) are exported with ``preserve_module_call_signature``, which records their exact
  call: arguments, keyword arguments and output structure.
* the ops outside those modules stay ATen ops (:mod:`shrink.rules.aten` knows them);
* parameters and buffers become ``get_attr`` nodes named by their FQN, as in an fx graph;
  constants the forward created become pinned tensors.

The graph takes the flattened example inputs (``torch.utils._pytree`` leaves, constants
included), so nested inputs work; :func:`flat_inputs` gives them.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import io
import logging
import operator
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import fx, nn
from torch.utils import _pytree as pytree

from shrink.errors import CaptureError
from shrink.rules import rule_for

CONSTANT_PREFIX = "_shrink_constant_"
_DROP = {"_assert_tensor_metadata", "_assert_scalar", "_assert_async",
         "sym_constrain_range_for_size", "sym_constrain_range"}


def flat_inputs(inputs: tuple[Any, ...]) -> list[Any]:
    """The leaves of the example inputs, in the order the exported graph's placeholders take."""
    return list(pytree.tree_leaves((inputs, {})))


def _units(model: nn.Module, leaf_types: Sequence[type[nn.Module]]) -> dict[str, nn.Module]:
    """The outermost modules that stay one node: those with a rule, or in ``leaf_types``."""
    units: dict[str, nn.Module] = {}
    for fqn, m in model.named_modules():
        if not fqn or any(fqn.startswith(u + ".") for u in units):
            continue
        if rule_for(m) is not None or isinstance(m, tuple(leaf_types)):
            units[fqn] = m
    return units


def _multi_arg(m: nn.Module) -> bool:
    try:
        params = inspect.signature(m.forward).parameters.values()
    except (TypeError, ValueError):
        return True
    return sum(1 for p in params if p.kind not in (p.VAR_KEYWORD,)) != 1


def export_program(model: nn.Module, inputs: tuple[Any, ...],
                   leaf_types: Sequence[type[nn.Module]] = ()) -> torch.export.ExportedProgram:
    """``torch.export.export`` (non-strict), preserving the call signature of multi-argument
    modules with a rule; without that when export refuses it (they are then inlined)."""
    units = _units(model, leaf_types)
    preserve = tuple(f for f, m in units.items() if _multi_arg(m))
    forward = model.forward

    @functools.wraps(forward)  # export names the inputs after forward's parameters
    def tensors_only(*args: Any, **kwargs: Any) -> tuple[torch.Tensor, ...]:
        return tuple(_tensor_leaves(forward(*args, **kwargs)))

    # outputs export cannot flatten (a transformers DynamicCache) are left out: the analysis
    # pins every output tensor anyway, and only tensors can be checked
    model.forward = tensors_only  # type: ignore[method-assign]
    # a Hugging Face model hands its KV cache object to every attention layer, and a call
    # signature can only be preserved over tensors: capture without the cache (the layers and
    # their channels are the same)
    try:
        with _quiet(), without_kv_cache(model):
            try:
                return torch.export.export(model, inputs, strict=False,
                                           preserve_module_call_signature=preserve)
            except Exception:
                if not preserve:
                    raise
            return torch.export.export(model, inputs, strict=False)
    finally:
        del model.forward


@contextlib.contextmanager
def without_kv_cache(model: nn.Module) -> Iterator[None]:
    """Run a Hugging Face model without its KV cache (``config.use_cache = False`` on every
    config it holds; T5's stacks have their own copies), restoring it afterwards. The cache is
    an object of its own, which neither a preserved call signature nor an ONNX graph takes."""
    configs: dict[int, Any] = {
        id(c): c for c in (getattr(m, "config", None) for m in model.modules())
        if getattr(c, "use_cache", None) is True}
    for c in configs.values():
        c.use_cache = False
    try:
        yield
    finally:
        for c in configs.values():
            c.use_cache = True


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """torch.export prints the partial graph to stderr and logs warnings when it fails; shrink
    reports the failure itself (one paragraph), so that output is held back."""
    torch_log = logging.getLogger("torch")
    level = torch_log.level
    torch_log.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()):
            yield
    finally:
        torch_log.setLevel(level)


def _tensor_leaves(value: Any) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensor_leaves(v)]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensor_leaves(v)]
    return []


def trace_export(copied: nn.Module, inputs: tuple[Any, ...],
                 leaf_types: Sequence[type[nn.Module]], name: str) -> fx.GraphModule:
    """Export ``copied`` and rebuild the graph with its rule modules as ``call_module`` nodes.

    Raises:
        CaptureError: when torch.export cannot capture the model.
    """
    try:
        ep = export_program(copied, inputs, leaf_types)
    except Exception as e:
        raise CaptureError(
            f"torch.export could not capture {name}: {type(e).__name__}: {_first_line(e)}\n"
            "  why: export needs forward to run on fake tensors with the example inputs' "
            "shapes; data-dependent Python control flow or unsupported ops stop it.\n"
            "  fix: pass example inputs the model accepts, or keep the offending module opaque "
            "with leaf_types=[ThatModule] (its channels then stay)."
        ) from e
    graph = _rebuild(ep, copied, leaf_types)
    gm = fx.GraphModule(copied, graph, name)
    object.__setattr__(gm, "_shrink_leaf_types", tuple(leaf_types))
    object.__setattr__(gm, "_shrink_source", copied)
    object.__setattr__(gm, "_shrink_frontend", "export")
    return gm


def _first_line(e: BaseException) -> str:
    """The first non-blank line of an error (export's messages may start with a graph dump)."""
    return next((ln.strip() for ln in str(e).splitlines() if ln.strip()), "")


def _owner(node: fx.Node, units: dict[str, nn.Module]) -> tuple[str, str] | None:
    """``(call key, fqn)`` of the outermost unit module whose call produced ``node``."""
    stack = node.meta.get("nn_module_stack") or {}
    for key, entry in stack.items():
        fqn = entry[0] if isinstance(entry, tuple) else str(entry)
        if fqn in units:
            return str(key), fqn
    return None


def _rebuild(ep: torch.export.ExportedProgram, root: nn.Module,
             leaf_types: Sequence[type[nn.Module]]) -> fx.Graph:
    from torch.export.graph_signature import InputKind, OutputKind, TensorArgument

    sig = ep.graph_signature
    units = _units(root, leaf_types)
    calls = {e.fqn: e.signature for e in ep.module_call_graph if e.fqn and e.signature}
    old = list(ep.graph.nodes)
    by_name = {n.name: n for n in old}

    # placeholders: parameters/buffers by FQN, constants as pinned attributes, user inputs
    g = fx.Graph()
    env: dict[fx.Node, Any] = {}
    frozen: set[fx.Node] = set()  # placeholders that are not activations
    n_const = 0
    for spec, n in zip(sig.input_specs, [n for n in old if n.op == "placeholder"], strict=True):
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            env[n] = g.get_attr(str(spec.target))
            frozen.add(n)
        elif spec.kind in (InputKind.CONSTANT_TENSOR, InputKind.CUSTOM_OBJ):
            value = ep.constants[str(spec.target)]
            attr = f"{CONSTANT_PREFIX}{n_const}"
            n_const += 1
            setattr(root, attr, value)
            env[n] = g.get_attr(attr)
            frozen.add(n)
        else:
            env[n] = g.placeholder(n.name)
        env[n].meta = dict(n.meta)
        if n in frozen and n.users:  # where forward uses it, for the reasons that name it
            env[n].meta["stack_trace"] = next(iter(n.users)).meta.get("stack_trace")

    for n in old:
        if n.op == "get_attr":  # a higher-order op's body (``torch.no_grad()`` in forward)
            attr = f"{CONSTANT_PREFIX}{n_const}"
            n_const += 1
            setattr(root, attr, getattr(ep.graph_module, str(n.target)))
            env[n] = g.get_attr(attr)
            frozen.add(n)

    # runs of nodes that one call of a unit module recorded
    runs: list[tuple[tuple[str, str] | None, list[fx.Node]]] = []
    for n in old:
        if n.op != "call_function":
            continue
        owner = _owner(n, units)
        if runs and owner is not None and runs[-1][0] == owner:
            runs[-1][1].append(n)
        else:
            runs.append((owner, [n]))
    n_runs: dict[str, int] = {}
    for owner, _ in runs:
        if owner is not None:
            n_runs[owner[1]] = n_runs.get(owner[1], 0) + 1

    def copy_node(n: fx.Node) -> None:
        if (getattr(n.target, "_opname", "") in _DROP or n.target is torch._assert) \
                and not n.users:
            return
        env[n] = g.node_copy(n, lambda a: env[a])

    for owner, nodes in runs:
        if owner is None:
            for n in nodes:
                copy_node(n)
            continue
        fqn = owner[1]
        inside = set(nodes)
        acts: list[fx.Node] = []
        for n in nodes:
            for a in n.all_input_nodes:
                if a not in inside and a not in frozen and a not in acts:
                    acts.append(a)
        outs = [n for n in nodes if any(u not in inside for u in n.users)]
        # ``x.to(dtype)`` with x already that dtype returns x itself, and export then hands
        # the module's *input* on through that node (RMSNorm's residual): it is the input
        aliases = [n for n in outs if _is_noop_to(n) and n.args[0] in acts]
        outs = [n for n in outs if n not in aliases]
        signature = calls.get(fqn) if n_runs[fqn] == 1 else None
        call: fx.Node | None = None
        if signature is not None:
            leaves = [env[by_name[a.name]] if isinstance(a, TensorArgument) else
                      getattr(a, "value", None) for a in signature.inputs]
            try:
                args, kwargs = pytree.tree_unflatten(leaves, signature.in_spec)
            except Exception:
                signature = None
            else:
                call = g.call_module(fqn, tuple(args), dict(kwargs))
                paths = _leaf_paths(signature.out_spec)
                for a, path in zip(signature.outputs, paths, strict=False):
                    if isinstance(a, TensorArgument) and a.name in by_name:
                        item: fx.Node = call
                        for key in path:
                            item = g.call_function(operator.getitem, (item, key))
                        env[by_name[a.name]] = item
        elif len(acts) == 1 and len(outs) == 1 and not _multi_arg(units[fqn]):
            call = g.call_module(fqn, (env[acts[0]],))
            env[outs[0]] = call
        if call is None:  # cannot be made one node: its ops stay inline (and pin its weights)
            for n in nodes:
                copy_node(n)
            continue
        for n in aliases:
            env[n] = env[n.args[0]]  # type: ignore[index]
        call.meta["nn_module_stack"] = dict(nodes[0].meta.get("nn_module_stack") or {})
        call.meta["stack_trace"] = nodes[0].meta.get("stack_trace")
        if any(o not in env for o in outs):
            raise CaptureError(f"torch.export front-end: the outputs of {fqn!r} could not be "
                               "matched to its call; capture with capture='fx'")

    user = [s for s in sig.output_specs if s.kind == OutputKind.USER_OUTPUT]
    out_node = next(n for n in old if n.op == "output")
    flat = list(out_node.args[0])
    kept = flat[len(flat) - len(user):] if user else []
    g.output(tuple(fx.node.map_arg(kept, lambda a: env[a])))
    for n in list(g.nodes):
        if n.op == "get_attr" and not n.users:
            g.erase_node(n)
    g.lint()
    return g


def _is_noop_to(n: fx.Node) -> bool:
    """``aten.to``/``aten._to_copy`` that keeps its input's dtype and device: the same tensor."""
    if getattr(n.target, "_opname", "") not in ("to", "_to_copy") or not n.args:
        return False
    src = n.args[0]
    a = src.meta.get("val") if isinstance(src, fx.Node) else None
    b = n.meta.get("val")
    return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)
            and a.dtype == b.dtype and a.device == b.device and a.shape == b.shape)


def _leaf_paths(spec: Any) -> list[tuple[Any, ...]]:
    """The index path of every leaf of a pytree spec, in leaf order."""
    n = spec.num_leaves
    tree = pytree.tree_unflatten(list(range(n)), spec)
    paths: list[tuple[Any, ...]] = [()] * n

    def walk(node: Any, path: tuple[Any, ...]) -> None:
        if isinstance(node, int) and not isinstance(node, bool) and 0 <= node < n:
            paths[node] = path
            return
        if isinstance(node, dict):
            for k, v in node.items():
                walk(v, (*path, k))
        elif isinstance(node, (tuple, list)):
            for i, v in enumerate(node):
                walk(v, (*path, i))

    walk(tree, ())
    return paths
