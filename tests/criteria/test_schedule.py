"""Iterative pruning: amounts relative to what remains, fine-tuning between steps."""

import pytest
import torch
from torch import nn

import shrink
from shrink.report import count_macs
from shrink.schedule import step_ratios


def _net(c: int = 16) -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(),
                         nn.Conv2d(c, c, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, 4)).eval()


@pytest.mark.parametrize(("ratio", "steps"), [(0.75, 2), (0.5, 3), (0.9, 4), (0.0, 1)])
def test_step_ratios_compound_to_the_total(ratio: float, steps: int) -> None:
    per_step = step_ratios(ratio, steps)
    assert len(per_step) == steps
    remaining = 1.0
    for r in per_step:
        remaining *= 1 - r
    assert remaining == pytest.approx(1 - ratio)


def test_each_step_prunes_what_remains_and_finetune_runs_between_steps() -> None:
    calls: list[tuple[int, int]] = []

    def finetune(model: nn.Module, step: int) -> None:
        calls.append((step, model[0].out_channels))

    x = (torch.randn(1, 3, 8, 8),)
    out = shrink.prune_iteratively(_net(), x, shrink.PruneConfig(0.75, round_to=1), steps=2,
                                   finetune=finetune)
    assert calls == [(0, 8), (1, 4)]  # 16 -> 8 -> 4: each step halves what is left
    assert [g.size for g in out.steps[1].plan.groups if g.id == "0:out"] == [8]
    assert out.model[0].out_channels == 4
    assert out.model[3].out_channels == 4


def test_finetune_may_return_a_replacement_model() -> None:
    replaced: list[nn.Module] = []

    def finetune(model: nn.Module, step: int) -> nn.Module:
        new = type(model)(*model)  # a different container around the same layers
        replaced.append(new)
        return new

    out = shrink.prune_iteratively(_net(), (torch.randn(1, 3, 8, 8),), shrink.PruneConfig(0.5),
                                   steps=2, finetune=finetune)
    assert out.model is replaced[-1]
    with pytest.raises(shrink.ConfigError, match="finetune returned int"):
        shrink.prune_iteratively(_net(), (torch.randn(1, 3, 8, 8),), shrink.PruneConfig(0.5),
                                 steps=1, finetune=lambda m, i: 3)


def test_iterative_macs_target_compounds_to_the_total() -> None:
    model, x = _net(64), (torch.randn(1, 3, 16, 16),)  # fine enough channels for 1% steps
    out = shrink.prune_iteratively(model, x, shrink.PruneConfig(0.75, target="macs"), steps=2)
    kept = count_macs(out.model, x) / count_macs(model, x)
    assert kept == pytest.approx(0.25, rel=0.03)


def test_absolute_counts_and_bad_steps_are_rejected() -> None:
    with pytest.raises(shrink.ConfigError, match="does not compound"):
        shrink.prune_iteratively(_net(), (torch.randn(1, 3, 8, 8),),
                                 shrink.PruneConfig(amount=4), steps=2)
    with pytest.raises(shrink.ConfigError, match="steps must be"):
        step_ratios(0.5, 0)
