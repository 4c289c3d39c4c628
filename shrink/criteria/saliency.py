"""Saliency substitution: score groups from a per-parameter saliency, through the op rules.

A data-driven criterion computes a *saliency* for every parameter, a non-negative tensor of
the parameter's shape (Taylor: ``mean_b |w * dL_b/dw|``; activation-weighted magnitude:
``|W| * ||X||``). :func:`substitute` puts each saliency into a deep copy of the model in place of
the parameter's data, and :class:`SaliencyScores` scores a group with
:class:`~shrink.criteria.LnNorm` ``(p=1)`` evaluated on the copy's modules:

    score_c = sum_{members} sum_{slice of c} saliency

Each rule's ``score_params`` returns the copy's parameters, or views of them (the heads axis of
an attention projection, a fused qkv weight split into parts), which now hold the saliency. So
every axis a rule can score with ``LnNorm`` (heads, grouped-query units, flatten consumers,
concat segments) is scored by every saliency, reduced jointly over every member of the group,
with no per-criterion code for any layer.

Parameters without saliency (Taylor: no gradient reached them) hold zeros. A group none of
whose member slices reads a parameter with saliency gets no score (``None``), as with any
criterion that has no opinion.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from shrink.criteria.weight import LnNorm
from shrink.errors import InvariantError
from shrink.plan import ChannelGroup
from shrink.rules import rule_for

Saliency = Callable[[str, nn.Parameter], "torch.Tensor | None"]


def _storage(t: torch.Tensor) -> int:
    return int(t.untyped_storage().data_ptr())


@dataclass(frozen=True, slots=True, eq=False)
class SaliencyScores:
    """The L1 norm of a saliency over every member slice of a group (see the module docstring).

    Attributes:
        modules: ``named_modules()`` of a copy of the model whose parameters hold saliencies.
        scored: storage addresses of the saliencies that carry evidence (the other parameters
            hold zeros); a view shares its parameter's storage.
    """

    modules: Mapping[str, nn.Module]
    scored: frozenset[int]

    def __call__(
        self, group: ChannelGroup, modules: Mapping[str, nn.Module]
    ) -> torch.Tensor | None:
        """Scores of ``group``, or None when none of its slices has a saliency.

        ``modules`` (the caller's model) is ignored on purpose: the rules must read the
        saliencies in the copy, not the model's weights. The copy has the same module names,
        so every member resolves there.
        """
        if not self.covers(group):
            return None
        return LnNorm(1.0)(group, self.modules)

    def covers(self, group: ChannelGroup) -> bool:
        """Whether some member slice of ``group`` reads a parameter with a saliency."""
        for m in group.members:
            mod = self.modules.get(m.module)
            rule = None if mod is None else rule_for(mod)
            if rule is None or mod is None:
                continue
            if any(_storage(t) in self.scored for t, _ in rule.score_params(mod, m.side)):
                return True
        return False


def substitute(work: nn.Module, saliency: Saliency) -> SaliencyScores:
    """Replace the data of every parameter of ``work`` by its saliency; ``work`` is consumed.

    Args:
        work: a deep copy of the model, used for nothing else afterwards.
        saliency: ``saliency(name, param)``: a tensor of ``param``'s shape, or None for a
            parameter without evidence (it gets zeros). Called once per parameter, so a
            saliency can be computed lazily and memory peaks at one extra parameter.

    Returns:
        The criterion that scores groups from the saliencies.

    Raises:
        InvariantError: a saliency does not have its parameter's shape (a shrink bug).
    """
    scored: set[int] = set()
    with torch.no_grad():
        for name, p in work.named_parameters():  # shared (tied) parameters once
            s = saliency(name, p)
            p.grad = None
            p.requires_grad_(False)
            if s is None:
                p.data = torch.zeros_like(p)
                continue
            if s.shape != p.shape:
                raise InvariantError(
                    f"saliency of {name!r} has shape {tuple(s.shape)}, the parameter "
                    f"{tuple(p.shape)}; a criterion must give one value per weight"
                )
            p.data = s.detach().contiguous()  # contiguous: the rules' reshapes stay views
            scored.add(_storage(p))
    return SaliencyScores(dict(work.named_modules(remove_duplicate=False)), frozenset(scored))
