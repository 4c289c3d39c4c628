"""Train, prune, fine-tune: a small CNN on scikit-learn's handwritten digits (8x8, no download).

    python examples/02_digits_workflow.py                       # L2, 50% of channels, plot + bench
    python examples/02_digits_workflow.py --importance taylor   # first-order Taylor on train data
    python examples/02_digits_workflow.py --compare --seeds 0 1 2   # the table in docs/criteria.md
    python examples/02_digits_workflow.py --rank-check --criteria l1 l2 taylor activation random

Steps: train the dense CNN; remove 50% of the channels of every prunable group with
``shrink.prune`` (verified against the masked oracle); fine-tune a few epochs; report accuracy
(dense / pruned / fine-tuned), parameters, MACs and onnxruntime latency (``shrink.compare``:
one intra-op thread, interleaved rounds, best-of latency). ``run()`` is what
``tests/test_workflow.py`` calls. Needs: pip install 'shrink[examples]'.
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.functional import cross_entropy
from torch.utils.data import DataLoader, TensorDataset

import shrink
from shrink.criteria import Activation, LnNorm, Random, Taylor
from shrink.plan import Decision
from shrink.verify import masked_reference


def load_data(seed: int = 0) -> tuple[TensorDataset, TensorDataset]:
    """Digits as (N, 1, 8, 8) float tensors in [0, 1], a stratified 75/25 train/test split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(digits.target, dtype=torch.long)
    idx_train, idx_test = train_test_split(
        range(len(y)), test_size=0.25, stratify=digits.target, random_state=seed
    )
    return (TensorDataset(x[idx_train], y[idx_train]), TensorDataset(x[idx_test], y[idx_test]))


def make_model() -> nn.Module:
    """Three conv blocks and a two-layer head: 160k parameters, 2.4M MACs per image."""

    def block(cin: int, cout: int) -> list[nn.Module]:
        return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]

    return nn.Sequential(
        *block(1, 32), *block(32, 64), nn.MaxPool2d(2),
        *block(64, 128), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 2 * 2, 128), nn.ReLU(), nn.Linear(128, 10),
    )


def train(model: nn.Module, data: TensorDataset, epochs: int, lr: float, seed: int) -> nn.Module:
    """Adam with cosine decay, batch 32, seeded shuffling."""
    gen = torch.Generator().manual_seed(seed)
    loader = DataLoader(data, batch_size=32, shuffle=True, generator=gen)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * len(loader))
    model.train()
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            cross_entropy(model(x), y).backward()
            opt.step()
            sched.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    """Top-1 accuracy in percent."""
    x, y = data.tensors
    return 100.0 * float((model.eval()(x).argmax(1) == y).float().mean())


@contextmanager
def threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def prune_and_finetune(dense: nn.Module, train_set: TensorDataset, test_set: TensorDataset, *,
                       importance: str = "l2", ratio: float = 0.5, finetune_epochs: int = 5,
                       seed: int = 0, max_batches: int | None = 8) -> dict[str, Any]:
    """Prune ``ratio`` of every prunable group's channels, then fine-tune a copy."""
    x = (test_set.tensors[0][:1],)
    options: dict[str, Any] = {"importance": importance, "seed": seed}
    if importance in ("taylor", "activation"):
        loader = DataLoader(train_set, batch_size=64, shuffle=False)
        options.update(data=loader, max_batches=max_batches)
        if importance == "taylor":
            options["loss_fn"] = cross_entropy
    torch.manual_seed(seed)
    res = shrink.prune(dense.eval(), x, shrink.PruneConfig(ratio, **options))
    pruned_acc = accuracy(res.model, test_set)
    tuned = train(copy.deepcopy(res.model), train_set, finetune_epochs, lr=5e-4, seed=seed + 1)
    assert res.report is not None
    return {
        "importance": importance,
        "pruned": res.model,
        "finetuned": tuned,
        "report": res.report,
        "acc_pruned": pruned_acc,
        "acc_finetuned": accuracy(tuned, test_set),
    }


def run(*, importance: str = "l2", ratio: float = 0.5, epochs: int = 15, finetune_epochs: int = 5,
        seed: int = 0, bench_seconds: float = 2.0, n_threads: int = 1) -> dict[str, Any]:
    """The whole workflow; returns accuracies (percent), params, MACs and the measured speedup.

    ``bench_seconds=0`` skips the onnxruntime timing (``speedup`` is then None).
    """
    with threads(n_threads):
        torch.manual_seed(seed)
        train_set, test_set = load_data(seed)
        dense = train(make_model(), train_set, epochs, lr=2e-3, seed=seed)
        out = prune_and_finetune(dense, train_set, test_set, importance=importance, ratio=ratio,
                                 finetune_epochs=finetune_epochs, seed=seed)
        report = out["report"]
        speedup = ideal = None
        if bench_seconds > 0:
            x = (test_set.tensors[0][:1],)
            bench = shrink.compare(dense, out["finetuned"], x, seconds=bench_seconds)
            row = bench.row("pruned")
            speedup, ideal = row.speedup, row.ideal
        return {
            "importance": importance,
            "acc_dense": accuracy(dense, test_set),
            "acc_pruned": out["acc_pruned"],
            "acc_finetuned": out["acc_finetuned"],
            "params": (report.params_before, report.params_after),
            "macs": (report.macs_before, report.macs_after),
            "speedup": speedup,
            "ideal_speedup": ideal,
        }


def compare(seeds: list[int], importances: list[str], *, ratio: float, epochs: int,
            finetune_epochs: int, max_batches: int | None = 8) -> str:
    """Markdown table: mean accuracy per criterion over ``seeds`` (same dense model per seed)."""
    rows: dict[str, list[tuple[float, float, float]]] = {k: [] for k in importances}
    with threads(1):
        for seed in seeds:
            torch.manual_seed(seed)
            train_set, test_set = load_data(seed)
            dense = train(make_model(), train_set, epochs, lr=2e-3, seed=seed)
            acc_dense = accuracy(dense, test_set)
            for imp in importances:
                out = prune_and_finetune(dense, train_set, test_set, importance=imp, ratio=ratio,
                                         finetune_epochs=finetune_epochs, seed=seed,
                                         max_batches=max_batches)
                rows[imp].append((acc_dense, out["acc_pruned"], out["acc_finetuned"]))
    lines = [f"| criterion | dense acc. | pruned acc. (no fine-tune) | after {finetune_epochs} "
             "fine-tune epochs | per seed (pruned / fine-tuned) |", "|---|---:|---:|---:|---|"]
    for imp, vals in rows.items():
        mean = [sum(v[i] for v in vals) / len(vals) for i in range(3)]
        per_seed = ", ".join(f"{p:.1f} / {f:.1f}" for _, p, f in vals)
        lines.append(f"| {imp} | {mean[0]:.2f} | {mean[1]:.2f} | {mean[2]:.2f} | {per_seed} |")
    return "\n".join(lines)


def _spearman(u: torch.Tensor, v: torch.Tensor) -> float:
    ranks = torch.stack([u.argsort().argsort().double(), v.argsort().argsort().double()])
    return float(torch.corrcoef(ranks)[0, 1])


def rank_check(importances: list[str], seed: int = 0, epochs: int = 15) -> str:
    """How well each criterion ranks single channels by the training loss their removal costs.

    For every channel of every prunable group, the loss increase when that channel alone is
    removed is measured exactly (the masked oracle: consumer inputs zeroed); the table gives the
    Spearman rank correlation of each criterion's scores with it.
    """
    with threads(1):
        torch.manual_seed(seed)
        train_set, _ = load_data(seed)
        dense = train(make_model(), train_set, epochs, lr=2e-3, seed=seed)
        x, y = train_set.tensors
        analysis = shrink.analyze(shrink.capture(dense, (x[:1],)))
        loader = DataLoader(train_set, batch_size=64)
        criteria = {"l1": LnNorm(1.0), "l2": LnNorm(2.0),
                    "taylor": Taylor(loader, cross_entropy),
                    "activation": Activation(loader), "random": Random(seed)}
        scores = {k: shrink.score(analysis.groups, dense, criteria[k]) for k in importances}
        with torch.no_grad():
            base = float(cross_entropy(dense(x), y))
        lines = ["| group | channels | " + " | ".join(importances) + " |",
                 "|---|---:|" + "---:|" * len(importances)]
        for g in analysis.prunable:
            deltas = []
            for c in range(g.size):
                keep = tuple(i for i in range(g.size) if i != c)
                plan = shrink.Plan(analysis.model, analysis.groups, (Decision(g.id, keep),))
                with torch.no_grad():
                    deltas.append(float(cross_entropy(masked_reference(dense, plan)(x), y)))
            loss_up = torch.tensor(deltas, dtype=torch.float64) - base
            cells = " | ".join(f"{_spearman(scores[k][g.id], loss_up):.2f}" for k in importances)
            lines.append(f"| {g.id} | {g.size} | {cells} |")
    return "\n".join(lines)


def plot(result: dict[str, Any], path: str) -> None:
    """Accuracy bars and the params / MACs / latency ratios, saved to ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
    names = ["dense", "pruned", "fine-tuned"]
    accs = [result["acc_dense"], result["acc_pruned"], result["acc_finetuned"]]
    ax1.bar(names, accs, color=["#4c72b0", "#dd8452", "#55a868"])
    ax1.set_ylim(min(accs) - 5, 100)
    ax1.set_ylabel("test accuracy (%)")
    for i, a in enumerate(accs):
        ax1.text(i, a + 0.3, f"{a:.1f}", ha="center")
    ratios = {"params": result["params"][1] / result["params"][0],
              "MACs": result["macs"][1] / result["macs"][0]}
    if result["speedup"]:
        ratios["latency (ORT)"] = 1.0 / result["speedup"]
    ax2.bar(list(ratios), list(ratios.values()), color="#8172b2")
    ax2.axhline(1.0, color="grey", linewidth=0.5)
    ax2.set_ylabel("pruned / dense")
    fig.suptitle(f"digits CNN, 50% of channels removed ({result['importance']})")
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--importance", default="l2",
                        help="l1, l2, random, taylor, activation, bn_scale")
    parser.add_argument("--ratio", type=float, default=0.5)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--finetune-epochs", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default="digits_workflow.png", help="'' to skip")
    parser.add_argument("--bench-seconds", type=float, default=3.0)
    parser.add_argument("--compare", action="store_true", help="table of criteria over --seeds")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--criteria", nargs="+", default=["l2", "taylor", "random"])
    parser.add_argument("--rank-check", action="store_true",
                        help="rank correlation of each criterion with single-channel loss cost")
    parser.add_argument("--max-batches", type=int, default=8,
                        help="batches of 64 for taylor/activation (0: all)")
    args = parser.parse_args()
    if args.rank_check:
        print(rank_check(args.criteria, seed=args.seed, epochs=args.epochs))
        return
    if args.compare:
        print(compare(args.seeds, args.criteria, ratio=args.ratio, epochs=args.epochs,
                      finetune_epochs=args.finetune_epochs, max_batches=args.max_batches or None))
        return
    r = run(importance=args.importance, ratio=args.ratio, epochs=args.epochs,
            finetune_epochs=args.finetune_epochs, seed=args.seed, bench_seconds=args.bench_seconds)
    print(f"accuracy   dense {r['acc_dense']:.2f}%  pruned {r['acc_pruned']:.2f}%  "
          f"fine-tuned {r['acc_finetuned']:.2f}%")
    print(f"params     {r['params'][0]:,} -> {r['params'][1]:,} "
          f"({r['params'][1] / r['params'][0]:.3f}x)")
    print(f"MACs       {r['macs'][0]:,} -> {r['macs'][1]:,} ({r['macs'][1] / r['macs'][0]:.3f}x)")
    if r["speedup"] is not None:
        print(f"latency    onnxruntime, 1 thread, batch 1, best-of interleaved: "
              f"{r['speedup']:.2f}x faster (ideal from MACs {r['ideal_speedup']:.2f}x)")
    if args.plot:
        plot(r, args.plot)
        print(f"plot       {args.plot}")


if __name__ == "__main__":
    main()
