"""Each criterion against scores computed by hand on tiny layers, and its group reduction."""

import math

import pytest
import torch
from torch import nn
from torch.nn.functional import mse_loss

import shrink
from shrink.criteria import Criterion
from shrink.criteria.data import Activation, Taylor
from shrink.criteria.weight import AxisScores, BNScale, LnNorm, Random, UserScores
from shrink.plan import ChannelGroup, IndexMap, Member, Side


def _two_linears(bias: bool = False, act: nn.Module | None = None) -> nn.Sequential:
    """Linear(2, 2) -> [act] -> Linear(2, 1) with W1 = [[1, 2], [3, 4]], W2 = [[5, 6]]."""
    net = nn.Sequential(nn.Linear(2, 2, bias=bias), act or nn.Identity(),
                        nn.Linear(2, 1, bias=False))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
        net[2].weight.copy_(torch.tensor([[5.0, 6.0]]))
        if bias:
            net[0].bias.zero_()
    return net


def _scores(model: nn.Module, criterion: Criterion,
            x: torch.Tensor) -> dict[str, torch.Tensor]:
    analysis = shrink.analyze(shrink.capture(model, (x,)))
    return shrink.score(analysis.groups, model, criterion)


@pytest.mark.parametrize(
    ("p", "expected"),
    [(1.0, [1 + 2 + 5, 3 + 4 + 6]), (2.0, [math.sqrt(1 + 4 + 25), math.sqrt(9 + 16 + 36)]),
     (math.inf, [5.0, 6.0])],
    ids=["l1", "l2", "linf"],
)
def test_ln_norm_joins_producer_rows_and_consumer_columns(p: float, expected: list[float]) -> None:
    scores = _scores(_two_linears(), LnNorm(p), torch.ones(1, 2))
    torch.testing.assert_close(scores["0:out"], torch.tensor(expected, dtype=torch.float64))


@pytest.mark.parametrize("p", [1.0, 2.0, 3.0, math.inf], ids=["l1", "l2", "l3", "linf"])
@pytest.mark.parametrize("shape", [(6, 5), (6, 5, 1, 1), (6, 5, 3, 3), (6, 1, 3)],
                         ids=["linear", "conv1x1", "conv3x3", "depthwise1d"])
def test_slice_norms_equal_the_norm_of_each_slice(shape: tuple[int, ...], p: float) -> None:
    from shrink.criteria.weight import slice_norms

    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    for dim in range(2):
        slices = [w.select(dim, i).double().flatten() for i in range(shape[dim])]
        want = torch.stack([s.abs().max() if p == math.inf else s.abs().pow(p).sum()
                            for s in slices])
        torch.testing.assert_close(slice_norms(w, dim, p), want, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(slice_norms(w.transpose(0, 1).contiguous().transpose(0, 1),
                                               dim, p), want, rtol=1e-5, atol=1e-6)  # strided


def test_taylor_is_mean_over_batches_of_abs_weight_times_grad() -> None:
    # L = sum(W2 W1 x). Batch x=[1,1]: h=[3,7], dL/dW2=h, dL/dW1=[[5,5],[6,6]]
    #   ch0: |1*5|+|2*5| + |5*3| = 30;  ch1: |3*6|+|4*6| + |6*7| = 84
    # Batch x=[2,0]: h=[2,6], dL/dW1=[[10,0],[12,0]]
    #   ch0: 10 + 0 + |5*2| = 20;       ch1: 36 + 0 + |6*6| = 72      -> mean: [25, 78]
    data = [(torch.tensor([[1.0, 1.0]]), torch.zeros(1)),
            (torch.tensor([[2.0, 0.0]]), torch.zeros(1))]
    crit = Taylor(data, loss_fn=lambda out, y: out.sum())
    scores = _scores(_two_linears(), crit, torch.ones(1, 2))
    torch.testing.assert_close(scores["0:out"], torch.tensor([25.0, 78.0], dtype=torch.float64))


def test_taylor_max_batches_limits_the_data() -> None:
    data = [(torch.tensor([[1.0, 1.0]]), torch.zeros(1)),
            (torch.tensor([[2.0, 0.0]]), torch.zeros(1))]
    crit = Taylor(data, loss_fn=lambda out, y: out.sum(), max_batches=1)
    scores = _scores(_two_linears(), crit, torch.ones(1, 2))
    torch.testing.assert_close(scores["0:out"], torch.tensor([30.0, 84.0], dtype=torch.float64))


def test_activation_is_mean_abs_input_of_the_consumer() -> None:
    # relu(W1 x): x=[1,1] -> [3, 7]; x=[2,-3] -> relu([-4, -6]) = [0, 0]  -> mean [1.5, 3.5]
    data = [torch.tensor([[1.0, 1.0], [2.0, -3.0]])]
    scores = _scores(_two_linears(act=nn.ReLU()), Activation(data), torch.ones(1, 2))
    torch.testing.assert_close(scores["0:out"], torch.tensor([1.5, 3.5], dtype=torch.float64))


def test_bn_scale_is_abs_gamma() -> None:
    net = nn.Sequential(nn.Conv2d(1, 3, 1), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 2, 1))
    with torch.no_grad():
        net[1].weight.copy_(torch.tensor([0.5, -2.0, 1.0]))
    scores = _scores(net, BNScale(), torch.randn(1, 1, 4, 4))
    torch.testing.assert_close(scores["0:out"], torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64))


def test_user_scores_mapping_and_callable() -> None:
    net = _two_linears()
    by_name = _scores(net, UserScores({"0": torch.tensor([7.0, 1.0])}), torch.ones(1, 2))
    torch.testing.assert_close(by_name["0:out"], torch.tensor([7.0, 1.0], dtype=torch.float64))
    fn = _scores(net, UserScores(lambda g, mods: torch.arange(g.size) * 2.0), torch.ones(1, 2))
    torch.testing.assert_close(fn["0:out"], torch.tensor([0.0, 2.0], dtype=torch.float64))


def test_random_is_reproducible_with_a_seed_and_differs_across_seeds_and_groups() -> None:
    net = nn.Sequential(nn.Conv2d(1, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(),
                        nn.Conv2d(8, 2, 1))
    x = torch.randn(1, 1, 4, 4)
    a, b, c = (_scores(net, Random(seed), x) for seed in (3, 3, 4))
    assert set(a) == {"0:out", "2:out"}
    for gid in a:
        torch.testing.assert_close(a[gid], b[gid])
        assert not torch.equal(a[gid], c[gid])
    assert not torch.equal(a["0:out"], a["2:out"])


class _Residual(nn.Module):
    """stem -> (stem + branch(stem)) -> head: one group with four members."""

    def __init__(self, c: int = 4) -> None:
        super().__init__()
        self.stem = nn.Conv2d(2, c, 1, bias=False)
        self.branch = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.head = nn.Conv2d(c, 3, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        return self.head(s + self.branch(s))


def _residual_slices(m: _Residual, c: int,
                     tensors: dict[str, torch.Tensor]) -> list[torch.Tensor]:
    """Every weight slice removed with residual channel c, from ``tensors`` shaped like weights."""
    stem, branch, head = tensors["stem"], tensors["branch"], tensors["head"]
    return [stem[c], branch[c], branch[:, c], head[:, c]]


def test_ln_norm_reduces_over_every_member_of_a_residual_group() -> None:
    model = _Residual()
    scores = _scores(model, LnNorm(2.0), torch.randn(1, 2, 5, 5))
    assert list(scores) == ["stem:out"]
    w = {n: getattr(model, n).weight.detach() for n in ("stem", "branch", "head")}
    expected = [math.sqrt(sum(float(t.pow(2).sum()) for t in _residual_slices(model, c, w)))
                for c in range(4)]
    torch.testing.assert_close(scores["stem:out"], torch.tensor(expected, dtype=torch.float64))


def test_taylor_reduces_over_every_member_of_a_residual_group() -> None:
    model = _Residual()
    batches = [(torch.randn(2, 2, 5, 5), torch.randn(2, 3, 5, 5)) for _ in range(2)]
    scores = _scores(model, Taylor(batches, mse_loss), torch.randn(1, 2, 5, 5))
    expected = torch.zeros(4, dtype=torch.float64)
    for x, y in batches:  # the reference: autograd on the model itself, |w * g| summed per slice
        model.zero_grad()
        mse_loss(model(x), y).backward()
        prod = {n: (getattr(model, n).weight * getattr(model, n).weight.grad).abs().detach()
                for n in ("stem", "branch", "head")}
        for c in range(4):
            expected[c] += sum(float(t.sum()) for t in _residual_slices(model, c, prod)) / 2
    torch.testing.assert_close(scores["stem:out"], expected)


def test_activation_averages_over_every_consumer_position_of_a_flatten() -> None:
    # conv (2 channels) -> flatten (2 x 2x2) -> linear: channel c owns 4 columns of the linear
    net = nn.Sequential(nn.Conv2d(1, 2, 1, bias=False), nn.Flatten(), nn.Linear(8, 3))
    x = torch.randn(5, 1, 2, 2)
    scores = _scores(net, Activation([x]), x[:1])
    feats = net[0](x).detach().abs()  # [5, 2, 2, 2]
    expected = feats.mean(dim=(0, 2, 3)).double()
    torch.testing.assert_close(scores["0:out"], expected)


def test_axis_scores_sum_mean_and_max_reductions() -> None:
    g = ChannelGroup("g", 2, (
        Member("a", Side.OUT, 2, IndexMap((0, 1), (0, 1))),
        Member("b", Side.IN, 4, IndexMap((0, 1, 2, 3), (0, 0, 1, 1))),
    ))
    values = {("a", Side.OUT): torch.tensor([1.0, 2.0], dtype=torch.float64),
              ("b", Side.IN): torch.tensor([3.0, 5.0, 0.0, 8.0], dtype=torch.float64)}
    expect = {"sum": [9.0, 10.0], "mean": [3.0, 10.0 / 3], "amax": [5.0, 8.0]}
    for reduce, want in expect.items():
        got = AxisScores(values, reduce)(g, {})
        torch.testing.assert_close(got, torch.tensor(want, dtype=torch.float64))
