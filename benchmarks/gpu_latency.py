"""The GPU check of issue 13: ``target="latency"`` on ``torch-cuda`` and ``onnxruntime-cuda``.

One short prepared script for a machine with a GPU (the project's device machine)::

    python benchmarks/gpu_latency.py --out "$OUT"            # about 3-5 minutes on one GPU

Without CUDA it prints why and exits 0, so it is safe anywhere. With CUDA:

1. the CUDA unit tests of the latency model (``pytest tests/unit/test_latency_model.py -k cuda``);
2. per runtime (``torch-cuda``, then ``onnxruntime-cuda`` when onnxruntime has the CUDA provider):
   ResNet-50, BN-calibrated random weights, batch ``--batch`` (default 16) at 224x224,
   ``shrink.compress(..., target="latency", ratio=0.5, runtime=...)``; then an independent
   side-by-side timing of dense and pruned (``shrink.compare``, interleaved, best-of) on the
   same backend. The target is met when the measured kept fraction is within 5% of 0.5.

Results go to ``<out>/gpu_latency.json`` (one record per runtime: planning seconds, the loop's
measured fraction, the independent fraction, params and MACs kept, met or not) and stdout.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import shrink  # noqa: E402
from shrink.report import count_macs, count_params  # noqa: E402

BACKEND = {"torch-cuda": "torch-cuda", "onnxruntime-cuda": "ort-cuda", "torch-cpu": "torch-cpu",
           "onnxruntime-cpu": "ort-cpu"}


def runtimes() -> list[str]:
    out = ["torch-cuda"]
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            out.append("onnxruntime-cuda")
    except ImportError:
        pass
    return out


def one(runtime: str, batch: int, ratio: float, seconds: float, model: str = "resnet50",
        size: int = 224) -> dict[str, Any]:
    import torchvision

    from benchmarks.suite import calibrated

    x = (torch.randn(batch, 3, size, size),)
    dense = calibrated(torchvision.models.get_model(model, weights=None).eval(), x)
    t0 = time.perf_counter()
    res = shrink.prune(dense, x, shrink.PruneConfig(ratio, target="latency", runtime=runtime))
    planning = time.perf_counter() - t0
    lat = res.report.latency if res.report is not None else None
    bench = shrink.compare(dense, res.model, x, backends=(BACKEND[runtime],), batches=(batch,),
                           seconds=seconds, clock="auto", name=f"{model} {runtime}")
    kept = bench.row("pruned", BACKEND[runtime], batch).min_ms / bench.row(
        "dense", BACKEND[runtime], batch).min_ms
    return {"runtime": runtime, "batch": batch, "ratio": ratio, "planning_s": planning,
            "loop_kept": None if lat is None else lat.measured,
            "converged": None if lat is None else lat.converged,
            "independent_kept": kept, "met": abs(kept / (1 - ratio) - 1) <= 0.05,
            "params_kept": count_params(res.model) / count_params(dense),
            "macs_kept": count_macs(res.model, x) / count_macs(dense, x),
            "model": model, "size": size,
            "device": torch.cuda.get_device_name() if "cuda" in runtime else "cpu"}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--seconds", type=float, default=3.0)
    p.add_argument("--skip-tests", action="store_true")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--runtimes", default=None,
                   help="comma-separated; e.g. 'torch-cpu' for a dry run of this script on CPU")
    args = p.parse_args()
    chosen = args.runtimes.split(",") if args.runtimes else None
    if chosen is None and not torch.cuda.is_available():
        print("gpu_latency: no CUDA device here (torch.cuda.is_available() is False): skipped")
        return 0
    rc = 0
    if not args.skip_tests and torch.cuda.is_available():
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              str(ROOT / "tests" / "unit" / "test_latency_model.py"), "-k",
                              "cuda"], cwd=ROOT)
    records = []
    for runtime in chosen or runtimes():
        try:
            records.append(one(runtime, args.batch, args.ratio, args.seconds, args.model,
                               args.size))
        except Exception as e:  # a failing runtime is a result: record it, try the next
            records.append({"runtime": runtime, "error": f"{type(e).__name__}: {e}"[:500]})
        print(json.dumps(records[-1]), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "gpu_latency.json").write_text(json.dumps(records, indent=1))
    ok = rc == 0 and all(r.get("met") for r in records)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
