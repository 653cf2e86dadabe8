"""Safetensors files in Hugging Face Hub repos: ``hf://`` paths, headers by range requests, streamed data.

Everything goes through ``huggingface_hub``'s own HTTP session (:func:`get_session`), URL helper
(:func:`hf_hub_url`), headers (:func:`build_hf_headers`) and error mapping (:func:`hf_raise_for_status`), so its
endpoint (``HF_ENDPOINT``), token (``HF_TOKEN`` or ``hf auth login``), user agent, offline mode
(``HF_HUB_OFFLINE``) and error types apply. ``huggingface_hub`` is imported only when a remote path is used.

A header is read as the Hub's own ``parse_safetensors_file_metadata`` never does: the 8-byte prefix first, then
exactly the N header bytes, so not one tensor byte is downloaded, whatever the header's size. The project's strict
parser (:func:`patcher.header.parse_header`) judges those bytes against the file size the server reports, so a
remote verdict is the verdict the downloaded file would get.

Every failure is one :class:`~patcher.errors.HubError` line naming the ``hf://`` path: gated repo, private repo
(401), missing repo, missing revision, missing file, offline mode, network failure.
"""

from __future__ import annotations

import contextlib
import importlib
import re
import urllib.parse
from collections.abc import Iterator
from dataclasses import replace
from typing import Any

from . import __version__
from ._record import dataclass
from .errors import HubError, UsageError
from .header import PREFIX_SIZE, Header, pack_prefix, parse_header, parse_length_prefix

#: The scheme of a remote path: ``hf://OWNER/REPO[@REVISION][/PATH]``.
SCHEME = "hf://"
SUFFIX = ".safetensors"
#: Bytes read per network chunk while streaming a data region (memory stays bounded by this).
CHUNK = 1024 * 1024
#: Seconds to wait for the server to answer or send the next bytes (the session's own default is no limit).
TIMEOUT = 30.0

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_SHA1 = re.compile(r"[0-9a-f]{40}")
_CONTENT_RANGE = re.compile(r"bytes (\d+)-(\d+)/(\d+|\*)")


# --------------------------------------------------------------------------------------------
# hf:// paths (pure)


@dataclass(frozen=True)
class HubPath:
    """A place in a model repo on the Hub: the whole repo, a folder in it, or one file."""

    repo_id: str
    #: Branch, tag or commit; ``None`` means the repo's default branch (``main``).
    revision: str | None = None
    #: Path inside the repo, without leading or trailing slashes ("" = the repo's root).
    path: str = ""

    @property
    def is_file(self) -> bool:
        """Return whether the path names a safetensors file (anything else is taken as a folder)."""
        return self.path.lower().endswith(SUFFIX)

    @property
    def name(self) -> str:
        """Return the last part of the path (the repo's name at the root)."""
        return self.path.rsplit("/", 1)[-1] if self.path else self.repo_id.rsplit("/", 1)[-1]

    def child(self, path: str, *, revision: str | None = None) -> HubPath:
        """Return the path ``path`` (relative to the repo's root) in the same repo, optionally pinned to a commit."""
        return replace(self, path=path.strip("/"), revision=revision or self.revision)

    def __str__(self) -> str:
        revision = f"@{urllib.parse.quote(self.revision, safe='')}" if self.revision else ""
        return f"{SCHEME}{self.repo_id}{revision}" + (f"/{self.path}" if self.path else "")


def is_hub_path(text: str) -> bool:
    """Return whether ``text`` is meant as a remote path (starts with ``hf://``)."""
    return text.startswith(SCHEME)


def parse_hub_path(text: str) -> HubPath:
    """Parse ``hf://OWNER/REPO[@REVISION][/PATH]``; a revision with ``/`` (``refs/pr/1``) is written ``%2F``-escaped."""
    if not is_hub_path(text):
        raise UsageError("is not an hf:// path", path=text, expected="hf://OWNER/REPO[@REVISION][/PATH]")
    rest = text[len(SCHEME) :].strip("/")
    parts = rest.split("/", 2)
    if len(parts) < 2:
        raise UsageError(
            "names no repo",
            path=text,
            expected="hf://OWNER/REPO[@REVISION][/PATH]",
            hint="write the repo id in full, e.g. hf://nunchaku-tech/nunchaku-flux.1-dev",
        )
    owner, name = parts[0], parts[1]
    revision: str | None = None
    if "@" in name:
        name, _, encoded = name.partition("@")
        revision = urllib.parse.unquote(encoded)
        if not revision:
            raise UsageError("has an empty revision after @", path=text, expected="a branch, tag or commit")
    if not (_NAME.fullmatch(owner) and _NAME.fullmatch(name)) or ".." in owner + name:
        raise UsageError(
            "is not a valid repo id",
            path=text,
            expected="OWNER/REPO of letters, digits, '-', '_' and '.'",
            got=f"{owner}/{name}",
        )
    path = parts[2] if len(parts) == 3 else ""
    if any(part in ("", ".", "..") for part in path.split("/")) and path:
        raise UsageError("has an empty, '.' or '..' part in its path", path=text)
    return HubPath(f"{owner}/{name}", revision, path)


# --------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class RemoteFile:
    """One file of a repo listing."""

    path: str
    size: int | None
    #: The content's sha256 for LFS / Xet files (the Hub's ``lfs.sha256``), else ``None``.
    sha256: str | None = None
    #: The git blob id (sha1 of ``blob SIZE\\0`` + content) for files stored in git itself.
    blob_id: str | None = None


@dataclass(frozen=True)
class Snapshot:
    """A repo at one commit: what the listing says."""

    where: HubPath
    #: The commit the revision resolved to (every later request is pinned to it).
    commit: str | None
    files: tuple[RemoteFile, ...]

    def under(self, folder: str) -> list[RemoteFile]:
        """Return the files at or below ``folder`` ("" = all)."""
        prefix = folder.strip("/")
        return [f for f in self.files if not prefix or f.path == prefix or f.path.startswith(prefix + "/")]


@dataclass(frozen=True)
class RemoteHeader:
    """A remote file's parsed header and what the server said about the file."""

    where: HubPath
    header: Header
    #: The file's size (from ``Content-Range``); the parser checked it against the header.
    size: int
    #: The commit the file was read at (``X-Repo-Commit``), when the server said.
    commit: str | None
    #: ``X-Linked-Etag`` (LFS / Xet: the sha256 of the content) or ``ETag`` (git: the blob's sha1), normalized.
    etag: str | None

    @property
    def prefix(self) -> bytes:
        """Return the file's first 8 + N bytes, as read."""
        return pack_prefix(self.header.raw)

    @property
    def sha256(self) -> str | None:
        """Return the content's sha256 when the Hub reported one."""
        return self.etag if self.etag and _SHA256.fullmatch(self.etag) else None

    @property
    def git_blob_id(self) -> str | None:
        """Return the git blob id when the file lives in git (no LFS): the ETag is then its sha1."""
        return self.etag if self.etag and _SHA1.fullmatch(self.etag) else None


# --------------------------------------------------------------------------------------------
# huggingface_hub, imported on first use


def _hf() -> Any:
    import huggingface_hub

    return huggingface_hub


def _constants() -> Any:
    """Return ``huggingface_hub.constants`` (a submodule the package's lazy loader does not expose as an attribute)."""
    return importlib.import_module("huggingface_hub.constants")


def _hf_utils() -> Any:
    """Return ``huggingface_hub.utils`` (session, headers and status helpers live there in every version)."""
    return importlib.import_module("huggingface_hub.utils")


def _error_classes() -> dict[str, type[BaseException]]:
    """Return huggingface_hub's error types by role (they moved between modules across versions)."""
    hf = _hf()
    found: dict[str, type[BaseException]] = {}
    for name in (
        "GatedRepoError",
        "RepositoryNotFoundError",
        "RevisionNotFoundError",
        "EntryNotFoundError",
        "HfHubHTTPError",
        "OfflineModeIsEnabled",
        "DisabledRepoError",
    ):
        for module in ("huggingface_hub.errors", "huggingface_hub.utils"):
            with contextlib.suppress(ImportError):
                mod = __import__(module, fromlist=[name])
                if hasattr(mod, name):
                    found[name] = getattr(mod, name)
                    break
        else:
            if hasattr(hf, name):
                found[name] = getattr(hf, name)
    return found


def _offline() -> bool:
    constants = _constants()
    check = getattr(constants, "is_offline_mode", None)
    return bool(check() if callable(check) else getattr(constants, "HF_HUB_OFFLINE", False))


def _status(exc: BaseException) -> int | None:
    response = getattr(exc, "response", None)
    code = getattr(response, "status_code", None)
    return code if isinstance(code, int) else None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def hub_error(exc: BaseException, where: HubPath, endpoint: str) -> HubError:
    """Turn one of huggingface_hub's (or the HTTP library's) exceptions into one clear line naming ``where``."""
    kinds = _error_classes()

    def isa(name: str) -> bool:
        cls = kinds.get(name)
        return cls is not None and isinstance(exc, cls)

    repo = where.repo_id
    page = f"{endpoint}/{repo}"
    status = _status(exc)
    if isa("OfflineModeIsEnabled") or (isinstance(exc, HubError) and exc.code == "offline"):
        return HubError(
            "HF_HUB_OFFLINE is set, so the Hub is not contacted",
            path=str(where),
            code="offline",
            hint="unset HF_HUB_OFFLINE to read remote files, or work on a downloaded copy",
        )
    if isa("GatedRepoError"):
        return HubError(
            f"{repo} is a gated repo and this token has no access" if status == 403 else f"{repo} is a gated repo",
            path=str(where),
            code="gated",
            got=f"HTTP {status}" if status else None,
            hint=f"accept its conditions at {page}, then log in (hf auth login, or set HF_TOKEN)",
        )
    if isa("DisabledRepoError"):
        return HubError(f"{repo} has been disabled on the Hub", path=str(where), code="disabled")
    if isa("RevisionNotFoundError"):
        return HubError(
            f"{repo} has no revision {where.revision or 'main'!r}",
            path=str(where),
            code="revision-not-found",
            hint=f"check the branch, tag or commit (they are listed at {page}/tree)",
        )
    if isa("EntryNotFoundError"):
        return HubError(
            f"{repo} has no file {where.path!r} at {where.revision or 'main'}",
            path=str(where),
            code="entry-not-found",
            hint=f"check the path (the files are listed at {page}/tree/{where.revision or 'main'})",
        )
    if isa("RepositoryNotFoundError") and status == 401:
        return HubError(
            f"{repo} was not found, or it is private and no valid token was sent",
            path=str(where),
            code="unauthorized",
            got="HTTP 401",
            hint="check the repo id; for a private repo log in (hf auth login, or set HF_TOKEN)",
        )
    if isa("RepositoryNotFoundError"):
        return HubError(
            f"no repo {repo} on the Hub",
            path=str(where),
            code="repo-not-found",
            got=f"HTTP {status}" if status else None,
            hint="check the repo id (OWNER/NAME, as in its URL)",
        )
    if isa("HfHubHTTPError") or status is not None:
        if status == 403:
            return HubError(
                "access denied", path=str(where), code="forbidden", got="HTTP 403", hint="check the token's permissions"
            )
        return HubError(
            f"the Hub answered {_first_line(exc)}",
            path=str(where),
            code="http",
            hint="try again later; if it persists, check the repo on the Hub",
        )
    return HubError(
        f"cannot reach {endpoint} ({type(exc).__name__}: {_first_line(exc)})",
        path=str(where),
        code="network",
        hint="check the connection (rerunning a download resumes it); HF_ENDPOINT sets the server",
    )


# --------------------------------------------------------------------------------------------
# The HTTP layer: one session for both huggingface_hub families (requests before 1.0, httpx after)


def _normalize_etag(value: str | None) -> str | None:
    if not value:
        return None
    value = value.strip()
    if value.startswith("W/"):
        value = value[2:]
    return value.strip('"').lower() or None


@dataclass(frozen=True)
class _Answer:
    """What a range response said about the file."""

    start: int
    #: The whole file's size (``Content-Range: bytes a-b/SIZE``), when known.
    size: int | None
    commit: str | None
    etag: str | None


def _hops(response: Any) -> list[Any]:
    """Return the responses of a request in order: each redirect, then the final one."""
    return [*list(getattr(response, "history", None) or []), response]


def _header(response: Any, name: str) -> str | None:
    for hop in _hops(response):
        value = hop.headers.get(name)
        if value:
            return str(value)
    return None


def _answer(response: Any, wanted_start: int, where: HubPath) -> _Answer:
    """Check that the server sent the range asked for; return what it said about the file."""
    commit = _header(response, "X-Repo-Commit")
    etag = _normalize_etag(_header(response, "X-Linked-Etag") or _header(response, "ETag"))
    if response.status_code == 206:
        match = _CONTENT_RANGE.fullmatch(response.headers.get("Content-Range", "").strip())
        if match is None or int(match.group(1)) != wanted_start:
            raise HubError(
                "the server sent another byte range than the one asked for",
                path=str(where),
                code="bad-range",
                expected=f"bytes {wanted_start}-",
                got=response.headers.get("Content-Range"),
            )
        total = None if match.group(3) == "*" else int(match.group(3))
        return _Answer(wanted_start, total, commit, etag)
    if wanted_start != 0:
        raise HubError(
            "the server ignored the range request",
            path=str(where),
            code="bad-range",
            expected="HTTP 206",
            got=f"HTTP {response.status_code}",
        )
    length = response.headers.get("Content-Length")
    linked = _header(response, "X-Linked-Size")
    size = int(length) if length and length.isdigit() else int(linked) if linked and linked.isdigit() else None
    return _Answer(0, size, commit, etag)


class Hub:
    """A client of one Hub endpoint, built on huggingface_hub's session, headers and errors."""

    def __init__(self, *, endpoint: str | None = None, token: str | bool | None = None, timeout: float = TIMEOUT):
        #: ``HF_ENDPOINT`` as huggingface_hub read it, unless given.
        self.endpoint: str = (endpoint or _constants().ENDPOINT).rstrip("/")
        self.token = token
        self.timeout = timeout
        #: Requests made and body bytes received (for tests and the progress line).
        self.requests = 0
        self.received = 0

    # -- plumbing ---------------------------------------------------------------------------

    def _headers(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        headers: dict[str, str] = _hf_utils().build_hf_headers(
            token=self.token, library_name="nunchaku-patch", library_version=__version__
        )
        headers["Accept-Encoding"] = "identity"  # sizes and offsets are the file's own
        headers.update(extra or {})
        return headers

    def url(self, where: HubPath, revision: str | None = None) -> str:
        """Return the ``resolve`` URL of a file (huggingface_hub's :func:`hf_hub_url` on our endpoint)."""
        url: str = _hf().hf_hub_url(
            where.repo_id, where.path, revision=revision or where.revision, endpoint=self.endpoint
        )
        return url

    def _check_online(self, where: HubPath) -> None:
        if _offline():
            raise hub_error(HubError("offline", code="offline"), where, self.endpoint)

    @contextlib.contextmanager
    def _get(self, url: str, headers: dict[str, str], where: HubPath) -> Iterator[Any]:
        """Open a streamed GET through huggingface_hub's session; raise HubError for any failure."""
        utils = _hf_utils()
        self._check_online(where)
        session = utils.get_session()
        self.requests += 1
        try:
            if callable(getattr(session, "stream", None)):  # httpx (huggingface_hub >= 1.0)
                manager: Any = session.stream("GET", url, headers=headers, timeout=self.timeout)
            else:  # requests (huggingface_hub < 1.0)
                manager = contextlib.closing(session.get(url, headers=headers, stream=True, timeout=self.timeout))
            with manager as response:
                utils.hf_raise_for_status(response)
                yield response
        except HubError:
            raise
        except (KeyboardInterrupt, SystemExit, GeneratorExit):
            raise
        except Exception as exc:  # the HTTP library's and huggingface_hub's errors alike
            raise hub_error(exc, where, self.endpoint) from None

    def _body(self, response: Any, limit: int) -> Iterator[bytes]:
        """Yield at most ``limit`` body bytes in chunks (a server sending more is cut off)."""
        chunks = response.iter_bytes(CHUNK) if hasattr(response, "iter_bytes") else response.iter_content(CHUNK)
        remaining = limit
        for chunk in chunks:
            if not chunk:
                continue
            if len(chunk) > remaining:
                chunk = chunk[:remaining]
            remaining -= len(chunk)
            self.received += len(chunk)
            yield chunk
            if not remaining:
                return

    def read_range(
        self, where: HubPath, start: int, length: int, *, revision: str | None = None
    ) -> tuple[bytes, _Answer]:
        """Return exactly ``length`` bytes of the file from ``start`` (fewer only at its end) and the answer."""
        end = start + length - 1
        with self._get(self.url(where, revision), self._headers({"Range": f"bytes={start}-{end}"}), where) as response:
            answer = _answer(response, start, where)
            data = b"".join(self._body(response, length))
        return data, answer

    # -- what callers use ---------------------------------------------------------------------

    def snapshot(self, where: HubPath) -> Snapshot:
        """List the repo's files at ``where.revision`` with their sizes and hashes (one API call)."""
        self._check_online(where)
        api = _hf().HfApi(endpoint=self.endpoint, token=self.token)
        try:
            info = api.model_info(where.repo_id, revision=where.revision, files_metadata=True, timeout=self.timeout)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            raise hub_error(exc, where, self.endpoint) from None
        files = []
        for sibling in info.siblings or []:
            lfs = sibling.lfs
            sha = lfs.get("sha256") if isinstance(lfs, dict) else getattr(lfs, "sha256", None)
            files.append(RemoteFile(sibling.rfilename, sibling.size, sha, sibling.blob_id))
        return Snapshot(where, info.sha, tuple(sorted(files, key=lambda f: f.path)))

    def read_header(self, where: HubPath, *, revision: str | None = None) -> RemoteHeader:
        """Read and validate a remote file's header: the 8-byte prefix, then exactly N bytes; no tensor byte."""
        source = str(where)
        prefix, first = self.read_range(where, 0, PREFIX_SIZE, revision=revision)
        if first.size is None:
            raise HubError("the server did not say how large the file is", path=source, code="bad-range")
        n = parse_length_prefix(prefix, first.size, source=source)
        # Pin the second request to the commit the first one was served from: both halves of one file.
        pinned = revision or first.commit or where.revision
        raw, second = self.read_range(where, PREFIX_SIZE, n, revision=pinned) if n else (b"", first)
        if len(raw) != n or second.size not in (None, first.size):
            raise HubError("the file changed or ended while its header was read", path=source, code="bad-range")
        header = parse_header(raw, first.size, source=source)
        return RemoteHeader(where, header, first.size, first.commit, first.etag)

    def stream(
        self,
        where: HubPath,
        start: int,
        end: int,
        *,
        revision: str | None = None,
        expect_etag: str | None = None,
    ) -> Iterator[bytes]:
        """Yield the file's bytes ``[start, end)`` in chunks; raise HubError if the connection ends early."""
        if end <= start:
            return
        headers = self._headers({"Range": f"bytes={start}-{end - 1}"})
        received = 0
        with self._get(self.url(where, revision), headers, where) as response:
            answer = _answer(response, start, where)
            if expect_etag and answer.etag and answer.etag != expect_etag:
                raise HubError(
                    "the file on the Hub changed since its header was read",
                    path=str(where),
                    code="changed",
                    expected=expect_etag,
                    got=answer.etag,
                    hint="run the command again",
                )
            try:
                for chunk in self._body(response, end - start):
                    received += len(chunk)
                    yield chunk
            except HubError:
                raise
            except (KeyboardInterrupt, SystemExit, GeneratorExit):
                raise
            except Exception as exc:  # a dropped connection surfaces while reading the body
                error = hub_error(exc, where, self.endpoint)
                if error.code != "network":
                    raise error from None
                raise HubError(
                    f"the connection dropped after {received:,} of {end - start:,} bytes ({_first_line(exc)})",
                    path=str(where),
                    code="network",
                    hint="run the same command again: it resumes where this one stopped",
                ) from None
        if received != end - start:
            raise HubError(
                "the connection closed before the whole range arrived",
                path=str(where),
                code="network",
                expected=f"{end - start:,} bytes",
                got=f"{received:,}",
                hint="run the same command again: it resumes where this one stopped",
            )


def read_remote_header(text: str, *, hub: Hub | None = None) -> RemoteHeader:
    """Parse ``text`` (``hf://OWNER/REPO[@REV]/FILE.safetensors``) and read its header."""
    where = parse_hub_path(text)
    if not where.is_file:
        raise UsageError("does not name a .safetensors file", path=text, expected=f"a path ending in {SUFFIX}")
    return (hub or Hub()).read_header(where)


__all__ = [
    "CHUNK",
    "SCHEME",
    "Hub",
    "HubPath",
    "RemoteFile",
    "RemoteHeader",
    "Snapshot",
    "hub_error",
    "is_hub_path",
    "parse_hub_path",
    "read_remote_header",
]
