"""The pieces of ``--json`` records and of human output that several commands share."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..facts import Finding
from ..header import ALIGNMENT, PREFIX_SIZE
from ..splice import WriteResult


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


def size(n: int) -> str:
    """Return a byte count for people: ``512 B``, ``3.2 MiB``, ``6.7 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # unreachable: the loop returns at GiB


__all__ = ["findings_json", "header_json", "plural", "size"]
