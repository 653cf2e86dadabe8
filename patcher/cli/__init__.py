"""The ``nunchaku-patch`` command line: the only package that imports click.

Layout: :mod:`~patcher.cli.app` holds the group and the command registry; one module per command
(:mod:`~patcher.cli.patch`, :mod:`~patcher.cli.validate`, :mod:`~patcher.cli.inspect`,
:mod:`~patcher.cli.restore`, :mod:`~patcher.cli.merge`, :mod:`~patcher.cli.set`, :mod:`~patcher.cli.unset`,
:mod:`~patcher.cli.models`), each imported only when its command runs; :mod:`~patcher.cli.console` (where text
goes), :mod:`~patcher.cli.options` (the command class and shared options), :mod:`~patcher.cli.batch` (collecting
files, running each, the summary), :mod:`~patcher.cli.write` (planning and writing one file's metadata: patch,
set, unset), :mod:`~patcher.cli.edit` (what set and unset share) and :mod:`~patcher.cli.render` (pieces of
records) are shared. Commands import the shared modules, never
each other or the group, so there is no import cycle.
"""

from __future__ import annotations

from .app import main

__all__ = ["main"]
