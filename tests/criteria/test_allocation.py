"""Allocation: per-module overrides, the global floor and ceiling, and MACs/params targets."""

import pytest
import torch
from torch import nn

import shrink
from shrink.plan import ChannelGroup, IndexMap, Member, Side
from shrink.report import count_macs, count_params
from shrink.select import Global, Uniform, select


def _group(gid: str, size: int) -> ChannelGroup:
    m = Member(gid.split(":")[0], Side.OUT, size, IndexMap(tuple(range(size)), tuple(range(size))))
    return ChannelGroup(gid, size, (m,))


def _kept(plan: shrink.Plan) -> dict[str, int]:
    sizes = {g.id: g.size for g in plan.groups}
    kept = dict(sizes)
    kept.update({d.group: len(d.keep) for d in plan.decisions})
    return kept


def test_overrides_by_glob_and_name_first_match_wins() -> None:
    groups = (_group("layer1.conv:out", 10), _group("layer2.conv:out", 10), _group("head:out", 10))
    scores = {g.id: torch.arange(10, dtype=torch.float64) for g in groups}
    policy = Uniform(0.5, overrides=(("layer1.*", 0.2), ("layer*", 0.8), ("head", 0)))
    kept = _kept(select(groups, scores, policy, "fp"))
    assert kept == {"layer1.conv:out": 8, "layer2.conv:out": 2, "head:out": 10}


def test_override_matching_no_group_is_a_config_error() -> None:
    groups = (_group("a:out", 4),)
    with pytest.raises(shrink.ConfigError, match=r"'nope\.\*' matches no prunable group"):
        select(groups, {"a:out": torch.ones(4, dtype=torch.float64)},
               Uniform(0.5, overrides=(("nope.*", 0.1),)), "fp")


def test_global_floor_prunes_every_group_at_least_min_ratio() -> None:
    groups = (_group("a:out", 10), _group("b:out", 10))
    scores = {"a:out": torch.tensor([0.1] * 6 + [10.0] * 4, dtype=torch.float64),
              "b:out": torch.ones(10, dtype=torch.float64)}
    # normalised by the group mean (4.06), a's six low channels score 0.025 and b's all 1.0,
    # so the budget of 8 takes 6 from a (its ceiling) and 2 from b. A floor of 0.3 forces 3
    # from each group, and the remaining 2 go to a's next-lowest channels.
    no_floor = _kept(select(groups, scores, Global(0.4, max_ratio=0.6), "fp"))
    floor = _kept(select(groups, scores, Global(0.4, max_ratio=0.6, min_ratio=0.3), "fp"))
    assert {g: 10 - k for g, k in no_floor.items()} == {"a:out": 6, "b:out": 2}
    assert {g: 10 - k for g, k in floor.items()} == {"a:out": 5, "b:out": 3}


def test_global_floor_above_ceiling_is_rejected() -> None:
    with pytest.raises(shrink.ConfigError, match="min_ratio"):
        Global(0.5, max_ratio=0.5, min_ratio=0.6)
    with pytest.raises(shrink.ConfigError, match="scope='global' only"):
        shrink.PruneConfig(0.5, min_ratio=0.1)


def test_compress_accepts_overrides_as_a_dict() -> None:
    net = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.ReLU(),
                        nn.Conv2d(8, 4, 1))
    res = shrink.prune(net, (torch.randn(1, 3, 9, 9),),
                       shrink.PruneConfig(0.5, overrides={"2": 0.75}))
    assert {d.group: len(d.keep) for d in res.plan.decisions} == {"0:out": 4, "2:out": 2}


def _small_cnn() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.Conv2d(32, 64, 3, padding=1), nn.BatchNorm2d(64), nn.ReLU(),
                         nn.Conv2d(64, 64, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(64, 10))


@pytest.mark.parametrize("scope", ["local", "global"])
@pytest.mark.parametrize("metric", ["macs", "params"])
def test_target_on_a_small_cnn_is_met_within_tolerance(metric: str, scope: str) -> None:
    model, x = _small_cnn().eval(), (torch.randn(1, 3, 16, 16),)
    res = shrink.prune(model, x, shrink.PruneConfig(0.6, target=metric, scope=scope))
    if metric == "macs":
        kept = count_macs(res.model, x) / count_macs(model, x)
    else:
        kept = count_params(res.model) / count_params(model)
    assert abs(kept / 0.4 - 1) <= 0.02, kept


def test_unreachable_target_says_what_limits_it() -> None:
    model = _small_cnn().eval()
    with pytest.raises(shrink.ConfigError, match=r"cannot remove 95\.0% of macs.*max_ratio"):
        shrink.compress(model, 0.95, example_inputs=torch.randn(1, 3, 16, 16), target="macs",
                        max_ratio=0.5)


def test_target_needs_a_float_ratio() -> None:
    with pytest.raises(shrink.ConfigError, match=r"ratio=3 is an int.*amount=3"):
        shrink.PruneConfig(3, target="macs")
    with pytest.raises(shrink.ConfigError, match="amount= counts channels"):
        shrink.PruneConfig(amount=3, target="macs")
    with pytest.raises(shrink.ConfigError, match="target must be"):
        shrink.PruneConfig(0.5, target="flops")


@pytest.mark.parametrize("name", ["resnet50", "mobilenet_v2"])
def test_macs_target_is_met_within_two_percent_on_torchvision_models(name: str) -> None:
    torchvision = pytest.importorskip("torchvision")
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = (torch.randn(1, 3, 224, 224),)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, target="macs", verify=False))
    kept = count_macs(res.model, x) / count_macs(model, x)  # measured on real tensors
    assert abs(kept / 0.5 - 1) <= 0.02, f"{name}: kept {kept:.4f} of the MACs, goal 0.5"
