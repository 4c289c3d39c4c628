import json

import pytest
import torch
from torch import nn

import shrink
from shrink.plan import ChannelGroup, Decision, IndexMap, Member, Plan, Side, fingerprint


def _model() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 16, 4))


def _plan(model: nn.Module) -> Plan:
    return shrink.prune(model, (torch.randn(1, 3, 6, 6),), shrink.PruneConfig(0.5)).plan


@pytest.mark.parametrize(
    ("index", "channel"),
    [((0, 1, 2, 3), (0, 1, 2, 3)), ((4, 5, 6), (0, 0, 0)), ((0, 2, 3, 9), (3, 1, 1, 7)), ((), ())],
)
def test_index_map_runs_round_trip(index: tuple[int, ...], channel: tuple[int, ...]) -> None:
    imap = IndexMap(index, channel)
    assert IndexMap.from_runs(imap.to_runs()) == imap


def test_flatten_map_compresses_to_one_run_per_channel() -> None:
    imap = IndexMap(tuple(range(12)), tuple(i // 4 for i in range(12)))
    assert imap.to_runs() == [[0, 4, 0, 0], [4, 4, 1, 0], [8, 4, 2, 0]]


def test_plan_json_round_trip_is_canonical() -> None:
    model = _model()
    plan = _plan(model)
    text = plan.to_json()
    again = Plan.from_json(text)
    assert again == plan
    assert again.to_json() == text
    assert json.loads(text)["schema"] == 1


def test_same_model_and_config_give_byte_identical_plans() -> None:
    model = _model()
    assert _plan(model).to_json() == _plan(model).to_json()


def test_plan_applies_to_a_fresh_instance_with_same_weights() -> None:
    model = _model()
    plan = Plan.from_json(_plan(model).to_json())
    fresh = _model()
    fresh.load_state_dict(model.state_dict())
    a = shrink.apply(model, plan)
    b = shrink.apply(fresh, plan)
    x = torch.randn(2, 3, 6, 6)
    torch.testing.assert_close(a(x), b(x))


def test_plan_for_another_model_names_the_mismatch() -> None:
    model = _model()
    plan = _plan(model)
    other = nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 16, 4))
    want = (f"made for a different model .*: the plan expects '0' \\(Conv2d\\) to have "
            f"{model[0].out_channels} output channels, the model has {other[0].out_channels}\\.")
    with pytest.raises(shrink.PlanError, match=want):
        shrink.apply(other, plan)


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("{", "not valid JSON"),
        ("[]", "must be an object"),
        ('{"schema": 99}', "schema 99"),
        ('{"schema": 1, "model": "x"}', "malformed"),
        ('{"schema": 1, "model": "x", "groups": [{"id": 1}], "decisions": []}', "malformed"),
    ],
)
def test_bad_plan_json_raises_plan_error(text: str, match: str) -> None:
    with pytest.raises(shrink.PlanError, match=match):
        Plan.from_json(text)


def test_decision_must_be_ascending_subset() -> None:
    g = ChannelGroup("g", 4, (Member("m", Side.OUT, 4, IndexMap((0, 1, 2, 3), (0, 1, 2, 3))),))
    with pytest.raises(shrink.PlanError, match="strictly ascending"):
        Plan("fp", (g,), (Decision("g", (2, 1)),))
    with pytest.raises(shrink.PlanError, match="unknown group"):
        Plan("fp", (g,), (Decision("h", (1,)),))
    pinned = ChannelGroup("g", 4, g.members, pinned="model output")
    with pytest.raises(shrink.PlanError, match="pinned"):
        Plan("fp", (pinned,), (Decision("g", (1,)),))


def test_with_decisions_keeps_the_groups_and_checks_the_decisions() -> None:
    plan = _plan(_model())
    assert plan.decisions
    empty = plan.with_decisions(())
    assert empty.groups is plan.groups
    assert empty.drops() == {}
    assert empty.with_decisions(plan.decisions) == plan
    (d, *_) = plan.decisions
    with pytest.raises(shrink.PlanError, match="unknown group"):
        plan.with_decisions([Decision("no such group", d.keep)])
    with pytest.raises(shrink.PlanError, match="strictly ascending"):
        plan.with_decisions([Decision(d.group, tuple(reversed(d.keep)))])


def test_drops_follow_the_decisions_of_a_replaced_or_rebuilt_plan() -> None:
    import dataclasses

    plan = _plan(_model())
    assert plan.drops()  # computed and cached
    (d,) = [d for d in plan.decisions if len(d.keep) < plan.group(d.group).size]
    other = (Decision(d.group, tuple(range(plan.group(d.group).size))),)
    for changed in (dataclasses.replace(plan, decisions=other), plan.with_decisions(other)):
        assert changed.drops() == {}
    assert plan.drops()


def _two_groups(index: tuple[int, ...], channel: tuple[int, ...]) -> tuple[ChannelGroup, ...]:
    a = ChannelGroup("a", 4, (Member("conv", Side.OUT, 4, IndexMap((0, 1), (0, 1))),))
    b = ChannelGroup("b", 4, (Member("conv", Side.OUT, 4, IndexMap(index, channel)),))
    return a, b


@pytest.mark.parametrize(
    ("index", "channel"),
    [((1, 2), (0, 1)), ((2, 2), (0, 1)), ((2, 4), (0, 1)), ((2, -1), (0, 1)), ((2, 3), (0, 4)),
     ((2, 3), (-1, 0))],
    ids=["twice_across_groups", "twice_in_one_map", "past_the_axis", "negative_position",
         "channel_past_the_group", "negative_channel"],
)
def test_plan_refuses_bad_positions(index: tuple[int, ...], channel: tuple[int, ...]) -> None:
    with pytest.raises(shrink.PlanError, match="outside the axis or group, or listed twice"):
        Plan("fp", _two_groups(index, channel), ())


def test_plan_accepts_disjoint_positions() -> None:
    assert Plan("fp", _two_groups((2, 3), (0, 3)), ()).groups[1].id == "b"


def test_a_deep_copy_of_a_pruned_model_shares_its_immutable_plan() -> None:
    import copy

    from shrink.provenance import plans_of

    small = shrink.compress(_model(), 0.5, (torch.randn(1, 3, 6, 6),))
    (plan,) = plans_of(small)
    assert copy.deepcopy(plan) is plan
    (copied,) = plans_of(copy.deepcopy(small))
    assert copied is plan


class _GridCache(nn.Module):
    """Like timm's ConViT attention: a non-persistent buffer the forward replaces with one sized
    to the input it first sees (``resize=False``: kept as built, so the model captures)."""

    def __init__(self, resize: bool = True) -> None:
        super().__init__()
        self.resize = resize
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 4, 1)
        self.register_buffer("grid", torch.zeros(1, 1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.resize and self.grid.shape[-1] != x.shape[-1]:
            self.grid = torch.linspace(0, 1, x.shape[-1], device=x.device).expand(1, 1, 1, -1)
        return self.head(torch.relu(self.conv(x)) + self.grid)


def test_a_cache_the_forward_resizes_does_not_change_the_fingerprint() -> None:
    torch.manual_seed(0)
    model = _GridCache().eval()
    x = torch.randn(2, 3, 6, 6)
    before = fingerprint(model)
    with torch.no_grad():
        model(x)
    assert tuple(model.grid.shape) == (1, 1, 1, 6)  # the forward did resize it
    assert fingerprint(model) == before
    assert fingerprint(model, caches=True) != before

    still = _GridCache(resize=False).eval()
    still.load_state_dict(model.state_dict())
    plan = shrink.prune(still, (x,), shrink.PruneConfig(0.5)).plan
    pruned = shrink.apply(model, plan)  # the plan fits the model whose cache was resized
    assert pruned.conv.out_channels == 4
    mask = torch.zeros(8)
    mask[list(plan.decisions[0].keep)] = 1
    with torch.no_grad():
        ref = model.head((torch.relu(model.conv(x)) + model.grid) * mask[:, None, None])
        torch.testing.assert_close(pruned(x), ref, rtol=1e-5, atol=1e-5)


def test_a_plan_fingerprinted_with_caches_still_applies() -> None:
    torch.manual_seed(0)
    model = _GridCache(resize=False).eval()
    x = torch.randn(2, 3, 6, 6)
    plan = shrink.prune(model, (x,), shrink.PruneConfig(0.5)).plan
    old = Plan.from_json(plan.to_json().replace(plan.model, fingerprint(model, caches=True)))
    assert old.model != plan.model
    with torch.no_grad():
        torch.testing.assert_close(shrink.apply(model, old)(x), shrink.apply(model, plan)(x))


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "googlenet"])
def test_the_analysis_vouches_only_for_groups_that_pass_the_position_check(name: str) -> None:
    import dataclasses

    import torchvision

    from shrink.plan import _check_positions, positions_checked
    from shrink.probe import pin

    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model = torchvision.models.get_model(name, weights=None, **kwargs).eval()
    groups = shrink.analyze(shrink.capture(model, (torch.randn(1, 3, 64, 64),))).groups
    assert positions_checked(groups)
    _check_positions(groups)  # what a plan over them skips holds
    pinned = pin(groups, {groups[1].id: "by hand"})
    assert positions_checked(pinned) and pinned[1].pinned == "by hand"
    # the same groups with one position moved past its axis: a new tuple, checked again
    g = next(g for g in groups if g.members[0].extent > 1)
    m = g.members[0]
    bad = dataclasses.replace(m, index_map=IndexMap((m.extent,) + m.index_map.index[1:],
                                                     m.index_map.channel))
    tampered = tuple(dataclasses.replace(x, members=(bad, *x.members[1:])) if x is g else x
                     for x in groups)
    assert not positions_checked(tampered)
    with pytest.raises(shrink.PlanError, match="outside the axis or group"):
        Plan("fp", tampered, ())
