"""Remote paths on the command line: ``hf://OWNER/REPO[@REVISION][/PATH]`` for inspect, validate, patch and merge.

Kept out of the local paths' modules: :mod:`~patcher.cli.batch` only asks :func:`expand` for the files of a remote
path and :func:`load_header` for a remote header; ``patch`` and ``merge`` hand a remote input to
:func:`patch_one` / :func:`merge_one`, which stream the fix (:mod:`patcher.hubwrite`). ``huggingface_hub`` is
imported only when a remote path is given.
"""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING, Any

from .. import progress
from ..errors import PatchError, UsageError
from ..header import Header
from ..report import Record, Status
from .console import Console
from .render import findings_json, plan_details, size

if TYPE_CHECKING:
    from ..hub import Hub
    from ..plan import Planner

SCHEME = "hf://"
_CLIENT: list[Hub] = []


def is_remote(path: str) -> bool:
    """Return whether a command-line path names a Hub file or folder."""
    return path.startswith(SCHEME)


def client() -> Hub:
    """Return the run's Hub client (``HF_ENDPOINT``, token and offline mode as huggingface_hub reads them)."""
    if not _CLIENT:
        from ..hub import Hub

        _CLIENT.append(Hub())
    return _CLIENT[0]


def expand(raw: str) -> list[str]:
    """Return the ``hf://`` paths of the safetensors files a remote path names (a file, a folder, a repo)."""
    from ..hub import SUFFIX, parse_hub_path

    where = parse_hub_path(raw)
    if where.is_file:
        return [raw]
    snapshot = client().snapshot(where)
    found = [str(where.child(f.path)) for f in snapshot.under(where.path) if f.path.lower().endswith(SUFFIX)]
    if not found:
        raise PatchError(
            f"no {SUFFIX} files in this repo folder",
            path=raw,
            code="no-files",
            hint="check the path (scan hf://OWNER/REPO lists what the repo holds)",
        )
    return found


def find_folders(raw: str) -> list[str]:
    """Return the ``hf://`` paths of the deepcompressor folders at or below a remote path (one listing)."""
    from ..hub import parse_hub_path
    from ..merge import BLOCKS_FILE, SOURCE_FILES, UNQUANTIZED_FILE

    where = parse_hub_path(raw)
    files = {f.path for f in client().snapshot(where).under(where.path)}
    folders = sorted({path.rpartition("/")[0] for path in files if path.rpartition("/")[2] in SOURCE_FILES})
    found = [
        str(where.child(folder)) if folder else str(where.child(""))
        for folder in folders
        if all((f"{folder}/{name}" if folder else name) in files for name in SOURCE_FILES)
    ]
    if not found:
        raise PatchError(
            "no deepcompressor output folder here",
            path=raw,
            code="no-folders",
            expected=f"a folder holding {BLOCKS_FILE} and {UNQUANTIZED_FILE}",
            hint="scan hf://OWNER/REPO lists what the repo holds",
        )
    return found


def load_header(path: str) -> Header:
    """Read a remote file's header (the prefix and the header bytes, nothing else)."""
    from ..hub import parse_hub_path

    return client().read_header(parse_hub_path(path)).header


# --------------------------------------------------------------------------------------------
# A byte progress bar for downloads (stderr, on a terminal only)


class ByteProgress:
    """Feed :func:`patcher.hubwrite.stream_into`'s ``(done, total)`` reports to the shared byte bar.

    The bar is :mod:`patcher.progress`'s, as for local copies: drawn only when stderr is a terminal and without
    ``-q`` (colour settings play no part). A resumed download starts the bar at the bytes already on disk.
    """

    def __init__(self, console: Console, label: str) -> None:
        isatty = getattr(sys.stderr, "isatty", None)
        self.enabled = not console.quiet and bool(isatty and isatty())
        self.label = label
        self.bar: progress.ByteProgress | None = None

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled:
            return
        if self.bar is None:
            self.bar = progress.ByteProgress(self.label, total, sys.stderr)
        self.bar.advance(done - self.bar.done)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------------------------
# patch hf://... -o OUT


def _output_for(output: str | None, name: str, raw: str) -> str:
    if output is None:
        raise UsageError(
            "a Hub file cannot be patched in place",
            path=raw,
            hint=f"write a patched copy with -o, e.g. -o {name}",
        )
    return os.path.join(output, name) if os.path.isdir(output) else output


def patch_one(
    console: Console, planner: Planner, raw: str, *, output: str | None, writing: bool, force: bool = False
) -> Record:
    """Plan a remote file like a local one, then stream the patched copy to ``output`` (dry run: plan only)."""
    from ..hub import parse_hub_path
    from ..hubwrite import plan_patch_stream, stream_into

    hub = client()
    where = parse_hub_path(raw)
    dest = _output_for(output, where.name, raw)
    remote = hub.read_header(where)
    plan = planner.plan(raw, remote.header)
    prefix, streams, expected = plan_patch_stream(remote, plan.new_metadata, dest)
    details = plan_details(plan)
    details.update(
        header={
            "old_len": remote.header.header_len,
            "new_len": expected.header_len,
            "spare": expected.padding,
            "data_offset": expected.data_start,
            "aligned": expected.aligned,
        },
        output=dest,
        backup=None,
        commit=remote.commit,
        sha256=remote.sha256,
    )
    record = Record(raw, Status.WOULD_PATCH, strategy="stream", details=details, findings=findings_json(plan.findings))
    if not writing:
        console.status(f"would write {dest}: a patched copy of {raw} ({size(expected.file_size)} to download)")
        return record
    bar = ByteProgress(console, where.name)
    try:
        result = stream_into(dest, prefix, streams, expected, hub=hub, progress=bar, force=force)
    finally:
        bar.close()
    resumed = f", resumed after {size(result.resumed)}" if result.resumed else ""
    checked = "sha256 checked" if result.verified else "no hash reported by the Hub: bytes not checked"
    console.status(f"wrote {dest}: a patched copy of {raw} ({size(result.received)} downloaded{resumed}; {checked})")
    record.status = Status.PATCHED
    record.details.update(received=result.received, resumed=result.resumed, verified=bool(result.verified))
    return record


# --------------------------------------------------------------------------------------------
# merge hf://OWNER/REPO[/FOLDER] [-o OUT]


def merge_one(
    console: Console, planner: Planner, raw: str, *, output: str | None, dry_run: bool, force: bool
) -> Record:
    """Merge a deepcompressor folder of a Hub repo into one local file, streaming both halves."""
    from ..hub import parse_hub_path
    from ..hubwrite import plan_merge_stream, stream_into

    hub = client()
    where = parse_hub_path(raw)

    def place(name: str) -> str:
        if output is None:
            return name
        return os.path.join(output, name) if os.path.isdir(output) or output.endswith(("/", os.sep)) else output

    plan, streams, expected = plan_merge_stream(hub, where, planner, place)
    details: dict[str, Any] = {
        "output": plan.output,
        "family": plan.patch.family.value,
        "precision": plan.patch.precision,
        "rank": plan.patch.rank,
        "model": plan.patch.model_name,
        "folder_configs": list(plan.folder_configs),
        "tensors": len(plan.tensors),
        "file_size": plan.file_size,
        "metadata_keys": list(plan.metadata),
        "backup": None,
        "header": None,
    }
    record = Record(
        raw, Status.WOULD_PATCH, strategy="merge", details=details, findings=findings_json(plan.patch.findings)
    )
    # The -o rules of every output, before anything is downloaded (a dry run reports the refusal too).
    from ..splice import check_output_target

    check_output_target(plan.output, force=force)
    if dry_run:
        console.status(f"would merge {raw} -> {plan.output} ({size(plan.data_len)} to download)")
        return record
    bar = ByteProgress(console, where.name)
    try:
        result = stream_into(plan.output, plan.prefix, streams, expected, hub=hub, progress=bar, force=force)
    finally:
        bar.close()
    resumed = f", resumed after {size(result.resumed)}" if result.resumed else ""
    console.status(
        f"merged {raw} -> {plan.output} ({len(plan.tensors):,} tensors, {size(result.received)} downloaded{resumed})"
    )
    record.status = Status.PATCHED
    record.details.update(received=result.received, resumed=result.resumed, verified=len(result.verified) == 2)
    return record


__all__ = ["ByteProgress", "client", "expand", "find_folders", "is_remote", "load_header", "merge_one", "patch_one"]
