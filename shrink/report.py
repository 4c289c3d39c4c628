"""Report: what pruning did (params, MACs, groups, pinned reasons, oracle error), as a table."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True, slots=True)
class GroupRow:
    id: str
    kept: int
    total: int
    pinned: str | None = None
    exact: bool = True


@dataclass(frozen=True, slots=True)
class Report:
    """Measured effect of a plan on a model."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    groups: tuple[GroupRow, ...] = ()
    max_rel_error: float | None = None
    oracle_dtype: str | None = None
    diagnostics: tuple[str, ...] = field(default_factory=tuple)
    #: max relative deviation of the pruned model from the plainly masked original, when inexact
    #: groups (channels a LayerNorm normalises) were pruned; None when every pruned group is exact
    deviation: float | None = None

    @property
    def param_ratio(self) -> float:
        return self.params_after / max(self.params_before, 1)

    @property
    def mac_ratio(self) -> float:
        return self.macs_after / max(self.macs_before, 1)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["param_ratio"] = self.param_ratio
        d["mac_ratio"] = self.mac_ratio
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1, sort_keys=True)

    def __str__(self) -> str:
        lines = [
            f"{'':12}{'before':>16}{'after':>16}{'ratio':>9}",
            f"{'params':12}{self.params_before:>16,}{self.params_after:>16,}{self.param_ratio:>9.3f}",
            f"{'MACs':12}{self.macs_before:>16,}{self.macs_after:>16,}{self.mac_ratio:>9.3f}",
        ]
        if self.max_rel_error is not None:
            lines.append(
                f"masked-oracle max relative error: {self.max_rel_error:.2e} ({self.oracle_dtype})"
            )
        if self.deviation is not None:
            lines.append(
                f"inexact: pruned LayerNorm-normalised channels change its statistics; max "
                f"relative deviation from the masked original {self.deviation:.2e} "
                "(exact_only=True prunes only exact groups)"
            )
        pruned = [g for g in self.groups if g.pinned is None]
        pinned = [g for g in self.groups if g.pinned is not None]
        lines.append(f"groups: {len(pruned)} prunable, {len(pinned)} pinned")
        width = max([len(g.id) for g in self.groups] + [5])
        for g in pruned:
            note = "" if g.exact or g.kept == g.total else "  inexact"
            lines.append(f"  {g.id:<{width}} {g.kept:>6} / {g.total:<6}{note}".rstrip())
        for g in pinned:
            lines.append(f"  {g.id:<{width}} pinned ({g.total}): {g.pinned}")
        lines += [f"note: {d}" for d in self.diagnostics]
        return "\n".join(lines)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_inputs: tuple[Any, ...]) -> int:
    """Multiply-accumulates of one eval-mode forward pass (aten conv/mm/bmm/attention).

    Counted with FlopCounterMode on a weightless meta-device copy (no compute), falling back to
    a real run for models with ops that cannot run on meta. ``model`` is not modified.
    """
    from torch.utils.flop_counter import FlopCounterMode

    from shrink.capture import meta_copy, to_meta
    from shrink.fastmeta import fast_meta

    def run(m: nn.Module, inputs: tuple[Any, ...]) -> int:
        counter = FlopCounterMode(display=False)
        # nn.MultiheadAttention's inference fast path is one fused op the counter does not see
        fast = torch.backends.mha.get_fastpath_enabled()
        torch.backends.mha.set_fastpath_enabled(False)
        try:
            with torch.no_grad(), fast_meta(), counter:
                m(*inputs)
        finally:
            torch.backends.mha.set_fastpath_enabled(fast)
        return int(counter.get_total_flops()) // 2

    try:
        return run(meta_copy(model).eval(), to_meta(example_inputs))
    except Exception:  # an op without a meta kernel: count on a real copy
        import copy

        return run(copy.deepcopy(model).eval(), example_inputs)
