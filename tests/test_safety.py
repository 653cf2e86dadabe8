"""Issue 10: the edges of the safety promise (a second fault, a planted journal, odd files, other users).

Each test sets up what a hostile or unlucky situation leaves on disk and checks the promise: the data region and
the tensor table survive, the next run repairs whatever our own interruptions left, and nothing planted by
someone else is ever "recovered" into the file.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import mmap
import os
import shutil
import stat
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from safetensors import safe_open

from patcher import _platform as plat
from patcher import splice
from patcher.errors import LinkError, RecoveryError, WriteError
from patcher.header import pack_prefix, read_header, serialize_header
from patcher.splice import Strategy, write_metadata

MakeSafetensors = Callable[..., Path]
REPO = Path(__file__).resolve().parent.parent
OLD = {"format": "pt", "notes": "n" * 600}  # room for NEW: fit works in place
SMALL = {"format": "pt"}
NEW = {"format": "pt", "config": json.dumps({"num_layers": 19, "num_single_layers": 38}), "model_class": "Flux"}
OTHER_UID = 4242
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0

_CHILD = """
import json, sys
from patcher.errors import PatchError
from patcher.splice import Strategy, write_metadata, restore
path, metadata, strategy, what = sys.argv[1:5]
try:
    if what == "restore":
        restore(path)
    else:
        write_metadata(path, json.loads(metadata), strategy=Strategy(strategy) if strategy else None,
                       backup=what == "backup")
except PatchError as exc:
    print(exc, file=sys.stderr)
    sys.exit(3)
except KeyboardInterrupt:
    print("interrupted", file=sys.stderr)
    sys.exit(130)
"""

on_insert_fs = pytest.mark.skipif(
    not plat.insert_range_likely(os.environ.get("TMPDIR", "/tmp")),
    reason="the temp directory is not on ext4/XFS (no insert-range)",
)
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root (other users, device nodes, chattr)")


def strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


needs_strace = pytest.mark.skipif(not strace_works(), reason="strace is missing or not permitted")


def run_child(
    path: Path,
    metadata: dict[str, str] | None = None,
    strategy: Strategy | None = None,
    *,
    what: str = "write",
    fault: str | None = None,
    wrapper: tuple[str, ...] = (),
    timeout: float = 60,
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop(splice.FAULT_ENV, None)
    if fault:
        env[splice.FAULT_ENV] = fault
    argv = [*wrapper, sys.executable, "-c", _CHILD, str(path), json.dumps(metadata or NEW)]
    argv += [strategy.value if strategy else "", what]
    return subprocess.run(argv, env=env, capture_output=True, text=True, timeout=timeout, cwd=REPO)


def leftovers(directory: Path, name: str = "") -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".npatch-" in p.name and p.name.startswith(f".{name}"))


def data_sha(path: Path) -> str:
    start = read_header(path).data_start
    with open(path, "rb") as handle:
        handle.seek(start)
        return hashlib.sha256(handle.read()).hexdigest()


def table(path: Path) -> list[tuple[str, str, tuple[int, ...], tuple[int, int]]]:
    return [(n, t.dtype, tuple(t.shape), tuple(t.data_offsets)) for n, t in read_header(path).tensors.items()]


def oracle_metadata(path: Path) -> dict[str, str] | None:
    with safe_open(str(path), framework="np") as handle:
        handle.keys()
        metadata: dict[str, str] | None = handle.metadata()
    return metadata


def assert_final(path: Path, data: str, tensors: list[object], metadata: dict[str, str] = NEW) -> None:
    assert oracle_metadata(path) == metadata
    assert data_sha(path) == data
    assert table(path) == tensors
    assert leftovers(path.parent, path.name) == []


def as_user(uid: int, groups: tuple[int, ...] = ()) -> tuple[str, ...]:
    """Return a command prefix running the rest as user ``uid`` (group ``uid``, supplementary ``groups``)."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is missing")
    extra = f"--groups={','.join(map(str, groups))}" if groups else "--clear-groups"
    prefix = ("setpriv", f"--reuid={uid}", f"--regid={uid}", extra)
    # An interpreter installed under a folder only root may read (pyenv in /root) cannot start as another user:
    # its shared libpython is out of reach. That is the machine, not the code under test.
    probe = subprocess.run(
        [*prefix, sys.executable, "-c", "import patcher"],
        capture_output=True, text=True, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)}, check=False,
    )  # fmt: skip
    if probe.returncode != 0:
        pytest.skip(f"user {uid} cannot run {sys.executable}: {probe.stderr.strip()[-200:]}")
    return prefix


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """Yield a sticky, world-writable folder other users can reach (pytest's own are private to root)."""
    import tempfile

    path = Path(tempfile.mkdtemp(prefix="npatch-shared-", dir=os.environ.get("TMPDIR", "/tmp")))
    path.chmod(0o1777)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def killed(proc: subprocess.CompletedProcess[str]) -> bool:
    return proc.returncode in (-9, 137)


def strace(*specs: str) -> tuple[str, ...]:
    argv = ["strace", "-f", "-qq", "-o", os.devnull]
    for spec in specs:
        argv += ["-e", f"inject={spec}"]
    return tuple(argv)


# --------------------------------------------------------------------------------------------
# 1. A fault during the rollback: every state it leaves is repaired by the next run

# The insert path, counted per system call: pwrite64 #1 journal, #2 new prefix, #3 old prefix (rollback);
# fallocate #1 insert, #2 collapse (rollback); fsync #1 journal, #2 its directory, #3 the file (fails: EIO, so
# the rollback runs), #4 after the rollback's prefix. (strace keeps one injection per system call.)
INSERT_FIRST = "fsync:error=EIO:when=3"
INSERT_SECOND = [
    "fallocate:signal=KILL:when=2",  # before the collapse
    "pwrite64:signal=KILL:when=3",  # collapsed, old prefix not yet written
    "unlink:signal=KILL:when=1",  # rolled back and flushed, the journal not yet removed
    "pwrite64:error=EIO:when=3",  # EIO then EIO
    "fallocate:error=EIO:when=2",  # the collapse fails
    "pwrite64:signal=HUP:when=3",  # Ctrl-C's cousin: hang-up mid-rollback
    "pwrite64:signal=TERM:when=3",
]
# The fit path: pwrite64 #1 journal, #2 new prefix, #3 old prefix (rollback); fsync #3 the file.
FIT_SECOND = [
    "pwrite64:signal=KILL:when=3",
    "unlink:signal=KILL:when=1",
    "pwrite64:error=EIO:when=3",
    "pwrite64:signal=TERM:when=3",
]


@needs_strace
@on_insert_fs
@pytest.mark.parametrize("second", INSERT_SECOND)
def test_a_second_fault_during_an_insert_rollback_is_repaired_by_the_next_run(
    make_safetensors: MakeSafetensors, second: str
) -> None:
    path = make_safetensors(metadata=SMALL)
    data, tensors = data_sha(path), table(path)

    proc = run_child(path, NEW, Strategy.INSERT, wrapper=strace(INSERT_FIRST, second))

    assert proc.returncode != 0, proc.stderr
    assert "delete" not in proc.stderr  # never advise deleting the journal
    result = write_metadata(path, NEW)  # the same command again
    assert_final(path, data, tensors)
    assert result.changed or result.recovered == "finished"


@needs_strace
@pytest.mark.parametrize("second", FIT_SECOND)
def test_a_second_fault_during_a_fit_rollback_is_repaired_by_the_next_run(
    make_safetensors: MakeSafetensors, second: str
) -> None:
    path = make_safetensors(metadata=OLD)
    data, tensors = data_sha(path), table(path)

    proc = run_child(path, NEW, Strategy.FIT, wrapper=strace(INSERT_FIRST, second))

    assert proc.returncode != 0, proc.stderr
    write_metadata(path, NEW)
    assert_final(path, data, tensors)


@on_insert_fs
@pytest.mark.parametrize("step", ["rollback-collapsed", "rollback-half"])
def test_a_kill_inside_the_rollback_is_repaired_by_recover_and_by_restore(
    make_safetensors: MakeSafetensors, step: str
) -> None:
    if not strace_works():
        pytest.skip("strace is missing")
    path = make_safetensors(metadata=SMALL)
    data, tensors = data_sha(path), table(path)
    original = path.read_bytes()

    proc = run_child(path, NEW, Strategy.INSERT, fault=step, wrapper=strace(INSERT_FIRST))

    assert killed(proc), proc.stderr
    assert os.path.exists(splice.journal_path(path))
    # A fault during recovery itself is repaired too: recovery is idempotent.
    again = run_child(path, what="restore", fault=step)
    assert again.returncode in (0, 3, -9, 137)
    assert splice.recover(path) in ("rolled back", "finished", None)
    assert table(path) == tensors and data_sha(path) == data
    assert path.read_bytes() == original or oracle_metadata(path) == NEW
    write_metadata(path, NEW)
    assert_final(path, data, tensors)


@needs_strace
@on_insert_fs
def test_a_second_ctrl_c_during_the_rollback_finishes_it_then_exits_130(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata=SMALL)
    original = path.read_bytes()

    # The first Ctrl-C after the prefix is written, the second one when the rollback writes the old prefix.
    proc = run_child(
        path, NEW, Strategy.INSERT, wrapper=strace("fsync:signal=INT:when=3", "pwrite64:signal=INT:when=3")
    )

    assert proc.returncode == 130, proc.stderr
    assert path.read_bytes() == original  # rolled back completely
    assert leftovers(path.parent, path.name) == []


def test_a_journal_that_does_not_match_never_advises_deleting_it(make_safetensors: MakeSafetensors) -> None:
    first = make_safetensors(name="first.safetensors", metadata=OLD)
    assert killed(run_child(first, NEW, Strategy.FIT, fault="prefix-half"))
    blob = Path(splice.journal_path(first)).read_bytes()
    other = make_safetensors(name="other.safetensors", metadata=OLD, seed=3)
    Path(splice.journal_path(other)).write_bytes(blob)
    os.chmod(splice.journal_path(other), 0o600)
    with pytest.raises(RecoveryError) as info:
        write_metadata(other, NEW)
    text = str(info.value)
    assert "delete" not in text and "old header" in text and str(splice.journal_path(other)) in text


# --------------------------------------------------------------------------------------------
# 2. A journal planted by someone else


def _interrupted(make: MakeSafetensors) -> tuple[Path, bytes, bytes]:
    """Return a file whose fit patch died half-way, the file's bytes and its journal's bytes."""
    path = make(metadata=OLD)
    assert killed(run_child(path, NEW, Strategy.FIT, fault="prefix-half"))
    return path, path.read_bytes(), Path(splice.journal_path(path)).read_bytes()


@needs_root
@pytest.mark.parametrize("owner", ["other-user", "group-writable", "other-writable"])
def test_a_journal_of_another_user_or_writable_by_others_is_refused(
    make_safetensors: MakeSafetensors, owner: str
) -> None:
    path, before, _ = _interrupted(make_safetensors)
    journal = Path(splice.journal_path(path))
    if owner == "other-user":
        os.chown(journal, OTHER_UID, OTHER_UID)
    else:
        journal.chmod(0o620 if owner == "group-writable" else 0o602)
    for attempt in (lambda: write_metadata(path, NEW), lambda: splice.recover(path)):
        with pytest.raises(RecoveryError) as info:
            attempt()
        text = str(info.value)
        assert str(journal) in text and "\n" not in text
        assert (str(OTHER_UID) in text) if owner == "other-user" else ("0o6" in text or "mode 06" in text)
    assert path.read_bytes() == before and journal.exists()


@pytest.mark.parametrize("kind", ["symlink", "fifo", "directory"])
def test_a_journal_that_is_not_a_regular_file_is_refused_without_blocking(
    make_safetensors: MakeSafetensors, kind: str
) -> None:
    path = make_safetensors(metadata=SMALL)
    before = path.read_bytes()
    journal = Path(splice.journal_path(path))
    if kind == "symlink":
        real = path.parent / "elsewhere"
        real.write_bytes(b"x")
        journal.symlink_to(real)
    elif kind == "fifo":
        os.mkfifo(journal)
    else:
        journal.mkdir()
    proc = run_child(path, NEW, timeout=30)  # a FIFO must not block the command
    assert proc.returncode == 3, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(journal) in lines[0] and "regular file" in lines[0]
    assert path.read_bytes() == before


@pytest.mark.parametrize("swapped", ["new", "both"])
def test_a_planted_journal_never_changes_the_tensor_table(make_safetensors: MakeSafetensors, swapped: str) -> None:
    """A journal built so the current header looks half-written, with two tensors' offsets swapped."""
    import numpy as np

    tensors_in = {"a": np.zeros((16,), np.float32), "b": np.ones((16,), np.float32), "c": np.arange(5.0)}
    path = make_safetensors(metadata=OLD, tensors=tensors_in)
    before = path.read_bytes()
    header = read_header(path)
    tensors = dict(header.tensors)
    tensors["a"], tensors["b"] = tensors["b"], tensors["a"]
    evil = serialize_header({"format": "pt", "evil": "yes"}, tensors, length=header.header_len)
    old = pack_prefix(header.raw)
    if swapped == "both":  # the old prefix too: the journal agrees with itself, not with the file
        old = pack_prefix(serialize_header({"format": "pt"}, tensors, length=header.header_len))
    planted = splice.plant_journal_for_tests(path, old, pack_prefix(evil))
    Path(splice.journal_path(path)).write_bytes(planted)
    os.chmod(splice.journal_path(path), 0o600)
    with pytest.raises(RecoveryError):
        write_metadata(path, NEW)
    assert path.read_bytes() == before


# --------------------------------------------------------------------------------------------
# 3. -o OUT never replaces what it should not


def test_an_existing_output_is_refused_unless_forced(make_safetensors: MakeSafetensors, tmp_path: Path) -> None:
    source = make_safetensors(metadata=SMALL)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"someone's file")
    with pytest.raises(WriteError) as info:
        write_metadata(source, NEW, output=out)
    assert info.value.code == "exists" and str(out) in str(info.value) and "--force" in str(info.value)
    assert out.read_bytes() == b"someone's file"
    write_metadata(source, NEW, output=out, force=True)
    assert oracle_metadata(out) == NEW


@needs_root
@pytest.mark.parametrize("kind", ["chardev", "fifo", "directory-as-file"])
def test_a_non_regular_output_is_refused_even_forced(
    make_safetensors: MakeSafetensors, tmp_path: Path, kind: str
) -> None:
    source = make_safetensors(metadata=SMALL)
    out = tmp_path / "out.safetensors"
    if kind == "chardev":
        os.mknod(out, stat.S_IFCHR | 0o666, os.makedev(1, 3))  # a /dev/null
    elif kind == "fifo":
        os.mkfifo(out)
    else:
        (out / source.name).mkdir(parents=True)  # -o DIR names DIR/SOURCE-NAME, itself a folder
    for force in (False, True):
        with pytest.raises(WriteError) as info:
            write_metadata(source, NEW, output=out, force=force)
        assert "not a regular file" in str(info.value) or "folder" in str(info.value)
    assert stat.S_ISCHR(out.lstat().st_mode) if kind == "chardev" else True
    assert stat.S_ISFIFO(out.lstat().st_mode) if kind == "fifo" else True


def test_a_symlink_output_is_refused_unless_followed(make_safetensors: MakeSafetensors, tmp_path: Path) -> None:
    source = make_safetensors(metadata=SMALL)
    target = tmp_path / "target.safetensors"
    target.write_bytes(b"old")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target)
    with pytest.raises(LinkError):
        write_metadata(source, NEW, output=link, force=True)
    assert link.is_symlink() and target.read_bytes() == b"old"
    write_metadata(source, NEW, output=link, force=True, follow_symlinks=True)
    assert link.is_symlink() and oracle_metadata(target) == NEW


@needs_root
def test_the_command_line_refuses_a_device_output_even_forced(tmp_path: Path) -> None:
    from patcher import synth

    tensors = synth.table_to_tensors(synth.build_table(synth.preset("flux.1-dev")))
    source = synth.write_sparse(tmp_path / "m.safetensors", tensors)  # full size, but a hole: no disk used
    out = tmp_path / "null"
    os.mknod(out, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    for extra in ((), ("--force",)):
        proc = subprocess.run(
            [sys.executable, "-m", "patcher", str(source), "--model", "flux.1-dev", "-o", str(out), *extra],
            capture_output=True, text=True, cwd=REPO, timeout=120, env=env,
        )  # fmt: skip
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 3 and len(errors) == 1 and str(out) in errors[0], proc.stderr
        assert stat.S_ISCHR(out.lstat().st_mode)


# --------------------------------------------------------------------------------------------
# 4. --backup never loses the original metadata


def test_a_foreign_backup_refuses_the_patch(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata=SMALL)
    other = make_safetensors(name="other.safetensors", metadata={"x": "y"}, tensors=None, seed=1)
    # Another file's header (a different tensor table) under this file's backup name.
    import numpy as np

    foreign = make_safetensors(name="foreign.safetensors", tensors={"z": np.zeros((3,), np.float32)})
    Path(splice.backup_path(path)).write_bytes(foreign.read_bytes()[: read_header(foreign).data_start])
    before = path.read_bytes()
    with pytest.raises(WriteError) as info:
        write_metadata(path, NEW, backup=True)
    assert info.value.code == "bad-backup" and splice.backup_path(path) in str(info.value)
    assert path.read_bytes() == before
    del other


def test_an_earlier_backup_of_the_same_file_is_kept_and_said_so(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata={"format": "pt", "origin": "first"})
    first = write_metadata(path, NEW, backup=True)
    assert first.backup and not first.backup_kept
    second = write_metadata(path, {"format": "pt", "again": "x"}, backup=True)
    assert second.backup == first.backup and second.backup_kept
    splice.restore(path)
    assert oracle_metadata(path) == {"format": "pt", "origin": "first"}


def test_a_fifo_backup_neither_hangs_the_patch_nor_restore(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata=SMALL)
    os.mkfifo(splice.backup_path(path))
    before = path.read_bytes()
    for what in ("backup", "restore"):
        proc = run_child(path, NEW, what=what, timeout=30)
        assert proc.returncode == 3, proc.stderr
        assert "regular file" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert path.read_bytes() == before


# --------------------------------------------------------------------------------------------
# 6. The copy keeps the group and the inode flags


@needs_root
def test_the_copy_keeps_the_group_for_a_member_of_it(make_safetensors: MakeSafetensors, shared_dir: Path) -> None:
    shared = shared_dir
    path = make_safetensors(metadata=SMALL, directory=shared)
    os.chown(path, OTHER_UID, 5555)
    path.chmod(0o660)
    code = (
        "import sys\n"
        "from patcher.splice import write_metadata, Strategy\n"
        f"write_metadata(sys.argv[1], {NEW!r}, strategy=Strategy.COPY)\n"
    )
    proc = subprocess.run(
        [*as_user(OTHER_UID, groups=(5555,)), sys.executable, "-c", code, str(path)],
        capture_output=True, text=True, cwd=REPO, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    st = path.stat()
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (OTHER_UID, 5555, 0o660)


@needs_root
def test_the_copy_refuses_to_change_the_owner_unless_forced(
    make_safetensors: MakeSafetensors, shared_dir: Path
) -> None:
    shared = shared_dir
    shared.chmod(0o777)  # not sticky: else nobody but the owner may replace the file at all
    path = make_safetensors(metadata=SMALL, directory=shared)
    os.chown(path, 4343, 5555)
    path.chmod(0o666)
    before = path.read_bytes()
    code = (
        "import sys\n"
        "from patcher.errors import PatchError\n"
        "from patcher.splice import write_metadata, Strategy\n"
        "try:\n"
        f"    r = write_metadata(sys.argv[1], {NEW!r}, strategy=Strategy.COPY, force=sys.argv[2] == '1')\n"
        "except PatchError as exc:\n"
        "    print(exc, file=sys.stderr); sys.exit(3)\n"
    )

    def run(force: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [*as_user(OTHER_UID), sys.executable, "-c", code, str(path), force], capture_output=True, text=True,
            cwd=REPO, timeout=60, env={**os.environ, "PYTHONPATH": str(REPO)},
        )  # fmt: skip

    refused = run("0")
    assert refused.returncode == 3 and "-o" in refused.stderr and "owner" in refused.stderr, refused.stderr
    assert path.read_bytes() == before and path.stat().st_uid == 4343
    assert leftovers(shared) == []
    forced = run("1")
    assert forced.returncode == 0, forced.stderr
    assert oracle_metadata(path) == NEW


@needs_root
def test_the_copy_keeps_the_inode_flags(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata=SMALL)
    done = subprocess.run(["chattr", "+d", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +d is not possible here: {done.stderr.strip()}")
    write_metadata(path, NEW, strategy=Strategy.COPY)
    flags = subprocess.run(["lsattr", str(path)], capture_output=True, text=True).stdout.split()[0]
    assert "d" in flags


def test_the_copy_keeps_xattrs(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata=SMALL)
    try:
        os.setxattr(path, "user.origin", b"hub")
    except OSError:
        pytest.skip("no user xattrs here")
    write_metadata(path, NEW, strategy=Strategy.COPY)
    assert os.getxattr(path, "user.origin") == b"hub"


# --------------------------------------------------------------------------------------------
# 8. fit takes the write lease too: a live mapping sees no change


@on_insert_fs
def test_fit_under_a_live_mapping_copies_and_the_mapping_keeps_its_bytes(make_safetensors: MakeSafetensors) -> None:
    path = make_safetensors(metadata=OLD)
    original = path.read_bytes()
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import mmap, os, sys, hashlib\n"
         "fd = os.open(sys.argv[1], os.O_RDONLY); m = mmap.mmap(fd, 0, prot=mmap.PROT_READ)\n"
         "print('ready', flush=True); sys.stdin.readline()\n"
         "print(hashlib.sha256(m[:]).hexdigest(), flush=True)\n",
         str(path)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "ready"
        result = write_metadata(path, NEW)
        out, _ = holder.communicate("\n", timeout=30)
    finally:
        if holder.poll() is None:
            holder.kill()
    assert result.strategy is Strategy.COPY
    assert out.strip() == hashlib.sha256(original).hexdigest()
    assert oracle_metadata(path) == NEW
    assert mmap  # the mapping is the child's


# --------------------------------------------------------------------------------------------
# 9. An append-only or immutable folder is detected before anything is written


@contextlib.contextmanager
def chattr(path: Path, flag: str) -> Iterator[None]:
    if shutil.which("chattr") is None:
        pytest.skip("chattr is missing")
    done = subprocess.run(["chattr", f"+{flag}", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +{flag} is not possible here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", f"-{flag}", str(path)], capture_output=True)


@needs_root
@pytest.mark.parametrize("strategy", [None, Strategy.COPY, Strategy.OUTPUT])
def test_an_append_only_folder_is_refused_before_anything_is_written(
    make_safetensors: MakeSafetensors, tmp_path: Path, strategy: Strategy | None
) -> None:
    work = tmp_path / "work"
    work.mkdir()
    path = make_safetensors(metadata=SMALL, directory=work)
    before = path.read_bytes()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    folder = out_dir if strategy is Strategy.OUTPUT else work
    with chattr(folder, "a"):
        with pytest.raises(WriteError) as info:
            if strategy is Strategy.OUTPUT:
                write_metadata(path, NEW, output=out_dir / "x.safetensors")
            else:
                write_metadata(path, NEW, strategy=strategy)
        text = str(info.value)
        assert "append-only" in text and "chattr -a" in text, text
        assert sorted(p.name for p in folder.iterdir()) == ([path.name] if folder == work else [])
    assert path.read_bytes() == before


# --------------------------------------------------------------------------------------------
# 7. An unreadable Hugging Face cache is a warning, then the next source


@needs_root
def test_an_unreadable_hub_cache_is_a_warning_then_the_embedded_config(shared_dir: Path) -> None:
    from patcher import synth

    work = shared_dir / "work"
    work.mkdir()
    work.chmod(0o777)
    tensors = synth.table_to_tensors(synth.build_table(synth.preset("flux.1-dev", scale=0.02)))
    path = synth.write_sparse(work / "m.safetensors", tensors)
    path.chmod(0o666)
    cache = shared_dir / "cache"
    (cache / "models--black-forest-labs--FLUX.1-dev").mkdir(parents=True)
    cache.chmod(0o700)  # root's: user 4242 cannot look inside
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [*as_user(OTHER_UID), sys.executable, "-m", "patcher", str(path), "--model", "flux.1-dev", "--force",
         "--dry-run"],
        capture_output=True, text=True, cwd=REPO, timeout=120, env=env,
    )  # fmt: skip
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    assert proc.returncode == 0, proc.stderr
    assert "cannot read the Hugging Face cache" in proc.stderr
    assert "embedded config" in proc.stderr
