import pytest
import torch
from torch import nn

from shrink.rules import rule_for
from shrink.rules.attention_base import AttentionHeadsRule, PerHead, head_rows, sliced_linear


def test_head_rows_lists_each_block_of_the_kept_heads() -> None:
    assert head_rows([0, 2], 2, 6, 2).tolist() == [0, 1, 4, 5, 6, 7, 10, 11]
    assert head_rows([], 4, 8, 3).tolist() == []


@pytest.mark.parametrize(("dim", "parts"), [(0, 3), (0, 1), (1, 1)])
def test_per_head_view_exposes_exactly_the_rows_or_columns_a_head_owns(dim: int,
                                                                       parts: int) -> None:
    heads, width = 3, 2
    t = torch.randn(parts * heads * width, 5) if dim == 0 else torch.randn(5, heads * width)
    view, axis = PerHead(t, dim=dim, parts=parts).view(heads)
    assert view.shape[axis] == heads
    for h in range(heads):
        idx = head_rows([h], width, heads * width, parts)
        want = t[idx] if dim == 0 else t[:, idx]
        got = view.select(axis, h)
        assert torch.equal(got, want.reshape(got.shape))


def test_sliced_linear_keeps_rows_columns_and_bias() -> None:
    src = nn.Linear(4, 6)
    new = sliced_linear(src.weight, src.bias, [5, 1], [0, 3])
    assert torch.equal(new.weight, src.weight[[5, 1]][:, [0, 3]])
    assert torch.equal(new.bias, src.bias[[5, 1]])
    assert sliced_linear(src.weight, None).bias is None


def test_multihead_attention_rule_derives_from_the_one_base() -> None:
    assert isinstance(rule_for(nn.MultiheadAttention(8, 2)), AttentionHeadsRule)
