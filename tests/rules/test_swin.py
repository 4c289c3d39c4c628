from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from torch import nn

import shrink
from shrink.plan import Side
from shrink.rules import rule_for
from shrink.rules.base import Keep
from shrink.rules.swin import PrunedShiftedWindowAttention
from shrink.testing import randomize_
from tests.helpers import n_params, ort_relative_error, prune_checked

swin = pytest.importorskip("torchvision.models.swin_transformer")

VERSIONS = {
    "v1": {},
    "v2": {"block": swin.SwinTransformerBlockV2, "downsample_layer": swin.PatchMergingV2},
}
ATTENTION = {"v1": swin.ShiftedWindowAttention, "v2": swin.ShiftedWindowAttentionV2}


def _tiny(version: str, depths: tuple[int, ...] = (2, 2)) -> nn.Module:
    return swin.SwinTransformer(
        patch_size=[4, 4], embed_dim=24, depths=list(depths), num_heads=[2, 4][: len(depths)],
        window_size=[4, 4], num_classes=5, **VERSIONS[version],
    ).eval()


def _attentions(model: nn.Module) -> dict[str, nn.Module]:
    return {f: m for f, m in model.named_modules() if f.endswith(".attn")}


@pytest.mark.parametrize("version", sorted(VERSIONS))
@pytest.mark.parametrize(
    "shape",
    [(1, 3, 32, 32), (2, 3, 16, 40)],
    ids=["square", "padded-one-axis-shift"],  # 4x10 tokens: H is one window, so only W shifts
)
def test_swin_attention_heads_halve_and_match_the_masked_oracle(
        version: str, shape: tuple[int, ...]) -> None:
    model = _tiny(version)
    res = prune_checked(model, torch.randn(*shape), exact_only=True)
    before, after = _attentions(model), _attentions(res.model)
    assert sorted(before) == sorted(after)
    assert len(after) == 4
    for fqn, attn in after.items():
        assert isinstance(attn, PrunedShiftedWindowAttention)
        assert attn.num_heads == before[fqn].num_heads // 2
        assert attn.head_dim * before[fqn].num_heads == attn.embed_dim
        assert attn.proj.out_features == attn.embed_dim  # the residual stream keeps its width
        assert res.analysis.group(f"{fqn}:heads").size == before[fqn].num_heads
    assert n_params(res.model) < n_params(model)
    assert res.report is not None
    assert res.report.macs_after < res.report.macs_before


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_swin_residual_stream_prunes_through_attention_and_patch_merging(version: str) -> None:
    model = _tiny(version)
    res = prune_checked(model, torch.randn(1, 3, 32, 32))
    after = _attentions(res.model)
    for attn in after.values():
        assert attn.qkv.in_features == attn.proj.out_features == attn.embed_dim
    first, second = (res.model.features[k][0].attn for k in (1, 3))
    assert first.embed_dim == 12
    assert second.embed_dim == 24
    assert res.report is not None
    assert res.report.deviation is not None


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_swin_embed_dim_is_pinned_with_exact_only(version: str) -> None:
    model = _tiny(version, depths=(2,))
    analysis = shrink.analyze(shrink.capture(model, (torch.randn(1, 3, 16, 16),)),
                              exact_only=True)
    reasons = " ".join(g.pinned or "" for g in analysis.groups)
    assert "LayerNorm" in reasons
    assert "exact_only" in reasons
    assert not any(g.prunable and not g.exact for g in analysis.groups)


@pytest.mark.parametrize("version", sorted(VERSIONS))
@pytest.mark.parametrize(("shift", "tokens"), [
    ([0, 0], (8, 8)), ([2, 2], (8, 8)), ([2, 2], (10, 6)), ([2, 2], (4, 10)), ([2, 2], (3, 3)),
])
def test_pruned_window_attention_keeping_every_head_matches_torchvision(
        version: str, shift: list[int], tokens: tuple[int, int]) -> None:
    attn = randomize_(ATTENTION[version](24, [4, 4], shift, 4), seed=1).eval()
    x = torch.randn(2, *tokens, 24)
    same = PrunedShiftedWindowAttention(attn, [0, 1, 2, 3]).eval()
    with torch.no_grad():
        torch.testing.assert_close(same(x), attn(x))


@pytest.mark.parametrize("version", sorted(VERSIONS))
@pytest.mark.parametrize("shift", [[0, 0], [2, 2]])
def test_dropping_heads_equals_zeroing_their_proj_columns(version: str, shift: list[int]) -> None:
    attn = randomize_(ATTENTION[version](24, [4, 4], shift, 4), seed=2).eval()
    rule = rule_for(attn)
    assert rule is not None
    assert rule.extent(attn, Side.HEADS) == 4
    masked = copy.deepcopy(attn)
    rule.mask_(masked, Side.HEADS, [1, 2])
    small = rule.shrink(attn, Keep(heads=(0, 3)))
    assert isinstance(small, PrunedShiftedWindowAttention)
    assert small.num_heads == 2
    assert small.qkv.out_features == 3 * 2 * 6
    assert small.proj.in_features == 2 * 6
    x = torch.randn(2, 10, 6, 24)
    with torch.no_grad():
        want, got = masked(x), small(x)
    assert float((got - want).abs().max() / want.abs().max()) < 1e-5
    assert not torch.allclose(want, attn(x))  # the dropped heads did contribute


def test_head_scores_slice_q_k_v_rows_and_proj_columns_of_each_head() -> None:
    attn = swin.ShiftedWindowAttention(12, [2, 2], [0, 0], 3)
    rule = rule_for(attn)
    assert rule is not None
    (qkv, qkv_dim), (proj, proj_dim) = rule.score_params(attn, Side.HEADS)
    w, p = attn.qkv.weight, attn.proj.weight
    for h in range(3):
        rows = [part * 12 + h * 4 + i for part in range(3) for i in range(4)]
        torch.testing.assert_close(qkv.select(qkv_dim, h).reshape(12, 12), w[rows])
        torch.testing.assert_close(proj.select(proj_dim, h), p[:, h * 4 : (h + 1) * 4])
    ((w_in, in_dim),) = rule.score_params(attn, Side.IN)
    assert w_in is w
    assert in_dim == 1


@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_pruned_swin_traces_with_fx_and_is_not_pruned_again(version: str) -> None:
    model = _tiny(version, depths=(2,))
    x = torch.randn(1, 3, 16, 16)
    res = prune_checked(model, x)
    traced = torch.fx.symbolic_trace(res.model)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), res.model(x))
    captured = shrink.capture(res.model, (x,))
    leaves = {str(n.target) for n in captured.graph_module.graph.nodes if n.op == "call_module"}
    assert {"features.1.0.attn", "features.1.1.attn"} <= leaves
    analysis = shrink.analyze(captured)
    assert not [g.id for g in analysis.groups if g.id.endswith(":heads")]
    rule = rule_for(res.model.features[1][0].attn)
    assert rule is not None
    pruned = res.model.features[1][0].attn
    assert rule.extent(pruned, Side.HEADS) == pruned.num_heads  # sizes, for save/load checks


@pytest.mark.onnx
@pytest.mark.parametrize("version", sorted(VERSIONS))
def test_pruned_swin_exports_to_onnx_and_matches_onnxruntime(version: str, tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    model = _tiny(version, depths=(2,))
    # batch 2: torch.export specialises a batch of 1 in torchvision's Swin (dense or pruned)
    x = torch.randn(2, 3, 16, 16)
    res = prune_checked(model, x)
    out = shrink.export_onnx(res.model, (x,), tmp_path / "swin.onnx", check=False)
    assert out.exporter == "dynamo", out.fallback_reason
    # a fresh onnxruntime session on other inputs: export's own check raises above its rtol
    assert ort_relative_error(out.path, res.model, (torch.randn(2, 3, 16, 16),)) < 1e-4
