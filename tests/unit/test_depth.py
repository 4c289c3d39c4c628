"""Depth pruning (shrink.depth): whole blocks go, the rest of the model is untouched.

Tiny Hugging Face models with random weights (no downloads). The oracle is the original model
with the removed blocks replaced by the identity on the hidden state.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import shrink
from shrink.depth import block_influence, find_layer_stacks, remove_layers
from shrink.testing import assert_unchanged, state_snapshot
from shrink.verify import relative_error
from tests.helpers import n_params

T = pytest.importorskip("transformers")

VOCAB = 64


def llama(layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return T.LlamaForCausalLM(T.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def gpt2(layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return T.GPT2LMHeadModel(T.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=layers, n_head=4,
                                          n_positions=64, bos_token_id=0, eos_token_id=0))


def bert(layers: int = 4) -> nn.Module:
    torch.manual_seed(0)
    return T.BertModel(T.BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=layers,
                                    num_attention_heads=4, intermediate_size=64,
                                    max_position_embeddings=64))


def t5() -> nn.Module:
    torch.manual_seed(0)
    return T.T5ForConditionalGeneration(T.T5Config(
        vocab_size=VOCAB, d_model=32, d_ff=64, d_kv=8, num_layers=4, num_decoder_layers=3,
        num_heads=4))


def bart() -> nn.Module:
    torch.manual_seed(0)
    return T.BartForConditionalGeneration(T.BartConfig(
        vocab_size=VOCAB, d_model=32, encoder_layers=4, decoder_layers=3,
        encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
        decoder_ffn_dim=64, max_position_embeddings=64))


def ids(seed: int = 1, n: int = 16) -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, n), generator=torch.Generator().manual_seed(seed))


def seq2seq_batch() -> dict[str, torch.Tensor]:
    return {"input_ids": ids(1), "decoder_input_ids": ids(2, 8)}


def layer_idx_values(model: nn.Module, stack: str) -> list[int]:
    return [m.layer_idx for block in model.get_submodule(stack)
            for m in block.modules() if isinstance(m.__dict__.get("layer_idx"), int)]


@torch.no_grad()
def my_block_influence(model: nn.Module, layers: nn.ModuleList,
                       batches: list[torch.Tensor]) -> list[float]:
    """ShortGPT's BI written out independently: hooks on the blocks, 1 - mean token cosine."""
    cos: list[list[torch.Tensor]] = [[] for _ in layers]

    def hook(i: int) -> Any:
        def record(_m: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
            x = args[0] if args else kwargs["hidden_states"]
            y = out[0] if isinstance(out, tuple) else out
            cos[i].append(F.cosine_similarity(x, y, dim=-1).flatten())
        return record

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(layers)]
    model.eval()
    for b in batches:
        model(b)
    for h in handles:
        h.remove()
    return [1.0 - float(torch.cat(c).double().mean()) for c in cos]


@pytest.mark.parametrize(
    ("build", "stacks"),
    [(llama, ("model.layers",)), (gpt2, ("transformer.h",)), (bert, ("encoder.layer",)),
     (t5, ("encoder.block", "decoder.block")),
     (bart, ("model.encoder.layers", "model.decoder.layers"))],
    ids=["llama", "gpt2", "bert", "t5", "bart"],
)
def test_find_layer_stacks_names_the_lists_of_repeated_blocks(build: Any, stacks: tuple) -> None:
    assert find_layer_stacks(build()) == stacks


def test_removes_the_lowest_block_influence_and_leaves_the_caller_alone() -> None:
    model = llama()
    snap, params, config = state_snapshot(model), n_params(model), model.config
    data = [ids(1), ids(2)]
    twin = llama()  # same seed, same weights: the reference BI runs on its own model
    expected_bi = my_block_influence(twin, twin.model.layers, data)
    lowest = tuple(sorted(sorted(range(4), key=lambda i: expected_bi[i])[:2]))

    res = remove_layers(model, 2, data=data)

    assert res.removed == {"model.layers": lowest}
    assert res.scores["model.layers"] == pytest.approx(expected_bi, abs=1e-6)
    assert block_influence(model, "model.layers", data).tolist() == pytest.approx(expected_bi,
                                                                                  abs=1e-6)
    pruned = res.model
    assert type(pruned) is type(model)
    assert len(pruned.model.layers) == 2
    assert pruned.config.num_hidden_layers == 2
    assert layer_idx_values(pruned, "model.layers") == [0, 1]
    # the caller's model and config are untouched; the copy's config is a new, shared object
    assert_unchanged(model, snap)
    assert n_params(model) == params
    assert model.config is config
    assert config.num_hidden_layers == 4
    assert pruned.config is not config
    holders = [m for m in pruned.modules() if "config" in m.__dict__]
    assert len(holders) > 1
    assert all(m.config is pruned.config for m in holders)
    assert n_params(pruned) < params


def test_pruned_model_equals_the_masked_original_and_not_the_full_one() -> None:
    model, x = llama(), ids(3)
    res = remove_layers(model, 1, example_inputs=x)
    assert res.max_rel_error is not None
    assert res.max_rel_error <= 1e-5
    # the deliberately wrong oracle (the full model) differs: the check can fail
    with torch.no_grad():
        full = model.eval()(x).logits
        pruned = res.model.eval()(x).logits
    assert relative_error(pruned, full) > 1e-3


@pytest.mark.parametrize(("build", "amount", "left"),
                         [(gpt2, 1, 3), (gpt2, 0.5, 2), (gpt2, 0.3, 3), (bert, 2, 2)],
                         ids=["gpt2-int", "gpt2-half", "gpt2-floor", "bert-int"])
def test_layer_count_drops_by_the_amount_and_the_oracle_holds(build: Any, amount: float,
                                                               left: int) -> None:
    model = build()
    (stack,) = find_layer_stacks(model)
    res = remove_layers(model, amount, data=[ids(1)], example_inputs=ids(4))
    assert len(res.model.get_submodule(stack)) == left
    assert res.model.config.num_hidden_layers == left
    assert model.config.num_hidden_layers == 4
    assert layer_idx_values(res.model, stack) == list(range(left))
    assert res.max_rel_error is not None
    assert res.max_rel_error <= 1e-5


def test_pruned_llama_generates_with_its_kv_cache() -> None:
    res = remove_layers(llama(), 2, data=[ids(1)])
    pruned = res.model.eval()
    prompt = ids(5)[:1]
    with_cache = pruned.generate(prompt, max_new_tokens=5, use_cache=True, do_sample=False,
                                 pad_token_id=0)
    without = pruned.generate(prompt, max_new_tokens=5, use_cache=False, do_sample=False,
                              pad_token_id=0)
    assert with_cache.shape[1] > prompt.shape[1]
    assert torch.equal(with_cache, without)
    assert [layer.self_attn.layer_idx for layer in pruned.model.layers] == [0, 1]


def test_save_pretrained_reloads_the_pruned_llama(tmp_path: Path) -> None:
    pruned = remove_layers(llama(), 1, data=[ids(1)]).model.eval()
    pruned.save_pretrained(tmp_path)
    again = T.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert again.config.num_hidden_layers == 3
    x = ids(6)
    with torch.no_grad():
        torch.testing.assert_close(again(x).logits, pruned(x).logits, rtol=0, atol=0)


def test_per_layer_config_lists_keep_the_kept_layers(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = T.Qwen2ForCausalLM(T.Qwen2Config(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
        use_sliding_window=True, sliding_window=4, max_window_layers=2))
    types = list(model.config.layer_types)
    assert len(set(types)) == 2  # mixed full/sliding layers: the trim order matters
    res = remove_layers(model, 2, criterion=[0.0, 1.0, 2.0, 0.5], example_inputs=ids(1))
    assert res.removed == {"model.layers": (0, 3)}
    assert list(res.model.config.layer_types) == [types[1], types[2]]
    assert list(model.config.layer_types) == types
    res.model.save_pretrained(tmp_path)
    again = T.Qwen2ForCausalLM.from_pretrained(tmp_path)
    assert list(again.config.layer_types) == [types[1], types[2]]


def test_user_criteria_choose_the_blocks() -> None:
    model = llama()
    seen: list[tuple[Any, str, int]] = []

    def by_index(m: nn.Module, stack: str, i: int) -> float:
        seen.append((m, stack, i))
        return float(i)

    res = remove_layers(model, 1, criterion=by_index, example_inputs=ids(1))
    assert res.removed == {"model.layers": (0,)}
    assert seen == [(model, "model.layers", i) for i in range(4)]
    assert res.max_rel_error is not None  # checked on example_inputs
    res = remove_layers(model, 2, criterion=[3.0, 0.0, 2.0, 1.0])
    assert res.removed == {"model.layers": (1, 3)}
    assert res.scores == {"model.layers": (3.0, 0.0, 2.0, 1.0)}
    assert res.max_rel_error is None  # nothing to check on
    assert "model.layers 4 -> 2 blocks (removed [1, 3]" in res.describe()
    # ties go to the lowest index
    assert remove_layers(model, 1, criterion=[1.0] * 4).removed == {"model.layers": (0,)}


def test_t5_loses_blocks_from_both_stacks_and_its_configs_follow() -> None:
    model, batch = t5(), seq2seq_batch()
    keep_first = {"encoder.block": [9.0, 1.0, 3.0, 2.0], "decoder.block": [9.0, 2.0, 1.0]}
    res = remove_layers(model, 1, criterion=keep_first, example_inputs=batch)
    assert res.removed == {"encoder.block": (1,), "decoder.block": (2,)}
    assert res.max_rel_error is not None
    assert res.max_rel_error <= 1e-5
    cfg = res.model.config
    assert (cfg.num_layers, cfg.num_decoder_layers) == (3, 2)
    assert (res.model.encoder.config.num_layers, res.model.decoder.config.num_layers) == (3, 2)
    assert (model.config.num_layers, model.config.num_decoder_layers) == (4, 3)
    assert layer_idx_values(res.model, "decoder.block") == [0, 0, 1, 1]  # self + cross attn


def test_t5s_position_bias_block_stays_whatever_its_score() -> None:
    """T5's block 0 computes the relative position bias the other blocks reuse: removing it
    would change the model, so it is never picked, even when it scores lowest."""
    drop_first = {"encoder.block": [0.0, 1.0, 3.0, 2.0], "decoder.block": [0.0, 2.0, 1.0]}
    res = remove_layers(t5(), 1, criterion=drop_first, example_inputs=seq2seq_batch())
    assert res.removed == {"encoder.block": (1,), "decoder.block": (2,)}
    assert res.max_rel_error is not None and res.max_rel_error <= 1e-5
    two = remove_layers(t5(), 2, criterion=drop_first, example_inputs=seq2seq_batch(),
                        stack="decoder.block")
    assert two.removed == {"decoder.block": (1, 2)}  # only the bias block is left


def test_a_block_whose_removal_changes_the_model_fails_the_oracle_check() -> None:
    """A block hands later blocks a side output the identity cannot stand in for (T5's bias
    block, with its flag hidden from the selection): the check refuses the result."""
    model = t5()
    for m in model.encoder.block[0].modules():
        if getattr(m, "has_relative_attention_bias", False):
            m.has_relative_attention_bias = "yes"  # not True: the selection no longer sees it
    drop_first = {"encoder.block": [0.0, 1.0, 3.0, 2.0], "decoder.block": [9.0, 2.0, 1.0]}
    with pytest.raises(shrink.VerificationError, match=r"encoder.block.*identity"):
        remove_layers(model, 1, criterion=drop_first, example_inputs=seq2seq_batch())


def test_bart_block_influence_runs_on_dict_batches() -> None:
    model = bart()
    res = remove_layers(model, 1, data=[seq2seq_batch()])
    assert {s: len(idx) for s, idx in res.removed.items()} == {
        "model.encoder.layers": 1, "model.decoder.layers": 1}
    cfg = res.model.config
    assert (cfg.encoder_layers, cfg.decoder_layers) == (3, 2)
    assert res.max_rel_error is not None
    assert res.max_rel_error <= 1e-5


class Residual(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + torch.relu(self.fc(x))


def test_a_plain_module_needs_the_stack_named() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.Sequential(*[Residual(16) for _ in range(4)]),
                          nn.Linear(16, 2))
    with pytest.raises(shrink.ConfigError, match=r"found no stack.*stack='\.\.\.'"):
        remove_layers(model, 1, example_inputs=torch.randn(3, 8))
    res = remove_layers(model, 1, stack="1", example_inputs=torch.randn(3, 8))
    assert isinstance(res.model[1], nn.Sequential)
    assert len(res.model[1]) == 3
    assert res.max_rel_error is not None
    assert res.max_rel_error <= 1e-5


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"amount": 4}, r"stack 'model.layers' has 4 blocks.*at most 3"),
     ({"amount": 1.0}, r"fraction .* in \[0, 1\)"),
     ({"amount": -1}, "at most 3"),
     ({"amount": True}, "depth amount must be"),
     ({"amount": 1, "criterion": "magic"}, "criterion='magic' is unknown"),
     ({"amount": 1, "criterion": [1.0, 2.0]}, "has 4 blocks but got 2 scores"),
     ({"amount": 1}, "needs data= .*or example_inputs="),
     ({"amount": 1, "data": ids(1)}, r"data must be an iterable of batches.*data=\[batch\]"),
     ({"amount": 1, "stack": "model.norm"}, "not an nn.ModuleList"),
     ({"amount": 1, "stack": "model.nope"}, r"no module of that name.*\['model.layers'\]")],
    ids=["too-many", "fraction-1", "negative", "bool", "criterion", "score-count", "no-data",
         "tensor-data", "not-a-list", "no-such-stack"],
)
def test_bad_inputs_are_config_errors_that_say_what_to_do(kwargs: dict, match: str) -> None:
    with pytest.raises(shrink.ConfigError, match=match):
        remove_layers(llama(), **kwargs)


def test_prune_config_depth_is_validated_and_allows_depth_only() -> None:
    for bad in (-1, 1.5, True, "2"):
        with pytest.raises(shrink.ConfigError, match="depth must be"):
            shrink.PruneConfig(0.3, depth=bad)
    assert shrink.PruneConfig(depth=1).ratio is None
    assert shrink.PruneConfig(depth=0.25, data=[ids(1)]).depth == 0.25
    with pytest.raises(shrink.ConfigError, match="say how much to remove"):
        shrink.PruneConfig()
    with pytest.raises(shrink.ConfigError, match="depth=1 would remove layers at every step"):
        shrink.prune_iteratively(llama(), ids(1), shrink.PruneConfig(0.3, depth=1), steps=2)


def test_compress_with_depth_only_removes_layers() -> None:
    model, x = llama(), torch.randint(0, VOCAB, (1, 16))
    small = shrink.compress(model, None, x, depth=1, capture="export")
    assert len(small.model.layers) == 3
    assert small.config.num_hidden_layers == 3
    assert model.config.num_hidden_layers == 4
    res = shrink.prune(model, x, shrink.PruneConfig(depth=0.5))
    assert res.plan.decisions == ()
    assert res.analysis.frontend == "none"
    assert res.report is not None
    assert res.report.params_before == n_params(model)
    assert res.report.params_after == n_params(res.model)
    assert any(n.startswith("depth: model.layers 4 -> 2") for n in res.report.diagnostics)


def test_prune_with_depth_and_ratio_removes_layers_then_channels() -> None:
    model, x = llama(), torch.randint(0, VOCAB, (1, 16))
    res = shrink.prune(model, x, shrink.PruneConfig(0.3, depth=1, capture="export"))
    assert len(res.model.model.layers) == 3
    assert res.model.config.num_hidden_layers == 3
    widths = {layer.mlp.gate_proj.out_features for layer in res.model.model.layers}
    assert max(widths) < 64  # the MLPs of the kept layers lost channels too
    assert res.report is not None
    assert res.report.params_before == n_params(model)
    assert res.report.max_rel_error is not None
    assert res.report.max_rel_error <= 1e-5
    assert res.report.diagnostics[0].startswith("depth: model.layers 4 -> 3")
    assert res.analysis.diagnostics[0].message.startswith("depth: model.layers 4 -> 3")
    assert "depth: model.layers" in str(res.report)
    with torch.no_grad():
        assert res.model.eval()(x).logits.shape == (1, 16, VOCAB)


def test_block_influence_reads_dataloader_style_batches_up_to_max_batches() -> None:
    model = llama()
    first = block_influence(model, "model.layers", [ids(1)])
    pairs = [(ids(1), ids(7)), (ids(2), ids(8))]  # (input, target): the target is not an input
    assert torch.equal(block_influence(model, "model.layers", pairs, max_batches=1), first)
    both = block_influence(model, "model.layers", pairs)
    assert not torch.equal(both, first)
    assert both.shape == (4,)
    assert both.dtype == torch.float64
