"""The ``shrink`` command line: parse, call the public API, print. No logic of its own.

Examples::

    shrink compress torchvision:resnet50 --ratio 0.5 --out resnet50-50.onnx --bench
    shrink analyze torchvision:mobilenet_v3_large
    shrink bench resnet50.onnx resnet50-50.onnx --batch 1,32
    shrink compress my_models.py:build --input-shape 1,3,128,128 --ratio 0.3 --out small.onnx --json
    shrink compress timm:efficientnet_b0 --ratio 0.4 --scope global --round-to 8 --out b0.onnx
    shrink compress torchvision:vit_b_16 --ratio 0.5 --exact-only --out vit-heads-mlp.onnx
    shrink compress torchvision:resnet50 --latency 0.5 --out resnet50-2x.onnx --bench

MODEL is ``torchvision:NAME`` (random weights with BN statistics calibrated on random data; no
download), ``timm:NAME`` (when timm is installed), ``path/to/file.py:factory`` or
``package.module:factory`` (a callable returning an ``nn.Module``).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from shrink.cli.specs import SpecError, first_input_shape, load_model
from shrink.cli.terminal import terminal_progress
from shrink.progress import stage

log = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 failed, 2 bad usage)."""
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # argparse already printed usage and the problem
        return int(e.code or 0)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(message)s", stream=sys.stderr)
    for noisy in ("onnx_ir", "onnxscript", "torch"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    try:
        with terminal_progress(sys.stderr, quiet=args.quiet):
            return int(args.run(args))
    except Exception as e:
        from shrink.errors import ShrinkError

        if args.debug:
            raise
        expected = isinstance(e, (ShrinkError, SpecError, ImportError, OSError))
        what = "" if expected else "internal error (please report it, with --debug output): "
        sys.stderr.write(f"shrink {args.command}: error: {what}{_one_paragraph(e)}\n")
        return 2 if isinstance(e, SpecError) else 1


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> Any:  # one line instead of argparse's usage dump
        self.exit(2, f"{self.prog}: error: {message}. Run '{self.prog} --help' for usage.\n")


def _one_paragraph(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if len(text) < 1500 else text[:1500] + " ..."


def _parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="shrink", description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True, metavar="{compress,analyze,bench}")

    def common(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--input-shape", type=_shape, default=None,
                        help="example input shape, e.g. 1,3,224,224 (default: inferred)")
        sp.add_argument("--json", action="store_true", help="print JSON instead of tables")
        sp.add_argument("-v", "--verbose", action="store_true",
                        help="log details (INFO messages) to stderr")
        sp.add_argument("-q", "--quiet", action="store_true",
                        help="no progress lines (shown on stderr only when it is a terminal)")
        sp.add_argument("--debug", action="store_true", help="show tracebacks on errors")

    c = sub.add_parser("compress", help="prune, verify, export to ONNX, check in onnxruntime",
                       description="Prune MODEL, verify it against the masked original, export "
                       "it to ONNX and check it in onnxruntime.")
    c.add_argument("model", metavar="MODEL")
    amount = c.add_mutually_exclusive_group(required=True)
    amount.add_argument("--ratio", type=_ratio,
                        help="fraction of channels removed per group, in [0, 1)")
    amount.add_argument("--latency", type=_ratio, metavar="R",
                        help="fraction of measured latency removed, in (0, 1): per-group "
                        "counts are allocated on a latency model of --runtime and checked end "
                        "to end (docs/latency.md); the batch is --input-shape's first dim")
    c.add_argument("--runtime", default="onnxruntime-cpu",
                   choices=("onnxruntime-cpu", "torch-cpu", "onnxruntime-cuda", "torch-cuda"),
                   help="with --latency: where latency is measured (default onnxruntime-cpu)")
    c.add_argument("--threads", type=int, default=1,
                   help="with --latency: intra-op threads of the runtime (default 1)")
    c.add_argument("--norm", type=_norm, default=2.0, help="importance norm: 1, 2 or inf")
    c.add_argument("--scope", choices=("local", "global"), default=None,
                   help="local (default) or global; --latency is always global")
    c.add_argument("--round-to", type=int, default=None,
                   help="round kept channel counts up to a multiple (default: 'auto', i.e. 16 "
                   "for groups of 16+ channels: onnxruntime's NCHWc block on AVX-512 x86, "
                   "measured fastest); 1 disables rounding")
    c.add_argument("--exact-only", action="store_true",
                   help="keep channels a LayerNorm normalises (transformer residual streams): "
                   "the result then equals the masked original exactly; by default they are "
                   "pruned too and the report gives the measured deviation")
    c.add_argument("--capture", choices=("auto", "fx", "export"), default="auto",
                   help="capture front-end: torch.fx, torch.export, or fx then export (auto)")
    c.add_argument("--grouped-convs", choices=("channels", "groups"), default="channels",
                   help="grouped convs lose channels inside every conv group (default) or whole "
                   "conv groups")
    c.add_argument("--out", type=Path, required=True, help="ONNX file to write")
    c.add_argument("--bench", action="store_true", help="time dense vs pruned in onnxruntime")
    c.add_argument("--seconds", type=float, default=3.0, help="benchmark budget per setting")
    common(c)
    c.set_defaults(run=_compress)

    a = sub.add_parser("analyze", help="list channel groups and why some are pinned")
    a.add_argument("model", metavar="MODEL")
    common(a)
    a.set_defaults(run=_analyze)

    b = sub.add_parser("bench", help="time two models (ONNX files or MODEL specs) side by side")
    b.add_argument("dense", metavar="DENSE")
    b.add_argument("pruned", metavar="PRUNED")
    b.add_argument("--batch", type=_ints, default=(1,), help="batch sizes, e.g. 1,32")
    b.add_argument("--threads", type=_ints, default=(1,), help="intra-op threads, e.g. 1,2")
    b.add_argument("--backend", type=lambda s: tuple(s.split(",")), default=("ort-cpu",),
                   help="ort-cpu, ort-cuda, torch-cpu, torch-cuda (comma list)")
    b.add_argument("--seconds", type=float, default=3.0, help="budget per setting")
    common(b)
    b.set_defaults(run=_bench)
    return p


def _shape(text: str) -> tuple[int, ...]:
    try:
        dims = tuple(int(d) for d in text.replace("x", ",").split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a shape like 1,3,224,224") from None
    if not dims or any(d < 1 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r}: every dimension must be >= 1")
    return dims


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number; use e.g. 0.5") from None
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(
            f"{value} is out of range: the ratio is the fraction of channels removed, in [0, 1)")
    return value


def _norm(text: str) -> float:
    value = float(text)
    if value not in (1.0, 2.0, float("inf")):
        raise argparse.ArgumentTypeError(f"--norm must be 1, 2 or inf, got {text}")
    return value


def _ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma list of ints") from None


def _inputs(model: nn.Module, shape: tuple[int, ...] | None) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    return (torch.randn(*(shape or first_input_shape(model)), generator=gen),)


def _compress(args: argparse.Namespace) -> int:
    import shrink
    from shrink.deploy.bench import compare
    from shrink.deploy.export import export_onnx

    model = load_model(args.model)
    inputs = _inputs(model, args.input_shape)
    options: dict[str, Any] = {"norm": args.norm, "scope": args.scope,
                               "exact_only": args.exact_only, "grouped_convs": args.grouped_convs,
                               "capture": args.capture}
    if args.round_to is not None:
        options["round_to"] = args.round_to
    ratio = args.ratio
    if args.latency is not None:
        ratio = args.latency
        options.update(target="latency", runtime=args.runtime, threads=args.threads)
    res = shrink.prune(model, inputs, shrink.PruneConfig(ratio, **options))
    exported = export_onnx(res.model, inputs, args.out)
    bench = None
    if args.bench:
        bench = compare(model, res.model, inputs, batches=(1,), seconds=args.seconds,
                        name=args.model)
    if args.json:
        out = {"model": args.model, "plan_groups": len(res.plan.decisions),
               "report": res.report.to_dict() if res.report else None,
               "export": exported.to_dict(), "bench": bench.to_dict() if bench else None}
        sys.stdout.write(json.dumps(out, indent=1, default=str) + "\n")
        return 0
    what = (f"latency ratio {args.latency} on {args.runtime}, {args.threads} thread(s), norm "
            f"{args.norm}" if args.latency is not None
            else f"ratio {args.ratio}, norm {args.norm}, scope {args.scope or 'local'}")
    lines = [f"{args.model}: {what}"]
    if res.report is not None:
        lines.append(str(res.report))
    parity = exported.parity
    lines.append(
        f"wrote {exported.path} ({exported.file_bytes / 1e6:.1f} MB, {exported.exporter} "
        f"exporter, opset {exported.opset})"
        + (f"; onnxruntime parity: max rel error {parity.max_rel_error:.1e}, max abs "
           f"{parity.max_abs_error:.1e} at batches {list(parity.batches)}" if parity else ""))
    if exported.fallback_reason:
        lines.append(f"note: the dynamo exporter failed ({exported.fallback_reason}); "
                     "used the TorchScript-based exporter")
    if bench is not None:
        lines.append(bench.table())
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _analyze(args: argparse.Namespace) -> int:
    import shrink

    model = load_model(args.model)
    with stage("capture"):
        captured = shrink.capture(model, _inputs(model, args.input_shape))
    with stage("analyze"):
        analysis = shrink.analyze(captured)
    if args.json:
        out = {"model": args.model,
               "groups": [{"id": g.id, "size": g.size, "pinned": g.pinned,
                           "members": len(g.members)} for g in analysis.groups],
               "diagnostics": [{"severity": d.severity, "message": d.message}
                               for d in analysis.diagnostics]}
        sys.stdout.write(json.dumps(out, indent=1) + "\n")
        return 0
    width = max([len(g.id) for g in analysis.groups] + [5])
    lines = [f"{args.model}: {len(analysis.prunable)} prunable groups, "
             f"{len(analysis.pinned)} pinned",
             f"  {'group':<{width}} {'size':>6} {'members':>7}  pinned because"]
    for g in analysis.groups:
        lines.append(f"  {g.id:<{width}} {g.size:>6} {len(g.members):>7}  {g.pinned or ''}")
    lines += [f"{d.severity}: {d.message}" for d in analysis.diagnostics]
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


def _bench(args: argparse.Namespace) -> int:
    from shrink.deploy.bench import compare

    models = [_bench_operand(s) for s in (args.dense, args.pruned)]
    inputs = None
    modules = [m for m in models if isinstance(m, nn.Module)]
    if modules or args.input_shape:
        inputs = _inputs(modules[0] if modules else nn.Identity(), args.input_shape)
    res = compare(models[0], models[1], inputs, backends=args.backend, batches=args.batch,
                  threads=args.threads, seconds=args.seconds, name=f"{args.dense} vs {args.pruned}")
    sys.stdout.write((res.to_json() if args.json else res.table()) + "\n")
    return 0


def _bench_operand(spec: str) -> nn.Module | Path:
    if spec.endswith(".onnx"):
        path = Path(spec)
        if not path.is_file():
            raise SpecError(f"ONNX file {path} does not exist")
        return path
    return load_model(spec)
