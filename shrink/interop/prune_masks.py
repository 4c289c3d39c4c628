"""Detect and fold ``torch.nn.utils.prune`` reparametrizations (``weight = weight_orig * mask``).

A leaf module: it imports nothing of shrink but its errors, so :mod:`shrink.capture` can refuse
masked models without importing the :func:`~shrink.interop.masks.from_masks` machinery above it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from shrink.errors import ConfigError


@dataclass(frozen=True, slots=True)
class MaskedTensor:
    """One ``torch.nn.utils.prune`` reparametrization: ``module.name = name_orig * name_mask``."""

    module: str
    name: str


def find_masks(model: nn.Module) -> tuple[MaskedTensor, ...]:
    """Every tensor of ``model`` that carries a ``torch.nn.utils.prune`` reparametrization.

    Example:
        >>> prune.ln_structured(model.conv1, "weight", amount=0.5, n=2, dim=0)
        >>> find_masks(model)
        (MaskedTensor(module='conv1', name='weight'),)
    """
    from torch.nn.utils import prune

    found = []
    for fqn, mod in model.named_modules():
        for hook in mod._forward_pre_hooks.values():
            if isinstance(hook, prune.BasePruningMethod):
                found.append(MaskedTensor(fqn, str(hook._tensor_name)))
    return tuple(found)


def fold_masks(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every prune mask folded into its tensor (``prune.remove``).

    The copy has plain parameters (``weight``, no ``weight_orig``/``weight_mask``, no pruning
    hooks); other hooks stay. ``model`` itself is not modified.

    Raises:
        ConfigError: when the model cannot be deep-copied (e.g. legacy ``weight_norm``).
    """
    from torch.nn.utils import prune

    masked = find_masks(model)
    # The masked attribute (``weight = weight_orig * weight_mask``) is a non-leaf tensor, which
    # deepcopy refuses: hand deepcopy a detached clone instead (prune.remove recomputes it).
    memo: dict[int, Any] = {}
    for mt in masked:
        value = getattr(model.get_submodule(mt.module), mt.name, None)
        if isinstance(value, torch.Tensor):
            memo[id(value)] = value.detach().clone()
    try:
        folded = copy.deepcopy(model, memo)
    except RuntimeError as e:
        raise ConfigError(
            f"cannot copy {type(model).__name__}: {e}. shrink never modifies the caller's model, "
            "so it works on a deep copy; remove whatever holds non-leaf tensors (e.g. the legacy "
            "torch.nn.utils.weight_norm: use torch.nn.utils.parametrizations.weight_norm)."
        ) from e
    for mt in masked:
        with torch.no_grad():
            prune.remove(folded.get_submodule(mt.module), mt.name)  # type: ignore[no-untyped-call]
    return folded
