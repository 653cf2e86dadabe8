"""Backups of the original header (``--backup``) and ``restore``.

A backup is the file's first ``8 + N`` bytes before its first patch, saved as ``FILE.npatch-backup``. It is
trusted, like a journal, only if it is a regular file owned by the file's owner or by us and not writable by group
or others. A backup of this file's earlier state (the same tensor table) is kept across later patches; one that
belongs to another file is never silently kept: the patch is refused, so ``--backup`` never patches without a
backup that restores this file.
"""

from __future__ import annotations

import dataclasses
import os
from typing import TYPE_CHECKING

from . import _files as files
from . import journal as jn
from .errors import HeaderError, WriteError
from .header import (
    MAX_HEADER_LEN,
    PREFIX_SIZE,
    Header,
    pack_prefix,
    parse_header,
    parse_length_prefix,
    read_header,
    same_tensors,
)

if TYPE_CHECKING:
    from .splice import WriteResult

_BACKUP_LIMIT = PREFIX_SIZE + MAX_HEADER_LEN


def read_backup(saved: str, owner: os.stat_result) -> Header | None:
    """Return the header saved in ``saved`` (``None`` if there is none); refuse an untrusted or damaged one."""
    blob = files.read_trusted(saved, owner, "backup", limit=_BACKUP_LIMIT)
    if blob is None:
        return None
    try:
        n = parse_length_prefix(blob[:PREFIX_SIZE], len(blob), source=saved)
        if len(blob) != PREFIX_SIZE + n:
            raise HeaderError("backup has bytes after its header", path=saved)
        return parse_header(blob[PREFIX_SIZE:], None, source=saved)
    except HeaderError as exc:
        raise WriteError(
            f"the backup is damaged ({exc.message})",
            path=saved,
            code="bad-backup",
            hint="it cannot be restored; move it away to patch with --backup",
        ) from None


def save_backup(path: str, header: Header, st: os.stat_result, *, sync_dir: bool = True) -> tuple[str, bool]:
    """Make sure a backup restoring ``path`` exists; return its name and whether it was already there (kept).

    A new backup is written through a flushed temp file and a rename, then read back and compared. ``sync_dir``
    False leaves the flush of its directory entry to the journal written next to it at once.
    """
    saved = files.backup_path(path)
    existing = read_backup(saved, st)
    if existing is not None:
        if same_tensors(existing.tensors, header.tensors):
            return saved, True  # the original of an earlier patch: the one worth keeping
        raise WriteError(
            "a backup of another file is in the way (its tensor table is not this file's)",
            path=path,
            code="bad-backup",
            got=saved,
            hint=f"move {saved} away (it may hold another file's original header) and run again, or drop --backup",
        )
    prefix = pack_prefix(header.raw)
    files.atomic_write(saved, prefix, os.path.basename(path), sync_dir=sync_dir)
    if files.read_trusted(saved, st, "backup", limit=_BACKUP_LIMIT) != prefix:
        raise WriteError("the backup read back differs from the header", path=saved, code="verify")
    return saved, False


def restore(path: str | os.PathLike[str], *, follow_symlinks: bool = False, wait: float = 0.0) -> WriteResult:
    """Finish an interrupted patch, then put back the metadata saved by ``backup=True`` and drop the backup."""
    from .splice import Strategy, WriteResult, write_metadata  # splice writes; this module only decides

    name = os.fspath(path)
    target = os.path.realpath(name) if follow_symlinks else name
    recovered = jn.recover(target, wait=wait)
    saved = files.backup_path(target)
    try:
        st = os.stat(target)
    except OSError as exc:
        raise files.os_error(exc, target, "cannot restore") from None
    original = read_backup(saved, st)
    if original is None:
        if recovered is None:
            raise WriteError(
                "there is no backup to restore",
                path=target,
                code="no-backup",
                expected=saved,
                hint="backups are made by patching with --backup",
            )
        header = read_header(target)
        return WriteResult(
            path=target,
            changed=recovered == "finished",
            strategy=Strategy.NONE,
            old_header_len=header.header_len,
            new_header_len=header.header_len,
            spare=header.padding,
            recovered=recovered,
        )
    current = read_header(target)
    if not same_tensors(original.tensors, current.tensors):
        raise WriteError(
            "the backup does not belong to this file (the tensor tables differ)",
            path=target,
            code="bad-backup",
            hint=f"{saved} may hold another file's original header; move it away if it is stale",
        )
    result = write_metadata(target, original.metadata, follow_symlinks=follow_symlinks, wait=wait)
    try:
        files.remove(saved)
    except OSError as exc:
        raise files.os_error(exc, saved, "restored, but cannot remove the backup") from None
    return dataclasses.replace(result, recovered=recovered or result.recovered, backup=saved)


__all__ = ["read_backup", "restore", "save_backup"]
