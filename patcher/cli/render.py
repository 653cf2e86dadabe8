"""The pieces of ``--json`` records and of human output that several commands share."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..facts import Finding
from ..header import ALIGNMENT, PREFIX_SIZE
from ..splice import WriteResult
from ..tensors import human_size
from .console import Console


def findings_json(findings: Iterable[Finding]) -> list[dict[str, Any]]:
    """Return findings as ``--json`` objects: ``{severity, code, message, scope}``."""
    return [{"severity": f.severity.value, "code": f.code, "message": f.message, "scope": f.scope} for f in findings]


def header_json(result: WriteResult) -> dict[str, Any]:
    """Return the ``header`` field of a record: old and new lengths, spare bytes, where the data starts."""
    start = PREFIX_SIZE + result.new_header_len
    return {
        "old_len": result.old_header_len,
        "new_len": result.new_header_len,
        "spare": result.spare,
        "data_offset": start,
        "aligned": start % ALIGNMENT == 0,
    }


def plural(n: int, word: str) -> str:
    """Return ``1 warning`` / ``3 warnings``."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


#: A byte count for people: ``512 B``, ``3.2 MiB``, ``6.7 GiB``.
size = human_size


def colour_diff(console: Console, line: str) -> str:
    """Return a diff line coloured for the terminal (headers bold, additions green, removals red)."""
    if line.startswith(("+++", "---")):
        return console.style(line, bold=True)
    if line.startswith("+"):
        return console.style(line, fg="green")
    if line.startswith("-"):
        return console.style(line, fg="red")
    if line.startswith("@@"):
        return console.style(line, fg="cyan")
    return line


__all__ = ["colour_diff", "findings_json", "header_json", "plural", "size"]
