"""A pruned Hugging Face causal LM exports to ONNX and matches in onnxruntime.

torch.export specialises an LLM's batch dimension (transformers compares the input's shape
with constants while building the causal mask) and the TorchScript exporter has no lowering
for ``aten::diff``, so ``export_onnx`` keeps the dynamo export at the example's batch size and
says so in ``fallback_reason``. ``dynamic_batch=False`` asks for that directly.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import shrink
from shrink.testing import randomize_

pytestmark = [pytest.mark.onnx, pytest.mark.slow]  # three exporter runs: ~50 s

T = pytest.importorskip("transformers")
ort = pytest.importorskip("onnxruntime")


def test_pruned_llama_exports_and_runs_in_onnxruntime(tmp_path: Path) -> None:
    torch.manual_seed(0)
    cfg = T.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                        num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2)
    model = randomize_(T.LlamaForCausalLM(cfg), seed=3).eval()
    ids = torch.randint(0, 128, (1, 24))
    small = shrink.compress(model, 0.5, ids, capture="export")
    res = shrink.export_onnx(small, (ids,), tmp_path / "small.onnx")
    assert res.exporter == "dynamo" and res.parity is not None
    assert res.parity.max_rel_error < 1e-4
    assert res.fallback_reason is not None and "fixed batch" in res.fallback_reason
    sess = ort.InferenceSession(str(res.path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    logits = sess.run(None, {name: ids.numpy()})[0]
    with torch.no_grad():
        want = small(ids).logits
    assert logits.shape == tuple(want.shape)
    assert float(abs(torch.from_numpy(logits) - want).max()) <= 1e-4 * float(want.abs().max())
