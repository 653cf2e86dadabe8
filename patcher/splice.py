"""Write a new safetensors header onto an untouched data region, or leave the file exactly as it was.

The strategy is chosen once per file (:func:`plan_write`, pure) and carried out by :func:`write_metadata`:

* ``fit``: the new JSON fits in the old header length: pad it with spaces and rewrite the prefix in place.
* ``insert`` (Linux, ext4/XFS): ``fallocate(FALLOC_FL_INSERT_RANGE)`` adds whole filesystem blocks at offset 0,
  then the longer prefix is written over them; the data region is never read or written.
* Both only while we hold a write lease, the kernel's proof that no other process has the file open or mapped (a
  running ComfyUI); without one the file is copied.
* ``copy``: a temp file beside the original gets the new prefix and a kernel-side copy of the data region, then
  replaces the original with ``os.replace``; a process that has the old file open keeps its bytes.
* ``output``: the same copy written elsewhere; the source is only read.

Crash safety: fit and insert write a journal (``patcher.journal``) before touching the file and remove it once the
result is verified; :func:`recover`, which every write runs first, finishes or rolls back an interrupted patch.
Copy and output change nothing before the atomic rename. Backups and ``restore`` live in ``patcher.backup``; the
shared file handling (safe opens, locks, temp files, trust checks) in ``patcher._files``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import stat
from collections.abc import Callable, Mapping
from enum import Enum

from . import _files as files
from . import _platform as plat
from . import journal as jn
from ._files import FAULT_ENV, backup_path, journal_path
from ._record import dataclass
from .backup import restore, save_backup
from .errors import HeaderError, LinkError, LockedError, MetadataError, PatchError, UsageError, WriteError
from .header import (
    ALIGNMENT,
    MAX_HEADER_LEN,
    PREFIX_SIZE,
    Header,
    check_metadata,
    metadata_equal,
    pack_prefix,
    parse_header,
    read_header_fd,
    reserialize,
    same_tensors,
    shares_tensor_table,
)
from .journal import FINGERPRINT_WINDOW, ROLLBACK_STEPS, Journal, recover

#: Every fault point, in the order the strategies pass them (the rollback's own are ``ROLLBACK_STEPS``).
FAULT_STEPS = (
    "journal-written",
    "inserted",
    "prefix-half",
    "prefix-written",
    "tmp-created",
    "data-half",
    "data-copied",
    "verified",
    "replaced",
)
#: The copy path pads the header so the data region starts on this boundary (room for later edits, page-aligned).
COPY_BOUNDARY = 4096


class Strategy(str, Enum):
    """How a header is written (see the module docstring)."""

    NONE = "none"
    FIT = "fit"
    INSERT = "insert"
    COPY = "copy"
    OUTPUT = "output"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class WriteResult:
    """What :func:`write_metadata` did to one file."""

    #: The file patched (the resolved target when symlinks were followed) or read (with ``output``).
    path: str
    #: Whether the metadata differs from what the file had.
    changed: bool
    strategy: Strategy
    old_header_len: int
    new_header_len: int
    #: Free padding left in the new header: the next edit that grows by at most this much is a ``fit``.
    spare: int
    #: What an interrupted earlier patch needed: ``"finished"``, ``"rolled back"``, ``"discarded"`` (a damaged
    #: journal beside a valid file), ``"pending"`` (dry run only), or ``None``.
    recovered: str | None = None
    #: The backup file holding the original prefix, when one was asked for.
    backup: str | None = None
    #: Whether that backup was already there (the original of an earlier patch, kept) rather than written now.
    backup_kept: bool = False
    #: Where the patched copy went (``output`` strategy).
    output: str | None = None
    #: What a forced in-place copy could not keep (owner, group, inode flags), for the caller to report.
    lost: tuple[str, ...] = ()


@dataclass(frozen=True)
class SplicePlan:
    """The decision for one file: the new header bytes and how they get there (a value, no I/O)."""

    path: str
    #: The header the file has now.
    header: Header
    #: The N' bytes of the new header, padded with spaces.
    new_header_bytes: bytes
    strategy: Strategy
    #: The metadata asked for (``None``: no ``__metadata__`` key).
    metadata: Mapping[str, str] | None
    changed: bool
    #: K, the bytes inserted at offset 0 (``insert`` only).
    insert_len: int = 0
    output: str | None = None

    @property
    def old_header_len(self) -> int:
        """Return N, the current header length."""
        return self.header.header_len

    @property
    def new_header_len(self) -> int:
        """Return N', the new header length."""
        return len(self.new_header_bytes)

    @property
    def spare(self) -> int:
        """Return the padding left at the end of the new header."""
        return len(self.new_header_bytes) - len(self.new_header_bytes.rstrip(b" \t\r\n"))

    @functools.cached_property
    def old_prefix(self) -> bytes:
        """Return the first 8 + N bytes of the file as it is."""
        return pack_prefix(self.header.raw)

    @functools.cached_property
    def new_prefix(self) -> bytes:
        """Return the first 8 + N' bytes of the file as it will be."""
        return pack_prefix(self.new_header_bytes)

    @property
    def new_file_size(self) -> int:
        """Return the size of the patched file."""
        return PREFIX_SIZE + self.new_header_len + self.header.data_len


# --------------------------------------------------------------------------------------------
# Pure planning


def _metadata_matches(header: Header, metadata: Mapping[str, str] | None) -> bool:
    """Return whether ``header`` already carries ``metadata`` (key presence included)."""
    return header.has_metadata_key == (metadata is not None) and metadata_equal(header.metadata, metadata)


def _copy_length(compact_len: int) -> int:
    """Return N' for a rewritten file: aligned, with spare up to the next 4 KiB boundary of 8 + N'."""
    aligned = compact_len + (-(PREFIX_SIZE + compact_len) % ALIGNMENT)
    boundary = -(-(PREFIX_SIZE + aligned) // COPY_BOUNDARY) * COPY_BOUNDARY - PREFIX_SIZE
    return boundary if boundary <= MAX_HEADER_LEN else aligned


def plan_write(
    header: Header,
    metadata: Mapping[str, str] | None,
    *,
    path: str | os.PathLike[str],
    block_size: int,
    output: str | os.PathLike[str] | None = None,
    strategy: Strategy | None = None,
) -> SplicePlan:
    """Decide how ``metadata`` replaces the header's ``__metadata__`` and return the new header bytes."""
    name = os.fspath(path)
    out = os.fspath(output) if output is not None else None
    try:
        wanted = check_metadata(metadata) if metadata is not None else None
    except MetadataError as exc:
        raise exc.with_path(name) from None
    changed = not _metadata_matches(header, wanted)
    if strategy is Strategy.OUTPUT and out is None:
        raise UsageError("the output strategy needs an output path", path=name)
    if out is not None and strategy not in (None, Strategy.OUTPUT):
        raise UsageError(f"an output path cannot be written with the {strategy} strategy", path=name)
    if strategy is Strategy.NONE and changed:
        raise UsageError("strategy 'none' cannot change the metadata", path=name)

    def make(body: bytes, chosen: Strategy, insert_len: int = 0) -> SplicePlan:
        return SplicePlan(name, header, body, chosen, wanted, changed, insert_len, out)

    if not changed and out is not None:
        return make(header.raw, Strategy.OUTPUT)  # an exact copy: nothing to change
    if not changed:
        return make(header.raw, Strategy.NONE)
    try:
        compact = reserialize(header, wanted)
    except MetadataError as exc:
        raise exc.with_path(name) from None
    if out is not None:
        return make(jn.padded(compact, _copy_length(len(compact)), name), Strategy.OUTPUT)
    fits = len(compact) <= header.header_len
    insertable = block_size > 0 and block_size % ALIGNMENT == 0
    if strategy is None:
        # Growing an unaligned file by whole blocks would keep it unaligned: a rewrite fixes it.
        strategy = Strategy.FIT if fits else Strategy.INSERT if insertable and header.aligned else Strategy.COPY
    if strategy is Strategy.FIT:
        if not fits:
            raise WriteError(
                "the new header does not fit in the old one",
                path=name,
                code="no-fit",
                expected=f"at most {header.header_len:,} bytes",
                got=f"{len(compact):,}",
                hint="let nunchaku-patch choose the strategy",
            )
        return make(jn.padded(compact, header.header_len, name), Strategy.FIT)
    if strategy is Strategy.INSERT:
        if not insertable:
            raise WriteError(
                "cannot insert: the filesystem block size is no multiple of 8",
                path=name,
                code="no-insert",
                got=block_size,
            )
        # Whole blocks (insert-range works in blocks); at least one even when forced on a header that fits.
        growth = max(len(compact) - header.header_len, 1)
        insert_len = -(-growth // block_size) * block_size
        return make(jn.padded(compact, header.header_len + insert_len, name), Strategy.INSERT, insert_len)
    return make(jn.padded(compact, _copy_length(len(compact)), name), Strategy.COPY)


# --------------------------------------------------------------------------------------------
# Names and facts beside the file


def block_size(path: str | os.PathLike[str]) -> int:
    """Return the filesystem block size of ``path`` (what :func:`plan_write` needs)."""
    return plat.block_size(os.fspath(path))


def plant_journal_for_tests(path: str | os.PathLike[str], old_prefix: bytes, new_prefix: bytes) -> bytes:
    """Return the journal a patch of ``path`` from ``old_prefix`` to ``new_prefix`` would write (tests only)."""
    name = os.fspath(path)
    st = os.stat(name)
    old = parse_header(old_prefix[PREFIX_SIZE:])
    new = parse_header(new_prefix[PREFIX_SIZE:])
    with open(name, "rb") as handle:
        prints = jn.fingerprint(handle.fileno(), old.data_start, st.st_size - old.data_start)
    insert = len(new_prefix) - len(old_prefix)
    return jn.make_journal(
        st, "insert" if insert else "fit", insert, old_prefix, new_prefix, new.metadata, prints
    ).encode()


# --------------------------------------------------------------------------------------------
# Verification


def _verify(fd: int, path: str, plan: SplicePlan, prints: tuple[str, str] | None) -> None:
    """Check what was written against the plan, and the planned header against the strict reader.

    The bytes read back must be the planned prefix, the file the planned size, and the data region where it should
    be (its fingerprints); the planned header must pass the strict reader (which accepts exactly what safetensors
    accepts) with the old tensor table and the asked metadata. For a header in the writer layout that is shown
    without a parse (:func:`~patcher.header.shares_tensor_table`: the planned tensor entries are the bytes the
    reader accepted under the lock); any other header is parsed again, from memory. numpy is never imported.
    """
    problems = []
    prefix = plan.new_prefix
    size = os.fstat(fd).st_size
    if size != plan.new_file_size:
        problems.append(f"the file is {size:,} bytes, expected {plan.new_file_size:,}")
    elif plat.pread_exact(fd, len(prefix), 0) != prefix:
        problems.append("the header bytes read back differ from those written")
    elif prints is not None and jn.fingerprint(fd, len(prefix), plan.header.data_len) != prints:
        problems.append("the data region is not where it should be")
    if not shares_tensor_table(plan.header, plan.new_header_bytes, plan.metadata):
        _verify_by_parsing(path, plan, problems)
    if problems:
        raise WriteError("verification failed: " + "; ".join(problems), path=path, code="verify")


def _verify_by_parsing(path: str, plan: SplicePlan, problems: list[str]) -> None:
    """Parse the planned header with the strict reader; note in ``problems`` how it differs from the plan."""
    try:
        planned = parse_header(plan.new_header_bytes, plan.new_file_size, source=path)
    except HeaderError as exc:
        problems.append(f"the new header does not pass the strict reader ({exc.message})")
    else:
        if not same_tensors(planned.tensors, plan.header.tensors):
            problems.append("the tensor table changed")
        if not _metadata_matches(planned, plan.metadata):
            problems.append("the metadata differs from what was asked")


# --------------------------------------------------------------------------------------------
# The strategies


def _apply_in_place(fd: int, path: str, plan: SplicePlan, st: os.stat_result) -> str | None:
    """Carry out ``fit`` or ``insert`` under a journal; return why it cannot be done in place, or None when done.

    Both hold a write lease while they change the header, the kernel's proof that no other process has the file
    open or mapped; where it is refused the caller copies instead. (Without leases, on macOS and Windows, a fit is
    written in place: the tensor table and data do not move, only the metadata bytes change.)
    """
    insert_len = plan.insert_len if plan.strategy is Strategy.INSERT else 0
    jpath = journal_path(path)
    with contextlib.ExitStack() as lease:
        if insert_len and not plat.IS_LINUX:
            return "insert-range needs Linux"
        if plat.leases_supported():
            if not lease.enter_context(plat.lease_break_handler()):
                return "a write lease can only be taken from the main thread"
            if not plat.take_write_lease(fd):
                return "another process has the file open or mapped"
            lease.callback(plat.release_lease, fd)
        prints = jn.fingerprint(fd, plan.header.data_start, plan.header.data_len)
        journal = jn.make_journal(
            st, plan.strategy.value, insert_len, plan.old_prefix, plan.new_prefix, plan.metadata, prints
        )
        # Flushed, with its directory entry (which also carries a backup written just before).
        files.atomic_write(jpath, journal.encode(), os.path.basename(path))
        try:
            files.fault("journal-written")
            if insert_len:
                if not plat.insert_range(fd, 0, insert_len):
                    files.remove(jpath)  # flushed: a copy follows, which a stale journal would not match
                    return "the filesystem does not support insert-range (tmpfs, btrfs, NFS, ...)"
                files.fault("inserted")
            files.write_prefix(fd, plan.new_prefix, "prefix-half")
            lease.close()  # let waiting openers in as soon as the file is whole again
            plat.fsync(fd)
            files.fault("prefix-written")
            _verify(fd, path, plan, prints)
            files.fault("verified")
        except BaseException as exc:
            lease.close()
            raise jn.failed(fd, path, journal, exc) from None
    # Not flushed: should a power cut bring the journal back, it finds the file finished and is removed again.
    files.remove(jpath, sync_dir=False)
    return None


def _refuse_lost_identity(lost: list[str], dest: str) -> WriteError:
    return WriteError(
        "replacing it with a patched copy would change its " + ", ".join(lost),
        path=dest,
        code="identity",
        hint="write a patched copy with -o, or pass --force to accept the change",
    )


def _copy_into(
    src_fd: int,
    src_st: os.stat_result,
    plan: SplicePlan,
    dest: str,
    *,
    in_place: bool,
    force: bool = False,
    release_source: Callable[[], None] | None = None,
) -> tuple[str, ...]:
    """Write the patched file to a temp beside ``dest`` and rename it over ``dest``; return what was not kept.

    In place the new file takes the old one's owner, group and inode flags first (before any data); what cannot
    be kept is refused unless ``force``. An output is a new file, like ``cp`` makes: only the mode is copied.
    """
    directory, name = os.path.split(dest)
    directory = directory or "."
    files.sweep_temps(directory, name)
    header = plan.header
    prints = jn.fingerprint(src_fd, header.data_start, header.data_len)
    tmp_fd, tmp = files.create_temp(directory, name)
    tmp_handle = files.Handle(tmp_fd)
    replaced = False
    lost: list[str] = []
    try:
        if in_place:
            lost = plat.keep_identity(src_st, src_fd, tmp_fd)
            if lost and not force:
                raise _refuse_lost_identity(lost, dest)
        files.fault("tmp-created")
        prefix = plan.new_prefix
        plat.pwrite_all(tmp_fd, prefix, 0)
        half = header.data_len // 2 if files.armed("data-half") else header.data_len
        plat.copy_data(src_fd, tmp_fd, header.data_start, len(prefix), half)
        files.fault("data-half")
        plat.copy_data(src_fd, tmp_fd, header.data_start + half, len(prefix) + half, header.data_len - half)
        files.fault("data-copied")
        plat.copy_attributes(src_st, tmp_fd, tmp, src_fd=src_fd if in_place else None)
        plat.fsync(tmp_fd)
        _verify(tmp_fd, tmp, plan, prints)
        files.fault("verified")
        if plat.IS_WINDOWS:
            # Windows renames neither an open file nor over one: let go of both (and of the lock) first.
            tmp_handle.close()
            if release_source is not None:
                release_source()
        os.replace(tmp, dest)
        replaced = True
        files.fault("replaced")
        plat.fsync_dir(directory)
    except BaseException as exc:
        if not replaced:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        if isinstance(exc, WriteError) and exc.path == tmp:
            raise WriteError(exc.message, path=dest, code=exc.code, hint=exc.hint) from None
        raise
    finally:
        tmp_handle.close()
    return tuple(lost)


# --------------------------------------------------------------------------------------------
# Where a write may go


def _folder_problem(directory: str, path: str) -> WriteError | None:
    try:
        files.check_folder_writable(directory, path)
    except WriteError as exc:
        return exc
    return None


def _inspect_target(name: str, follow_symlinks: bool) -> tuple[str, PatchError | None]:
    """Resolve ``name``; return it with the reason it must not be written in place, if any."""
    try:
        st = os.lstat(name)
        if stat.S_ISLNK(st.st_mode):
            if not follow_symlinks:
                return name, LinkError(
                    "is a symbolic link; writing through it would change the file it points to, which other "
                    "paths may share (a Hugging Face cache blob)",
                    path=name,
                    hint=f"write a patched copy with -o, or pass --follow-symlinks to patch {os.path.realpath(name)}",
                )
            name = os.path.realpath(name)
            st = os.lstat(name)
    except OSError as exc:
        raise files.os_error(exc, name, "cannot open") from None
    if not stat.S_ISREG(st.st_mode):
        raise WriteError("is not a regular file", path=name, code="not-a-file")
    if st.st_nlink > 1:
        return name, LinkError(
            f"has {st.st_nlink} hard links; patching in place would change every one of them and a copy would "
            "split them",
            path=name,
            hint="write a patched copy with -o",
        )
    mode = stat.S_IMODE(st.st_mode)
    # Root passes every access() check on permission bits, so the bits are checked explicitly.
    if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH):
        return name, WriteError(
            f"is read-only (mode {mode:04o})",
            path=name,
            code="read-only",
            hint="make it writable (chmod u+w) or write a patched copy with -o",
        )
    if not os.access(name, os.W_OK):
        return name, WriteError(
            "is not writable (permissions, an immutable attribute, or a read-only filesystem)",
            path=name,
            code="permission",
            hint="write a patched copy with -o",
        )
    flagged = files.attribute_problem(plat.path_flags(name), "it")
    if flagged is not None:
        return name, WriteError(
            f"cannot be patched in place: {flagged}", path=name, code="permission", hint="or write a copy with -o"
        )
    directory = os.path.dirname(name) or "."
    if not os.access(directory, os.W_OK | os.X_OK):
        return name, WriteError(
            "its directory is not writable (the journal and temp files go beside the file)",
            path=name,
            code="permission",
            hint="write a patched copy elsewhere with -o",
        )
    return name, _folder_problem(directory, name)


def check_output_target(
    dest: str, *, force: bool = False, follow_symlinks: bool = False, exists_ok: bool = False
) -> str:
    """Apply the rules of ``-o OUT``; return the path to write (a followed link's target).

    A device, FIFO, socket or folder is never replaced, even with ``force``; a symbolic link only with
    ``follow_symlinks`` (the file it points to is written, and must be a regular file or not exist yet); an
    existing regular file only with ``force`` (or ``exists_ok``: the caller checks it already holds the result).
    """
    try:
        st = os.lstat(dest)
        if stat.S_ISLNK(st.st_mode):
            if not follow_symlinks:
                raise LinkError(
                    "the output is a symbolic link; writing through it would replace the file it points to",
                    path=dest,
                    hint=f"pass --follow-symlinks to write {os.path.realpath(dest)}, or choose another name with -o",
                )
            dest = os.path.realpath(dest)
            st = os.lstat(dest)
    except FileNotFoundError:
        directory = os.path.dirname(os.path.abspath(dest))
        if not os.path.isdir(directory):
            raise WriteError("the output directory does not exist", path=dest, code="not-found") from None
        problem = _folder_problem(directory, dest)
        if problem is not None:
            raise problem from None
        return dest
    except OSError as exc:
        raise files.os_error(exc, dest, "cannot check the output") from None
    if stat.S_ISDIR(st.st_mode):
        raise WriteError("the output is a folder, not a regular file", path=dest, code="not-a-file")
    if not stat.S_ISREG(st.st_mode):
        raise WriteError(
            "the output exists and is not a regular file (a device, FIFO or socket); it is never replaced",
            path=dest,
            code="not-a-file",
            hint="choose another name with -o",
        )
    if not force and not exists_ok:
        raise WriteError(
            "the output already exists",
            path=dest,
            code="exists",
            hint="pass --force to replace it, or choose another name with -o",
        )
    mode = stat.S_IMODE(st.st_mode)
    if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or not os.access(dest, os.W_OK):
        raise WriteError("the output exists and is read-only", path=dest, code="read-only")
    problem = _folder_problem(os.path.dirname(os.path.abspath(dest)), dest)
    if problem is not None:
        raise problem
    return dest


def _plan_read_only(
    target: str, metadata: Mapping[str, str] | None, strategy: Strategy | None
) -> tuple[SplicePlan, bool]:
    """Plan from a read-only open, predicting insert support from the filesystem type; also say if a journal waits."""
    pending = os.path.lexists(journal_path(os.path.realpath(target)))
    try:
        fd = files.open_file(target, os.O_RDONLY)
    except OSError as exc:
        raise files.os_error(exc, target, "cannot open") from None
    try:
        header = read_header_fd(fd, source=target)
    except HeaderError:
        if pending:
            raise WriteError(
                "an interrupted patch left the header incomplete",
                path=target,
                code="interrupted",
                hint="run the same command without --dry-run to finish it",
            ) from None
        raise
    except OSError as exc:
        raise files.os_error(exc, target, "cannot read") from None
    finally:
        files.close(fd)
    size = block_size(target)
    plan = plan_write(header, metadata, path=target, block_size=size, strategy=strategy)
    if plan.strategy is Strategy.INSERT and strategy is None and not plat.insert_range_likely(target):
        plan = plan_write(header, metadata, path=target, block_size=size, strategy=Strategy.COPY)
    return plan, pending


def _result(
    plan: SplicePlan,
    *,
    recovered: str | None = None,
    backup: tuple[str, bool] | None = None,
    lost: tuple[str, ...] = (),
) -> WriteResult:
    return WriteResult(
        path=plan.path,
        changed=plan.changed,
        strategy=plan.strategy,
        old_header_len=plan.old_header_len,
        new_header_len=plan.new_header_len,
        spare=plan.spare,
        recovered=recovered,
        backup=backup[0] if backup else None,
        backup_kept=backup[1] if backup else False,
        output=plan.output,
        lost=lost,
    )


def _reread(fd: int, path: str, expected: Header | None) -> Header:
    """Return the header of the locked file: ``expected`` if its bytes are still there, else a fresh parse.

    The caller planned the metadata from ``expected``; if another program changed the header in between, writing
    that plan would silently drop its change, so that is refused instead.
    """
    if expected is None:
        return read_header_fd(fd, source=path)
    same_size = os.fstat(fd).st_size == expected.file_size
    if same_size and plat.pread_exact(fd, expected.data_start, 0) == pack_prefix(expected.raw):
        return expected  # byte-identical: no need to parse it again
    raise LockedError(
        "the file changed between reading its header and locking it",
        path=path,
        code="changed",
        hint="another program wrote it meanwhile; run the command again",
    )


def _write_in_place(
    name: str,
    metadata: Mapping[str, str] | None,
    *,
    dry_run: bool,
    backup: bool,
    follow_symlinks: bool,
    strategy: Strategy | None,
    wait: float,
    force: bool,
    expected: Header | None = None,
) -> WriteResult:
    target, problem = _inspect_target(name, follow_symlinks)
    if dry_run or problem is not None:
        plan, pending = _plan_read_only(target, metadata, strategy)
        if plan.changed and problem is not None:
            raise problem
        # Nothing to write (or not asked to): nothing to refuse either.
        return _result(plan, recovered="pending" if pending else None)
    try:
        fd, st = files.open_locked(target, writable=True, exclusive=True, wait=wait)
        handle = files.Handle(fd)
        try:
            recovered = jn.recover_locked(fd, target)
            st = os.fstat(fd)
            header = _reread(fd, target, expected)
            size = block_size(target)
            plan = plan_write(header, metadata, path=target, block_size=size, strategy=strategy)
            if not plan.changed:
                return _result(plan, recovered=recovered)
            if st.st_nlink > 1:  # a link made since the first look
                raise LinkError(f"has {st.st_nlink} hard links", path=target, hint="write a patched copy with -o")
            # A filesystem known to lack insert-range (tmpfs, btrfs, NFS...) copies at once: no journal to flush.
            if plan.strategy is Strategy.INSERT and strategy is None and not _may_insert(target):
                plan = plan_write(header, metadata, path=target, block_size=size, strategy=Strategy.COPY)
            # The journal's directory flush covers the backup's entry; the copy path has no journal, so it flushes.
            saved = save_backup(target, header, st, sync_dir=plan.strategy is Strategy.COPY) if backup else None
            if plan.strategy in (Strategy.INSERT, Strategy.FIT):
                reason = _apply_in_place(fd, target, plan, st)
                if reason is not None:
                    if strategy is plan.strategy:
                        raise WriteError(
                            f"cannot {plan.strategy} in place: {reason}", path=target, code=f"no-{plan.strategy}"
                        )
                    plan = plan_write(header, metadata, path=target, block_size=size, strategy=Strategy.COPY)
            lost: tuple[str, ...] = ()
            if plan.strategy is Strategy.COPY:
                lost = _copy_into(fd, st, plan, target, in_place=True, force=force, release_source=handle.close)
            return _result(plan, recovered=recovered, backup=saved, lost=lost)
        finally:
            handle.close()
    except OSError as exc:
        raise files.os_error(exc, target) from None


def _may_insert(path: str) -> bool:
    """Return False only for a filesystem known to lack insert-range (an unknown one is tried)."""
    kind = plat.filesystem_type(path)
    return kind is None or kind in plat.INSERT_RANGE_FILESYSTEMS


def _holds_the_result(dest: str, plan: SplicePlan, src_fd: int) -> bool:
    """Return whether the existing ``dest`` already is this patched copy (a rerun after a kill, say)."""
    try:
        fd = files.open_file(dest, os.O_RDONLY)
    except (OSError, WriteError):
        return False
    try:
        prefix = plan.new_prefix
        if os.fstat(fd).st_size != plan.new_file_size or plat.pread_exact(fd, len(prefix), 0) != prefix:
            return False
        header = plan.header
        return jn.fingerprint(fd, len(prefix), header.data_len) == jn.fingerprint(
            src_fd, header.data_start, header.data_len
        )
    finally:
        files.close(fd)


def _write_output(
    source: str,
    metadata: Mapping[str, str] | None,
    output: str,
    *,
    dry_run: bool,
    wait: float,
    force: bool,
    follow_symlinks: bool,
) -> WriteResult:
    dest = os.path.join(output, os.path.basename(source)) if os.path.isdir(output) else output
    try:
        if os.path.exists(dest) and os.path.samefile(source, dest):
            raise UsageError(
                "the output is the source file itself", path=dest, hint="choose another path, or patch in place"
            )
        dest = check_output_target(dest, force=force, follow_symlinks=follow_symlinks, exists_ok=True)
        exists = os.path.lexists(dest)
        # A shared lock: no in-place patch of the source can run while we copy it.
        fd, st = files.open_locked(source, writable=False, exclusive=False, wait=wait)
        try:
            if os.path.lexists(journal_path(os.path.realpath(source))):
                raise WriteError(
                    "the source has an interrupted in-place patch",
                    path=source,
                    code="interrupted",
                    hint="run nunchaku-patch on it without -o first to finish it",
                )
            header = read_header_fd(fd, source=source)
            plan = plan_write(header, metadata, path=source, block_size=block_size(source), output=dest)
            if exists and _holds_the_result(dest, plan, fd):
                return dataclasses.replace(_result(plan), strategy=Strategy.NONE)  # left alone
            if exists and not force:
                check_output_target(dest, follow_symlinks=True)  # raises: it exists and holds something else
            if not dry_run:
                _copy_into(fd, st, plan, dest, in_place=False)
            return _result(plan)
        finally:
            files.close(fd)
    except OSError as exc:
        raise files.os_error(exc, source if exc.filename == source else dest) from None


def write_metadata(
    path: str | os.PathLike[str],
    metadata: Mapping[str, str] | None,
    *,
    output: str | os.PathLike[str] | None = None,
    dry_run: bool = False,
    backup: bool = False,
    follow_symlinks: bool = False,
    strategy: Strategy | None = None,
    wait: float = 0.0,
    expected: Header | None = None,
    force: bool = False,
) -> WriteResult:
    """Replace the ``__metadata__`` of ``path`` (``None``: remove the key), safely; see the module docstring.

    ``expected``: the header the metadata was planned from; the write is refused if the file no longer has it.
    ``force``: replace an existing ``output``; in place, accept a copy that cannot keep the owner, group or inode
    flags (``WriteResult.lost`` says what changed). ``follow_symlinks``: patch a link's target, or write an
    ``output`` that is a link into the file it points to.
    """
    name = os.fspath(path)
    if strategy is Strategy.OUTPUT and output is None:
        raise UsageError("the output strategy needs an output path", path=name)
    if output is not None:
        if strategy not in (None, Strategy.OUTPUT):
            raise UsageError(f"an output path cannot be written with the {strategy} strategy", path=name)
        return _write_output(
            name,
            metadata,
            os.fspath(output),
            dry_run=dry_run,
            wait=wait,
            force=force,
            follow_symlinks=follow_symlinks,
        )
    return _write_in_place(
        name,
        metadata,
        dry_run=dry_run,
        backup=backup,
        follow_symlinks=follow_symlinks,
        strategy=strategy,
        wait=wait,
        force=force,
        expected=expected,
    )


__all__ = [
    "COPY_BOUNDARY",
    "FAULT_ENV",
    "FAULT_STEPS",
    "FINGERPRINT_WINDOW",
    "ROLLBACK_STEPS",
    "Journal",
    "SplicePlan",
    "Strategy",
    "WriteResult",
    "backup_path",
    "block_size",
    "check_output_target",
    "journal_path",
    "plan_write",
    "recover",
    "restore",
    "write_metadata",
]
