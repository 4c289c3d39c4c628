"""shrink.from_masks: torch.nn.utils.prune masks become a physically smaller, equal model."""

from __future__ import annotations

import copy
import math
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import shrink
from shrink.interop.dead_channels import Reconcile
from shrink.interop.prune_masks import MaskedTensor, find_masks
from shrink.testing import assert_unchanged, randomize_, state_snapshot

torchvision = pytest.importorskip("torchvision")

SIZE = 32


def _n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def _dense_convs(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m.groups == 1]


def _following_bn(model: nn.Module) -> dict[str, nn.BatchNorm2d]:
    """conv FQN -> the BatchNorm registered right after it (torchvision's conv/bn pairs)."""
    pairs, prev = {}, None
    for name, m in model.named_modules():
        bn_after_conv = isinstance(m, nn.BatchNorm2d) and prev is not None
        if bn_after_conv and prev[1].out_channels == m.num_features:
            pairs[prev[0]] = m
        if isinstance(m, nn.Conv2d):
            prev = (name, m)
        elif not isinstance(m, (nn.Sequential, nn.BatchNorm2d)):
            prev = None if list(m.children()) == [] else prev
    return pairs


def _mirror_to_bn(model: nn.Module) -> None:
    """Extend each conv's output-channel mask to the BatchNorm after it (weight and bias)."""
    for name, bn in _following_bn(model).items():
        conv = model.get_submodule(name)
        if not hasattr(conv, "weight_mask"):
            continue
        alive = conv.weight_mask.flatten(1).any(dim=1).to(bn.weight.dtype)
        prune.custom_from_mask(bn, "weight", alive)
        prune.custom_from_mask(bn, "bias", alive)


def _ln(n: float) -> Callable[[nn.Module, int], None]:
    def fn(conv: nn.Module, dim: int) -> None:
        prune.ln_structured(conv, "weight", amount=0.3, n=n, dim=dim)
    return fn


def _random(conv: nn.Module, dim: int) -> None:
    prune.random_structured(conv, "weight", amount=0.3, dim=dim)


def _custom_scores(conv: nn.Module, dim: int) -> None:
    scores = torch.rand(conv.weight.shape, generator=torch.Generator().manual_seed(1))
    prune.ln_structured(conv, "weight", amount=0.3, n=1, dim=dim, importance_scores=scores)


def _iterative(conv: nn.Module, dim: int) -> None:
    for _ in range(2):  # the second amount is relative to the channels the first one left
        prune.ln_structured(conv, "weight", amount=0.25, n=2, dim=dim)


def _all_convs(fn: Callable[[nn.Module, int], None], model: nn.Module, dim: int) -> None:
    for _, conv in _dense_convs(model):
        fn(conv, dim)


METHODS = {
    "ln_structured_n1": _ln(1),
    "ln_structured_n2": _ln(2),
    "ln_structured_inf": _ln(math.inf),
    "random_structured": _random,
    "custom_importance_scores": _custom_scores,
    "iterative_ln_structured": _iterative,
}


@pytest.fixture(scope="module", params=["resnet18", "mobilenet_v2"])
def zoo_model(request: pytest.FixtureRequest) -> nn.Module:
    model = getattr(torchvision.models, request.param)()
    return randomize_(model, seed=3).eval()


def _assert_equal_to_masked(masked: nn.Module, small: nn.Module, seed: int = 7) -> None:
    gen = torch.Generator().manual_seed(seed)
    for _ in range(2):
        x = torch.randn(2, 3, SIZE, SIZE, generator=gen)
        with torch.no_grad():
            want, got = masked.eval()(x), small.eval()(x)
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))


@pytest.mark.parametrize("dim", [0, 1])
def test_every_structured_prune_function_gives_a_smaller_model_equal_to_the_masked_one(
    zoo_model: nn.Module, dim: int
) -> None:
    model = copy.deepcopy(zoo_model)
    convs = _dense_convs(model)
    names = sorted(METHODS)
    for k, (_, conv) in enumerate(convs):  # round robin: every function, on every layer kind
        METHODS[names[k % len(names)]](conv, dim)
    if dim == 0:
        _mirror_to_bn(model)  # so a masked filter yields a zero channel, not a BN constant
    snap = state_snapshot(model)
    res = shrink.from_masks(model, torch.randn(1, 3, SIZE, SIZE))
    assert_unchanged(model, snap)
    assert res.plan.decisions, res.report.diagnostics
    assert _n_params(res.model) < _n_params(zoo_model)
    assert not find_masks(res.model)
    assert not any(n.endswith("_orig") for n, _ in res.model.named_parameters())
    _assert_equal_to_masked(model, res.model)


def test_identity_mask_has_nothing_structural_to_remove() -> None:
    model = randomize_(torchvision.models.mobilenet_v2(width_mult=0.25)).eval()
    for _, conv in _dense_convs(model):
        prune.identity(conv, "weight")
    res = shrink.from_masks(model, torch.randn(1, 3, SIZE, SIZE))
    assert not res.plan.decisions
    assert any("nothing structural to remove" in d for d in res.report.diagnostics)
    _assert_equal_to_masked(model, res.model)


def test_global_unstructured_reports_nothing_structural_to_remove() -> None:
    model = randomize_(torchvision.models.mobilenet_v2(width_mult=0.25)).eval()
    params = [(m, "weight") for _, m in _dense_convs(model)]
    prune.global_unstructured(params, pruning_method=prune.L1Unstructured, amount=0.5)
    snap = state_snapshot(model)
    res = shrink.from_masks(model, torch.randn(1, 3, SIZE, SIZE))
    assert_unchanged(model, snap)
    assert not res.plan.decisions
    assert any("nothing structural to remove" in d for d in res.report.diagnostics)
    assert _n_params(res.model) == sum(p.numel() for n, p in model.named_parameters())
    _assert_equal_to_masked(model, res.model)


def test_masked_filters_behind_batchnorm_stay_under_all_and_go_under_union() -> None:
    model = randomize_(torchvision.models.resnet18()).eval()
    _all_convs(_ln(2), model, 0)  # filters only: BN makes each masked channel a nonzero constant
    res_all = shrink.from_masks(model, torch.randn(1, 3, SIZE, SIZE))
    _assert_equal_to_masked(model, res_all.model)
    assert any("nonzero constant" in d for d in res_all.report.diagnostics)
    res_union = shrink.from_masks(model, torch.randn(1, 3, SIZE, SIZE), policy="union")
    assert _n_params(res_union.model) < _n_params(res_all.model)
    note = [d for d in res_union.report.diagnostics if "policy 'union'" in d]
    assert note
    assert float(note[0].split("relative error ")[1].split()[0]) > 1e-3


class ConvBiasNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1, bias=True)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


@pytest.mark.parametrize("mask_bias", [False, True])
def test_masked_filter_with_a_live_bias_is_not_dead(mask_bias: bool) -> None:
    model = randomize_(ConvBiasNet()).eval()
    with torch.no_grad():
        model.a.bias.abs_().add_(0.1)  # positive: relu(bias) != 0
    prune.ln_structured(model.a, "weight", amount=3, n=1, dim=0)
    if mask_bias:
        prune.custom_from_mask(model.a, "bias", model.a.weight_mask.flatten(1).any(1).float())
    res = shrink.from_masks(model, torch.randn(1, 3, 8, 8))
    assert res.model.a.out_channels == (5 if mask_bias else 8)
    _assert_equal_to_masked_small(model, res.model)


def _assert_equal_to_masked_small(masked: nn.Module, small: nn.Module) -> None:
    x = torch.randn(3, 3, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(small(x), masked(x), rtol=1e-5, atol=1e-6)


def test_input_column_masks_remove_the_producers_filters_too() -> None:
    model = randomize_(ConvBiasNet()).eval()
    prune.ln_structured(model.b, "weight", amount=2, n=2, dim=1)
    res = shrink.from_masks(model, torch.randn(1, 3, 8, 8))
    assert (res.model.a.out_channels, res.model.b.in_channels) == (6, 6)
    _assert_equal_to_masked_small(model, res.model)


def test_already_removed_masks_and_live_masks_give_the_same_model() -> None:
    model = randomize_(ConvBiasNet()).eval()
    prune.ln_structured(model.b, "weight", amount=3, n=1, dim=1)
    removed = copy.deepcopy(model.b.weight.detach())
    res_live = shrink.from_masks(model, torch.randn(1, 3, 8, 8))
    folded = ConvBiasNet()
    folded.load_state_dict({"a.weight": model.a.weight, "a.bias": model.a.bias,
                            "b.weight": removed, "b.bias": model.b.bias})
    prune_free = shrink.from_masks(folded.eval(), torch.randn(1, 3, 8, 8))
    assert res_live.plan == prune_free.plan
    _assert_equal_to_masked_small(model, prune_free.model)


def test_linear_neurons_with_masked_weight_and_bias_are_removed_in_train_mode() -> None:
    model = nn.Sequential(nn.Linear(6, 10), nn.ReLU(), nn.Linear(10, 3)).train()
    randomize_(model)
    prune.ln_structured(model[0], "weight", amount=4, n=2, dim=0)
    prune.custom_from_mask(model[0], "bias", model[0].weight_mask.any(1).float())
    res = shrink.from_masks(model, torch.randn(2, 6))
    assert res.model.training
    assert res.model[0].out_features == 6
    x = torch.randn(5, 6)
    with torch.no_grad():
        torch.testing.assert_close(res.model(x), model(x))


def test_from_masks_never_mutates_a_model_with_live_prune_hooks() -> None:
    model = randomize_(ConvBiasNet()).eval()
    prune.random_structured(model.a, "weight", amount=0.5, dim=0)
    snap = state_snapshot(model)
    shrink.from_masks(model, torch.randn(1, 3, 8, 8), policy=Reconcile.UNION)
    assert_unchanged(model, snap)
    assert find_masks(model) == (MaskedTensor("a", "weight"),)


def test_unknown_policy_is_a_config_error() -> None:
    with pytest.raises(shrink.ConfigError, match="policy='everything' is unknown"):
        shrink.from_masks(ConvBiasNet(), torch.randn(1, 3, 8, 8), policy="everything")


def test_from_masks_result_saves_and_loads_into_the_original_architecture(tmp_path) -> None:
    model = randomize_(torchvision.models.resnet18()).eval()
    _all_convs(_ln(2), model, 1)
    res = shrink.from_masks(model, torch.randn(1, 3, SIZE, SIZE))
    path = shrink.save(res, tmp_path / "r18.safetensors")
    loaded = shrink.load(torchvision.models.resnet18(), path).eval()
    x = torch.randn(1, 3, SIZE, SIZE)
    with torch.no_grad():
        assert torch.equal(loaded(x), res.model.eval()(x))


class CatResidual(nn.Module):
    """One group spans two producers: cat([a(x), b(x)]) tied by a residual add."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 2, 3, padding=1)
        self.b = nn.Conv2d(3, 6, 3, padding=1)
        self.c = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], dim=1)
        return self.head(y + self.c(y))


@pytest.mark.parametrize("policy", ["all", "union"])
def test_a_producer_whose_channels_are_all_dead_keeps_one(policy: str) -> None:
    model = randomize_(CatResidual()).eval()
    dead = torch.tensor([0.0, 0.0, 1, 1, 1, 1, 1, 1])
    for name in ("a", "c"):  # channels 0, 1 (all of a's) are written by a and c: mask both
        conv = model.get_submodule(name)
        mask = dead[: conv.out_channels]
        prune.custom_from_mask(conv, "weight", mask[:, None, None, None].expand_as(conv.weight))
        prune.custom_from_mask(conv, "bias", mask)
    res = shrink.from_masks(model, torch.randn(1, 3, 8, 8), policy=policy)
    assert res.model.a.out_channels == 1
    assert res.model.c.out_channels == 7
    assert any("leave a layer with no channels" in d for d in res.report.diagnostics)
    _assert_equal_to_masked_small(model, res.model)
