"""A byte progress bar for the commands that copy tensor data (``-o``, the copy strategy, ``merge``).

The copy loop (:func:`patcher._platform.copy_data`) reports the bytes it moved to whichever bar is active
(:func:`active`); the command line activates one around a write when stderr is a terminal. Without an active
bar the report costs one global lookup. :func:`render` is pure: it formats one line from the numbers.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TextIO

#: Seconds between two redraws (the copy reports every few tens of MB).
REDRAW_INTERVAL = 0.1
_BAR_WIDTH = 24

_active: ByteProgress | None = None


def _size(count: float) -> str:
    for unit, factor in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= factor:
            return f"{count / factor:.2f} {unit}"
    return f"{count:.0f} B"


def _duration(seconds: float) -> str:
    seconds = int(seconds + 0.5)
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{seconds:02d}" if hours else f"{minutes}:{seconds:02d}"


def render(label: str, done: int, total: int, elapsed: float, width: int = 80) -> str:
    """Return the progress line: label, percentage, bar, bytes, rate and time left, cut to ``width``."""
    fraction = min(done / total, 1.0) if total > 0 else 1.0
    filled = int(fraction * _BAR_WIDTH)
    bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
    rate = done / elapsed if elapsed > 0 else 0.0
    if rate > 0 and done < total:
        left = f"ETA {_duration((total - done) / rate)}"
    elif done >= total:
        left = f"in {_duration(elapsed)}"
    else:
        left = "ETA --:--"
    speed = f"{_size(rate)}/s" if rate > 0 else "-- MB/s"
    tail = f" {fraction:4.0%} [{bar}] {_size(done)} / {_size(total)}  {speed}  {left}"
    room = max(width - 1 - len(tail), 0)  # the last column stays empty: some terminals wrap on it
    name = label if len(label) <= room else ("..." + label[-(room - 3) :] if room > 3 else "")
    return (name + tail)[: max(width - 1, 0)]


class ByteProgress:
    """A one-line byte counter redrawn in place on a terminal (``\\r``), cleared when closed."""

    def __init__(
        self, label: str, total: int, stream: TextIO, *, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.label = label
        self.total = total
        self.done = 0
        self.stream = stream
        self._clock = clock
        self._start = self._clock()
        self._last_draw = -REDRAW_INTERVAL
        self._drawn = 0

    def advance(self, count: int) -> None:
        """Count ``count`` more bytes; redraw if the last redraw is old enough (or the copy is complete)."""
        self.done += count
        now = self._clock()
        if now - self._last_draw >= REDRAW_INTERVAL or self.done >= self.total:
            self._last_draw = now
            self._draw(now)

    def _draw(self, now: float) -> None:
        try:
            width = os.get_terminal_size(self.stream.fileno()).columns
        except (OSError, ValueError, AttributeError):
            width = 0
        width = width or 80  # a terminal that does not know its size says 0
        line = render(self.label, self.done, self.total, now - self._start, width)
        self.stream.write("\r" + line + " " * max(self._drawn - len(line), 0))
        self.stream.flush()
        self._drawn = len(line)

    def close(self) -> None:
        """Erase the line (the command prints its own result line next)."""
        if self._drawn:
            self.stream.write("\r" + " " * self._drawn + "\r")
            self.stream.flush()
            self._drawn = 0


def active() -> ByteProgress | None:
    """Return the bar the copy loop reports to, if any."""
    return _active


@contextmanager
def showing(label: str, total: int, stream: TextIO, *, enabled: bool) -> Iterator[ByteProgress | None]:
    """Activate a bar for the copies made inside the block (``enabled``: stderr is a terminal, not quiet)."""
    global _active
    if not enabled or total <= 0:
        yield None
        return
    bar = ByteProgress(label, total, stream)
    previous, _active = _active, bar
    try:
        yield bar
    finally:
        _active = previous
        bar.close()


__all__ = ["REDRAW_INTERVAL", "ByteProgress", "active", "render", "showing"]
