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
from .._record import dataclass
from ..errors import HeaderError, LockedError, PatchError
from ..facts import BLOCKS_FILE, UNQUANTIZED_FILE
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
#: Paths starting with this name Hub files (handled by :mod:`patcher.cli.remote`, imported only then).
REMOTE = "hf://"
HEADER_HINT = "the file is not valid safetensors (safetensors itself would refuse it): re-download or re-convert it"


@dataclass(frozen=True)
class Target:
    """One thing a command works on: a file, or a deepcompressor output folder handled as one unit."""

    path: str
    #: A folder holding ``transformer_blocks.safetensors`` and ``unquantized_layers.safetensors``.
    pair: bool = False
    #: Found by walking a folder named on the command line (not named itself).
    walked: bool = False


def is_restorable(path: str) -> bool:
    """Return whether ``path`` has a backup or an interrupted patch beside it."""
    return os.path.lexists(splice.backup_path(path)) or os.path.lexists(splice.journal_path(path))


def is_pair_folder(folder: str) -> bool:
    """Return whether ``folder`` holds both files of a deepcompressor conversion."""
    return all(os.path.isfile(os.path.join(folder, name)) for name in (BLOCKS_FILE, UNQUANTIZED_FILE))


def walk(folder: str, restorable: bool, *, pairs: bool = False) -> list[Target]:
    """Return the *.safetensors files below ``folder``, sorted; hidden files and folders are skipped.

    ``pairs``: a folder holding deepcompressor's two files is one target, and its two files are not listed.
    """
    found: list[Target] = []
    # Symlinked folders are not entered: a loop, or a shared cache, would be walked twice.
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        pair = pairs and is_pair_folder(root)
        if pair:
            found.append(Target(root, pair=True, walked=root != folder))
        for name in names:
            if name.startswith(".") or not name.lower().endswith(SUFFIX):
                continue
            if pair and name in (BLOCKS_FILE, UNQUANTIZED_FILE):
                continue
            path = os.path.join(root, name)
            if not restorable or is_restorable(path):
                found.append(Target(path, walked=True))
    return sorted(found, key=lambda target: target.path)


def collect(
    paths: Iterable[str], report: Report, console: Console, *, restorable: bool = False, pairs: bool = False
) -> list[Target]:
    """Return the targets to process (folders expanded); record a failure for each path that gives none.

    ``pairs``: deepcompressor output folders are targets of their own (see :func:`walk`).
    """
    targets: list[Target] = []
    seen: set[str] = set()

    def fail(raw: str, error: PatchError) -> None:
        console.error(error.render())
        console.record(report.add(Record(raw, Status.FAILED, error=error)))

    for raw in paths:
        if raw.startswith(REMOTE):  # hf://OWNER/REPO[@REVISION][/PATH]: a Hub file, folder or repo
            from .remote import expand

            found = []
            try:
                if restorable:
                    fail(raw, PatchError("a Hub file has no backup to restore", path=raw, code="remote"))
                else:
                    found = [Target(path, walked=path != raw) for path in expand(raw)]
            except PatchError as exc:
                fail(raw, exc)
        elif os.path.isdir(raw):  # a symlink to a folder named on the command line is followed
            found = walk(raw, restorable, pairs=pairs)
            if not found and restorable:
                console.status(f"nothing to restore in {raw}: no backup or interrupted patch below it")
                console.record(report.add(Record(raw, Status.NOTHING)))
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
            found = [Target(raw)]
        for target in found:
            key = os.path.normpath(target.path)
            if key not in seen:
                seen.add(key)
                targets.append(target)
    return targets


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
        console.summary(report.summary())


def output_key(path: str) -> str:
    """Return how paths are compared as outputs: absolute, and case-folded where the filesystem folds case."""
    return os.path.normcase(os.path.abspath(path))


#: How the help and errors show several deepcompressor YAMLs: one option each.
YAML_FORM = "--config-yaml model.yaml --config-yaml svdquant.yaml"


def require_paths(console: Console, paths: Iterable[str]) -> None:
    """Exit with a usage error (2), before anything is read or written, when a named path is wrong.

    A path that does not exist, or a YAML where a model file is expected (``--config-yaml a.yaml b.yaml``
    would otherwise patch ``b.yaml``... and the files after it without the YAML's checks).
    """
    for raw in paths:
        if raw.startswith(REMOTE):
            continue  # a Hub path: checked when it is listed or read
        if raw.lower().endswith((".yaml", ".yml")):
            usage_error(
                console,
                f"{raw}: is a YAML file where a {SUFFIX} file or folder is expected. "
                f"give each deepcompressor YAML its own --config-yaml: {YAML_FORM}",
            )
        if not os.path.lexists(raw):
            usage_error(console, f"{raw}: no such file or directory. check the path; nothing was changed")


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
    if path.startswith(REMOTE):
        from .remote import load_header as load_remote

        return load_remote(path)
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
    "Target",
    "collect",
    "fail",
    "is_pair_folder",
    "is_restorable",
    "load_header",
    "make_planner",
    "output_key",
    "require_paths",
    "run_one",
    "summarize",
    "usage_error",
    "walk",
    "with_hint",
]
