"""deepcompressor output folders as one unit: planned, shown, merged, validated (``merge``, ``patch``, ``validate``).

Imported only when a command meets such a folder, so ``nunchaku-patch FILE`` never loads the merge code.
"""

from __future__ import annotations

import os
import shlex
from typing import Any

from .. import merge
from ..contract import validate_metadata
from ..errors import HeaderError, PatchError, WriteError
from ..facts import BLOCKS_FILE, UNQUANTIZED_FILE, Severity
from ..header import read_header
from ..inspect import infer
from ..metadata import diff_metadata
from ..plan import PatchOptions, Planner
from ..report import Record, Status
from .batch import output_key
from .console import Console
from .render import findings_json, header_json_of, plan_details, size

#: The strategy named in records: the data regions are copied, never decoded.
STRATEGY = "merge"


def merge_command_line(folder: str) -> str:
    """Return the command that merges ``folder``."""
    return f"nunchaku-patch merge {shlex.quote(folder)}"


def describe_pair() -> str:
    """Return what a deepcompressor output folder holds, for notes."""
    return f"a deepcompressor output folder ({BLOCKS_FILE} + {UNQUANTIZED_FILE})"


def merge_details(plan: merge.MergePlan) -> dict[str, Any]:
    """Return the ``merge`` object of a record: the sources, the merged table and file."""
    blocks, unquantized = plan.sources
    return {
        "folder_configs": list(plan.folder_configs),
        "tensors": {
            blocks.name: len(blocks.header.tensors),
            unquantized.name: len(unquantized.header.tensors),
            "total": len(plan.tensors),
        },
        "data_len": plan.data_len,
        "file_size": plan.file_size,
        "metadata_keys": list(plan.metadata),
        "warnings": list(plan.warnings),
    }


def _record(plan: merge.MergePlan) -> Record:
    details = plan_details(plan.patch)
    details.pop("inferred", None)  # the merged table's facts are in "merge"; the sources are two files
    details["inferred"] = None
    details["changes"] = [{"key": key, "kind": "added"} for key in plan.metadata]
    details["header"] = header_json_of(None, plan.header_len, plan.header_len - len(plan.header_bytes.rstrip(b" ")))
    details["output"] = plan.output
    details["merge"] = merge_details(plan)
    return Record(plan.folder, Status.UNCHANGED, strategy=STRATEGY, details=details)


def show_plan(console: Console, plan: merge.MergePlan) -> None:
    """Print what a merge would write (dry run): output name, tensor counts, sizes, metadata keys."""
    console.data(f"# {plan.folder} -> {plan.output}")
    for source in plan.sources:
        head = source.header
        console.data(f"#   {source.name}: {len(head.tensors):,} tensors, {size(head.data_len)}")
    console.data(
        f"#   merged: {len(plan.tensors):,} tensors, header {plan.header_len:,} bytes, "
        f"file {size(plan.file_size)} ({plan.file_size:,} bytes)"
    )
    console.data(f"#   metadata: {', '.join(plan.metadata)}")
    if console.verbose:
        for line in diff_metadata(None, plan.metadata):
            console.data(line)


def loadable_merge(plan: merge.MergePlan) -> bool:
    """Return whether the output exists and is a loadable merge of this folder (same tensors, metadata ok).

    An output written by another tool (nunchaku's merge_safetensors) differs from ours byte for byte, yet is
    already what the folder should become.
    """
    try:
        header = read_header(plan.output)
    except (HeaderError, PatchError, OSError):
        return False
    if set(header.tensors) != set(plan.tensors):
        return False
    return validate_metadata(header.metadata, infer(header)).ok


def already_merged(plan: merge.MergePlan, *, force: bool = False) -> bool:
    """Return whether the output already holds this merge (or a loadable one); raise as a real merge would."""
    try:
        return merge.check_output(plan, force=force) and not force
    except WriteError as exc:
        if exc.code == "exists" and loadable_merge(plan):
            return True
        raise


def merge_one(
    console: Console,
    planner: Planner,
    folder: str,
    *,
    output: str | None,
    dry_run: bool,
    force: bool,
    claimed: dict[str, str],
    show: bool = True,
) -> Record:
    """Plan, then merge ``folder`` (or show what would be written); ``claimed``: outputs of this run, by key.

    ``show``: print the plan on a dry run (``merge --dry-run``, ``patch --dry-run``; not ``--check``).
    """
    plan = merge.plan_merge(folder, planner, output=output)
    record = _record(plan)
    record.findings = findings_json(plan.patch.findings)
    for warning in plan.warnings:
        console.warning(f"{plan.folder}: {warning}")
    for finding in plan.patch.findings:
        if finding.severity is Severity.ERROR:  # only reached with --force
            console.warning(f"{plan.folder}: {finding.message} (written anyway: --force)")
        elif finding.severity is Severity.WARNING:
            console.warning(f"{plan.folder}: {finding.message}")
    key = output_key(plan.output)
    if key in claimed:
        raise PatchError(
            f"the output {plan.output} is also where {claimed[key]} is merged in this run",
            path=plan.folder,
            code="output-clash",
            hint="merge the folders one at a time with -o FILE",
        )
    claimed[key] = plan.folder
    if dry_run:
        if show:
            show_plan(console, plan)
        # The same refusals as a real run (an existing, different output without --force), read-only.
        if os.path.isdir(os.path.dirname(plan.output) or ".") and already_merged(plan, force=force):
            console.status(f"already merged {plan.folder} ({plan.output} holds this merge)")
            return record
        console.change(f"would merge {plan.folder} -> {plan.output}")
        record.status = Status.WOULD_MERGE
        return record
    if already_merged(plan, force=force):
        console.status(f"already merged {plan.folder} ({plan.output} holds this merge)")
        return record
    with console.copying(plan.output, sum(source.header.data_len for source in plan.sources)):
        result = merge.write_merge(plan, force=force)
    if result.status == "unchanged":
        console.status(f"already merged {plan.folder} ({result.output} holds exactly this merge)")
        return record
    console.status(f"merged {plan.folder} -> {result.output} ({len(plan.tensors):,} tensors, {size(plan.file_size)})")
    record.status = Status.MERGED
    return record


def validate_folder(folder: str, claimed: dict[str, str]) -> tuple[Record, list[str]]:
    """Validate a deepcompressor output folder: ``valid`` when already merged, else ``needs work`` with the fix.

    Returns the record and the lines to print under ``FOLDER: ...``.
    """
    fix = merge_command_line(folder)
    details: dict[str, Any] = {"family": None, "verdicts": {}, "checks": [], "output": None, "fix": fix}
    try:
        plan = merge.plan_merge(folder, Planner(PatchOptions(), log=lambda _line: None))
    except PatchError as exc:
        # Still a folder to merge: say what the merge will need (a --model, a missing file...).
        details["fix"] = fix if exc.code != "incomplete-folder" else None
        lines = [f"  error: {describe_pair()} must be merged into one file; planning it says: {exc.message}"]
        hint = f"{fix} (and {exc.hint})" if exc.hint and details["fix"] else (exc.hint or fix)
        return Record(folder, Status.INVALID, details=details), [*lines, f"  fix: {hint}"]
    details["family"] = plan.patch.family.value
    details["output"] = plan.output
    if os.path.lexists(plan.output) and (not _raises(plan) or loadable_merge(plan)):
        claimed[output_key(plan.output)] = folder
        details["fix"] = None
        return Record(folder, Status.VALID, details=details), [f"  merged into {plan.output}"]
    lines = [
        f"  error: {describe_pair()}: no loader reads it any more (Nunchaku >= 0.3 and ComfyUI-nunchaku >= 1.0 "
        "load one file); merge it",
        f"  fix: {fix}",
    ]
    return Record(folder, Status.INVALID, details=details), lines


def _raises(plan: merge.MergePlan) -> bool:
    """Return True unless the output holds exactly this merge (read-only)."""
    try:
        return not merge.check_output(plan)
    except (PatchError, OSError):
        return True


__all__ = [
    "STRATEGY",
    "already_merged",
    "describe_pair",
    "loadable_merge",
    "merge_command_line",
    "merge_details",
    "merge_one",
    "show_plan",
    "validate_folder",
]
