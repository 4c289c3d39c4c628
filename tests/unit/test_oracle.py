"""The independent oracle of tests/helpers.py can fail: it rejects wrongly pruned models."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

import shrink
from shrink.plan import Plan
from shrink.testing import randomize_
from tests.helpers import assert_matches_masked_original, independent_masked_original


def _net() -> nn.Module:
    return randomize_(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                    nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.Flatten(),
                                    nn.Linear(8 * 25, 4)), seed=0).eval()


def _tokens() -> nn.Module:
    return randomize_(nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(),
                                    nn.Linear(16, 6)), seed=0).eval()


def _other_channels(plan: Plan) -> Plan:
    """The same groups, each decision keeping a different subset of the same size."""
    decisions = []
    for d in plan.decisions:
        size = plan.group(d.group).size
        dropped = [c for c in range(size) if c not in d.keep]
        decisions.append(dataclasses.replace(d, keep=tuple(sorted([*d.keep[1:], dropped[0]]))))
    return dataclasses.replace(plan, decisions=tuple(decisions))


@pytest.mark.parametrize(("make", "x"), [(_net, torch.randn(2, 3, 5, 5)),
                                         (_tokens, torch.randn(2, 5, 6))], ids=["conv", "ln"])
def test_oracle_accepts_the_pruned_model_and_rejects_one_pruned_with_other_channels(
    make: type[nn.Module], x: torch.Tensor
) -> None:
    model = make()
    plan = shrink.prune(model, (x,), shrink.PruneConfig(0.5, round_to=1, verify=False)).plan
    assert plan.decisions
    good, wrong = shrink.apply(model, plan), shrink.apply(model, _other_channels(plan))
    assert_matches_masked_original(model, good, plan, (x,))
    with pytest.raises(AssertionError, match="differs from the masked original"):
        assert_matches_masked_original(model, wrong, plan, (x,))


def test_oracle_masks_something() -> None:
    model, x = _net(), torch.randn(2, 3, 5, 5)
    plan = shrink.prune(model, (x,), shrink.PruneConfig(0.5, round_to=1, verify=False)).plan
    with torch.no_grad():
        assert not torch.allclose(independent_masked_original(model, plan)(x), model(x))


def test_verify_leaves_both_models_untouched_when_forward_writes_a_weight() -> None:
    # nn.Embedding(max_norm=...) renormalises the rows it looks up, in place, even in eval mode:
    # the oracle's copies share only weights that forward reads
    model = nn.Sequential(nn.Embedding(10, 8, max_norm=1.0), nn.Linear(8, 8), nn.ReLU(),
                          nn.Linear(8, 2)).eval()
    with torch.no_grad():
        model[0].weight.mul_(5.0)  # every row longer than max_norm
    x = torch.randint(0, 10, (2, 3))
    res = shrink.prune(model, (x,), shrink.PruneConfig(0.5, round_to=1, verify=False))
    before = [p.detach().clone() for p in (*model.parameters(), *res.model.parameters())]
    shrink.verify(model, res.model, res.plan, (x,))
    after = [p.detach() for p in (*model.parameters(), *res.model.parameters())]
    assert all(torch.equal(a, b) for a, b in zip(before, after, strict=True))
