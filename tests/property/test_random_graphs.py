"""Random small graphs: pruning never crashes beyond shrink's errors, is exact, and leaves the
input model untouched; from_masks of random structured masks equals the masked model."""

from __future__ import annotations

import dataclasses
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.nn.utils import prune

import shrink
from shrink.interop.prune_masks import find_masks
from shrink.testing import assert_unchanged, state_snapshot
from tests.helpers import assert_matches_masked_original
from tests.helpers import config as helpers_config
from tests.property.strategies import Block, Spec, build, specs

# SHRINK_FUZZ=N runs N random (not derandomized) examples per property, for nightly fuzzing
FUZZ = int(os.environ.get("SHRINK_FUZZ", "0"))
SETTINGS = settings(max_examples=FUZZ or 25, deadline=None, derandomize=not FUZZ, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@SETTINGS
@given(spec=specs(), ratio=st.sampled_from([0.2, 0.5, 0.75, 1, 2]),
       importance=st.sampled_from(["l1", "l2", "random"]),
       scope=st.sampled_from(["local", "global"]))
def test_random_graph_prunes_exactly_and_leaves_the_model_untouched(
    spec: Spec, ratio: float | int, importance: str, scope: str
) -> None:
    model, x = build(spec)
    snap = state_snapshot(model)
    config = helpers_config(ratio, importance=importance, scope=scope)
    # a local int amount is per group; a global one is a total, capped per group by max_ratio
    if isinstance(ratio, int) and scope == "local" and ratio >= min(
            (g.size for g in shrink.analyze(shrink.capture(model, x)).prunable), default=ratio + 1):
        with pytest.raises(shrink.ConfigError, match="would empty group"):
            shrink.prune(model, (x,), config)
        assert_unchanged(model, snap)
        return
    res = shrink.prune(model, (x,), dataclasses.replace(config, verify=False))
    assert_unchanged(model, snap)
    for inputs in ((x,), (torch.randn_like(x),)):  # and on inputs it was not pruned on
        assert_matches_masked_original(model, res.model, res.plan, inputs, rtol=1e-9, double=True)
    again = shrink.Plan.from_json(res.plan.to_json())
    assert again == res.plan


@SETTINGS
@given(spec=specs(), data=st.data(), policy=st.sampled_from(["all", "union"]))
def test_random_structured_masks_become_an_equal_smaller_model(
    spec: Spec, data: st.DataObject, policy: str
) -> None:
    model, x = build(spec)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    for conv in convs:
        how = data.draw(st.sampled_from(["none", "out", "in", "out_bias"]))
        amount = data.draw(st.sampled_from([0.25, 0.5, 1]))
        if how == "none" or (how == "in" and conv.weight.shape[1] < 2):
            continue
        prune.ln_structured(conv, "weight", amount=amount, n=2, dim=1 if how == "in" else 0)
        if how == "out_bias" and conv.bias is not None:
            prune.custom_from_mask(conv, "bias", conv.weight_mask.flatten(1).any(1).float())
    snap = state_snapshot(model)
    res = shrink.from_masks(model, (x,), policy=policy)
    assert_unchanged(model, snap)
    assert not find_masks(res.model)
    if policy == "all":
        fresh = torch.randn_like(x) * 2
        with torch.no_grad():
            want, got = model(fresh), res.model(fresh)
        torch.testing.assert_close(got, want, rtol=1e-4,
                                   atol=1e-5 * float(want.abs().max()) + 1e-7)


@pytest.mark.parametrize("seed", [0])
def test_specs_cover_every_block_kind(seed: int) -> None:
    seen: set[str] = set()

    @settings(max_examples=60, deadline=None, derandomize=True, database=None)
    @given(spec=specs())
    def collect(spec: Spec) -> None:
        seen.update(b.kind for b in spec.blocks)
        seen.add(spec.head)

    collect()
    assert seen >= {"conv", "res", "cat", "split", "dw", "group", "pool", "flatten"}


def test_issue5_a_group_spanning_two_producers_never_empties_one() -> None:
    # cat([a(x), b(x)]) tied by a residual add: one group whose lowest scores are all a's
    spec = Spec(1, 4, (Block("cat", 2, 5, bias=True), Block("res")), "pool", 1)
    model, x = build(spec)
    with torch.no_grad():
        model.layers[0][0][0].weight.mul_(1e-3)
    res = shrink.prune(model, (x,), shrink.PruneConfig(0.5, importance="l1"))
    assert res.model.layers[0][0][0].out_channels >= 1
    assert res.model.layers[0][1][0].out_channels < 5
