"""Save and load pruned models without pickle: one safetensors file holding weights and plan.

Format (``.safetensors``, version 1). The file is a standard safetensors file: an 8-byte
little-endian header length, a JSON header, then raw tensor bytes. It holds

* every tensor of the pruned model's ``state_dict()`` under its own name, stored once when
  several names share one tensor (tied weights); the other names are listed as aliases;
* in the header's ``__metadata__`` (string to string):

  - ``"format"``: ``"shrink.pruned"`` and ``"format_version"``: ``"1"``;
  - ``"plan"``: the plan's canonical JSON (:meth:`shrink.Plan.to_json`), whose fingerprint
    names the *original* architecture;
  - ``"aliases"``: JSON object ``{alias name: stored name}``;
  - ``"shrink_version"``: the writer's version (informational).

Nothing in the file is code: loading parses JSON and copies raw bytes (safetensors checks that
the header and offsets cover the file exactly). :func:`load` builds the pruned architecture by
applying the plan to a freshly built original model (:func:`shrink.apply`), then copies the
weights in, checking every name, shape and dtype. One file means the plan and the weights can
never be mixed up between runs; ``shrink.load_plan(path)`` reads the plan alone.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink._version import __version__
from shrink.api import Result
from shrink.bind import axis_length, describe_mismatch
from shrink.errors import ConfigError, PlanError
from shrink.plan import Plan, Side, fingerprint, fits
from shrink.provenance import plans_of
from shrink.rewrite import apply
from shrink.rules import rule_for

FORMAT = "shrink.pruned"
FORMAT_VERSION = "1"
CHAIN_VERSION = "2"  # a model pruned more than once: "later_plans" follows "plan"
_VERSIONS = (FORMAT_VERSION, CHAIN_VERSION)
_MAX_HEADER = 100 * 1024 * 1024  # the safetensors limit


def _safetensors() -> Any:
    try:
        import safetensors.torch
    except ImportError as e:
        raise ImportError(
            "shrink.save/shrink.load need the 'safetensors' package: pip install 'shrink[io]'"
        ) from e
    return safetensors


def save(
    pruned: nn.Module | Result, path: str | os.PathLike[str], *, plan: Plan | None = None
) -> Path:
    """Write a pruned model (weights + plan) to one safetensors file; no pickle.

    Args:
        pruned: the pruned model (as :func:`shrink.compress`, :func:`shrink.apply` or
            :func:`shrink.load` returned it, or a deep copy of it, fine-tuned or not; it
            remembers its plans, see :mod:`shrink.provenance`), or the :class:`~shrink.Result`
            of :func:`shrink.prune` / :func:`shrink.from_masks`. A model pruned several times
            (``prune_iteratively``) is saved with every plan, oldest first.
        path: file to write (conventionally ``*.safetensors``); replaced atomically.
        plan: the plan that produced ``pruned``, for a model that does not remember it (its
            layers were swapped by hand after pruning).

    Returns:
        The path written.

    Raises:
        ConfigError: no plan, or ``path`` is a directory.
        PlanError: the plan did not produce this model (its layer sizes disagree).

    Example:
        >>> shrink.save(shrink.compress(model, 0.5), "small.safetensors")
        >>> small = shrink.load(torchvision.models.resnet18(), "small.safetensors")
    """
    model, chain = _model_and_plans(pruned, plan)
    _check_produced_by(model, chain[-1])
    st = _safetensors()
    tensors, aliases = _dedup(model.state_dict(keep_vars=True))
    metadata = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION if len(chain) == 1 else CHAIN_VERSION,
        "shrink_version": __version__,
        "plan": chain[0].to_json(),
        "aliases": json.dumps(aliases, sort_keys=True),
    }
    if len(chain) > 1:
        metadata["later_plans"] = json.dumps([json.loads(p.to_json()) for p in chain[1:]])
    data = st.torch.save(tensors, metadata=metadata)
    target = Path(path)
    if target.is_dir():
        raise ConfigError(f"shrink.save writes one file, but {str(target)!r} is a directory. "
                          "Pass a file path such as 'model.safetensors'.")
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target


def load(model: nn.Module, path: str | os.PathLike[str]) -> nn.Module:
    """Rebuild a pruned model saved by :func:`save` from a freshly built original ``model``.

    Args:
        model: the original, unpruned architecture (e.g. ``torchvision.models.resnet18()``) in
            the dtype the file was saved in; it is not modified (its weights are irrelevant).
        path: a file written by :func:`save`.

    Returns:
        A new, pruned model with the saved weights, bit for bit, on ``model``'s device.

    Raises:
        PlanError: the file is not a shrink file, is truncated or corrupt, or was saved from a
            different architecture (the message names the first parameter that differs).

    Example:
        >>> small = shrink.load(torchvision.models.resnet18(), "small.safetensors")
    """
    tensors, metadata = _read(path)
    plan = _plan_from_metadata(metadata, model, path)
    later = _later_plans(metadata, model, path)
    aliases = _json_field(metadata, "aliases", path)
    if not isinstance(aliases, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in aliases.items()
    ):
        raise PlanError(f"{_name(path)}: 'aliases' must map names to names; the file is corrupt")
    if not fits(model, plan.model):
        fp = fingerprint(model)
        raise PlanError(
            f"{_name(path)} was saved from a different model (plan fingerprint {plan.model}, "
            f"model {fp}): {_explain(model, plan, tensors, aliases)}. Build the architecture "
            "the file "
            "was saved from (same class, constructor arguments and dtype), then load."
        )
    pruned = apply(model, plan)
    for i, step in enumerate(later, start=2):
        try:
            pruned = apply(pruned, step)
        except PlanError as e:
            raise PlanError(f"{_name(path)}: plan {i} of {len(later) + 1} does not fit the "
                            f"model the earlier ones produced ({e}); the file is corrupt") from e
    state = pruned.state_dict(keep_vars=True)
    for alias, stored in aliases.items():
        if stored in tensors:
            tensors[alias] = tensors[stored]
    _check_state(state, tensors, path)
    with torch.no_grad():
        for name, dst in state.items():
            dst.copy_(tensors[name])
    return pruned


def load_plan(path: str | os.PathLike[str]) -> Plan:
    """The plan stored in a file written by :func:`save` (nothing is applied); for a model
    pruned several times, the first one (made for the original architecture).

    Raises:
        PlanError: the file is not a shrink file or its plan is malformed.
    """
    _, metadata = _read(path)
    return _plan_from_metadata(metadata, None, path)


# ---------------------------------------------------------------------------- saving helpers
def _model_and_plans(
    pruned: nn.Module | Result, plan: Plan | None
) -> tuple[nn.Module, tuple[Plan, ...]]:
    """The model to save and the plans that made it, oldest first."""
    if isinstance(pruned, Result):
        model, plan = pruned.model, plan if plan is not None else pruned.plan
    elif isinstance(pruned, nn.Module):
        model = pruned
    else:
        raise ConfigError(f"shrink.save expects a pruned nn.Module or a shrink.Result, got "
                          f"{type(pruned).__name__}")
    chain = plans_of(model)
    if plan is None:
        if not chain:
            raise ConfigError(
                f"shrink.save cannot tell which plan produced this {type(model).__name__}: it "
                "was not returned by shrink (compress/prune/apply/load), or its layers were "
                "changed afterwards. Pass the plan: shrink.save(model, path, plan=result.plan), "
                "or save the Result of shrink.prune itself."
            )
        return model, chain
    if not isinstance(plan, Plan):
        raise ConfigError(f"plan= must be a shrink Plan, got {type(plan).__name__}")
    return model, chain if chain and chain[-1] == plan else (plan,)


def _check_produced_by(model: nn.Module, plan: Plan) -> None:
    """Every layer the plan shrinks must have the plan's kept size in ``model``."""
    extents = plan.extents()
    for (fqn, side), dropped in plan.drops().items():
        actual = axis_length(model, fqn, side)
        want = extents[(fqn, side)] - len(dropped)
        if actual != want:
            raise PlanError(
                f"this plan did not produce this model: it leaves {fqn!r} with {want} "
                f"{side.value}put channels, the model has {actual}. Pass the plan returned "
                "together with this model (Result.plan)."
            )


def _dedup(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors to store (detached, CPU, contiguous) and {alias: stored name} for tied ones."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, t in state.items():
        if id(t) in first:
            aliases[name] = first[id(t)]
            continue
        first[id(t)] = name
        tensors[name] = t.detach().to("cpu", copy=True).contiguous()
    return tensors, aliases


# --------------------------------------------------------------------------- loading helpers
def _name(path: str | os.PathLike[str]) -> str:
    return repr(str(path))


def _read(path: str | os.PathLike[str]) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Tensors and metadata of a shrink file; PlanError on anything malformed."""
    st = _safetensors()
    try:
        data = Path(path).read_bytes()
    except OSError as e:
        raise PlanError(f"cannot read {_name(path)}: {e.strerror or e}") from e
    try:
        tensors = st.torch.load(data)
    except (st.SafetensorError, ValueError, TypeError, RuntimeError, OverflowError) as e:
        raise PlanError(
            f"{_name(path)} is not a valid safetensors file ({e}); it may be truncated or "
            "corrupt. Save it again with shrink.save."
        ) from e
    (n,) = struct.unpack("<Q", data[:8])  # valid: safetensors accepted the file
    try:
        header = json.loads(data[8 : 8 + min(n, _MAX_HEADER)])
    except (ValueError, RecursionError) as e:
        raise PlanError(f"{_name(path)} has an unreadable header: {e}") from e
    meta = header.get("__metadata__") if isinstance(header, dict) else None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise PlanError(
            f"{_name(path)} is a safetensors file but not one written by shrink.save (no "
            f"'format': {FORMAT!r} in its metadata), so it has no plan to rebuild the pruned "
            "architecture. Load plain weights with safetensors.torch.load_file instead."
        )
    if meta.get("format_version") not in _VERSIONS:
        raise PlanError(
            f"{_name(path)} has format_version {meta.get('format_version')!r}; this shrink "
            f"reads {' and '.join(map(repr, _VERSIONS))}. Upgrade shrink or save the model again."
        )
    return tensors, meta


def _json_field(metadata: Mapping[str, str], key: str, path: str | os.PathLike[str]) -> Any:
    text = metadata.get(key)
    if not isinstance(text, str):
        raise PlanError(f"{_name(path)} has no {key!r} entry in its metadata; the file is corrupt")
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as e:
        raise PlanError(f"{_name(path)}: {key!r} is not valid JSON ({e})") from e


def _plan_from_metadata(
    metadata: Mapping[str, str], model: nn.Module | None, path: str | os.PathLike[str]
) -> Plan:
    data = _json_field(metadata, "plan", path)
    # generous (a plan for a bigger sibling architecture must still get to the mismatch message)
    budget = 2 * _budget(model) + (1 << 20) if model is not None else 1 << 22
    _check_plan_size(data, budget, path)
    try:
        return Plan.from_dict(data)
    except (RecursionError, OverflowError) as e:  # Plan.from_dict lets these through
        raise PlanError(f"{_name(path)}: the plan is malformed ({e})") from e
    except PlanError as e:
        raise PlanError(f"{_name(path)}: {e}") from e


def _later_plans(
    metadata: Mapping[str, str], model: nn.Module, path: str | os.PathLike[str]
) -> list[Plan]:
    """The plans after the first, for a model pruned more than once (format version 2)."""
    if metadata.get("format_version") != CHAIN_VERSION:
        return []
    items = _json_field(metadata, "later_plans", path)
    if not isinstance(items, list) or not items:
        raise PlanError(f"{_name(path)}: 'later_plans' must be a non-empty list of plans; "
                        "the file is corrupt")
    budget = 2 * _budget(model) + (1 << 20)
    out = []
    for data in items:
        _check_plan_size(data, budget, path)
        try:
            out.append(Plan.from_dict(data))
        except (RecursionError, OverflowError, PlanError) as e:
            raise PlanError(f"{_name(path)}: a later plan is malformed ({e})") from e
    return out


def _budget(model: nn.Module) -> int:
    """Most channel positions any plan for ``model`` can list (every IN and OUT axis)."""
    total = 0
    for mod in model.modules():
        rule = rule_for(mod)
        if rule is not None:
            total += sum(rule.extent(mod, side) or 0 for side in Side)
    return total


def _check_plan_size(data: Any, budget: int, path: str | os.PathLike[str]) -> None:
    """Refuse plans that would expand to more positions than the model has, before expanding.

    Index runs are run-length encoded, so a few bytes can ask for billions of positions; the
    partition invariant bounds a valid plan's positions by the model's axis lengths.
    """
    def bad(what: str) -> PlanError:
        return PlanError(f"{_name(path)}: {what}; the plan is corrupt or hostile")

    groups = data.get("groups") if isinstance(data, dict) else None
    if not isinstance(groups, list):
        raise bad("the plan has no 'groups' list")
    total = 0
    for g in groups:
        if not isinstance(g, dict) or not isinstance(g.get("members"), list):
            raise bad("every group must be an object with a 'members' list")
        size = g.get("size")
        if not isinstance(size, int) or not 0 <= size <= budget:
            raise bad(f"group size {size!r} is impossible for this model (at most {budget})")
        for m in g["members"]:
            runs = m.get("runs") if isinstance(m, dict) else None
            if not isinstance(runs, list):
                raise bad("every member must be an object with a 'runs' list")
            for run in runs:
                if not (isinstance(run, list) and len(run) == 4
                        and all(isinstance(v, int) for v in run)):
                    raise bad(f"index run {str(run)[:40]} is not 4 integers")
                total += max(run[1], 0)
            if total > budget:
                raise bad(f"the plan lists more than {budget} channel positions, more than "
                          "the model has")


def _explain(
    model: nn.Module, plan: Plan, saved: Mapping[str, torch.Tensor], aliases: Mapping[str, str]
) -> str:
    """The first parameter of ``model`` that differs from what the file was saved from."""
    why = describe_mismatch(model, plan.extents())
    if why:
        return why
    state = model.state_dict()
    names = set(saved) | set(aliases)
    for name in sorted(names - set(state)):
        return f"the file has tensor {name!r}, which the model does not have"
    for name in state:
        if name not in names:
            return f"the model has tensor {name!r}, which the file does not have"
    touched = {m.module for g in plan.groups for m in g.members}
    for name, t in state.items():
        s = saved.get(name)
        if s is None:
            continue
        if s.dtype != t.dtype:
            return (f"{name!r} is {t.dtype} in the model but {s.dtype} in the file (convert the "
                    f"model first, e.g. model.to({s.dtype}))")
        owner = name.rsplit(".", 1)[0] if "." in name else ""
        # a layer the plan shrinks keeps its other axes (conv kernels: dims 2 and up)
        same = s.shape == t.shape if owner not in touched else (
            s.ndim == t.ndim and s.shape[2:] == t.shape[2:])
        if not same:
            pruned = " (pruned)" if owner in touched else ""
            return (f"{name!r} has shape {tuple(t.shape)} in the model but {tuple(s.shape)}"
                    f"{pruned} in the file")
    return "parameter names, shapes or dtypes differ (not found in the saved tensors)"


def _check_state(
    state: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor],
    path: str | os.PathLike[str],
) -> None:
    missing = [k for k in state if k not in tensors]
    extra = [k for k in tensors if k not in state]
    if missing or extra:
        raise PlanError(
            f"{_name(path)} does not match the pruned architecture: missing tensors "
            f"{missing[:5]}, unexpected tensors {extra[:5]}. Load it into the architecture it "
            "was saved from."
        )
    for name, dst in state.items():
        src = tensors[name]
        if src.shape != dst.shape or src.dtype != dst.dtype:
            raise PlanError(
                f"{_name(path)}: tensor {name!r} is {tuple(src.shape)} {src.dtype} in the file "
                f"but {tuple(dst.shape)} {dst.dtype} in the pruned model; the file was not "
                "written by shrink.save from this plan, or it was edited."
            )
