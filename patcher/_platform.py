"""Operating-system primitives the header writer needs, each with a portable fallback.

Linux gets the fast and safe paths (``fallocate`` insert-range, write leases, ``copy_file_range``,
``flock``). Elsewhere the same functions report "unsupported" (``False``) and the caller takes the
copy path, which needs nothing beyond ``os``: a temp file, a chunked copy, ``os.replace``.
Nothing here knows about safetensors.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import signal
import stat
import sys
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any

from . import progress

IS_LINUX = sys.platform.startswith("linux")
IS_WINDOWS = sys.platform == "win32"
IS_MACOS = sys.platform == "darwin"

if sys.platform != "win32":
    import fcntl

#: ``fallocate`` mode bits (linux/falloc.h): shift everything after ``offset`` forward / back by ``length``.
FALLOC_FL_COLLAPSE_RANGE = 0x08
FALLOC_FL_INSERT_RANGE = 0x20
#: ``fcntl`` commands for leases (linux/fcntl.h, F_LINUX_SPECIFIC_BASE + 0 / + 1); Python < 3.12 lacks the names.
F_SETLEASE = 1024
F_GETLEASE = 1025
#: Filesystems known to implement insert-range (used only to predict the strategy in a dry run).
INSERT_RANGE_FILESYSTEMS = frozenset({"ext4", "xfs"})
#: Buffer of the portable copy loop (``copy_file_range`` needs none).
COPY_CHUNK = 8 * 1024 * 1024
#: Bytes per step of a copy: one ``copy_file_range`` call, one progress report (a redraw every ~0.1 s at disk
#: speed) and one writeback kick (:func:`start_writeback`).
COPY_STEP = 64 * 1024 * 1024
#: ``ioctl`` numbers of the inode flags (linux/fs.h: ``_IOR('f', 1, long)`` / ``_IOW('f', 2, long)``, 64-bit ABI).
FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
#: Inode flags (``chattr``): the two that forbid our writes, and those a replacement file can carry over.
FS_IMMUTABLE_FL = 0x10
FS_APPEND_FL = 0x20
#: s (secure deletion), u (undeletable), c (compress), S (sync), d (no dump), A (no atime), t (no tail merging),
#: C (no copy-on-write; only settable on an empty file, so flags are copied before any data).
FS_COPYABLE_FLAGS = 0x1 | 0x2 | 0x4 | 0x8 | 0x40 | 0x80 | 0x8000 | 0x800000
#: Signals deferred while a rollback runs (a second Ctrl-C, a hang-up or a polite kill must not cut it short).
_DEFERRED_SIGNALS = ("SIGINT", "SIGTERM", "SIGHUP", "SIGQUIT")
#: Where the Windows lock byte lives: far past any real file end, so it never blocks reading the data.
_WINDOWS_LOCK_OFFSET = 1 << 62

# errno values that mean "this kernel / filesystem cannot do that", as opposed to a real I/O failure.
_UNSUPPORTED = frozenset({errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.ENOSYS, errno.ENOTTY})
# copy_file_range errors after which the portable loop can still do the job.
_CFR_FALLBACK = frozenset({errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF})
# fsync of a directory is not supported everywhere (some FUSE and network filesystems): not worth failing for.
_DIR_FSYNC_IGNORED = frozenset({errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EBADF, errno.EACCES})

_fallocate_fn: Any = None
_fallocate_loaded = False


def _fallocate() -> Any:
    """Return libc's 64-bit ``fallocate`` through ctypes, or ``None`` when there is none."""
    global _fallocate_fn, _fallocate_loaded
    if not _fallocate_loaded:
        _fallocate_loaded = True
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = getattr(libc, "fallocate64", None) or libc.fallocate
        except (OSError, AttributeError):
            fn = None
        if fn is not None:
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
        _fallocate_fn = fn
    return _fallocate_fn


def shift_range(fd: int, mode: int, offset: int, length: int) -> bool:
    """Insert or collapse ``length`` bytes at ``offset``; return False where the filesystem cannot."""
    if not IS_LINUX:
        return False
    fn = _fallocate()
    if fn is None:
        return False
    while True:
        if fn(fd, mode, offset, length) == 0:
            return True
        err = ctypes.get_errno()
        if err == errno.EINTR:
            continue
        if err in _UNSUPPORTED:
            return False
        raise OSError(err, os.strerror(err))


def insert_range(fd: int, offset: int, length: int) -> bool:
    """Insert a hole of ``length`` bytes at ``offset``, shifting the rest; False if unsupported."""
    return shift_range(fd, FALLOC_FL_INSERT_RANGE, offset, length)


def collapse_range(fd: int, offset: int, length: int) -> bool:
    """Remove ``length`` bytes at ``offset``, shifting the rest back; False if unsupported."""
    return shift_range(fd, FALLOC_FL_COLLAPSE_RANGE, offset, length)


# --------------------------------------------------------------------------------------------
# Leases: proof that no other process has the file open or mapped


def take_write_lease(fd: int) -> bool:
    """Take a Linux write lease on ``fd`` (opened for writing); False if another process holds the file."""
    if not IS_LINUX:
        return False
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_WRLCK)
    except OSError:  # EAGAIN/EBUSY: open or mapped elsewhere; EACCES: not the owner; EINVAL: no lease support
        return False
    return True


def leases_supported() -> bool:
    """Return whether write leases exist here (Linux); elsewhere no process can prove it holds a file alone."""
    return IS_LINUX


def release_lease(fd: int) -> None:
    """Drop the lease taken by :func:`take_write_lease` (no error if there is none)."""
    if IS_LINUX:
        with contextlib.suppress(OSError):
            fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)


@contextlib.contextmanager
def lease_break_handler() -> Iterator[bool]:
    """Catch SIGIO while a lease is held (a lease break must not kill us); yield False where impossible.

    The kernel signals the lease holder with SIGIO, whose default action terminates the process.
    Python can install a handler only from the main thread.
    """
    sig = getattr(signal, "SIGIO", None)
    if sig is None or threading.current_thread() is not threading.main_thread():
        yield False
        return
    breaks: list[int] = []

    def on_break(signum: int, frame: FrameType | None) -> None:
        # The opener waits until we release the lease, which we do as soon as the prefix is written.
        breaks.append(signum)

    previous: Callable[[int, FrameType | None], Any] | int | None = signal.signal(sig, on_break)
    try:
        yield True
    finally:
        signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


# --------------------------------------------------------------------------------------------
# Advisory locks between nunchaku-patch processes


def try_lock(fd: int, *, exclusive: bool = True) -> bool:
    """Try to lock ``fd`` without waiting; return False if another process holds a conflicting lock.

    POSIX: ``flock`` (released when the fd is closed). Windows: an exclusive ``msvcrt`` lock on one byte
    far past the end of the file, so reads of the real bytes are not blocked. Elsewhere: no locking.
    """
    if sys.platform == "win32":
        import msvcrt

        position = os.lseek(fd, 0, os.SEEK_CUR)
        os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        finally:
            os.lseek(fd, position, os.SEEK_SET)
        return True
    try:
        fcntl.flock(fd, (fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH) | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def unlock(fd: int) -> None:
    """Release the lock taken by :func:`try_lock` (closing the fd does it too)."""
    with contextlib.suppress(OSError):
        if sys.platform == "win32":
            import msvcrt

            position = os.lseek(fd, 0, os.SEEK_CUR)
            os.lseek(fd, _WINDOWS_LOCK_OFFSET, os.SEEK_SET)
            try:
                msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
            finally:
                os.lseek(fd, position, os.SEEK_SET)
        else:
            fcntl.flock(fd, fcntl.LOCK_UN)


# --------------------------------------------------------------------------------------------
# Durable, positioned I/O


def fsync(fd: int) -> None:
    """Flush ``fd`` to stable storage (``F_FULLFSYNC`` on macOS, where plain fsync stops at the drive cache)."""
    if IS_MACOS:
        full = getattr(fcntl, "F_FULLFSYNC", None)
        if full is not None:
            try:
                fcntl.fcntl(fd, full)
                return
            except OSError:
                pass
    os.fsync(fd)


def fsync_dir(path: str) -> None:
    """Flush a directory entry change (create, rename, unlink); skipped where unsupported (Windows)."""
    if IS_WINDOWS:
        return
    try:
        dfd = os.open(path or ".", os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return
    try:
        os.fsync(dfd)
    except OSError as exc:
        if exc.errno not in _DIR_FSYNC_IGNORED:
            raise
    finally:
        os.close(dfd)


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of ``data`` at ``offset`` (looping on short writes)."""
    view = memoryview(data)
    while view:
        if hasattr(os, "pwrite"):
            written = os.pwrite(fd, view, offset)
        else:  # Windows: no pwrite; the fd is ours alone, so seeking is safe
            os.lseek(fd, offset, os.SEEK_SET)
            written = os.write(fd, view)
        if written <= 0:
            raise OSError(errno.EIO, "write returned no progress")
        view = view[written:]
        offset += written


def pread_exact(fd: int, size: int, offset: int) -> bytes:
    """Read up to ``size`` bytes at ``offset``; shorter only at end of file."""
    chunks: list[bytes] = []
    while size > 0:
        if hasattr(os, "pread"):
            chunk = os.pread(fd, min(size, COPY_CHUNK), offset)
        else:
            os.lseek(fd, offset, os.SEEK_SET)
            chunk = os.read(fd, min(size, COPY_CHUNK))
        if not chunk:
            break
        chunks.append(chunk)
        size -= len(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Ask the kernel to start writing a range of ``fd`` out now, and to drop it from the cache once clean.

    On Linux ``POSIX_FADV_DONTNEED`` starts asynchronous writeback of the range's dirty pages. Without it a
    copy sits dirty in the page cache until the final fsync, which then waits for all of it; with it the disk
    writes overlap the copy, and copying a 7 GB model does not push everything else out of memory. A hint only:
    where it is missing (macOS, Windows) or refused, the final fsync does the work, so nothing depends on it.
    """
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        with contextlib.suppress(OSError):
            advise(fd, offset, length, os.POSIX_FADV_DONTNEED)


def copy_data(src: int, dst: int, src_offset: int, dst_offset: int, length: int) -> None:
    """Copy ``length`` bytes between files, kernel-side with ``copy_file_range`` where it works.

    The copy goes in steps of :data:`COPY_STEP`; each step is reported to the active progress bar, if any
    (:mod:`patcher.progress`), and handed to writeback (:func:`start_writeback`) once copied. The caller still
    fsyncs ``dst``: that, not the writeback hint, is the guarantee.
    """
    bar = progress.active()
    use_kernel = hasattr(os, "copy_file_range")
    done = 0
    while done < length:
        step = min(length - done, COPY_STEP)
        moved = 0
        while moved < step:
            at_src, at_dst = src_offset + done + moved, dst_offset + done + moved
            if use_kernel:
                try:
                    count = os.copy_file_range(src, dst, step - moved, at_src, at_dst)
                except OSError as exc:
                    if exc.errno in _CFR_FALLBACK:
                        use_kernel = False
                        continue
                    raise
            else:
                chunk = pread_exact(src, min(step - moved, COPY_CHUNK), at_src)
                count = len(chunk)
                if count:
                    pwrite_all(dst, chunk, at_dst)
            if count <= 0:
                raise OSError(errno.EIO, "the source file ended before its data region did")
            moved += count
        start_writeback(dst, dst_offset + done, step)
        done += step
        if bar is not None:
            bar.advance(step)


def keep_identity(source: os.stat_result, src_fd: int, dst_fd: int) -> list[str]:
    """Give a new file the owner, group and inode flags of ``src_fd`` where allowed; return what could not be kept.

    Root gives the file away outright. Anyone else keeps the group when a member of it (``fchown(-1, gid)``), and
    can never keep another user's ownership. Called on an empty file, before its data (``chattr +C`` needs that).
    """
    lost: list[str] = []
    if hasattr(os, "fchown"):
        is_root = hasattr(os, "geteuid") and os.geteuid() == 0
        with contextlib.suppress(OSError):
            os.fchown(dst_fd, source.st_uid if is_root else -1, source.st_gid)
        now = os.fstat(dst_fd)
        if now.st_uid != source.st_uid:
            lost.append(f"owner (uid {source.st_uid} -> {now.st_uid})")
        if now.st_gid != source.st_gid:
            lost.append(f"group (gid {source.st_gid} -> {now.st_gid})")
    missing = copy_inode_flags(src_fd, dst_fd)
    if missing:
        lost.append(f"inode flags (0x{missing:x}, see lsattr)")
    return lost


def copy_attributes(source: os.stat_result, dst_fd: int, dst_path: str, *, src_fd: int | None = None) -> None:
    """Give a new file the source's permission bits, and its xattrs (ACLs, user.* tags) when ``src_fd`` is given."""
    mode = stat.S_IMODE(source.st_mode)
    if hasattr(os, "fchmod"):
        os.fchmod(dst_fd, mode)
    else:
        os.chmod(dst_path, mode)
    if src_fd is not None and hasattr(os, "listxattr"):
        # Best effort (ACLs, user.* tags): a filesystem without xattrs is no reason to fail the patch.
        with contextlib.suppress(OSError):
            for name in os.listxattr(src_fd):
                with contextlib.suppress(OSError):
                    os.setxattr(dst_fd, name, os.getxattr(src_fd, name))


@contextlib.contextmanager
def deferred_signals() -> Iterator[None]:
    """Hold back Ctrl-C, SIGTERM, SIGHUP and SIGQUIT for the duration of the block, then deliver them.

    A rollback takes milliseconds; one cut short leaves work for the next run. The signals stay pending in the
    kernel and arrive when the block ends (Ctrl-C then raises KeyboardInterrupt, SIGTERM ends the process as
    usual). Where signals cannot be masked (Windows, a non-main thread) this does nothing.
    """
    mask = getattr(signal, "pthread_sigmask", None)
    if mask is None or threading.current_thread() is not threading.main_thread():
        yield
        return
    wanted = {getattr(signal, name) for name in _DEFERRED_SIGNALS if hasattr(signal, name)}
    previous = mask(signal.SIG_BLOCK, wanted)
    try:
        yield
    finally:
        mask(signal.SIG_SETMASK, previous)


# --------------------------------------------------------------------------------------------
# Inode flags (chattr)


def inode_flags(fd: int) -> int | None:
    """Return the inode flags of ``fd`` (``FS_IOC_GETFLAGS``), ``None`` where the filesystem or OS has none."""
    if not IS_LINUX:
        return None
    buf = bytearray(8)
    try:
        fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    except OSError:
        return None
    return int.from_bytes(buf[:4], sys.byteorder)


def path_flags(path: str) -> int | None:
    """Return the inode flags of ``path`` (a file or a directory, not followed if a link), ``None`` if unknown."""
    if not IS_LINUX:
        return None
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0))
    except OSError:
        return None
    try:
        return inode_flags(fd)
    finally:
        os.close(fd)


def copy_inode_flags(src_fd: int, dst_fd: int) -> int:
    """Give ``dst_fd`` the carry-over inode flags of ``src_fd``; return the flags that could not be set."""
    flags = inode_flags(src_fd)
    if not flags or not flags & FS_COPYABLE_FLAGS:
        return 0
    wanted = flags & FS_COPYABLE_FLAGS
    current = inode_flags(dst_fd) or 0
    with contextlib.suppress(OSError):
        fcntl.ioctl(dst_fd, FS_IOC_SETFLAGS, (current | wanted).to_bytes(8, sys.byteorder))
    return wanted & ~(inode_flags(dst_fd) or 0)


# --------------------------------------------------------------------------------------------
# Filesystem facts


def block_size(path: str) -> int:
    """Return the filesystem block size of ``path`` (the unit of insert-range), 4096 where unknown."""
    if hasattr(os, "statvfs"):
        try:
            size = os.statvfs(path).f_bsize
        except OSError:
            return 4096
        if size > 0:
            return int(size)
    return 4096


def filesystem_type(path: str) -> str | None:
    """Return the Linux filesystem type holding ``path`` (``ext4``, ``tmpfs``...), ``None`` if unknown."""
    if not IS_LINUX:
        return None
    try:
        dev = os.stat(path).st_dev
        wanted = f"{os.major(dev)}:{os.minor(dev)}"
        with open("/proc/self/mountinfo", encoding="utf-8", errors="replace") as mounts:
            for line in mounts:
                left, sep, right = line.partition(" - ")
                fields = left.split()
                if sep and len(fields) > 2 and fields[2] == wanted and right.split():
                    return right.split()[0]
    except OSError:
        return None
    return None


def insert_range_likely(path: str) -> bool:
    """Guess whether insert-range works on ``path``'s filesystem (only for predictions; writes try it)."""
    return IS_LINUX and filesystem_type(path) in INSERT_RANGE_FILESYSTEMS


def kill_self() -> None:
    """Die at once, as ``kill -9`` would (used by the fault-injection points)."""
    sigkill = getattr(signal, "SIGKILL", None)
    if sigkill is not None:
        os.kill(os.getpid(), sigkill)
    os._exit(137)
