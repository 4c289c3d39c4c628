"""Compile time as a ratio to torch-pruning, measured in one process (robust to machine drift).

Per model: ``shrink.prune`` with and without verification and torch-pruning 1.6 (in place, the
model copied outside the timer), interleaved round by round, process CPU seconds, the minimum
over ``--repeat`` rounds; prints each and the ratios to torch-pruning. To compare two versions
of shrink, run it from inside each checkout, alternating (``python -m`` puts the current
directory first on the path, ahead of ``PYTHONPATH``, so run from elsewhere it would import
that directory's ``shrink``; the first line printed names the one imported)::

    git worktree add /tmp/before <commit>    # copy this file there if it predates it
    for d in . /tmp/before . /tmp/before; do
        (cd $d && python -m benchmarks.compile_ratio --repeat 15); done
"""

from __future__ import annotations

import argparse
import copy
import time

import torch

import shrink
from benchmarks.bench_compile_time import build, torch_pruning_prune_inplace


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mobilenet_v2,mobilenet_v3_large,efficientnet_b0,"
                                        "regnet_y_400mf")
    ap.add_argument("--repeat", type=int, default=11)
    ap.add_argument("--ratio", type=float, default=0.5)
    args = ap.parse_args()
    torch.set_num_threads(1)
    print(f"shrink from {shrink.__file__}")
    for name in args.models.split(","):
        model, x = build(name)
        configs = {"verify": shrink.PruneConfig(args.ratio, norm=2),
                   "no verify": shrink.PruneConfig(args.ratio, norm=2, verify=False)}
        best = dict.fromkeys([*configs, "torch-pruning"], float("inf"))
        for _ in range(args.repeat):
            for key, cfg in configs.items():
                c = time.process_time()
                shrink.prune(model, x, cfg)
                best[key] = min(best[key], time.process_time() - c)
            copied = copy.deepcopy(model)
            c = time.process_time()
            torch_pruning_prune_inplace(copied, x, args.ratio)
            best["torch-pruning"] = min(best["torch-pruning"], time.process_time() - c)
        tp = best["torch-pruning"]
        print(f"{name:20s} verify {best['verify']:.3f} s  no verify {best['no verify']:.3f} s  "
              f"torch-pruning {tp:.3f} s  verify/tp {best['verify'] / tp:.2f}  "
              f"no-verify/tp {best['no verify'] / tp:.2f}", flush=True)


if __name__ == "__main__":
    main()
