"""The journal of an in-place patch: what it records, when it is trusted, and how an interrupted patch is repaired.

Before ``fit`` or ``insert`` touches a file, a journal ``.NAME.npatch-journal`` is written beside it (to a temp
name, flushed, renamed): the old prefix (the first ``8 + N`` bytes, byte for byte), the new metadata and header
length, a sha256 of the new prefix, the file's size and identity, and sha256 fingerprints of both ends of the data
region. The new prefix itself is not stored: it is the old tensor table with the new metadata, serialized again
and checked against its sha256, so the journal cannot carry a tensor table of its own.

Recovery decides from what is on disk, never from a phase remembered by a process that may have died. With the
data region where the journal says (size and fingerprints), every state that our writes, our rollback, and our
recovery can leave is a byte-wise mix of a few known prefixes (the old one, the new one, the old one after the
hole an insert opens, the new one after the inserted blocks are collapsed again); recovery recognises each mix and
writes one whole prefix over it, so a fault during recovery leaves a state recovery recognises again.

A journal is trusted only if it is a regular file owned by the file's owner or by us, not writable by group or
others, its checksum holds, its new header length stays within the old one plus the inserted blocks, and, when the
file's current header is valid, that header has the journal's tensor table.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import struct
from collections.abc import Mapping

from . import _files as files
from . import _platform as plat
from ._record import dataclass
from .errors import HeaderError, MetadataError, PatchError, RecoveryError, WriteError
from .header import (
    MAX_HEADER_LEN,
    PREFIX_SIZE,
    Header,
    check_metadata,
    pack_prefix,
    parse_header,
    read_header_fd,
    reserialize,
    same_tensors,
)

MAGIC = b"nunchaku-patch journal\n"
VERSION = 2
#: Bytes hashed at each end of the data region to recognise the file again (cheap, never the whole region).
FINGERPRINT_WINDOW = 64 * 1024
#: Fault points of the rollback (a fault after a first fault), outside the strategies' FAULT_STEPS.
ROLLBACK_STEPS = ("rollback-collapsed", "rollback-half")
_DIGEST_SIZE = 32
_HEAD = len(MAGIC) + 8
#: No journal of ours is larger: the old prefix, the metadata, a little JSON.
_JOURNAL_LIMIT = 2 * (MAX_HEADER_LEN + PREFIX_SIZE) + (1 << 20)


class DamagedJournal(Exception):
    """A journal file that is not a complete record of ours."""


def padded(compact: bytes, length: int, path: str) -> bytes:
    """Return ``compact`` padded with spaces to ``length``; refuse a header larger than safetensors allows."""
    if length > MAX_HEADER_LEN:
        raise MetadataError(
            "new header is larger than safetensors allows",
            path=path,
            code="header-too-large",
            expected=f"at most {MAX_HEADER_LEN:,} bytes",
            got=f"{length:,}",
        )
    return compact + b" " * (length - len(compact))


def new_header_bytes(metadata: Mapping[str, str] | None, old: Header, length: int, path: str = "") -> bytes:
    """Return the new header a patch writes: ``old``'s tensor table with ``metadata``, padded to ``length``."""
    return padded(reserialize(old, metadata), length, path)


@dataclass(frozen=True)
class Journal:
    """What an in-place patch intends, written and flushed before the file is touched."""

    #: ``"fit"`` or ``"insert"``.
    strategy: str
    #: Size of the file before the patch.
    file_size: int
    dev: int
    ino: int
    #: K, the bytes inserted at offset 0 (0 for fit).
    insert_len: int
    #: The first 8 + N bytes of the file before the patch.
    old_prefix: bytes
    #: The metadata written (``None``: no ``__metadata__`` key) and N', the new header length.
    metadata: dict[str, str] | None
    new_header_len: int
    #: sha256 (hex) of the new prefix, to check it when it is rebuilt.
    new_digest: str
    #: sha256 (hex) of the first and last ``window`` bytes of the data region.
    window: int
    data_head: str
    data_tail: str

    @property
    def old_prefix_offset(self) -> int:
        """Return where the old prefix starts inside the encoded journal (for the user who wants it back)."""
        return _HEAD + len(self._meta())

    def _meta(self) -> bytes:
        return json.dumps(
            {
                "strategy": self.strategy,
                "file_size": self.file_size,
                "dev": self.dev,
                "ino": self.ino,
                "insert_len": self.insert_len,
                "old_prefix_len": len(self.old_prefix),
                # Pairs, in order: the new header is rebuilt from them, and its bytes must come out the same.
                "metadata": None if self.metadata is None else [[k, v] for k, v in self.metadata.items()],
                "new_header_len": self.new_header_len,
                "new_digest": self.new_digest,
                "window": self.window,
                "data_head": self.data_head,
                "data_tail": self.data_tail,
            },
            sort_keys=True,
        ).encode("ascii")

    def encode(self) -> bytes:
        """Return the record: magic, version, JSON fields, the old prefix, then a sha256 of all of it."""
        meta = self._meta()
        body = b"".join((MAGIC, struct.pack("<II", VERSION, len(meta)), meta, self.old_prefix))
        return body + hashlib.sha256(body).digest()

    @classmethod
    def decode(cls, blob: bytes) -> Journal:
        """Parse a record written by :meth:`encode`; raise if it is torn, damaged or not ours."""
        if len(blob) < _HEAD + _DIGEST_SIZE or not blob.startswith(MAGIC):
            raise DamagedJournal("not a nunchaku-patch journal")
        body, digest = blob[:-_DIGEST_SIZE], blob[-_DIGEST_SIZE:]
        if hashlib.sha256(body).digest() != digest:
            raise DamagedJournal("its checksum does not match (torn or damaged)")
        version, meta_len = struct.unpack_from("<II", blob, len(MAGIC))
        if version != VERSION:
            raise RecoveryError(
                f"the journal has version {version}, which this nunchaku-patch does not know",
                code="journal-version",
                expected=VERSION,
                hint="recover with the nunchaku-patch version that wrote it",
            )
        try:
            meta = json.loads(body[_HEAD : _HEAD + meta_len])
            old_len = int(meta["old_prefix_len"])
            if _HEAD + meta_len + old_len != len(body):
                raise ValueError("lengths do not add up")
            pairs = meta["metadata"]
            metadata = None if pairs is None else dict((str(k), v) for k, v in pairs)
            return cls(
                strategy=str(meta["strategy"]),
                file_size=int(meta["file_size"]),
                dev=int(meta["dev"]),
                ino=int(meta["ino"]),
                insert_len=int(meta["insert_len"]),
                old_prefix=body[_HEAD + meta_len :],
                metadata=check_metadata(metadata) if metadata is not None else None,
                new_header_len=int(meta["new_header_len"]),
                new_digest=str(meta["new_digest"]),
                window=int(meta["window"]),
                data_head=str(meta["data_head"]),
                data_tail=str(meta["data_tail"]),
            )
        except (ValueError, KeyError, TypeError, MetadataError) as exc:
            raise DamagedJournal(f"its fields are malformed ({exc})") from None


def fingerprint(fd: int, data_start: int, data_len: int, window: int = FINGERPRINT_WINDOW) -> tuple[str, str]:
    """Return sha256 of the first and last ``window`` bytes of the data region."""
    size = min(window, data_len)
    head = hashlib.sha256(plat.pread_exact(fd, size, data_start)).hexdigest()
    tail = hashlib.sha256(plat.pread_exact(fd, size, data_start + data_len - size)).hexdigest()
    return head, tail


def make_journal(
    st: os.stat_result,
    strategy: str,
    insert_len: int,
    old_prefix: bytes,
    new_prefix: bytes,
    metadata: Mapping[str, str] | None,
    prints: tuple[str, str],
) -> Journal:
    """Return the journal of a patch of the file ``st`` from ``old_prefix`` to ``new_prefix``."""
    return Journal(
        strategy=strategy,
        file_size=st.st_size,
        dev=st.st_dev,
        ino=st.st_ino,
        insert_len=insert_len,
        old_prefix=old_prefix,
        metadata=dict(metadata) if metadata is not None else None,
        new_header_len=len(new_prefix) - PREFIX_SIZE,
        new_digest=hashlib.sha256(new_prefix).hexdigest(),
        window=FINGERPRINT_WINDOW,
        data_head=prints[0],
        data_tail=prints[1],
    )


# --------------------------------------------------------------------------------------------
# What the journal says, checked


@dataclass(frozen=True)
class _Intent:
    """A trusted journal with its prefixes: the old one parsed, the new one rebuilt and checked."""

    journal: Journal
    path: str
    jpath: str
    old_header: Header
    new_prefix: bytes


def _mismatch(path: str, jpath: str, journal: Journal, what: str) -> RecoveryError:
    start = journal.old_prefix_offset
    size = len(journal.old_prefix)
    return RecoveryError(
        f"the file does not match its interrupted-patch journal ({what}); nothing was changed",
        path=path,
        code="journal-mismatch",
        hint=(
            f"{jpath} keeps the file's old header: its bytes {start:,} to {start + size:,} are the first {size:,} "
            f"bytes the file had before the patch (tail -c +{start + 1} '{jpath}' | head -c {size} > old-header.bin); "
            "keep it until the file is sorted out"
        ),
    )


def _intent(path: str, jpath: str, journal: Journal) -> _Intent:
    """Check that ``journal`` describes a patch we could have made; rebuild its new prefix."""
    old = journal.old_prefix
    try:
        if len(old) < PREFIX_SIZE:
            raise HeaderError("the old prefix is shorter than a length prefix")
        old_header = parse_header(old[PREFIX_SIZE:], None, source=jpath)
        if PREFIX_SIZE + old_header.header_len != len(old):
            raise HeaderError("the old prefix has bytes after its header")
    except HeaderError as exc:
        raise _mismatch(path, jpath, journal, f"its old header is not valid: {exc.message}") from None
    # A patch only ever keeps the header length (fit) or grows it by the blocks it inserts.
    if journal.insert_len < 0 or journal.new_header_len != old_header.header_len + journal.insert_len:
        raise _mismatch(
            path,
            jpath,
            journal,
            f"its new header length {journal.new_header_len:,} is not the old {old_header.header_len:,} plus the "
            f"{journal.insert_len:,} inserted bytes",
        )
    try:
        new_prefix = pack_prefix(new_header_bytes(journal.metadata, old_header, journal.new_header_len, path))
        parse_header(new_prefix[PREFIX_SIZE:], None, source=jpath)
    except (HeaderError, MetadataError) as exc:
        raise _mismatch(path, jpath, journal, f"its new header cannot be rebuilt ({exc.message})") from None
    # A patch never changes the tensor table: a journal whose new prefix is not the old table with the new
    # metadata (two tensors' offsets swapped, say) was not written by us, whoever wrote it.
    if hashlib.sha256(new_prefix).hexdigest() != journal.new_digest:
        raise _mismatch(path, jpath, journal, "its new header is not the old tensor table with the new metadata")
    return _Intent(journal, path, jpath, old_header, new_prefix)


def _torn(current: bytes, *candidates: bytes) -> bool:
    """Return whether every byte of ``current`` is the byte of one of ``candidates`` (interrupted writes)."""
    if any(len(c) != len(current) for c in candidates):
        return False
    step = 4096
    for start in range(0, len(current), step):
        cur = current[start : start + step]
        parts = [c[start : start + step] for c in candidates]
        if cur in parts:
            continue
        for i, byte in enumerate(cur):
            if all(part[i] != byte for part in parts):
                return False
    return True


def _check_data(fd: int, intent: _Intent, data_start: int) -> None:
    journal = intent.journal
    data_len = os.fstat(fd).st_size - data_start
    prints = fingerprint(fd, data_start, data_len, journal.window) if data_len >= 0 else None
    if prints != (journal.data_head, journal.data_tail):
        raise _mismatch(intent.path, intent.jpath, journal, "its data region is not the one the journal describes")


def _check_table(fd: int, intent: _Intent) -> None:
    """If the file's header is valid now, it must have the journal's tensor table (else the journal is not its)."""
    try:
        now = read_header_fd(fd, source=intent.path)
    except HeaderError:
        return  # half-written: the journal is what repairs it
    if not same_tensors(now.tensors, intent.old_header.tensors):
        raise _mismatch(intent.path, intent.jpath, intent.journal, "the file's tensor table is not the journal's")


def _put(fd: int, path: str, prefix: bytes) -> None:
    """Write ``prefix`` over the start of the file, flush it, and check it is there."""
    files.write_prefix(fd, prefix, "rollback-half")
    plat.fsync(fd)
    if plat.pread_exact(fd, len(prefix), 0) != prefix:
        raise RecoveryError("the header read back differs from the one written", path=path, code="verify")


def roll_back(fd: int, intent: _Intent) -> None:
    """Put the old prefix back, collapsing the inserted blocks first if they are there."""
    journal = intent.journal
    size = os.fstat(fd).st_size
    if journal.insert_len and size == journal.file_size + journal.insert_len:
        _check_data(fd, intent, len(journal.old_prefix) + journal.insert_len)
        if not plat.collapse_range(fd, 0, journal.insert_len):
            raise OSError(errno.EOPNOTSUPP, "collapse-range is not supported")  # the next run rolls forward
        files.fault("rollback-collapsed")
    elif size != journal.file_size:
        raise _mismatch(intent.path, intent.jpath, journal, f"its size is {size:,} bytes")
    _put(fd, intent.path, journal.old_prefix)


def replay(fd: int, intent: _Intent) -> str:
    """Finish or roll back the patch ``intent`` describes; raise without writing if the file does not match."""
    journal, path = intent.journal, intent.path
    st = os.fstat(fd)
    same_file = (st.st_dev, st.st_ino) == (journal.dev, journal.ino)
    old, new, k = journal.old_prefix, intent.new_prefix, journal.insert_len
    _check_table(fd, intent)
    if st.st_size == journal.file_size:
        _check_data(fd, intent, len(old))
        current = plat.pread_exact(fd, len(old), 0)
        if current == old:
            return "rolled back"  # nothing had been written, or the rollback had finished
        if k == 0 and current == new:
            plat.fsync(fd)
            return "finished"
        # Fit: a mix of old and new (a torn write either way). Insert: the blocks were collapsed again by a
        # rollback, leaving the new prefix's tail where the old prefix goes, partly overwritten by the old one.
        candidates = [old, new] if k == 0 else [old, new[k : k + len(old)]]
        if same_file and _torn(current, *candidates):
            if k == 0:
                _put(fd, path, new)
                return "finished"
            _put(fd, path, old)
            return "rolled back"
        raise _mismatch(path, intent.jpath, journal, "its header is none of the states a patch or rollback leaves")
    if k and st.st_size == journal.file_size + k:
        _check_data(fd, intent, len(old) + k)
        current = plat.pread_exact(fd, len(new), 0)
        if current == new:
            plat.fsync(fd)
            return "finished"
        # After the insert the first K bytes are a hole (zeros) followed by the old prefix.
        if same_file and _torn(current, bytes(k) + old, new):
            _put(fd, path, new)
            return "finished"
        raise _mismatch(path, intent.jpath, journal, "the inserted space holds something else")
    expected = f"{journal.file_size:,}" + (f" or {journal.file_size + k:,}" if k else "")
    raise _mismatch(path, intent.jpath, journal, f"its size is {st.st_size:,} bytes, expected {expected}")


def load(fd: int, path: str) -> _Intent | None:
    """Read and check the journal of the locked file ``fd``: ``None`` if there is none.

    A damaged journal beside a valid file is removed (a journal gets its name only by a rename after being
    flushed, so a damaged one was never a record of ours that matters); beside a broken file it is refused.
    """
    jpath = files.journal_path(path)
    try:
        blob = files.read_trusted(jpath, os.fstat(fd), "interrupted-patch journal", limit=_JOURNAL_LIMIT)
    except WriteError as exc:
        raise RecoveryError(exc.message, path=jpath, code=exc.code, hint=exc.hint) from None
    if blob is None:
        return None
    try:
        journal = Journal.decode(blob)
    except RecoveryError as exc:
        raise exc.with_path(path) from None
    except DamagedJournal as exc:
        try:
            read_header_fd(fd, source=path)
        except HeaderError as bad:
            raise RecoveryError(
                f"found a damaged journal ({exc}) and the header is invalid ({bad.message}); nothing was changed",
                path=path,
                code="journal-damaged",
                hint=f"restore the file from a backup or download; keep {jpath} until then",
            ) from None
        files.remove(jpath)
        raise _Discarded from None
    return _intent(path, jpath, journal)


class _Discarded(Exception):
    """A damaged journal beside a valid file was removed."""


def recover_locked(fd: int, path: str) -> str | None:
    """Finish or roll back an interrupted patch of the locked file ``fd``; sweep our stale temp files."""
    directory, name = os.path.split(path)
    files.sweep_temps(directory, name)
    try:
        intent = load(fd, path)
    except _Discarded:
        return "discarded"
    if intent is None:
        return None
    with plat.deferred_signals():  # a Ctrl-C waits for the few milliseconds recovery takes
        outcome = replay(fd, intent)
        # Not flushed: a journal that comes back after a power cut finds the file done and is removed again.
        files.remove(intent.jpath, sync_dir=False)
    return outcome


def recover(path: str | os.PathLike[str], *, wait: float = 0.0) -> str | None:
    """Finish or roll back an interrupted patch of ``path``; return what was done, ``None`` if nothing."""
    name = os.fspath(path)
    jpath = files.journal_path(name)
    if not os.path.lexists(jpath):
        directory, base = os.path.split(name)
        files.sweep_temps(directory, base)
        return None
    if not os.path.lexists(name):
        raise RecoveryError(
            "found an interrupted-patch journal but the file is gone",
            path=name,
            hint=f"{jpath} keeps the file's old header; put the file back to let nunchaku-patch repair it",
        )
    try:
        fd, _ = files.open_locked(name, writable=True, exclusive=True, wait=wait)
        try:
            return recover_locked(fd, name)
        finally:
            files.close(fd)
    except OSError as exc:
        raise files.os_error(exc, name, "cannot recover") from None


def failed(fd: int, path: str, journal: Journal, exc: BaseException) -> BaseException:
    """Roll back after ``exc`` and return what to raise; keep the journal if even that fails.

    Signals are held back during the rollback: a second Ctrl-C lets it finish, then interrupts (exit 130).
    """
    with plat.deferred_signals():
        try:
            intent = _intent(path, files.journal_path(path), journal)
            roll_back(fd, intent)
            files.remove(intent.jpath, sync_dir=False)
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
        return files.os_error(exc, path)
    return exc  # KeyboardInterrupt and the like: the file is back as it was


__all__ = [
    "FINGERPRINT_WINDOW",
    "ROLLBACK_STEPS",
    "DamagedJournal",
    "Journal",
    "failed",
    "fingerprint",
    "make_journal",
    "recover",
    "recover_locked",
]
