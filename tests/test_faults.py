"""Kill the writer at every step, starve it of file size, feed it bad journals: never lose a byte."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from safetensors import safe_open

from patcher import _platform as plat
from patcher import journal as journal_module
from patcher import splice
from patcher.errors import HeaderError, RecoveryError, WriteError
from patcher.header import read_header
from patcher.splice import Journal, Strategy, write_metadata

Sha256Range = Callable[..., str]
MakeSafetensors = Callable[..., Path]

REPO = Path(__file__).resolve().parent.parent
OLD = {"format": "pt", "notes": "n" * 600}  # room for NEW: fit works in place
SMALL = {"format": "pt"}  # no room: insert, copy or output
NEW = {"format": "pt", "config": json.dumps({"num_layers": 19, "num_single_layers": 38}), "model_class": "Flux"}

_CHILD = """
import json, sys
from patcher.errors import PatchError
from patcher.splice import Strategy, write_metadata
path, metadata, strategy, output = sys.argv[1:5]
try:
    write_metadata(path, json.loads(metadata), strategy=Strategy(strategy) if strategy else None, output=output or None)
except PatchError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
"""

on_insert_fs = pytest.mark.skipif(
    not plat.insert_range_likely(os.environ.get("TMPDIR", "/tmp")),
    reason="the temp directory is not on ext4/XFS (no insert-range)",
)


def run_child(
    path: Path,
    metadata: dict[str, str],
    strategy: Strategy | None,
    output: Path | None = None,
    *,
    fault: str | None = None,
    wrapper: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """Run write_metadata in a fresh process (optionally under a fault, strace or prlimit)."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop(splice.FAULT_ENV, None)
    if fault:
        env[splice.FAULT_ENV] = fault
    argv = [*wrapper, sys.executable, "-c", _CHILD, str(path), json.dumps(metadata)]
    argv += [strategy.value if strategy else "", str(output) if output else ""]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=60, cwd=REPO)


def killed(proc: subprocess.CompletedProcess[str]) -> bool:
    # A process killed by SIGKILL: -9 from subprocess, 137 when a wrapper reports it as an exit code.
    return proc.returncode in (-9, 137)


def state(path: Path) -> str:
    """Return "old", "new", "broken" (the strict reader rejects it) or "missing"."""
    if not path.exists():
        return "missing"
    try:
        header = read_header(path)
    except HeaderError:
        return "broken"
    metadata = dict(header.metadata or {})
    return "new" if metadata == NEW else "old" if metadata in (OLD, SMALL) else f"unexpected {metadata}"


def leftovers(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name.startswith(f".{path.name}.npatch"))


def data_sha(path: Path) -> str:
    start = read_header(path).data_start
    with open(path, "rb") as handle:
        handle.seek(start)
        return hashlib.sha256(handle.read()).hexdigest()


def medium_file(make: MakeSafetensors, metadata: dict[str, str], name: str = "model.safetensors") -> Path:
    """A file of ~200 KiB of random tensors (larger than the prlimit used below)."""
    rng = np.random.default_rng(7)
    tensors = {
        "w": rng.standard_normal((128, 256)).astype(np.float32),
        "b": rng.standard_normal((256,)).astype(np.float16),
        "i": rng.integers(0, 1 << 30, size=(4096,), dtype=np.int64),
    }
    return make(name=name, metadata=metadata, tensors=tensors)


def assert_final(path: Path, data: str) -> None:
    """The file carries the new metadata, intact data, and nothing of ours is left beside it."""
    assert state(path) == "new"
    assert data_sha(path) == data
    with safe_open(str(path), framework="np") as handle:
        assert handle.metadata() == NEW
    assert leftovers(path) == []


# --------------------------------------------------------------------------------------------
# Fault points: SIGKILL at each step of each strategy

# (strategy, step, state right after the kill, what recovery reports)
IN_PLACE_CASES = [
    (Strategy.FIT, "journal-written", "old", "rolled back"),
    (Strategy.FIT, "prefix-half", "broken", "finished"),
    (Strategy.FIT, "prefix-written", "new", "finished"),
    (Strategy.FIT, "verified", "new", "finished"),
    (Strategy.INSERT, "journal-written", "old", "rolled back"),
    (Strategy.INSERT, "inserted", "broken", "finished"),  # a hole before the old prefix
    (Strategy.INSERT, "prefix-half", "broken", "finished"),
    (Strategy.INSERT, "prefix-written", "new", "finished"),
    (Strategy.INSERT, "verified", "new", "finished"),
]


@on_insert_fs
@pytest.mark.parametrize("repair", ["recover", "rerun"])
@pytest.mark.parametrize(("strategy", "step", "after_kill", "outcome"), IN_PLACE_CASES)
def test_kill_during_an_in_place_patch(
    make_safetensors: MakeSafetensors, strategy: Strategy, step: str, after_kill: str, outcome: str, repair: str
) -> None:
    path = make_safetensors(metadata=OLD if strategy is Strategy.FIT else SMALL)
    data = data_sha(path)

    proc = run_child(path, NEW, strategy, fault=step)

    assert killed(proc), proc.stderr
    assert state(path) == after_kill
    assert os.path.exists(splice.journal_path(path))
    if repair == "recover":
        assert splice.recover(path) == outcome
        assert state(path) == ("old" if outcome == "rolled back" else "new")
        assert leftovers(path) == []
        result = write_metadata(path, NEW)
        assert result.recovered is None
    else:
        result = write_metadata(path, NEW)  # running the same command again repairs it
        assert result.recovered == outcome
    assert result.changed is (outcome == "rolled back")
    assert_final(path, data)


COPY_STEPS = ["tmp-created", "data-half", "data-copied", "verified", "replaced"]


@pytest.mark.parametrize("step", COPY_STEPS)
def test_kill_during_a_copy(make_safetensors: MakeSafetensors, step: str) -> None:
    path = make_safetensors(metadata=SMALL)
    data = data_sha(path)
    whole = hashlib.sha256(path.read_bytes()).hexdigest()

    proc = run_child(path, NEW, Strategy.COPY, fault=step)

    assert killed(proc), proc.stderr
    if step == "replaced":
        assert state(path) == "new" and leftovers(path) == []
    else:  # the original was never touched; a dead temp file is left beside it
        assert hashlib.sha256(path.read_bytes()).hexdigest() == whole
        assert len(leftovers(path)) == 1 and leftovers(path)[0].endswith(".tmp")
    assert splice.recover(path) is None  # no journal: just sweeps the dead temp
    assert leftovers(path) == []
    write_metadata(path, NEW, strategy=Strategy.COPY)
    assert_final(path, data)


@pytest.mark.parametrize("step", COPY_STEPS)
def test_kill_while_writing_an_output(make_safetensors: MakeSafetensors, tmp_path: Path, step: str) -> None:
    source = make_safetensors(metadata=SMALL)
    whole = hashlib.sha256(source.read_bytes()).hexdigest()
    out = tmp_path / "patched.safetensors"

    proc = run_child(source, NEW, None, out, fault=step)

    assert killed(proc), proc.stderr
    assert hashlib.sha256(source.read_bytes()).hexdigest() == whole
    assert state(out) == ("new" if step == "replaced" else "missing")
    write_metadata(source, NEW, output=out)
    assert_final(out, data_sha(source))
    assert hashlib.sha256(source.read_bytes()).hexdigest() == whole


# --------------------------------------------------------------------------------------------
# A kill the code cannot see coming: strace injects SIGKILL at the Nth call of a syscall


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


STRACE_CASES = [
    (Strategy.FIT, "pwrite64", 1),  # the journal
    (Strategy.FIT, "pwrite64", 2),  # the prefix
    (Strategy.FIT, "fsync", 3),
    (Strategy.INSERT, "fallocate", 1),
    (Strategy.INSERT, "pwrite64", 2),
    (Strategy.INSERT, "unlink", 1),  # removing the journal
    (Strategy.COPY, "copy_file_range", 1),
    (Strategy.COPY, "rename", 1),
]


@pytest.mark.parametrize(("strategy", "syscall", "when"), STRACE_CASES)
def test_kill_injected_by_strace(
    make_safetensors: MakeSafetensors, strategy: Strategy, syscall: str, when: int
) -> None:
    if not _strace_works():
        pytest.skip("strace is missing or not permitted")
    if strategy is Strategy.INSERT and not plat.insert_range_likely(os.environ.get("TMPDIR", "/tmp")):
        pytest.skip("no insert-range here")
    path = make_safetensors(metadata=OLD if strategy is Strategy.FIT else SMALL)
    data = data_sha(path)
    wrapper = ("strace", "-f", "-qq", "-o", os.devnull, "-e", f"inject={syscall}:signal=KILL:when={when}")

    proc = run_child(path, NEW, strategy, wrapper=wrapper)

    assert killed(proc), (proc.returncode, proc.stderr)
    assert state(path) in ("old", "new", "broken")
    if state(path) == "broken":
        assert os.path.exists(splice.journal_path(path))  # never broken without the means to repair it
    write_metadata(path, NEW)
    assert_final(path, data)


# --------------------------------------------------------------------------------------------
# Failing writes: a file size limit (EFBIG) on every path that writes a whole file


@pytest.mark.parametrize("strategy", [Strategy.COPY, Strategy.OUTPUT, Strategy.INSERT])
def test_a_file_size_limit_fails_cleanly(make_safetensors: MakeSafetensors, tmp_path: Path, strategy: Strategy) -> None:
    if shutil.which("prlimit") is None:
        pytest.skip("prlimit is missing")
    if strategy is Strategy.INSERT and not plat.insert_range_likely(os.environ.get("TMPDIR", "/tmp")):
        pytest.skip("no insert-range here")
    path = medium_file(make_safetensors, SMALL)
    assert path.stat().st_size > 128 * 1024
    data = data_sha(path)
    whole = hashlib.sha256(path.read_bytes()).hexdigest()
    out = tmp_path / "out" / "patched.safetensors"
    out.parent.mkdir()

    proc = run_child(
        path,
        NEW,
        None if strategy is Strategy.OUTPUT else strategy,
        out if strategy is Strategy.OUTPUT else None,
        wrapper=("prlimit", "--fsize=65536"),
    )

    if strategy is Strategy.INSERT and proc.returncode == 0:
        # ext4 does not apply the size limit to insert-range, and the prefix written is far below it:
        # the insert path never writes the data region, so the limit does not stand in its way.
        assert_final(path, data)
        return
    assert proc.returncode == 3, proc.stderr
    message = proc.stderr.strip()
    assert "\n" not in message and "Traceback" not in message
    assert message.startswith(str(out if strategy is Strategy.OUTPUT else path))
    assert "File too large" in message and "ulimit" in message
    assert hashlib.sha256(path.read_bytes()).hexdigest() == whole
    assert leftovers(path) == [] and list(out.parent.iterdir()) == []


# --------------------------------------------------------------------------------------------
# Bad journals


def _killed_journal(make: MakeSafetensors, step: str, name: str) -> tuple[Path, bytes]:
    """Return a file whose patch died at ``step`` and the bytes of the journal it left."""
    path = make(name=name, metadata=OLD)
    assert killed(run_child(path, NEW, Strategy.FIT, fault=step))
    return path, Path(splice.journal_path(path)).read_bytes()


def test_garbage_under_the_journal_name_beside_a_valid_file_is_discarded(
    make_safetensors: MakeSafetensors,
) -> None:
    path = make_safetensors(metadata=SMALL)
    data = data_sha(path)
    Path(splice.journal_path(path)).write_bytes(os.urandom(300))
    result = write_metadata(path, NEW)
    assert result.recovered == "discarded"
    assert_final(path, data)


def test_a_torn_journal_beside_a_valid_file_is_discarded(make_safetensors: MakeSafetensors) -> None:
    path, blob = _killed_journal(make_safetensors, "journal-written", "a.safetensors")
    data = data_sha(path)
    assert state(path) == "old"
    Path(splice.journal_path(path)).write_bytes(blob[: len(blob) // 2])
    assert splice.recover(path) == "discarded"
    write_metadata(path, NEW)
    assert_final(path, data)


def test_a_damaged_journal_beside_a_broken_file_touches_nothing(make_safetensors: MakeSafetensors) -> None:
    path, blob = _killed_journal(make_safetensors, "prefix-half", "a.safetensors")
    assert state(path) == "broken"
    damaged = bytearray(blob)
    damaged[len(damaged) // 2] ^= 0xFF
    journal = Path(splice.journal_path(path))
    journal.write_bytes(bytes(damaged))
    before = path.read_bytes()
    for attempt in (lambda: splice.recover(path), lambda: write_metadata(path, NEW)):
        with pytest.raises(RecoveryError) as info:
            attempt()
        assert "damaged journal" in str(info.value) and "\n" not in str(info.value)
    assert path.read_bytes() == before and journal.read_bytes() == bytes(damaged)


def test_a_journal_that_does_not_match_the_file_touches_nothing(make_safetensors: MakeSafetensors) -> None:
    first, blob = _killed_journal(make_safetensors, "prefix-half", "first.safetensors")
    other = medium_file(make_safetensors, OLD, name="other.safetensors")
    journal = Path(splice.journal_path(other))
    journal.write_bytes(blob)
    before = other.read_bytes()
    with pytest.raises(RecoveryError) as info:
        write_metadata(other, NEW)
    assert "does not match" in str(info.value) and str(journal) in str(info.value)
    with pytest.raises(RecoveryError):
        splice.recover(other)
    assert other.read_bytes() == before and journal.exists()
    # The journal still repairs the file it belongs to.
    assert splice.recover(first) == "finished" and state(first) == "new"


def test_recover_sweeps_dead_temp_files_but_not_live_ones(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata=SMALL)
    dead = path.parent / f".{path.name}.npatch-dead.tmp"
    live = path.parent / f".{path.name}.npatch-live.tmp"
    dead.write_bytes(b"x")
    live.write_bytes(b"y")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl,os,sys; fd=os.open(sys.argv[1],os.O_RDONLY); "
         "fcntl.flock(fd,fcntl.LOCK_EX); print('ready',flush=True); sys.stdin.readline()", str(live)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        assert splice.recover(path) is None
        assert not dead.exists() and live.exists()
    finally:
        holder.communicate("\n", timeout=10)
    assert splice.recover(path) is None and not live.exists()


def test_a_journal_without_its_file_is_reported(make_safetensors: MakeSafetensors) -> None:
    path, _ = _killed_journal(make_safetensors, "journal-written", "gone.safetensors")
    path.unlink()
    with pytest.raises(RecoveryError, match="file is gone"):
        splice.recover(path)


# --------------------------------------------------------------------------------------------
# The journal record itself (pure)


def _journal() -> Journal:
    return Journal(
        strategy="insert",
        file_size=123_456,
        dev=2049,
        ino=77,
        insert_len=4096,
        old_prefix=b"\x10" + bytes(7) + b'{"a":1}' + b" " * 9,
        metadata={"z": "last key first", "format": "pt", "é": "\u2028"},  # order matters: the header is rebuilt
        new_header_len=4112,
        new_digest="ef" * 32,
        window=65536,
        data_head="ab" * 32,
        data_tail="cd" * 32,
    )


def test_a_journal_record_round_trips() -> None:
    decoded = Journal.decode(_journal().encode())
    assert decoded == _journal()
    assert list(decoded.metadata or {}) == list(_journal().metadata or {})


def test_a_journal_holds_the_old_prefix_once_and_where_it_says() -> None:
    """The new prefix is rebuilt from the old table and the metadata: a journal is about one header long."""
    journal = _journal()
    blob = journal.encode()
    start = journal.old_prefix_offset
    assert blob[start : start + len(journal.old_prefix)] == journal.old_prefix
    assert len(blob) < len(journal.old_prefix) + 1024


def test_every_truncation_and_bit_flip_of_a_journal_is_detected() -> None:
    blob = _journal().encode()
    for cut in range(0, len(blob), 97):
        with pytest.raises(journal_module.DamagedJournal):
            Journal.decode(blob[:cut])
    for position in range(0, len(blob), 131):
        flipped = bytearray(blob)
        flipped[position] ^= 0x01
        with pytest.raises(journal_module.DamagedJournal):
            Journal.decode(bytes(flipped))


def test_a_journal_of_an_unknown_version_is_not_discarded_as_garbage() -> None:
    blob = bytearray(_journal().encode()[:-32])
    blob[len(b"nunchaku-patch journal\n")] = 3
    body = bytes(blob)
    with pytest.raises(RecoveryError, match="version 3"):
        Journal.decode(body + hashlib.sha256(body).digest())


def test_a_failing_write_is_one_line_naming_the_file(make_safetensors: MakeSafetensors, tmp_path: Path) -> None:
    source = make_safetensors(metadata=SMALL)
    with pytest.raises(WriteError) as info:
        write_metadata(source, NEW, output=tmp_path / "no" / "such" / "dir" / "x.safetensors")
    text = str(info.value)
    assert "\n" not in text and "x.safetensors" in text and "does not exist" in text
