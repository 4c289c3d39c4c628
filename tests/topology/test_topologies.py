"""Topology taxonomy: each test states which channels must go together, and checks the oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import shrink
from shrink.plan import Side
from tests.helpers import kept, n_params, prune_checked


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.a = nn.Conv2d(8, 16, 3, padding=1)
        self.b = nn.Conv2d(16, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn(self.stem(x)))
        return self.head(y + self.b(F.relu(self.a(y))))


def test_residual_add_couples_both_branches() -> None:
    res = prune_checked(Residual(), torch.randn(2, 3, 8, 8))
    g = res.analysis.group("stem:out")
    mods = {(m.module, m.side) for m in g.members}
    assert {("stem", Side.OUT), ("bn", Side.OUT), ("b", Side.OUT), ("a", Side.IN),
            ("head", Side.IN)} <= mods
    assert res.model.stem.out_channels == res.model.b.out_channels == 4
    assert res.model.a.out_channels == 8


class CatSelf(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        return self.head(torch.cat([y, y], dim=1))


def test_concat_of_same_tensor_groups_both_halves() -> None:
    res = prune_checked(CatSelf(), torch.randn(1, 3, 6, 6))
    g = res.analysis.group("conv:out")
    (head,) = [m for m in g.members if m.module == "head"]
    assert sorted(head.index_map.index) == list(range(16))
    assert head.index_map.channel[:8] == head.index_map.channel[8:]
    assert res.model.head.in_channels == 8


class CatMixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 6, 3, padding=1)
        self.b = nn.Conv2d(3, 10, 1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([F.relu(self.a(x)), torch.sigmoid(self.b(x))], 1))


def test_concat_of_mixed_producers_gives_offsets() -> None:
    res = prune_checked(CatMixed(), torch.randn(1, 3, 6, 6))
    ga, gb = res.analysis.group("a:out"), res.analysis.group("b:out")
    (ha,) = [m for m in ga.members if m.module == "head"]
    (hb,) = [m for m in gb.members if m.module == "head"]
    assert ha.index_map.index == tuple(range(6))
    assert hb.index_map.index == tuple(range(6, 16))
    assert res.model.head.in_channels == 3 + 5


class SplitCat(nn.Module):
    def __init__(self, use_chunk: bool) -> None:
        super().__init__()
        self.use_chunk = use_chunk
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.left = nn.Conv2d(6, 6, 3, padding=1)
        self.head = nn.Conv2d(12, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        if self.use_chunk:
            p, q = y.chunk(2, dim=1)
        else:
            p, q = torch.split(y, y.shape[1] // 2, dim=1)
        return self.head(torch.cat([self.left(p), q], dim=1))


def test_chunk_then_cat_prunes_pieces_in_step() -> None:
    for use_chunk in (True, False):
        res = prune_checked(SplitCat(use_chunk), torch.randn(1, 3, 6, 6))
        assert res.model.conv.out_channels == 6
        assert res.model.left.in_channels == 3
        assert res.model.head.in_channels == 3 + 3


class LiteralSplit(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.head = nn.Conv2d(4, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p, _ = torch.split(self.conv(x), [4, 8], dim=1)
        return self.head(p)


def test_split_with_literal_sizes_pins_the_channels() -> None:
    res = prune_checked(LiteralSplit(), torch.randn(1, 3, 6, 6))
    g = res.analysis.group("conv:out")
    assert g.pinned is not None
    assert "literal sizes" in g.pinned
    assert res.model.conv.out_channels == 12


class FlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc1 = nn.Linear(8 * 4 * 4, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.flatten(F.relu(self.conv(x)), 1)
        return self.fc2(F.relu(self.fc1(y)))


def test_flatten_into_linear_expands_each_channel_to_a_block() -> None:
    res = prune_checked(FlattenLinear(), torch.randn(2, 3, 6, 6))
    g = res.analysis.group("conv:out")
    (fc,) = [m for m in g.members if m.module == "fc1"]
    assert fc.index_map.channel[:16] == (0,) * 16
    assert fc.index_map.channel[16:32] == (1,) * 16
    assert res.model.fc1.in_features == 4 * 16
    assert res.model.fc1.out_features == 16
    assert res.model.fc2.out_features == 5


class HardcodedView(FlattenLinear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x)).view(x.shape[0], 128)
        return self.fc2(F.relu(self.fc1(y)))


def test_view_with_literal_channel_size_pins_and_says_why() -> None:
    res = prune_checked(HardcodedView(), torch.randn(2, 3, 6, 6))
    g = res.analysis.group("conv:out")
    assert g.pinned is not None
    assert "literal size 128" in g.pinned
    assert res.model.fc1.out_features == 16


class Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.b = nn.Conv2d(3, 8, 1)
        self.head = nn.Conv2d(16, 2, 1)

    @staticmethod
    def shuffle(y: torch.Tensor) -> torch.Tensor:
        n, c, h, w = y.size()
        return y.view(n, 2, c // 2, h, w).transpose(1, 2).contiguous().view(n, -1, h, w)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([self.a(x), self.b(x)], 1)
        return self.head(F.relu(self.shuffle(y)))


def test_channel_shuffle_couples_interleaved_channels() -> None:
    model = Shuffle()
    res = prune_checked(model, torch.randn(1, 3, 5, 5))
    # which a/b channel reaches each head input: shuffle a tensor of channel labels
    labels = torch.cat([torch.arange(8), torch.arange(8)]).float().view(1, 16, 1, 1)
    source = torch.cat([torch.zeros(8), torch.ones(8)]).view(1, 16, 1, 1)
    head_label = model.shuffle(labels).flatten().long().tolist()
    head_source = model.shuffle(source).flatten().long().tolist()
    assert head_source != sorted(head_source)  # the head sees a and b interleaved
    # a's channel c and b's channel c meet in one head group position pair: one group of both
    (g,) = [g for g in res.analysis.groups if ("b", Side.OUT) in
            {(m.module, m.side) for m in g.members}]
    assert g.id == "a:out"
    members = {(m.module, m.side): m.index_map for m in g.members}
    assert members[("a", Side.OUT)] == members[("b", Side.OUT)]
    a_map = dict(zip(members[("a", Side.OUT)].index, members[("a", Side.OUT)].channel,
                     strict=True))
    head = members[("head", Side.IN)]
    assert sorted(head.index) == list(range(16))
    for pos, chan in zip(head.index, head.channel, strict=True):
        assert chan == a_map[head_label[pos]]
    keep = set(res.plan.decisions[0].keep)
    kept_pos = [p for p in range(16) if a_map[head_label[p]] in keep]
    torch.testing.assert_close(res.model.head.weight, model.head.weight[:, kept_pos])
    assert res.model.head.in_channels == res.model.a.out_channels + res.model.b.out_channels
    assert res.model.a.out_channels == 4


class SE(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.fc1 = nn.Conv2d(16, 4, 1)
        self.fc2 = nn.Conv2d(4, 16, 1)
        self.head = nn.Conv2d(16, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.conv(x))
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(y.mean((2, 3), keepdim=True)))))
        return self.head(y * s)


def test_squeeze_excitation_gate_is_coupled_to_its_input() -> None:
    res = prune_checked(SE(), torch.randn(2, 3, 6, 6))
    g = res.analysis.group("conv:out")
    assert ("fc2", Side.OUT) in {(m.module, m.side) for m in g.members}
    assert res.model.fc2.out_channels == res.model.conv.out_channels == 8
    assert res.model.fc1.out_channels == 2


class AmaxHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.amax(F.relu(self.conv(x)), dim=(2, 3)))


def test_spatial_amax_keeps_channels_prunable() -> None:
    res = prune_checked(AmaxHead(), torch.randn(1, 3, 6, 6))
    assert res.model.conv.out_channels == 4
    assert res.model.fc.in_features == 4


class MultiIO(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(1, 8, 3, padding=1)
        self.mid = nn.Conv2d(8, 8, 1)
        self.out1 = nn.Conv2d(8, 4, 1)
        self.out2 = nn.Linear(8, 6)

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        z = F.relu(self.mid(F.relu(self.a(x) + self.b(y))))
        return {"seg": self.out1(z), "cls": self.out2(z.mean((2, 3)))}


def test_multi_input_dict_output_pins_only_io_channels() -> None:
    res = prune_checked(MultiIO(), (torch.randn(1, 3, 6, 6), torch.randn(1, 1, 6, 6)))
    assert res.model.a.out_channels == res.model.b.out_channels == 4
    assert res.model.out1.out_channels == 4
    assert res.model.out2.out_features == 6
    assert res.model.a.in_channels == 3
    assert res.model.b.in_channels == 1


class Reuse(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 1)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.stem(x))
        return self.head(F.relu(self.shared(F.relu(self.shared(y)))))


def test_module_called_twice_has_one_consistent_axis() -> None:
    res = prune_checked(Reuse(), torch.randn(1, 3, 6, 6))
    assert res.model.shared.in_channels == res.model.shared.out_channels
    assert res.model.stem.out_channels == res.model.shared.in_channels


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(6, 10)
        self.b = nn.Linear(6, 10)
        self.b.weight = self.a.weight
        self.head = nn.Linear(20, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([torch.relu(self.a(x)), torch.tanh(self.b(x))], -1))


def test_tied_weights_shrink_together_and_stay_tied() -> None:
    """a and b share one weight: the rows they slice are one channel each, so both lose the
    same rows and the pruned layers share the sliced weight again."""
    res = prune_checked(Tied(), torch.randn(2, 6))
    g = res.analysis.group("a:out")
    assert g.pinned is None
    assert {(m.module, m.side.value) for m in g.members} >= {("a", "out"), ("b", "out")}
    assert res.model.a.weight is res.model.b.weight
    assert res.model.a.out_features == res.model.b.out_features < 10


class TiedAcross(nn.Module):
    """An embedding table reused, transposed, as a projection back to the vocabulary."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(10, 8)
        self.proj = nn.Linear(8, 10)
        self.proj.weight = self.emb.weight
        self.head = nn.Linear(10, 3)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.proj(torch.relu(self.emb(ids)))))


def test_tied_weights_on_an_axis_only_one_owner_has_are_pinned_with_reason() -> None:
    """proj's rows (its OUT) are the embedding's vocabulary rows, which the embedding cannot
    drop: they stay, with the reason; the shared hidden axis still prunes together."""
    res = prune_checked(TiedAcross(), torch.randint(0, 10, (2, 5)))
    g = res.analysis.group("proj:out")
    assert g.pinned is not None and "shares a parameter" in g.pinned
    assert res.analysis.group("emb:out").pinned is None
    assert res.model.proj.weight is res.model.emb.weight
    assert res.model.emb.embedding_dim == res.model.proj.in_features < 8


class Unknown(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        y = torch.fft.fft(y, dim=1).real  # no rule: mixes the channels
        return self.head(torch.relu(self.b(y)))


def test_unknown_op_pins_what_it_touches_and_names_the_node() -> None:
    res = prune_checked(Unknown(), torch.randn(1, 3, 6, 6))
    g = res.analysis.group("a:out")
    assert g.pinned is not None
    assert "fft" in g.pinned
    assert "test_topologies.py" in g.pinned
    assert res.model.a.out_channels == 8
    assert res.model.b.out_channels == 4  # downstream of the unknown op still prunes
    assert any("fft" in d.message for d in res.analysis.diagnostics)


class ChannelSum(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.a(x))
        return self.b(y) * torch.softmax(y, dim=1).sum(1, keepdim=True)


def test_channel_reduction_and_softmax_pin_the_channels() -> None:
    res = prune_checked(ChannelSum(), torch.randn(1, 3, 6, 6))
    g = res.analysis.group("a:out")
    assert g.pinned is not None
    assert "across" in g.pinned
    assert res.model.a.out_channels == 8


def test_bn_linear_1d_and_global_scope_prune_and_stay_exact() -> None:
    model = nn.Sequential(nn.Linear(10, 32), nn.BatchNorm1d(32), nn.GELU(), nn.Dropout(0.1),
                          nn.Linear(32, 16), nn.Hardswish(), nn.Linear(16, 3))
    res = prune_checked(model, torch.randn(4, 10), 0.5, scope="global")
    before = n_params(model)
    assert n_params(res.model) < before
    assert res.model[1].num_features == res.model[0].out_features
    assert res.model[-1].out_features == 3


def test_round_to_rounds_kept_counts_up() -> None:
    model = nn.Sequential(nn.Conv2d(3, 40, 3), nn.ReLU(), nn.Conv2d(40, 2, 1))
    res = prune_checked(model, torch.randn(1, 3, 6, 6), 0.7, round_to=8)
    assert kept(res, "0:out") == 16  # 40 - round(28) = 12, rounded up to 16


def test_ignore_keeps_named_layers_intact() -> None:
    res = prune_checked(Residual(), torch.randn(1, 3, 6, 6), ignore=["a"])
    assert (res.model.a.in_channels, res.model.a.out_channels) == (8, 16)
    assert res.model.stem.out_channels == 8
    assert "ignore" in res.analysis.group("stem:out").pinned
    res = prune_checked(Residual(), torch.randn(1, 3, 6, 6), ignore=["hea*"])
    assert res.model.stem.out_channels == 8
    assert res.model.a.out_channels == 8
    res = prune_checked(Residual(), torch.randn(1, 3, 6, 6), ignore=[nn.BatchNorm2d])
    assert res.model.stem.out_channels == 8


def test_train_mode_model_is_returned_in_train_mode() -> None:
    model = Residual().train()
    res = shrink.prune(model, (torch.randn(2, 3, 6, 6),), shrink.PruneConfig(0.5))
    assert model.training
    assert res.model.training
    assert res.model.bn.training
