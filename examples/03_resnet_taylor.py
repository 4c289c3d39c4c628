"""Taylor importance with a DataLoader on a torchvision ResNet-18 (generated data, no download).

    python examples/03_resnet_taylor.py

Shows the data-driven API: ``importance="taylor"`` with ``data=`` (any re-iterable of
``(x, y)`` batches) and ``loss_fn=``, a MACs budget solved by shrink (``target="macs"``), a
per-group sensitivity table, and iterative pruning with a fine-tune callback. The data are ten
random prototype images plus noise, so a few training steps give a model worth pruning.
"""

from __future__ import annotations

import torch
import torchvision
from torch import nn
from torch.nn.functional import cross_entropy
from torch.utils.data import DataLoader, TensorDataset

import shrink
from shrink.criteria import LnNorm, Taylor


def make_data(n: int, seed: int) -> TensorDataset:
    """``n`` noisy copies of ten fixed 3x16x16 prototypes (the same for every ``seed``)."""
    prototypes = torch.randn(10, 3, 16, 16, generator=torch.Generator().manual_seed(1234))
    gen = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 10, (n,), generator=gen)
    x = prototypes[y] + 1.0 * torch.randn(n, 3, 16, 16, generator=gen)
    return TensorDataset(x, y)


def train(model: nn.Module, loader: DataLoader, steps: int) -> nn.Module:
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    done = 0
    while done < steps:
        for x, y in loader:
            opt.zero_grad()
            cross_entropy(model(x), y).backward()
            opt.step()
            done += 1
            if done == steps:
                break
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, data: TensorDataset) -> float:
    x, y = data.tensors
    return 100.0 * float((model.eval()(x).argmax(1) == y).float().mean())


def main() -> None:
    torch.manual_seed(0)
    train_set, val_set = make_data(512, seed=0), make_data(256, seed=1)
    loader = DataLoader(train_set, batch_size=32, shuffle=True,
                        generator=torch.Generator().manual_seed(0))
    model = train(torchvision.models.resnet18(num_classes=10), loader, steps=20)
    scoring = DataLoader(train_set, batch_size=64)  # fixed batches: the same scores every call
    x = (val_set.tensors[0][:1],)
    print(f"dense: {accuracy(model, val_set):.1f}% on generated validation data")

    # 1. one call: remove half the MACs, channels ranked by first-order Taylor on 4 batches
    res = shrink.prune(model, x, shrink.PruneConfig(
        0.5, target="macs", importance="taylor", data=scoring, loss_fn=cross_entropy,
        max_batches=4))
    assert res.report is not None
    print(f"taylor, 50% of MACs removed: {accuracy(res.model, val_set):.1f}% before fine-tuning; "
          f"MACs x{res.report.mac_ratio:.3f}, params x{res.report.param_ratio:.3f}")

    # 2. the same with explicit objects, against data-free L2 at the same budget
    for name, criterion in [("taylor", Taylor(scoring, cross_entropy, max_batches=4)),
                            ("l2", LnNorm(2.0))]:
        cfg = shrink.PruneConfig(0.5, target="macs", importance=criterion)
        print(f"  {name:>6}: {accuracy(shrink.prune(model, x, cfg).model, val_set):.1f}%")

    # 3. which layer4 groups can lose channels cheaply?
    table = shrink.sensitivity(model, x, lambda m: accuracy(m, val_set), ratios=(0.5, 0.9),
                               groups=("layer4.*",))
    print(table)

    # 4. iterative: 2 steps to 50% of MACs, 10 fine-tuning steps after each
    out = shrink.prune_iteratively(model, x, shrink.PruneConfig(
        0.5, target="macs", importance="taylor", data=scoring, loss_fn=cross_entropy,
        max_batches=4), steps=2, finetune=lambda m, step: train(m, loader, steps=10))
    print(f"iterative (2 steps + fine-tuning): {accuracy(out.model, val_set):.1f}%")


if __name__ == "__main__":
    main()
