import pytest
import torch
from torch import nn

import shrink
from shrink.rules.attention import PrunedMultiheadAttention
from tests.helpers import assert_matches_masked_original, ort_relative_error, prune_checked


class Block(nn.Module):
    def __init__(self, batch_first: bool, use_weights: bool = False) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 4, batch_first=batch_first)
        self.mlp = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 16))
        self.head = nn.Linear(16, 3)
        self.use_weights = use_weights

    def forward(self, x: torch.Tensor, mask: torch.Tensor, kpm: torch.Tensor) -> torch.Tensor:
        y, w = self.attn(x, x, x, attn_mask=mask, key_padding_mask=kpm,
                         need_weights=self.use_weights)
        y = x + y
        y = y + self.mlp(y)
        out = self.head(y)
        if self.use_weights:
            out = out * w.mean()
        return out


def _inputs(batch_first: bool) -> tuple[torch.Tensor, ...]:
    x = torch.randn(2, 5, 16) if batch_first else torch.randn(5, 2, 16)
    kpm = torch.zeros(2, 5, dtype=torch.bool)
    kpm[1, -1] = True
    return x, torch.randn(5, 5), kpm


@pytest.mark.parametrize("batch_first", [True, False])
def test_heads_of_multihead_attention_prune_exactly(batch_first: bool) -> None:
    res = prune_checked(Block(batch_first), _inputs(batch_first))
    attn = res.model.attn
    assert isinstance(attn, PrunedMultiheadAttention)
    assert attn.num_heads == 2
    assert attn.head_dim == 4
    assert attn.embed_dim == 16
    assert res.model.mlp[0].out_features == 16
    assert res.analysis.group("attn:heads").size == 4


def test_used_attention_weights_keep_the_heads() -> None:
    res = prune_checked(Block(True, use_weights=True), _inputs(True))
    g = res.analysis.group("attn:heads")
    assert g.pinned is not None
    assert "weights" in g.pinned
    assert isinstance(res.model.attn, nn.MultiheadAttention)


def test_pruned_attention_matches_original_when_no_head_is_dropped() -> None:
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(12, 3, batch_first=True).eval()
    new = PrunedMultiheadAttention(mha, [0, 1, 2]).eval()
    x = torch.randn(2, 4, 12)
    a, wa = mha(x, x, x)
    b, wb = new(x, x, x)
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(wa, wb)


def test_vit_half_heads_half_mlp_has_correct_head_counts() -> None:
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=2, num_heads=4, hidden_dim=32, mlp_dim=64,
        num_classes=5,
    )
    res = prune_checked(model, torch.randn(2, 3, 32, 32))
    for layer in res.model.encoder.layers:
        assert layer.self_attention.num_heads == 2
        assert layer.mlp[0].out_features == 32
    assert res.report.macs_after < 0.75 * res.report.macs_before
    # exact on inputs other than the ones it was pruned on (raises otherwise)
    assert_matches_masked_original(model, res.model, res.plan, (torch.randn(2, 3, 32, 32),))


@pytest.mark.onnx
def test_pruned_vit_exports_to_onnx_and_matches_onnxruntime(tmp_path) -> None:  # type: ignore[no-untyped-def]
    torchvision = pytest.importorskip("torchvision")
    pytest.importorskip("onnxruntime")
    model = torchvision.models.VisionTransformer(
        image_size=32, patch_size=8, num_layers=1, num_heads=4, hidden_dim=32, mlp_dim=64,
        num_classes=5,
    )
    res = prune_checked(model, torch.randn(2, 3, 32, 32))
    out = shrink.export_onnx(res.model, (torch.randn(2, 3, 32, 32),),
                                         tmp_path / "vit.onnx", check=False)
    # a fresh onnxruntime session on other inputs: export's own check raises above its rtol
    assert ort_relative_error(out.path, res.model, (torch.randn(2, 3, 32, 32),)) < 1e-4


def test_count_macs_sees_multihead_attention_in_eval_mode() -> None:
    # nn.MultiheadAttention's eval fast path is one fused op: the count must still include the
    # q/k/v and output projections (4 * L * E^2) and the two attention matmuls (2 * L^2 * E)
    from shrink.report import count_macs

    e, length = 16, 5
    mha = nn.MultiheadAttention(e, 4, batch_first=True).eval()

    class Wrap(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mha = mha

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.mha(x, x, x, need_weights=False)[0]

    want = 4 * length * e * e + 2 * length**2 * e
    assert count_macs(Wrap(), (torch.randn(1, length, e),)) == want
