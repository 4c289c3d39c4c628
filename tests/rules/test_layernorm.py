"""LayerNorm residual streams (inexact groups, exact_only) and tensors used directly in forward."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import shrink
from shrink.plan import Plan, Side
from shrink.report import count_macs
from shrink.verify import masked_reference, relative_error
from tests.helpers import kept, n_params, prune_checked


class Block(nn.Module):
    """Pre-norm transformer MLP block with a layer scale: x + gamma * fc2(act(fc1(ln(x))))."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.ln = nn.LayerNorm(c)
        self.fc1, self.fc2 = nn.Linear(c, 2 * c), nn.Linear(2 * c, c)
        self.gamma = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.fc2(torch.relu(self.fc1(self.ln(x))))


class Tokens(nn.Module):
    """Embedding + class token + position embedding + blocks + final norm + head."""

    def __init__(self, c: int = 16, n: int = 5) -> None:
        super().__init__()
        self.emb = nn.Linear(3, c)
        self.cls = nn.Parameter(torch.randn(1, 1, c))
        self.pos = nn.Parameter(torch.randn(1, n + 1, c))
        self.blocks = nn.Sequential(Block(c), Block(c))
        self.norm = nn.LayerNorm(c)
        self.head = nn.Linear(c, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.emb(x)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], dim=1) + self.pos
        return self.head(self.norm(self.blocks(t))[:, 0])


def test_residual_stream_through_layernorm_is_pruned_as_an_inexact_group() -> None:
    model = Tokens()
    x = torch.randn(3, 5, 3)
    res = prune_checked(model, x, 0.5, round_to=1)  # oracle (kept-channel statistics) holds
    g = res.analysis.group("emb:out")
    assert not g.exact
    assert g.prunable
    assert kept(res, "emb:out") == 8
    sides = {(m.module, m.side) for m in g.members}
    assert {("cls", Side.DIM2), ("pos", Side.DIM2), ("blocks.0.gamma", Side.DIM0),
            ("blocks.0.ln", Side.OUT), ("norm", Side.OUT), ("head", Side.IN)} <= sides
    p = res.model
    assert p.cls.shape == (1, 1, 8)
    assert p.pos.shape == (1, 6, 8)
    assert p.blocks[1].gamma.shape == (8,)
    assert isinstance(p.blocks[1].gamma, nn.Parameter)
    assert p.norm.normalized_shape == (8,)
    assert p.norm.weight.shape == (8,)
    assert n_params(p) < n_params(model)
    # the report says the result is not the masked original, and by how much (measured here)
    plain = masked_reference(model, res.plan, renormalize=False)
    with torch.no_grad():
        dev = relative_error(p(x), plain(x))
    assert res.report.deviation == pytest.approx(dev)
    assert dev > 1e-3
    assert "inexact" in str(res.report)
    assert "deviation" in str(res.report)


def test_exact_only_keeps_layernorm_channels_and_still_prunes_mlp_width() -> None:
    model = Tokens()
    res = prune_checked(model, torch.randn(2, 5, 3), 0.5, round_to=1, exact_only=True)
    g = res.analysis.group("emb:out")
    assert g.pinned is not None
    assert "LayerNorm" in g.pinned
    assert "exact_only" in g.pinned
    assert kept(res, "blocks.0.fc1:out") == 16
    assert res.model.blocks[0].fc1.out_features == 16
    assert res.model.cls.shape == model.cls.shape
    assert res.report.deviation is None  # every pruned group is exact
    assert all(grp.exact for grp in res.plan.groups if grp.prunable)


def test_layernorm2d_channels_first_prunes_with_kept_channel_statistics() -> None:
    tv = pytest.importorskip("torchvision")
    ln2d = tv.models.convnext.LayerNorm2d
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), ln2d(16), nn.GELU(),
                          nn.Conv2d(16, 4, 1))
    res = prune_checked(model, torch.randn(2, 3, 6, 6), 0.5, round_to=1)
    assert type(res.model[1]) is ln2d
    assert res.model[1].normalized_shape == (8,)
    assert res.model[0].out_channels == res.model[3].in_channels == 8
    assert res.report.deviation is not None


@pytest.mark.parametrize("kind", ["torch", "timm"])
def test_one_group_groupnorm_is_an_inexact_member(kind: str) -> None:
    """GroupNorm(1, C) (MobileViTv2's norm) normalises over all channels: they are pruned as an
    inexact group, the oracle normalising over the kept ones; exact_only keeps them."""
    if kind == "timm":
        norm = pytest.importorskip("timm").layers.norm.GroupNorm1(16)
    else:
        norm = nn.GroupNorm(1, 16)
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), norm, nn.GELU(), nn.Conv2d(16, 4, 1))
    x = torch.randn(2, 3, 6, 6)
    res = prune_checked(model, x, 0.5, round_to=1)
    assert type(res.model[1]) is type(norm)
    assert res.model[1].num_channels == res.model[0].out_channels == 8
    assert res.model[1].num_groups == 1 and res.model[1].weight.shape == (8,)
    assert res.report.deviation is not None and res.report.deviation > 0
    exact = shrink.prune(model, (x,), shrink.PruneConfig(0.5, round_to=1, exact_only=True))
    assert exact.model[0].out_channels == 16


def test_plan_with_tensor_members_round_trips_as_json_and_applies() -> None:
    model = Tokens()
    x = torch.randn(2, 5, 3)
    res = prune_checked(model, x, 0.5, round_to=1)
    again = Plan.from_json(res.plan.to_json())
    assert again == res.plan
    rebuilt = shrink.apply(model, again)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), res.model(x))
    # apply_ slices the tensors in place too
    inplace = shrink.apply_(copy.deepcopy(model), again)
    assert inplace.pos.shape == (1, 6, 8)
    assert isinstance(inplace.pos, nn.Parameter)
    with torch.no_grad():
        torch.testing.assert_close(inplace(x), res.model(x))


def test_tensor_that_does_not_line_up_with_one_channel_axis_pins() -> None:
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
            self.t = nn.Parameter(torch.randn(8, 8))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)  # [B, 8, H, W]
            mixed = torch.einsum("bchw,cd->bdhw", y, self.t)  # channels mixed by a raw matrix
            return self.b(mixed)

    res = prune_checked(Odd(), torch.randn(1, 3, 4, 4), 0.5, round_to=1)
    assert res.analysis.group("a:out").pinned is not None
    assert res.model.t.shape == (8, 8)


def test_tiny_torchvision_vit_prunes_its_residual_stream_heads_and_mlp() -> None:
    tv = pytest.importorskip("torchvision")
    model = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                        hidden_dim=32, mlp_dim=64, num_classes=5)
    x = torch.randn(2, 3, 32, 32)
    res = prune_checked(model, x, 0.5)
    p = res.model
    # `x.reshape(n, self.hidden_dim, n_h * n_w)` follows: the attribute is rewritten
    assert p.hidden_dim == 16
    assert p.conv_proj.out_channels == 16
    assert p.class_token.shape == (1, 1, 16)
    assert p.encoder.pos_embedding.shape == (1, 17, 16)
    attn = p.encoder.layers[0].self_attention
    assert (attn.num_heads, attn.q_proj.in_features, attn.out_proj.out_features) == (2, 16, 16)
    assert p.encoder.layers[0].mlp[0].out_features == 32
    g = res.analysis.group("conv_proj:out")
    assert ("hidden_dim", Side.ATTR) in {(m.module, m.side) for m in g.members}
    assert not g.exact
    assert res.report.deviation is not None
    # the plan replays on a fresh copy (attribute members included)
    again = shrink.apply(model, Plan.from_json(res.plan.to_json()))
    assert again.hidden_dim == 16
    with torch.no_grad():
        torch.testing.assert_close(again(x), p(x))


def test_tiny_vit_exact_only_prunes_heads_and_mlp_but_not_the_stream() -> None:
    tv = pytest.importorskip("torchvision")
    model = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                        hidden_dim=32, mlp_dim=64, num_classes=5)
    res = prune_checked(model, torch.randn(2, 3, 32, 32), 0.5, exact_only=True)
    p = res.model
    assert p.hidden_dim == 32
    assert p.conv_proj.out_channels == 32
    assert p.encoder.layers[0].self_attention.num_heads == 2
    assert p.encoder.layers[0].mlp[0].out_features == 32
    assert res.report.deviation is None


@pytest.mark.parametrize("exact_only", [False, True], ids=["inexact", "exact_only"])
def test_macs_before_counts_the_original_model_not_the_masked_reference(exact_only: bool) -> None:
    # zoo run 2026-11-28: vit_b_32 reported 4.363G MACs before with inexact groups, 4.409G with
    # exact_only=True: the masked reference's attention matmuls were not counted
    tv = pytest.importorskip("torchvision")
    model = tv.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=4,
                                        hidden_dim=32, mlp_dim=64, num_classes=5).eval()
    x = (torch.randn(2, 3, 32, 32),)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, exact_only=exact_only))
    assert res.report is not None
    assert res.report.macs_before == count_macs(model, x)
    assert res.report.params_before == n_params(model)


def test_literal_size_that_is_no_attribute_still_pins() -> None:
    class Lit(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Conv2d(3, 8, 1), nn.Linear(8, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(self.a(x).reshape(x.shape[0], 8, -1).mean(-1))

    res = prune_checked(Lit(), torch.randn(1, 3, 4, 4), 0.5)
    g = res.analysis.group("a:out")
    assert g.pinned is not None
    assert "literal size 8" in g.pinned


def test_issue10_verify_float64_retry_handles_a_renormalized_layernorm() -> None:
    model = nn.Sequential(nn.Linear(6, 16), nn.LayerNorm(16), nn.GELU(), nn.Linear(16, 6)).eval()
    x = (torch.randn(2, 5, 6),)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, round_to=1, verify=False))
    assert not all(res.plan.group(d.group).exact for d in res.plan.decisions)
    # rtol below float32 rounding: verify re-checks in float64, where the error is ~1e-16
    report = shrink.verify(model, res.model, res.plan, x, rtol=1e-12)
    assert report.oracle_dtype == "float64"
