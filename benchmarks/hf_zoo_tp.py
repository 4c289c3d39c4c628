"""torch-pruning's side of ``hf_zoo.py``: one Hugging Face family, pruned as its examples do.

    python benchmarks/hf_zoo_tp.py --child llama [--timeout 60]

prints one JSON line: the params kept, whether the pruned model runs forward with the dense
output shapes, whether ``generate()`` still works (decoders), or the error and where it was.
``hf_zoo.py`` runs it in a subprocess per family through ``torch_pruning_zoo.run``, which
turns a hang into a row. The recipe (``recipe``, ``tp_inputs``, ``ignored``, ``fix_up``)
follows torch-pruning's examples: ``examples/LLMs/prune_llm.py`` for decoders,
``examples/transformers/prune_hf_bert.py`` for text encoders (and, there being no example,
encoder-decoders), ``prune_hf_vit.py`` for ViT/DeiT and ``prune_hf_swin.py`` for Swin.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `benchmarks` is this checkout's package
    sys.path.insert(0, str(ROOT))

from benchmarks import torch_pruning_zoo as tpz  # noqa: E402
from benchmarks.hf_zoo import build, generate, shapes  # noqa: E402

_QKV = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"), ("q_lin", "k_lin", "v_lin"),
        ("q", "k", "v"))
_FUSED = ("qkv_proj", "c_attn")  # Phi-3 (Linear), GPT-2 (transformers' Conv1D)
_HEAD_DIM = ("head_dim", "attention_head_size", "key_value_proj_dim")
_COUNT = ("num_attention_heads", "num_heads", "n_heads")


def attention_layers(model: Any) -> list[tuple[Any, dict[Any, int]]]:
    """Every attention layer and its projections' head counts (torch-pruning's ``num_heads``):
    q/k/v Linears get their own counts (GQA: query heads on q, key/value heads on k and v, as
    ``prune_llm.py`` does); a fused projection gets the query head count."""
    from torch import nn

    found = []
    for m in model.modules():
        hd = next((getattr(m, a) for a in _HEAD_DIM if isinstance(getattr(m, a, None), int)),
                  None)
        if not hd:
            continue
        for names in _QKV:
            lins = [getattr(m, n, None) for n in names]
            if all(isinstance(lin, nn.Linear) for lin in lins):
                found.append((m, {lin: lin.out_features // hd for lin in lins}))
        for n in _FUSED:
            if isinstance(getattr(m, n, None), nn.Module):
                found.append((m, {getattr(m, n): model.config.num_attention_heads}))
    return found


def fix_up(model: Any, pruner: Any, layers: list[tuple[Any, dict[Any, int]]], kind: str) -> None:
    """The attribute updates torch-pruning's Hugging Face examples make after ``step()``: head
    counts from ``pruner.num_heads``, head size and width from the pruned projections, and for
    causal LMs the config (``prune_llm.py``)."""
    for m, counts in layers:
        first, *rest = counts
        n = pruner.num_heads.get(first, counts[first])
        for a in _COUNT:
            if isinstance(getattr(m, a, None), int):
                setattr(m, a, n)
        if rest:  # separate q/k/v
            width = first.out_features
            for a in _HEAD_DIM:
                if isinstance(getattr(m, a, None), int):
                    setattr(m, a, width // n)
            for a in ("all_head_size", "inner_dim"):
                if isinstance(getattr(m, a, None), int):
                    setattr(m, a, width)
            n_kv = pruner.num_heads.get(rest[0], counts[rest[0]])
            if hasattr(m, "num_key_value_groups"):
                m.num_key_value_groups = max(n // max(n_kv, 1), 1)
        elif hasattr(m, "split_size"):  # GPT-2
            m.split_size = m.embed_dim = n * m.head_dim
    if kind != "lm" or not layers:
        return
    cfg = model.config
    cfg.hidden_size = model.lm_head.in_features
    m, counts = layers[-1]
    first, *rest = counts
    cfg.num_attention_heads = pruner.num_heads.get(first, counts[first])
    if rest and hasattr(cfg, "num_key_value_heads"):
        cfg.num_key_value_heads = pruner.num_heads.get(rest[0], counts[rest[0]])
    mlp = getattr(model.get_submodule(_parent(model, m)), "mlp", None)
    if getattr(mlp, "gate_proj", None) is not None:
        cfg.intermediate_size = mlp.gate_proj.out_features
    elif getattr(mlp, "gate_up_proj", None) is not None:
        cfg.intermediate_size = mlp.gate_up_proj.out_features // 2


def _parent(model: Any, module: Any) -> str:
    fqn = next(n for n, x in model.named_modules() if x is module)
    return fqn.rsplit(".", 1)[0] if "." in fqn else ""


def _patch_merging_pruner() -> tuple[type, Any]:
    """Swin's patch merging as one prunable unit (what ``prune_hf_swin.py`` registers): its
    input is four spatial slices concatenated on channels, so input channel ``c`` is column
    ``c + k * dim`` (k < 4) of the LayerNorm and of the reduction Linear."""
    import torch_pruning as tp
    from transformers.models.swin.modeling_swin import SwinPatchMerging

    class PatchMerging(tp.BasePruningFunc):
        def prune_out_channels(self, layer: Any, idxs: list[int]) -> Any:
            tp.prune_linear_out_channels(layer.reduction, idxs)
            return layer

        def prune_in_channels(self, layer: Any, idxs: list[int]) -> Any:
            dim = layer.reduction.in_features // 4
            cols = [c + k * dim for k in range(4) for c in idxs]
            tp.prune_linear_in_channels(layer.reduction, cols)
            tp.prune_layernorm_out_channels(layer.norm, cols)
            return layer

        def get_out_channels(self, layer: Any) -> int:
            return int(layer.reduction.out_features)

        def get_in_channels(self, layer: Any) -> int:
            return int(layer.reduction.in_features // 4)

    return SwinPatchMerging, PatchMerging()


def recipe(name: str, kind: str, model: Any) -> dict[str, Any]:
    """MetaPruner arguments from the torch-pruning example for the family."""
    from torch import nn

    if name in ("vit", "deit"):  # prune_hf_vit.py: head dims, not heads
        return {"prune_head_dims": True, "prune_num_heads": False, "head_pruning_ratio": 0.5,
                "output_transform": lambda out: out.logits.sum()}
    if name == "swin":  # prune_hf_swin.py: head dims (the defaults), patch merging as a unit
        merging, pruner = _patch_merging_pruner()
        return {"customized_pruners": {merging: pruner},
                "root_module_types": (nn.Linear, nn.LayerNorm, merging),
                "output_transform": lambda out: out.logits.sum()}
    if kind == "img":  # ConvNeXt: the plain recipe of its torchvision examples
        return {"output_transform": lambda out: out.logits.sum()}
    heads = {"prune_num_heads": True, "prune_head_dims": False, "head_pruning_ratio": 0.5}
    if kind == "lm":  # prune_llm.py
        groups = {m.gate_up_proj: 2 for m in model.modules()
                  if isinstance(getattr(m, "gate_up_proj", None), nn.Linear)}
        return {**heads, "round_to": 4, "out_channel_groups": groups,
                "output_transform": lambda out: out.logits.sum()}
    if kind == "s2s":  # no example: prune_hf_bert.py's recipe with the LM head ignored
        return {**heads, "output_transform": lambda out: out.logits.sum()}
    if hasattr(model, "pooler") and model.pooler is not None:  # prune_hf_bert.py
        return {**heads, "output_transform": lambda out: out.pooler_output.sum()}
    return {**heads, "output_transform": lambda out: out.last_hidden_state.sum()}


def tp_inputs(model: Any, x: tuple[Any, ...], kind: str) -> Any:
    """Example inputs as torch-pruning's examples pass them: a tensor for causal LMs and
    images, a dict of keyword inputs for text encoders (``prune_hf_bert.py``) and
    encoder-decoders."""
    import torch

    if kind in ("lm", "img"):
        return x[0]
    if kind == "s2s":
        return {"input_ids": x[0], "attention_mask": x[1], "decoder_input_ids": x[2]}
    d = {"input_ids": x[0], "attention_mask": torch.ones_like(x[0])}
    if "token_type_ids" in model.forward.__code__.co_varnames:
        d["token_type_ids"] = torch.zeros_like(x[0])
    return d


def ignored(model: Any, kind: str) -> list[Any]:
    if kind in ("lm", "s2s"):
        return [model.lm_head]
    if kind == "img":
        return [model.classifier]
    pooler = getattr(model, "pooler", None)  # prune_hf_bert.py ignores BERT's pooler
    return [pooler] if pooler is not None else []


def child(name: str) -> dict[str, Any]:
    import warnings

    warnings.filterwarnings("ignore")
    import torch
    import torch_pruning as tp

    torch.set_num_threads(1)
    model, x, kind = build(name)
    inputs = tp_inputs(model, x, kind)

    def call(m: Any) -> Any:
        with torch.no_grad():
            return m(**inputs) if isinstance(inputs, dict) else m(inputs)

    dense = shapes(call(model))
    n_before = sum(p.numel() for p in model.parameters())
    layers = attention_layers(model)
    num_heads = {lin: n for _, counts in layers for lin, n in counts.items()}
    row: dict[str, Any] = {}
    t0 = time.perf_counter()
    try:
        pruner = tp.pruner.MetaPruner(
            model, inputs, importance=tp.importance.GroupMagnitudeImportance(p=2),
            pruning_ratio=0.5, global_pruning=False, ignored_layers=ignored(model, kind),
            num_heads=num_heads, **recipe(name, kind, model))
        for group in pruner.step(interactive=True):
            group.prune()
        fix_up(model, pruner, layers, kind)
    except Exception as e:  # the peer's failure is the table entry
        return {"stage": "prune", "error": tpz._first_line(e),
                "seconds": time.perf_counter() - t0}
    row["seconds"] = time.perf_counter() - t0
    row["params_kept"] = sum(p.numel() for p in model.parameters()) / n_before
    try:
        after = shapes(call(model))
    except Exception as e:
        row["forward"] = f"fails: {tpz._first_line(e)}"
    else:
        diff = [f"{k} {dense[k]}->{after.get(k)}" for k in dense if after.get(k) != dense[k]]
        row["forward"] = "yes" if not diff and after.keys() == dense.keys() else \
            f"runs, shapes differ: {'; '.join(diff) or sorted(after)}"
    if kind in ("lm", "s2s"):
        row["generate"] = generate(model, x, kind)
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--child", required=True, help="the family")
    ap.add_argument("--timeout", type=float, default=60, help="dump the stack and exit after")
    args = ap.parse_args()
    import faulthandler

    faulthandler.dump_traceback_later(args.timeout, exit=True)
    print(json.dumps(child(args.child)), flush=True)


if __name__ == "__main__":
    main()
