"""Saliency substitution: Taylor and activation-weighted magnitude against hand computations.

Both criteria put a per-parameter saliency into a copy of the model and score groups with L1
over the rules' slices, so plain members, flatten consumers and attention heads (views of the
projections) are all scored the same way.
"""

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

import shrink
from shrink.criteria import Activation, ActivationWeighted, LnNorm, SaliencyScores, Taylor
from shrink.testing import assert_unchanged, state_snapshot


def _close(actual: torch.Tensor, expected: torch.Tensor) -> None:
    # saliencies are kept in the parameters' dtype (float32 here); the hand sums are float64
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-8)


def _groups(model: nn.Module, x: torch.Tensor) -> tuple[shrink.plan.ChannelGroup, ...]:
    return shrink.analyze(shrink.capture(model, (x,))).groups


def _conv_net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.ReLU(), nn.Conv2d(4, 5, 3, padding=1),
                         nn.ReLU(), nn.Flatten(), nn.Linear(5 * 4 * 4, 3))


def _conv_data() -> list[tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(1)
    return [(torch.randn(3, 2, 4, 4), torch.randint(0, 3, (3,))) for _ in range(2)]


def _grads(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    cross_entropy(model(x), y).backward()
    grads = {n: p.grad.detach().double().clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def _abs_wg(model: nn.Module, data: list[tuple[torch.Tensor, torch.Tensor]]
            ) -> dict[str, torch.Tensor]:
    """``mean_b |w * dL_b/dw|`` per parameter, in float64."""
    params = {n: p.detach().double() for n, p in model.named_parameters()}
    out = {n: torch.zeros_like(p) for n, p in params.items()}
    for x, y in data:
        for n, g in _grads(model, x, y).items():
            out[n] += (params[n] * g).abs() / len(data)
    return out


def test_taylor_on_conv_and_flatten_members_is_the_hand_sum_of_abs_weight_times_grad() -> None:
    model, data = _conv_net(), _conv_data()
    sal = _abs_wg(model, data)
    scores = shrink.score(_groups(model, data[0][0]), model, Taylor(data, cross_entropy))
    # conv 0: its filters (dim 0) and conv 2's input columns (dim 1)
    expected0 = sal["0.weight"].sum(dim=(1, 2, 3)) + sal["2.weight"].sum(dim=(0, 2, 3))
    _close(scores["0:out"], expected0)
    # conv 2 flattens into the Linear: channel c owns its 16 columns [16c, 16c + 16)
    expected2 = (sal["2.weight"].sum(dim=(1, 2, 3))
                 + sal["5.weight"].reshape(3, 5, 16).sum(dim=(0, 2)))
    _close(scores["2:out"], expected2)
    assert all(p.grad is None for p in model.parameters())


class _AttnNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 4, batch_first=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(a.mean(dim=1))


def _head_sums(in_proj: torch.Tensor, out_proj: torch.Tensor, heads: int) -> torch.Tensor:
    """Per head: the sum over its q, k and v rows of ``in_proj`` and its ``out_proj`` columns."""
    e = out_proj.shape[0]
    d = e // heads
    return torch.stack([
        sum(in_proj[p * e + h * d : p * e + (h + 1) * d].sum() for p in range(3))
        + out_proj[:, h * d : (h + 1) * d].sum()
        for h in range(heads)
    ])


def test_taylor_scores_multihead_attention_heads_as_the_hand_sum_over_each_heads_slices() -> None:
    # regression: the heads axis is a view of in_proj_weight/out_proj.weight, and views have no
    # .grad, so Taylor used to leave the heads group unscored
    torch.manual_seed(0)
    model = _AttnNet()
    data = [(torch.randn(2, 5, 6), torch.randint(0, 3, (2,))) for _ in range(2)]
    sal = _abs_wg(model, data)
    scores = shrink.score(_groups(model, data[0][0]), model, Taylor(data, cross_entropy))
    expected = _head_sums(sal["attn.in_proj_weight"], sal["attn.out_proj.weight"], 4)
    _close(scores["attn:heads"], expected)
    # the embed-dim group reads in_proj's columns (q, k and v) besides inp's rows
    expected_in = sal["inp.weight"].sum(dim=1) + sal["attn.in_proj_weight"].sum(dim=0)
    _close(scores["inp:out"], expected_in)


def test_activation_leaves_attention_heads_out_and_activation_weighted_scores_them() -> None:
    torch.manual_seed(0)
    model = _AttnNet()
    data = [torch.randn(2, 5, 6)]
    groups = _groups(model, data[0])
    assert "attn:heads" not in shrink.score(groups, model, Activation(data))
    # MultiheadAttention applies its projections itself (no hooked Linear): they keep |W|
    got = shrink.score(groups, model, ActivationWeighted(data))["attn:heads"]
    _close(got, LnNorm(1.0)(next(g for g in groups if g.id == "attn:heads"),
                                                dict(model.named_modules())))


def _rms(x: torch.Tensor, axis: int) -> torch.Tensor:
    rows = x.detach().movedim(axis, 0).reshape(x.shape[axis], -1).double()
    return rows.pow(2).mean(dim=1).sqrt()


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_activation_weighted_on_linears_weights_rows_and_columns_by_their_own_input_norms() -> None:
    model = _mlp()
    data = [torch.randn(5, 3), torch.randn(7, 3)]
    x = torch.cat(data)
    n1 = _rms(x, 1)  # RMS over every calibration row, across batches
    n2 = _rms(model[1](model[0](x)), 1)
    w1, w2 = model[0].weight.detach().double(), model[2].weight.detach().double()
    expected = (w1.abs() * n1).sum(dim=1) + (w2.abs() * n2).sum(dim=0)
    scores = shrink.score(_groups(model, data[0]), model, ActivationWeighted(data))
    _close(scores["0:out"], expected)


def test_activation_weighted_on_convs_broadcasts_input_norms_over_the_kernel() -> None:
    model = _conv_net()
    data = [x for x, _ in _conv_data()]
    x = torch.cat(data)
    n0 = _rms(x, 1)
    n2 = _rms(model[1](model[0](x)), 1)
    n5 = _rms(model[:5](x), 1)
    w0, w2, w5 = (model[i].weight.detach().double() for i in (0, 2, 5))
    expected0 = ((w0.abs() * n0.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
                 + (w2.abs() * n2.view(1, -1, 1, 1)).sum(dim=(0, 2, 3)))
    expected2 = ((w2.abs() * n2.view(1, -1, 1, 1)).sum(dim=(1, 2, 3))
                 + (w5.abs() * n5).reshape(3, 5, 16).sum(dim=(0, 2)))
    scores = shrink.score(_groups(model, data[0]), model, ActivationWeighted(data))
    _close(scores["0:out"], expected0)
    _close(scores["2:out"], expected2)


def test_activation_weighted_gives_a_dead_channel_zero_from_its_consumer_columns() -> None:
    model = _mlp()
    with torch.no_grad():  # channel 1: zero weights, negative bias -> relu output always 0
        model[0].weight[1] = 0.0
        model[0].bias[1] = -1.0
    data = [torch.randn(6, 3)]
    groups = _groups(model, data[0])
    aw = shrink.score(groups, model, ActivationWeighted(data))["0:out"]
    l1 = shrink.score(groups, model, LnNorm(1.0))["0:out"]
    assert aw[1] == 0.0
    assert l1[1] > 0.0  # the consumer's columns are not zero: only their input is
    assert bool((aw[[0, 2, 3]] > 0).all())


def test_prepared_criteria_are_saliency_scores_on_a_copy() -> None:
    model = _mlp()
    data = [torch.randn(4, 3)]
    groups = tuple(g for g in _groups(model, data[0]) if g.prunable)
    snap = state_snapshot(model)
    crit = ActivationWeighted(data).prepare(model, groups)
    assert isinstance(crit, SaliencyScores)
    assert crit.modules["0"] is not model[0]
    assert_unchanged(model, snap)
    (g,) = [g for g in groups if g.id == "0:out"]
    _close(crit(g, {}), crit(g, dict(model.named_modules())))


def test_dict_batches_call_the_model_with_keywords_and_take_labels_as_the_target() -> None:
    class Keyword(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = _mlp()

        def forward(self, features: torch.Tensor, labels: torch.Tensor | None = None
                    ) -> torch.Tensor:
            return self.net(features)

    model = Keyword()
    x, y = torch.randn(6, 3), torch.randint(0, 2, (6,))
    groups = _groups(model, x)
    by_tuple = shrink.score(groups, model, Taylor([(x, y)], cross_entropy))
    by_dict = shrink.score(groups, model, Taylor([{"features": x, "labels": y}], cross_entropy))
    _close(by_dict["net.0:out"], by_tuple["net.0:out"])
    aw_dict = shrink.score(groups, model, ActivationWeighted([{"features": x}]))
    aw_tensor = shrink.score(groups, model, ActivationWeighted([x]))
    _close(aw_dict["net.0:out"], aw_tensor["net.0:out"])


@pytest.mark.parametrize("name", ["activation_weighted", "wanda", "aw", "AW"])
def test_activation_weighted_names_build_the_criterion(name: str) -> None:
    cfg = shrink.PruneConfig(0.3, importance=name, data=[torch.randn(2, 3)], max_batches=1)
    assert isinstance(cfg.criterion, ActivationWeighted)
    assert cfg.criterion.max_batches == 1


def test_activation_weighted_without_data_names_the_option() -> None:
    with pytest.raises(shrink.ConfigError,
                       match=r"ActivationWeighted importance needs data.*data="):
        shrink.PruneConfig(0.3, importance="activation_weighted")
    with pytest.raises(shrink.ConfigError, match="needs data"):
        ActivationWeighted()
    with pytest.raises(shrink.ConfigError, match="iterable of batches"):
        ActivationWeighted({"x": torch.randn(2, 3)})
    with pytest.raises(shrink.ConfigError, match="activation_weighted"):
        shrink.PruneConfig(0.3, importance="wandb")


def _tiny_llama() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2)
    return transformers.LlamaForCausalLM(cfg).eval()


def test_activation_weighted_prunes_a_tiny_llama_and_leaves_it_untouched() -> None:
    model = _tiny_llama()
    batches = [torch.randint(0, 64, (2, 16)) for _ in range(3)]
    ids = batches[0]
    snap = state_snapshot(model)
    res = shrink.prune(model, (ids,), shrink.PruneConfig(
        0.3, importance="activation_weighted", data=batches, capture="export"))
    assert_unchanged(model, snap)
    assert all(p.grad is None for p in model.parameters())
    assert res.plan.decisions
    scores = shrink.score(res.analysis.groups, model, ActivationWeighted(batches))
    assert scores
    for gid, s in scores.items():
        assert bool(torch.isfinite(s).all()), gid
        assert not bool((s == s[0]).all()), gid
    assert "model.layers.0.mlp.gate_proj:out" in scores


def test_taylor_uses_the_models_loss_for_dict_batches_with_labels() -> None:
    model = _tiny_llama()
    ids = torch.randint(0, 64, (2, 16))
    groups = shrink.analyze(shrink.capture(model, (ids,), frontend="export")).groups
    scores = shrink.score(groups, model, Taylor([{"input_ids": ids, "labels": ids}]))
    s = scores["model.layers.0.mlp.gate_proj:out"]
    assert bool(torch.isfinite(s).all())
    assert float(s.sum()) > 0
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(shrink.ConfigError, match=r"has no \.loss"):
        shrink.score(groups, model, Taylor([{"input_ids": ids}]))



def test_activation_weighted_reads_the_transposed_conv1d_weight_of_gpt2() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_embd=16, n_layer=1, n_head=2, vocab_size=32)).eval()
    batches = [torch.randint(0, 32, (2, 8)) for _ in range(2)]
    mlp = model.transformer.h[0].mlp
    seen: dict[str, list[torch.Tensor]] = {"c_fc": [], "c_proj": []}
    hooks = [getattr(mlp, n).register_forward_pre_hook(
        lambda _m, args, n=n: seen[n].append(args[0].detach())) for n in seen]
    with torch.no_grad():
        for ids in batches:
            model(ids)
    for h in hooks:
        h.remove()
    n_fc, n_proj = (_rms(torch.cat(seen[n]), -1) for n in ("c_fc", "c_proj"))
    w_fc, w_proj = mlp.c_fc.weight.detach().double(), mlp.c_proj.weight.detach().double()
    # Conv1D stores (in, out): c_fc's channel c is its column, c_proj's its row
    expected = (w_fc.abs() * n_fc[:, None]).sum(dim=0) + (w_proj.abs() * n_proj[:, None]).sum(1)
    groups = shrink.analyze(shrink.capture(model, (batches[0],), frontend="export")).groups
    scores = shrink.score(groups, model, ActivationWeighted(batches))
    _close(scores["transformer.h.0.mlp.c_fc:out"], expected)
