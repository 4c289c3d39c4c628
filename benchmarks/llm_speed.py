"""A ~100M-parameter Llama-style model on CPU, dense vs shrink-pruned, side by side.

    python benchmarks/llm_speed.py                       # ratio 0.5, 1 thread, ~10 min
    python benchmarks/llm_speed.py --ratio 0.5 --threads 1 --prompt 128 --new 32 --seconds 20

Model: ``transformers.LlamaForCausalLM`` from a config (random weights, no download): hidden
768, 12 layers, 12 query / 4 KV heads (head dim 64), MLP 2048, vocabulary 32000, tied
embeddings: 101.6M parameters. Pruned with ``shrink.prune(model, ids, PruneConfig(ratio,
capture="export"))`` (defaults: whole KV groups, the hidden size through RMSNorm as an inexact
group, MLP width; every layer loses the same fraction, so the config still describes it).

Measured in one process, dense and pruned interleaved round by round, best-of (minimum) over
``--seconds`` of rounds each, ``--threads`` intra-op threads:

* prefill: one forward of a ``--prompt``-token prompt (batch 1) in torch eager;
* decode: ``--new`` single-token steps with the KV cache after that prompt (tokens/second);
* onnxruntime prefill: the ONNX file :func:`shrink.export_onnx` writes for each model (batch
  1, ``--prompt`` tokens; an LLM exports with a fixed batch), CPU provider, graph optimisations
  on, one intra-op thread unless ``--threads``.

Results go to stdout and ``--out`` (default ``docs/llm_speed.md``) with the command.
"""

from __future__ import annotations

import argparse
import json
import platform
import shlex
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import transformers

import shrink

ROOT = Path(__file__).resolve().parents[1]


def build(seed: int = 0) -> transformers.LlamaForCausalLM:
    cfg = transformers.LlamaConfig(
        vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12,
        num_attention_heads=12, num_key_value_heads=4, max_position_embeddings=2048,
        tie_word_embeddings=True)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(cfg).eval()


def shape(model: transformers.LlamaForCausalLM) -> str:
    layer = model.model.layers[0]
    a = layer.self_attn
    hd = a.head_dim
    return (f"{len(model.model.layers)}L h{model.model.embed_tokens.embedding_dim} "
            f"q{a.q_proj.out_features // hd}/kv{a.k_proj.out_features // hd} "
            f"mlp{layer.mlp.up_proj.out_features}")


def best_of(fns: dict[str, Callable[[], float]], seconds: float) -> dict[str, float]:
    """Each ``fn`` returns the seconds it measured; rounds alternate between them until every
    one has run ``seconds`` in all (at least 3 rounds); the minimum per fn."""
    best = {k: float("inf") for k in fns}
    spent = dict.fromkeys(fns, 0.0)
    rounds = 0
    while rounds < 3 or min(spent.values()) < seconds:
        for k, fn in fns.items():
            t = fn()
            best[k] = min(best[k], t)
            spent[k] += t
        rounds += 1
    return best


#: with one intra-op thread, torch and onnxruntime run every kernel on the calling thread, so
#: its CPU time measures the work without the time the OS gave other processes (the suite's
#: ``--clock auto``, benchmarks/README.md); with more threads, the wall clock
CLOCK: Callable[[], float] = time.perf_counter


def prefill(model: torch.nn.Module, ids: torch.Tensor) -> Callable[[], float]:
    def run() -> float:
        with torch.no_grad():
            t = CLOCK()
            model(ids, use_cache=False)
            return CLOCK() - t
    return run


def decode(model: torch.nn.Module, ids: torch.Tensor, steps: int) -> Callable[[], float]:
    def run() -> float:
        with torch.no_grad():
            out = model(ids, use_cache=True)
            cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            t = CLOCK()
            for _ in range(steps):
                out = model(tok, cache=cache, use_cache=True)
                cache, tok = out.past_key_values, out.logits[:, -1:].argmax(-1)
            return CLOCK() - t
    return run


def ort_prefill(path: Path, ids: torch.Tensor, threads: int) -> Callable[[], float]:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: ids.numpy()}

    def run() -> float:
        t = CLOCK()
        sess.run(None, feed)
        return CLOCK() - t
    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--target", choices=("channels", "params"), default="channels",
                   help="ratio of every group's channels (default) or of the parameters")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--prompt", type=int, default=128)
    p.add_argument("--new", type=int, default=32)
    p.add_argument("--seconds", type=float, default=20.0)
    p.add_argument("--no-onnx", action="store_true")
    p.add_argument("--out", default=str(ROOT / "docs" / "llm_speed.md"))
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    global CLOCK
    CLOCK = time.thread_time if args.threads == 1 else time.perf_counter
    command = "python benchmarks/llm_speed.py " + shlex.join(argv if argv is not None
                                                              else sys.argv[1:])
    dense = build()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 32000, (1, args.prompt), generator=gen)
    t0 = time.perf_counter()
    res = shrink.prune(dense, ids, shrink.PruneConfig(args.ratio, capture="export",
                                                      target=args.target))
    prune_s = time.perf_counter() - t0
    small = res.model.eval()
    n = {k: sum(q.numel() for q in m.parameters()) for k, m in (("dense", dense),
                                                                  ("pruned", small))}
    print(f"pruned in {prune_s:.0f} s: {shape(dense)} -> {shape(small)}", flush=True)
    print(res.report, flush=True)
    models = {"dense": dense, "pruned": small}
    results: dict[str, dict[str, float]] = {}
    results["prefill_s"] = best_of({k: prefill(m, ids) for k, m in models.items()},
                                   args.seconds)
    print("prefill", results["prefill_s"], flush=True)
    steps = best_of({k: decode(m, ids, args.new) for k, m in models.items()}, args.seconds)
    results["decode_tok_s"] = {k: args.new / v for k, v in steps.items()}
    print("decode", results["decode_tok_s"], flush=True)
    export_note = ""
    if not args.no_onnx:
        with tempfile.TemporaryDirectory() as tmp:
            paths = {}
            for k, m in models.items():
                r = shrink.export_onnx(m, (ids,), Path(tmp) / f"{k}.onnx", dynamic_batch=False)
                paths[k] = r.path
                export_note += (f"{k}: {r.file_bytes / 1e6:.0f} MB, exporter {r.exporter}, "
                                f"parity {r.parity.max_rel_error:.1e}; " if r.parity else "")
            results["ort_prefill_s"] = best_of(
                {k: ort_prefill(path, ids, args.threads) for k, path in paths.items()},
                args.seconds)
        print("ort prefill", results["ort_prefill_s"], flush=True)
    out = {"command": command, "ratio": args.ratio, "target": args.target,
           "threads": args.threads,
           "prompt": args.prompt, "new_tokens": args.new, "seconds": args.seconds,
           "params": n, "shape": {"dense": shape(dense), "pruned": shape(small)},
           "prune_seconds": prune_s, "deviation": res.report.deviation if res.report else None,
           "config_describes": not any("cannot describe" in d for d in
                                       (res.report.diagnostics if res.report else ())),
           "results": results, "onnx": export_note.strip("; "),
           "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                        "shrink": shrink.__version__, "python": platform.python_version()}}
    text = markdown(out)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
        Path(args.out).with_suffix(".json").write_text(json.dumps(out, indent=1) + "\n")
    return out


def markdown(out: dict[str, Any]) -> str:
    r = out["results"]
    rows = [("prefill, torch eager (s, lower is better)", r["prefill_s"], False),
            ("decode, torch eager (tokens/s, higher is better)", r["decode_tok_s"], True)]
    if "ort_prefill_s" in r:
        rows.append(("prefill, onnxruntime (s, lower is better)", r["ort_prefill_s"], False))
    lines = [
        "# A ~100M Llama on CPU: dense vs shrink-pruned",
        "",
        "```bash",
        out["command"],
        "```",
        "",
        f"{out['threads']} intra-op thread(s), timed on the "
        f"{'calling thread CPU clock' if out['threads'] == 1 else 'wall clock'}; prompt "
        f"{out['prompt']} tokens, batch 1; decode "
        f"{out['new_tokens']} tokens with the KV cache; dense and pruned interleaved in one "
        f"process, best-of over {out['seconds']:g} s of rounds each. Versions: "
        + ", ".join(f"{k} {v}" for k, v in out["versions"].items()) + ".",
        "",
        f"Pruned with `shrink.prune(model, ids, PruneConfig({out['ratio']}, capture=\"export\", "
        f"target=\"{out['target']}\"))`"
        f" in {out['prune_seconds']:.0f} s: {out['shape']['dense']} "
        f"({out['params']['dense'] / 1e6:.1f}M params) -> {out['shape']['pruned']} "
        f"({out['params']['pruned'] / 1e6:.1f}M params, "
        f"{out['params']['pruned'] / out['params']['dense']:.1%}); the config describes the "
        f"pruned model: {'yes' if out['config_describes'] else 'no'}.",
        "",
        "| measurement | dense | pruned | speedup |",
        "|---|---|---|---|",
    ]
    for name, v, higher in rows:
        ratio = v["pruned"] / v["dense"] if higher else v["dense"] / v["pruned"]
        fmt = "{:.1f}" if higher else "{:.4f}"
        lines.append(f"| {name} | {fmt.format(v['dense'])} | {fmt.format(v['pruned'])} | "
                     f"{ratio:.2f}x |")
    if out.get("onnx"):
        lines += ["", f"ONNX files (`shrink.export_onnx(..., dynamic_batch=False)`): "
                      f"{out['onnx']}."]
    lines += ["", "Absolute times drift between runs on a shared machine; the speedup column "
              "(measured side by side) is the result.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
