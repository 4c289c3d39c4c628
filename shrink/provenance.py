"""Which plans produced a model: what lets ``shrink.save(shrink.compress(m, 0.5), path)`` work.

:func:`shrink.apply` records its plan on the model it returns, together with that model's
fingerprint. A model pruned twice (``compress`` of a compressed model, each step of
``prune_iteratively``) carries the whole chain, oldest first, so it can be rebuilt from the
original architecture. The record is a plain attribute in the module's ``__dict__``: it survives
``copy.deepcopy`` (fine-tuning a copy keeps it) and never enters ``state_dict``, ``torch.fx``
graphs or ONNX files. A chain whose last fingerprint no longer matches the model (its layers were
changed by hand afterwards) is treated as absent.
"""

from __future__ import annotations

from torch import nn

from shrink.plan import Plan, fingerprint

_ATTR = "_shrink_provenance"


def record(produced: nn.Module, chain: tuple[Plan, ...]) -> None:
    """Note on ``produced`` that ``chain`` (oldest plan first) made it from the original."""
    produced.__dict__[_ATTR] = (chain, fingerprint(produced))


def plans_of(model: nn.Module) -> tuple[Plan, ...]:
    """The plans that produced ``model`` from its original architecture, oldest first; ``()``
    when ``model`` was not produced by shrink (or was changed since)."""
    entry = model.__dict__.get(_ATTR)
    if not (isinstance(entry, tuple) and len(entry) == 2):
        return ()
    chain, fp = entry
    if fp != fingerprint(model):
        return ()
    return tuple(chain)
