"""Frozen, validated options for :func:`shrink.prune`."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from torch import nn

from shrink.criteria.weight import Criterion, LnNorm
from shrink.errors import ConfigError
from shrink.select import Policy, Uniform


@dataclass(frozen=True, slots=True)
class PruneConfig:
    """Everything :func:`shrink.prune` needs besides the model and its inputs.

    Attributes:
        policy: :class:`Uniform` (local) or :class:`Global` selection, with ratio and rounding.
        criterion: channel importance (:class:`LnNorm`, :class:`Random`, :class:`BNScale`,
            :class:`UserScores`).
        ignore: module names, glob patterns or types whose channels stay.
        verify: check the result against the masked oracle (raises on mismatch).
        rtol: tolerance of that check.
        leaf_types: module types to keep opaque during capture.
        grouped_convs: ``"channels"`` (default: every conv group loses the same number of
            channels) or ``"groups"`` (whole conv groups go); see :func:`shrink.analyze`.
        exact_only: prune only groups whose pruning equals the masked original (no channels
            normalised by a LayerNorm/RMSNorm); see :func:`shrink.analyze`.
    """

    policy: Policy = field(default_factory=lambda: Uniform(0.5))
    criterion: Criterion = field(default_factory=LnNorm)
    ignore: tuple[str | type[nn.Module], ...] = ()
    verify: bool = True
    rtol: float = 1e-5
    leaf_types: tuple[type[nn.Module], ...] = ()
    grouped_convs: str = "channels"
    exact_only: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.ignore, tuple):
            raise ConfigError("PruneConfig.ignore must be a tuple of names, globs or types")
        if not callable(self.criterion):
            raise ConfigError(f"criterion must be callable, got {self.criterion!r}")
        if self.grouped_convs not in ("groups", "channels"):
            raise ConfigError(
                f"grouped_convs must be 'groups' or 'channels', got {self.grouped_convs!r}"
            )
        if not self.rtol > 0:
            raise ConfigError(f"rtol must be > 0, got {self.rtol}")


def as_tuple(value: str | type[nn.Module] | Sequence[str | type[nn.Module]] | None) -> tuple:  # type: ignore[type-arg]
    if value is None:
        return ()
    if isinstance(value, (str, type)):
        return (value,)
    return tuple(value)
