"""Sensitivity analysis: each group pruned alone, measured with the user's evaluation."""

import pytest
import torch
from torch import nn

import shrink
from shrink.testing import assert_unchanged, state_snapshot

X = torch.randn(4, 3, 6, 6, generator=torch.Generator().manual_seed(0))


def _model() -> nn.Module:
    """conv0 -> conv2 -> conv4, where channels 0..3 of conv2 are dead (zero in and out)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, padding=1),
                        nn.ReLU(), nn.Conv2d(8, 2, 1))
    with torch.no_grad():
        net[2].weight[:4] = 0.0
        net[2].bias[:4] = 0.0
        net[4].weight[:, :4] = 0.0
    return net.eval()


def _closeness(reference: torch.Tensor):  # higher is better: minus the MSE to the dense output
    @torch.no_grad()
    def evaluate(m: nn.Module) -> float:
        return -float((m.eval()(X) - reference).pow(2).mean())
    return evaluate


def test_rows_match_pruning_each_group_alone() -> None:
    model = _model()
    evaluate = _closeness(model(X).detach())
    snap = state_snapshot(model)
    table = shrink.sensitivity(model, X[:1], evaluate, ratios=(0.5, 0.75))
    assert_unchanged(model, snap)
    assert table.groups == ("0:out", "2:out")
    assert table.baseline == pytest.approx(0.0)
    for row in table.rows:  # the same plan made another way: an override on that group only
        cfg = shrink.PruneConfig(0.0, overrides={row.group: row.ratio})
        alone = shrink.prune(model, X[:1], cfg).model
        assert row.metric == pytest.approx(evaluate(alone))
        assert row.drop == pytest.approx(table.baseline - row.metric)
        assert row.kept == round(row.size * (1 - row.ratio))


def test_dead_channels_cost_nothing_and_feed_per_group_ratios() -> None:
    model = _model()
    evaluate = _closeness(model(X).detach())
    table = shrink.sensitivity(model, X[:1], evaluate, ratios=(0.25, 0.5, 0.75))
    drops = {(r.group, r.ratio): r.drop for r in table.rows}
    assert drops[("2:out", 0.5)] == pytest.approx(0.0, abs=1e-12)
    assert drops[("2:out", 0.75)] > 1e-6
    assert drops[("0:out", 0.25)] > 1e-6
    assert table.ratios(max_drop=1e-9) == {"0:out": 0.0, "2:out": 0.5}
    res = shrink.prune(model, X[:1], shrink.PruneConfig(
        0.0, overrides=table.overrides(max_drop=1e-9)))
    assert {d.group: len(d.keep) for d in res.plan.decisions} == {"2:out": 4}
    torch.testing.assert_close(res.model(X), model(X))


def test_loss_metrics_count_an_increase_as_a_drop() -> None:
    model = _model()
    ref = model(X).detach()

    @torch.no_grad()
    def loss(m: nn.Module) -> float:
        return float((m.eval()(X) - ref).pow(2).mean())

    table = shrink.sensitivity(model, X[:1], loss, ratios=(0.75,), higher_is_better=False)
    assert all(r.drop == pytest.approx(r.metric - table.baseline) for r in table.rows)
    assert all(r.drop > 0 for r in table.rows)


def test_table_renders_and_plots(tmp_path) -> None:
    pytest.importorskip("matplotlib")
    model = _model()
    table = shrink.sensitivity(model, X[:1], _closeness(model(X).detach()), ratios=(0.5,),
                               groups=("2:*",))
    assert table.groups == ("2:out",)
    text = str(table)
    assert "| 2:out | 8 |" in text
    assert "drop @ 0.5" in text
    fig = table.plot(str(tmp_path / "sens.png"))
    assert (tmp_path / "sens.png").stat().st_size > 0
    assert fig.axes[0].get_lines()


def test_bad_groups_and_ratios_are_config_errors() -> None:
    model = _model()
    with pytest.raises(shrink.ConfigError, match="matches no prunable group"):
        shrink.sensitivity(model, X[:1], lambda m: 0.0, groups=("nope",))
    with pytest.raises(shrink.ConfigError, match="ratios must be floats"):
        shrink.sensitivity(model, X[:1], lambda m: 0.0, ratios=(1.0,))
