"""Valuing a group's kept counts by measured loss (``valuation="loss"``,
:mod:`shrink.latency.value`): what is measured, how it is interpolated, and what fails."""

from __future__ import annotations

import copy
import logging
from typing import Any

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import shrink
from shrink.criteria import LnNorm
from shrink.criteria.batches import split_batch
from shrink.latency import LossValuation
from shrink.latency import value as latency_value
from shrink.latency.solve import Choice
from shrink.latency.value import _monotone, loss_values, recalibrate_bn
from shrink.select import Global, candidate_counts, plan_from_counts


class Small(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 32, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(32)
        self.conv2 = nn.Conv2d(32, 32, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.fc = nn.Linear(32, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        return self.fc(y.mean((2, 3)))


def _setup(seed: int = 0) -> tuple[nn.Module, tuple[torch.Tensor, ...], list[Any], Any]:
    torch.manual_seed(seed)
    model = Small()
    for bn in (model.bn1, model.bn2):   # statistics and affine that make the output depend on x
        bn.running_mean.uniform_(-0.5, 0.5)
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.2, 0.2)
    model.eval()
    xs = [torch.randn(8, 3, 8, 8) for _ in range(2)]
    with torch.no_grad():   # labels the dense model gets right: pruning can only cost loss
        data = [(x, model(x).argmax(1)) for x in xs]
    x = (data[0][0][:1],)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5))
    return model, x, data, res.analysis


def _oracle_loss(model: nn.Module, data: list[Any], recalibrate: bool) -> float:
    """Written from the spec: BN statistics re-estimated as a cumulative average over one pass
    (norms in train mode only), then the mean cross-entropy in eval mode."""
    model = copy.deepcopy(model).eval()
    with torch.no_grad():
        if recalibrate:
            for m in model.modules():
                if isinstance(m, nn.BatchNorm2d):
                    m.reset_running_stats()
                    m.momentum = None
                    m.train()
            for x, _ in data:
                model(x)
            model.eval()
        return sum(float(F.cross_entropy(model(x), y)) for x, y in data) / len(data)


@pytest.mark.parametrize("recalibrate", [True, False])
def test_values_are_the_loss_of_each_group_pruned_alone(recalibrate: bool) -> None:
    model, _, data, analysis = _setup()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = shrink.score(analysis.groups, model, LnNorm())
    policy = Global(0.0, round_to=8)
    choices = [Choice(g.id, candidate_counts(g, policy), tuple(0.0 for _ in
                                                             candidate_counts(g, policy)))
               for g in analysis.prunable]
    valuation = LossValuation(data, F.cross_entropy, recalibrate_bn=recalibrate)
    out = loss_values(model, analysis.groups, scores, choices, valuation, analysis.model)
    base = _oracle_loss(model, data, recalibrate)
    assert len(out) == len(choices) == 2
    for c in out:
        assert c.counts == (8, 16, 24, 32)
        raw = [base - _oracle_loss(shrink.apply(model, plan_from_counts(
            analysis.groups, scores, {c.id: k}, analysis.model)), data, recalibrate)
            for k in c.counts[:-1]] + [0.0]
        # keeping more is never worth less: each value is the best at or below its count
        want = [max(raw[:i + 1]) for i in range(len(raw))]
        assert c.value == pytest.approx(want, abs=1e-5), (c.id, raw)
        assert min(raw) < -1e-3   # some count costs loss: the values are not all the dense one
    # the caller's model: weights, BN statistics and mode untouched
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not model.training


def test_recalibrated_statistics_are_the_batch_statistics() -> None:
    model, _, data, _ = _setup()
    work = copy.deepcopy(model)
    n = recalibrate_bn(work, [split_batch(b) for b in data])
    assert n == 2 and not work.training
    assert work.bn1.momentum == model.bn1.momentum == 0.1   # the cumulative average is undone
    xs = torch.cat([x for x, _ in data])
    pre = model.conv1(xs)   # the first norm's input does not depend on recalibration
    assert torch.allclose(work.bn1.running_mean, pre.mean((0, 2, 3)), atol=1e-5)


def test_unmeasured_counts_are_interpolated_and_never_decrease() -> None:
    losses = {8: 2.0, 24: 1.5, 40: 1.6, 64: 1.0}  # 40 noisier than 24
    values = _monotone((8, 16, 24, 32, 40, 48, 56, 64), losses, base=1.0)
    assert values[0] == pytest.approx(-1.0)
    assert values[1] == pytest.approx(-0.75)    # halfway between 8 and 24
    assert values[2] == pytest.approx(-0.5)
    assert values[3] == pytest.approx(-0.5)     # 32 would be -0.55: never below a smaller count
    assert values[4] == pytest.approx(-0.5)
    assert values[5] == pytest.approx(-0.4)     # 48: a third of the way from 40 (-0.6) to 64 (0)
    assert values[-1] == 0.0


def test_at_most_points_counts_are_measured(monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, data, analysis = _setup()
    scores = shrink.score(analysis.groups, model, LnNorm())
    g = analysis.prunable[0]
    counts = tuple(range(1, 33))
    calls: list[int] = []
    real = latency_value.apply

    def counting(m: nn.Module, plan: Any) -> nn.Module:
        calls.append(len(plan.decisions[0].keep))
        return real(m, plan)

    monkeypatch.setattr(latency_value, "apply", counting)
    (out,) = loss_values(model, analysis.groups, scores, [Choice(g.id, counts, (0.0,) * 32)],
                         LossValuation(data, F.cross_entropy, points=4), analysis.model)
    assert sorted(calls) == [1, 11, 22]   # and 32, the dense count, costs nothing
    assert out.counts == counts and len(out.value) == 32


def test_a_count_that_fails_to_run_is_dropped_with_every_smaller_one(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    model, _, data, analysis = _setup()
    scores = shrink.score(analysis.groups, model, LnNorm())
    real = latency_value.apply

    def breaks_below_16(m: nn.Module, plan: Any) -> nn.Module:
        if any(len(d.keep) < 16 for d in plan.decisions):
            raise RuntimeError("shape mismatch in a reshape")
        return real(m, plan)

    monkeypatch.setattr(latency_value, "apply", breaks_below_16)
    g = analysis.prunable[0]
    with caplog.at_level(logging.WARNING, logger="shrink.latency.value"):
        (out,) = loss_values(model, analysis.groups, scores,
                             [Choice(g.id, (8, 16, 24, 32), (0.0,) * 4)],
                             LossValuation(data, F.cross_entropy), analysis.model)
    assert out.counts == (16, 24, 32)
    assert "keeping 8 of 32 channels fails (RuntimeError: shape mismatch" in caplog.text


def test_prune_to_latency_with_loss_valuation_says_what_it_needs() -> None:
    data = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]
    with pytest.raises(shrink.ConfigError, match="valuation='loss'.*data="):
        shrink.PruneConfig(0.5, target="latency", valuation="loss")
    with pytest.raises(shrink.ConfigError, match="valuation apply to target='latency' only"):
        shrink.PruneConfig(0.5, target="macs", valuation="loss", data=data)
    with pytest.raises(shrink.ConfigError, match="valuation must be 'scores'"):
        shrink.PruneConfig(0.5, target="latency", valuation="accuracy", data=data)
    cfg = shrink.PruneConfig(0.5, target="latency", valuation="loss", data=data,
                             loss_fn=F.cross_entropy, max_batches=3)
    target = cfg.policy
    assert isinstance(target, shrink.latency.LatencyTarget)
    assert target.valuation is not None
    assert (target.valuation.data, target.valuation.loss_fn, target.valuation.max_batches) == (
        data, F.cross_entropy, 3)
    assert shrink.PruneConfig(0.5, target="latency").policy.valuation is None  # type: ignore


def test_labelled_data_makes_loss_the_default_valuation() -> None:
    data = [(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]))]

    def target(**kw: object) -> shrink.latency.LatencyTarget:
        policy = shrink.PruneConfig(0.5, target="latency", **kw).policy  # type: ignore[arg-type]
        assert isinstance(policy, shrink.latency.LatencyTarget)
        return policy

    loss = target(data=data, loss_fn=F.cross_entropy).valuation
    assert loss is not None
    assert (loss.data, loss.loss_fn) == (data, F.cross_entropy)
    assert shrink.PruneConfig(0.5, target="latency", data=data,
                              loss_fn=F.cross_entropy).resolved_valuation == "loss"
    # opted out, or no loss to measure (data for an activation criterion): channel scores
    assert target(data=data, loss_fn=F.cross_entropy, valuation="scores",
                  importance="taylor").valuation is None
    assert target(data=data, importance="activation").valuation is None
    assert shrink.PruneConfig(0.5, target="latency").resolved_valuation == "scores"
    assert shrink.PruneConfig(0.5).resolved_valuation is None
    # data= alone serves no criterion and no valuation: still refused
    with pytest.raises(shrink.ConfigError, match="data= is used only by"):
        shrink.PruneConfig(0.5, target="latency", data=data)


def test_a_batch_without_a_target_is_a_config_error() -> None:
    model, _, data, analysis = _setup()
    scores = shrink.score(analysis.groups, model, LnNorm())
    g = analysis.prunable[0]
    with pytest.raises(shrink.ConfigError, match="valuation='loss': a batch has no target"):
        loss_values(model, analysis.groups, scores, [Choice(g.id, (16, 32), (0.0, 0.0))],
                    LossValuation([x for x, _ in data], F.cross_entropy), analysis.model)
