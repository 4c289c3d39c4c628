"""Where does the time go? onnxruntime's profiler, aggregated by op type, dense vs pruned.

    python -m benchmarks.profile_ort mobilenet_v3_large --ratio 0.5 --round-to 1,16

For each variant: the optimised graph's op counts (NCHWc convs, layout reorders) and the
per-op-type share of one-thread latency over ``--runs`` profiled calls.
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

import shrink
from benchmarks.suite import calibrated, recalibrate, torchvision_model


def profile(path: Path, x: torch.Tensor, runs: int, workdir: Path) -> tuple[dict[str, float],
                                                                            dict[str, int]]:
    """Microseconds per call by op type, and op counts of ORT's optimised graph."""
    import onnx
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    opts.inter_op_num_threads = 1
    opts.enable_profiling = True
    opts.profile_file_prefix = str(workdir / path.stem)
    opts.optimized_model_filepath = str(workdir / f"{path.stem}.opt.onnx")
    opts.log_severity_level = 3
    sess = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    feed = {sess.get_inputs()[0].name: x.numpy()}
    for _ in range(5):
        sess.run(None, feed)
    for _ in range(runs):
        sess.run(None, feed)
    trace = json.loads(Path(sess.end_profiling()).read_text())
    per_op: dict[str, float] = collections.defaultdict(float)
    for ev in trace:
        if ev.get("cat") == "Node" and ev["name"].endswith("_kernel_time"):
            per_op[ev["args"]["op_name"]] += ev["dur"] / (runs + 5)
    graph = onnx.load(str(workdir / f"{path.stem}.opt.onnx")).graph
    counts = collections.Counter(f"{n.domain or 'ai.onnx'}:{n.op_type}" for n in graph.node)
    return dict(per_op), dict(counts)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("model")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--round-to", default="1,16", help="comma list of ints or auto")
    p.add_argument("--runs", type=int, default=50)
    p.add_argument("--size", type=int, default=224)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    x = torch.randn(1, 3, args.size, args.size)
    dense = calibrated(torchvision_model(args.model), (x,))
    variants = {"dense": dense}
    for k in (v if v == "auto" else int(v) for v in args.round_to.split(",")):
        small = shrink.compress(dense, args.ratio, (x,), norm=2, round_to=k, verify=False)
        variants[f"round_to={k}"] = recalibrate(small, (x,))
    with tempfile.TemporaryDirectory() as d:
        wd = Path(d)
        for label, m in variants.items():
            path = shrink.export_onnx(m, (x,), wd / f"{label.replace('=', '')}.onnx").path
            per_op, counts = profile(path, x, args.runs, wd)
            total = sum(per_op.values())
            reorders = sum(v for k, v in counts.items() if "Reorder" in k)
            nchwc = sum(v for k, v in counts.items() if k.startswith("com.microsoft.nchwc:Conv"))
            lines = [f"{args.model} {label}: {total / 1000:.2f} ms in kernels; NCHWc convs "
                     f"{nchwc}, layout reorders {reorders}"]
            for op, us in sorted(per_op.items(), key=lambda kv: -kv[1])[:8]:
                lines.append(f"  {op:<22} {us / 1000:7.3f} ms  {100 * us / total:5.1f}%")
            sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
