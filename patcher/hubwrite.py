"""Fix Hub files without downloading them first: the new header, then the data region streamed into place.

``nunchaku-patch hf://OWNER/REPO/FILE.safetensors -o OUT`` and ``merge hf://OWNER/REPO[/FOLDER]`` read the remote
headers (:mod:`patcher.hub`), plan exactly as for a local file (:class:`~patcher.plan.Planner`,
:func:`~patcher.splice.plan_write`, :func:`~patcher.merge.plan_headers`), then :func:`stream_into` writes:

1. a part file beside the output, ``.NAME.npatch-KEY.part``, locked while in use, holding the new prefix;
2. each source's data region, streamed with HTTP range requests straight to its place (bounded memory);
3. meanwhile the *original* bytes of each source (its old prefix + its data region) are hashed and compared
   with what the Hub reports (the LFS / Xet sha256, or the git blob id of a small file): a mismatch deletes the
   part file and says so;
4. the result is flushed and checked (its header re-read by the strict reader, tensor table, metadata, size), and
   only then renamed over the output.

An interrupted run (dropped connection, Ctrl-C, kill) leaves the part file. The same command again finds it (the
KEY names the output, the new prefix and each source's commit and hash), re-hashes the bytes already there from
disk and asks the Hub only for the rest. The output is byte-identical to downloading the file and patching it
with ``-o``.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from . import _platform as plat
from ._record import dataclass
from .errors import HubError, LockedError, PatchError, WriteError
from .header import Header, metadata_equal, read_header_fd, same_tensors
from .hub import Hub, HubPath, RemoteHeader

if TYPE_CHECKING:
    from .merge import MergePlan
    from .plan import Planner

#: Suffix of a resumable part file (not swept by the local writers, which clean up ``.tmp`` files).
PART_SUFFIX = ".part"

Progress = Callable[[int, int], None]


@dataclass(frozen=True)
class Stream:
    """One remote source and where its data region lands in the output."""

    remote: RemoteHeader
    #: Offset of its data region in the output file.
    offset: int

    @property
    def length(self) -> int:
        """Return the length of the source's data region."""
        return self.remote.header.data_len


@dataclass(frozen=True)
class StreamResult:
    """What :func:`stream_into` did."""

    output: str
    #: Data bytes received in this run, and bytes taken over from an earlier run's part file.
    received: int
    resumed: int
    #: Sources whose bytes were checked against a hash the Hub reported (all of them, normally).
    verified: tuple[str, ...]
    #: Sources the Hub reported no hash for (their bytes could not be checked).
    unverified: tuple[str, ...]


def part_path(dest: str, prefix: bytes, streams: Sequence[Stream]) -> str:
    """Return the part file of this exact download: the same output, new prefix and sources give the same name."""
    identity = json.dumps(
        {
            "output": os.path.basename(dest),
            "prefix": hashlib.sha256(prefix).hexdigest(),
            "sources": [
                # The content's hash names it; only without one does the commit stand in (a branch that moved
                # on without changing the file still resumes).
                [s.remote.where.repo_id, s.remote.where.path, s.remote.etag or s.remote.commit, s.remote.size, s.offset]
                for s in streams
            ],
        },
        sort_keys=True,
    )
    key = hashlib.sha256(identity.encode()).hexdigest()[:16]
    directory, name = os.path.split(dest)
    return os.path.join(directory, f".{name}.npatch-{key}{PART_SUFFIX}")


def _sweep_stale_parts(dest: str, keep: str) -> None:
    """Remove part files of the same output from downloads of other content (no process holds them)."""
    directory, name = os.path.split(dest)
    prefix = f".{name}.npatch-"
    with contextlib.suppress(OSError):
        for entry in os.scandir(directory or "."):
            if (
                entry.name.startswith(prefix)
                and entry.name.endswith(PART_SUFFIX)
                and entry.name != os.path.basename(keep)
            ):
                with contextlib.suppress(OSError):
                    fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                    try:
                        if stat.S_ISREG(os.fstat(fd).st_mode) and plat.try_lock(fd):
                            os.unlink(entry.path)
                    finally:
                        os.close(fd)


class _Digest:
    """The hash the Hub reports for a file, fed with the file's original bytes in order."""

    def __init__(self, remote: RemoteHeader) -> None:
        self.expected = remote.sha256 or remote.git_blob_id
        self.kind = "sha256" if remote.sha256 else "git blob id" if remote.git_blob_id else None
        if remote.sha256:
            self._hash = hashlib.sha256()
        else:
            self._hash = hashlib.sha1(f"blob {remote.size}\0".encode())  # git's blob id: only used when reported
        self._hash.update(remote.prefix)

    def update(self, data: bytes | memoryview) -> None:
        self._hash.update(data)

    def check(self, where: HubPath) -> bool:
        """Return False when there was nothing to compare with; raise HubError on a mismatch."""
        if self.expected is None:
            return False
        got = self._hash.hexdigest()
        if got != self.expected:
            raise HubError(
                f"the bytes received do not match the {self.kind} the Hub reports; the partial output was deleted",
                path=str(where),
                code="hash-mismatch",
                expected=self.expected,
                got=got,
                hint="run the command again; if it keeps failing, the file on the Hub or a proxy is damaged",
            )
        return True


def _open_part(path: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOFOLLOW", 0), 0o666)
    try:
        if not plat.try_lock(fd):
            raise LockedError(
                "another nunchaku-patch is downloading into this output",
                path=path,
                hint="wait for it to finish, then run again",
            )
    except BaseException:
        os.close(fd)
        raise
    return fd


def _resume_point(fd: int, prefix: bytes, total: int) -> int:
    """Return how many data bytes an earlier run left in the part file (0 when its prefix is not ours)."""
    size = os.fstat(fd).st_size
    if size < len(prefix) or plat.pread_exact(fd, len(prefix), 0) != prefix:
        os.ftruncate(fd, 0)
        plat.pwrite_all(fd, prefix, 0)
        return 0
    done = min(size - len(prefix), total)
    os.ftruncate(fd, len(prefix) + done)  # bytes past the data region (a torn write) are dropped
    return done


def _rehash(fd: int, digest: _Digest, offset: int, length: int) -> None:
    """Feed ``length`` bytes already in the part file at ``offset`` into ``digest`` (resume)."""
    done = 0
    while done < length:
        chunk = plat.pread_exact(fd, min(plat.COPY_CHUNK, length - done), offset + done)
        if not chunk:
            raise WriteError("the part file ended early while resuming", code="io")
        digest.update(chunk)
        done += len(chunk)


def _verify(fd: int, path: str, expected: Header) -> None:
    """Check what was written with the strict reader: header, tensor table, metadata and size."""
    try:
        got = read_header_fd(fd, source=path)
    except PatchError as exc:
        raise WriteError(
            f"verification failed: the written header does not parse ({exc.message})", code="verify"
        ) from None
    if not same_tensors(got.tensors, expected.tensors) or not metadata_equal(got.metadata, expected.metadata):
        raise WriteError("verification failed: the written header is not the planned one", code="verify")
    if os.fstat(fd).st_size != expected.file_size:
        raise WriteError("verification failed: the file has the wrong size", code="verify")


def stream_into(
    dest: str,
    prefix: bytes,
    streams: Sequence[Stream],
    expected: Header,
    *,
    hub: Hub,
    progress: Progress | None = None,
    force: bool = False,
) -> StreamResult:
    """Write ``prefix`` then each stream's data region to ``dest`` through a resumable, verified part file.

    ``expected`` is the header the result must have (its ``file_size`` is the output's size). ``dest`` obeys the
    rules of every ``-o`` (:func:`patcher.splice.check_output_target`): an existing file only with ``force``, never
    a device, FIFO, socket, folder or symbolic link.
    """
    from .splice import check_output_target

    dest = check_output_target(dest, force=force)
    directory = os.path.dirname(dest) or "."
    total = sum(s.length for s in streams)
    part = part_path(dest, prefix, streams)
    _sweep_stale_parts(dest, part)
    fd = _open_part(part)
    keep = True  # an interrupted download stays resumable; a bad one is deleted
    received = 0
    verified: list[str] = []
    unverified: list[str] = []
    try:
        resumed = _resume_point(fd, prefix, total)
        done = resumed
        if progress is not None:
            progress(done, total)
        for stream in streams:
            remote = stream.remote
            digest = _Digest(remote)
            start_in_data = stream.offset - len(prefix)
            have = max(0, min(stream.length, resumed - start_in_data))
            _rehash(fd, digest, stream.offset, have)
            position = have
            pieces = hub.stream(
                remote.where,
                remote.header.data_start + have,
                remote.header.data_start + stream.length,
                revision=remote.commit,
                expect_etag=remote.etag,
            )
            for chunk in pieces:
                plat.pwrite_all(fd, chunk, stream.offset + position)
                digest.update(chunk)
                position += len(chunk)
                received += len(chunk)
                done += len(chunk)
                if progress is not None:
                    progress(done, total)
            try:
                (verified if digest.check(remote.where) else unverified).append(str(remote.where))
            except HubError:
                keep = False
                raise
        plat.fsync(fd)
        try:
            _verify(fd, part, expected)
        except WriteError:
            keep = False
            raise
        if plat.IS_WINDOWS:
            os.close(fd)
            fd = -1
        os.replace(part, dest)
        keep = True
        plat.fsync_dir(directory)
    except WriteError as exc:
        if exc.path is None or exc.path == part:
            raise WriteError(exc.message, path=dest, code=exc.code, hint=exc.hint) from None
        raise
    except OSError as exc:
        from ._files import os_error

        raise os_error(exc, dest) from None
    finally:
        if fd >= 0:
            os.close(fd)
        if not keep:
            with contextlib.suppress(OSError):
                os.unlink(part)
    return StreamResult(dest, received, resumed, tuple(verified), tuple(unverified))


# --------------------------------------------------------------------------------------------
# The two commands' plans


def plan_patch_stream(remote: RemoteHeader, metadata: dict[str, str], dest: str) -> tuple[bytes, list[Stream], Header]:
    """Return the output prefix, the one stream and the expected header of a streamed patch (as ``-o`` writes)."""
    from .header import parse_header
    from .splice import plan_write

    plan = plan_write(remote.header, metadata, path=str(remote.where), block_size=0, output=dest)
    prefix = plan.new_prefix
    expected = parse_header(plan.new_header_bytes, len(prefix) + remote.header.data_len, source=dest)
    return prefix, [Stream(remote, len(prefix))], expected


def fetch_folder_configs(hub: Hub, folder: HubPath, names: Sequence[str], into: Path, *, revision: str | None) -> None:
    """Download the folder's small config files (``config.json``, ``comfy_config.json``) that exist into ``into``."""
    for name in names:
        where = folder.child(f"{folder.path}/{name}" if folder.path else name)
        try:
            head, answer = hub.read_range(where, 0, 1 << 20, revision=revision)
        except HubError as exc:
            if exc.code == "entry-not-found":
                continue
            raise
        if answer.size is not None and answer.size > len(head):
            raise HubError("is larger than a config file should be", path=str(where), code="too-large")
        (into / name).write_bytes(head)


def plan_merge_stream(
    hub: Hub, folder: HubPath, planner: Planner, place: Callable[[str], str]
) -> tuple[MergePlan, list[Stream], Header]:
    """Plan the merge of a deepcompressor folder in a Hub repo: both headers, its config files, the streams."""
    import tempfile

    from . import merge
    from .header import parse_header

    snapshot = hub.snapshot(folder)
    present = {f.path for f in snapshot.files}
    paths = [f"{folder.path}/{name}" if folder.path else name for name in merge.SOURCE_FILES]
    missing = [p for p in paths if p not in present]
    if missing:
        raise HubError(
            f"is not a deepcompressor output folder: {', '.join(missing)} missing",
            path=str(folder),
            code="incomplete-folder",
            expected=f"{merge.BLOCKS_FILE} and {merge.UNQUANTIZED_FILE} in the folder",
            hint="point at the repo folder holding both (scan hf://OWNER/REPO lists them)",
        )
    commit = snapshot.commit
    remotes = [hub.read_header(folder.child(p), revision=commit) for p in paths]
    with tempfile.TemporaryDirectory(prefix="npatch-hub-") as scratch:
        configs = Path(scratch)
        fetch_folder_configs(hub, folder, (merge.FOLDER_CONFIG, merge.FOLDER_COMFY_CONFIG), configs, revision=commit)
        plan = merge.plan_headers(
            str(folder),
            (str(remotes[0].where), remotes[0].header),
            (str(remotes[1].where), remotes[1].header),
            planner,
            config_folder=configs,
            folder_name=folder.name,
            place=place,
        )
    prefix = plan.prefix
    streams = [Stream(remote, len(prefix) + source.shift) for remote, source in zip(remotes, plan.sources, strict=True)]
    expected = parse_header(plan.header_bytes, plan.file_size, source=plan.output)
    return plan, streams, expected


__all__ = [
    "PART_SUFFIX",
    "Stream",
    "StreamResult",
    "fetch_folder_configs",
    "part_path",
    "plan_merge_stream",
    "plan_patch_stream",
    "stream_into",
]
