import pytest
import torch
from torch import nn

import shrink
from shrink.plan import Side
from shrink.rules import rule_for
from shrink.rules.heads import (
    PrunedRelativePositionalMultiHeadAttention,
    PrunedTimmAttention,
    TimmAttentionRule,
)
from tests.helpers import n_params, ort_relative_error, prune_checked


def _tiny_vit(**kw):  # type: ignore[no-untyped-def]
    timm = pytest.importorskip("timm")
    return timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
        num_heads=4, embed_dim=32, num_classes=5, **kw,
    )


def _tiny_maxvit():  # type: ignore[no-untyped-def]
    maxvit = pytest.importorskip("torchvision.models.maxvit")
    return maxvit.MaxVit(
        input_size=(32, 32), stem_channels=8, partition_size=2, block_channels=[16, 32],
        block_layers=[1, 1], head_dim=4, stochastic_depth_prob=0.0, num_classes=5,
    )


def _timm_attention(**kw):  # type: ignore[no-untyped-def]
    attention = pytest.importorskip("timm.layers.attention")
    return attention.Attention(16, num_heads=4, **kw)


class MaskedBlock(nn.Module):
    """timm attention fed a per-head mask, then a residual and a classifier."""

    def __init__(self, attn: nn.Module) -> None:
        super().__init__()
        self.attn = attn
        self.fc = nn.Linear(16, 16)
        self.head = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        y = x + self.attn(self.fc(x), attn_mask=mask)
        return self.head(y)


def test_timm_vit_heads_prune_exactly() -> None:
    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    res = prune_checked(model, x)
    for block in res.model.blocks:
        assert isinstance(block.attn, PrunedTimmAttention)
        assert block.attn.num_heads == 2
        assert block.attn.head_dim == 8
        assert block.attn.proj.out_features == 16  # the residual stream (LayerNorm): halved
    assert res.analysis.group("blocks.0.attn:heads").size == 4
    assert n_params(res.model) < n_params(model)
    assert res.report.macs_after < 0.7 * res.report.macs_before


def test_timm_attention_embed_dim_follows_its_input_and_output_channels() -> None:
    block = MaskedBlock(_timm_attention())
    res = prune_checked(block, (torch.randn(2, 5, 16), torch.zeros(2, 1, 5, 5)))
    g = res.analysis.group("fc:out")  # the attention's input channels: prunable, exactly
    assert g.prunable
    assert g.exact
    assert ("attn", Side.IN) in {(m.module, m.side) for m in g.members}
    attn = res.model.attn
    assert attn.qkv.in_features == 8
    assert attn.proj.out_features == 16
    assert "model input" in (res.analysis.group("input:x").pinned or "")  # attn out + x


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "manual"])
@pytest.mark.parametrize("mask_dtype", [torch.float32, torch.bool], ids=["float", "bool"])
def test_timm_attention_with_per_head_mask_qk_norm_and_gate_prunes_exactly(
    fused: bool, mask_dtype: torch.dtype
) -> None:
    attn = _timm_attention(qkv_bias=True, qk_norm=True, gated=True, norm_layer=nn.LayerNorm)
    attn.fused_attn = fused
    mask = torch.randn(2, 4, 5, 5) if mask_dtype is torch.float32 else torch.rand(2, 4, 5, 5) > 0.3
    if mask_dtype is torch.bool:
        mask[..., 0] = True  # every query attends somewhere
    res = prune_checked(MaskedBlock(attn), (torch.randn(2, 5, 16), mask))
    new = res.model.attn
    assert isinstance(new, PrunedTimmAttention)
    assert new.num_heads == 2
    assert new.gate is not None
    assert new.gate.out_features == 8
    assert new.fused_attn is fused


def test_pruned_timm_attention_matches_original_when_no_head_is_dropped() -> None:
    torch.manual_seed(0)
    attn = _timm_attention(qkv_bias=True, qk_norm=True, norm_layer=nn.LayerNorm).eval()
    new = PrunedTimmAttention(attn, range(4)).eval()
    x = torch.randn(2, 5, 16)
    torch.testing.assert_close(new(x), attn(x))
    torch.testing.assert_close(new(x, is_causal=True), attn(x, is_causal=True))


def test_timm_attention_with_scale_norm_keeps_its_heads() -> None:
    attn = _timm_attention(scale_norm=True, norm_layer=nn.LayerNorm)
    res = prune_checked(MaskedBlock(attn), (torch.randn(2, 5, 16), torch.zeros(2, 4, 5, 5)))
    g = res.analysis.group("attn:heads")
    assert g.pinned is not None
    assert "scale_norm" in g.pinned
    assert res.model.attn.num_heads == 4  # all heads stay (the embed dim may still shrink)
    with pytest.raises(ValueError, match="scale_norm"):
        PrunedTimmAttention(attn, [0, 1])


def test_timm_attention_scores_cover_qkv_rows_and_proj_columns() -> None:
    attn = _timm_attention(qkv_bias=True)
    rule = rule_for(attn)
    assert isinstance(rule, TimmAttentionRule)
    params = rule.score_params(attn, Side.HEADS)
    assert all(t.shape[d] == 4 for t, d in params)
    assert {tuple(t.shape) for t, _ in params} == {(3, 4, 4, 16), (16, 4, 4), (3, 4, 4)}


def test_maxvit_heads_prune_exactly() -> None:
    model = _tiny_maxvit()
    res = prune_checked(model, torch.randn(2, 3, 32, 32))
    layers = [m for m in res.model.modules()
              if isinstance(m, PrunedRelativePositionalMultiHeadAttention)]
    assert len(layers) == 4
    assert sorted(m.n_heads for m in layers) == [2, 2, 4, 4]
    assert all(m.relative_position_bias_table.shape[1] == m.n_heads for m in layers)
    assert all(m.merge.in_features == m.n_heads * m.head_dim for m in layers)
    assert n_params(res.model) < n_params(model)


def test_pruned_layers_are_not_pruned_again() -> None:
    model = _tiny_vit()
    x = torch.randn(2, 3, 32, 32)
    once = prune_checked(model, x).model
    twice = shrink.prune(once, (x,), shrink.PruneConfig(0.5))
    heads = [g for g in twice.analysis.groups if g.id.endswith(":heads")]
    assert heads == []
    assert all(b.attn.num_heads == 2 for b in twice.model.blocks)


@pytest.mark.parametrize("which", ["timm_vit", "maxvit"])
def test_pruned_model_traces_through_with_plain_fx(which: str) -> None:
    model = _tiny_vit() if which == "timm_vit" else _tiny_maxvit()
    x = torch.randn(2, 3, 32, 32)
    pruned = prune_checked(model, x).model.eval()
    traced = torch.fx.symbolic_trace(pruned)  # attention traced through, not kept as a leaf
    with torch.no_grad():
        torch.testing.assert_close(traced(x), pruned(x))


@pytest.mark.onnx
@pytest.mark.parametrize("which", ["timm_vit", "maxvit"])
def test_pruned_model_exports_to_onnx_and_matches_onnxruntime(which: str, tmp_path) -> None:  # type: ignore[no-untyped-def]
    pytest.importorskip("onnxruntime")
    model = _tiny_vit() if which == "timm_vit" else _tiny_maxvit()
    x = torch.randn(2, 3, 32, 32)
    res = prune_checked(model, x)
    out = shrink.export_onnx(res.model, (x,), tmp_path / f"{which}.onnx", check=False)
    # a fresh onnxruntime session on other inputs: export's own check raises above its rtol
    assert ort_relative_error(out.path, res.model, (torch.randn(2, 3, 32, 32),)) < 1e-4
