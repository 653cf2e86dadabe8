"""Running a command over many paths: collecting files, running each one, the summary and the exit.

Every failure is one line, ``error: FILE: what is wrong (expected X, got Y). what to do``, and becomes a
``failed`` :class:`~patcher.report.Record`; the :class:`~patcher.report.Report` owns the exit code.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from typing import NoReturn

from .. import splice
from ..errors import HeaderError, LockedError, PatchError
from ..header import Header, read_header
from ..plan import PatchOptions, Planner
from ..report import ExitCode, Record, Report, Status
from .console import Console

SUFFIX = ".safetensors"
#: How long to wait for another patcher's write lease (held only while it writes a header) before giving up.
LEASE_WAIT = 2.0

#: A hint for errors raised without one, by error code: every error line should say what to do.
DEFAULT_HINTS = {
    "not-found": "check the path",
    "not-a-file": f"pass a {SUFFIX} file or a folder of them",
    "permission": "check the file's permissions",
    "io": "try again; if it keeps failing, check the disk",
}
HEADER_HINT = "the file is not valid safetensors (safetensors itself would refuse it): re-download or re-convert it"


def is_restorable(path: str) -> bool:
    """Return whether ``path`` has a backup or an interrupted patch beside it."""
    return os.path.lexists(splice.backup_path(path)) or os.path.lexists(splice.journal_path(path))


def walk(folder: str, restorable: bool) -> list[str]:
    """Return the *.safetensors files below ``folder``, sorted; hidden files and folders are skipped."""
    found: list[str] = []
    # Symlinked folders are not entered: a loop, or a shared cache, would be walked twice.
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith(".") or not name.lower().endswith(SUFFIX):
                continue
            path = os.path.join(root, name)
            if not restorable or is_restorable(path):
                found.append(path)
    return sorted(found)


def collect(paths: Iterable[str], report: Report, console: Console, *, restorable: bool = False) -> list[str]:
    """Return the files to process (folders expanded); record a failure for each path that gives none."""
    files: list[str] = []
    seen: set[str] = set()

    def fail(raw: str, error: PatchError) -> None:
        console.error(error.render())
        console.record(report.add(Record(raw, Status.FAILED, error=error)))

    for raw in paths:
        if os.path.isdir(raw):  # a symlink to a folder named on the command line is followed
            found = walk(raw, restorable)
            if not found and restorable:
                fail(
                    raw,
                    PatchError(
                        "no backup or interrupted patch below this folder",
                        path=raw,
                        code="no-backup",
                        hint="backups are made by patching with --backup",
                    ),
                )
            elif not found:
                fail(
                    raw,
                    PatchError(
                        f"no {SUFFIX} files in this folder or below it",
                        path=raw,
                        code="no-files",
                        hint=f"pass a {SUFFIX} file, or a folder that holds some",
                    ),
                )
        elif os.path.islink(raw) and not os.path.exists(raw):
            found = []
            fail(
                raw,
                PatchError(
                    "is a broken symbolic link",
                    path=raw,
                    code="not-found",
                    expected="a link to a file",
                    got=f"a link to {os.readlink(raw)}, which is missing",
                    hint="fix or remove the link",
                ),
            )
        elif not os.path.lexists(raw):
            found = []
            fail(raw, PatchError("no such file or directory", path=raw, code="not-found", hint="check the path"))
        else:
            found = [raw]
        for path in found:
            key = os.path.normpath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def with_hint(exc: PatchError) -> PatchError:
    """Give an error without a hint the usual one for its kind, so every line says what to do."""
    if not exc.hint:
        exc.hint = DEFAULT_HINTS.get(exc.code) or (HEADER_HINT if isinstance(exc, HeaderError) else None)
        exc.args = (exc.render(),)
    return exc


def run_one(console: Console, work: Callable[[], Record], path: str) -> Record:
    """Run one file's work; turn every failure into a FAILED record and one error line."""
    try:
        return work()
    except PatchError as exc:
        error = with_hint(exc.with_path(path))
        console.error(error.render())
        return Record(path, Status.FAILED, error=error)
    except (KeyboardInterrupt, SystemExit, BrokenPipeError):
        raise  # Ctrl-C, an exit, or a reader that stopped reading (`| head`): end the run, not this file
    except Exception as exc:  # a bug: still one line, the traceback only with -v
        error = PatchError(
            f"internal error: {type(exc).__name__}: {exc}",
            path=path,
            code="internal",
            hint="please report this; -v shows the traceback",
        )
        console.error(error.render())
        if console.verbose:
            import traceback  # only a bug needs it: kept off the start-up path

            traceback.print_exc()
        return Record(path, Status.FAILED, error=error)


def summarize(console: Console, report: Report, paths: Sequence[str] = (), *, dry_run: bool = False) -> None:
    """Print the summary line when it adds something: several files, a folder given, or a dry run."""
    if len(report.records) > 1 or dry_run or any(os.path.isdir(p) for p in paths):
        console.status(report.summary())


def usage_error(console: Console, message: str) -> NoReturn:
    """Print ``message`` as the run's only error line and exit with the usage code (2)."""
    console.error(message)
    sys.exit(ExitCode.USAGE)


def fail(console: Console, exc: PatchError, code: ExitCode) -> NoReturn:
    """Print ``exc`` (with its hint) as the run's only error line and exit with ``code``."""
    console.error(with_hint(exc).render())
    sys.exit(code)


def _held_by_a_writer(path: str) -> bool:
    """Return whether opening ``path`` would block: another process holds a write lease (a patch in progress)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except BlockingIOError:
        return True
    except OSError:
        return False
    os.close(fd)
    return False


def load_header(path: str) -> Header:
    """Read a header; wait out a patch in progress, and report a header torn by an interrupted one as that."""
    deadline = time.monotonic() + LEASE_WAIT
    while True:
        try:
            return read_header(path)
        except HeaderError as exc:
            # A patcher holds a write lease only while it writes the prefix: a moment, then the file is ours.
            if exc.code == "io" and _held_by_a_writer(path):
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise LockedError(
                    "another nunchaku-patch is writing this file",
                    path=path,
                    hint="wait for it to finish, then run again",
                ) from None
            if not os.path.lexists(splice.journal_path(os.path.realpath(path))):
                raise
            raise PatchError(
                "has an interrupted patch: its header is half-written (the tensor data is intact)",
                path=path,
                code="interrupted",
                hint=(
                    f"run `nunchaku-patch restore --follow-symlinks {path}` or the same patch command (with "
                    "--follow-symlinks) again to finish it"
                    if os.path.islink(path)
                    else f"run `nunchaku-patch restore {path}` or the same patch command again to finish it"
                ),
            ) from None


def make_planner(console: Console, options: PatchOptions) -> Planner:
    """Return a Planner whose option-named config is resolved; a problem with it is a usage error (exit 2)."""
    try:
        planner = Planner(options, log=console.log)
        planner.prepare()
    except PatchError as exc:
        # Options that name a config are the same for every file: a problem with them is a usage error.
        fail(console, exc, ExitCode.USAGE)
    return planner


__all__ = [
    "SUFFIX",
    "collect",
    "fail",
    "is_restorable",
    "load_header",
    "make_planner",
    "run_one",
    "summarize",
    "usage_error",
    "walk",
    "with_hint",
]
