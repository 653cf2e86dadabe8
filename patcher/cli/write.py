"""Planning and writing one file's metadata: the step ``patch``, ``set`` and ``unset`` share.

Each command turns its arguments into something that plans (a :class:`~patcher.plan.Planner`, an
:class:`~patcher.edit.Editor`); every plan is a :class:`~patcher.plan.MetadataPlan` and goes through
:func:`apply_plan` to :func:`patcher.splice.write_metadata`, so any metadata change gets the same strategies,
journal, locks, refusals, ``--backup``, ``-o``, dry-run diff and record.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from typing import Any, NoReturn, TypeVar

import click

from .. import splice
from .._record import dataclass
from ..facts import Finding, Severity
from ..header import ALIGNMENT, PREFIX_SIZE, Header
from ..plan import MetadataPlan
from ..report import Record, Report, Status
from .batch import collect, load_header, require_paths, run_one, summarize, usage_error
from .console import Console
from .render import colour_diff, header_json

F = TypeVar("F", bound=Callable[..., Any])

#: What each write strategy means, for dry-run and verbose output.
STRATEGY_NOTES = {
    "fit": "the new header fits in the old one and is rewritten in place",
    "insert": "whole filesystem blocks are inserted at the front with fallocate; the tensor data is not moved",
    "copy": "a copy with the new header is written beside the file, then renamed over it",
    "output": "a patched copy is written to the output; the source is not changed",
    "none": "nothing to write",
}


@dataclass(frozen=True)
class Verbs:
    """How status lines name what happens to a file (the record's status stays ``patched`` and so on)."""

    #: The verb of the command line's own help: ``patch several files in place``.
    verb: str = "patch"
    done: str = "patched"
    would: str = "would patch"
    same: str = "already correct"


#: The verbs of ``patch`` (the default of every function taking ``verbs``).
PATCH_VERBS = Verbs()


@dataclass(frozen=True)
class WriteMode:
    """What a run does with each plan, from the write options: write it (in place or to ``-o``), or show it."""

    dry_run: bool = False
    check: bool = False
    backup: bool = False
    output: str | None = None
    follow_symlinks: bool = False
    #: Also what the writer allows with ``--force``: replace an existing ``-o`` file, lose a copy's owner or group.
    force: bool = False

    @property
    def writing(self) -> bool:
        """Return whether files are written (not a dry run, not ``--check``)."""
        return not (self.dry_run or self.check)


def write_options(*, copy: str, force: str) -> Callable[[F], F]:
    """Return the decorator adding the write options: dry run, check, backup, -o, symlinks, force."""

    def add(func: F) -> F:
        options = [
            click.option(
                "-n", "--dry-run", is_flag=True, help="Show the metadata diff and the write strategy; write nothing."
            ),
            click.option("--check", is_flag=True, help="Write nothing; exit 1 if any file would change."),
            click.option("--backup", is_flag=True, help="Save the old header beside the file (undo with `restore`)."),
            click.option("-o", "--output", metavar="FILE", type=click.Path(), help=f"Write {copy} here (one input)."),
            click.option("--follow-symlinks", is_flag=True, help="Write the target of a symlink (a shared blob)."),
            click.option("--force", is_flag=True, help=force),
        ]
        for option in reversed(options):  # decorators apply bottom-up; keep the help in this order
            func = option(func)
        return func

    return add


def check_output_option(console: Console, paths: Sequence[str], mode: WriteMode, verbs: Verbs = PATCH_VERBS) -> None:
    """Exit with a usage error unless ``-o`` comes with exactly one input file and without ``--backup``."""
    if mode.output is not None and (len(paths) != 1 or os.path.isdir(paths[0])):
        got = f"{len(paths)} inputs" if len(paths) != 1 else "a folder"
        usage_error(
            console,
            f"-o/--output takes exactly one input file (got {got}). "
            f"{verbs.verb} several files in place, or run once per file",
        )
    if mode.output is not None and mode.backup:
        usage_error(
            console,
            "--backup and -o/--output do not mix: -o never changes the source, so there is "
            "nothing to back up. drop --backup",
        )


def run_files(console: Console, paths: Sequence[str], mode: WriteMode, one: Callable[[str], Record]) -> NoReturn:
    """Run ``one`` on every file below ``paths``, print the summary and exit with the report's code.

    A named path that does not exist is a usage error before anything is written. Only ``--check`` makes a
    file that would change exit 1; a plain dry run exits 0.
    """
    require_paths(console, paths)
    report = Report(check=mode.check)
    targets = collect(paths, report, console)
    for index, target in enumerate(targets, 1):
        console.progress(index, len(targets), target.path)
        console.record(report.add(run_one(console, functools.partial(one, target.path), target.path)))
    summarize(console, report, paths, dry_run=mode.check)
    sys.exit(report.exit_code)


def read_for_write(console: Console, path: str, mode: WriteMode) -> Header:
    """Finish or roll back an interrupted write of ``path`` (when this run writes in place), then read its header."""
    if os.path.lexists(splice.journal_path(os.path.realpath(path))):
        if mode.writing and mode.output is None:
            # The header may be half-written: finish or roll back before reading it.
            what = splice.recover(os.path.realpath(path) if mode.follow_symlinks else path)
            if what:
                console.status(f"recovered {path}: an interrupted patch was {what}")
        else:
            console.warning(f"{path}: has an interrupted patch; run without --dry-run/--check/-o to finish it")
    return load_header(path)


def warn_findings(console: Console, path: str, findings: Iterable[Finding]) -> None:
    """Print a plan's warnings, and its errors (reached only with ``--force``), as warning lines."""
    for finding in findings:
        if finding.severity is Severity.ERROR:
            console.warning(f"{path}: {finding.message} (overridden by --force)")
        elif finding.severity is Severity.WARNING:
            console.warning(f"{path}: {finding.message}")


def apply_plan(
    console: Console,
    plan: MetadataPlan,
    record: Record,
    mode: WriteMode,
    verbs: Verbs = PATCH_VERBS,
) -> Record:
    """Write ``plan`` (or, not ``writing``, show what would be written) and fill in ``record``."""
    path, output, follow_symlinks = plan.path, mode.output, mode.follow_symlinks
    if not plan.changed and output is None:
        console.status(f"{verbs.same} {path}")
        return record
    if not mode.writing:
        if mode.dry_run:
            diff = plan.diff()
            record.details["diff"] = diff
            console.data(console.style(f"# {path}", bold=True))
            for line in diff:
                console.data(colour_diff(console, line))
        # The writer's own dry run: opened read-only, the same strategy choice and refusals as a real run.
        result = splice.write_metadata(
            path, plan.new_metadata, output=output, dry_run=True, follow_symlinks=follow_symlinks, force=mode.force
        )
        if mode.dry_run:
            console.data(console.style(f"# {layout_line(result)}", bold=True))
        record.status = Status.WOULD_PATCH
        record.strategy = result.strategy.value
        record.details["header"] = header_json(result)
        target = f" to {result.output}" if result.output else ""
        console.change(f"{verbs.would} {path}{target} ({result.strategy.value})")
        return record
    with console.copying(path, plan.header.data_len):  # drawn only if the write copies the data (-o, copy)
        result = splice.write_metadata(
            path,
            plan.new_metadata,
            output=output,
            backup=mode.backup,
            follow_symlinks=follow_symlinks,
            expected=None if output is not None else plan.header,
            force=mode.force,
        )
    if result.recovered:
        console.status(f"recovered {path}: an interrupted patch was {result.recovered}")
    record.strategy = result.strategy.value
    record.details["header"] = header_json(result)
    record.details["output"] = result.output
    record.details["backup"] = result.backup
    sizes = f"header {result.old_header_len:,} -> {result.new_header_len:,} bytes"
    if result.output and result.strategy is splice.Strategy.NONE:
        record.strategy = None
        console.status(f"{result.output} already holds this copy of {path}; left alone")
    elif result.output:
        record.status = Status.PATCHED
        what = "a patched copy" if result.changed else "an exact copy (the source is already correct)"
        console.status(f"wrote {result.output}: {what} of {path} ({result.strategy.value}, {sizes})")
    elif not result.changed:
        # Another process wrote the same metadata between our read and our lock: nothing was written.
        console.status(f"{verbs.same} {path}")
        record.strategy = None
    else:
        record.status = Status.PATCHED
        saved = ""
        if result.backup:
            kept = "earlier backup of its original header kept at" if result.backup_kept else "old header saved to"
            saved = f", {kept} {result.backup}"
        if result.lost:
            console.warning(f"{path}: the rewritten file could not keep its {', '.join(result.lost)} (--force)")
        console.status(f"{verbs.done} {path} ({result.strategy.value}, {sizes}{saved})")
    return record


def layout_line(result: splice.WriteResult) -> str:
    """Return the dry-run summary of the header change, the data alignment and the write strategy."""
    delta = result.new_header_len - result.old_header_len
    start = PREFIX_SIZE + result.new_header_len
    aligned = "8-byte aligned" if start % ALIGNMENT == 0 else "NOT 8-byte aligned"
    strategy = result.strategy.value
    note = STRATEGY_NOTES.get(strategy, "")
    if strategy == "output":
        note = f"a patched copy is written to {result.output}; the source is not changed"
    return (
        f"header {result.old_header_len:,} -> {result.new_header_len:,} bytes ({delta:+,}), "
        f"data region at offset {start:,} ({aligned}), {result.spare:,} bytes spare; "
        f"strategy: {strategy} ({note})"
    )


__all__ = [
    "STRATEGY_NOTES",
    "Verbs",
    "WriteMode",
    "apply_plan",
    "check_output_option",
    "layout_line",
    "read_for_write",
    "run_files",
    "warn_findings",
    "write_options",
]
