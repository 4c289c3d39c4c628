"""Progress on a terminal: one line per stage of :mod:`shrink.progress`, on stderr.

The CLI shows it only when stderr is a TTY and ``--quiet`` is not given; the library itself never
writes anything.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import TextIO

from shrink.progress import Event, listen


class TerminalProgress:
    """A progress listener that writes one line per stage to a terminal.

    A stage shows as ``shrink: capture ... done in 0.4 s``: its start writes the name and
    ``...``, its end completes the line. When something else is written first (a nested stage, a
    log record: see :meth:`break_line`), the end gets a line of its own,
    ``shrink: bench export dense done in 1.2 s``, and nested stages are indented. A step of a loop
    shows its position: ``[3/8] mobilenet_v2 ... done in 12.3 s``.

    Args:
        stream: where to write (a terminal; see :func:`terminal_progress`).
        prefix: written at the start of every line.
        max_depth: show only stages nested fewer than this many levels deep (``None``: all).
    """

    def __init__(self, stream: TextIO, *, prefix: str = "shrink: ",
                 max_depth: int | None = None) -> None:
        self._stream = stream
        self._prefix = prefix
        self._max_depth = max_depth
        self._open = False  # the last start's line waits for its end
        self._broken = False

    def __call__(self, event: Event) -> None:
        if self._broken or (self._max_depth is not None and event.depth >= self._max_depth):
            return
        head = f"{self._prefix}{'  ' * event.depth}{event.title}"
        if event.phase == "start":
            self.break_line()
            self._write(f"{head} ...")
            self._open = True
            return
        outcome = f"{'failed after' if event.failed else 'done in'} {event.seconds:.1f} s\n"
        # stages nest, so an open line always belongs to the stage that is ending now
        self._write(f" {outcome}" if self._open else f"{head} {outcome}")
        self._open = False

    def break_line(self, record: object = None) -> bool:
        """End the open line so that other output starts on a line of its own.

        Usable as a :mod:`logging` filter on a handler that writes to the same stream (it lets
        every record through).
        """
        if self._open:
            self._write("\n")
            self._open = False
        return True

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):  # a closed or vanished terminal: stop showing progress
            self._broken = True


def terminal_progress(stream: TextIO, *, quiet: bool = False, prefix: str = "shrink: ",
                      max_depth: int | None = None) -> contextlib.AbstractContextManager[None]:
    """Show the stages run inside the block on ``stream`` if it is a terminal and not ``quiet``.

    Piped or redirected output (CI, ``2> log``) gets no progress at all. Log records that the
    root logger's handlers write to the same stream start on lines of their own. ``prefix`` and
    ``max_depth`` are :class:`TerminalProgress`'s.

    Example:
        >>> with terminal_progress(sys.stderr, quiet=args.quiet):
        ...     shrink.prune(model, (x,), config)
    """
    isatty = getattr(stream, "isatty", None)
    if quiet or isatty is None or not isatty():
        return contextlib.nullcontext()
    return shown(TerminalProgress(stream, prefix=prefix, max_depth=max_depth), stream)


@contextlib.contextmanager
def shown(progress: TerminalProgress, stream: TextIO) -> Iterator[None]:
    shared = [h for h in logging.getLogger().handlers if getattr(h, "stream", None) is stream]
    for h in shared:
        h.addFilter(progress.break_line)
    try:
        with listen(progress):
            yield
    finally:
        for h in shared:
            h.removeFilter(progress.break_line)
