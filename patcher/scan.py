"""Find old conversions where they live: model folders, the Hugging Face cache, and Hub repos (read-only).

One :class:`Item` per ``.safetensors`` file, and one per deepcompressor folder (its two halves are not listed on
their own): what it is (:data:`KINDS`), family / precision / rank, each loader's verdict, and the command line that
fixes it. Only headers are read (the 8-byte prefix and the header; for a Hub repo through range requests), so a
thousand files take seconds.

* :func:`judge` is pure: a header and a name in, a :class:`Judgement` out (the contract's verdicts, plus the
  blocks-only rule: a quantized file without its family's unquantized layers never loads as it is).
* :func:`scan_paths`, :func:`scan_hf_cache` and :func:`scan_hub` are the thin walkers. A cache file is a symlink to a
  content-addressed blob shared by revisions, so its fix writes a patched copy into a folder the user names.
"""

from __future__ import annotations

import os
import shlex
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, get_args

from . import contract
from ._record import dataclass
from .errors import PatchError
from .facts import Family, Finding, Inference, Severity
from .header import Header, read_header
from .inspect import infer
from .merge import BLOCKS_FILE, SOURCE_FILES, UNQUANTIZED_FILE

if TYPE_CHECKING:
    from .hub import Hub, HubPath
    from .plan import Planner

Kind = Literal[
    "single file",
    "deepcompressor folder",
    "blocks-only half",
    "unquantized half",
    "not an SVDQuant file",
    "unreadable",
]
#: Every kind of row.
KINDS: tuple[Kind, ...] = get_args(Kind)
SUFFIX = ".safetensors"
#: Where the fix commands of cache and Hub files write their copies unless the user names a folder.
DEFAULT_FIX_DIR = "nunchaku-patched"
COMMAND = "nunchaku-patch"
#: From this many headers on, a scan parses them in several processes (a FLUX header takes ~15 ms of CPU).
PARALLEL_FROM = 64
MAX_WORKERS = 8

Source = Literal["local", "hf-cache", "hub"]


@dataclass(frozen=True)
class Judgement:
    """What a header (or a folder's pair of headers) is and whether every loader accepts it."""

    kind: Kind
    ok: bool
    family: Family | None = None
    precision: str | None = None
    rank: int | None = None
    #: Loader key -> whether it would load the file as it is.
    verdicts: Mapping[str, bool] = field(default_factory=dict)
    findings: tuple[Finding, ...] = ()


@dataclass(frozen=True)
class Item:
    """One row of a scan."""

    #: The path as the user can use it: a local path, a cache snapshot path, or an ``hf://`` path.
    path: str
    judgement: Judgement
    #: Bytes on disk (or on the Hub): for a folder, both halves.
    size: int | None
    source: Source = "local"
    #: The command line that fixes it, ready to paste (``None``: nothing to do, or nothing we can do).
    fix: str | None = None
    #: Cache and Hub rows: the repo, and the revision (commit for the cache, as asked for the Hub).
    repo: str | None = None
    revision: str | None = None
    #: Why nothing can be fixed automatically, or a note (``merged into ...``).
    note: str | None = None

    @property
    def needs_work(self) -> bool:
        """Return whether the row needs fixing (unreadable files too: they cannot load)."""
        return not self.judgement.ok


def _finding(code: str, message: str) -> Finding:
    return Finding(Severity.ERROR, code, message, contract.FILE_SCOPE)


def _all_loaders(family: Family | None, ok: bool) -> dict[str, bool]:
    loaders = contract.LOADERS.get(family) if family is not None else None
    return {loader.key: ok for loader in (loaders or contract.GENERIC_LOADERS)}


def _facts(inference: Inference) -> dict[str, Any]:
    return {
        "family": inference.family.value if inference.family else None,
        "precision": inference.precision.value if inference.precision else None,
        "rank": inference.rank.value if inference.rank else None,
    }


# --------------------------------------------------------------------------------------------
# Pure judgement


def judge(header: Header, *, name: str = "") -> Judgement:
    """Return what a file with this header is and whether each loader accepts it (pure)."""
    inference = infer(header)
    facts = _facts(inference)
    if not inference.quantized:
        if inference.family is not None and inference.has_unquantized and name == UNQUANTIZED_FILE:
            message = f"holds only the unquantized layers; its {BLOCKS_FILE} sibling is missing"
            return Judgement(
                "unquantized half",
                False,
                **facts,
                verdicts=_all_loaders(inference.family.value, False),
                findings=(_finding("unquantized-half", message),),
            )
        return Judgement("not an SVDQuant file", True, **facts)
    if not inference.has_unquantized:
        sibling = f" (the {UNQUANTIZED_FILE} deepcompressor wrote beside it)" if name == BLOCKS_FILE else ""
        message = (
            "holds only the quantized blocks: the unquantized layers (embedders, norm_out, proj_out) are missing"
            f"{sibling}; Nunchaku V2 refuses it and V1 leaves those weights uninitialised"
        )
        family = inference.family.value if inference.family else None
        return Judgement(
            "blocks-only half",
            False,
            **facts,
            verdicts=_all_loaders(family, False),
            findings=(_finding("blocks-only", message),),
        )
    report = contract.validate_metadata(header.metadata, inference)
    verdicts = {key: verdict.ok for key, verdict in report.verdicts.items()}
    findings = tuple(f for f in report.findings if f.severity is not Severity.INFO)
    return Judgement("single file", report.ok, **facts, verdicts=verdicts, findings=findings)


def judge_folder(blocks: Header, unquantized: Header) -> Judgement:
    """Return the judgement of a deepcompressor folder: it needs merging whatever its halves say (pure)."""
    inference = infer(blocks)
    family = inference.family.value if inference.family else None
    message = f"a deepcompressor folder ({BLOCKS_FILE} + {UNQUANTIZED_FILE}): Nunchaku >= 0.3 loads one merged file"
    return Judgement(
        "deepcompressor folder",
        False,
        **_facts(inference),
        verdicts=_all_loaders(family, False),
        findings=(_finding("needs-merge", message),),
    )


def _why(error: PatchError) -> str:
    """Return an error's line without the path it names (the row already shows it)."""
    line = error.render()
    return line[len(error.path) + 2 :] if error.path and line.startswith(f"{error.path}: ") else line


def unreadable(error: PatchError) -> Judgement:
    """Return the judgement of a file whose header the strict reader refuses."""
    return Judgement("unreadable", False, findings=(_finding(error.code, error.message),))


# --------------------------------------------------------------------------------------------
# Fix commands (pasteable: every path quoted for a POSIX shell)


def _q(text: str) -> str:
    return shlex.quote(text)


def fix_in_place(path: str) -> str:
    """Return the command that patches a local file in place."""
    return f"{COMMAND} {_q(path)}"


def fix_copy(source: str, fix_dir: str, name: str) -> str:
    """Return the command that writes a patched copy of ``source`` (a cache file, a symlink, a Hub file)."""
    return f"mkdir -p {_q(fix_dir)} && {COMMAND} {_q(source)} -o {_q(os.path.join(fix_dir, name))}"


def fix_merge(folder: str, fix_dir: str | None = None) -> str:
    """Return the command that merges a deepcompressor folder (beside it, or into ``fix_dir``)."""
    if fix_dir is None:
        return f"{COMMAND} merge {_q(folder)}"
    return f"mkdir -p {_q(fix_dir)} && {COMMAND} merge {_q(folder)} -o {_q(fix_dir)}"


# --------------------------------------------------------------------------------------------
# Local folders


def _read(path: str) -> tuple[Header | None, PatchError | None]:
    try:
        return read_header(path), None
    except PatchError as exc:
        return None, exc


def _size(*paths: str) -> int | None:
    try:
        return sum(os.stat(p).st_size for p in paths)
    except OSError:
        return None


def _merged_note(folder: str) -> tuple[bool, str | None]:
    """Return whether the folder's default merge output exists and holds exactly its merge, and a note."""
    from . import merge
    from .plan import PatchOptions, Planner

    try:
        plan = merge.plan_merge(folder, Planner(PatchOptions(), log=lambda _line: None))
        if merge.check_output(plan):
            return True, f"merged into {plan.output}"
    except PatchError as exc:
        return False, exc.message
    return False, None


def _folder_item(
    folder: str,
    *,
    source: Source,
    fix: str | None,
    repo: str | None = None,
    revision: str | None = None,
    check_merged: bool = True,
) -> Item:
    paths = [os.path.join(folder, name) for name in SOURCE_FILES]
    (blocks, error), (unquantized, error2) = _read(paths[0]), _read(paths[1])
    if blocks is None or unquantized is None:
        bad = error or error2
        assert bad is not None
        return Item(folder, unreadable(bad), _size(*paths), source, None, repo, revision, _why(bad))
    judgement = judge_folder(blocks, unquantized)
    note = None
    if check_merged:
        merged, note = _merged_note(folder)
        if merged:
            judgement = Judgement(
                judgement.kind,
                True,
                judgement.family,
                judgement.precision,
                judgement.rank,
                _all_loaders(judgement.family, True),
            )
            fix = None
    return Item(folder, judgement, _size(*paths), source, fix, repo, revision, note)


_PLANNERS: list[Planner] = []


def _checked_fix(header: Header, path: str, command: str) -> tuple[str | None, str | None]:
    """Return ``command`` if a patch with no options would succeed, else no command and why (e.g. needs --model)."""
    from .plan import PatchOptions, Planner

    if not _PLANNERS:
        _PLANNERS.append(Planner(PatchOptions(), log=lambda _line: None))
    try:
        _PLANNERS[0].plan(path, header)
    except PatchError as exc:
        return None, exc.message + (f". {exc.hint}" if exc.hint else "")
    return command, None


def _file_item(
    path: str,
    *,
    source: Source,
    fix: str,
    repo: str | None = None,
    revision: str | None = None,
    display: str | None = None,
) -> Item:
    header, error = _read(path)
    shown = display or path
    if header is None:
        assert error is not None
        return Item(shown, unreadable(error), _size(path), source, None, repo, revision, _why(error))
    judgement = judge(header, name=os.path.basename(path))
    command: str | None = None
    note: str | None = None
    if judgement.kind == "single file" and not judgement.ok:
        command, note = _checked_fix(header, path, fix)
    elif judgement.kind in ("blocks-only half", "unquantized half"):
        note = "nothing to patch on its own: the other half of the conversion is needed (then `merge` the folder)"
    return Item(shown, judgement, header.file_size, source, command, repo, revision, note)


def _walk(root: str) -> Iterator[tuple[str, list[str]]]:
    """Yield (folder, sorted safetensors names) below ``root``; hidden entries and symlinked folders skipped."""
    for current, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        names = sorted(n for n in filenames if n.lower().endswith(SUFFIX) and not n.startswith("."))
        if names:
            yield current, names


def _local_fix(path: str, fix_dir: str) -> str:
    if os.path.islink(path):  # a cache snapshot entry or another shared file: write a copy
        return fix_copy(path, fix_dir, os.path.basename(path))
    return fix_in_place(path)


def _is_pair(folder: str) -> bool:
    return all(os.path.isfile(os.path.join(folder, name)) for name in SOURCE_FILES)


def scan_paths(paths: Iterable[str], *, fix_dir: str = DEFAULT_FIX_DIR) -> Iterator[Item]:
    """Yield one item per safetensors file and per deepcompressor folder at or below ``paths``.

    A folder holding both of deepcompressor's files is one item (its halves are not listed on their own); a half
    without its sibling is listed as what it is. Raise PatchError for a path that does not exist.
    """
    seen: set[str] = set()

    def once(path: str) -> bool:
        key = os.path.realpath(path)
        if key in seen:
            return False
        seen.add(key)
        return True

    work: list[_Unit] = []
    for raw in paths:
        if os.path.isdir(raw):
            units = list(_walk(raw))
        elif os.path.isfile(raw):
            units = [(os.path.dirname(raw), [os.path.basename(raw)])]
        else:
            raise PatchError("no such file or directory", path=raw, code="not-found", hint="check the path")
        for folder, names in units:
            if set(names) & set(SOURCE_FILES) and _is_pair(folder or "."):
                shown = folder or "."
                if once(shown):
                    work.append(_Unit(True, shown, "local", fix_merge(shown)))
                names = [n for n in names if n not in SOURCE_FILES]
            for name in names:
                path = os.path.join(folder, name)
                if once(path):
                    work.append(_Unit(False, path, "local", _local_fix(path, fix_dir)))
    return _run(work)


@dataclass(frozen=True)
class _Unit:
    """One row to build: a folder or a file, where it comes from, and its fix."""

    folder: bool
    path: str
    source: Source
    fix: str
    repo: str | None = None
    revision: str | None = None


def _build(unit: _Unit) -> Item:
    if unit.folder:
        return _folder_item(
            unit.path,
            source=unit.source,
            fix=unit.fix,
            repo=unit.repo,
            revision=unit.revision,
            check_merged=unit.source == "local",
        )
    return _file_item(unit.path, source=unit.source, fix=unit.fix, repo=unit.repo, revision=unit.revision)


def _workers(count: int) -> int:
    """Return how many processes to read ``count`` headers with (1: in this process)."""
    if count < PARALLEL_FROM:
        return 1
    return max(1, min(MAX_WORKERS, os.cpu_count() or 1, count // (PARALLEL_FROM // 2)))


def _run(units: list[_Unit]) -> Iterator[Item]:
    """Build the rows in order; a large scan reads headers in several processes (parsing is CPU-bound)."""
    workers = _workers(len(units))
    if workers == 1:
        yield from map(_build, units)
        return
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(max_workers=workers) as pool:
        yield from pool.map(_build, units, chunksize=8)


# --------------------------------------------------------------------------------------------
# The Hugging Face cache


def scan_hf_cache(cache_dir: str | os.PathLike[str] | None = None, *, fix_dir: str = DEFAULT_FIX_DIR) -> Iterator[Item]:
    """Yield an item per cached model repo / revision / safetensors file (and deepcompressor folder).

    The cache is read with ``huggingface_hub.scan_cache_dir`` (``HF_HUB_CACHE`` / ``HF_HOME`` unless
    ``cache_dir``). The fixes write patched copies into ``fix_dir``: blobs are shared and content-addressed.
    """
    from huggingface_hub import scan_cache_dir

    from .resolve import hf_cache_dir

    root = Path(cache_dir) if cache_dir is not None else hf_cache_dir()
    if not root.is_dir():
        return
    info = scan_cache_dir(root)
    work: list[_Unit] = []
    for repo in sorted(info.repos, key=lambda r: r.repo_id):
        if repo.repo_type != "model":
            continue
        for revision in sorted(repo.revisions, key=lambda r: (sorted(r.refs) or ["~"], r.commit_hash)):
            snapshot = os.fspath(revision.snapshot_path)
            label = ",".join(sorted(revision.refs)) or revision.commit_hash[:12]
            files = sorted(
                os.path.relpath(os.fspath(f.file_path), snapshot)
                for f in revision.files
                if f.file_name.lower().endswith(SUFFIX)
            )
            by_folder: dict[str, list[str]] = {}
            for relative in files:
                folder, name = os.path.split(relative)
                by_folder.setdefault(folder, []).append(name)
            for folder, names in sorted(by_folder.items()):
                if all(n in names for n in SOURCE_FILES):
                    where = os.path.join(snapshot, folder) if folder else snapshot
                    work.append(_Unit(True, where, "hf-cache", fix_merge(where, fix_dir), repo.repo_id, label))
                    names = [n for n in names if n not in SOURCE_FILES]
                for name in names:
                    path = os.path.join(snapshot, folder, name)
                    work.append(_Unit(False, path, "hf-cache", fix_copy(path, fix_dir, name), repo.repo_id, label))
    yield from _run(work)


# --------------------------------------------------------------------------------------------
# Hub repos


def scan_hub(where: HubPath, hub: Hub, *, fix_dir: str = DEFAULT_FIX_DIR) -> Iterator[Item]:
    """Yield an item per safetensors file and deepcompressor folder of a Hub repo (or folder, or one file)."""
    from .hub import RemoteFile

    if where.is_file:
        files = [RemoteFile(where.path, None)]
        commit = where.revision
    else:
        snapshot = hub.snapshot(where)
        files = [f for f in snapshot.under(where.path) if f.path.lower().endswith(SUFFIX)]
        commit = snapshot.commit
    by_folder: dict[str, list[RemoteFile]] = {}
    for f in files:
        by_folder.setdefault(f.path.rpartition("/")[0], []).append(f)
    for folder, entries in sorted(by_folder.items()):
        names = {f.path.rpartition("/")[2]: f for f in entries}
        if all(n in names for n in SOURCE_FILES):
            yield _remote_folder(where, folder, [names[n] for n in SOURCE_FILES], hub, commit, fix_dir)
            entries = [f for n, f in names.items() if n not in SOURCE_FILES]
        for f in entries:
            yield _remote_file(where.child(f.path), hub, commit, fix_dir, f.size)


def _remote_file(where: HubPath, hub: Hub, commit: str | None, fix_dir: str, size: int | None) -> Item:
    try:
        remote = hub.read_header(where, revision=commit)
    except PatchError as exc:
        if exc.code in ("offline", "network", "gated", "unauthorized", "repo-not-found", "revision-not-found"):
            raise  # the same for every file of the repo: one line for the run, not one per file
        return Item(str(where), unreadable(exc), size, "hub", None, where.repo_id, where.revision, _why(exc))
    judgement = judge(remote.header, name=where.name)
    fix: str | None = None
    note: str | None = None
    if judgement.kind == "single file" and not judgement.ok:
        fix, note = _checked_fix(remote.header, str(where), fix_copy(str(where), fix_dir, where.name))
    return Item(str(where), judgement, remote.size, "hub", fix, where.repo_id, where.revision, note)


def _remote_folder(where: HubPath, folder: str, halves: list[Any], hub: Hub, commit: str | None, fix_dir: str) -> Item:
    place = where.child(folder) if folder else where.child("")
    headers = []
    for f in halves:
        try:
            headers.append(hub.read_header(where.child(f.path), revision=commit).header)
        except PatchError as exc:
            if exc.code in ("offline", "network", "gated", "unauthorized", "repo-not-found", "revision-not-found"):
                raise
            return Item(str(place), unreadable(exc), None, "hub", None, where.repo_id, where.revision, _why(exc))
    size = sum(h.file_size for h in headers)
    return Item(
        str(place),
        judge_folder(headers[0], headers[1]),
        size,
        "hub",
        fix_merge(str(place), fix_dir),
        where.repo_id,
        where.revision,
    )


# --------------------------------------------------------------------------------------------
# Records


def item_json(item: Item) -> dict[str, Any]:
    """Return the ``--json`` fields of a row beyond ``path`` / ``status`` (the validate record's schema)."""
    j = item.judgement
    return {
        "kind": j.kind,
        "fix": item.fix,
        "source": item.source,
        "repo": item.repo,
        "revision": item.revision,
        "family": j.family.value if j.family is not None else None,
        "precision": j.precision,
        "rank": j.rank,
        "size": item.size,
        "verdicts": {key: {"ok": ok} for key, ok in j.verdicts.items()},
        "note": item.note,
    }


__all__ = [
    "DEFAULT_FIX_DIR",
    "KINDS",
    "Item",
    "Judgement",
    "fix_copy",
    "fix_in_place",
    "fix_merge",
    "item_json",
    "judge",
    "judge_folder",
    "scan_hf_cache",
    "scan_hub",
    "scan_paths",
]
