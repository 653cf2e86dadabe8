"""Per-file outcomes of a run, the summary line, and the one place that maps them to exit codes."""

from __future__ import annotations

import enum
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

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


class Status(str, enum.Enum):
    """What happened to one file."""

    PATCHED = "patched"
    WOULD_PATCH = "would patch"
    UNCHANGED = "already correct"
    VALID = "valid"
    INVALID = "needs work"
    RESTORED = "restored"
    INSPECTED = "inspected"
    FAILED = "failed"

    def __str__(self) -> str:
        return self.value


#: Statuses that make ``--check`` / ``validate`` exit with NEEDS_WORK.
_NEEDS_WORK = frozenset({Status.WOULD_PATCH, Status.INVALID})


def exit_code_for(error: BaseException) -> ExitCode:
    """Map an exception to the exit code it causes (usage problems vs failed files)."""
    if isinstance(error, UsageError):
        return ExitCode.USAGE
    return ExitCode.FAILED


@dataclass
class Record:
    """One file's outcome, also the ``--json`` record."""

    path: str
    status: Status
    strategy: str | None = None
    message: str = ""
    details: dict[str, Any] = field(default_factory=dict)
    error: PatchError | None = None

    def to_json(self) -> dict[str, Any]:
        """Return the machine-readable form (stable keys)."""
        out: dict[str, Any] = {"path": self.path, "status": self.status.value, "strategy": self.strategy}
        out.update(self.details)
        out["error"] = (
            {"code": self.error.code, "message": self.error.render()} if self.error is not None else None
        )
        return out


@dataclass
class Report:
    """Counts outcomes over a run and owns the exit code (like black's Report)."""

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
        if statuses & _NEEDS_WORK:
            return ExitCode.NEEDS_WORK
        return ExitCode.OK

    def summary(self) -> str:
        """Return a line like ``3 patched, 12 already correct, 1 failed``."""
        counts = self.counts
        order = [
            Status.PATCHED,
            Status.WOULD_PATCH,
            Status.RESTORED,
            Status.UNCHANGED,
            Status.VALID,
            Status.INVALID,
            Status.INSPECTED,
            Status.FAILED,
        ]
        parts = [f"{counts[s]} {s.value}" for s in order if counts[s]]
        if not parts:
            return "no files"
        return ", ".join(parts)
