"""Shared test helpers: prune a model and assert what shrink promises."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

import shrink
from shrink.plan import ChannelGroup
from shrink.testing import assert_unchanged, randomize_, state_snapshot


def prune_checked(model: nn.Module, x: Any, ratio: float | int = 0.5, *, seed: int = 0,
                  **options: Any) -> shrink.Result:
    """Prune with the oracle on, and assert: input untouched, output shapes equal.

    Toy models have 8-16 channel layers, which ``round_to="auto"`` keeps whole (it rounds kept
    counts up to 16 for onnxruntime); tests of structure prune them unrounded unless they ask.
    """
    options.setdefault("round_to", 1)
    randomize_(model, seed)
    model.eval()
    inputs = x if isinstance(x, tuple) else (x,)
    snap = state_snapshot(model)
    res = shrink.prune(model, inputs, config(ratio, **options))
    assert_unchanged(model, snap)
    with torch.no_grad():
        a, b = model(*inputs), res.model.eval()(*inputs)
    for ta, tb in zip(_flat(a), _flat(b), strict=False):
        assert ta.shape == tb.shape
    assert res.report is not None
    assert res.report.max_rel_error <= 1e-5
    return res


def _flat(v: Any) -> list[torch.Tensor]:
    if isinstance(v, torch.Tensor):
        return [v]
    if isinstance(v, dict):
        return [t for k in sorted(v) for t in _flat(v[k])]
    if isinstance(v, (tuple, list)):
        return [t for item in v for t in _flat(item)]
    return []


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def group(res: shrink.Result, gid: str) -> ChannelGroup:
    return res.analysis.group(gid)


def kept(res: shrink.Result, gid: str) -> int:
    for d in res.plan.decisions:
        if d.group == gid:
            return len(d.keep)
    return res.analysis.group(gid).size


def config(ratio: float | int, **options: Any) -> shrink.PruneConfig:
    """A float is a fraction (``ratio=``), an int a channel count per group (``amount=``)."""
    if isinstance(ratio, int) and not isinstance(ratio, bool) and ratio:
        return shrink.PruneConfig(amount=ratio, **options)
    return shrink.PruneConfig(ratio, **options)
