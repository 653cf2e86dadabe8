"""Reliability at the command line: kill it anywhere, starve it, race it, link it; no byte is ever lost.

Every test runs the real ``nunchaku-patch`` (``python -m patcher``) in a subprocess on a synthetic FLUX.1-dev
conversion (the real 2,604-tensor table at 5% width, 21 MiB of random tensor bytes), then checks the result
with the reference reader (``safetensors.safe_open``) and a sha256 of the data region. The API-level twins of
these tests live in test_splice.py and test_faults.py; here the whole program is under test: argument
handling, recovery on rerun, error lines, exit codes.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest
from safetensors import safe_open

from patcher import _platform as plat
from patcher import splice, synth
from patcher.errors import HeaderError
from patcher.header import PREFIX_SIZE, pack_prefix, read_header, serialize_header

REPO = Path(__file__).resolve().parent.parent
CLI = (sys.executable, "-m", "patcher")
#: FLUX.1-dev's config from the package's own copy: the metadata is that of ``--model flux.1-dev`` (the corpus
#: fixture checks it), without the Hugging Face cache lookup, which costs a third of every run. The scaled table
#: is narrower than the config says: --force writes the config anyway.
CONFIG = REPO / "patcher" / "configs" / "flux.1-dev.json"
MODEL_ARGS = ("--config", str(CONFIG), "--force", "--json")
TIMEOUT = 120
#: Header padding of the "roomy" sample: more than the metadata needs, so the patch is a ``fit``.
ROOM = 16 * 1024
#: Bigger than any journal the sample needs (old + new prefix, ~0.6 MB), far smaller than the file.
FSIZE_LIMIT = 4 * 1024 * 1024

FIT, INSERT, COPY, OUTPUT = "fit", "insert", "copy", "output"
#: The fault points each strategy passes (names from patcher.splice.FAULT_STEPS).
STEPS = {
    FIT: ("journal-written", "prefix-half", "prefix-written", "verified"),
    INSERT: ("journal-written", "inserted", "prefix-half", "prefix-written", "verified"),
    COPY: ("tmp-created", "data-half", "data-copied", "verified", "replaced"),
    OUTPUT: ("tmp-created", "data-half", "data-copied", "verified", "replaced"),
}

# --------------------------------------------------------------------------------------------
# Samples and the checks every test makes


@dataclass(frozen=True)
class Corpus:
    """The originals every test copies, and what a clean patch of them gives."""

    #: Compact header, no metadata: the metadata must grow it (insert, copy or output).
    plain: Path
    #: The same tensors and bytes with ROOM spaces of header padding: the metadata fits in place.
    roomy: Path
    #: sha256 of the data region (the same in both, and after any patch).
    data_sha: str
    #: sha256 of each original file as a whole.
    whole: dict[str, str]
    #: The metadata a clean run of the command writes.
    metadata: dict[str, str]
    #: HF_HOME for the children: an empty cache, so the embedded config is used and nothing is fetched.
    hf_home: Path


def file_sha(path: Path, start: int = 0) -> str:
    """Return the sha256 of ``path`` from byte ``start`` to the end."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(start)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def data_sha(path: Path) -> str:
    """Return the sha256 of the data region, wherever the header now ends."""
    return file_sha(path, read_header(path).data_start)


def oracle_metadata(path: Path) -> dict[str, str] | None:
    """Return the metadata as safetensors reads it (raises if safetensors rejects the file)."""
    with safe_open(str(path), framework="np") as handle:
        handle.keys()
        metadata: dict[str, str] | None = handle.metadata()
    return metadata


def leftovers(root: Path) -> list[str]:
    """Return every journal or temp file of ours under ``root``."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if ".npatch-" in p.name)


def cli_env(corpus: Corpus, fault: str | None = None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != splice.FAULT_ENV}
    env.update(
        PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", NO_COLOR="1", HF_HUB_OFFLINE="1", HF_HOME=str(corpus.hf_home)
    )
    if fault is not None:
        env[splice.FAULT_ENV] = fault
    return env


@dataclass(frozen=True)
class Run:
    """The outcome of one command-line run."""

    returncode: int
    stdout: str
    stderr: str

    @property
    def killed(self) -> bool:
        # -9 straight from subprocess; 137 when a wrapper reports the death as an exit status.
        return self.returncode in (-signal.SIGKILL, 128 + signal.SIGKILL)

    @property
    def records(self) -> list[dict[str, object]]:
        return [json.loads(line) for line in self.stdout.splitlines() if line.startswith("{")]

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    def describe(self) -> str:
        return f"exit {self.returncode}\nstdout: {self.stdout[-2000:]}\nstderr: {self.stderr[-3000:]}"


def run_cli(
    corpus: Corpus,
    args: Sequence[str | os.PathLike[str]],
    *,
    fault: str | None = None,
    wrapper: Sequence[str] = (),
    timeout: float = TIMEOUT,
) -> Run:
    """Run ``nunchaku-patch ARGS`` in a fresh process (optionally under a fault, strace or prlimit)."""
    argv = [*wrapper, *CLI, *map(os.fspath, args)]
    proc = subprocess.run(argv, env=cli_env(corpus, fault), capture_output=True, text=True, timeout=timeout, cwd=REPO)
    return Run(proc.returncode, proc.stdout, proc.stderr)


def patch_args(path: Path, *extra: str | os.PathLike[str]) -> list[str | os.PathLike[str]]:
    return [path, *MODEL_ARGS, *extra]


def assert_one_error_line(run: Run, *fragments: str) -> str:
    """The run failed with exit 3 and exactly one error line, no traceback; return the line."""
    assert run.returncode == 3, run.describe()
    assert len(run.errors) == 1, run.describe()
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr, run.describe()
    for fragment in fragments:
        assert fragment in run.errors[0], run.describe()
    return run.errors[0]


def assert_patched(path: Path, corpus: Corpus) -> None:
    """The file carries the metadata a clean run writes, its data is intact, and nothing is left beside it."""
    assert not path.is_symlink() or path.resolve().is_file()
    assert oracle_metadata(path) == corpus.metadata
    assert data_sha(path) == corpus.data_sha
    assert leftovers(path.parent) == []


def state_after_kill(path: Path, whole: str, corpus: Corpus) -> str:
    """Classify a file right after a kill: its old bytes, patched, or broken (allowed only with a journal)."""
    if file_sha(path) == whole:
        return "old"
    try:
        read_header(path)
    except HeaderError:
        assert os.path.lexists(splice.journal_path(path)), "a broken file with no journal to repair it"
        return "broken"
    assert data_sha(path) == corpus.data_sha
    # Valid but neither the old bytes nor the final result would be a silent corruption.
    assert oracle_metadata(path) == corpus.metadata
    return "new"


def build_corpus(root: Path) -> Corpus:
    """Write the two originals and record what a clean patch makes of them."""
    root.mkdir(parents=True, exist_ok=True)
    tensors = synth.table_to_tensors(synth.build_table(synth.preset("flux.1-dev", scale=0.05)))
    plain = synth.write_random(root / "plain.safetensors", tensors, seed=20240611)
    compact = serialize_header(None, tensors)
    roomy = root / "roomy.safetensors"
    with open(plain, "rb") as src, open(roomy, "wb") as dst:
        dst.write(pack_prefix(serialize_header(None, tensors, length=len(compact) + ROOM)))
        src.seek(PREFIX_SIZE + len(compact))
        shutil.copyfileobj(src, dst, 1 << 20)
    hf_home = root / "hf-home"
    hf_home.mkdir(exist_ok=True)
    corpus = Corpus(plain, roomy, data_sha(plain), {}, {}, hf_home)
    probe = root / "probe" / "model.safetensors"
    probe.parent.mkdir(exist_ok=True)
    shutil.copyfile(plain, probe)
    run = run_cli(corpus, [probe, "--model", "flux.1-dev", "--force"])  # the way a user runs it
    assert run.returncode == 0, run.describe()
    metadata = oracle_metadata(probe)
    assert metadata is not None and "model_class" in metadata and "config" in metadata
    shutil.copyfile(plain, probe)
    run = run_cli(corpus, patch_args(probe))  # the way the tests run it
    assert run.returncode == 0, run.describe()
    assert oracle_metadata(probe) == metadata
    shutil.rmtree(probe.parent)
    whole = {"plain": file_sha(plain), "roomy": file_sha(roomy)}
    assert data_sha(roomy) == corpus.data_sha
    return Corpus(plain, roomy, corpus.data_sha, whole, metadata, hf_home)


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    """Build the originals once per session."""
    return build_corpus(tmp_path_factory.mktemp("reliability-corpus"))


def insert_capable(directory: Path) -> bool:
    return plat.insert_range_likely(str(directory))


@dataclass(frozen=True)
class Case:
    """One file set up so that the command takes a given strategy."""

    strategy: str
    #: The file given to the command.
    path: Path
    #: Where the patched result ends up (the output for ``output``, else ``path``).
    result: Path
    #: The command-line arguments.
    args: list[str | os.PathLike[str]]
    #: sha256 of the original file as a whole.
    whole: str

    @property
    def in_place(self) -> bool:
        return self.strategy != OUTPUT


def make_case(strategy: str, tmp_path: Path, corpus: Corpus, request: pytest.FixtureRequest, sub: str = "0") -> Case:
    """Copy an original under ``sub`` where the command will take ``strategy`` with it."""
    kind = "roomy" if strategy == FIT else "plain"
    # tmpfs has no insert-range, so a growth there is a copy.
    root: Path = request.getfixturevalue("shm_dir") if strategy == COPY else tmp_path
    directory = root / sub / "work"
    directory.mkdir(parents=True, exist_ok=True)
    if strategy == INSERT and not insert_capable(directory):
        pytest.skip("the temp directory is not on ext4/XFS (no insert-range)")
    path = directory / "model.safetensors"
    shutil.copyfile(corpus.roomy if kind == "roomy" else corpus.plain, path)
    if strategy == OUTPUT:
        out = tmp_path / sub / "out" / "patched.safetensors"
        out.parent.mkdir(parents=True, exist_ok=True)
        return Case(strategy, path, out, patch_args(path, "-o", out), corpus.whole[kind])
    return Case(strategy, path, path, patch_args(path), corpus.whole[kind])


def assert_case_done(case: Case, run: Run, corpus: Corpus) -> None:
    """A successful run left the patched result, the data intact, and nothing behind (source too)."""
    assert run.returncode == 0, run.describe()
    assert_patched(case.result, corpus)
    if not case.in_place:
        assert file_sha(case.path) == case.whole  # -o only ever reads the source
        assert leftovers(case.path.parent) == []


def strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    probe = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, timeout=30)
    return probe.returncode == 0


needs_strace = pytest.mark.skipif(not strace_works(), reason="strace is missing or ptrace is not permitted")


def strace(*injections: str, trace: Sequence[str] = ()) -> tuple[str, ...]:
    """Return an strace prefix that applies ``injections`` (``-e inject=...`` specs) to the whole process tree."""
    argv = ["strace", "-f", "-qq", "-o", os.devnull]
    if trace:
        argv += ["-e", "trace=" + ",".join(trace)]
    for spec in injections:
        argv += ["-e", f"inject={spec}"]
    return tuple(argv)


# --------------------------------------------------------------------------------------------
# The setups reach the strategy they are named after (else every test below tests something else)


def test_every_fault_point_of_the_writer_is_exercised() -> None:
    assert {step for steps in STEPS.values() for step in steps} == set(splice.FAULT_STEPS)


@pytest.mark.parametrize("strategy", [FIT, INSERT, COPY, OUTPUT])
def test_each_setup_takes_its_strategy(
    strategy: str, tmp_path: Path, corpus: Corpus, request: pytest.FixtureRequest
) -> None:
    case = make_case(strategy, tmp_path, corpus, request)

    run = run_cli(corpus, case.args)

    assert_case_done(case, run, corpus)
    assert [(r["status"], r["strategy"]) for r in run.records] == [("patched", strategy)]


# --------------------------------------------------------------------------------------------
# Crash injection: SIGKILL at every fault point of every strategy, then the same command again


@pytest.mark.parametrize(
    ("strategy", "step"), [(strategy, step) for strategy, steps in STEPS.items() for step in steps]
)
def test_killed_at_a_fault_point_the_same_command_repairs_it(
    strategy: str, step: str, tmp_path: Path, corpus: Corpus, request: pytest.FixtureRequest
) -> None:
    case = make_case(strategy, tmp_path, corpus, request)

    crash = run_cli(corpus, case.args, fault=step)

    assert crash.killed, crash.describe()
    if case.in_place:
        after = state_after_kill(case.path, case.whole, corpus)
        # Only the in-place strategies may leave a broken header, and then only between journal and prefix.
        assert after != "broken" or strategy in (FIT, INSERT)
    else:
        assert file_sha(case.path) == case.whole
        assert not case.result.exists() or oracle_metadata(case.result) == corpus.metadata
    rerun = run_cli(corpus, case.args)
    assert_case_done(case, rerun, corpus)


# --------------------------------------------------------------------------------------------
# Crash injection the code cannot see coming: strace kills it at the Nth call of a system call


#: (strategy, system call, which call): a state the fault points do not reach, or reach only from inside.
STRACE_KILLS = [
    (FIT, "pwrite64", 1),  # the journal half-written under its temp name: not a journal yet
    (FIT, "rename", 1),  # the journal complete but not yet renamed into place
    (INSERT, "fallocate", 1),  # the journal in place, the file not yet touched
    (INSERT, "pwrite64", 2),  # blocks inserted (a hole before the old prefix), the new prefix not written
    (COPY, "copy_file_range", 1),  # the temp copy has its prefix but no data
    (COPY, "rename", 1),  # the copy verified and flushed, not yet renamed over the file (tmpfs: no journal first)
    (OUTPUT, "copy_file_range", 1),
    (OUTPUT, "rename", 1),
]


@needs_strace
@pytest.mark.parametrize(("strategy", "syscall", "when"), STRACE_KILLS)
def test_killed_by_strace_at_a_system_call_the_same_command_repairs_it(
    strategy: str, syscall: str, when: int, tmp_path: Path, corpus: Corpus, request: pytest.FixtureRequest
) -> None:
    case = make_case(strategy, tmp_path, corpus, request)

    crash = run_cli(corpus, case.args, wrapper=strace(f"{syscall}:signal=KILL:when={when}", trace=[syscall]))

    assert crash.killed, crash.describe()
    if case.in_place:
        state_after_kill(case.path, case.whole, corpus)
    else:
        assert file_sha(case.path) == case.whole
    assert_case_done(case, run_cli(corpus, case.args), corpus)


@needs_strace
@pytest.mark.parametrize(("strategy", "syscall", "when"), [(INSERT, "pwrite64", 2), (COPY, "copy_file_range", 1)])
def test_ctrl_c_mid_write_rolls_back_at_once_and_says_so(
    strategy: str, syscall: str, when: int, tmp_path: Path, corpus: Corpus, request: pytest.FixtureRequest
) -> None:
    case = make_case(strategy, tmp_path, corpus, request)

    run = run_cli(corpus, case.args, wrapper=strace(f"{syscall}:signal=INT:when={when}", trace=[syscall]))

    assert run.returncode == 130, run.describe()
    assert len(run.errors) == 1 and "interrupted" in run.errors[0], run.describe()
    assert "Traceback" not in run.stderr
    assert file_sha(case.path) == case.whole  # rolled back (insert: the blocks collapsed again)
    assert leftovers(case.path.parent) == []
    assert_case_done(case, run_cli(corpus, case.args), corpus)


# --------------------------------------------------------------------------------------------
# Failing writes: the file is left byte-identical, one error line, exit 3, nothing behind


@pytest.mark.parametrize("strategy", [COPY, OUTPUT])
@pytest.mark.parametrize("limit", ["fsize", "enospc"])
def test_no_space_or_a_file_size_limit_fails_cleanly(
    strategy: str, limit: str, tmp_path: Path, corpus: Corpus, request: pytest.FixtureRequest
) -> None:
    case = make_case(strategy, tmp_path, corpus, request)
    assert case.path.stat().st_size > FSIZE_LIMIT
    if limit == "fsize":
        if shutil.which("prlimit") is None:
            pytest.skip("prlimit is missing")
        wrapper: tuple[str, ...] = ("prlimit", f"--fsize={FSIZE_LIMIT}")
        fragments = ("File too large", "ulimit")
    else:  # the disk fills up while the data is being copied
        if not strace_works():
            pytest.skip("strace is missing or ptrace is not permitted")
        wrapper = strace("copy_file_range:error=ENOSPC", trace=["copy_file_range"])
        fragments = ("No space left", "-o")

    run = run_cli(corpus, case.args, wrapper=wrapper)

    line = assert_one_error_line(run, *fragments)
    assert str(case.result) in line
    assert file_sha(case.path) == case.whole
    assert leftovers(case.path.parent) == [] and leftovers(case.result.parent) == []
    assert not case.result.exists() or case.in_place


@needs_strace
@pytest.mark.parametrize("strategy", [FIT, OUTPUT])  # insert shares fit's journal; copy shares output's code
def test_eio_at_each_fsync_fails_cleanly_and_the_same_command_finishes_the_job(
    strategy: str, tmp_path: Path, corpus: Corpus, request: pytest.FixtureRequest
) -> None:
    failures = 0
    for when in range(1, 20):
        case = make_case(strategy, tmp_path, corpus, request, f"eio-{when}")

        run = run_cli(corpus, case.args, wrapper=strace(f"fsync:error=EIO:when={when}", trace=["fsync"]))

        if run.returncode == 0:  # fewer than `when` fsyncs: nothing failed
            assert_case_done(case, run, corpus)
            break
        failures += 1
        assert_one_error_line(run, "Input/output error")
        if not case.in_place:
            assert file_sha(case.path) == case.whole
        elif file_sha(case.path) != case.whole:
            # Only an error past the point of no return (the journal removed once the new header was verified)
            # may leave the new file, and then it is complete and valid.
            assert oracle_metadata(case.path) == corpus.metadata and data_sha(case.path) == corpus.data_sha
        # Whatever was left (at most a valid journal), the same command finishes the job.
        assert_case_done(case, run_cli(corpus, case.args), corpus)
    else:
        pytest.fail("fsync was still being called after 19 failures")
    assert failures >= 2


def test_a_read_only_file_is_refused_and_a_copy_can_still_be_written(
    tmp_path: Path, corpus: Corpus, request: pytest.FixtureRequest
) -> None:
    case = make_case(INSERT if insert_capable(tmp_path) else FIT, tmp_path, corpus, request)
    case.path.chmod(0o444)

    run = run_cli(corpus, case.args)

    assert_one_error_line(run, str(case.path), "read-only", "-o")
    assert file_sha(case.path) == case.whole and stat.S_IMODE(case.path.stat().st_mode) == 0o444
    assert leftovers(tmp_path) == []
    out = tmp_path / "copy.safetensors"
    copied = run_cli(corpus, patch_args(case.path, "-o", out))
    assert_case_done(Case(OUTPUT, case.path, out, [], case.whole), copied, corpus)


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """Set the immutable attribute on ``path`` (root cannot write it either), or skip the test."""
    if shutil.which("chattr") is None:
        pytest.skip("chattr is missing")
    done = subprocess.run(["chattr", "+i", str(path)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"chattr +i is not possible here: {done.stderr.strip()}")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(path)], capture_output=True)


@pytest.mark.parametrize("what", ["directory", "file"])
def test_permission_denied_is_refused_before_anything_is_written(
    what: str, tmp_path: Path, corpus: Corpus, request: pytest.FixtureRequest
) -> None:
    case = make_case(INSERT if insert_capable(tmp_path) else FIT, tmp_path, corpus, request)

    with immutable(case.path.parent if what == "directory" else case.path):
        run = run_cli(corpus, case.args)
        line = assert_one_error_line(run, str(case.path))
        assert ("directory is not writable" if what == "directory" else "not writable") in line
        assert file_sha(case.path) == case.whole
        assert leftovers(case.path.parent) == []


# Run inside the CLI's process: at the first file of the batch, the others are removed or replaced by a
# directory (another process would do it just the same; this does it at a known moment).
_MID_BATCH = """
import os, shutil, sys
from patcher import cli
from patcher.cli import batch
gone, dirred = sys.argv[1], sys.argv[2]
real = batch.read_header
def read_header(path):
    if os.path.exists(gone):
        os.unlink(gone)
        os.unlink(dirred)
        os.mkdir(dirred)
    return real(path)
batch.read_header = read_header
sys.argv = ["nunchaku-patch", *sys.argv[3:]]
cli.main()
"""


def test_files_removed_or_replaced_by_a_directory_mid_batch(tmp_path: Path, corpus: Corpus) -> None:
    tree = tmp_path / "tree"
    tree.mkdir()
    names = ["a.safetensors", "b-gone.safetensors", "c-dir.safetensors", "d.safetensors"]
    for name in names:
        shutil.copyfile(corpus.plain, tree / name)
    gone, dirred = tree / names[1], tree / names[2]
    argv = [sys.executable, "-c", _MID_BATCH, str(gone), str(dirred), str(tree), *MODEL_ARGS]
    proc = subprocess.run(argv, env=cli_env(corpus), capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO)
    run = Run(proc.returncode, proc.stdout, proc.stderr)

    assert run.returncode == 3, run.describe()
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr, run.describe()
    statuses = {Path(str(r["path"])).name: r["status"] for r in run.records}
    assert statuses == dict(zip(names, ["patched", "failed", "failed", "patched"], strict=True)), run.describe()
    assert len(run.errors) == 2
    assert any(str(gone) in e and "no such file" in e for e in run.errors), run.describe()
    assert any(str(dirred) in e and "directory" in e for e in run.errors), run.describe()
    for name in (names[0], names[3]):
        assert_patched(tree / name, corpus)
    assert dirred.is_dir() and not gone.exists() and leftovers(tree) == []


def test_a_fifo_and_dev_zero_are_refused_without_hanging(tmp_path: Path, corpus: Corpus) -> None:
    fifo = tmp_path / "pipe.safetensors"
    os.mkfifo(fifo)
    zero_link = tmp_path / "zero.safetensors"
    zero_link.symlink_to("/dev/zero")
    for args in (patch_args(fifo), ["validate", fifo], patch_args(Path("/dev/zero"))):
        run = run_cli(corpus, args, timeout=60)  # a blocking open or an endless read would hit the timeout
        assert_one_error_line(run, str(args[0] if args[0] != "validate" else fifo), "not a regular file")
    # In a directory batch the FIFO is one failed file among good ones; the symlink to /dev/zero is refused.
    shutil.copyfile(corpus.plain, tmp_path / "good.safetensors")
    run = run_cli(corpus, patch_args(tmp_path), timeout=60)
    assert run.returncode == 3, run.describe()
    assert {Path(str(r["path"])).name: r["status"] for r in run.records} == {
        "good.safetensors": "patched",
        "pipe.safetensors": "failed",
        "zero.safetensors": "failed",
    }
    assert_patched(tmp_path / "good.safetensors", corpus)


def _tiny_file(header: bytes, tail: bytes = b"") -> bytes:
    return struct.pack("<Q", len(header)) + header + tail


def test_a_length_prefix_of_2_to_the_63_is_refused(tmp_path: Path, corpus: Corpus) -> None:
    path = tmp_path / "huge-prefix.safetensors"
    blob = struct.pack("<Q", 2**63) + b'{"__metadata__":{}}' + bytes(64)
    path.write_bytes(blob)
    for args in (patch_args(path), ["inspect", path]):
        assert_one_error_line(run_cli(corpus, args), str(path), "too large")
    assert path.read_bytes() == blob and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("name", "shape", "offsets"),
    [
        ("past-eof", [2**30], [0, 2**32]),  # 4 GiB of F32 claimed by a file of a few dozen bytes
        ("overflow", [2**61], [0, 2**63]),  # the byte count does not fit in 64 bits
        ("beyond-u64", [4], [0, 2**64 + 16]),  # an offset JSON can say but no u64 holds
    ],
)
def test_a_header_claiming_huge_offsets_over_a_tiny_file_is_refused(
    name: str, shape: list[int], offsets: list[int], tmp_path: Path, corpus: Corpus
) -> None:
    path = tmp_path / f"{name}.safetensors"
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": offsets}}).encode()
    header += b" " * (-(PREFIX_SIZE + len(header)) % 8)
    blob = _tiny_file(header, b"\0" * 16)
    path.write_bytes(blob)
    assert not _oracle_accepts(path)
    # An address-space limit: a reader that tried to allocate what the header claims would fail loudly.
    wrapper = ("prlimit", "--as=2147483648") if shutil.which("prlimit") else ()

    run = run_cli(corpus, patch_args(path), wrapper=wrapper)

    assert_one_error_line(run, str(path))
    assert path.read_bytes() == blob and leftovers(tmp_path) == []


def _oracle_accepts(path: Path) -> bool:
    try:
        oracle_metadata(path)
    except Exception:  # the bindings raise SafetensorError, OSError or ValueError
        return False
    return True


# --------------------------------------------------------------------------------------------
# Concurrency


def flock_holder(path: Path) -> int | None:
    """Return the pid holding an exclusive flock on ``path`` (from /proc/locks), or None."""
    ino = path.stat().st_ino
    with open("/proc/locks", encoding="ascii") as locks:
        for line in locks:
            fields = line.split()
            if "->" in fields:  # a waiter, not a holder
                continue
            if fields[1:4] == ["FLOCK", "ADVISORY", "WRITE"] and fields[5].rsplit(":", 1)[-1] == str(ino):
                return int(fields[4])
    return None


def _cpu_ticks_and_state(pid: int) -> tuple[int, str]:
    with open(f"/proc/{pid}/stat", encoding="ascii") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12]), fields[0]  # utime + stime, state


def wait_stopped_holding(pid: int, path: Path) -> None:
    """Wait until ``pid`` is stopped for good (not a passing ptrace stop) holding the lock on ``path`` mid-patch."""
    steady, last = 0, -1
    for _ in range(3000):
        ticks, state = _cpu_ticks_and_state(pid)
        holding = flock_holder(path) == pid and os.path.exists(splice.journal_path(path))
        steady = steady + 1 if state in ("T", "t") and holding and ticks == last else 0
        if steady >= 10:
            return
        last = ticks
        time.sleep(0.02)
    raise AssertionError(f"process {pid} never stopped mid-patch")


def _children(pid: int) -> list[int]:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        return [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    return []


def _is_patcher(pid: int) -> bool:
    with contextlib.suppress(FileNotFoundError, ProcessLookupError):
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        return b"patcher" in argv and os.path.basename(argv[0]) != b"strace"
    return False


def patcher_pid(root: int) -> int:
    """Return the pid of the python process somewhere under an strace wrapper ``root``.

    strace may fork helpers of its own first, so the first child is not always the patcher: walk the tree and
    pick the process that runs ``python -m patcher``.
    """
    for _ in range(3000):
        todo = [root]
        while todo:
            pid = todo.pop()
            if pid != root and _is_patcher(pid):
                return pid
            todo.extend(_children(pid))
        time.sleep(0.01)
    raise AssertionError("the patcher never started")


@needs_strace
@pytest.mark.parametrize(
    ("strategy", "stop_at"),
    [
        (INSERT, "pwrite64:when=2"),  # blocks inserted, the new prefix not yet written, the write lease held
        (FIT, "fsync:when=3"),  # the new prefix written, not yet flushed
    ],
)
def test_a_second_patcher_is_refused_while_the_first_is_mid_write(
    strategy: str, stop_at: str, tmp_path: Path, corpus: Corpus, request: pytest.FixtureRequest
) -> None:
    case = make_case(strategy, tmp_path, corpus, request)
    syscall, when = stop_at.split(":")
    # The first patcher stops itself (SIGSTOP) on entering that call: holding the lock, the patch half done.
    argv = [*strace(f"{syscall}:signal=STOP:{when}", trace=[syscall]), *CLI, *map(os.fspath, case.args)]
    # A session of its own, so that whatever happens the whole tree (strace and the stopped patcher) can be killed:
    # a stopped orphan would hold the pipes, and communicate() would wait forever.
    first = subprocess.Popen(
        argv,
        env=cli_env(corpus),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    pid = None
    try:
        pid = patcher_pid(first.pid)
        wait_stopped_holding(pid, case.path)  # mid-patch: the lock held, the journal out

        second = run_cli(corpus, case.args)

        journal_kept = os.path.exists(splice.journal_path(case.path))
    finally:
        # Never leave a stopped patcher behind (it would hold the pipes, and the file, forever).
        with contextlib.suppress(ProcessLookupError):
            os.killpg(first.pid, signal.SIGCONT)
        try:
            out, err = first.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(first.pid, signal.SIGKILL)
            if pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            first.communicate()
            raise
    assert journal_kept  # the second did not "recover" (roll back) a live patch
    # The flock, or for insert first the write lease (a non-blocking open is refused while it is held).
    assert_one_error_line(second, str(case.path), "another nunchaku-patch is writing")
    assert_case_done(case, Run(first.returncode, out, err), corpus)


def test_two_patchers_started_together_one_wins_the_other_fails_cleanly(tmp_path: Path, corpus: Corpus) -> None:
    for attempt in range(2):
        path = tmp_path / f"race{attempt}.safetensors"
        shutil.copyfile(corpus.plain, path)
        argv = [*CLI, *map(os.fspath, patch_args(path))]
        procs = [
            subprocess.Popen(argv, env=cli_env(corpus), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)
        ]
        outputs = [p.communicate(timeout=TIMEOUT) for p in procs]
        runs = [Run(p.returncode, out, err) for p, (out, err) in zip(procs, outputs, strict=True)]
        statuses = sorted(str(r.records[0]["status"]) for r in runs if r.records)
        # Either one waited its turn and found nothing to do, or it met the lock and said so.
        assert statuses in (["already correct", "patched"], ["failed", "patched"]), [r.describe() for r in runs]
        for run in runs:
            if run.returncode != 0:
                assert_one_error_line(run, "another nunchaku-patch is writing")
        assert_patched(path, corpus)


_MAPPER = """
import hashlib, json, mmap, os, struct, sys, threading
from safetensors import safe_open
from patcher.header import parse_header, read_header
path = sys.argv[1]
fd = os.open(path, os.O_RDONLY)
mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
os.close(fd)  # like a loader that keeps only the mapping: the kernel still counts it as an open file
handle = safe_open(path, framework="np")  # and the reference reader's own mapping, as ComfyUI holds it
# numpy has no bfloat16: sample the int8/int32 tensors (the quantized weights)
names = [n for n, t in read_header(path).tensors.items() if t.dtype != "BF16"][::8]
before = {n: hashlib.sha256(handle.get_tensor(n).tobytes()).hexdigest() for n in names}

def snapshot():
    n = struct.unpack("<Q", mapped[:8])[0]
    header = parse_header(bytes(mapped[8 : 8 + n]), len(mapped), source="mapped")
    return header.metadata, len(header.tensors), hashlib.sha256(mapped[8 + n :]).hexdigest()

first = snapshot()
stop = threading.Event()
looks, changed = [0], [0]
def watch():
    while not stop.is_set():
        looks[0] += 1
        changed[0] += snapshot() != first
threading.Thread(target=watch, daemon=True).start()
print("ready", flush=True)
sys.stdin.readline()
stop.set()
after = {n: hashlib.sha256(handle.get_tensor(n).tobytes()).hexdigest() for n in names}
print(json.dumps({"metadata": first[0], "tensors": first[1], "data": first[2], "looks": looks[0],
                  "changed": changed[0], "still": snapshot() == first, "tensors_same": after == before}))
"""


def test_a_process_holding_a_mapping_keeps_consistent_bytes_and_forces_a_copy(tmp_path: Path, corpus: Corpus) -> None:
    directory = tmp_path / "work"
    directory.mkdir()
    if not insert_capable(directory):
        pytest.skip("without insert-range every growth is a copy anyway")
    path = directory / "model.safetensors"
    shutil.copyfile(corpus.plain, path)
    mapper = subprocess.Popen(
        [sys.executable, "-c", _MAPPER, str(path)],
        env=cli_env(corpus),
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert mapper.stdout is not None and mapper.stdout.readline().strip() == "ready"
        run = run_cli(corpus, patch_args(path))
        seen_text, _ = mapper.communicate("\n", timeout=TIMEOUT)
    finally:
        if mapper.poll() is None:
            mapper.kill()
            mapper.communicate()
    seen = json.loads(seen_text)

    assert run.returncode == 0, run.describe()
    # The write lease was refused (the mapping counts as an open file): the data must not move under it.
    assert [r["strategy"] for r in run.records] == ["copy"]
    assert_patched(path, corpus)
    assert seen["metadata"] is None and seen["tensors"] > 2000 and seen["data"] == corpus.data_sha
    assert seen["looks"] >= 1 and seen["changed"] == 0 and seen["still"] and seen["tensors_same"]


_CHURN = """
import os, sys, time
from pathlib import Path
from patcher import synth
root, source, stop = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
tensors = synth.table_to_tensors(synth.build_table(synth.preset("flux.1-dev", scale=0.05)))
alive, made, removed, i = [], 0, 0, 0
while not stop.exists():
    i += 1
    sub = root / f"churn{i % 3}"
    sub.mkdir(exist_ok=True)
    tmp = sub / f".incoming-{i}"
    synth.write_random(tmp, tensors, seed=i) if i % 4 == 0 else synth.write_sparse(tmp, tensors)
    final = sub / f"new-{i}.safetensors"
    os.rename(tmp, final)  # arrives whole, like a finished download
    alive.append(final)
    made += 1
    if len(alive) > 3:
        os.unlink(alive.pop(0))
        removed += 1
    if i == 3:
        print("ready", flush=True)
    time.sleep(0.01)
print(made, removed, flush=True)
"""


def test_a_batch_over_a_tree_while_files_come_and_go(tmp_path: Path, corpus: Corpus) -> None:
    tree = tmp_path / "tree"
    stable = [tree / "a" / "one.safetensors", tree / "a" / "b" / "two.safetensors", tree / "three.safetensors"]
    for path in stable:
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(corpus.plain, path)
    shutil.copyfile(corpus.roomy, tree / "four.safetensors")
    stable.append(tree / "four.safetensors")
    stop = tmp_path / "stop"
    churn = subprocess.Popen(
        [sys.executable, "-c", _CHURN, str(tree), str(corpus.plain), str(stop)],
        env=cli_env(corpus),
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    try:
        assert churn.stdout is not None and churn.stdout.readline().strip() == "ready"
        run = run_cli(corpus, patch_args(tree))
    finally:
        stop.touch()
        tail, _ = churn.communicate(timeout=TIMEOUT)
    made, removed = map(int, tail.split())

    assert made > 3 and removed > 0
    assert run.returncode in (0, 3), run.describe()
    assert "Traceback" not in run.stderr and "internal error" not in run.stderr, run.describe()
    records = {str(r["path"]): r for r in run.records}
    for path in stable:
        assert records[str(path)]["status"] == "patched", run.describe()
        assert_patched(path, corpus)
    for line in run.errors:  # only a file that vanished between the listing and its turn may fail
        assert "/churn" in line and "no such file" in line, run.describe()
    for path in tree.rglob("new-*.safetensors"):
        assert _oracle_accepts(path), path  # untouched or patched, never half-written
    assert leftovers(tree) == []


# --------------------------------------------------------------------------------------------
# Links: a Hugging Face cache snapshot, a plain symlink, a hard link


@dataclass(frozen=True)
class HubCache:
    blob: Path
    snapshots: list[Path]


def make_hub_cache(root: Path, corpus: Corpus, source: Path | None = None) -> HubCache:
    """Lay out ``models--x--y`` as huggingface_hub does: two revisions' snapshots link to one blob."""
    repo = root / "models--x--y"
    digest = file_sha(source or corpus.plain)
    blob = repo / "blobs" / digest
    blob.parent.mkdir(parents=True)
    shutil.copyfile(source or corpus.plain, blob)
    snapshots = []
    for commit in ("1111111111111111111111111111111111111111", "2222222222222222222222222222222222222222"):
        link = repo / "snapshots" / commit / "transformer" / "svdq-int4-flux.1-dev.safetensors"
        link.parent.mkdir(parents=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
        snapshots.append(link)
    return HubCache(blob, snapshots)


def test_a_hub_cache_snapshot_is_refused_and_its_blob_never_touched(tmp_path: Path, corpus: Corpus) -> None:
    cache = make_hub_cache(tmp_path / "hub", corpus)
    blob_sha = file_sha(cache.blob)
    assert cache.blob.name == blob_sha

    single = run_cli(corpus, patch_args(cache.snapshots[0]))
    batch = run_cli(corpus, patch_args(tmp_path / "hub"))

    line = assert_one_error_line(single, str(cache.snapshots[0]), "symbolic link", "-o", "--follow-symlinks")
    assert str(cache.blob) in line  # it names what would change
    assert batch.returncode == 3 and all(r["status"] == "failed" for r in batch.records), batch.describe()
    assert {str(r["path"]) for r in batch.records} == {str(s) for s in cache.snapshots}
    assert file_sha(cache.blob) == blob_sha and leftovers(tmp_path) == []
    assert all(s.is_symlink() and s.resolve() == cache.blob for s in cache.snapshots)


def test_a_hub_cache_snapshot_can_be_patched_into_a_copy(tmp_path: Path, corpus: Corpus) -> None:
    cache = make_hub_cache(tmp_path / "hub", corpus)
    out = tmp_path / "patched.safetensors"

    run = run_cli(corpus, patch_args(cache.snapshots[0], "-o", out))

    assert run.returncode == 0, run.describe()
    assert_patched(out, corpus)
    assert file_sha(cache.blob) == cache.blob.name and leftovers(tmp_path) == []


@pytest.mark.parametrize("where", ["ext4", "tmpfs"])
def test_follow_symlinks_patches_the_shared_blob_and_keeps_the_links(
    where: str, tmp_path: Path, corpus: Corpus, request: pytest.FixtureRequest
) -> None:
    root = request.getfixturevalue("shm_dir") if where == "tmpfs" else tmp_path
    cache = make_hub_cache(root / "hub", corpus)

    run = run_cli(corpus, patch_args(cache.snapshots[0], "--follow-symlinks"))

    assert run.returncode == 0, run.describe()
    # Asked for explicitly: the blob (every revision's view of it) is patched, even by a copy-and-rename,
    # and the snapshot entries stay links to it. Its name no longer is its content's sha256.
    assert all(s.is_symlink() and s.resolve() == cache.blob for s in cache.snapshots)
    for snapshot in cache.snapshots:
        assert oracle_metadata(snapshot) == corpus.metadata
    assert_patched(cache.blob, corpus)
    assert file_sha(cache.blob) != cache.blob.name


def test_a_plain_symlink_is_refused_unless_followed(tmp_path: Path, corpus: Corpus) -> None:
    real = tmp_path / "real.safetensors"
    shutil.copyfile(corpus.plain, real)
    link = tmp_path / "link.safetensors"
    link.symlink_to(real.name)

    refused = run_cli(corpus, patch_args(link))
    assert_one_error_line(refused, str(link), "symbolic link")
    assert file_sha(real) == corpus.whole["plain"]

    followed = run_cli(corpus, patch_args(link, "--follow-symlinks"))
    assert followed.returncode == 0, followed.describe()
    assert link.is_symlink() and link.resolve() == real
    assert_patched(real, corpus)


def test_a_hard_linked_file_is_refused_and_a_copy_offered(tmp_path: Path, corpus: Corpus) -> None:
    first = tmp_path / "first.safetensors"
    shutil.copyfile(corpus.plain, first)
    second = tmp_path / "elsewhere" / "second.safetensors"
    second.parent.mkdir()
    os.link(first, second)

    for name in (first, second):
        run = run_cli(corpus, patch_args(name, "--follow-symlinks"))  # following links is no licence here
        assert_one_error_line(run, str(name), "hard links", "-o")
    assert first.stat().st_nlink == 2 and file_sha(first) == corpus.whole["plain"]

    out = tmp_path / "out.safetensors"
    run = run_cli(corpus, patch_args(second, "-o", out))
    assert run.returncode == 0, run.describe()
    assert_patched(out, corpus)
    assert first.stat().st_nlink == 2 and file_sha(second) == corpus.whole["plain"]


def test_killed_while_following_a_symlink_the_same_command_repairs_it(tmp_path: Path, corpus: Corpus) -> None:
    if not insert_capable(tmp_path):
        pytest.skip("needs the insert path (a header that is broken while the patch is under way)")
    cache = make_hub_cache(tmp_path / "hub", corpus)
    args = patch_args(cache.snapshots[0], "--follow-symlinks")

    crash = run_cli(corpus, args, fault="inserted")
    assert crash.killed, crash.describe()
    assert os.path.exists(splice.journal_path(cache.blob))

    rerun = run_cli(corpus, args)
    assert rerun.returncode == 0, rerun.describe()
    assert_patched(cache.blob, corpus)


def test_the_command_suggested_after_an_interrupted_followed_patch_works(tmp_path: Path, corpus: Corpus) -> None:
    if not insert_capable(tmp_path):
        pytest.skip("needs the insert path (a header that is broken while the patch is under way)")
    cache = make_hub_cache(tmp_path / "hub", corpus)
    crash = run_cli(corpus, patch_args(cache.snapshots[0], "--follow-symlinks"), fault="inserted")
    assert crash.killed, crash.describe()

    refused = run_cli(corpus, patch_args(cache.snapshots[0]))  # the same file, without the option
    line = assert_one_error_line(refused, "interrupted patch")
    suggested = re.search(r"`nunchaku-patch ([^`]+)`", line)
    assert suggested is not None, line
    followed = run_cli(corpus, suggested.group(1).split())

    assert followed.returncode == 0, followed.describe()
    assert not os.path.exists(splice.journal_path(cache.blob))
    assert _oracle_accepts(cache.blob) and data_sha(cache.blob) == corpus.data_sha
