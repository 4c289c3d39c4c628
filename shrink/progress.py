"""Progress of long work: the library marks its stages, a caller may listen.

The pipeline wraps each stage in :func:`stage` (per-item loops use :func:`step`); a caller that
wants to show progress installs a listener with :func:`listen`, which receives an :class:`Event`
when each stage starts and ends. The listener is held in a :class:`contextvars.ContextVar`, so it
follows the current thread or asyncio task and is gone when ``listen`` exits. With no listener, a
stage only reads that variable: nothing is timed, recorded or written. The library itself never
writes progress anywhere; the ``shrink`` command line renders it on a terminal.

Example:
    >>> from shrink.progress import Event, listen, stage
    >>> events: list[Event] = []
    >>> with listen(events.append):
    ...     with stage("capture"):
    ...         pass
    >>> [(e.phase, e.name) for e in events]
    [('start', 'capture'), ('end', 'capture')]
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Literal

__all__ = ["Event", "Listener", "listen", "stage", "step"]


@dataclass(frozen=True, slots=True)
class Event:
    """A stage started or ended.

    Attributes:
        phase: ``"start"`` or ``"end"``.
        name: what the stage does, e.g. ``"capture"`` or ``"export"``.
        depth: how many stages enclose this one (0: a top-level stage).
        seconds: wall time the stage took (``"end"``); 0.0 at ``"start"``.
        failed: the stage ended by raising (``"end"`` only).
        index: 1-based position of a :func:`step` in its loop, else ``None``.
        total: the loop's length for a :func:`step`, else ``None``.
    """

    phase: Literal["start", "end"]
    name: str
    depth: int = 0
    seconds: float = 0.0
    failed: bool = False
    index: int | None = None
    total: int | None = None

    @property
    def title(self) -> str:
        """The name, after ``[index/total]`` for a step: ``"[3/8] mobilenet_v2"``."""
        return self.name if self.index is None else f"[{self.index}/{self.total}] {self.name}"


Listener = Callable[[Event], None]
"""Receives every :class:`Event`; an exception it raises propagates into the stage."""

_listener: ContextVar[Listener | None] = ContextVar("shrink_progress_listener", default=None)
_depth: ContextVar[int] = ContextVar("shrink_progress_depth", default=0)


@contextmanager
def listen(listener: Listener) -> Iterator[None]:
    """Send the events of every stage run inside the block to ``listener``.

    Installing a listener replaces the enclosing one for the block; it is restored on exit.

    Args:
        listener: called with each :class:`Event`, in the thread that runs the stage.

    Example:
        >>> with listen(lambda e: log.info("%s %s", e.phase, e.title)):
        ...     shrink.prune(model, (x,), config)
    """
    token = _listener.set(listener)
    try:
        yield
    finally:
        _listener.reset(token)


@contextmanager
def stage(name: str, *, index: int | None = None, total: int | None = None) -> Iterator[None]:
    """Report the block as a stage called ``name``: a start event, then an end event.

    The end event is sent however the block exits; ``failed`` says whether it raised. Stages
    nest: events of a stage inside another carry ``depth`` one higher. Without a listener this
    does nothing.

    Args:
        name: what the block does, short and lower case: ``"capture"``, ``"verify"``.
        index: 1-based position in a loop (see :func:`step`).
        total: the loop's length.

    Example:
        >>> with stage("score"):
        ...     scores = score(groups, model, criterion)
    """
    listener = _listener.get()
    if listener is None:
        yield
        return
    depth = _depth.get()
    listener(Event("start", name, depth, index=index, total=total))
    token = _depth.set(depth + 1)
    start = time.perf_counter()
    failed = True
    try:
        yield
        failed = False
    finally:
        seconds = time.perf_counter() - start
        _depth.reset(token)
        listener(Event("end", name, depth, seconds, failed, index, total))


def step(index: int, total: int, name: str) -> AbstractContextManager[None]:
    """A :func:`stage` for item ``index`` (1-based) of ``total`` in a loop.

    Example:
        >>> for i, name in enumerate(models, 1):
        ...     with step(i, len(models), name):
        ...         run(name)
    """
    return stage(name, index=index, total=total)

