"""Hugging Face's Conv1D (GPT-2): a Linear with its weight stored transposed.

GPT-2 is captured with torch.export (fx cannot trace transformers models); its MLP width is
pruned through the Conv1D pair c_fc -> c_proj, the model stays a GPT2LMHeadModel and still
generates. With ``exact_only=True`` the hidden size (normalised by LayerNorms) stays, so the
Conv1D widths can be read off exactly; heads and hidden size have tests of their own
(tests/zoo/test_hf_families.py).
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers import n_params, prune_checked

transformers = pytest.importorskip("transformers")


def test_gpt2_mlp_width_prunes_through_transposed_conv1d() -> None:
    config = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    x = torch.randint(0, 128, (1, 16))
    res = prune_checked(model, x, 0.5, exact_only=True)  # the masked oracle holds
    assert res.analysis.frontend == "export"
    small = res.model
    assert type(small) is type(model)
    for block, dense in zip(small.transformer.h, model.transformer.h, strict=True):
        fc, proj = block.mlp.c_fc, block.mlp.c_proj
        assert type(fc) is type(dense.mlp.c_fc)
        assert fc.nf == 128 and fc.weight.shape == (64, 128) and fc.bias.shape == (128,)
        assert proj.nx == 128 and proj.weight.shape == (128, 64)
        assert dense.mlp.c_fc.nf == 256  # the caller's model is untouched
    assert n_params(small) < n_params(model)
    out = small.generate(x, max_new_tokens=3, do_sample=False)
    assert out.shape == (1, 19)
