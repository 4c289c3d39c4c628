"""A latency table: one layer's time as a function of its kept input and output channels.

Each axis (input, output) has an extent ``C`` (the dense layer's channels), a *quantum* ``q`` and
measured points. A kept count ``c`` is first rounded up to its block,

    c_eff = min(C, q * ceil(c / q)),

because the runtime pads a partial block (onnxruntime's x86 NCHWc convs compute 16 channels at
a time on AVX-512, 8 on AVX2: a conv with 33 to 48 output channels costs what 48 cost;
measured in ``docs/latency.md``). The table is *piecewise constant within a block*. Between
measured points it is *linear* in ``c_eff`` (bilinear over both axes), and the points are
multiples of ``q`` at about 0, 1/4, 1/2, 3/4 and 1 of ``C`` (the first is one block), so the
steps at block boundaries are exact and the slope between measured points is the runtime's
(convs and matmuls cost about ``a + b * blocks`` per axis). An axis that does not change (a
pinned group, the image's 3 channels, a classifier's classes) has the one point ``C``; so has an
axis of at most one block.

For a *tied* layer (a depthwise conv, or a grouped conv whose conv groups go whole) the output
channels follow the input's, so its table has one axis: the input's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from shrink.errors import ConfigError

FRACTIONS = (0.0, 0.25, 0.5, 0.75, 1.0)
"""Where each variable axis is measured, as fractions of its extent (rounded up to blocks)."""


@dataclass(frozen=True, slots=True)
class Axis:
    """One channel axis of a layer's table.

    Attributes:
        extent: the dense layer's channels.
        quantum: the block: counts round up to a multiple of it (1: no blocks).
        variable: whether the kept count can change (False: measured at ``extent`` only).
    """

    extent: int
    quantum: int = 1
    variable: bool = True

    def __post_init__(self) -> None:
        if self.extent < 1 or self.quantum < 1:
            raise ConfigError(f"Axis needs extent >= 1 and quantum >= 1, got {self}")

    def points(self) -> tuple[int, ...]:
        """The counts measured on this axis, ascending, each a multiple of the quantum or the
        extent."""
        if not self.variable or self.extent <= self.quantum:
            return (self.extent,)
        q = self.quantum
        return tuple(sorted({min(self.extent, max(q, q * math.ceil(f * self.extent / q)))
                             for f in FRACTIONS}))

    def effective(self, c: np.ndarray) -> np.ndarray:
        """Counts rounded up to their block (never above the extent)."""
        q = self.quantum
        return np.minimum(self.extent, q * np.ceil(np.asarray(c, dtype=np.float64) / q))


@dataclass(frozen=True, slots=True)
class Table:
    """Measured milliseconds at every (input point, output point), and the interpolation.

    Attributes:
        inp: the input axis.
        out: the output axis.
        ms: ``ms[i][o]`` at ``inp.points()[i]`` input and ``out.points()[o]`` output channels.
    """

    inp: Axis
    out: Axis
    ms: tuple[tuple[float, ...], ...]

    def __post_init__(self) -> None:
        shape = (len(self.inp.points()), len(self.out.points()))
        got = (len(self.ms), *{len(row) for row in self.ms})
        if got != shape or any(not math.isfinite(v) or v < 0 for row in self.ms for v in row):
            raise ConfigError(f"latency table needs {shape[0]}x{shape[1]} finite times >= 0, "
                              f"got {got}")

    def at(self, c_in: Any, c_out: Any) -> np.ndarray:
        """Interpolated milliseconds at kept counts (arrays broadcast), never below 0."""
        i, ti = _locate(self.inp.points(), self.inp.effective(c_in))
        o, to = _locate(self.out.points(), self.out.effective(c_out))
        m = np.asarray(self.ms, dtype=np.float64)
        i1 = np.minimum(i + 1, m.shape[0] - 1)
        o1 = np.minimum(o + 1, m.shape[1] - 1)
        v = ((1 - ti) * (1 - to) * m[i, o] + ti * (1 - to) * m[i1, o]
             + (1 - ti) * to * m[i, o1] + ti * to * m[i1, o1])
        return np.maximum(v, 0.0)

    def to_dict(self) -> dict[str, Any]:
        return {"in": [self.inp.extent, self.inp.quantum, self.inp.variable],
                "out": [self.out.extent, self.out.quantum, self.out.variable],
                "ms": [list(row) for row in self.ms]}

    @classmethod
    def from_dict(cls, d: Any) -> Table:
        """Inverse of :meth:`to_dict`.

        Raises:
            ConfigError: the data is not a table (a corrupt cache entry).
        """
        try:
            inp = Axis(int(d["in"][0]), int(d["in"][1]), bool(d["in"][2]))
            out = Axis(int(d["out"][0]), int(d["out"][1]), bool(d["out"][2]))
            ms = tuple(tuple(float(v) for v in row) for row in d["ms"])
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ConfigError(f"not a latency table: {e!r}") from e
        return cls(inp, out, ms)


def _locate(points: Sequence[int], x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Segment index and position inside it (0..1; below the first point it extrapolates)."""
    p = np.asarray(points, dtype=np.float64)
    if len(p) == 1:
        zero = np.zeros(np.shape(x), dtype=np.int64)
        return zero, np.zeros(np.shape(x))
    i = np.clip(np.searchsorted(p, x, side="right") - 1, 0, len(p) - 2)
    t = np.minimum((x - p[i]) / (p[i + 1] - p[i]), 1.0)
    return i, t
