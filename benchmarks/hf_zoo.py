"""Hugging Face transformers, family by family: shrink beside torch-pruning 1.6.

    python benchmarks/hf_zoo.py [--families llama,vit] [--timeout 60] [--jobs 2] [--merge]
        [--json benchmarks/results/zoo_transformers.json] [--out docs/zoo_transformers.md]
        [--zoo docs/zoo.md]

The 16 families of ``tests/zoo/test_hf_families.py`` at a larger, still CPU-quick size: hidden
256, 4 layers, 8 heads (8 query / 2 key-value heads for the decoders with grouped-query
attention), intermediate 512, vocabulary 1000, 2 x 32 tokens (encoder-decoders: 2 x 16
decoder tokens), images 2 x 3 x 64 x 64. Random weights (``shrink.testing.randomize_``,
seeded), nothing downloaded, CPU, one thread.

shrink, in this process: ``prune(model, x, PruneConfig(0.5, capture="export"))`` with every
other option at its default (LayerNorm/RMSNorm-normalised hidden size pruned as an inexact
group), then again with ``exact_only=True``. A row records what the report measures (params
and MACs kept, the deviation of the default run, the masked-oracle error of the exact run),
the capture front-end, the dimensions the plan shrinks and whether the pruned model's config
still describes it.

torch-pruning, in ``hf_zoo_tp.py``, one subprocess per family with a timeout
(``torch_pruning_zoo.run``; ``--jobs`` at a time, next to shrink's rows): ``MetaPruner`` with
``GroupMagnitudeImportance(p=2)`` at ``pruning_ratio=0.5`` following its own Hugging Face
examples (``examples/LLMs/prune_llm.py`` for decoders, ``examples/transformers/prune_hf_bert.py``
for text encoders and encoder-decoders, ``prune_hf_vit.py`` for ViT/DeiT, ``prune_hf_swin.py``
for Swin), including the attribute fix-up those examples do after ``step()``. The row records
whether it pruned, the params kept, whether the pruned model runs forward with the dense
model's output shapes, and whether ``generate()`` still works for decoders.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import signal
import sys
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: `benchmarks` is this checkout's package
    sys.path.insert(0, str(ROOT))

from benchmarks import torch_pruning_zoo as tpz  # noqa: E402

TP_CHILD = Path(__file__).with_name("hf_zoo_tp.py")  # torch-pruning's side, one family a run

H, LAYERS, HEADS, KV, FF, VOCAB = 256, 4, 8, 2, 512, 1000
SEQ, DEC, IMG = 32, 16, 64
_CAUSAL = {"vocab_size": VOCAB, "hidden_size": H, "intermediate_size": FF,
           "num_hidden_layers": LAYERS, "num_attention_heads": HEADS, "num_key_value_heads": KV,
           "max_position_embeddings": 128}
_VISION = {"image_size": IMG, "patch_size": 8, "hidden_size": H, "num_hidden_layers": LAYERS,
           "num_attention_heads": HEADS, "intermediate_size": FF, "num_labels": 10}
_BERT = {"vocab_size": VOCAB, "hidden_size": H, "num_hidden_layers": LAYERS,
         "num_attention_heads": HEADS, "intermediate_size": FF, "max_position_embeddings": 128}

#: family -> (model class, kind, config class, config arguments). Kinds: ``enc`` text encoder
#: without a head, ``lm`` causal LM, ``s2s`` encoder-decoder LM, ``img`` image classifier.
FAMILIES: dict[str, tuple[str, str, str, dict[str, Any]]] = {
    "bert": ("BertModel", "enc", "BertConfig", _BERT),
    "roberta": ("RobertaModel", "enc", "RobertaConfig",
                {**_BERT, "max_position_embeddings": 130}),
    "distilbert": ("DistilBertModel", "enc", "DistilBertConfig", {
        "vocab_size": VOCAB, "dim": H, "n_layers": LAYERS, "n_heads": HEADS, "hidden_dim": FF,
        "max_position_embeddings": 128}),
    "gpt2": ("GPT2LMHeadModel", "lm", "GPT2Config", {
        "vocab_size": VOCAB, "n_embd": H, "n_layer": LAYERS, "n_head": HEADS, "n_inner": FF,
        "n_positions": 128, "bos_token_id": 1, "eos_token_id": 2}),
    "llama": ("LlamaForCausalLM", "lm", "LlamaConfig", _CAUSAL),
    "mistral": ("MistralForCausalLM", "lm", "MistralConfig", _CAUSAL),
    "qwen2": ("Qwen2ForCausalLM", "lm", "Qwen2Config", {**_CAUSAL, "tie_word_embeddings": True}),
    "qwen3": ("Qwen3ForCausalLM", "lm", "Qwen3Config", {**_CAUSAL, "head_dim": H // HEADS}),
    "phi3": ("Phi3ForCausalLM", "lm", "Phi3Config", {
        **_CAUSAL, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}),
    "gemma": ("GemmaForCausalLM", "lm", "GemmaConfig", {**_CAUSAL, "head_dim": H // HEADS}),
    "t5": ("T5ForConditionalGeneration", "s2s", "T5Config", {
        "vocab_size": VOCAB, "d_model": H, "d_kv": H // HEADS, "d_ff": FF, "num_layers": LAYERS,
        "num_heads": HEADS, "decoder_start_token_id": 0, "eos_token_id": 1, "pad_token_id": 0}),
    "bart": ("BartForConditionalGeneration", "s2s", "BartConfig", {
        "vocab_size": VOCAB, "d_model": H, "encoder_layers": LAYERS, "decoder_layers": LAYERS,
        "encoder_attention_heads": HEADS, "decoder_attention_heads": HEADS,
        "encoder_ffn_dim": FF, "decoder_ffn_dim": FF, "max_position_embeddings": 128}),
    "vit": ("ViTForImageClassification", "img", "ViTConfig", _VISION),
    "deit": ("DeiTForImageClassification", "img", "DeiTConfig", _VISION),
    "swin": ("SwinForImageClassification", "img", "SwinConfig", {
        "image_size": IMG, "patch_size": 4, "embed_dim": H // 2, "depths": [2, 2],
        "num_heads": [HEADS // 2, HEADS], "window_size": 4, "num_labels": 10}),
    "convnext": ("ConvNextForImageClassification", "img", "ConvNextConfig", {
        "num_stages": 4, "hidden_sizes": [H // 8, H // 4, H // 2, H], "depths": [1, 1, 2, 1],
        "image_size": IMG, "num_labels": 10}),
}
DECODERS = tuple(k for k, f in FAMILIES.items() if f[1] in ("lm", "s2s"))


def build(name: str) -> tuple[Any, tuple[Any, ...], str]:
    """``(model, example_inputs, kind)``: the family's model, eval mode, seeded weights."""
    import torch
    import transformers

    from shrink.testing import randomize_

    cls, kind, cfg_cls, kwargs = FAMILIES[name]
    torch.manual_seed(0)
    model = getattr(transformers, cls)(getattr(transformers, cfg_cls)(**kwargs))
    model = randomize_(model, seed=1).eval()  # outputs that depend on the input
    gen = torch.Generator().manual_seed(2)
    if kind == "img":
        return model, (torch.randn(2, 3, IMG, IMG, generator=gen),), kind
    ids = torch.randint(3, VOCAB, (2, SEQ), generator=gen)
    if kind == "s2s":
        return model, (ids, torch.ones_like(ids),
                       torch.randint(3, VOCAB, (2, DEC), generator=gen)), kind
    return model, (ids,), kind


def shapes(out: Any) -> dict[str, list[int]]:
    """Shapes of the tensors of a Hugging Face ``ModelOutput`` (caches and Nones left out)."""
    import torch

    return {k: list(v.shape) for k, v in out.items() if isinstance(v, torch.Tensor)}


def generate(model: Any, x: tuple[Any, ...], kind: str) -> str:
    """"yes" when greedy ``generate`` adds tokens to both sequences, else what went wrong."""
    kwargs = {"max_new_tokens": 4, "do_sample": False}
    try:
        if kind == "s2s":
            out = model.generate(input_ids=x[0], attention_mask=x[1], **kwargs)
        else:
            out = model.generate(x[0], **kwargs)
    except Exception as e:  # the table reports it
        return f"fails: {tpz._first_line(e)}"
    grown = out.shape[0] == 2 and out.shape[1] >= (2 if kind == "s2s" else x[0].shape[1] + 1)
    return "yes" if grown else f"no: output shape {tuple(out.shape)}"


# ------------------------------------------------------------------ shrink


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise TimeoutError in the main thread after ``seconds`` (SIGALRM)."""

    def alarm(signum: int, frame: object) -> None:
        raise TimeoutError(f"timeout after {seconds:.0f} s")

    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(max(1, int(seconds)))
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def pruned_dims(model: Any, plan: Any) -> str:
    """What the plan shrinks, by kind, with ``size->kept`` per distinct group shape.

    A group with a HEADS member is attention heads, or KV groups when each of its channels is
    a key/value head with several query heads (GQA, ``gqa="groups"``). Any other group is the
    hidden size when it is inexact (normalised by a LayerNorm/RMSNorm: the residual stream),
    else an MLP width.
    """
    from shrink.plan import Side
    from shrink.rules.hf import layout_of, sizes

    kept = {d.group: len(d.keep) for d in plan.decisions}
    found: dict[str, dict[str, None]] = {}
    for g in plan.groups:
        k = kept.get(g.id, g.size)
        if k == g.size:
            continue
        heads = [m for m in g.members if m.side is Side.HEADS]
        if heads:
            mod = model.get_submodule(heads[0].module)
            lay = layout_of(mod)
            s = sizes(mod, lay) if lay is not None else None
            kind = "KV groups" if s is not None and s.kv_heads < s.heads == g.size * s.rep \
                else "heads"
        else:
            kind = "MLP" if g.exact else "hidden"
        found.setdefault(kind, {})[f"{g.size}->{k}"] = None
    order = ("heads", "KV groups", "hidden", "MLP")
    return ", ".join(f"{c} {'/'.join(found[c])}" for c in order if c in found)


def hidden_pinned(analysis: Any) -> str:
    """Why the hidden size stays: the first reason of the first pinned inexact (normalised,
    residual-stream) group, and how many more such groups there are."""
    reasons = [g.pinned.split("; ")[0] for g in analysis.pinned if not g.exact]
    if not reasons:
        return ""
    more = f" (+{len(reasons) - 1} more)" if len(reasons) > 1 else ""
    return f"hidden pinned: {reasons[0][:120]}{more}"


def config_note(report: Any) -> str:
    """"yes", or why the pruned model's config cannot describe it (from the report)."""
    for d in report.diagnostics:
        if "cannot describe" in d:
            why = re.search(r"cannot describe the pruned model \((.*)\); it keeps", d)
            return f"no: {why.group(1) if why else d}"
    return "yes"


def shrink_row(name: str, timeout: float) -> dict[str, Any]:
    """shrink's default run and its ``exact_only=True`` run on one family."""
    import shrink

    model, x, kind = build(name)
    row: dict[str, Any] = {"class": type(model).__name__}
    runs = (("default", {}), ("exact", {"exact_only": True}))
    for key, extra in runs:
        t0 = time.perf_counter()
        try:
            with time_limit(timeout):
                res = shrink.prune(model, x, shrink.PruneConfig(0.5, capture="export", **extra))
        except Exception as e:  # a shrink failure is a table row, reported as such
            row[key] = {"error": tpz._first_line(e), "seconds": time.perf_counter() - t0}
            continue
        rep = res.report
        row[key] = {
            "seconds": time.perf_counter() - t0, "capture": res.analysis.frontend,
            "params_kept": rep.param_ratio, "macs_kept": rep.mac_ratio,
            "deviation": rep.deviation, "oracle_err": rep.max_rel_error,
            "dims": pruned_dims(model, res.plan), "hidden_pinned": hidden_pinned(res.analysis),
            "config": config_note(rep),
        }
        if kind in ("lm", "s2s"):
            row[key]["generate"] = generate(res.model, x, kind)
    return row


# ------------------------------------------------------------------ the table


def _num(v: float | None, fmt: str) -> str:
    return "" if v is None else format(v, fmt)


def _cell(text: str) -> str:
    return text.replace("|", "/")


def render_row(name: str, s: dict[str, Any], t: dict[str, Any]) -> str:
    cls = f"`{s.get('class', FAMILIES[name][0])}`"
    d, e = s.get("default", {}), s.get("exact", {})
    if "error" in d:
        cells = ["", f"**fails**: {_cell(d['error'])}", "", "", "", "", "", "", ""]
    else:
        err = (f"fails: {_cell(e['error'])}" if "error" in e
               else _num(e.get("oracle_err"), ".1e"))
        config = d["config"] if e.get("config", d["config"]) == d["config"] else \
            f"default {d['config']}; exact_only {e['config']}"
        dims = "; ".join(x for x in (d["dims"], d.get("hidden_pinned", "")) if x)
        cells = [d["capture"], _cell(dims), f"{d['params_kept']:.2f}", f"{d['macs_kept']:.2f}",
                 _num(d["deviation"], ".2e"), err, _num(e.get("macs_kept"), ".2f"),
                 _cell(config), f"{d['seconds']:.1f}"]
    if "error" in t:
        tp_cells = [f"fails ({t.get('stage', '?')}): {_cell(t['error'])}", "", ""]
    else:
        tp_cells = [f"{t['params_kept']:.2f}", _cell(t["forward"]),
                    _cell(t.get("generate", "n/a"))]
    return "| " + " | ".join([name, cls, *cells, *tp_cells]) + " |"


def summary(rows: dict[str, dict[str, Any]]) -> str:
    s_ok = [n for n, r in rows.items() if "error" not in r["shrink"].get("default", {"error": 1})
            and "error" not in r["shrink"].get("exact", {"error": 1})]
    described = sum(r["shrink"]["default"].get("config") == "yes" for n, r in rows.items()
                    if n in s_ok)
    decoders = [n for n in rows if n in DECODERS]
    s_gen = sum(rows[n]["shrink"].get("default", {}).get("generate") == "yes" for n in decoders)
    t_ok = [r["tp"] for r in rows.values() if "error" not in r["tp"]]
    t_fwd = sum(t.get("forward") == "yes" for t in t_ok)
    t_gen = sum(rows[n]["tp"].get("generate") == "yes" for n in decoders)
    return (f"shrink prunes {len(s_ok)} of {len(rows)} families (default and exact_only), its "
            f"config describes {described} of them, {s_gen} of {len(decoders)} decoders "
            f"generate; torch-pruning 1.6.1 prunes {len(t_ok)} of {len(rows)}, {t_fwd} run "
            f"forward with the dense output shapes, {t_gen} of {len(decoders)} decoders "
            "generate.")


def render(rows: dict[str, dict[str, Any]], command: str, env: str, wall: float) -> str:
    lines = [
        "# Hugging Face transformers: shrink beside torch-pruning",
        "",
        f"Generated by `{command}` ({wall:.0f} s wall). {env}.",
        "",
        f"Sixteen families at hidden {H}, {LAYERS} layers, {HEADS} heads ({HEADS} query / "
        f"{KV} key-value heads for Llama, Mistral, Qwen2, Qwen3, Phi-3 and Gemma), "
        f"intermediate {FF}, vocabulary {VOCAB}; Swin: embed {H // 2}, depths 2+2, 4 and 8 "
        f"heads; ConvNeXt: widths {H // 8}-{H}. Inputs: 2 x {SEQ} token ids "
        f"(encoder-decoders: 2 x {DEC} decoder ids), images 2 x 3 x {IMG} x {IMG}. Random "
        "weights (`shrink.testing.randomize_`), nothing downloaded, CPU, one thread per "
        "process, on a shared 2-core machine (torch-pruning's child runs next to shrink's "
        "rows, so the seconds are inflated).",
        "",
        "**How to read it.** Each row is one model pruned at ratio 0.5 by both tools. "
        "*pruned dims* to *shrink s* are shrink's default run, `shrink.prune(model, x, "
        "PruneConfig(0.5, capture=\"export\"))`, which also prunes the hidden size through "
        "LayerNorm/RMSNorm as an inexact group: *deviation* is how far that result is from "
        "the plainly masked original (blank when the hidden size stayed; *pruned dims* then "
        "says why). *oracle err* and *exact MACs kept* are the `exact_only=True` run (heads, "
        "KV groups, MLP widths): its max relative error against the masked original, which "
        "should be float32 round-off. *pruned dims* gives `size->kept` per kind of group "
        "(KV groups: a key/value head with its query heads, GQA). *config describes it*: the "
        "pruned model's `config` builds the same shapes, so `save_pretrained`/"
        "`from_pretrained` round-trip; otherwise the report's reason. The last three columns "
        "are torch-pruning: params kept or its error (first line; a timeout names where it "
        "was), whether the pruned model runs forward on the same inputs with the dense "
        "output shapes, and whether greedy `generate()` of 4 tokens works. Its output error "
        "is not shown: there is no masked reference for it, and the dense output is not one.",
        "",
        "**torch-pruning's recipe.** `MetaPruner`, `GroupMagnitudeImportance(p=2)`, "
        "`pruning_ratio=0.5`, uniform (not global), the LM head or classifier ignored, "
        "`num_heads` from each attention layer's q/k/v projections (GQA: query heads on q, "
        "key/value heads on k and v), `output_transform` to the logits, and per family its "
        "own examples: decoders as `examples/LLMs/prune_llm.py` (whole heads, "
        "`head_pruning_ratio=0.5`, `round_to=4`, token-id tensor input); text encoders as "
        "`examples/transformers/prune_hf_bert.py` (whole heads, dict input, the pooler "
        "ignored and its output as the traced one) and encoder-decoders the same way; "
        "ViT/DeiT as `prune_hf_vit.py` (head dims); Swin as `prune_hf_swin.py` (head dims, "
        "patch merging as one custom unit); ConvNeXt plain. After `step()` the attribute "
        "fix-up those examples do: head counts from `pruner.num_heads`, head size and "
        "widths from the pruned projections, and for causal LMs the config. Each family "
        "runs in its own subprocess with a timeout; where torch-pruning works here it "
        "prunes in under a second.",
        "",
        "| family | model class | capture | pruned dims | params kept | MACs kept | "
        "deviation (default) | oracle err (exact_only) | exact MACs kept | config describes "
        "it | shrink s | torch-pruning | tp forward | tp generate |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---|---:|---|---|---|",
        *(render_row(n, r["shrink"], r["tp"]) for n, r in rows.items()),
        "",
        summary(rows),
    ]
    return "\n".join(lines) + "\n"


SECTION = "## Hugging Face transformers"


def update_zoo(path: Path, rows: dict[str, dict[str, Any]], command: str, out: Path) -> None:
    """Replace (or append) the transformers section of docs/zoo.md: the summary and a link to
    the generated table, which stays the one source of truth."""
    link = out.relative_to(path.parent) if out.is_relative_to(path.parent) else out
    section = "\n".join([
        SECTION, "",
        f"Generated by `{command}` on {time.strftime('%Y-%m-%d')}; the table, the recipes "
        f"and how to read it: [{link}]({link}).", "",
        summary(rows), ""])
    text = path.read_text() if path.exists() else ""
    start = text.find(f"\n{SECTION}\n")
    if start < 0:
        text = text.rstrip("\n") + "\n\n" + section
    else:
        end = text.find("\n## ", start + 1)
        text = text[:start + 1] + section + (text[end:] if end >= 0 else "")
    path.write_text(text)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--families", default="", help="comma-separated subset (default: all)")
    ap.add_argument("--timeout", type=float, default=60, help="seconds per tool and family")
    ap.add_argument("--json", default="benchmarks/results/zoo_transformers.json")
    ap.add_argument("--out", default="docs/zoo_transformers.md")
    ap.add_argument("--zoo", default="docs/zoo.md", help="the zoo page whose section to update")
    ap.add_argument("--jobs", type=int, default=2, help="torch-pruning children at a time")
    ap.add_argument("--merge", action="store_true", help="update rows of an existing --json")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)
    names = args.families.split(",") if args.families else list(FAMILIES)
    unknown = [n for n in names if n not in FAMILIES]
    if unknown:
        raise SystemExit(f"unknown families {unknown}; known: {', '.join(FAMILIES)}")
    jpath, out = ROOT / args.json, ROOT / args.out
    rows: dict[str, dict[str, Any]] = {}
    if args.merge and jpath.exists():
        rows = json.loads(jpath.read_text())["rows"]
    command = "python " + " ".join([str(Path(__file__).relative_to(ROOT)), *sys.argv[1:]])
    env = tpz.environment(("torch", "transformers", "torch-pruning"))
    t0 = time.perf_counter()
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        # torch-pruning's children (mostly import time, or a hang until the timeout) run
        # while this process prunes with shrink, family after family
        peers = {name: pool.submit(tpz.run, name, args.timeout, str(TP_CHILD))
                 for name in names}
        for i, name in enumerate(names, 1):
            print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
            s = shrink_row(name, args.timeout)
            rows[name] = {"shrink": s, "tp": peers[name].result()}
            print("  " + render_row(name, s, rows[name]["tp"]), file=sys.stderr, flush=True)
    wall = time.perf_counter() - t0
    ordered = {n: rows[n] for n in FAMILIES if n in rows}
    jpath.parent.mkdir(parents=True, exist_ok=True)
    jpath.write_text(json.dumps({"command": command, "environment": env, "wall": wall,
                                 "rows": ordered}, indent=1))
    out.write_text(render(ordered, command, env, wall))
    update_zoo(ROOT / args.zoo, ordered, command, out)
    print(f"{summary(ordered)} ({wall:.0f} s)", file=sys.stderr)


if __name__ == "__main__":
    main()
