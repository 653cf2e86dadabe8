"""Merge deepcompressor output folders into Nunchaku's single file, at the header level.

deepcompressor's converter writes a folder with ``transformer_blocks.safetensors`` and
``unquantized_layers.safetensors`` and no metadata; nunchaku >= 0.3 loads one file
(``svdq-{int4|fp4}_r{rank}-{model}.safetensors``) carrying metadata (nunchaku-contract.md sections 1 and 7).
nunchaku's own ``merge_safetensors`` loads every tensor to build it. Here no tensor is ever decoded:

* :func:`plan_merge` (pure apart from reading the two headers and the folder's ``config.json`` /
  ``comfy_config.json``) builds the union tensor table -- the blocks' data region first, the unquantized
  layers' shifted after it -- and the metadata a patch would write, as a :class:`MergePlan`;
* :func:`write_merge` writes the new prefix to a temp file beside the output, streams each source's data
  region into it with ``copy_file_range`` (a chunked copy where the kernel cannot), checks the result, and
  renames it into place. Memory does not depend on the size of the model.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Literal

from . import _files as files
from . import _platform as plat
from . import journal as jn
from . import models
from ._record import dataclass
from .errors import HeaderError, PatchError, UsageError, WriteError
from .facts import BLOCKS_FILE, UNQUANTIZED_FILE, Precision
from .header import (
    ALIGNMENT,
    PREFIX_SIZE,
    Header,
    TensorInfo,
    metadata_equal,
    pack_prefix,
    parse_header,
    read_header,
    read_header_fd,
    same_tensors,
    serialize_header,
)
from .plan import PatchPlan, Planner
from .splice import _copy_length, check_output_target

#: The two files deepcompressor's nunchaku backend writes (``backend/nunchaku/convert.py``), blocks first.
SOURCE_FILES = (BLOCKS_FILE, UNQUANTIZED_FILE)
#: Config files older conversion folders carry (the legacy ``svdq-int4-flux.1-dev`` repositories), used verbatim.
FOLDER_CONFIG = "config.json"
FOLDER_COMFY_CONFIG = "comfy_config.json"
#: How nunchaku's file names spell each precision (it calls nvfp4 ``fp4``).
FILE_PRECISION: Mapping[Precision, str] = {"int4": "int4", "nvfp4": "fp4"}
#: Shared names listed in a clash error before "and N more".
_CLASH_SHOWN = 3

# A published-style prefix on a folder name (``svdq-int4-``, ``svdq-fp4_r128-``), dropped when the folder name
# stands in for the model name, so the default output does not say the precision twice.
_SVDQ_PREFIX = re.compile(r"^svdq-(?:int4|fp4|nvfp4)(?:[-_]r\d+)?[-_]", re.IGNORECASE)


# --------------------------------------------------------------------------------------------
# Values


@dataclass(frozen=True)
class MergeSource:
    """One of the two input files, and where its data region lands in the merged one."""

    path: str
    header: Header
    #: Offset of this source's data region inside the merged data region.
    shift: int

    @property
    def name(self) -> str:
        """Return the file name (``transformer_blocks.safetensors`` or ``unquantized_layers.safetensors``)."""
        return os.path.basename(self.path)


@dataclass(frozen=True)
class MergePlan:
    """Everything decided for one folder before anything is written (a value: no file handle inside)."""

    folder: str
    #: The blocks file, then the unquantized layers (the order of the merged data region).
    sources: tuple[MergeSource, MergeSource]
    #: The merged tensor table, blocks first, offsets of the second source shifted.
    tensors: Mapping[str, TensorInfo]
    #: The metadata decisions, made by the Planner on the merged header.
    patch: PatchPlan
    #: The N bytes of the merged header, padded with spaces (8 + N is a multiple of 4096).
    header_bytes: bytes
    output: str
    #: The folder's own config files that were used verbatim.
    folder_configs: tuple[str, ...] = ()
    #: Things that do not stop the merge but deserve a look.
    warnings: tuple[str, ...] = ()

    @property
    def metadata(self) -> dict[str, str]:
        """Return the ``__metadata__`` the merged file gets."""
        return self.patch.new_metadata

    @property
    def header_len(self) -> int:
        """Return N, the merged header's length."""
        return len(self.header_bytes)

    @property
    def data_start(self) -> int:
        """Return the file offset of the merged data region."""
        return PREFIX_SIZE + self.header_len

    @property
    def data_len(self) -> int:
        """Return the length of the merged data region (the sum of both sources')."""
        return sum(source.header.data_len for source in self.sources)

    @property
    def file_size(self) -> int:
        """Return the size of the merged file."""
        return self.data_start + self.data_len

    @property
    def prefix(self) -> bytes:
        """Return the first 8 + N bytes of the merged file."""
        return pack_prefix(self.header_bytes)


@dataclass(frozen=True)
class MergeResult:
    """What :func:`write_merge` did for one folder."""

    plan: MergePlan
    output: str
    #: ``merged``: the file was written; ``unchanged``: the output already held exactly this merge.
    status: Literal["merged", "unchanged"]
    #: Bytes of tensor data copied (0 when unchanged).
    bytes_copied: int = 0


# --------------------------------------------------------------------------------------------
# Finding folders


def _is_source_dir(filenames: Iterable[str]) -> bool:
    return any(name in SOURCE_FILES for name in filenames)


def find_folders(paths: Iterable[str | os.PathLike[str]]) -> list[Path]:
    """Return the deepcompressor output folders in or at ``paths`` (directories searched recursively).

    A folder counts when it holds either file, so one holding only half is found and fails in
    :func:`plan_merge` with a clear message. A path naming one of the two files means its folder.
    Raise :class:`PatchError` for a path that does not exist, is another file, or holds no such folder.
    """
    found: dict[str, Path] = {}
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise PatchError("no such file or directory", path=path, code="not-found")
        if not path.is_dir():
            if path.name in SOURCE_FILES:
                found.setdefault(os.path.normpath(path.parent), path.parent)
                continue
            raise PatchError(
                "is not a folder",
                path=path,
                code="not-a-folder",
                expected=f"a folder holding {BLOCKS_FILE} and {UNQUANTIZED_FILE}",
                hint="to add metadata to a single file, run `nunchaku-patch FILE` instead",
            )
        here = 0
        for current, dirnames, filenames in os.walk(path):
            # Sorted and without hidden folders: a stable order, and no .git or cache internals.
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            if _is_source_dir(filenames):
                here += 1
                found.setdefault(os.path.normpath(current), Path(current))
        if not here:
            raise PatchError(
                "no deepcompressor output folder here",
                path=path,
                code="no-folders",
                expected=f"a folder holding {BLOCKS_FILE} and {UNQUANTIZED_FILE}",
                hint="point at the folder deepcompressor's converter wrote",
            )
    return list(found.values())


# --------------------------------------------------------------------------------------------
# Planning (pure apart from reading the two headers and the folder's config files)


def _folder_name(folder: Path) -> str:
    """Return the folder's own name, also for ``.`` and ``..``."""
    return os.path.basename(os.path.abspath(folder))


def _label(folder: Path) -> str:
    """Return how messages name the folder: as given, unless that has no name of its own (``.``)."""
    normal = os.path.normpath(folder)
    return normal if os.path.basename(normal) not in ("", ".", "..") else os.path.abspath(folder)


def merge_tables(blocks: Header, unquantized: Header, *, folder: str) -> dict[str, TensorInfo]:
    """Return the union table: the blocks as they are, then the unquantized layers shifted past the blocks' data."""
    shared = [name for name in unquantized.tensors if name in blocks.tensors]
    if shared:
        shown = ", ".join(repr(name) for name in shared[:_CLASH_SHOWN])
        more = f" and {len(shared) - _CLASH_SHOWN} more" if len(shared) > _CLASH_SHOWN else ""
        raise PatchError(
            f"tensor name(s) {shown}{more} are in both {BLOCKS_FILE} and {UNQUANTIZED_FILE}",
            path=folder,
            code="name-clash",
            expected="disjoint tensor names",
            got=f"{len(shared)} shared",
            hint="these are not the two halves of one conversion; check the folder's contents",
        )
    shift = blocks.data_len
    merged = dict(blocks.tensors)
    for name, info in unquantized.tensors.items():
        begin, end = info.data_offsets
        merged[name] = info._replace(data_offsets=(begin + shift, end + shift))
    return merged


def _source_metadata(blocks: Header, unquantized: Header, warnings: list[str]) -> dict[str, str] | None:
    """Return the union of the sources' own metadata (deepcompressor writes none), blocks winning a conflict."""
    if blocks.metadata is None and unquantized.metadata is None:
        return None
    union = dict(blocks.metadata or {})
    for key, value in (unquantized.metadata or {}).items():
        if key in union and union[key] != value:
            warnings.append(f"metadata {key!r} differs between the two files; keeping {BLOCKS_FILE}'s value")
            continue
        union[key] = value
    return union


def _folder_planner(folder: Path, planner: Planner) -> tuple[Planner, tuple[str, ...]]:
    """Return a Planner that uses the folder's config files verbatim (an explicit --config/--comfy-config wins)."""
    options = planner.options
    config_file, comfy_file = options.config, options.comfy_config
    used: list[str] = []
    config = folder / FOLDER_CONFIG
    if config.is_file():
        if options.config is None:
            config_file = os.fspath(config)
            used.append(FOLDER_CONFIG)
        else:
            planner.log(f"--config {options.config} takes precedence over {config}")
    comfy = folder / FOLDER_COMFY_CONFIG
    if comfy.is_file():
        if options.comfy_config is None:
            comfy_file = os.fspath(comfy)
            used.append(FOLDER_COMFY_CONFIG)
        else:
            planner.log(f"--comfy-config {options.comfy_config} takes precedence over {comfy}")
    if not used:
        return planner, ()
    planner.log(f"Using the folder's {' and '.join(used)} verbatim")
    return Planner(replace(options, config=config_file, comfy_config=comfy_file), log=planner.log), tuple(used)


def _model_name(patch: PatchPlan, folder_name: str) -> str:
    """Return the model part of the default output name: a known model's short name, else the folder's name."""
    if patch.model_name:
        return patch.model_name
    try:
        config = json.loads(patch.new_metadata.get("config", "{}"))
    except ValueError:
        config = {}
    if isinstance(config, dict):
        # The folder name may say which of several models with the same architecture this is (dev, krea, ...).
        hinted = models.find_in_name(folder_name)
        if (
            hinted is not None
            and hinted.family is patch.family
            and (hinted.embedded_config is None or models.functionally_identical(config, hinted))
        ):
            return hinted.name
        same = [
            m
            for m in models.all_models()
            if m.family is patch.family and m.embedded_config is not None and models.functionally_identical(config, m)
        ]
        if len(same) == 1:
            return same[0].name
    return _SVDQ_PREFIX.sub("", folder_name) or folder_name


def output_name(precision: Precision, rank: int | None, model: str) -> str:
    """Return nunchaku's file name for a merged model: ``svdq-{int4|fp4}_r{rank}-{model}.safetensors``.

    Without a rank (the T5 encoder's AWQ weights) the name is Nunchaku's ``awq-int4-{model}.safetensors``.
    """
    if rank is None:
        return f"awq-int4-{model}.safetensors"
    return f"svdq-{FILE_PRECISION[precision]}_r{rank}-{model}.safetensors"


def _output_path(folder: Path, name: str, output: str | os.PathLike[str] | None) -> str:
    # A trailing separator names a folder, also one not created yet (a dry run of ``-o new/``).
    if output is not None and not os.path.isdir(output) and not os.fspath(output).endswith(("/", os.sep)):
        return os.fspath(output)
    if output is not None:
        return os.path.join(output, name)
    return os.path.join(os.path.dirname(_label(folder)), name)


def plan_merge(
    folder: str | os.PathLike[str], planner: Planner, *, output: str | os.PathLike[str] | None = None
) -> MergePlan:
    """Plan the merge of one deepcompressor output folder (``output``: a file, or a folder for the default name)."""
    where = Path(folder)
    label = _label(where)
    paths = [where / name for name in SOURCE_FILES]
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        present = [p.name for p in paths if p.name not in missing]
        what = f"has {present[0]} but no {missing[0]}" if present else f"has neither {' nor '.join(SOURCE_FILES)}"
        raise PatchError(
            f"incomplete deepcompressor output folder: it {what}",
            path=label,
            code="incomplete-folder",
            expected="both files deepcompressor's converter writes",
            hint="copy the missing file from the conversion's output (or patch a merged file with `nunchaku-patch`)",
        )
    blocks, unquantized = (read_header(p) for p in paths)
    return plan_headers(
        label,
        (os.fspath(paths[0]), blocks),
        (os.fspath(paths[1]), unquantized),
        planner,
        config_folder=where,
        folder_name=_folder_name(where),
        place=lambda name: _output_path(where, name, output),
    )


def plan_headers(
    label: str,
    blocks_source: tuple[str, Header],
    unquantized_source: tuple[str, Header],
    planner: Planner,
    *,
    config_folder: Path | None,
    folder_name: str,
    place: Callable[[str], str],
) -> MergePlan:
    """Plan a merge from the two headers already read (locally, or from a Hub repo by ``patcher.hubwrite``).

    ``config_folder``: where the folder's own ``config.json`` / ``comfy_config.json`` are looked for;
    ``place`` maps the default file name to the output path.
    """
    (blocks_path, blocks), (unquantized_path, unquantized) = blocks_source, unquantized_source
    names = [os.path.basename(blocks_path), os.path.basename(unquantized_path)]
    warnings = [f"{n}: {w}" for n, h in zip(names, (blocks, unquantized), strict=True) for w in h.warnings]
    tensors = merge_tables(blocks, unquantized, folder=label)
    if blocks.data_len % ALIGNMENT:
        warnings.append(
            f"{UNQUANTIZED_FILE}'s tensors start at data offset {blocks.data_len}, not a multiple of {ALIGNMENT}: "
            "loaders that map tensors in place may need them aligned"
        )
    existing = _source_metadata(blocks, unquantized, warnings)
    data_len = blocks.data_len + unquantized.data_len
    raw = serialize_header(existing, tensors)
    merged = parse_header(raw, PREFIX_SIZE + len(raw) + data_len, source=label)
    folder_planner, used = _folder_planner(config_folder, planner) if config_folder is not None else (planner, ())
    patch = folder_planner.plan(label, merged)
    compact = serialize_header(patch.new_metadata, tensors).rstrip(b" ")
    # Spare room up to a 4 KiB boundary, as the copy path of a patch leaves: a later edit is a fit in place.
    header_bytes = jn.padded(compact, _copy_length(len(compact)), label)
    name = output_name(patch.precision, patch.rank, _model_name(patch, folder_name))
    return MergePlan(
        folder=label,
        sources=(
            MergeSource(blocks_path, blocks, 0),
            MergeSource(unquantized_path, unquantized, blocks.data_len),
        ),
        tensors=tensors,
        patch=patch,
        header_bytes=header_bytes,
        output=place(name),
        folder_configs=used,
        warnings=tuple(warnings),
    )


# --------------------------------------------------------------------------------------------
# Writing


def _matches(fd: int, path: str, plan: MergePlan, source_fds: Iterable[int] | None) -> list[str]:
    """Return how the open file ``fd`` differs from the planned merge (empty: it is the merge).

    The table, metadata and size are compared in full; the data by the first and last 64 KiB of each source's
    region (against the sources when their fds are given, else only the layout is checked).
    """
    try:
        got = read_header_fd(fd, source=path)
    except HeaderError as exc:
        return [f"its header does not parse ({exc.message})"]
    problems = []
    if not same_tensors(got.tensors, plan.tensors):
        problems.append("the tensor table differs from the plan")
    if not metadata_equal(got.metadata, plan.metadata) or not got.has_metadata_key:
        problems.append("the metadata differs from the plan")
    expected_size = got.data_start + plan.data_len
    size = os.fstat(fd).st_size
    if size != expected_size:
        problems.append(f"the file is {size:,} bytes, expected {expected_size:,}")
    elif source_fds is not None:
        for source, src_fd in zip(plan.sources, source_fds, strict=True):
            head = source.header
            want = jn.fingerprint(src_fd, head.data_start, head.data_len)
            if jn.fingerprint(fd, got.data_start + source.shift, head.data_len) != want:
                problems.append(f"the bytes from {source.name} are not where they should be")
    return problems


def _open_sources(plan: MergePlan) -> list[tuple[int, os.stat_result]]:
    """Open and share-lock both sources, checking they are still what was planned."""
    opened: list[tuple[int, os.stat_result]] = []
    try:
        for source in plan.sources:
            # A shared lock: no in-place patch of a source can run while it is copied.
            fd, st = files.open_locked(source.path, writable=False, exclusive=False, wait=0.0)
            opened.append((fd, st))
            if os.path.lexists(files.journal_path(os.path.realpath(source.path))):
                raise WriteError(
                    "has an interrupted in-place patch",
                    path=source.path,
                    code="interrupted",
                    hint="run nunchaku-patch on it first to finish it",
                )
            try:
                now = read_header_fd(fd, source=source.path)
            except HeaderError as exc:
                raise WriteError(
                    f"changed since the merge was planned ({exc.message})", path=source.path, code="changed"
                ) from None
            if now.raw != source.header.raw or now.data_len != source.header.data_len:
                raise WriteError("changed since the merge was planned", path=source.path, code="changed")
    except BaseException:
        for fd, _ in opened:
            files.close(fd)
        raise
    return opened


def check_output(plan: MergePlan, *, force: bool = False, follow_symlinks: bool = False) -> bool:
    """Return True when the output already holds exactly this merge; raise WriteError if it exists otherwise.

    ``force`` allows replacing an existing, different regular file; a device, FIFO, socket or folder is never
    replaced, and a symbolic link only with ``follow_symlinks`` (the rules of ``-o``, shared with ``patch``).
    Only headers and 64 KiB windows are read.
    """
    dest = check_output_target(plan.output, force=force, follow_symlinks=follow_symlinks, exists_ok=True)
    if dest != plan.output:
        plan = replace(plan, output=dest)
    if not os.path.lexists(dest):
        return False
    for source in plan.sources:
        with contextlib.suppress(OSError):
            if os.path.samefile(dest, source.path):
                raise UsageError("the output is one of the files being merged", path=dest, hint="choose another -o")
    try:
        fd = files.open_file(dest, os.O_RDONLY | getattr(os, "O_BINARY", 0))
    except OSError as exc:
        if force:
            return False
        raise files.os_error(exc, dest, "cannot read the existing output") from None
    try:
        fds = _open_sources(plan)
        try:
            identical = not _matches(fd, dest, plan, [f for f, _ in fds])
        finally:
            for f, _ in fds:
                files.close(f)
    finally:
        os.close(fd)
    if identical or force:
        return identical
    raise WriteError(
        "the output already exists and holds something else",
        path=dest,
        code="exists",
        hint="pass --force to replace it, or choose another name with -o",
    )


def write_merge(plan: MergePlan, *, force: bool = False, follow_symlinks: bool = False) -> MergeResult:
    """Write the merged file: temp file, new prefix, kernel-side copy of each data region, fsync, rename.

    Refuse to replace an existing output unless ``force`` (an output already holding this merge is left alone).
    On any failure the temp file is removed and a one-line :class:`WriteError` raised; the output is untouched.
    """
    if check_output(plan, force=force, follow_symlinks=follow_symlinks) and not force:
        return MergeResult(plan, plan.output, "unchanged")
    dest = check_output_target(plan.output, force=True, follow_symlinks=follow_symlinks)
    directory, name = os.path.split(dest)
    directory = directory or "."
    opened = _open_sources(plan)
    tmp: str | None = None
    handle: files.Handle | None = None
    replaced = False
    try:
        files.sweep_temps(directory, name)
        tmp_fd, tmp = files.create_temp(directory, name)
        handle = files.Handle(tmp_fd)
        files.fault("tmp-created")
        prefix = plan.prefix
        plat.pwrite_all(tmp_fd, prefix, 0)
        for index, (source, (src_fd, _)) in enumerate(zip(plan.sources, opened, strict=True)):
            head = source.header
            plat.copy_data(src_fd, tmp_fd, head.data_start, len(prefix) + source.shift, head.data_len)
            if index == 0:
                files.fault("data-half")
        files.fault("data-copied")
        # A new file, like cp makes: the blocks file's permission bits, our owner.
        plat.copy_attributes(opened[0][1], tmp_fd, tmp)
        plat.fsync(tmp_fd)
        problems = _matches(tmp_fd, dest, plan, [fd for fd, _ in opened])
        if problems:
            raise WriteError("verification failed: " + "; ".join(problems), path=dest, code="verify")
        files.fault("verified")
        if plat.IS_WINDOWS:
            handle.close()  # Windows renames no open file
        os.replace(tmp, dest)
        replaced = True
        files.fault("replaced")
        plat.fsync_dir(directory)
    except OSError as exc:
        raise files.os_error(exc, dest) from None
    except WriteError as exc:
        if exc.path is None or exc.path == tmp:  # the temp file is ours: name the output the user asked for
            raise WriteError(
                exc.message, path=dest, code=exc.code, expected=exc.expected, got=exc.got, hint=exc.hint
            ) from None
        raise
    finally:
        if handle is not None:
            handle.close()  # before the unlink: Windows removes no open file
        if not replaced and tmp is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        for fd, _ in opened:
            files.close(fd)
    return MergeResult(plan, dest, "merged", plan.data_len)


__all__ = [
    "BLOCKS_FILE",
    "FILE_PRECISION",
    "SOURCE_FILES",
    "UNQUANTIZED_FILE",
    "MergePlan",
    "MergeResult",
    "MergeSource",
    "check_output",
    "find_folders",
    "merge_tables",
    "output_name",
    "plan_headers",
    "plan_merge",
    "write_merge",
]
