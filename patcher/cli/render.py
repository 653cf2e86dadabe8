"""The pieces of ``--json`` records and of human output that several commands share."""

from __future__ import annotations

import os
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..facts import Finding
from ..header import ALIGNMENT, PREFIX_SIZE
from ..plan import PatchPlan, inference_json
from ..splice import WriteResult
from .console import Console

if TYPE_CHECKING:
    from .. import contract

#: The fields of every ``--json`` record of ``patch`` and ``merge``, whatever its status (``null`` where n/a).
WRITE_FIELDS = (
    "path",
    "status",
    "strategy",
    "model",
    "config_source",
    "family",
    "precision",
    "rank",
    "inferred",
    "changes",
    "header",
    "output",
    "backup",
    "diff",
    "merge",
    "findings",
    "error",
)
#: The fields of every ``validate`` record.
VALIDATE_FIELDS = ("path", "status", "strategy", "family", "verdicts", "checks", "output", "fix", "findings", "error")
#: The fields of every ``restore`` record.
RESTORE_FIELDS = ("path", "status", "strategy", "header", "backup", "recovered", "findings", "error")


def findings_json(findings: Iterable[Finding]) -> list[dict[str, Any]]:
    """Return findings as ``--json`` objects: ``{severity, code, message, scope}``."""
    return [{"severity": f.severity.value, "code": f.code, "message": f.message, "scope": f.scope} for f in findings]


def header_json_of(old_len: int | None, new_len: int, spare: int) -> dict[str, Any]:
    """Return the ``header`` field of a record: old and new lengths, spare bytes, where the data starts."""
    start = PREFIX_SIZE + new_len
    return {
        "old_len": old_len,
        "new_len": new_len,
        "spare": spare,
        "data_offset": start,
        "aligned": start % ALIGNMENT == 0,
    }


def header_json(result: WriteResult) -> dict[str, Any]:
    """Return the ``header`` field of a record after (or for) a write."""
    return header_json_of(result.old_header_len, result.new_header_len, result.spare)


def plan_details(plan: PatchPlan) -> dict[str, Any]:
    """Return what a patch plan contributes to a record (the header as it is: nothing written yet)."""
    return {
        "model": plan.model_name,
        "config_source": plan.config_source,
        "family": plan.family.value,
        "precision": plan.precision,
        "rank": plan.rank,
        "inferred": inference_json(plan.inference),
        "changes": [{"key": c.key, "kind": c.kind} for c in plan.changes if c.kind != "unchanged"],
        "header": header_json_of(plan.header.header_len, plan.header.header_len, plan.header.padding),
    }


def plural(n: int, word: str) -> str:
    """Return ``1 warning`` / ``3 warnings``."""
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def size(n: int) -> str:
    """Return a byte count for people: ``512 B``, ``3.2 MiB``, ``6.7 GiB`` (the tensors module's wording)."""
    from ..tensors import human_size  # not on the patch path, which never prints a size

    return human_size(n)


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


def quote(text: str) -> str:
    """Quote ``text`` for a shell command shown to the user (shlex is imported only when one is shown)."""
    import shlex

    return shlex.quote(text)


def fix_command(path: str, result: contract.Report) -> str:
    """Return the command line that fixes ``path`` (or what to do when no command can)."""
    from ..plan import half_file_fix

    if result.by_code("missing-unquantized"):
        return half_file_fix(path)
    quoted = quote(path)
    if os.path.islink(path):
        # A Hugging Face cache entry links to a shared blob: write a patched copy instead.
        name = quote(os.path.basename(path))
        return f"nunchaku-patch {quoted} -o {name} (a patched copy here; the link and its blob stay as they are)"
    return f"nunchaku-patch {quoted}"


__all__ = [
    "RESTORE_FIELDS",
    "VALIDATE_FIELDS",
    "WRITE_FIELDS",
    "colour_diff",
    "findings_json",
    "fix_command",
    "header_json",
    "header_json_of",
    "plan_details",
    "plural",
    "size",
]
