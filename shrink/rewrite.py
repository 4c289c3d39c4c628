"""apply / apply_: rebuild every layer a plan touches, physically smaller.

Each layer is rebuilt by its rule as a copy of itself with new channel counts and the kept
slices of its parameters and buffers (:func:`shrink.rules.base.recast`; the rule checks that the
counts fit its groups), then set on its parent. Nothing else of the model changes: other
attributes, hooks, mode and dtype stay.
"""

from __future__ import annotations

import itertools
import logging

import torch
from torch import nn

from shrink.bind import describe_gaps, describe_mismatch
from shrink.errors import InvariantError, PlanError, RewriteError
from shrink.interop import hf
from shrink.modcopy import copy_module
from shrink.plan import Plan, Side, fingerprint, fits
from shrink.provenance import plans_of, record
from shrink.rules import rule_for
from shrink.rules.base import Keep

log = logging.getLogger(__name__)


def apply(model: nn.Module, plan: Plan) -> nn.Module:
    """Return a pruned copy of ``model``; ``model`` itself is untouched.

    The rebuilt layers are made from ``model``'s layers and put in place while the rest is deep
    copied, so the large weights of replaced layers are never copied whole.

    Raises:
        PlanError: when the plan was made for a different model.
        RewriteError: when a layer cannot be rebuilt.

    Example:
        >>> pruned = shrink.apply(model, plan)
    """
    check_plan(model, plan)
    return apply_unchecked(model, plan)


def apply_unchecked(model: nn.Module, plan: Plan) -> nn.Module:
    """:func:`apply` without :func:`check_plan`: for a plan made from ``model`` in the same
    call, whose result the caller checks anyway (:func:`shrink.prune` with verification; the
    oracle runs the result against the masked original)."""
    modules = _by_name(model)
    replaced = _rebuild(model, plan, modules)
    memo: dict[int, object] = {id(modules[f]): new for f, new in replaced.items()}
    for fqn, new_t in _rebuild_tensors(model, plan).items():
        memo[id(_tensor(model, fqn))] = new_t
    out = copy_module(model, memo)
    _retie(model, out)
    _set_attributes(out, plan)
    # (the shape probe applies plans to meta copies many times: nothing to describe there)
    meta = any(p.is_meta for m in modules.values() for p in m._parameters.values()
               if p is not None)
    note = None if meta else hf.settle_config(model, out)
    if note:
        log.info("shrink: %s", note)
    record(out, (*plans_of(model), plan))
    return out


def check_plan(model: nn.Module, plan: Plan) -> None:
    if not fits(model, plan.model):
        fp = fingerprint(model)
        why = describe_mismatch(model, plan.extents()) or "parameter names or shapes differ"
        raise PlanError(
            f"this plan was made for a different model (plan fingerprint {plan.model}, model "
            f"{fp}): {why}. Build the same architecture the plan was made from, or re-create the "
            "plan for this model."
        )
    mismatch = describe_mismatch(model, plan.extents())
    if mismatch:
        raise PlanError(f"plan does not fit the model: {mismatch}")
    gap = describe_gaps(model, plan)
    if gap:
        raise PlanError(f"plan is incomplete: {gap}. It was edited or is corrupt; re-create it "
                        "with shrink.prune.")


def apply_(model: nn.Module, plan: Plan) -> nn.Module:
    """Prune ``model`` in place (its layers are replaced) and return it."""
    check_plan(model, plan)
    before = plans_of(model)
    owners = _shared_parameters(model)
    tensors = _rebuild_tensors(model, plan)
    modules = _by_name(model)
    replaced = {id(modules[f]): new for f, new in _rebuild(model, plan, modules).items()}
    for fqn, new_t in tensors.items():
        owner_name, _, attr = fqn.rpartition(".")
        owner = model.get_submodule(owner_name)
        if attr in owner._parameters:
            owner._parameters[attr] = new_t  # type: ignore[assignment]
        else:
            owner._buffers[attr] = new_t
    for mod in list(model.modules()):
        for name, child in list(mod._modules.items()):
            if child is not None and id(child) in replaced:
                mod._modules[name] = replaced[id(child)]  # every alias of a shared layer
    _retie(model, model, owners)
    _set_attributes(model, plan)
    record(model, (*before, plan))
    return model


def _shared_parameters(model: nn.Module) -> list[list[tuple[str, str]]]:
    """``(module fqn, attribute)`` of every parameter that more than one module holds."""
    owners: dict[int, list[tuple[str, str]]] = {}
    for fqn, mod in model.named_modules(remove_duplicate=False):
        for name, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((fqn, name))
    return [o for o in owners.values() if len(o) > 1]


def _retie(model: nn.Module, out: nn.Module,
           owners: list[list[tuple[str, str]]] | None = None) -> None:
    """Parameters ``model`` shares between modules (tied embeddings) are shared again in
    ``out``: each owner was rebuilt on its own, from the same kept positions.

    Raises:
        InvariantError: the rebuilt copies differ (the analysis did not tie their axes).
    """
    for group in _shared_parameters(model) if owners is None else owners:
        mods = [out.get_submodule(f) for f, _ in group]
        params = [m._parameters[a] for m, (_, a) in zip(mods, group, strict=True)]
        first = params[0]
        if all(p is first for p in params):
            continue
        if first is None or any(p is None or p.shape != first.shape or (
                not p.is_meta and not torch.equal(p, first)) for p in params[1:]):
            raise InvariantError(
                f"tied parameter {[f'{f}.{a}' for f, a in group]} was rebuilt differently by "
                "its owners; this is a shrink bug, please report it"
            )
        for m, (_, a) in zip(mods[1:], group[1:], strict=True):
            m._parameters[a] = first


def _set_attributes(model: nn.Module, plan: Plan) -> None:
    """Int attributes that forward uses as channel counts get the kept count."""
    extents = plan.extents()
    for (fqn, side), dropped in plan.drops().items():
        if side is Side.ATTR:
            owner, _, attr = fqn.rpartition(".")
            setattr(model.get_submodule(owner), attr, extents[(fqn, side)] - len(dropped))


def _tensor(model: nn.Module, fqn: str) -> torch.Tensor:
    owner_name, _, attr = fqn.rpartition(".")
    owner = model.get_submodule(owner_name)
    t = owner._parameters.get(attr)
    return t if t is not None else owner._buffers[attr]  # type: ignore[return-value]


def _rebuild_tensors(model: nn.Module, plan: Plan) -> dict[str, torch.Tensor]:
    """Sliced copies of the parameters/buffers the plan prunes (tensors used in forward)."""
    extents = plan.extents()
    out: dict[str, torch.Tensor] = {}
    for (fqn, side), dropped in plan.drops().items():
        axis = side.tensor_axis
        if axis is None:
            continue
        old = out.get(fqn, _tensor(model, fqn))
        keep = sorted(set(range(extents[(fqn, side)])).difference(dropped))
        with torch.no_grad():
            data = old.detach().index_select(axis, torch.as_tensor(keep, device=old.device)).clone()
        out[fqn] = (nn.Parameter(data, requires_grad=old.requires_grad)
                    if isinstance(old, nn.Parameter) else data)
    return out


def _by_name(model: nn.Module) -> dict[str, nn.Module]:
    """Every submodule of ``model`` by each of its names (one walk; ``get_submodule`` walks the
    path again for every name)."""
    return dict(model.named_modules(remove_duplicate=False))


def _rebuild(model: nn.Module, plan: Plan,
             modules: dict[str, nn.Module] | None = None) -> dict[str, nn.Module]:
    """New, smaller layers for every module the plan touches (``model`` is only read).
    ``modules``: :func:`_by_name` of ``model``, when the caller has it."""
    modules = _by_name(model) if modules is None else modules
    extents = plan.extents()
    per_module: dict[str, dict[Side, tuple[int, ...]]] = {}
    for (fqn, side), dropped in plan.drops().items():
        if side.tensor_axis is not None or side is Side.ATTR:
            continue
        per_module.setdefault(fqn, {})[side] = tuple(
            sorted(set(range(extents[(fqn, side)])).difference(dropped)))
    out: dict[str, nn.Module] = {}
    for fqn, keeps in per_module.items():
        old = modules[fqn] if fqn in modules else model.get_submodule(fqn)
        rule = rule_for(old)
        if rule is None:
            raise PlanError(f"plan prunes {fqn!r} ({type(old).__name__}), which has no rule")
        try:
            new = rule.shrink(old, Keep(keeps.get(Side.IN), keeps.get(Side.OUT),
                                        keeps.get(Side.HEADS)))
        except Exception as e:  # a layer's constructor may raise anything; name the layer
            raise RewriteError(
                f"could not rebuild {fqn!r} ({type(old).__name__}) with "
                f"{ {s.value: len(k) for s, k in keeps.items()} } channels: "
                f"{type(e).__name__}: {e}",
                module=fqn,
            ) from e
        _check_materialized(fqn, old, new)
        for hook_dict in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks"):
            getattr(new, hook_dict).update(getattr(old, hook_dict))
        out[fqn] = new
    return out


def _check_materialized(fqn: str, old: nn.Module, new: nn.Module) -> None:
    """Rules set every tensor of a rebuilt layer from ``old``'s slices: one on the meta device
    (a rule that builds its layer there) was forgotten.

    Raises:
        InvariantError: ``new`` holds a meta tensor and ``old`` holds none.
    """
    if not any(t is not None and t.is_meta for m in new.modules()
               for t in itertools.chain(m._parameters.values(), m._buffers.values())):
        return
    left = [n for n, t in itertools.chain(new.named_parameters(), new.named_buffers())
            if t.is_meta]
    if left and not any(t.is_meta for t in itertools.chain(old.parameters(), old.buffers())):
        raise InvariantError(
            f"the rebuilt {fqn!r} ({type(new).__name__}) still holds meta tensors {left}: its "
            "rule did not set them; this is a shrink bug, please report it"
        )
