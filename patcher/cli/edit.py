"""What ``set`` and ``unset`` share: splitting paths from entries, and planning and writing one file's edit.

The plan comes from :mod:`patcher.edit`; the write is :func:`~patcher.cli.write.apply_plan`, the patch
command's own, so an edit gets the same strategies, journal, locks, refusals, backup, ``-o`` and records.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from ..edit import Edit, Editor, EditPlan
from ..errors import PatchError
from ..report import ExitCode, Record, Status
from .batch import fail
from .console import Console
from .render import findings_json
from .write import Verbs, WriteMode, apply_plan, check_output_option, read_for_write, run_files, warn_findings

SUFFIX = ".safetensors"
#: The fields of every ``set`` / ``unset`` record, whatever its status (``null`` where they do not apply).
EDIT_FIELDS = (
    "path",
    "status",
    "strategy",
    "changes",
    "absent",
    "verdicts",
    "header",
    "output",
    "backup",
    "diff",
    "findings",
    "error",
)
#: Help of the write options of both commands.
COPY = "an edited copy"
FORCE = (
    "Write even when the edit makes a Nunchaku loader fail; replace an existing -o file; accept a copy that "
    "cannot keep the owner or group."
)


def split_set_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Return ``set``'s arguments as (paths, ``KEY=VALUE`` entries).

    An existing file or folder is a path; otherwise an argument with ``=`` is an entry, and one without is a path
    if it ends in ``.safetensors`` (a missing file, reported as such), else an entry (refused as not KEY=VALUE).
    """
    paths = [a for a in args if os.path.lexists(a) or ("=" not in a and a.lower().endswith(SUFFIX))]
    return paths, [a for a in args if a not in paths]


def split_unset_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Return ``unset``'s arguments as (paths, keys): a name ending in ``.safetensors``, or a folder, is a path."""
    paths = [a for a in args if a.lower().endswith(SUFFIX) or os.path.isdir(a)]
    return paths, [a for a in args if a not in paths]


def _details(plan: EditPlan) -> dict[str, Any]:
    return {
        "changes": [{"key": c.key, "kind": c.kind} for c in plan.changes if c.kind != "unchanged"],
        "absent": list(plan.absent),
        "verdicts": {k: {"ok": v.ok, "reasons": list(v.reasons)} for k, v in plan.verdicts.items()},
        "header": {"old_len": plan.header.header_len, "new_len": plan.header.header_len},
        "output": None,
        "backup": None,
    }


def _edit_one(console: Console, editor: Editor, mode: WriteMode, verbs: Verbs, path: str) -> Record:
    """Plan one file's edit, then write it, or show what would be written."""
    header = read_for_write(console, path, mode)
    plan = editor.plan(path, header)
    record = Record(path, Status.UNCHANGED, details=_details(plan), findings=findings_json(plan.findings))
    for key in plan.absent:
        console.status(f"{path}: no key {key!r} to remove")
    warn_findings(console, path, plan.findings)
    return apply_plan(console, plan, record, mode, verbs)


def run_edit(
    console: Console, make_edit: Callable[[], Edit], paths: Sequence[str], mode: WriteMode, verbs: Verbs
) -> NoReturn:
    """Check the options, build the edit (a bad entry is a usage error), then edit every file below ``paths``."""
    check_output_option(console, paths, mode, verbs)
    try:
        editor = Editor(make_edit())
    except PatchError as exc:
        fail(console, exc, ExitCode.USAGE)
    run_files(console, paths, mode, functools.partial(_edit_one, console, editor, mode, verbs))


__all__ = ["COPY", "EDIT_FIELDS", "FORCE", "run_edit", "split_set_args", "split_unset_args"]
