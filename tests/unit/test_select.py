import math

import pytest
import torch

import shrink
from shrink.plan import ChannelGroup, IndexMap, Member, Side
from shrink.select import Global, Uniform, select


def _group(gid: str, size: int, blocks: tuple[int, ...] = ()) -> ChannelGroup:
    m = Member(gid, Side.OUT, size, IndexMap(tuple(range(size)), tuple(range(size))))
    return ChannelGroup(gid, size, (m,), blocks=blocks)


def test_uniform_drops_lowest_scores_and_breaks_ties_by_index() -> None:
    g = _group("a", 6)
    scores = {"a": torch.tensor([3.0, 1.0, 1.0, 5.0, 1.0, 2.0], dtype=torch.float64)}
    plan = select((g,), scores, Uniform(0.5), "fp")
    assert plan.decisions[0].keep == (0, 3, 5)
    plan = select((g,), scores, Uniform(2), "fp")  # two lowest, ties: lower index first
    assert plan.decisions[0].keep == (0, 3, 4, 5)


def test_round_to_and_min_keep() -> None:
    g = _group("a", 20)
    scores = {"a": torch.arange(20, dtype=torch.float64)}
    assert len(select((g,), scores, Uniform(0.9, round_to=8), "fp").decisions[0].keep) == 8
    assert len(select((g,), scores, Uniform(0.99, min_keep=3), "fp").decisions[0].keep) == 3


def test_absolute_count_that_empties_a_group_is_an_error() -> None:
    g = _group("a", 4)
    with pytest.raises(shrink.ConfigError, match="would empty group 'a'"):
        select((g,), {"a": torch.ones(4, dtype=torch.float64)}, Uniform(4), "fp")


def test_blocks_drop_the_same_number_per_block() -> None:
    g = _group("a", 8, blocks=(0, 0, 0, 0, 1, 1, 1, 1))
    scores = {"a": torch.tensor([1, 2, 3, 4, 10, 20, 30, 40], dtype=torch.float64)}
    keep = select((g,), scores, Uniform(0.5), "fp").decisions[0].keep
    assert keep == (2, 3, 6, 7)


def test_global_ranks_across_groups_and_caps_each_group() -> None:
    a, b = _group("a", 10), _group("b", 10)
    scores = {
        "a": torch.tensor([0.01] * 9 + [10.0], dtype=torch.float64),
        "b": torch.ones(10, dtype=torch.float64),
    }
    plan = select((a, b), scores, Global(0.5, max_ratio=0.8), "fp")
    kept = {d.group: len(d.keep) for d in plan.decisions}
    assert kept["a"] == 10 - 8  # capped at 80% of the group
    assert kept.get("b", 10) == 10 - (10 - 8)
    total_dropped = sum(10 - k for k in kept.values())
    assert total_dropped == 10


@pytest.mark.parametrize("bad", [1.0, -0.1, 1.5, "0.5", None, True, -2, math.nan])
def test_bad_ratio_is_a_config_error(bad: object) -> None:
    with pytest.raises(shrink.ConfigError, match="ratio"):
        Uniform(bad)  # type: ignore[arg-type]
