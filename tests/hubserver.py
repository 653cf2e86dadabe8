"""A small stand-in for the Hugging Face Hub, for tests that must not reach the internet.

It answers what ``huggingface_hub`` asks for here, the way the Hub does:

* ``GET /api/models/OWNER/REPO[/revision/REV]`` (``model_info(files_metadata=True)``): ``sha`` and ``siblings``
  with ``size``, ``blobId`` and, for LFS files, ``lfs.sha256`` / ``lfs.size``;
* ``GET|HEAD /OWNER/REPO/resolve/REV/PATH`` with ``Range``: git files directly (``ETag`` = the blob's sha1), LFS
  files by a 302 carrying ``X-Linked-Etag`` (the sha256), ``X-Linked-Size`` and ``X-Repo-Commit`` to a
  content-addressed ``/cdn/SHA256`` URL on the same server, which serves the bytes (206 + ``Content-Range``);
* errors with the Hub's ``X-Error-Code``: ``RepoNotFound`` (401 without a token, 404 with one), ``GatedRepo`` (401
  without a token, 403 with a token that was not granted), ``RevisionNotFound`` and ``EntryNotFound`` (404).

Every body byte sent is logged per file with its offsets, so a test can assert that a data region was never
read. Faults: ``drop_at`` closes the connection of the next transfer of a file that reaches that file offset, just
before it (once); ``corrupt`` flips every byte of a file served from that offset on, while the advertised sha256
stays the true one.

It binds 127.0.0.1 only, on a free port, and shuts itself down after ``lifetime`` seconds at the latest.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

_RANGE = re.compile(r"bytes=(\d+)-(\d*)")
_CHUNK = 256 * 1024


@dataclass
class HubFile:
    path: str
    source: Path
    size: int
    sha256: str
    git_sha1: str
    lfs: bool


@dataclass
class HubRepo:
    repo_id: str
    commit: str
    files: dict[str, HubFile] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    gated: bool = False
    private: bool = False
    #: Tokens allowed in (gated or private repos).
    granted: set[str] = field(default_factory=set)


@dataclass
class Served:
    """One body transfer: which file, from which offset, how many bytes."""

    repo_id: str
    path: str
    start: int
    sent: int

    @property
    def end(self) -> int:
        return self.start + self.sent


def _digests(path: Path) -> tuple[int, str, str]:
    size = path.stat().st_size
    sha256 = hashlib.sha256()
    sha1 = hashlib.sha1(f"blob {size}\0".encode())
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            sha256.update(chunk)
            sha1.update(chunk)
    return size, sha256.hexdigest(), sha1.hexdigest()


class FakeHub:
    """The server's state and controls; use as a context manager (or start()/stop())."""

    def __init__(self, *, lifetime: float = 600.0) -> None:
        self.repos: dict[str, HubRepo] = {}
        self.served: list[Served] = []
        self.requests: list[tuple[str, str, str | None]] = []
        self.drop_at: dict[tuple[str, str], int] = {}
        self.corrupt: dict[tuple[str, str], int] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        self._watchdog = threading.Timer(lifetime, self.stop)
        self._watchdog.daemon = True

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> FakeHub:
        self._thread.start()
        self._watchdog.start()
        return self

    def stop(self) -> None:
        self._watchdog.cancel()
        self._server.shutdown()
        self._server.server_close()

    def __enter__(self) -> FakeHub:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- content ----------------------------------------------------------------------------

    def add_repo(
        self,
        repo_id: str,
        files: dict[str, Path],
        *,
        commit: str | None = None,
        gated: bool = False,
        private: bool = False,
        granted: set[str] | None = None,
        lfs_threshold: int = 1024,
    ) -> HubRepo:
        """Publish ``files`` (repo path -> local file) at one commit on ``main``; small files go to git."""
        commit = commit or hashlib.sha1(repo_id.encode()).hexdigest()
        repo = HubRepo(repo_id, commit, gated=gated, private=private, granted=set(granted or ()))
        for name, source in files.items():
            size, sha256, sha1 = _digests(Path(source))
            repo.files[name] = HubFile(name, Path(source), size, sha256, sha1, lfs=size >= lfs_threshold)
        repo.branches["main"] = commit
        self.repos[repo_id] = repo
        return repo

    # -- what was served --------------------------------------------------------------------

    def transfers(self, repo_id: str, path: str) -> list[Served]:
        with self._lock:
            return [s for s in self.served if (s.repo_id, s.path) == (repo_id, path)]

    def bytes_sent(self, repo_id: str, path: str) -> int:
        return sum(s.sent for s in self.transfers(repo_id, path))

    def highest_offset(self, repo_id: str, path: str) -> int:
        """Return one past the last byte of the file ever sent (0: nothing)."""
        return max((s.end for s in self.transfers(repo_id, path)), default=0)

    def _log(self, served: Served) -> None:
        with self._lock:
            self.served.append(served)


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, format: str, *args: Any) -> None:
            pass

        # -- helpers ----------------------------------------------------------------------

        def _token(self) -> str | None:
            auth = self.headers.get("Authorization") or ""
            return auth[len("Bearer ") :] if auth.startswith("Bearer ") else None

        def _error(self, status: int, code: str | None, message: str) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            if code:
                self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _repo(self, repo_id: str, *, files: bool) -> HubRepo | None:
            """Return the repo if this request may see it, else answer with the Hub's error."""
            repo = hub.repos.get(repo_id)
            token = self._token()
            if repo is None or (repo.private and token not in repo.granted):
                # The Hub does not say whether a repo exists to someone who may not see it.
                self._error(401 if token is None else 404, "RepoNotFound", "Repository not found")
                return None
            if files and repo.gated and token not in repo.granted:
                if token is None:
                    self._error(401, "GatedRepo", "Access to this repo is restricted: log in to access it")
                else:
                    self._error(403, "GatedRepo", "Access to this repo is restricted and you are not in the list")
                return None
            return repo

        def _commit(self, repo: HubRepo, revision: str) -> str | None:
            if revision in repo.branches:
                return repo.branches[revision]
            if revision == repo.commit:
                return revision
            self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            return None

        # -- routes -----------------------------------------------------------------------

        def do_HEAD(self) -> None:
            self.do_GET()

        def do_GET(self) -> None:
            parsed = urllib.parse.urlsplit(self.path)
            parts = [urllib.parse.unquote(p) for p in parsed.path.split("/")[1:]]
            hub.requests.append((self.command, parsed.path, self.headers.get("Range")))
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                self._model_info(parts[2:])
            elif parts[:1] == ["cdn"] and len(parts) >= 4:
                self._cdn(parts[1], parts[2], "/".join(parts[3:]))
            elif len(parts) >= 5 and parts[2] == "resolve":
                self._resolve(f"{parts[0]}/{parts[1]}", parts[3], "/".join(parts[4:]))
            else:
                self._error(404, None, "Not found")

        def _model_info(self, parts: list[str]) -> None:
            repo_id = "/".join(parts[:2])
            revision = parts[3] if len(parts) >= 4 and parts[2] == "revision" else "main"
            repo = self._repo(repo_id, files=False)
            if repo is None:
                return
            commit = self._commit(repo, revision)
            if commit is None:
                return
            siblings = []
            for f in repo.files.values():
                entry: dict[str, Any] = {"rfilename": f.path, "size": f.size, "blobId": f.git_sha1}
                if f.lfs:
                    entry["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": 134}
                siblings.append(entry)
            body = json.dumps(
                {
                    "id": repo_id,
                    "sha": commit,
                    "private": repo.private,
                    "gated": "auto" if repo.gated else False,
                    "disabled": False,
                    "downloads": 0,
                    "likes": 0,
                    "tags": [],
                    "lastModified": "2024-01-01T00:00:00.000Z",
                    "siblings": siblings,
                }
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def _resolve(self, repo_id: str, revision: str, path: str) -> None:
            repo = self._repo(repo_id, files=True)
            if repo is None:
                return
            commit = self._commit(repo, revision)
            if commit is None:
                return
            f = repo.files.get(path)
            if f is None:
                self._error(404, "EntryNotFound", f"{path} does not exist on {revision}")
                return
            if f.lfs:
                self.send_response(302)
                self.send_header("Location", f"/cdn/{f.sha256}/{urllib.parse.quote(repo_id, safe='')}/{f.path}")
                self.send_header("X-Linked-Etag", f'"{f.sha256}"')
                self.send_header("X-Linked-Size", str(f.size))
                self.send_header("X-Repo-Commit", commit)
                self.send_header("ETag", f'"{f.git_sha1}"')
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            self._send_file(repo_id, f, commit, etag=f.git_sha1)

        def _cdn(self, sha256: str, quoted_repo: str, path: str) -> None:
            repo = hub.repos.get(urllib.parse.unquote(quoted_repo))
            f = repo.files.get(path) if repo else None
            if repo is None or f is None or f.sha256 != sha256:
                self._error(404, None, "Not found")
                return
            self._send_file(repo.repo_id, f, None, etag=f.sha256)

        def _send_file(self, repo_id: str, f: HubFile, commit: str | None, *, etag: str) -> None:
            start, end = 0, f.size - 1
            wanted = self.headers.get("Range")
            status = 200
            if wanted:
                match = _RANGE.fullmatch(wanted.strip())
                if match is None or int(match.group(1)) >= f.size:
                    self.send_response(416)
                    self.send_header("Content-Range", f"bytes */{f.size}")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                start = int(match.group(1))
                end = min(int(match.group(2)), f.size - 1) if match.group(2) else f.size - 1
                status = 206
            length = end - start + 1
            self.send_response(status)
            if status == 206:
                self.send_header("Content-Range", f"bytes {start}-{end}/{f.size}")
            self.send_header("Content-Length", str(length))
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("ETag", f'"{etag}"')
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.end_headers()
            if self.command == "HEAD":
                return
            key = (repo_id, f.path)
            drop: int | None = None  # bytes of this transfer to send before the connection drops
            with hub._lock:
                at = hub.drop_at.get(key)
                if at is not None and start <= at < start + length:
                    drop = at - start
                    del hub.drop_at[key]
            flip_from = hub.corrupt.get(key)
            sent = 0
            try:
                with open(f.source, "rb") as source:
                    source.seek(start)
                    while sent < length:
                        if drop is not None and sent >= drop:
                            self.close_connection = True
                            break
                        size = min(_CHUNK, length - sent)
                        if drop is not None:
                            size = min(size, drop - sent)
                        chunk = source.read(size)
                        if flip_from is not None:
                            first = max(0, flip_from - (start + sent))
                            chunk = chunk[:first] + bytes(b ^ 0xFF for b in chunk[first:])
                        self.wfile.write(chunk)
                        sent += len(chunk)
                self.wfile.flush()
            except (BrokenPipeError, ConnectionResetError):
                self.close_connection = True
            finally:
                hub._log(Served(repo_id, f.path, start, sent))

    return Handler
