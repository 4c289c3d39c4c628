import pytest
import torch
import torch.nn.utils.prune as tprune
from torch import nn

import shrink
from shrink.plan import Side
from shrink.rules import rule_for
from shrink.rules.base import Keep
from tests.helpers import kept, prune_checked


def _stack(mid: nn.Module, c_in: int = 3, c_mid: int = 8, c_out: int = 4, dim: int = 2) -> nn.Module:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    return nn.Sequential(conv(c_in, c_mid, 3, padding=1), nn.ReLU(), mid, nn.ReLU(),
                         conv(mid.out_channels, c_out, 1))


@pytest.mark.parametrize("dim", [1, 2, 3])
def test_dense_conv_chain_prunes_hidden_channels_exactly(dim: int) -> None:
    conv = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dim]
    model = _stack(conv(8, 16, 3, padding=1), dim=dim)
    x = torch.randn(2, 3, *([6] * dim))
    res = prune_checked(model, x, 0.5)
    assert kept(res, "0:out") == 4 and kept(res, "2:out") == 8
    assert res.model[2].in_channels == 4 and res.model[2].out_channels == 8
    assert res.model[4].in_channels == 8 and res.model[4].out_channels == 4  # output pinned


def test_depthwise_conv_shares_one_space_with_its_input() -> None:
    model = _stack(nn.Conv2d(8, 8, 3, padding=1, groups=8))
    res = prune_checked(model, torch.randn(1, 3, 8, 8), 0.5)
    g = res.analysis.group("0:out")
    assert {(m.module, m.side) for m in g.members} >= {("2", Side.IN), ("2", Side.OUT)}
    dw = res.model[2]
    assert dw.groups == dw.in_channels == dw.out_channels == 4


def test_depthwise_multiplier_drops_all_outputs_of_an_input() -> None:
    model = _stack(nn.Conv2d(8, 16, 3, padding=1, groups=8))
    res = prune_checked(model, torch.randn(1, 3, 8, 8), 0.5)
    dw = res.model[2]
    assert (dw.in_channels, dw.out_channels, dw.groups) == (4, 8, 4)


def test_grouped_conv_keeps_groups_and_drops_evenly_per_group() -> None:
    model = _stack(nn.Conv2d(8, 12, 3, padding=1, groups=4))
    res = prune_checked(model, torch.randn(1, 3, 8, 8), 0.5)
    gc = res.model[2]
    assert gc.groups == 4
    assert gc.in_channels == 4 and gc.out_channels == 8
    for gid in ("0:out", "2:out"):
        g = res.analysis.group(gid)
        keep = next(d.keep for d in res.plan.decisions if d.group == gid)
        per_block = [sum(1 for k in keep if g.blocks[k] == b) for b in sorted(set(g.blocks))]
        assert len(set(per_block)) == 1


@pytest.mark.parametrize("ratio", [0.5, 1])
def test_grouped_conv_groups_mode_drops_whole_conv_groups(ratio: float) -> None:
    # regnet/resnext-style bottleneck: 1x1 -> grouped 3x3 -> 1x1, 4 groups of 4 channels
    model = nn.Sequential(nn.Conv2d(3, 16, 1), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 16, 3, padding=1, groups=4), nn.BatchNorm2d(16), nn.ReLU(),
                          nn.Conv2d(16, 5, 1))
    res = prune_checked(model, torch.randn(2, 3, 6, 6), ratio, grouped_convs="groups",
                        round_to=1)
    gc = res.model[3]
    n_groups = 2 if ratio == 0.5 else 3
    assert (gc.in_channels, gc.out_channels, gc.groups) == (4 * n_groups, 4 * n_groups, n_groups)
    assert res.model[0].out_channels == res.model[1].num_features == 4 * n_groups
    assert res.model[6].in_channels == 4 * n_groups
    # one group channel per conv group: its input and output channels go together
    g = res.analysis.group("0:out")
    assert g.size == 4 and not g.blocks
    assert {(m.module, m.side) for m in g.members} >= {("3", Side.IN), ("3", Side.OUT)}


def test_grouped_conv_groups_mode_rounds_in_layer_channels() -> None:
    # 8 conv groups of 4 channels: round_to=8 keeps a multiple of 2 conv groups
    model = nn.Sequential(nn.Conv2d(3, 32, 1), nn.ReLU(),
                          nn.Conv2d(32, 32, 3, padding=1, groups=8), nn.ReLU(), nn.Conv2d(32, 5, 1))
    res = prune_checked(model, torch.randn(1, 3, 6, 6), 5, grouped_convs="groups", round_to=8)
    assert res.model[2].groups == 4 and res.model[2].out_channels == 16


def test_grouped_conv_shrink_rejects_unbalanced_groups() -> None:
    conv = nn.Conv2d(4, 4, 1, groups=2, bias=False)
    with pytest.raises(shrink.PlanError, match="unequal channel counts per conv group"):
        rule_for(conv).shrink(conv, Keep(in_=(0, 1, 2), out=(0, 1, 2)))


def test_conv_transpose_prunes_in_and_out() -> None:
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.ConvTranspose2d(8, 6, 3, stride=2),
                          nn.ReLU(), nn.Conv2d(6, 2, 1))
    res = prune_checked(model, torch.randn(1, 3, 8, 8), 0.5)
    ct = res.model[2]
    assert (ct.in_channels, ct.out_channels) == (4, 3)


def test_conv_shrink_slices_weight_exactly() -> None:
    conv = nn.Conv2d(4, 6, 3, bias=True)
    new = rule_for(conv).shrink(conv, Keep(in_=(0, 2), out=(1, 4, 5)))
    torch.testing.assert_close(new.weight, conv.weight[[1, 4, 5]][:, [0, 2]])
    torch.testing.assert_close(new.bias, conv.bias[[1, 4, 5]])
    assert new.weight.requires_grad


def test_grouped_conv_shrink_picks_local_columns() -> None:
    conv = nn.Conv2d(4, 4, 1, groups=2, bias=False)  # in/out blocks {0,1},{2,3}
    new = rule_for(conv).shrink(conv, Keep(in_=(1, 2), out=(0, 3)))
    assert new.groups == 2
    # out 0 (block 0) keeps local column of input 1 -> 1; out 3 (block 1) keeps input 2 -> local 0
    torch.testing.assert_close(new.weight[:, :, 0, 0], conv.weight[[0, 3], :, 0, 0][[0, 1], [1, 0]].reshape(2, 1))


def test_shrink_keeps_dtype_device_mode_and_requires_grad() -> None:
    conv = nn.Conv2d(4, 6, 3).double().train()
    conv.bias.requires_grad_(False)
    new = rule_for(conv).shrink(conv, Keep(out=(0, 1)))
    assert new.weight.dtype == torch.float64 and new.training
    assert new.weight.requires_grad and not new.bias.requires_grad


def test_ratio_as_int_removes_that_many_channels() -> None:
    model = _stack(nn.Conv2d(8, 16, 3, padding=1))
    res = prune_checked(model, torch.randn(1, 3, 8, 8), 3, round_to=1)
    assert kept(res, "0:out") == 5 and kept(res, "2:out") == 13


def test_ln_scores_match_ln_structured_choice() -> None:
    torch.manual_seed(1)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 9, 2))
    with torch.no_grad():
        model[3].weight.zero_()  # consumers add nothing: the choice is the filter norm alone
    for n in (1, 2, float("inf")):
        res = shrink.prune(model, (torch.randn(1, 3, 5, 5),),
                           shrink.PruneConfig(0.5, norm=n, verify=False))
        keep = next(d.keep for d in res.plan.decisions if d.group == "0:out")
        ref = nn.Conv2d(3, 8, 3)
        ref.load_state_dict(model[0].state_dict())
        tprune.ln_structured(ref, "weight", amount=0.5, n=n, dim=0)
        assert keep == tuple(int(i) for i in ref.weight_mask.flatten(1).any(1).nonzero().flatten())


class Conv3x3(nn.Conv2d):
    """A subclass whose constructor takes other arguments than Conv2d's (like torchvision's
    video ``Conv3DSimple(in_planes, out_planes, midplanes, stride, padding)``)."""

    def __init__(self, planes_in: int, planes_out: int, tags: list[str]) -> None:
        super().__init__(planes_in, planes_out, kernel_size=3, padding=1, bias=False)
        self.tags = tags


def test_issue11_subclass_with_its_own_constructor_keeps_its_class_and_attributes() -> None:
    tags = ["keep me"]
    model = nn.Sequential(Conv3x3(3, 16, tags), nn.BatchNorm2d(16), nn.ReLU(),
                          Conv3x3(16, 8, tags), nn.ReLU(), nn.Conv2d(8, 4, 1))
    res = prune_checked(model, torch.randn(2, 3, 8, 8), 0.5)
    for i in (0, 3):
        old, new = model[i], res.model[i]
        assert type(new) is Conv3x3
        assert new.tags == tags
        assert new.tags is not old.tags  # a copy: the pruned model shares nothing mutable
        assert new.kernel_size == old.kernel_size
        assert new.padding == old.padding
        assert new.bias is None
    assert res.model[0].out_channels == kept(res, "0:out") < 16
    assert res.model[3].in_channels == kept(res, "0:out")
    assert res.model[3].out_channels == kept(res, "3:out") < 8


def test_issue11_torchvision_conv3dsimple_compresses() -> None:
    video = pytest.importorskip("torchvision.models.video.resnet")
    model = nn.Sequential(video.Conv3DSimple(3, 16, 0), nn.BatchNorm3d(16), nn.ReLU(),
                          video.Conv3DSimple(16, 8, 0, stride=2), nn.ReLU(),
                          nn.Conv3d(8, 4, 1))
    x = torch.randn(1, 3, 4, 8, 8)
    res = prune_checked(model, x, 0.5)
    assert type(res.model[0]) is video.Conv3DSimple
    assert type(res.model[3]) is video.Conv3DSimple
    assert res.model[3].stride == model[3].stride
    assert res.model[0].out_channels < 16
    small = shrink.compress(model.eval(), 0.5, (x,), round_to=1)  # verify=True
    assert type(small[3]) is video.Conv3DSimple


def test_subclass_shrink_copies_the_kept_slices() -> None:
    conv = Conv3x3(4, 6, [])
    new = rule_for(conv).shrink(conv, Keep(in_=(0, 2), out=(1, 4, 5)))
    assert type(new) is Conv3x3
    torch.testing.assert_close(new.weight, conv.weight[[1, 4, 5]][:, [0, 2]])
    assert (new.in_channels, new.out_channels) == (2, 3)
    assert new.weight is not conv.weight


@pytest.mark.parametrize(
    ("conv", "shape", "pads", "groups"),
    [
        (nn.Conv2d(8, 16, 3, stride=2, padding=1), (1, 8, 20, 20), (1, 1, 1, 1), 1),
        (nn.Conv2d(8, 16, (3, 4), padding="same", dilation=2), (2, 8, 9, 9), (2, 3, 2, 3), 1),
        (nn.Conv2d(8, 8, 3, padding="valid", groups=8), (1, 8, 5, 5), (0, 0, 0, 0), 8),
        (nn.Conv1d(6, 4, 5, padding=2, groups=2, bias=False), (3, 6, 11), (2, 2), 2),
    ],
    ids=["strided", "same-dilated", "depthwise-valid", "conv1d-grouped"],
)
def test_layer_op_describes_the_conv_for_the_latency_model(conv: nn.Module, shape: tuple,
                                                           pads: tuple, groups: int) -> None:
    from shrink.rules import rule_for

    op = rule_for(conv).layer_op(conv, shape)
    assert op is not None
    assert (op.kind, op.c_in, op.c_out, op.spatial) == ("conv", conv.in_channels,
                                                         conv.out_channels, shape[2:])
    assert (op.kernel, op.stride, op.dilation) == (conv.kernel_size, conv.stride, conv.dilation)
    assert (op.pads, op.groups, op.bias) == (pads, groups, conv.bias is not None)
    # the ONNX pads give the output size PyTorch computes
    out = conv(torch.randn(shape)).shape[2:]
    for i, n in enumerate(shape[2:]):
        span = conv.dilation[i] * (conv.kernel_size[i] - 1) + 1
        assert (n + pads[i] + pads[i + len(out)] - span) // conv.stride[i] + 1 == out[i]


def test_linear_layer_op_counts_the_tokens_in_front_of_the_features() -> None:
    from shrink.rules import rule_for

    lin = nn.Linear(12, 5)
    assert rule_for(lin).layer_op(lin, (2, 7, 3, 12)).spatial == (7, 3)
    assert rule_for(lin).layer_op(lin, (2, 12)).spatial == ()


@pytest.mark.parametrize("seed", range(6))
def test_a_grouped_conv_rebuilt_by_rule_computes_its_kept_slice(seed: int) -> None:
    # 6 conv groups of 4 inputs -> 3 outputs; keep the same count in 4 of the groups, in an
    # arbitrary order of groups: the new layer must equal the old one restricted to the kept
    # inputs (zero elsewhere) at the kept outputs
    gen = torch.Generator().manual_seed(seed)
    conv = nn.Conv2d(24, 18, 3, padding=1, groups=6)
    groups = torch.randperm(6, generator=gen)[:4].tolist()
    n_in, n_out = 1 + seed % 3, 1 + seed % 2
    kin = sorted(g * 4 + i for g in groups for i in torch.randperm(4, generator=gen)[:n_in].tolist())
    kout = sorted(g * 3 + o for g in groups for o in torch.randperm(3, generator=gen)[:n_out].tolist())
    new = rule_for(conv).shrink(conv, Keep(tuple(kin), tuple(kout), None))
    assert (new.in_channels, new.out_channels, new.groups) == (len(kin), len(kout), 4)
    x = torch.randn(2, 24, 5, 5, generator=gen)
    masked = torch.zeros_like(x)
    masked[:, kin] = x[:, kin]
    torch.testing.assert_close(new(x[:, kin]), conv(masked)[:, kout], rtol=1e-5, atol=1e-6)
