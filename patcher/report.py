"""Per-file outcomes of a run, the summary line, and the one place that maps them to exit codes."""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import field
from typing import Any

from ._record import dataclass
from .errors import PatchError, UsageError


class ExitCode(enum.IntEnum):
    """The exit codes of ``nunchaku-patch`` (documented in README.md)."""

    OK = 0
    #: ``--check`` found a file that would change, or ``validate`` found a file that needs work.
    NEEDS_WORK = 1
    #: Bad options or arguments (click uses 2 for its own usage errors too).
    USAGE = 2
    #: At least one file failed (bad input, refused write, I/O error).
    FAILED = 3
    #: Stopped by Ctrl-C (128 + SIGINT, the shell convention).
    INTERRUPTED = 130
    #: The reader of stdout went away (``| head``): 128 + SIGPIPE, as if the signal had ended the process.
    PIPE_CLOSED = 141


class Status(str, enum.Enum):
    """What happened to one file."""

    PATCHED = "patched"
    WOULD_PATCH = "would patch"
    #: A deepcompressor output folder merged into one file (``merge``, or a folder met by a batch).
    MERGED = "merged"
    WOULD_MERGE = "would merge"
    UNCHANGED = "already correct"
    VALID = "valid"
    INVALID = "needs work"
    RESTORED = "restored"
    INSPECTED = "inspected"
    #: Left alone on purpose: a file a folder walk met that is no SVDQuant conversion, a folder with --no-merge.
    SKIPPED = "skipped"
    #: ``restore`` found nothing to put back.
    NOTHING = "nothing to restore"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


#: The order statuses appear in the summary line.
_SUMMARY_ORDER = (
    Status.PATCHED,
    Status.MERGED,
    Status.WOULD_PATCH,
    Status.WOULD_MERGE,
    Status.RESTORED,
    Status.UNCHANGED,
    Status.VALID,
    Status.INVALID,
    Status.INSPECTED,
    Status.SKIPPED,
    Status.NOTHING,
    Status.FAILED,
)
#: The statuses that mean "this would change" (``--check`` exits 1 on them).
WOULD_CHANGE = frozenset({Status.WOULD_PATCH, Status.WOULD_MERGE})


def exit_code_for(error: BaseException) -> ExitCode:
    """Map an exception to the exit code it causes (usage problems vs failed files)."""
    if isinstance(error, UsageError):
        return ExitCode.USAGE
    if isinstance(error, KeyboardInterrupt):
        return ExitCode.INTERRUPTED
    return ExitCode.FAILED


def error_json(error: PatchError) -> dict[str, Any]:
    """Return the ``--json`` form of an error: its code, the one-line message, and its parts."""
    return {
        "code": error.code,
        "message": error.render(),
        "expected": None if error.expected is None else str(error.expected),
        "got": None if error.got is None else str(error.got),
        "hint": error.hint,
    }


@dataclass
class Record:
    """One file's outcome, also the ``--json`` record."""

    path: str
    status: Status
    #: The write strategy used (or that would be used): ``fit``, ``insert``, ``copy``, ``output``.
    strategy: str | None = None
    #: Command-specific fields (inferred facts, header sizes, verdicts...), merged into the JSON record.
    details: dict[str, Any] = field(default_factory=dict)
    #: Findings about the file (config checks, loader contract), each ``{severity, code, message, scope}``.
    findings: list[dict[str, Any]] = field(default_factory=list)
    error: PatchError | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the machine-readable form: ``path``, ``status``, ``strategy``, details, ``findings``, ``error``."""
        out: dict[str, Any] = {"path": self.path, "status": self.status.value, "strategy": self.strategy}
        out.update(self.details)
        # Callers that put findings in ``details`` (the merge command) keep them.
        out["findings"] = list(self.findings) if self.findings else list(self.details.get("findings", []))
        out["error"] = error_json(self.error) if self.error is not None else None
        return out


@dataclass
class Report:
    """Count outcomes over a run and own the exit code (like black's Report).

    ``check``: whether files that would change count as needing work (exit 1). ``patch`` sets it only for
    ``--check``, so a plain ``--dry-run`` exits 0.
    """

    check: bool = True
    records: list[Record] = field(default_factory=list)

    def add(self, record: Record) -> Record:
        """Record one file's outcome and return it."""
        self.records.append(record)
        return record

    @property
    def counts(self) -> Counter[Status]:
        """Return how many files ended in each status."""
        return Counter(r.status for r in self.records)

    @property
    def exit_code(self) -> ExitCode:
        """Return FAILED if any file failed, else NEEDS_WORK if any needs work, else OK."""
        statuses = {r.status for r in self.records}
        if Status.FAILED in statuses:
            return ExitCode.FAILED
        if Status.INVALID in statuses or (self.check and statuses & WOULD_CHANGE):
            return ExitCode.NEEDS_WORK
        return ExitCode.OK

    def summary(self) -> str:
        """Return a line like ``3 patched, 12 already correct, 1 failed``."""
        counts = self.counts
        parts = [f"{counts[s]} {s.value}" for s in _SUMMARY_ORDER if counts[s]]
        return ", ".join(parts) if parts else "no files"


__all__ = ["WOULD_CHANGE", "ExitCode", "Record", "Report", "Status", "error_json", "exit_code_for"]
