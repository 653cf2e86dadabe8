"""The in-place header writer: each strategy on real files, the refusals, locks, leases and the big sparse file."""

from __future__ import annotations

import hashlib
import json
import math
import os
import stat
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open
from safetensors.numpy import load_file

from patcher import _platform as plat
from patcher import splice
from patcher.errors import LinkError, LockedError, PatchError, UsageError, WriteError
from patcher.header import parse_header, read_header
from patcher.splice import Strategy, write_metadata

Sha256Range = Callable[..., str]
MakeSafetensors = Callable[..., Path]
REPO = Path(__file__).resolve().parent.parent
ORIGINAL = {"format": "pt"}
CONFIG = json.dumps({"_class_name": "FluxTransformer2DModel", "num_layers": 19, "num_single_layers": 38})
GROWN = {"format": "pt", "config": CONFIG, "model_class": "NunchakuFluxTransformer2dModel"}

insert_fs = pytest.mark.skipif(
    not plat.insert_range_likely(os.environ.get("TMPDIR", "/tmp")),
    reason="the temp directory is not on ext4/XFS (no insert-range)",
)


def data_sha(path: Path, sha256_range: Sha256Range) -> str:
    """Hash the data region (wherever the header currently ends)."""
    return sha256_range(path, read_header(path).data_start)


def oracle_metadata(path: Path) -> dict[str, str] | None:
    """Return the metadata as the reference reader sees it."""
    with safe_open(str(path), framework="np") as handle:
        metadata: dict[str, str] | None = handle.metadata()
    return metadata


def leftovers(path: Path) -> list[str]:
    """Return our journal and temp files beside ``path``."""
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.npatch"))


def assert_tensors_equal(a: Mapping[str, np.ndarray], b: Mapping[str, np.ndarray]) -> None:
    assert list(a) == list(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].shape == b[name].shape
        assert np.array_equal(a[name], b[name]), name


def child(code: str, *args: str) -> subprocess.Popen[str]:
    """Start a helper process that prints a line when it is ready."""
    proc = subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert proc.stdout is not None
    assert proc.stdout.readline().strip() == "ready"
    return proc


# --------------------------------------------------------------------------------------------
# Each strategy on real files


@insert_fs
def test_insert_grows_by_whole_blocks_and_leaves_the_data_alone(
    make_safetensors: MakeSafetensors, sha256_range: Sha256Range
) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    before = read_header(path)
    tensors = load_file(str(path))
    data = data_sha(path, sha256_range)
    inode = path.stat().st_ino

    result = write_metadata(path, GROWN)

    assert result.strategy is Strategy.INSERT and result.changed
    grown = result.new_header_len - before.header_len
    assert grown > 0 and grown % plat.block_size(str(path)) == 0
    after = read_header(path)
    assert after.header_len == result.new_header_len and after.aligned
    assert result.spare == after.padding > 0
    assert path.stat().st_ino == inode  # in place: same file
    assert data_sha(path, sha256_range) == data
    assert oracle_metadata(path) == GROWN
    assert_tensors_equal(load_file(str(path)), tensors)
    assert leftovers(path) == []


@insert_fs
def test_the_spare_left_by_a_growth_is_used_by_the_next_edit(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    first = write_metadata(path, GROWN)
    assert first.strategy is Strategy.INSERT
    more = {**GROWN, "comfy_config": "x" * (first.spare // 2)}
    second = write_metadata(path, more)
    assert second.strategy is Strategy.FIT
    assert second.new_header_len == first.new_header_len
    assert second.spare < first.spare
    assert oracle_metadata(path) == more


def test_fit_rewrites_the_header_in_place(make_safetensors: MakeSafetensors, sha256_range: Sha256Range) -> None:
    path = make_safetensors(metadata={"format": "pt", "notes": "n" * 600})
    before = read_header(path)
    tensors = load_file(str(path))
    data = data_sha(path, sha256_range)
    size = path.stat().st_size

    result = write_metadata(path, GROWN)

    assert result.strategy is Strategy.FIT
    assert result.old_header_len == result.new_header_len == before.header_len
    assert path.stat().st_size == size
    assert sha256_range(path, before.data_start) == data  # same offset, same bytes
    assert oracle_metadata(path) == GROWN
    assert_tensors_equal(load_file(str(path)), tensors)
    raw = read_header(path).raw
    assert raw.startswith(b'{"__metadata__"') and raw.endswith(b" ")  # padded at the end with spaces only
    assert leftovers(path) == []


def test_copy_rewrites_into_a_new_file_with_page_aligned_data(
    make_safetensors: MakeSafetensors, sha256_range: Sha256Range
) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    path.chmod(0o640)
    tensors = load_file(str(path))
    data = data_sha(path, sha256_range)
    inode = path.stat().st_ino

    result = write_metadata(path, GROWN, strategy=Strategy.COPY)

    assert result.strategy is Strategy.COPY
    after = read_header(path)
    assert after.data_start % splice.COPY_BOUNDARY == 0
    assert result.spare == after.padding
    assert path.stat().st_ino != inode
    assert stat.S_IMODE(path.stat().st_mode) == 0o640
    assert data_sha(path, sha256_range) == data
    assert oracle_metadata(path) == GROWN
    assert_tensors_equal(load_file(str(path)), tensors)
    assert leftovers(path) == []


def test_tmpfs_takes_the_copy_path_by_itself(
    make_safetensors: MakeSafetensors, shm_dir: Path, sha256_range: Sha256Range
) -> None:
    path = make_safetensors(metadata=ORIGINAL, directory=shm_dir)
    data = data_sha(path, sha256_range)
    assert write_metadata(path, GROWN, dry_run=True).strategy is Strategy.COPY
    result = write_metadata(path, GROWN)
    assert result.strategy is Strategy.COPY
    assert data_sha(path, sha256_range) == data
    assert oracle_metadata(path) == GROWN
    assert leftovers(path) == []


def test_forced_insert_on_tmpfs_fails_cleanly(
    make_safetensors: MakeSafetensors, shm_dir: Path, sha256_range: Sha256Range
) -> None:
    path = make_safetensors(metadata=ORIGINAL, directory=shm_dir)
    whole = sha256_range(path)
    with pytest.raises(WriteError) as info:
        write_metadata(path, GROWN, strategy=Strategy.INSERT)
    assert info.value.code == "no-insert"
    assert "insert-range" in str(info.value)
    assert sha256_range(path) == whole
    assert leftovers(path) == []


def test_forced_fit_that_does_not_fit_is_refused(make_safetensors: MakeSafetensors, sha256_range: Sha256Range) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    whole = sha256_range(path)
    with pytest.raises(WriteError) as info:
        write_metadata(path, GROWN, strategy=Strategy.FIT)
    assert info.value.code == "no-fit"
    assert sha256_range(path) == whole


def test_output_writes_a_patched_copy_and_never_touches_the_source(
    make_safetensors: MakeSafetensors, tmp_path: Path, sha256_range: Sha256Range
) -> None:
    source = make_safetensors(metadata=ORIGINAL)
    whole = sha256_range(source)
    mtime = source.stat().st_mtime_ns
    out = tmp_path / "out" / "patched.safetensors"
    out.parent.mkdir()

    result = write_metadata(source, GROWN, output=out)

    assert result.strategy is Strategy.OUTPUT and result.output == str(out)
    assert sha256_range(source) == whole and source.stat().st_mtime_ns == mtime
    assert oracle_metadata(out) == GROWN
    assert data_sha(out, sha256_range) == data_sha(source, sha256_range)
    assert_tensors_equal(load_file(str(out)), load_file(str(source)))
    assert read_header(out).data_start % splice.COPY_BOUNDARY == 0
    assert leftovers(out) == []

    # A directory as the output means "the same name in there".
    again = write_metadata(source, GROWN, output=out.parent)
    assert again.output == str(out.parent / source.name)
    assert oracle_metadata(out.parent / source.name) == GROWN


def test_output_onto_the_source_itself_is_refused(make_safetensors: MakeSafetensors, sha256_range: Sha256Range) -> None:
    source = make_safetensors(metadata=ORIGINAL)
    whole = sha256_range(source)
    link = source.parent / "alias.safetensors"
    link.symlink_to(source.name)
    for output in (source, link, source.parent):
        with pytest.raises(UsageError):
            write_metadata(source, GROWN, output=output)
    assert sha256_range(source) == whole


# --------------------------------------------------------------------------------------------
# What a write means


def test_a_second_identical_write_changes_nothing(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    write_metadata(path, GROWN)
    stamp = path.stat().st_mtime_ns
    time.sleep(0.01)
    # Metadata compares key by key: the order of the keys does not matter.
    result = write_metadata(path, dict(reversed(list(GROWN.items()))))
    assert result.changed is False and result.strategy is Strategy.NONE
    assert result.new_header_len == result.old_header_len
    assert path.stat().st_mtime_ns == stamp
    assert leftovers(path) == []


def test_none_removes_the_metadata_key(make_safetensors: MakeSafetensors, sha256_range: Sha256Range) -> None:
    path = make_safetensors(metadata=GROWN)
    data = data_sha(path, sha256_range)
    result = write_metadata(path, None)
    assert result.changed and result.strategy is Strategy.FIT
    assert oracle_metadata(path) is None
    header = read_header(path)
    assert not header.has_metadata_key
    assert data_sha(path, sha256_range) == data
    # An empty map is not the same as no key.
    assert write_metadata(path, {}).changed
    assert read_header(path).has_metadata_key and oracle_metadata(path) == {}


def test_dry_run_writes_nothing_and_reports_what_the_write_would_do(
    make_safetensors: MakeSafetensors, sha256_range: Sha256Range
) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    whole, stamp = sha256_range(path), path.stat().st_mtime_ns
    result = write_metadata(path, GROWN, dry_run=True)
    predicted = Strategy.INSERT if plat.insert_range_likely(str(path)) else Strategy.COPY
    assert result.changed and result.strategy is predicted
    assert result.new_header_len > result.old_header_len
    assert sha256_range(path) == whole and path.stat().st_mtime_ns == stamp
    assert leftovers(path) == []
    # A dry run announces the refusal the real run would meet.
    path.chmod(0o444)
    with pytest.raises(WriteError, match="read-only"):
        write_metadata(path, GROWN, dry_run=True)


def test_backup_and_restore_give_back_the_exact_original_metadata(
    make_safetensors: MakeSafetensors, sha256_range: Sha256Range
) -> None:
    original = {"format": "pt", "origin": "deepcompressor"}
    path = make_safetensors(metadata=original)
    old = read_header(path)
    old_prefix = path.read_bytes()[: old.data_start]
    data = data_sha(path, sha256_range)

    first = write_metadata(path, GROWN, backup=True)
    assert first.backup == splice.backup_path(path)
    assert Path(first.backup).read_bytes() == old_prefix  # exactly the old 8 + N bytes
    write_metadata(path, {"other": "value"}, backup=True)
    assert Path(first.backup).read_bytes() == old_prefix  # the first backup keeps the original

    restored = splice.restore(path)
    assert restored.changed and restored.backup == first.backup
    assert oracle_metadata(path) == original
    assert data_sha(path, sha256_range) == data
    assert not os.path.exists(first.backup)


def test_restore_of_a_file_that_had_no_metadata_removes_the_key(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors()
    write_metadata(path, GROWN, backup=True)
    splice.restore(path)
    assert oracle_metadata(path) is None
    assert not read_header(path).has_metadata_key


def test_restore_without_a_backup_says_so(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    with pytest.raises(WriteError) as info:
        splice.restore(path)
    assert info.value.code == "no-backup"


def test_restore_refuses_a_backup_of_another_file(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    other = make_safetensors(name="other.safetensors", tensors={"x": np.zeros((3,), np.float32)})
    Path(splice.backup_path(path)).write_bytes(other.read_bytes()[: read_header(other).data_start])
    with pytest.raises(WriteError) as info:
        splice.restore(path)
    assert info.value.code == "bad-backup"


# --------------------------------------------------------------------------------------------
# Refusals


def test_a_symlink_is_refused_unless_followed(make_safetensors: MakeSafetensors, sha256_range: Sha256Range) -> None:
    blob = make_safetensors(name="blob", metadata=ORIGINAL)
    snapshot = blob.parent / "snapshot"
    snapshot.mkdir()
    link = snapshot / "model.safetensors"
    link.symlink_to(os.path.relpath(blob, snapshot))
    whole = sha256_range(blob)

    with pytest.raises(LinkError) as info:
        write_metadata(link, GROWN)
    message = str(info.value)
    assert message.startswith(str(link)) and "\n" not in message
    assert "-o" in message and "--follow-symlinks" in message
    assert sha256_range(blob) == whole

    # Nothing to write is no reason to refuse.
    assert write_metadata(link, ORIGINAL).changed is False
    # A copy elsewhere reads through the link.
    out = blob.parent / "out.safetensors"
    write_metadata(link, GROWN, output=out)
    assert oracle_metadata(out) == GROWN and sha256_range(blob) == whole

    result = write_metadata(link, GROWN, follow_symlinks=True)
    assert result.path == str(blob.resolve())
    assert link.is_symlink() and oracle_metadata(blob) == GROWN


def test_a_hard_linked_file_is_refused(make_safetensors: MakeSafetensors, sha256_range: Sha256Range) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    twin = path.parent / "twin.safetensors"
    os.link(path, twin)
    whole = sha256_range(path)
    with pytest.raises(LinkError) as info:
        write_metadata(path, GROWN)
    assert "hard links" in str(info.value) and "-o" in str(info.value)
    assert sha256_range(path) == whole
    out = path.parent / "out.safetensors"
    write_metadata(twin, GROWN, output=out)
    assert oracle_metadata(out) == GROWN and sha256_range(twin) == whole


def test_a_read_only_file_is_refused_before_anything_is_written(
    make_safetensors: MakeSafetensors, sha256_range: Sha256Range
) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    path.chmod(0o444)
    whole = sha256_range(path)
    for strategy in (None, Strategy.COPY):
        with pytest.raises(WriteError) as info:
            write_metadata(path, GROWN, strategy=strategy, backup=True)
        assert info.value.code == "read-only"
        assert str(info.value).startswith(str(path)) and "0444" in str(info.value)
    assert sha256_range(path) == whole
    assert leftovers(path) == [] and not os.path.exists(splice.backup_path(path))
    assert write_metadata(path, ORIGINAL).changed is False  # already right: fine


def test_an_immutable_file_is_refused(make_safetensors: MakeSafetensors, sha256_range: Sha256Range) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
        pytest.skip("chattr +i is not available here")
    try:
        whole = sha256_range(path)
        with pytest.raises(WriteError) as info:
            write_metadata(path, GROWN)
        assert info.value.code == "permission"
        assert sha256_range(path) == whole
    finally:
        subprocess.run(["chattr", "-i", str(path)], check=True)
    assert leftovers(path) == []


def test_bad_metadata_is_refused_with_the_file_named(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    with pytest.raises(PatchError) as info:
        write_metadata(path, {"rank": 32})  # type: ignore[dict-item]
    assert str(info.value).startswith(str(path))


# --------------------------------------------------------------------------------------------
# Other processes

_HOLD_LOCK = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY)
fcntl.flock(fd, fcntl.LOCK_EX)
print("ready", flush=True)
time.sleep(float(sys.argv[2])) if len(sys.argv) > 2 else sys.stdin.readline()
"""


def test_a_second_writer_gets_a_clear_lock_error(make_safetensors: MakeSafetensors, sha256_range: Sha256Range) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    whole = sha256_range(path)
    holder = child(_HOLD_LOCK, str(path))
    try:
        with pytest.raises(LockedError) as info:
            write_metadata(path, GROWN)
        assert "another nunchaku-patch" in str(info.value)
        with pytest.raises(LockedError):
            write_metadata(path, GROWN, wait=0.2)
        assert sha256_range(path) == whole
    finally:
        holder.communicate("\n", timeout=10)


def test_waiting_for_the_lock_succeeds_once_it_is_released(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    holder = child(_HOLD_LOCK, str(path), "0.4")
    try:
        result = write_metadata(path, GROWN, wait=20)
    finally:
        holder.communicate(timeout=10)
    assert result.changed and oracle_metadata(path) == GROWN


_READER = """
import hashlib, mmap, os, sys
fd = os.open(sys.argv[1], os.O_RDONLY)
if sys.argv[2] == "mmap":
    view = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    os.close(fd)
    read = lambda: view[:]
else:
    read = lambda: os.pread(fd, os.fstat(fd).st_size, 0)
print("ready", flush=True)
sys.stdin.readline()
print(hashlib.sha256(read()).hexdigest(), flush=True)
"""


@insert_fs
@pytest.mark.parametrize("how", ["mmap", "open"])
def test_a_reader_forces_the_copy_path_and_keeps_its_old_bytes(
    make_safetensors: MakeSafetensors, sha256_range: Sha256Range, how: str
) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    whole = sha256_range(path)
    reader = child(_READER, str(path), how)
    try:
        result = write_metadata(path, GROWN)
    finally:
        seen, _ = reader.communicate("\n", timeout=10)
    assert result.strategy is Strategy.COPY  # the write lease was refused: the data must not move under it
    assert seen.strip() == whole
    assert oracle_metadata(path) == GROWN
    # With the reader gone, the next growth is in place again.
    assert write_metadata(path, {**GROWN, "big": "b" * 20000}).strategy is Strategy.INSERT


_LEASE_BREAK = """
import fcntl, os, subprocess, sys, time
from patcher import _platform as plat
path = sys.argv[1]
fd = os.open(path, os.O_RDWR)
with plat.lease_break_handler() as installed:
    assert installed and plat.take_write_lease(fd)
    code = "import sys; open(sys.argv[1], 'rb').close(); print('opened', flush=True)"
    opener = subprocess.Popen([sys.executable, "-c", code, path], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    # F_GETLEASE reports the type the lease is being broken to once another process tries to open the file.
    while fcntl.fcntl(fd, plat.F_GETLEASE) == fcntl.F_WRLCK and time.monotonic() < deadline:
        time.sleep(0.01)
    broken = fcntl.fcntl(fd, plat.F_GETLEASE) != fcntl.F_WRLCK
    plat.release_lease(fd)
print("survived", broken, opener.communicate(timeout=30)[0].strip(), flush=True)
"""


@pytest.mark.skipif(not plat.IS_LINUX, reason="leases are Linux-only")
def test_a_lease_break_signals_the_holder_without_killing_it(tmp_path: Path) -> None:
    path = tmp_path / "leased.safetensors"
    path.write_bytes(b"x" * 64)
    proc = subprocess.run(
        [sys.executable, "-c", _LEASE_BREAK, str(path)], capture_output=True, text=True, timeout=60, cwd=REPO
    )
    assert proc.returncode == 0, (proc.returncode, proc.stderr)  # -29 would be death by SIGIO
    assert proc.stdout.split() == ["survived", "True", "opened"]


@insert_fs
def test_outside_the_main_thread_no_lease_can_be_taken_so_it_copies(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata=ORIGINAL)
    results: list[splice.WriteResult] = []
    worker = threading.Thread(target=lambda: results.append(write_metadata(path, GROWN)))
    worker.start()
    worker.join()
    assert [r.strategy for r in results] == [Strategy.COPY]
    assert oracle_metadata(path) == GROWN


# --------------------------------------------------------------------------------------------
# An unaligned file, and the pure planner


def test_growing_an_unaligned_file_rewrites_it_aligned(tmp_path: Path, sha256_range: Sha256Range) -> None:
    body = json.dumps({"t": {"dtype": "U8", "shape": [5000], "data_offsets": [0, 5000]}}).encode()
    assert (8 + len(body)) % 8 != 0
    path = tmp_path / "unaligned.safetensors"
    data = np.random.default_rng(1).integers(0, 256, 5000, dtype=np.uint8).tobytes()
    path.write_bytes(struct.pack("<Q", len(body)) + body + data)
    assert not read_header(path).aligned
    result = write_metadata(path, GROWN)
    assert result.strategy is Strategy.COPY
    assert read_header(path).aligned
    assert sha256_range(path, read_header(path).data_start) == hashlib.sha256(data).hexdigest()
    assert oracle_metadata(path) == GROWN


_BODY = json.dumps(
    {
        "__metadata__": {"format": "pt"},
        "a": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
        "b": {"dtype": "BF16", "shape": [3], "data_offsets": [64, 70]},
    },
    separators=(",", ":"),
).encode()
_HEADER = parse_header(_BODY + b" " * (-(8 + len(_BODY)) % 8 + 16))  # aligned, with 16+ bytes to spare
# No lone surrogates: serialize_header refuses them (tested with the header module).
_CHARS = st.characters(exclude_categories=["Cs"])


@settings(max_examples=60, deadline=None)
@given(
    metadata=st.none()
    | st.dictionaries(st.text(_CHARS, max_size=20), st.text(_CHARS, max_size=40) | st.text(_CHARS, max_size=3000)),
    forced=st.sampled_from([None, Strategy.COPY, Strategy.INSERT, Strategy.OUTPUT]),
)
def test_plan_write_produces_a_valid_header_laid_out_as_promised(
    metadata: dict[str, str] | None, forced: Strategy | None
) -> None:
    output = "out.safetensors" if forced is Strategy.OUTPUT else None
    plan = splice.plan_write(_HEADER, metadata, path="x.safetensors", block_size=4096, output=output, strategy=forced)
    new = parse_header(plan.new_header_bytes)
    assert list(new.tensors.items()) == list(_HEADER.tensors.items())
    assert new.has_metadata_key == (metadata is not None)
    assert dict(new.metadata or {}) == dict(metadata or {})
    assert plan.new_header_bytes.startswith(b"{") and new.padding == plan.spare
    assert set(plan.new_header_bytes[new.json_len :]) <= {0x20}
    unchanged = metadata == {"format": "pt"}
    assert plan.changed is not unchanged
    if unchanged and forced is not Strategy.OUTPUT:
        assert plan.strategy is Strategy.NONE and plan.new_header_bytes == _HEADER.raw
    elif unchanged:
        assert plan.new_header_bytes == _HEADER.raw  # an exact copy
    elif forced is Strategy.INSERT:
        assert plan.strategy is Strategy.INSERT
        assert plan.insert_len > 0 and plan.insert_len % 4096 == 0
        assert plan.new_header_len == _HEADER.header_len + plan.insert_len
    elif forced in (Strategy.COPY, Strategy.OUTPUT):
        assert plan.strategy is forced
        assert (8 + plan.new_header_len) % splice.COPY_BOUNDARY == 0
    elif new.json_len <= _HEADER.header_len:
        assert plan.strategy is Strategy.FIT and plan.new_header_len == _HEADER.header_len
    else:
        assert plan.strategy is Strategy.INSERT  # _HEADER is aligned, the block size a multiple of 8
    if plan.strategy is not Strategy.NONE:
        assert (8 + plan.new_header_len) % 8 == (8 + _HEADER.header_len) % 8 or plan.strategy in (
            Strategy.COPY,
            Strategy.OUTPUT,
        )


# --------------------------------------------------------------------------------------------
# A full-size FLUX.1-dev int4 r32 file, sparse


def flux_int4_r32_table() -> dict[str, tuple[str, list[int]]]:
    """Return the FLUX.1-dev SVDQuant int4 rank-32 tensor table (19 double + 38 single blocks)."""
    hidden, rank = 3072, 32
    table: dict[str, tuple[str, list[int]]] = {}

    def w4a4(name: str, oc: int, ic: int) -> None:
        table[f"{name}.qweight"] = ("I8", [oc, ic // 2])
        table[f"{name}.wscales"] = ("BF16", [ic // 64, oc])
        table[f"{name}.bias"] = ("BF16", [oc])
        table[f"{name}.smooth"] = ("BF16", [ic])
        table[f"{name}.smooth_orig"] = ("BF16", [ic])
        table[f"{name}.lora_down"] = ("BF16", [ic, rank])
        table[f"{name}.lora_up"] = ("BF16", [oc, rank])

    def awq(name: str, oc: int, ic: int) -> None:
        table[f"{name}.qweight"] = ("I32", [oc // 4, ic // 2])
        table[f"{name}.wscales"] = ("BF16", [ic // 64, oc])
        table[f"{name}.wzeros"] = ("BF16", [ic // 64, oc])
        table[f"{name}.bias"] = ("BF16", [oc])

    def plain(name: str, oc: int, ic: int) -> None:
        table[f"{name}.weight"] = ("BF16", [oc, ic])
        table[f"{name}.bias"] = ("BF16", [oc])

    h = hidden
    for i in range(19):
        p = f"transformer_blocks.{i}."
        for layer, oc, ic in (
            ("qkv_proj", 3 * h, h), ("qkv_proj_context", 3 * h, h), ("out_proj", h, h), ("out_proj_context", h, h),
            ("mlp_fc1", 4 * h, h), ("mlp_fc2", h, 4 * h), ("mlp_context_fc1", 4 * h, h), ("mlp_context_fc2", h, 4 * h),
        ):  # fmt: skip
            w4a4(p + layer, oc, ic)
        awq(p + "norm1.linear", 6 * h, h)
        awq(p + "norm1_context.linear", 6 * h, h)
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            table[f"{p}{norm}.weight"] = ("BF16", [128])
    for i in range(38):
        p = f"single_transformer_blocks.{i}."
        for layer, oc, ic in (("qkv_proj", 3 * h, h), ("out_proj", h, h), ("mlp_fc1", 4 * h, h), ("mlp_fc2", h, 4 * h)):
            w4a4(p + layer, oc, ic)
        awq(p + "norm.linear", 3 * h, h)
        for norm in ("norm_q", "norm_k"):
            table[f"{p}{norm}.weight"] = ("BF16", [128])
    for name, oc, ic in (
        ("x_embedder", h, 64), ("context_embedder", h, 4096), ("norm_out.linear", 2 * h, h), ("proj_out", 64, h),
        ("time_text_embed.timestep_embedder.linear_1", h, 256), ("time_text_embed.timestep_embedder.linear_2", h, h),
        ("time_text_embed.guidance_embedder.linear_1", h, 256), ("time_text_embed.guidance_embedder.linear_2", h, h),
        ("time_text_embed.text_embedder.linear_1", h, 768), ("time_text_embed.text_embedder.linear_2", h, h),
    ):  # fmt: skip
        plain(name, oc, ic)
    return table


@insert_fs
def test_a_sparse_flux_sized_file_takes_the_insert_path(tmp_path: Path) -> None:
    bits = {"I8": 8, "I32": 32, "BF16": 16}
    header: dict[str, object] = {}
    offset = 0
    for name, (dtype, shape) in flux_int4_r32_table().items():
        size = math.prod(shape) * bits[dtype] // 8
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    body = json.dumps(header, separators=(",", ":")).encode()
    body += b" " * (-(8 + len(body)) % 8)
    path = tmp_path / "svdq-int4_r32-flux.1-dev.safetensors"
    marker_head, marker_tail = os.urandom(4096), os.urandom(4096)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<Q", len(body)) + body + marker_head)
        handle.truncate(8 + len(body) + offset)  # sparse: no real data blocks
        handle.seek(8 + len(body) + offset - len(marker_tail))
        handle.write(marker_tail)
    assert len(header) > 2500 and 6.5e9 < path.stat().st_size < 7e9
    allocated = path.stat().st_blocks

    started = time.perf_counter()
    result = write_metadata(path, GROWN)
    elapsed = time.perf_counter() - started
    print(
        f"\ninsert on a sparse {path.stat().st_size / 1e9:.2f} GB file with {len(header)} tensors: "
        f"{elapsed * 1000:.1f} ms (header {result.old_header_len:,} -> {result.new_header_len:,} bytes)"
    )

    assert result.strategy is Strategy.INSERT
    after = read_header(path)
    assert after.data_len == offset and after.aligned
    with open(path, "rb") as handle:
        handle.seek(after.data_start)
        assert handle.read(4096) == marker_head
        handle.seek(-4096, os.SEEK_END)
        assert handle.read() == marker_tail
    assert path.stat().st_blocks < allocated + 64  # no data was rewritten: the file stays sparse
    assert oracle_metadata(path) == GROWN


def test_expected_header_skips_nothing_when_unchanged(make_safetensors: MakeSafetensors) -> None:
    """A write planned from the header still on disk goes through, and gives the same result as without it."""
    path = make_safetensors(metadata={"format": "pt"})
    planned = read_header(path)
    result = splice.write_metadata(path, {"format": "pt", "config": "{}"}, expected=planned)
    assert result.changed
    assert safe_open(str(path), framework="np").metadata() == {"format": "pt", "config": "{}"}


def test_expected_header_refuses_a_file_changed_since_planning(make_safetensors: MakeSafetensors) -> None:
    """If another program rewrote the header after we read it, the stale plan must not overwrite its change."""
    path = make_safetensors(metadata={"format": "pt"})
    planned = read_header(path)
    splice.write_metadata(path, {"format": "pt", "theirs": "kept"})  # someone else's edit, after our read
    before = path.read_bytes()
    with pytest.raises(LockedError) as caught:
        splice.write_metadata(path, {"format": "pt", "ours": "x"}, expected=planned)
    assert caught.value.code == "changed"
    assert str(path) in caught.value.render()
    assert path.read_bytes() == before  # untouched: their edit survives


def test_without_the_linux_fast_paths_a_growing_patch_copies_safely(
    make_safetensors: MakeSafetensors, sha256_range: Sha256Range, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What Windows and macOS get: no insert-range, no lease, no copy_file_range -> the portable copy path."""
    monkeypatch.setattr(plat, "IS_LINUX", False)
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    path = make_safetensors(metadata=ORIGINAL)
    tensors = load_file(str(path))
    data = data_sha(path, sha256_range)
    mode = stat.S_IMODE(path.stat().st_mode)

    result = write_metadata(path, GROWN)

    assert result.strategy is Strategy.COPY and result.changed
    assert data_sha(path, sha256_range) == data
    assert oracle_metadata(path) == GROWN
    assert_tensors_equal(load_file(str(path)), tensors)
    assert stat.S_IMODE(path.stat().st_mode) == mode
    assert read_header(path).aligned
    assert leftovers(path) == []
