"""``nunchaku-patch restore``: put back a header saved by ``--backup``, or finish an interrupted patch."""

from __future__ import annotations

import functools
import sys

import click

from .. import splice
from ..report import Record, Report, Status
from .batch import collect, require_paths, run_one, summarize
from .console import Console
from .options import CONTEXT_SETTINGS, Command, output_options
from .render import RESTORE_FIELDS, header_json


@click.command("restore", cls=Command, context_settings=CONTEXT_SETTINGS, short_help="Undo a --backup patch.")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...", type=click.Path())
@click.option("--follow-symlinks", is_flag=True, help="Restore the target of a symlink.")
@output_options
def command(paths: tuple[str, ...], follow_symlinks: bool, json_mode: bool, verbose: int, quiet: bool) -> None:
    """Put back the header saved by --backup, or finish an interrupted patch.

    A folder means every file below it that has a backup or an interrupted patch.

    \b
    Examples:
      nunchaku-patch restore model.safetensors
      nunchaku-patch restore ~/models/
    """
    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode, fields=RESTORE_FIELDS)
    require_paths(console, paths)
    report = Report()
    files = [target.path for target in collect(paths, report, console, restorable=True)]

    def one(path: str) -> Record:
        result = splice.restore(path, follow_symlinks=follow_symlinks)
        record = Record(path, Status.RESTORED, strategy=result.strategy.value)
        record.details = {"header": header_json(result), "backup": result.backup, "recovered": result.recovered}
        if result.backup is None:
            console.status(f"finished {path}: the interrupted patch was {result.recovered} (there was no backup)")
        else:
            sizes = f"header {result.old_header_len:,} -> {result.new_header_len:,} bytes"
            console.status(f"restored {path} from {result.backup} ({result.strategy.value}, {sizes})")
        return record

    for index, path in enumerate(files, 1):
        console.progress(index, len(files), path)
        console.record(report.add(run_one(console, functools.partial(one, path), path)))
    summarize(console, report, paths)
    sys.exit(report.exit_code)


__all__ = ["command"]
