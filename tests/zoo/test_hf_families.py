"""Hugging Face transformers, family by family (small configs, random weights, no download).

For every family: ``compress`` at 0.5 through the torch.export front-end succeeds; the output
structure is unchanged; with ``exact_only=True`` the result equals the original with the same
channels and heads masked by an oracle written here from the plan alone (not shrink's); the
model stays its own class (``generate()`` for decoders); and it round-trips through
``save_pretrained``/``from_pretrained`` when its config can describe it, else through
``shrink.save``/``shrink.load``, with the report saying why.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch import nn

import shrink
from shrink.plan import Side
from shrink.rules.hf import layout_of, sizes
from shrink.testing import randomize_
from tests.helpers import relative_error

T = pytest.importorskip("transformers")

V = 96  # vocabulary


def _families() -> dict[str, tuple[Callable[[], nn.Module], str]]:
    return {
        "bert": (lambda: T.BertModel(T.BertConfig(
            vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=64)), "ids"),
        "roberta": (lambda: T.RobertaModel(T.RobertaConfig(
            vocab_size=V, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=128, max_position_embeddings=70)), "ids"),
        "distilbert": (lambda: T.DistilBertModel(T.DistilBertConfig(
            vocab_size=V, dim=64, n_layers=2, n_heads=4, hidden_dim=128,
            max_position_embeddings=64)), "ids"),
        "gpt2": (lambda: T.GPT2LMHeadModel(T.GPT2Config(
            vocab_size=V, n_embd=64, n_layer=2, n_head=4, n_positions=64, bos_token_id=1,
            eos_token_id=2)), "lm"),
        "llama": (lambda: T.LlamaForCausalLM(T.LlamaConfig(
            vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)), "lm"),
        "mistral": (lambda: T.MistralForCausalLM(T.MistralConfig(
            vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64)), "lm"),
        "qwen2": (lambda: T.Qwen2ForCausalLM(T.Qwen2Config(
            vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=True)), "lm"),
        "qwen3": (lambda: T.Qwen3ForCausalLM(T.Qwen3Config(
            vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64)), "lm"),
        "phi3": (lambda: T.Phi3ForCausalLM(T.Phi3Config(
            vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=64,
            pad_token_id=0, bos_token_id=1, eos_token_id=2)), "lm"),
        "gemma": (lambda: T.GemmaForCausalLM(T.GemmaConfig(
            vocab_size=V, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=8, num_key_value_heads=2, head_dim=16,
            max_position_embeddings=64)), "lm"),
        "t5": (lambda: T.T5ForConditionalGeneration(T.T5Config(
            vocab_size=V, d_model=64, d_kv=16, d_ff=128, num_layers=2, num_heads=4,
            decoder_start_token_id=0, eos_token_id=1, pad_token_id=0)), "s2s"),
        "bart": (lambda: T.BartForConditionalGeneration(T.BartConfig(
            vocab_size=V, d_model=64, encoder_layers=2, decoder_layers=2,
            encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=128,
            decoder_ffn_dim=128, max_position_embeddings=64)), "s2s"),
        "vit": (lambda: T.ViTForImageClassification(T.ViTConfig(
            image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=128, num_labels=10)), "img"),
        "deit": (lambda: T.DeiTForImageClassification(T.DeiTConfig(
            image_size=32, patch_size=8, hidden_size=64, num_hidden_layers=2,
            num_attention_heads=4, intermediate_size=128, num_labels=10)), "img"),
        "swin": (lambda: T.SwinForImageClassification(T.SwinConfig(
            image_size=32, patch_size=2, embed_dim=32, depths=[2, 1], num_heads=[2, 4],
            window_size=4, num_labels=10)), "img"),
        "convnext": (lambda: T.ConvNextForImageClassification(T.ConvNextConfig(
            num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=10,
            image_size=32)), "img"),
    }


FAMILIES = _families()
DECODERS = [k for k, (_, kind) in FAMILIES.items() if kind in ("lm", "s2s")]


def build(name: str) -> tuple[nn.Module, tuple[Any, ...]]:
    make, kind = FAMILIES[name]
    torch.manual_seed(0)
    model = randomize_(make(), seed=1).eval()  # outputs that depend on the input
    gen = torch.Generator().manual_seed(2)
    if kind == "img":
        return model, (torch.randn(2, 3, 32, 32, generator=gen),)
    ids = torch.randint(3, V, (2, 12), generator=gen)
    if kind == "s2s":
        return model, (ids, torch.ones_like(ids), torch.randint(3, V, (2, 9), generator=gen))
    return model, (ids,)


def outputs(model: nn.Module, x: tuple[Any, ...]) -> dict[str, torch.Tensor]:
    with torch.no_grad():
        out = model(*x)
    return {k: v for k, v in out.items() if isinstance(v, torch.Tensor)}


# ------------------------------------------------------------------ an oracle of this file


def masked_original(model: nn.Module, plan: shrink.Plan) -> nn.Module:
    """``model`` with the plan's dropped channels and heads masked, from the plan alone:
    a dropped input channel is zeroed where the layer reads it (Linear/Conv input, attention
    ``hidden_states``), a dropped query head's columns of the output projection are zeroed,
    dropped entries of a tensor member are zeroed. Only exact plans (no normalised channels)."""
    ref = copy.deepcopy(model).eval()
    tensors = dict(ref.named_parameters()) | dict(ref.named_buffers())
    for (fqn, side), dropped in plan.drops().items():
        idx = torch.as_tensor(sorted(dropped), dtype=torch.long)
        if side.tensor_axis is not None:
            with torch.no_grad():
                tensors[fqn].index_fill_(side.tensor_axis, idx, 0)
            continue
        mod = ref.get_submodule(fqn)
        lay = layout_of(mod)
        if side is Side.HEADS and lay is not None:
            s = sizes(mod, lay)
            if lay.o is None:
                continue  # the consumer of the heads masks them (its IN side)
            o = getattr(mod, lay.o).weight
            cols = torch.cat([torch.arange(h * s.head_dim, (h + 1) * s.head_dim) for h in idx])
            with torch.no_grad():
                o.index_fill_(0 if lay.transposed else 1, cols, 0)
        elif side is Side.IN:
            axis = 1 if isinstance(mod, nn.modules.conv._ConvNd) else -1
            mod.register_forward_pre_hook(_zero(axis, idx), with_kwargs=True)
        elif side is Side.OUT or side is Side.ATTR:
            continue  # readers mask; an attribute is the kept count
        else:
            raise AssertionError(f"no masking for {fqn} {side}")
    return ref


def _zero(axis: int, idx: torch.Tensor) -> Any:
    def hook(mod: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if args:
            return (args[0].index_fill(axis, idx, 0), *args[1:]), kwargs
        x = kwargs["hidden_states"]
        return args, {**kwargs, "hidden_states": x.index_fill(axis, idx, 0)}

    return hook


# ------------------------------------------------------------------ the tests


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_compresses_exactly_and_keeps_its_structure(name: str) -> None:
    model, x = build(name)
    before = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, capture="export", exact_only=True))
    small = res.model
    assert type(small) is type(model)
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == before  # untouched
    n = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert n(small) < 0.8 * n(model), res.report
    assert res.report.deviation is None  # exact_only: every pruned group is exact
    ref, got = outputs(masked_original(model, res.plan), x), outputs(small, x)
    assert got.keys() == ref.keys()
    for k in ref:
        assert got[k].shape == ref[k].shape, k
    assert relative_error(list(got.values()), list(ref.values())) < 1e-4
    # the oracle is not vacuous: the unmasked original differs
    assert relative_error(list(outputs(model, x).values()), list(ref.values())) > 1e-3
    if name != "convnext":  # attention heads are pruned
        assert any(side is Side.HEADS and dropped for (_, side), dropped
                   in res.plan.drops().items()), name


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_default_prunes_the_hidden_size_inexactly(name: str) -> None:
    """Without exact_only the residual stream (through LayerNorm/RMSNorm) prunes too, as an
    inexact group whose deviation the report measures."""
    model, x = build(name)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, capture="export"))
    assert type(res.model) is type(model)
    for k, v in outputs(res.model, x).items():
        assert v.shape == outputs(model, x)[k].shape
    # BERT-likes return the hidden states; T5 and BART feed them to cross-attention
    if name not in ("bert", "roberta", "distilbert", "t5", "bart"):
        assert res.report.deviation is not None and res.report.deviation > 0
        decided = {d.group for d in res.plan.decisions}
        assert any(not g.exact for g in res.plan.groups if g.id in decided)


@pytest.mark.parametrize("name", DECODERS)
def test_decoder_generates_after_pruning(name: str) -> None:
    model, x = build(name)
    small = shrink.compress(model, 0.5, x, capture="export")
    kwargs: dict[str, Any] = {"max_new_tokens": 4, "do_sample": False}
    if FAMILIES[name][1] == "s2s":
        out = small.generate(input_ids=x[0], attention_mask=x[1], **kwargs)
    else:
        out = small.generate(x[0], **kwargs)
    assert out.shape[0] == 2 and out.shape[1] >= 4


@pytest.mark.parametrize("name", list(FAMILIES))
def test_family_round_trips(name: str, tmp_path: Any) -> None:
    """save_pretrained -> from_pretrained when the config can describe the pruned model,
    else shrink.save -> shrink.load; the report names the reason."""
    model, x = build(name)
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, capture="export", exact_only=True))
    small = res.model
    want = outputs(small, x)
    note = [d for d in res.report.diagnostics if "cannot describe" in d]
    if not note:
        assert small.config is not model.config
        small.save_pretrained(tmp_path)
        back = type(model).from_pretrained(tmp_path).eval()
    else:
        shrink.save(small, tmp_path / "small.safetensors")
        back = shrink.load(build(name)[0], tmp_path / "small.safetensors").eval()
    got = outputs(back, x)
    assert relative_error(list(got.values()), list(want.values())) == 0.0


def test_llama_config_describes_the_pruned_model() -> None:
    model, x = build("llama")
    small = shrink.compress(model, 0.5, x, capture="export")
    c, o = small.config, model.config
    assert (o.hidden_size, o.num_attention_heads, o.num_key_value_heads,
            o.intermediate_size) == (64, 8, 2, 128)  # the caller's config is untouched
    attn = small.model.layers[0].self_attn
    assert c.hidden_size == small.model.embed_tokens.embedding_dim < 64
    assert c.num_key_value_heads == attn.k_proj.out_features // c.head_dim == 1
    assert c.num_attention_heads == attn.q_proj.out_features // c.head_dim == 4
    assert attn.num_key_value_groups == 4
    assert c.intermediate_size == small.model.layers[0].mlp.up_proj.out_features < 128
    assert all(m.config is c for m in small.modules() if hasattr(m, "config"))


def test_gqa_query_mode_keeps_every_kv_head() -> None:
    model, x = build("llama")
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, capture="export", gqa="query",
                                                    exact_only=True))
    attn = res.model.model.layers[0].self_attn
    assert attn.k_proj.out_features == model.model.layers[0].self_attn.k_proj.out_features
    assert attn.q_proj.out_features == 32 and attn.num_key_value_groups == 2
    ref = outputs(masked_original(model, res.plan), x)
    assert relative_error(list(outputs(res.model, x).values()), list(ref.values())) < 1e-4
    with pytest.raises(shrink.ConfigError, match="gqa"):
        shrink.PruneConfig(0.5, gqa="heads")


def test_tied_embedding_and_lm_head_shrink_together() -> None:
    model, x = build("qwen2")  # tie_word_embeddings=True
    assert model.lm_head.weight is model.model.embed_tokens.weight
    small = shrink.compress(model, 0.5, x, capture="export")
    assert small.lm_head.weight is small.model.embed_tokens.weight
    assert small.lm_head.in_features == small.model.embed_tokens.embedding_dim < 64


def test_layers_of_different_sizes_keep_the_config_and_the_report_says_why() -> None:
    model, x = build("llama")
    res = shrink.prune(model, x, shrink.PruneConfig(
        0.5, capture="export", exact_only=True, overrides={"model.layers.1.mlp.*": 0.75}))
    widths = [m.mlp.up_proj.out_features for m in res.model.model.layers]
    assert widths[0] > widths[1]
    assert any("cannot describe" in d and "MLP" in d for d in res.report.diagnostics)
    assert res.model.config.intermediate_size == 128  # not a lie about either layer


def test_depth_and_width_together_reload_with_from_pretrained(tmp_path: Any) -> None:
    model, x = build("llama")
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, capture="export", depth=1))
    small = res.model
    assert len(small.model.layers) == 1 and small.config.num_hidden_layers == 1
    assert small.config.hidden_size < 64
    small.save_pretrained(tmp_path)
    back = type(model).from_pretrained(tmp_path).eval()
    assert relative_error(list(outputs(back, x).values()),
                          list(outputs(small, x).values())) == 0.0
    assert back.generate(x[0], max_new_tokens=3, do_sample=False).shape == (2, 15)


def test_a_config_transformers_would_refuse_is_not_written() -> None:
    """Llama's config class requires the hidden size to be a multiple of the head count when
    it is made or saved; shrink's check asks it, so save_pretrained never fails later."""
    model, x = build("llama")
    res = shrink.prune(model, x, shrink.PruneConfig(
        0.5, capture="export", gqa="query", round_to=1,
        overrides={"model.embed_tokens:out": 0.45}))  # hidden 64 -> 35: not a multiple of 8
    assert res.model.config.hidden_size == 64
    assert res.model.model.embed_tokens.embedding_dim % 8 != 0
    assert any("refuses" in d and "multiple" in d for d in res.report.diagnostics)


def test_a_params_target_works_on_tied_embeddings() -> None:
    model, x = build("qwen2")  # tie_word_embeddings=True
    res = shrink.prune(model, x, shrink.PruneConfig(0.5, capture="export", target="params"))
    kept = sum(p.numel() for p in res.model.parameters()) / sum(
        p.numel() for p in model.parameters())
    assert abs(kept - 0.5) < 0.05
    assert res.model.lm_head.weight is res.model.model.embed_tokens.weight
