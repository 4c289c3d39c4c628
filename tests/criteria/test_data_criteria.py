"""Data-driven criteria: they need data, say so clearly, and never touch the user's model."""

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

import shrink
from shrink.criteria import Taylor
from shrink.testing import assert_unchanged, state_snapshot


def _net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                         nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 4))


def _data(n: int = 3) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(n)]


def test_taylor_without_data_says_it_needs_data() -> None:
    with pytest.raises(shrink.ConfigError, match=r"Taylor importance needs data.*data=loader"):
        shrink.compress(_net(), 0.5, importance="taylor")
    with pytest.raises(shrink.ConfigError, match="needs data"):
        Taylor(loss_fn=cross_entropy)


def test_taylor_without_loss_fn_names_the_fix() -> None:
    with pytest.raises(shrink.ConfigError, match=r"loss_fn=torch\.nn\.functional\.cross_entropy"):
        shrink.compress(_net(), 0.5, importance="taylor", data=_data())


def test_taylor_batches_without_targets_are_rejected() -> None:
    data = [torch.randn(2, 3, 8, 8)]
    with pytest.raises(shrink.ConfigError, match="no target"):
        shrink.compress(_net(), 0.5, example_inputs=data[0][:1], importance="taylor", data=data,
                        loss_fn=cross_entropy)


@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_empty_or_wrong_data_is_a_config_error(importance: str) -> None:
    with pytest.raises(shrink.ConfigError, match="no batches"):
        shrink.compress(_net(), 0.5, example_inputs=torch.randn(1, 3, 8, 8),
                        importance=importance, data=[], loss_fn=cross_entropy)
    with pytest.raises(shrink.ConfigError, match="iterable of batches"):
        shrink.compress(_net(), 0.5, importance=importance, data=torch.randn(2, 3, 8, 8),
                        loss_fn=cross_entropy)


def test_data_option_with_a_data_free_criterion_is_rejected() -> None:
    with pytest.raises(shrink.ConfigError, match="data= is used only"):
        shrink.PruneConfig(0.5, importance="l1", data=_data())


@pytest.mark.parametrize("importance", ["taylor", "activation"])
def test_data_criteria_leave_the_model_untouched_even_in_train_mode(importance: str) -> None:
    model = _net().train()
    snap = state_snapshot(model)
    res = shrink.prune(model, (torch.randn(2, 3, 8, 8),),
                       shrink.PruneConfig(0.5, importance=importance, data=_data(),
                                          loss_fn=cross_entropy, verify=False))
    assert_unchanged(model, snap)
    assert all(p.grad is None for p in model.parameters())
    assert {d.group: len(d.keep) for d in res.plan.decisions} == {"0:out": 4, "3:out": 4}


def test_taylor_drops_channels_the_loss_does_not_depend_on() -> None:
    model = _net().eval()
    with torch.no_grad():  # channels 0..3 of the second conv never reach the loss
        model[7].weight[:, :4] = 0.0
    res = shrink.prune(model, (torch.randn(1, 3, 8, 8),),
                       shrink.PruneConfig(0.5, importance="taylor", data=_data(),
                                          loss_fn=cross_entropy))
    (d,) = [d for d in res.plan.decisions if d.group == "3:out"]
    assert d.keep == (4, 5, 6, 7)


def test_taylor_on_frozen_weights_says_no_gradient_reached_them() -> None:
    model = _net()
    for p in model.parameters():
        p.requires_grad_(False)
    model[7].bias.requires_grad_(True)  # the loss still has a graph, but no scored weight
    with pytest.raises(shrink.ConfigError, match="requires_grad=False"):
        shrink.compress(model, 0.5, example_inputs=torch.randn(1, 3, 8, 8), importance="taylor",
                        data=_data(1), loss_fn=cross_entropy)


def test_a_criterion_instance_is_accepted_as_importance() -> None:
    data = _data()
    crit = Taylor(data, cross_entropy, max_batches=2)
    model, x = _net(), (torch.randn(1, 3, 8, 8),)
    by_option = shrink.prune(model, x, shrink.PruneConfig(0.5, importance=crit)).plan
    by_name = shrink.prune(model, x, shrink.PruneConfig(0.5, importance="taylor", data=data,
                                                        loss_fn=cross_entropy,
                                                        max_batches=2)).plan
    assert by_option == by_name
    assert by_option.decisions
