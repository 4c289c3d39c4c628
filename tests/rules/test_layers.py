"""InstanceNorm, per-channel PReLU and Embedding prune exactly (masked oracle)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from shrink.errors import RewriteError
from shrink.rules import rule_for
from shrink.rules.base import Keep
from tests.helpers import kept, prune_checked


@pytest.mark.parametrize("affine", [False, True])
@pytest.mark.parametrize("dim", [1, 2, 3])
def test_instance_norm_prunes_with_its_channels(dim: int, affine: bool) -> None:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    norm = {1: nn.InstanceNorm1d, 2: nn.InstanceNorm2d, 3: nn.InstanceNorm3d}[dim]
    model = nn.Sequential(conv(3, 8, 3, padding=1), norm(8, affine=affine,
                                                       track_running_stats=affine),
                          nn.ReLU(), conv(8, 2, 1))
    res = prune_checked(model, torch.randn(2, 3, *([5] * dim)), 0.5)
    assert kept(res, "0:out") == 4
    new = res.model[1]
    assert type(new) is norm
    assert new.num_features == 4
    if affine:
        assert new.weight.shape == (4,)
        assert new.running_mean.shape == (4,)


def test_per_channel_prelu_slices_its_slopes_and_shared_prelu_passes_through() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.PReLU(8), nn.Conv2d(8, 8, 1), nn.PReLU(),
                          nn.Conv2d(8, 2, 1))
    with torch.no_grad():
        model[1].weight.uniform_(-1, 1)
    res = prune_checked(model, torch.randn(2, 3, 6, 6), 0.5)
    assert res.model[1].num_parameters == 4
    assert res.model[1].weight.shape == (4,)
    assert res.model[3].num_parameters == 1
    assert res.model[2].out_channels == 4


def test_embedding_features_prune_like_linear_outputs() -> None:
    class Bag(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.emb = nn.Embedding(20, 16, padding_idx=0)
            self.fc = nn.Linear(16, 3)

        def forward(self, idx: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(self.emb(idx)).mean(1))

    res = prune_checked(Bag(), torch.randint(0, 20, (4, 7)), 0.5)
    assert res.model.emb.embedding_dim == 8
    assert res.model.emb.weight.shape == (20, 8)
    assert res.model.emb.padding_idx == 0
    assert res.model.fc.in_features == 8


def test_embedding_with_max_norm_keeps_its_features() -> None:
    model = nn.Sequential(nn.Embedding(10, 8, max_norm=1.0), nn.Flatten(), nn.Linear(24, 2))
    res = prune_checked(model, torch.randint(0, 10, (2, 3)), 0.5)
    g = res.analysis.group("0:out")
    assert g.pinned is not None
    assert "max_norm" in g.pinned


def test_group_norm_loses_whole_groups_exactly() -> None:
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.GroupNorm(4, 16), nn.ReLU(),
                          nn.Conv2d(16, 2, 1))
    res = prune_checked(model, torch.randn(2, 3, 5, 5), 0.5)
    g = res.analysis.group("0:out")
    assert g.size == 4
    assert g.exact
    gn = res.model[1]
    assert (gn.num_groups, gn.num_channels, gn.weight.shape) == (2, 8, (8,))
    assert res.model[0].out_channels == res.model[3].in_channels == 8


def test_group_norm_shrink_refuses_partial_groups() -> None:
    from shrink.rules import rule_for
    from shrink.rules.base import Keep

    gn = nn.GroupNorm(2, 8)
    with pytest.raises(ValueError, match="whole groups"):
        rule_for(gn).shrink(gn, Keep(out=(0, 1, 4, 5)))


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("track", [True, False])
def test_batch_norm_rebuild_holds_real_slices_of_every_tensor(affine: bool, track: bool) -> None:
    bn = nn.BatchNorm2d(6, affine=affine, track_running_stats=track).double().eval()
    with torch.no_grad():
        for t in (*bn.parameters(), *(b for b in bn.buffers() if b.is_floating_point())):
            t.copy_(torch.rand(6, dtype=torch.float64) + 0.5)
    if affine:
        bn.bias.requires_grad_(False)
    if track:
        bn.num_batches_tracked.fill_(7)
    keep = (0, 2, 5)
    new = rule_for(bn).shrink(bn, Keep(None, keep))
    assert type(new) is nn.BatchNorm2d
    assert new.num_features == 3
    assert not new.training
    for name in ("weight", "bias", "running_mean", "running_var"):
        old, got = getattr(bn, name), getattr(new, name)
        if old is None:
            assert got is None
            continue
        assert type(got) is type(old)
        assert got.dtype == torch.float64
        assert not got.is_meta
        assert got.requires_grad == old.requires_grad
        torch.testing.assert_close(got, old[list(keep)], rtol=0, atol=0)
    if track:
        assert new.num_batches_tracked.item() == 7
        assert new.num_batches_tracked.data_ptr() != bn.num_batches_tracked.data_ptr()
    x = torch.randn(2, 6, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(new(x[:, list(keep)]), bn(x)[:, list(keep)])


def test_rebuilt_layers_are_copies_that_keep_class_hooks_and_attributes() -> None:
    class Tagged(nn.Conv2d):
        pass

    conv = Tagged(4, 8, 3)
    conv.note = ["kept"]  # an attribute of the caller's
    seen: list[str] = []
    def untag(m: nn.Module, args: tuple, kwargs: dict) -> tuple:
        seen.append(kwargs.pop("tag"))
        return args, kwargs

    conv.register_forward_pre_hook(untag, with_kwargs=True)
    conv.register_state_dict_post_hook(lambda m, sd, prefix, local: seen.append("saved"))
    new = rule_for(conv).shrink(conv, Keep((0, 2), (1, 3, 5, 7)))
    assert type(new) is Tagged
    assert (new.in_channels, new.out_channels, new.groups) == (2, 4, 1)
    assert new.weight.shape == (4, 2, 3, 3)
    assert not new.weight.is_meta
    torch.testing.assert_close(new.weight, conv.weight[[1, 3, 5, 7]][:, [0, 2]])
    assert new.note == ["kept"]
    assert new.note is not conv.note
    new(torch.randn(1, 2, 5, 5), tag="run")  # the kwargs hook is called with its kwargs
    new.state_dict()
    assert seen == ["run", "saved"]
    new.register_forward_pre_hook(lambda *_: None)
    assert len(new._forward_pre_hooks) == 2
    assert len(conv._forward_pre_hooks) == 1  # the tables are the copy's own


def test_rebuilt_layers_are_validated_as_their_constructor_would() -> None:
    depthwise = nn.Conv2d(4, 8, 3, groups=4)  # two filters per input channel
    with pytest.raises(ValueError, match="divisible by groups"):
        rule_for(depthwise).shrink(depthwise, Keep((0, 1), (0, 1, 2)))

    class WithScale(nn.Conv2d):
        def __init__(self) -> None:
            super().__init__(4, 8, 1)
            self.scale = nn.Parameter(torch.ones(8))

    with pytest.raises(RewriteError, match="adds \\['scale'\\]"):
        rule_for(WithScale()).shrink(WithScale(), Keep(None, (0, 1)))
