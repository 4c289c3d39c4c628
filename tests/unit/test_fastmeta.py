"""fast_meta answers some meta ops itself: each answer must equal the default kernel's."""

from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

from shrink.capture import meta_copy, to_meta
from shrink.fastmeta import fast_meta


def _m(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.empty(shape, device="meta", dtype=dtype)


X = _m(2, 8, 5, 5)
C = _m(8)

CASES: dict[str, Callable[[], Any]] = {
    "hardtanh": lambda: F.hardtanh(X, 0.0, 6.0),
    "hardtanh_": lambda: F.hardtanh(_m(2, 8, 5, 5), 0.0, 6.0, inplace=True),
    "hardswish": lambda: F.hardswish(X),
    "hardsigmoid": lambda: F.hardsigmoid(X),
    "relu": lambda: F.relu(X),
    "silu_": lambda: F.silu(_m(2, 8, 5, 5), inplace=True),
    "sigmoid": lambda: torch.sigmoid(X),
    "gelu_tanh": lambda: F.gelu(X, approximate="tanh"),
    "add_same": lambda: X + X,
    "mul_broadcast": lambda: X * _m(2, 8, 1, 1),
    "sub_broadcast_left": lambda: _m(8, 1, 1) - X,
    "div_scalar_tensor": lambda: X / _m(),
    "add_inplace": lambda: _m(2, 8, 5, 5).add_(_m(8, 1, 1)),
    "add_mixed_dtype": lambda: X + _m(2, 8, 5, 5, dtype=torch.float64),
    "add_half": lambda: _m(2, 8, 5, 5, dtype=torch.float16) + _m(8, 1, 1, dtype=torch.float16),
    "channels_last": lambda: F.relu(X.contiguous(memory_format=torch.channels_last)),
    "bn2d": lambda: F.batch_norm(X, C, C, C, C, False),
    "bn1d": lambda: F.batch_norm(_m(3, 8), C, C, C, C, False),
    "bn_no_affine": lambda: F.batch_norm(X, C, C, None, None, False),
    "bn_half_input": lambda: F.batch_norm(X.half(), C, C, C, C, False),
    "bn_training": lambda: F.batch_norm(X, None, None, C, C, True),
    "bn_no_training_op": lambda: torch.ops.aten._native_batch_norm_legit_no_training(
        X, C, C, C, C, 0.1, 1e-5),
    "mean_keepdim": lambda: X.mean((-2, -1), keepdim=True),
    "mean_drop": lambda: X.mean((2, 3)),
    "mean_all": lambda: X.mean(),
    "mean_dtype": lambda: X.mean((2,), dtype=torch.float64),
    "cat": lambda: torch.cat([X, _m(2, 3, 5, 5)], 1),
    "cat_negative_dim": lambda: torch.cat([X, X], -1),
    "cat_one": lambda: torch.cat([X], 0),
    "conv2d": lambda: F.conv2d(X, _m(4, 8, 3, 3)),
    "conv2d_bias_stride_pad": lambda: F.conv2d(X, _m(4, 8, 3, 3), _m(4), stride=2, padding=1),
    "conv2d_dilated": lambda: F.conv2d(X, _m(4, 8, 2, 2), dilation=2, padding=(0, 1)),
    "conv2d_depthwise": lambda: F.conv2d(X, _m(8, 1, 3, 3), padding=1, groups=8),
    "conv2d_grouped": lambda: F.conv2d(X, _m(6, 4, 1, 1), groups=2),
    "conv2d_same": lambda: F.conv2d(X, _m(4, 8, 3, 3), padding="same"),
    "conv1d": lambda: F.conv1d(_m(2, 8, 7), _m(4, 8, 3), stride=2),
    "conv3d": lambda: F.conv3d(_m(1, 8, 4, 5, 5), _m(4, 8, 1, 3, 3), padding=(0, 1, 1)),
    "conv2d_channels_last": lambda: F.conv2d(
        X.contiguous(memory_format=torch.channels_last), _m(4, 8, 3, 3)),
    "conv2d_half": lambda: F.conv2d(X.half(), _m(4, 8, 3, 3, dtype=torch.float16)),
    "conv_transpose2d": lambda: F.conv_transpose2d(X, _m(8, 4, 3, 3), stride=2),
    "linear": lambda: F.linear(_m(3, 8), _m(5, 8), _m(5)),
    "linear_no_bias": lambda: F.linear(_m(3, 8), _m(5, 8)),
    "linear_3d": lambda: F.linear(_m(2, 3, 8), _m(5, 8), _m(5)),
    "linear_half": lambda: F.linear(_m(3, 8, dtype=torch.float16),
                                    _m(5, 8, dtype=torch.float16), _m(5, dtype=torch.float16)),
    "mm": lambda: torch.mm(_m(3, 8), _m(8, 5)),
    "addmm_row_bias_scaled": lambda: torch.addmm(_m(1, 5), _m(3, 8), _m(8, 5), beta=0.5,
                                                 alpha=2.0),
    "addmm_full_bias": lambda: torch.addmm(_m(3, 5), _m(3, 8), _m(5, 8).t()),
    "addmm_mixed_dtype": lambda: torch.addmm(_m(5, dtype=torch.float64), _m(3, 8), _m(8, 5)),
}

ERRORS: dict[str, Callable[[], Any]] = {
    "bn_wrong_weight": lambda: F.batch_norm(X, C, C, _m(4), C, False),
    "bn_wrong_running_mean": lambda: F.batch_norm(X, _m(4), C, C, C, False),
    "add_no_broadcast": lambda: X + _m(2, 7, 5, 5),
    "add_inplace_grows": lambda: _m(8, 1, 1).add_(X),
    "cat_mismatch": lambda: torch.cat([X, _m(2, 8, 4, 5)], 1),
    "cat_rank": lambda: torch.cat([X, _m(2, 8, 5)], 1),
    "mean_bad_dim": lambda: X.mean((4,)),
    "mean_dim_twice": lambda: X.mean((2, 2)),
    "conv_wrong_channels": lambda: F.conv2d(X, _m(4, 7, 3, 3)),
    "conv_kernel_too_large": lambda: F.conv2d(X, _m(4, 8, 7, 7)),
    "mm_mismatch": lambda: torch.mm(_m(3, 8), _m(7, 5)),
    "addmm_bias_too_wide": lambda: torch.addmm(_m(6), _m(3, 8), _m(8, 5)),
    "linear_wrong_width": lambda: F.linear(_m(3, 8), _m(5, 7), _m(5)),
}


def _describe(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return tuple(value.shape), value.stride(), value.dtype, value.device
    if isinstance(value, (tuple, list)):
        return [_describe(v) for v in value]
    return value


@pytest.mark.parametrize("case", list(CASES))
def test_fast_meta_result_equals_default_kernel(case: str) -> None:
    with torch.no_grad():
        want = _describe(CASES[case]())
        with fast_meta():
            got = _describe(CASES[case]())
    assert got == want


FAST = ("hardtanh", "hardtanh_", "hardswish", "relu", "sigmoid", "add_same", "mul_broadcast",
        "sub_broadcast_left", "add_inplace", "add_half", "bn2d", "bn1d", "bn_no_affine",
        "bn_no_training_op", "mean_keepdim", "mean_drop", "cat", "cat_negative_dim")
MATMUL = ("linear", "linear_no_bias", "linear_3d", "linear_half", "mm",
          "addmm_row_bias_scaled", "addmm_full_bias")
CONV = ("conv2d", "conv2d_bias_stride_pad", "conv2d_dilated", "conv2d_depthwise",
        "conv2d_grouped", "conv1d", "conv3d", "conv2d_half")


@pytest.mark.parametrize("case", FAST)
def test_fast_meta_takes_its_own_path(case: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import shrink.fastmeta as fm

    answered: list[Any] = []
    fast = fm._fast

    def spy(*a: Any) -> Any:
        out = fast(*a)
        if out is not NotImplemented:
            answered.append(a[0])
        return out

    monkeypatch.setattr(fm, "_fast", spy)
    with torch.no_grad(), fast_meta():
        CASES[case]()
    assert answered


@pytest.mark.parametrize(("case", "path"), [(c, "_conv") for c in CONV]
                         + [(c, "_matmul") for c in MATMUL])
def test_fast_meta_answers_convolutions_and_matrix_products_and_counts_them_as_flop_counter(
        case: str, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from torch.utils.flop_counter import FlopCounterMode

    import shrink.fastmeta as fm

    answered: list[Any] = []
    own = getattr(fm, path)

    def spy(*a: Any) -> Any:
        out = own(*a)
        answered.append(out is not NotImplemented)
        return out

    monkeypatch.setattr(fm, path, spy)
    with torch.no_grad():
        counter = FlopCounterMode(display=False)
        with counter:
            CASES[case]()
        with fast_meta(count=True) as mode:
            CASES[case]()
    assert answered == [True]  # one op each (a Linear on a 3-D input: one mm after a view)
    assert mode.flops == counter.get_total_flops() > 0


def test_fast_meta_inplace_returns_its_input() -> None:
    x = _m(2, 8, 5, 5)
    with torch.no_grad(), fast_meta():
        assert F.hardtanh(x, 0.0, 6.0, inplace=True) is x
        assert x.add_(_m(8, 1, 1)) is x


@pytest.mark.parametrize("case", list(ERRORS))
def test_fast_meta_raises_the_default_kernels_error(case: str) -> None:
    with pytest.raises(Exception) as default:  # noqa: PT011 (whatever the kernel raises)
        ERRORS[case]()
    with pytest.raises(type(default.value)) as fast, fast_meta():
        ERRORS[case]()
    assert str(fast.value) == str(default.value)


def test_fast_meta_leaves_real_tensors_alone() -> None:
    x = torch.randn(2, 8, 5, 5)
    with fast_meta():
        y = F.hardtanh(x, 0.0, 1.0)
    torch.testing.assert_close(y, x.clamp(0.0, 1.0))


class _Block(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(8, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.se = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.hardswish(self.bn(self.conv(x)))
        y = y * torch.sigmoid(self.se(y.mean((2, 3), keepdim=True)))
        y = torch.cat([y, x], 1) + 1.0
        return self.head(F.relu6(y).mean((2, 3)))


def test_fast_meta_model_run_matches_default_layer_by_layer() -> None:
    model = meta_copy(_Block().eval())
    x = to_meta(torch.randn(2, 8, 6, 6))
    seen: list[list[Any]] = [[], []]
    which = 0

    def hook(_m: nn.Module, _a: Any, out: Any) -> None:
        seen[which].append(_describe(out))

    for m in model.modules():
        m.register_forward_hook(hook)
    with torch.no_grad():
        model(x)
        which = 1
        with fast_meta():
            model(x)
    assert seen[0] == seen[1]
