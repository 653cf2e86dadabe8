"""The file handling the writers share: names beside a file, safe opens, locks, temp files, trust and errors.

Every auxiliary file (journal, backup, temp) is opened without following links and without blocking, and refused
unless it is a regular file; one that another user could have planted is refused too (:func:`check_trusted`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import stat
import time

from . import _platform as plat
from .errors import LinkError, LockedError, WriteError
from .header import open_nonblocking

#: Environment variable naming the step at which to die with SIGKILL (fault-injection tests).
FAULT_ENV = "NUNCHAKU_PATCH_FAULT"

TEMP_SUFFIX = ".tmp"
_LOCK_POLL = 0.05
_REOPEN_TRIES = 8
# Room for our prefix and suffix within the usual 255-byte name limit.
_NAME_LIMIT = 200
O_BINARY = getattr(os, "O_BINARY", 0)
O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_ERRNO_HINTS = {
    errno.ENOSPC: "free some disk space, or write a patched copy to another disk with -o",
    errno.EDQUOT: "free some quota, or write a patched copy elsewhere with -o",
    errno.EFBIG: "the file size limit (ulimit -f) is smaller than the file",
    errno.EROFS: "the filesystem is read-only; write a patched copy elsewhere with -o",
    errno.EACCES: "check the permissions, or write a patched copy with -o",
    errno.EPERM: "check the permissions and attributes (lsattr: chattr -i, chattr -a), or write a patched copy with -o",
    errno.EIO: "the disk reported an I/O error; check it before trying again",
}


# --------------------------------------------------------------------------------------------
# Names beside the file


def short_name(name: str) -> str:
    """Return ``name``, or a readable head and a hash of it when too long for our prefixes and suffixes."""
    if len(name) <= _NAME_LIMIT:
        return name
    return name[: _NAME_LIMIT - 17] + "-" + hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]


def temp_prefix(name: str) -> str:
    return f".{short_name(name)}.npatch-"


def journal_path(path: str | os.PathLike[str]) -> str:
    """Return where the journal of an in-place patch of ``path`` lives: ``{dir}/.{name}.npatch-journal``."""
    directory, name = os.path.split(os.fspath(path))
    return os.path.join(directory, f".{short_name(name)}.npatch-journal")


def backup_path(path: str | os.PathLike[str]) -> str:
    """Return where ``backup=True`` saves the original prefix of ``path``: ``{path}.npatch-backup``."""
    return os.fspath(path) + ".npatch-backup"


# --------------------------------------------------------------------------------------------
# Fault injection


def armed(step: str) -> bool:
    return os.environ.get(FAULT_ENV) == step


def fault(step: str) -> None:
    """Die with SIGKILL here when ``NUNCHAKU_PATCH_FAULT`` names this step (a dict lookup otherwise)."""
    if armed(step):
        plat.kill_self()


def write_prefix(fd: int, prefix: bytes, half_step: str) -> None:
    """Write ``prefix`` at offset 0; under the fault ``half_step``, write half of it and die."""
    if armed(half_step):
        plat.pwrite_all(fd, prefix[: len(prefix) // 2], 0)
        plat.kill_self()
    plat.pwrite_all(fd, prefix, 0)


# --------------------------------------------------------------------------------------------
# Errors


def os_error(exc: OSError, path: str, doing: str = "cannot write") -> WriteError:
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


def describe_owner(st: os.stat_result) -> str:
    """Return ``uid N, mode 0644``-style facts about a file, for refusals."""
    return f"owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o}"


def attribute_problem(flags: int | None, what: str) -> str | None:
    """Return why ``chattr`` flags forbid writing ``what`` (with the right ``chattr`` to undo it), or None."""
    if flags is None:
        return None
    if flags & plat.FS_IMMUTABLE_FL:
        return f"{what} is immutable (chattr -i to allow changes)"
    if flags & plat.FS_APPEND_FL:
        return f"{what} is append-only (chattr -a to allow changes)"
    return None


def check_folder_writable(directory: str, path: str) -> None:
    """Refuse, before anything is written, a folder whose attributes would keep our temp files from going away."""
    problem = attribute_problem(plat.path_flags(directory or "."), f"its folder {directory or '.'}")
    if problem is not None:
        raise WriteError(
            f"cannot write beside it: {problem}; temp files could not be renamed or removed",
            path=path,
            code="permission",
            hint="remove the attribute, or write a patched copy to another folder with -o",
        )


# --------------------------------------------------------------------------------------------
# Opening files


def close(fd: int) -> None:
    plat.unlock(fd)
    with contextlib.suppress(OSError):
        os.close(fd)


class Handle:
    """An fd that is unlocked and closed at most once (Windows must let go of files before renaming)."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._open = True

    def close(self) -> None:
        """Unlock and close the fd unless already done."""
        if self._open:
            self._open = False
            close(self.fd)


def open_file(path: str, flags: int) -> int:
    """Open a regular file without blocking on FIFOs; OSError for the caller to translate."""
    try:
        fd = open_nonblocking(path, flags | O_CLOEXEC)
    except BlockingIOError:
        raise LockedError(
            "another nunchaku-patch is writing this file (it holds a lease)", path=path, hint="try again"
        ) from None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise WriteError("is not a regular file", path=path, code="not-a-file")
        if O_NONBLOCK:  # only opened non-blocking where the flag exists (not on Windows)
            os.set_blocking(fd, True)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_locked(path: str, *, writable: bool, exclusive: bool, wait: float) -> tuple[int, os.stat_result]:
    """Open and lock ``path``; wait up to ``wait`` seconds for another holder; follow replacements."""
    deadline = time.monotonic() + max(wait, 0.0)
    flags = (os.O_RDWR | O_NOFOLLOW) if writable else os.O_RDONLY
    for _ in range(_REOPEN_TRIES):
        fd = open_file(path, flags)
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
            close(fd)
            raise
        # Another patcher replaced the file (copy path) while we waited: lock the new one instead.
        close(fd)
    raise LockedError("the file kept being replaced while waiting for its lock", path=path)


def read_trusted(path: str, owner: os.stat_result, what: str, *, limit: int) -> bytes | None:
    """Return the bytes of the auxiliary file ``path`` (``None`` if absent), refusing anything we did not write.

    It must be a regular file (opened with ``O_NOFOLLOW | O_NONBLOCK``: a link, FIFO, device or folder is refused
    without blocking), owned by ``owner``'s owner or by the user running us, not writable by group or others, and
    at most ``limit`` bytes. Refusals raise :class:`WriteError` naming the file, its owner and mode.
    """
    try:
        fd = os.open(path, os.O_RDONLY | O_NOFOLLOW | O_NONBLOCK | O_CLOEXEC | O_BINARY)
    except FileNotFoundError:
        return None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise WriteError(
                f"the {what} is a symbolic link, not a regular file; it was not written by nunchaku-patch",
                path=path,
                code="untrusted",
                hint="nothing was changed; nunchaku-patch never writes links; inspect it before moving it away",
            ) from None
        raise os_error(exc, path, f"cannot read the {what}") from None
    try:
        st = os.fstat(fd)
        problem = None
        if not stat.S_ISREG(st.st_mode):
            problem = "is not a regular file"
        elif hasattr(os, "geteuid") and st.st_uid not in (owner.st_uid, os.geteuid()):
            problem = "belongs to another user"
        elif st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
            problem = "is writable by group or others"
        elif st.st_size > limit:
            problem = f"is {st.st_size:,} bytes, more than any of ours"
        if problem is not None:
            raise WriteError(
                f"the {what} {problem} ({describe_owner(st)}); it is not trusted",
                path=path,
                code="untrusted",
                hint=(
                    "nothing was changed; if its owner started a patch, they (or root) can finish it with the same "
                    "command; otherwise it was planted: inspect it before moving it away"
                ),
            )
        if O_NONBLOCK:
            os.set_blocking(fd, True)
        return plat.pread_exact(fd, st.st_size, 0)
    finally:
        os.close(fd)


# --------------------------------------------------------------------------------------------
# Temp files


def create_temp(directory: str, name: str) -> tuple[int, str]:
    """Create and lock ``{directory}/.{name}.npatch-{random}.tmp`` (the lock marks it as in use)."""
    for _ in range(16):
        path = os.path.join(directory, f"{temp_prefix(name)}{os.urandom(6).hex()}{TEMP_SUFFIX}")
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | O_CLOEXEC | O_BINARY | O_NOFOLLOW, 0o600)
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


def sweep_temps(directory: str, name: str) -> None:
    """Remove temp files of ours for ``name`` left by a killed run (those no live process has locked)."""
    prefix = temp_prefix(name)
    try:
        entries = list(os.scandir(directory or "."))
    except OSError:
        return
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(TEMP_SUFFIX)):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | O_NOFOLLOW | O_CLOEXEC | O_NONBLOCK | O_BINARY)
        except OSError:
            continue
        try:
            if stat.S_ISREG(os.fstat(fd).st_mode) and plat.try_lock(fd):
                os.unlink(entry.path)
        except OSError:
            pass
        finally:
            close(fd)


def atomic_write(final: str, data: bytes, owner_name: str, *, sync_dir: bool = True) -> None:
    """Write ``data`` to ``final`` through a flushed temp file and a rename (then flush the directory if asked)."""
    directory = os.path.dirname(final) or "."
    fd, tmp = create_temp(directory, owner_name)
    try:
        plat.pwrite_all(fd, data, 0)
        plat.fsync(fd)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    finally:
        close(fd)
    if sync_dir:
        plat.fsync_dir(directory)


def remove(path: str, *, sync_dir: bool = True) -> None:
    """Remove ``path`` if present (and flush the directory entry if asked)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        return
    if sync_dir:
        plat.fsync_dir(os.path.dirname(path) or ".")
