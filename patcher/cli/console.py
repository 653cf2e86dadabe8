"""The console: one object decides colour, verbosity and where each kind of text goes.

Data (diffs, ``--json`` records, ``inspect`` and ``validate`` output) goes to stdout; status, progress,
log lines and errors go to stderr.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from contextlib import AbstractContextManager
from typing import Any

import click

from .. import progress
from ..report import Record


def colour_for(stream: Any) -> bool:
    """Return whether ``stream`` gets ANSI colour: a terminal, and no ``NO_COLOR`` (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Console:
    """Write data to stdout and status to stderr, honouring ``-q``/``-v``, ``--json`` and ``NO_COLOR``."""

    def __init__(
        self,
        *,
        verbose: int = 0,
        quiet: bool = False,
        json_mode: bool = False,
        fields: Sequence[str] = (),
        terse: bool = False,
    ) -> None:
        self.verbose = verbose
        self.quiet = quiet
        #: ``--check``: on stderr only a line per file that would change, errors and the summary (as black).
        self.terse = terse
        self.json_mode = json_mode
        #: The keys every ``--json`` record of the command has, in order (``null`` where not applicable).
        self.fields = tuple(fields)
        self.color_out = colour_for(sys.stdout)
        self.color_err = colour_for(sys.stderr)
        # The progress line needs a terminal (it rewrites itself), not colour: NO_COLOR does not hide it.
        isatty = getattr(sys.stderr, "isatty", None)
        self.progress_shown_on_err = bool(isatty and isatty())
        self._progress_shown = False
        # A batch resolves configs per file; the same log line for every file would drown the results.
        self._logged: set[str] = set()

    def data(self, text: str = "") -> None:
        """Print data to stdout (suppressed in ``--json`` mode, where records are the data)."""
        if not self.json_mode:
            self._clear_progress()
            click.echo(text, color=self.color_out)

    def record(self, record: Record) -> None:
        """Print one ``--json`` record as a JSON line."""
        if self.json_mode:
            out = record.to_json()
            if self.fields:
                out = {**{key: out.get(key) for key in self.fields}, **out}
            click.echo(json.dumps(out, ensure_ascii=False))

    def status(self, text: str) -> None:
        """Print a status line to stderr unless quiet (or terse)."""
        if not (self.quiet or self.terse):
            self._clear_progress()
            click.echo(text, err=True, color=self.color_err)

    def change(self, text: str) -> None:
        """Print a line about a file that would change (``would patch FILE``) unless quiet; shown when terse."""
        if not self.quiet:
            self._clear_progress()
            click.echo(text, err=True, color=self.color_err)

    def summary(self, text: str) -> None:
        """Print the run's summary line unless quiet; shown when terse."""
        self.change(text)

    def log(self, text: str) -> None:
        """Print a config-resolution line (``  Loaded config from ...``) once per run, unless quiet or terse."""
        if self.quiet or self.terse or text in self._logged:
            return
        self._logged.add(text)
        self._clear_progress()
        click.echo(self.style(f"  {text}", fg="bright_black", err=True), err=True, color=self.color_err)

    def debug(self, text: str) -> None:
        """Print a line only with ``-v``."""
        if self.verbose and not (self.quiet or self.terse):
            self._clear_progress()
            click.echo(self.style(f"  {text}", fg="bright_black", err=True), err=True, color=self.color_err)

    def warning(self, text: str) -> None:
        """Print a warning line to stderr unless quiet or terse."""
        if not (self.quiet or self.terse):
            self._clear_progress()
            click.echo(self.style("warning: ", fg="yellow", bold=True, err=True) + text, err=True, color=self.color_err)

    def error(self, text: str) -> None:
        """Print an error line to stderr (even when quiet)."""
        self._clear_progress()
        click.echo(self.style("error: ", fg="red", bold=True, err=True) + text, err=True, color=self.color_err)

    def progress(self, index: int, total: int, path: str) -> None:
        """Show ``[i/n] file`` on a terminal for batch runs (overwritten in place, never in a pipe or log)."""
        if self.quiet or self.terse or total < 2 or not self.progress_shown_on_err:
            return
        name = path if len(path) < 60 else "..." + path[-57:]
        sys.stderr.write(f"\r\x1b[K[{index}/{total}] {name}")
        sys.stderr.flush()
        self._progress_shown = True

    def copying(self, label: str, total: int) -> AbstractContextManager[object]:
        """Show a byte progress bar (rate, time left) for the data copied inside the block.

        Only on a terminal and without ``-q``; a write that copies nothing (fit, insert) draws nothing.
        """
        isatty = getattr(sys.stderr, "isatty", None)
        self._clear_progress()
        return progress.showing(label, total, sys.stderr, enabled=not self.quiet and bool(isatty and isatty()))

    def _clear_progress(self) -> None:
        if self._progress_shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._progress_shown = False

    def style(self, text: str, *, err: bool = False, **styles: Any) -> str:
        """Return ``text`` styled when the target stream gets colour."""
        if (self.color_err if err else self.color_out) and styles:
            return click.style(text, **styles)
        return text


__all__ = ["Console", "colour_for"]
