"""Random and mutated plans, JSON and files: shrink raises its own errors, never anything else,
never runs code, and never touches the model it is given."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import nn

import shrink
from shrink.errors import RewriteError
from shrink.testing import assert_unchanged, state_snapshot
from tests.helpers import assert_matches_masked_original
from tests.property.strategies import Block, Spec, build

# SHRINK_FUZZ=N runs N random (not derandomized) examples per property, for nightly fuzzing
FUZZ = int(os.environ.get("SHRINK_FUZZ", "0"))
SETTINGS = settings(max_examples=FUZZ or 60, deadline=None, derandomize=not FUZZ, database=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20,
)
SPEC = Spec(3, 4, (Block("conv", 6, bn=True), Block("res", bn=True),
                   Block("cat", 4, 4), Block("dw", bias=True)), "flatten", 3)


@cache
def _base() -> tuple[nn.Module, torch.Tensor, dict[str, Any]]:
    model, x = build(SPEC)
    res = shrink.prune(model, (x,), shrink.PruneConfig(0.5))
    return model, x, res.plan.to_dict()


@SETTINGS
@given(value=json_values)
def test_random_json_is_a_plan_error_or_a_plan(value: Any) -> None:
    for parse in (lambda: shrink.Plan.from_dict(value), lambda: shrink.Plan.from_json(
            json.dumps(value))):
        with contextlib.suppress(shrink.PlanError):
            parse()


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(node, dict):
        for k, v in node.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            out += _paths(v, (*prefix, i))
    return out


def _mutate(plan: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    plan = copy.deepcopy(plan)
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(plan) if p]
        deep = [p for p in paths if len(p) >= 4]  # inside members, runs and keep lists
        if deep and data.draw(st.booleans()):
            paths = deep
        path = data.draw(st.sampled_from(paths))
        parent = plan
        for key in path[:-1]:
            parent = parent[key]
        old = parent[path[-1]]
        how = data.draw(st.sampled_from(["replace", "delete", "nudge", "huge"]))
        if how == "delete":
            del parent[path[-1]]
        elif how == "nudge" and isinstance(old, int) and not isinstance(old, bool):
            parent[path[-1]] = old + data.draw(st.sampled_from([-2, -1, 1, 2]))
        elif how == "huge" and isinstance(old, int):
            parent[path[-1]] = data.draw(st.sampled_from([10**6, -(10**6), 2**63, 10**40]))
        else:
            parent[path[-1]] = data.draw(json_values)
    return plan


def _rekeep(plan: dict[str, Any], data: st.DataObject) -> dict[str, Any]:
    """Another valid choice of kept channels for one group (prunable or not)."""
    plan = copy.deepcopy(plan)
    group = data.draw(st.sampled_from(plan["groups"]))
    keep = data.draw(st.sets(st.integers(0, group["size"] - 1), min_size=1))
    plan["decisions"] = [d for d in plan["decisions"] if d["group"] != group["id"]]
    plan["decisions"].append({"group": group["id"], "keep": sorted(keep)})
    return plan


@SETTINGS
@given(data=st.data())
def test_mutated_plan_fails_with_a_shrink_error_or_prunes_exactly(data: st.DataObject) -> None:
    """An edited plan is rejected by ``Plan.from_dict``/``apply``, or gives an exact model:
    a VerificationError means shrink built a wrong model from a plan it accepted."""
    model, x, base = _base()
    snap = state_snapshot(model)
    try:
        edit = _rekeep if data.draw(st.booleans()) else _mutate
        plan = shrink.Plan.from_dict(edit(base, data))
        pruned = shrink.apply(model, plan)
    except (shrink.PlanError, RewriteError):
        assert_unchanged(model, snap)
        return
    assert_unchanged(model, snap)
    assert_matches_masked_original(model, pruned, plan, (x,))


@pytest.mark.parametrize("how", ["member", "runs"])
def test_issue10_plan_missing_a_member_is_rejected_by_apply(how: str) -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 4, 3))
    x = torch.randn(1, 3, 8, 8)
    data = shrink.prune(model, (x,), shrink.PruneConfig(0.5)).plan.to_dict()
    (group,) = [g for g in data["groups"] if g["id"] == "0:out"]
    (i,) = [i for i, m in enumerate(group["members"]) if (m["module"], m["side"]) == ("2", "in")]
    if how == "member":
        del group["members"][i]
    else:
        group["members"][i]["runs"] = []
    plan = shrink.Plan.from_dict(data)
    with pytest.raises(shrink.PlanError, match=r"lost .*member"):
        shrink.apply(model, plan)


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> bytes:
    model, x, _ = _base()
    res = shrink.prune(model, (x,), shrink.PruneConfig(0.5))
    return shrink.save(res, tmp_path_factory.mktemp("saved") / "m.safetensors").read_bytes()


@SETTINGS
@given(data=st.data())
def test_corrupted_file_is_a_plan_error_or_loads(
    saved: bytes, data: st.DataObject, tmp_path: Path
) -> None:
    blob = bytearray(saved)
    how = data.draw(st.sampled_from(["flip", "truncate", "splice", "random"]))
    if how == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))
            blob[i] = data.draw(st.integers(0, 255))
    elif how == "truncate":
        blob = blob[: data.draw(st.integers(0, len(blob) - 1))]
    elif how == "splice":
        i = data.draw(st.integers(0, len(blob)))
        blob[i:i] = data.draw(st.binary(max_size=64))
    else:
        blob = bytearray(data.draw(st.binary(max_size=512)))
    path = tmp_path / f"fuzz-{data.draw(st.integers(0, 10**9))}.safetensors"
    path.write_bytes(bytes(blob))
    fresh, _ = build(SPEC)
    snap = state_snapshot(fresh)
    with contextlib.suppress(shrink.PlanError):
        shrink.load(fresh, path)
    assert_unchanged(fresh, snap)


@pytest.mark.parametrize(
    ("group", "fragment"),
    [
        ({"id": "a", "size": 10**12, "members": []}, "group size"),
        ({"id": "a", "size": "99999999999", "members": []}, "group size"),
        ({"id": "a", "size": 2, "members": [
            {"module": "m", "side": "in", "extent": 2, "runs": [[0, 10**12, 0, 0]]}]}, "more than"),
        ({"id": "a", "size": 2, "members": [
            {"module": "m", "side": "in", "extent": 2, "runs": [[0, "10000000000", 0, 0]]}]},
         "list of integers"),
    ],
    ids=["huge_size", "size_as_string", "huge_run", "run_as_string"],
)
def test_issue5_hostile_plan_sizes_are_refused_before_expanding(group: dict, fragment: str) -> None:
    data = {"schema": 1, "model": "x", "groups": [group],
            "decisions": [{"group": "a", "keep": [0]}]}
    with pytest.raises(shrink.PlanError, match=fragment):
        shrink.Plan.from_dict(data)
