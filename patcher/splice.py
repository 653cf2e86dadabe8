"""Write a new safetensors header onto an untouched data region, or leave the file exactly as it was.

The strategy is chosen once per file (:func:`plan_write`, pure) and carried out by :func:`write_metadata`:

* ``fit``: the new JSON fits in the old header length: pad it with spaces and rewrite the prefix in place.
* ``insert`` (Linux, ext4/XFS): ``fallocate(FALLOC_FL_INSERT_RANGE)`` adds whole filesystem blocks at offset 0,
  then the longer prefix is written over them; the data region is never read or written. Only while we hold a
  write lease, the kernel's proof that no other process has the file open or mapped (a running ComfyUI).
* ``copy``: a temp file beside the original gets the new prefix and a kernel-side copy of the data region, then
  replaces the original with ``os.replace``; a process that has the old file open keeps its bytes.
* ``output``: the same copy written elsewhere; the source is only read.

Crash safety: fit and insert write a journal (old and new prefix, identity of the file) before touching it and
remove it once the result is verified; :func:`recover`, which every write runs first, finishes or rolls back an
interrupted patch. Copy and output change nothing before the atomic rename.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import hashlib
import json
import os
import secrets
import stat
import struct
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import Enum

from . import _platform as plat
from .errors import (
    HeaderError,
    LinkError,
    LockedError,
    MetadataError,
    PatchError,
    RecoveryError,
    UsageError,
    WriteError,
)
from .header import (
    ALIGNMENT,
    MAX_HEADER_LEN,
    PREFIX_SIZE,
    Header,
    check_metadata,
    metadata_equal,
    open_nonblocking,
    pack_prefix,
    parse_header,
    parse_length_prefix,
    read_header,
    read_header_fd,
    same_tensors,
    serialize_header,
)

#: Environment variable naming the step at which to die with SIGKILL (fault-injection tests).
FAULT_ENV = "NUNCHAKU_PATCH_FAULT"
#: Every fault point, in the order the strategies pass them.
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
#: Bytes hashed at each end of the data region to recognise the file again (cheap, never the whole region).
FINGERPRINT_WINDOW = 64 * 1024

_JOURNAL_MAGIC = b"nunchaku-patch journal\n"
_JOURNAL_VERSION = 1
_DIGEST_SIZE = 32
_TEMP_SUFFIX = ".tmp"
_LOCK_POLL = 0.05
_REOPEN_TRIES = 8
# Room for our prefix and suffix within the usual 255-byte name limit.
_NAME_LIMIT = 200
_O_BINARY = getattr(os, "O_BINARY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_ERRNO_HINTS = {
    errno.ENOSPC: "free some disk space, or write a patched copy to another disk with -o",
    errno.EDQUOT: "free some quota, or write a patched copy elsewhere with -o",
    errno.EFBIG: "the file size limit (ulimit -f) is smaller than the file",
    errno.EROFS: "the filesystem is read-only; write a patched copy elsewhere with -o",
    errno.EACCES: "check the permissions, or write a patched copy with -o",
    errno.EPERM: "check the permissions and attributes (chattr -i), or write a patched copy with -o",
    errno.EIO: "the disk reported an I/O error; check it before trying again",
}


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
    #: Where the patched copy went (``output`` strategy).
    output: str | None = None


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

    @property
    def old_prefix(self) -> bytes:
        """Return the first 8 + N bytes of the file as it is."""
        return pack_prefix(self.header.raw)

    @property
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


def _padded(compact: bytes, length: int, path: str) -> bytes:
    if length > MAX_HEADER_LEN:
        raise MetadataError(
            "new header is larger than safetensors allows",
            path=path,
            code="header-too-large",
            expected=f"at most {MAX_HEADER_LEN:,} bytes",
            got=f"{length:,}",
        )
    return compact + b" " * (length - len(compact))


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
        compact = serialize_header(wanted, header.tensors).rstrip(b" ")
    except MetadataError as exc:
        raise exc.with_path(name) from None
    if out is not None:
        return make(_padded(compact, _copy_length(len(compact)), name), Strategy.OUTPUT)
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
        return make(_padded(compact, header.header_len, name), Strategy.FIT)
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
        return make(_padded(compact, header.header_len + insert_len, name), Strategy.INSERT, insert_len)
    return make(_padded(compact, _copy_length(len(compact)), name), Strategy.COPY)


# --------------------------------------------------------------------------------------------
# Names beside the file


def _short_name(name: str) -> str:
    # Long names keep a readable head and a hash, so our prefixes and suffixes stay under NAME_MAX.
    if len(name) <= _NAME_LIMIT:
        return name
    return name[: _NAME_LIMIT - 17] + "-" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def _temp_prefix(name: str) -> str:
    return f".{_short_name(name)}.npatch-"


def journal_path(path: str | os.PathLike[str]) -> str:
    """Return where the journal of an in-place patch of ``path`` lives: ``{dir}/.{name}.npatch-journal``."""
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f".{_short_name(name)}.npatch-journal")


def backup_path(path: str | os.PathLike[str]) -> str:
    """Return where ``backup=True`` saves the original prefix of ``path``: ``{path}.npatch-backup``."""
    return os.fspath(path) + ".npatch-backup"


def block_size(path: str | os.PathLike[str]) -> int:
    """Return the filesystem block size of ``path`` (what :func:`plan_write` needs)."""
    return plat.block_size(os.fspath(path))


# --------------------------------------------------------------------------------------------
# Fault injection


def _armed(step: str) -> bool:
    return os.environ.get(FAULT_ENV) == step


def _fault(step: str) -> None:
    """Die with SIGKILL here when ``NUNCHAKU_PATCH_FAULT`` names this step (a dict lookup otherwise)."""
    if _armed(step):
        plat.kill_self()


# --------------------------------------------------------------------------------------------
# The journal


class _DamagedJournal(Exception):
    """A journal file that is not a complete record of ours."""


@dataclass(frozen=True)
class Journal:
    """What an in-place patch intends, written and flushed before the file is touched."""

    strategy: Strategy
    #: Size of the file before the patch.
    file_size: int
    dev: int
    ino: int
    #: K, the bytes inserted at offset 0 (0 for fit).
    insert_len: int
    old_prefix: bytes
    new_prefix: bytes
    #: sha256 (hex) of the first and last ``window`` bytes of the data region.
    window: int
    data_head: str
    data_tail: str

    def encode(self) -> bytes:
        """Return the record: magic, version, JSON fields, both prefixes, then a sha256 of all of it."""
        meta = json.dumps(
            {
                "strategy": self.strategy.value,
                "file_size": self.file_size,
                "dev": self.dev,
                "ino": self.ino,
                "insert_len": self.insert_len,
                "old_prefix_len": len(self.old_prefix),
                "new_prefix_len": len(self.new_prefix),
                "window": self.window,
                "data_head": self.data_head,
                "data_tail": self.data_tail,
            },
            sort_keys=True,
        ).encode("ascii")
        body = b"".join(
            (_JOURNAL_MAGIC, struct.pack("<II", _JOURNAL_VERSION, len(meta)), meta, self.old_prefix, self.new_prefix)
        )
        return body + hashlib.sha256(body).digest()

    @classmethod
    def decode(cls, blob: bytes) -> Journal:
        """Parse a record written by :meth:`encode`; raise if it is torn, damaged or not ours."""
        start = len(_JOURNAL_MAGIC) + 8
        if len(blob) < start + _DIGEST_SIZE or not blob.startswith(_JOURNAL_MAGIC):
            raise _DamagedJournal("not a nunchaku-patch journal")
        body, digest = blob[:-_DIGEST_SIZE], blob[-_DIGEST_SIZE:]
        if hashlib.sha256(body).digest() != digest:
            raise _DamagedJournal("its checksum does not match (torn or damaged)")
        version, meta_len = struct.unpack_from("<II", blob, len(_JOURNAL_MAGIC))
        if version != _JOURNAL_VERSION:
            raise RecoveryError(
                f"the journal has version {version}, which this nunchaku-patch does not know",
                code="journal-version",
                expected=_JOURNAL_VERSION,
                hint="recover with the nunchaku-patch version that wrote it",
            )
        try:
            meta = json.loads(body[start : start + meta_len])
            old_len, new_len = int(meta["old_prefix_len"]), int(meta["new_prefix_len"])
            if start + meta_len + old_len + new_len != len(body):
                raise ValueError("lengths do not add up")
            position = start + meta_len
            return cls(
                strategy=Strategy(meta["strategy"]),
                file_size=int(meta["file_size"]),
                dev=int(meta["dev"]),
                ino=int(meta["ino"]),
                insert_len=int(meta["insert_len"]),
                old_prefix=body[position : position + old_len],
                new_prefix=body[position + old_len :],
                window=int(meta["window"]),
                data_head=str(meta["data_head"]),
                data_tail=str(meta["data_tail"]),
            )
        except (ValueError, KeyError, TypeError) as exc:
            raise _DamagedJournal(f"its fields are malformed ({exc})") from None


def _fingerprint(fd: int, data_start: int, data_len: int, window: int = FINGERPRINT_WINDOW) -> tuple[str, str]:
    """Return sha256 of the first and last ``window`` bytes of the data region."""
    size = min(window, data_len)
    head = hashlib.sha256(plat.pread_exact(fd, size, data_start)).hexdigest()
    tail = hashlib.sha256(plat.pread_exact(fd, size, data_start + data_len - size)).hexdigest()
    return head, tail


# --------------------------------------------------------------------------------------------
# Small I/O helpers


def _os_error(exc: OSError, path: str, doing: str = "cannot write") -> WriteError:
    """Turn an OSError into one line naming the file, with a hint for the usual causes."""
    what = exc.strerror or str(exc)
    if exc.errno == errno.ELOOP:
        return LinkError(
            f"{doing}: it is a symbolic link", path=path, hint="write a patched copy with -o, or --follow-symlinks"
        )
    if exc.errno == errno.ENOENT:
        return WriteError(f"{doing}: no such file or directory", path=path, code="not-found")
    code = "permission" if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS) else "io"
    return WriteError(f"{doing}: {what}", path=path, code=code, hint=_ERRNO_HINTS.get(exc.errno or 0))


def _close(fd: int) -> None:
    plat.unlock(fd)
    with contextlib.suppress(OSError):
        os.close(fd)


class _Handle:
    """An fd that is unlocked and closed at most once (Windows must let go of files before renaming)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._open = True

    def close(self) -> None:
        """Unlock and close the fd unless already done."""
        if self._open:
            self._open = False
            _close(self.fd)


def _open_file(path: str, flags: int) -> int:
    """Open a regular file without blocking on FIFOs; OSError for the caller to translate."""
    try:
        fd = open_nonblocking(path, flags | _O_CLOEXEC)
    except BlockingIOError:
        raise LockedError(
            "another nunchaku-patch is writing this file (it holds a lease)", path=path, hint="try again"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise WriteError("is not a regular file", path=path, code="not-a-file")
        if _O_NONBLOCK:  # only opened non-blocking where the flag exists (not on Windows)
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _open_locked(path: str, *, writable: bool, exclusive: bool, wait: float) -> tuple[int, os.stat_result]:
    """Open and lock ``path``; wait up to ``wait`` seconds for another holder; follow replacements."""
    deadline = time.monotonic() + max(wait, 0.0)
    flags = (os.O_RDWR | _O_NOFOLLOW) if writable else os.O_RDONLY
    for _ in range(_REOPEN_TRIES):
        fd = _open_file(path, flags)
        try:
            while not plat.try_lock(fd, exclusive=exclusive):
                if time.monotonic() >= deadline:
                    raise LockedError(
                        "another nunchaku-patch is writing this file",
                        path=path,
                        hint="wait for it to finish, then run again",
                    )
                time.sleep(_LOCK_POLL)
            held = os.fstat(fd)
            now = os.stat(path, follow_symlinks=not writable)
            if (now.st_dev, now.st_ino) == (held.st_dev, held.st_ino):
                return fd, held
        except BaseException:
            _close(fd)
            raise
        # Another patcher replaced the file (copy path) while we waited: lock the new one instead.
        _close(fd)
    raise LockedError("the file kept being replaced while waiting for its lock", path=path)


def _create_temp(directory: str, name: str) -> tuple[int, str]:
    """Create and lock ``{directory}/.{name}.npatch-{random}.tmp`` (the lock marks it as in use)."""
    for _ in range(16):
        path = os.path.join(directory, f"{_temp_prefix(name)}{secrets.token_hex(6)}{_TEMP_SUFFIX}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | _O_CLOEXEC | _O_BINARY | _O_NOFOLLOW, 0o600)
        except FileExistsError:
            continue
        try:
            plat.try_lock(fd)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                os.unlink(path)
            raise
        return fd, path
    raise WriteError("cannot create a temp file", path=directory, code="io")


def _sweep_temps(directory: str, name: str) -> None:
    """Remove temp files of ours for ``name`` left by a killed run (those no live process has locked)."""
    prefix = _temp_prefix(name)
    try:
        entries = list(os.scandir(directory or "."))
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(_TEMP_SUFFIX)):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_NONBLOCK | _O_BINARY)
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode) and plat.try_lock(fd):
                os.unlink(entry.path)
        except OSError:
            pass
        finally:
            _close(fd)


def _atomic_write(final: str, data: bytes, owner_name: str) -> None:
    """Write ``data`` to ``final`` through a flushed temp file and a rename, then flush the directory."""
    directory = os.path.dirname(final) or "."
    fd, tmp = _create_temp(directory, owner_name)
    try:
        plat.pwrite_all(fd, data, 0)
        plat.fsync(fd)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        _close(fd)
    plat.fsync_dir(directory)


def _remove(path: str) -> None:
    """Remove ``path`` if present and flush the directory entry."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    plat.fsync_dir(os.path.dirname(path) or ".")


def _write_prefix(fd: int, prefix: bytes) -> None:
    if _armed("prefix-half"):
        plat.pwrite_all(fd, prefix[: len(prefix) // 2], 0)
        plat.kill_self()
    plat.pwrite_all(fd, prefix, 0)


def _oracle(path: str) -> None:
    """Ask the reference reader whether ``path`` is valid (imported lazily: it is only needed here)."""
    from safetensors import safe_open

    try:
        with safe_open(path, framework="np") as handle:
            handle.metadata()
            handle.keys()
    except Exception as exc:  # the bindings raise SafetensorError, OSError or ValueError
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WriteError(f"verification failed: safetensors rejects the result ({first})", code="verify") from None


def _verify(fd: int, path: str, plan: SplicePlan, fingerprint: tuple[str, str] | None) -> None:
    """Re-read what was written and check it against the plan, then against the reference reader."""
    try:
        got = read_header_fd(fd, source=path)
    except HeaderError as exc:
        raise WriteError(
            f"verification failed: the written header does not parse ({exc.message})", path=path, code="verify"
        ) from None
    problems = []
    if got.raw != plan.new_header_bytes:
        problems.append("the header bytes differ from those written")
    if not same_tensors(got.tensors, plan.header.tensors):
        problems.append("the tensor table changed")
    if not _metadata_matches(got, plan.metadata):
        problems.append("the metadata differs from what was asked")
    size = os.fstat(fd).st_size
    if size != plan.new_file_size:
        problems.append(f"the file is {size:,} bytes, expected {plan.new_file_size:,}")
    elif fingerprint is not None and _fingerprint(fd, got.data_start, got.data_len) != fingerprint:
        problems.append("the data region is not where it should be")
    if problems:
        raise WriteError("verification failed: " + "; ".join(problems), path=path, code="verify")
    try:
        _oracle(path)
    except WriteError as exc:
        raise exc.with_path(path) from None


# --------------------------------------------------------------------------------------------
# Recovery


def _torn_between(current: bytes, before: bytes, after: bytes) -> bool:
    """Return whether every byte of ``current`` is the one of ``before`` or of ``after`` (an interrupted write)."""
    if not len(current) == len(before) == len(after):
        return False
    step = 4096
    for start in range(0, len(current), step):
        cur, old, new = current[start : start + step], before[start : start + step], after[start : start + step]
        if cur != old and cur != new and any(c != a and c != b for c, a, b in zip(cur, old, new, strict=True)):
            return False
    return True


def _mismatch(path: str, what: str) -> RecoveryError:
    return RecoveryError(
        f"the file does not match its interrupted-patch journal ({what})",
        path=path,
        hint=f"nothing was changed; if the file was replaced on purpose, delete {journal_path(path)}",
    )


def _check_fingerprint(fd: int, path: str, journal: Journal, data_start: int) -> None:
    size = os.fstat(fd).st_size
    data_len = size - data_start
    if data_len < 0 or _fingerprint(fd, data_start, data_len, journal.window) != (journal.data_head, journal.data_tail):
        raise _mismatch(path, "its data region is not the one the journal describes")


def _finish(fd: int, path: str, journal: Journal, write: bool) -> str:
    if write:
        plat.pwrite_all(fd, journal.new_prefix, 0)
    plat.fsync(fd)
    try:
        got = read_header_fd(fd, source=path)
        if got.raw != journal.new_prefix[PREFIX_SIZE:]:
            raise HeaderError("header differs from the journal's", path=path)
        _oracle(path)
    except PatchError as exc:
        raise RecoveryError(
            f"finishing the interrupted patch did not give a valid file ({exc.message})", path=path
        ) from None
    return "finished"


def _replay(fd: int, path: str, journal: Journal) -> str:
    """Finish or roll back the patch ``journal`` describes; raise without writing if the file does not match."""
    st = os.fstat(fd)
    same_file = (st.st_dev, st.st_ino) == (journal.dev, journal.ino)
    old, new, insert_len = journal.old_prefix, journal.new_prefix, journal.insert_len
    if st.st_size == journal.file_size:
        _check_fingerprint(fd, path, journal, len(old))
        current = plat.pread_exact(fd, len(old), 0)
        if current == old:
            return "rolled back"  # nothing had been written yet
        if insert_len == 0 and current == new:
            return _finish(fd, path, journal, write=False)
        if insert_len == 0 and same_file and _torn_between(current, old, new):
            return _finish(fd, path, journal, write=True)
        raise _mismatch(path, "its header is neither the old one, the new one, nor a mix of both")
    if insert_len and st.st_size == journal.file_size + insert_len:
        _check_fingerprint(fd, path, journal, len(new))
        current = plat.pread_exact(fd, len(new), 0)
        if current == new:
            return _finish(fd, path, journal, write=False)
        # After the insert the first K bytes are a hole (zeros) followed by the old prefix.
        if same_file and _torn_between(current, bytes(insert_len) + old, new):
            return _finish(fd, path, journal, write=True)
        raise _mismatch(path, "the inserted space holds something else")
    expected = f"{journal.file_size:,}" + (f" or {journal.file_size + insert_len:,}" if insert_len else "")
    raise _mismatch(path, f"its size is {st.st_size:,} bytes, expected {expected}")


def _recover_locked(fd: int, path: str) -> str | None:
    """Finish or roll back an interrupted patch of the locked file ``fd``; sweep our stale temp files."""
    directory, name = os.path.split(path)
    _sweep_temps(directory, name)
    jpath = journal_path(path)
    try:
        jfd = os.open(jpath, os.O_RDONLY | _O_NOFOLLOW | _O_CLOEXEC | _O_BINARY)
    except FileNotFoundError:
        return None
    try:
        blob = plat.pread_exact(jfd, os.fstat(jfd).st_size, 0)
    finally:
        os.close(jfd)
    try:
        journal = Journal.decode(blob)
    except RecoveryError as exc:
        raise exc.with_path(path) from None
    except _DamagedJournal as exc:
        # A journal gets its name only by a rename after being flushed, so a damaged one was never a
        # half-written record of ours: if the file itself is valid, the journal is of no use.
        try:
            read_header_fd(fd, source=path)
        except HeaderError as bad:
            raise RecoveryError(
                f"found a damaged journal ({exc}) and the header is invalid ({bad.message})",
                path=path,
                hint=f"nothing was changed; restore the file from a backup or download, then delete {jpath}",
            ) from None
        _remove(jpath)
        return "discarded"
    outcome = _replay(fd, path, journal)
    _remove(jpath)
    return outcome


def recover(path: str | os.PathLike[str], *, wait: float = 0.0) -> str | None:
    """Finish or roll back an interrupted patch of ``path``; return what was done, ``None`` if nothing."""
    name = os.fspath(path)
    jpath = journal_path(name)
    if not os.path.lexists(jpath):
        directory, base = os.path.split(name)
        _sweep_temps(directory, base)
        return None
    if not os.path.lexists(name):
        raise RecoveryError(
            "found an interrupted-patch journal but the file is gone", path=name, hint=f"delete {jpath}"
        )
    try:
        fd, _ = _open_locked(name, writable=True, exclusive=True, wait=wait)
        try:
            return _recover_locked(fd, name)
        finally:
            _close(fd)
    except OSError as exc:
        raise _os_error(exc, name, "cannot recover") from None


# --------------------------------------------------------------------------------------------
# The strategies


def _roll_back(fd: int, path: str, journal: Journal) -> None:
    """Put the old prefix back (collapsing the inserted blocks first if they are there)."""
    size = os.fstat(fd).st_size
    if journal.insert_len and size == journal.file_size + journal.insert_len:
        _check_fingerprint(fd, path, journal, len(journal.new_prefix))
        if not plat.collapse_range(fd, 0, journal.insert_len):
            raise OSError(errno.EOPNOTSUPP, "collapse-range is not supported")
    elif size != journal.file_size:
        raise _mismatch(path, f"its size is {size:,} bytes")
    plat.pwrite_all(fd, journal.old_prefix, 0)
    plat.fsync(fd)
    if read_header_fd(fd, source=path).raw != journal.old_prefix[PREFIX_SIZE:]:
        raise _mismatch(path, "the old header did not come back")


def _failed(fd: int, path: str, journal: Journal, exc: BaseException) -> BaseException:
    """Roll back after ``exc`` and return what to raise; keep the journal if even that fails."""
    try:
        _roll_back(fd, path, journal)
        _remove(journal_path(path))
    except BaseException:
        return WriteError(
            "the patch failed and could not be rolled back; the journal was kept",
            path=path,
            code="interrupted",
            got=str(exc) or type(exc).__name__,
            hint="run the same command again to finish or roll back the patch",
        )
    if isinstance(exc, PatchError):
        return exc.with_path(path)
    if isinstance(exc, OSError):
        return _os_error(exc, path)
    return exc  # KeyboardInterrupt and the like: the file is back as it was


def _apply_in_place(fd: int, path: str, plan: SplicePlan, st: os.stat_result) -> str | None:
    """Carry out ``fit`` or ``insert`` under a journal; return why insert is impossible, or None when done."""
    insert_len = plan.insert_len if plan.strategy is Strategy.INSERT else 0
    with contextlib.ExitStack() as lease:
        if insert_len:
            if not plat.IS_LINUX:
                return "insert-range needs Linux"
            if not lease.enter_context(plat.lease_break_handler()):
                return "a write lease can only be taken from the main thread"
            if not plat.take_write_lease(fd):
                return "another process has the file open or mapped"
            lease.callback(plat.release_lease, fd)
        head, tail = _fingerprint(fd, plan.header.data_start, plan.header.data_len)
        journal = Journal(
            strategy=plan.strategy,
            file_size=st.st_size,
            dev=st.st_dev,
            ino=st.st_ino,
            insert_len=insert_len,
            old_prefix=plan.old_prefix,
            new_prefix=plan.new_prefix,
            window=FINGERPRINT_WINDOW,
            data_head=head,
            data_tail=tail,
        )
        _atomic_write(journal_path(path), journal.encode(), os.path.basename(path))
        try:
            _fault("journal-written")
            if insert_len:
                if not plat.insert_range(fd, 0, insert_len):
                    _remove(journal_path(path))
                    return "the filesystem does not support insert-range (tmpfs, btrfs, NFS, ...)"
                _fault("inserted")
            _write_prefix(fd, plan.new_prefix)
            lease.close()  # let waiting openers in as soon as the file is whole again
            plat.fsync(fd)
            _fault("prefix-written")
            _verify(fd, path, plan, (head, tail))
            _fault("verified")
        except BaseException as exc:
            lease.close()
            raise _failed(fd, path, journal, exc) from None
    _remove(journal_path(path))
    return None


def _copy_into(
    src_fd: int,
    src_st: os.stat_result,
    plan: SplicePlan,
    dest: str,
    *,
    in_place: bool,
    release_source: Callable[[], None] | None = None,
) -> None:
    """Write the patched file to a temp beside ``dest`` and rename it over ``dest``."""
    directory, name = os.path.split(dest)
    directory = directory or "."
    _sweep_temps(directory, name)
    header = plan.header
    fingerprint = _fingerprint(src_fd, header.data_start, header.data_len)
    tmp_fd, tmp = _create_temp(directory, name)
    tmp_handle = _Handle(tmp_fd)
    replaced = False
    try:
        _fault("tmp-created")
        prefix = plan.new_prefix
        plat.pwrite_all(tmp_fd, prefix, 0)
        half = header.data_len // 2 if _armed("data-half") else header.data_len
        plat.copy_data(src_fd, tmp_fd, header.data_start, len(prefix), half)
        _fault("data-half")
        plat.copy_data(src_fd, tmp_fd, header.data_start + half, len(prefix) + half, header.data_len - half)
        _fault("data-copied")
        # In place the new file takes the old one's identity; an output is a new file, like cp makes.
        plat.copy_attributes(src_st, tmp_fd, tmp, src_fd=src_fd if in_place else None, owner=in_place)
        plat.fsync(tmp_fd)
        _verify(tmp_fd, tmp, plan, fingerprint)
        _fault("verified")
        if plat.IS_WINDOWS:
            # Windows renames neither an open file nor over one: let go of both (and of the lock) first.
            tmp_handle.close()
            if release_source is not None:
                release_source()
        os.replace(tmp, dest)
        replaced = True
        _fault("replaced")
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


# --------------------------------------------------------------------------------------------
# Public entry points


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
        raise _os_error(exc, name, "cannot open") from None
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
    directory = os.path.dirname(name) or "."
    if not os.access(directory, os.W_OK | os.X_OK):
        return name, WriteError(
            "its directory is not writable (the journal and temp files go beside the file)",
            path=name,
            code="permission",
            hint="write a patched copy elsewhere with -o",
        )
    return name, None


def _plan_read_only(
    target: str, metadata: Mapping[str, str] | None, strategy: Strategy | None
) -> tuple[SplicePlan, bool]:
    """Plan from a read-only open, predicting insert support from the filesystem type; also say if a journal waits."""
    pending = os.path.lexists(journal_path(os.path.realpath(target)))
    try:
        fd = _open_file(target, os.O_RDONLY)
    except OSError as exc:
        raise _os_error(exc, target, "cannot open") from None
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
        raise _os_error(exc, target, "cannot read") from None
    finally:
        _close(fd)
    size = block_size(target)
    plan = plan_write(header, metadata, path=target, block_size=size, strategy=strategy)
    if plan.strategy is Strategy.INSERT and strategy is None and not plat.insert_range_likely(target):
        plan = plan_write(header, metadata, path=target, block_size=size, strategy=Strategy.COPY)
    return plan, pending


def _result(plan: SplicePlan, *, recovered: str | None = None, backup: str | None = None) -> WriteResult:
    return WriteResult(
        path=plan.path,
        changed=plan.changed,
        strategy=plan.strategy,
        old_header_len=plan.old_header_len,
        new_header_len=plan.new_header_len,
        spare=plan.spare,
        recovered=recovered,
        backup=backup,
        output=plan.output,
    )


def _save_backup(path: str, header: Header) -> str:
    """Save the original prefix beside the file, unless an earlier backup already holds the original."""
    saved = backup_path(path)
    if not os.path.lexists(saved):
        _atomic_write(saved, pack_prefix(header.raw), os.path.basename(path))
    return saved


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
        fd, st = _open_locked(target, writable=True, exclusive=True, wait=wait)
        handle = _Handle(fd)
        try:
            recovered = _recover_locked(fd, target)
            st = os.fstat(fd)
            header = _reread(fd, target, expected)
            size = block_size(target)
            plan = plan_write(header, metadata, path=target, block_size=size, strategy=strategy)
            if not plan.changed:
                return _result(plan, recovered=recovered)
            if st.st_nlink > 1:  # a link made since the first look
                raise LinkError(f"has {st.st_nlink} hard links", path=target, hint="write a patched copy with -o")
            saved = _save_backup(target, header) if backup else None
            if plan.strategy is Strategy.INSERT:
                reason = _apply_in_place(fd, target, plan, st)
                if reason is not None:
                    if strategy is Strategy.INSERT:
                        raise WriteError(f"cannot insert in place: {reason}", path=target, code="no-insert")
                    plan = plan_write(header, metadata, path=target, block_size=size, strategy=Strategy.COPY)
            if plan.strategy is Strategy.FIT:
                _apply_in_place(fd, target, plan, st)
            elif plan.strategy is Strategy.COPY:
                _copy_into(fd, st, plan, target, in_place=True, release_source=handle.close)
            return _result(plan, recovered=recovered, backup=saved)
        finally:
            handle.close()
    except OSError as exc:
        raise _os_error(exc, target) from None


def _write_output(
    source: str, metadata: Mapping[str, str] | None, output: str, *, dry_run: bool, wait: float
) -> WriteResult:
    dest = os.path.join(output, os.path.basename(source)) if os.path.isdir(output) else output
    try:
        if os.path.exists(dest):
            if os.path.samefile(source, dest):
                raise UsageError(
                    "the output is the source file itself", path=dest, hint="choose another path, or patch in place"
                )
            mode = stat.S_IMODE(os.stat(dest).st_mode)
            if not mode & (stat.S_IWUSR | stat.S_IWGRP | stat.S_IWOTH) or not os.access(dest, os.W_OK):
                raise WriteError("the output exists and is read-only", path=dest, code="read-only")
        directory = os.path.dirname(os.path.abspath(dest))
        if not os.path.isdir(directory):
            raise WriteError("the output directory does not exist", path=dest, code="not-found")
        # A shared lock: no in-place patch of the source can run while we copy it.
        fd, st = _open_locked(source, writable=False, exclusive=False, wait=wait)
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
            if not dry_run:
                _copy_into(fd, st, plan, dest, in_place=False)
            return _result(plan)
        finally:
            _close(fd)
    except OSError as exc:
        raise _os_error(exc, source if exc.filename == source else dest) from None


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
) -> WriteResult:
    """Replace the ``__metadata__`` of ``path`` (``None``: remove the key), safely; see the module docstring.

    ``expected``: the header the metadata was planned from; the write is refused if the file no longer has it.
    """
    name = os.fspath(path)
    if strategy is Strategy.OUTPUT and output is None:
        raise UsageError("the output strategy needs an output path", path=name)
    if output is not None:
        if strategy not in (None, Strategy.OUTPUT):
            raise UsageError(f"an output path cannot be written with the {strategy} strategy", path=name)
        return _write_output(name, metadata, os.fspath(output), dry_run=dry_run, wait=wait)
    return _write_in_place(
        name,
        metadata,
        dry_run=dry_run,
        backup=backup,
        follow_symlinks=follow_symlinks,
        strategy=strategy,
        wait=wait,
        expected=expected,
    )


def _read_backup(saved: str) -> Header:
    try:
        with open(saved, "rb") as handle:
            blob = handle.read()
        n = parse_length_prefix(blob[:PREFIX_SIZE], len(blob), source=saved)
        if len(blob) != PREFIX_SIZE + n:
            raise HeaderError("backup has bytes after its header", path=saved)
        return parse_header(blob[PREFIX_SIZE:], None, source=saved)
    except HeaderError as exc:
        raise WriteError(
            f"the backup is damaged ({exc.message})", path=saved, code="bad-backup", hint="it cannot be restored"
        ) from None


def restore(path: str | os.PathLike[str], *, follow_symlinks: bool = False, wait: float = 0.0) -> WriteResult:
    """Finish an interrupted patch, then put back the metadata saved by ``backup=True`` and drop the backup."""
    name = os.fspath(path)
    target = os.path.realpath(name) if follow_symlinks else name
    recovered = recover(target, wait=wait)
    saved = backup_path(target)
    if not os.path.lexists(saved):
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
    original = _read_backup(saved)
    current = read_header(target)
    if not same_tensors(original.tensors, current.tensors):
        raise WriteError(
            "the backup does not belong to this file (the tensor tables differ)",
            path=target,
            code="bad-backup",
            hint=f"delete {saved} if it is stale",
        )
    result = write_metadata(target, original.metadata, follow_symlinks=follow_symlinks, wait=wait)
    try:
        _remove(saved)
    except OSError as exc:
        raise _os_error(exc, saved, "restored, but cannot remove the backup") from None
    return dataclasses.replace(result, recovered=recovered or result.recovered, backup=saved)


__all__ = [
    "COPY_BOUNDARY",
    "FAULT_ENV",
    "FAULT_STEPS",
    "Journal",
    "SplicePlan",
    "Strategy",
    "WriteResult",
    "backup_path",
    "block_size",
    "journal_path",
    "plan_write",
    "recover",
    "restore",
    "write_metadata",
]
