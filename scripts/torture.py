#!/usr/bin/env python3
"""Torture nunchaku-patch: kill it, starve it and feed it garbage for minutes or hours; check that no byte is lost.

Each *write case* builds a random synthetic SVDQuant file (one of five model families, random width, random
existing metadata, random header padding and alignment, random mode), places it so that the command takes a
given strategy (fit, insert, copy on tmpfs, copy because another process holds the file open, copy of an
unaligned file, output with -o, or a whole directory batch), and runs the real command line with one injected
mishap:

* ``NUNCHAKU_PATCH_FAULT=<step>``: SIGKILL at a named write step;
* ``strace -e inject=<call>:signal=KILL:when=N``: SIGKILL at the Nth call of a system call (unseen by the code);
* ``strace -e inject=<call>:error=<errno>:when=N``: a failing system call (EIO, ENOSPC, EFBIG, ...);
* ``strace -e inject=<call>:signal=INT|TERM:when=N``: Ctrl-C or a polite kill mid-write;
* nothing (a control run).

Then it checks the file right after the mishap (its old bytes, the finished result, or a broken header *with* a
journal to repair it), runs the same command again, and checks the end state: the reference reader
(``safetensors.safe_open``) reads exactly the metadata the planner computes, the data region's sha256 is the
original's, the mode is kept, no journal or temp file is left, a source given to -o is byte-identical, and with
--backup, ``restore`` brings back the original metadata.

Each *header case* builds a random header (valid, then mutated at the byte or JSON level) and compares the
strict reader's accept/reject with ``safetensors.safe_open``; some of them are also given to the command line,
which must fail with one error line (or succeed on a valid file) and never change the file.

    python scripts/torture.py --minutes 10 --seed 1          # random cases for ten minutes
    python scripts/torture.py --sweep --minutes 10           # first kill/fail at every call of every strategy
    python scripts/torture.py --replay 100000042 --keep      # rerun one case from a failure report

Exit status: 0 when every case passed, 1 on any failure (each printed with its reproducer).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import random
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from patcher import _platform as plat
from patcher import splice, synth
from patcher.errors import HeaderError
from patcher.header import DTYPE_BITS, PREFIX_SIZE, TensorInfo, pack_prefix, parse_file_bytes, read_header
from patcher.header import serialize_header as serialize

REPO = Path(__file__).resolve().parent.parent
CLI = (sys.executable, "-m", "patcher")
CASE_TIMEOUT = 300
PRESETS = ("flux.1-dev", "flux.1-schnell", "qwen-image", "sana-1600m", "z-image-turbo")
SCALES = (0.01, 0.02, 0.04)
INTENTS = ("fit", "insert", "copy-tmpfs", "copy-held", "copy-unaligned", "output", "batch")
INTENT_WEIGHTS = (3, 4, 2, 2, 1, 2, 1)
#: The fault points each intent passes (a tmpfs folder is known to lack insert-range: it copies at once).
STEPS: Mapping[str, tuple[str, ...]] = {
    "fit": ("journal-written", "prefix-half", "prefix-written", "verified"),
    "insert": ("journal-written", "inserted", "prefix-half", "prefix-written", "verified"),
    "copy-tmpfs": ("tmp-created", "data-half", "data-copied", "verified", "replaced"),
    "copy-held": ("tmp-created", "data-half", "data-copied", "verified", "replaced"),
    "copy-unaligned": ("tmp-created", "data-half", "data-copied", "verified", "replaced"),
    "output": ("tmp-created", "data-half", "data-copied", "verified", "replaced"),
    "batch": splice.FAULT_STEPS,
}
#: The fault points each strategy, as the command reports it, always passes.
PASSES: Mapping[str, tuple[str, ...]] = {
    "fit": STEPS["fit"],
    "insert": STEPS["insert"],
    "copy": STEPS["copy-held"],
    "output": STEPS["output"],
}
#: System calls at which strace kills or interrupts, with the largest N worth drawing.
KILL_CALLS: Mapping[str, int] = {
    "pwrite64": 4,
    "fsync": 6,
    "rename": 3,
    "fallocate": 2,
    "copy_file_range": 3,
    "unlink": 3,
    "flock": 4,
    "fchmod": 2,
}
#: Failures strace makes a system call return, by call.
ERRORS: Mapping[str, tuple[str, ...]] = {
    "pwrite64": ("EIO", "ENOSPC", "EDQUOT", "EFBIG"),
    "fsync": ("EIO", "ENOSPC"),
    "rename": ("EIO", "EROFS", "ENOSPC", "EACCES"),
    "fallocate": ("ENOSPC", "EIO", "EOPNOTSUPP"),
    "copy_file_range": ("EIO", "ENOSPC", "EXDEV"),
    "unlink": ("EIO", "EACCES"),
    "fchmod": ("EPERM",),
}
SWEEP_CALLS = ("pwrite64", "fallocate", "copy_file_range", "fsync", "rename", "unlink")
SWEEP_INTENTS = ("fit", "insert", "copy-tmpfs", "copy-held", "output")
_STRACE_LINE = re.compile(r"^\d+\s+(\w+)\(")


class CaseFailure(Exception):
    """A broken promise: the message says which."""


# --------------------------------------------------------------------------------------------
# Counters


@dataclass
class Stats:
    """What was tried and what was seen, summed over every case."""

    cases: Counter[str] = field(default_factory=Counter)
    crashes: Counter[str] = field(default_factory=Counter)
    faults: Counter[str] = field(default_factory=Counter)
    recoveries: Counter[str] = field(default_factory=Counter)
    strategies: Counter[str] = field(default_factory=Counter)
    files_checked: int = 0
    bytes_verified: int = 0
    headers: int = 0
    headers_valid: int = 0
    disagreements: int = 0
    hostile_cli: int = 0
    hostile: Counter[str] = field(default_factory=Counter)
    restores: int = 0
    cli_runs: int = 0
    failures: list[str] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, other: Stats) -> None:
        """Merge one case's counts into these (thread-safe)."""
        with self.lock:
            for name in ("cases", "crashes", "faults", "recoveries", "strategies", "hostile"):
                getattr(self, name).update(getattr(other, name))
            for name in (
                "files_checked",
                "bytes_verified",
                "headers",
                "headers_valid",
                "disagreements",
                "hostile_cli",
                "restores",
                "cli_runs",
            ):
                setattr(self, name, getattr(self, name) + getattr(other, name))
            self.failures.extend(other.failures)

    def summary(self, seed: int, elapsed: float) -> list[str]:
        """Return the report printed at the end (and pasted into docs/reliability.md)."""

        def breakdown(counter: Counter[str]) -> str:
            return ", ".join(f"{k} {v}" for k, v in counter.most_common()) or "none"

        write_cases = sum(v for k, v in self.cases.items() if k != "header")
        return [
            f"seed {seed}, {elapsed / 60:.1f} minutes, {self.cli_runs:,} command-line runs",
            f"cases tried:          {sum(self.cases.values()):,} ({write_cases:,} write cases, "
            f"{self.cases['header']:,} header cases)",
            f"  by setup:           {breakdown(Counter({k: v for k, v in self.cases.items() if k != 'header'}))}",
            f"  strategies seen:    {breakdown(self.strategies)}",
            f"crashes injected:     {sum(self.crashes.values()):,} ({breakdown(self.crashes)})",
            f"faults injected:      {sum(self.faults.values()):,} ({breakdown(self.faults)})",
            f"recoveries:           {sum(self.recoveries.values()):,} ({breakdown(self.recoveries)})",
            f"restores (--backup):  {self.restores:,}",
            f"hostile files:        {sum(self.hostile.values()):,} refused, file untouched ({breakdown(self.hostile)})",
            f"files checked:        {self.files_checked:,}",
            f"bytes verified:       {self.bytes_verified:,} ({self.bytes_verified / 2**30:.1f} GiB hashed, compared)",
            f"headers compared:     {self.headers:,} ({self.headers_valid:,} valid), "
            f"{self.hostile_cli:,} given to the command line",
            f"disagreements with safetensors: {self.disagreements}",
            f"failures:             {len(self.failures)}",
        ]


# --------------------------------------------------------------------------------------------
# Files


def sha256_of(path: Path, start: int = 0, stats: Stats | None = None) -> str:
    """Return the sha256 of ``path`` from ``start`` to the end (counted in ``stats.bytes_verified``)."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        handle.seek(start)
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
            if stats is not None:
                stats.bytes_verified += len(chunk)
    return digest.hexdigest()


def oracle_metadata(path: Path) -> dict[str, str] | None:
    """Return the metadata as safetensors reads it; raise if it rejects the file."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as handle:
        handle.keys()
        metadata: dict[str, str] | None = handle.metadata()
    return metadata


def oracle_accepts(path: Path) -> bool:
    try:
        oracle_metadata(path)
    except Exception:  # the bindings raise SafetensorError, OSError or ValueError
        return False
    return True


def leftovers(*roots: Path) -> list[str]:
    """Return every journal or temp file of ours under ``roots`` (backups are wanted, not leftovers)."""
    found = []
    for root in roots:
        if root.exists():
            found += [str(p) for p in root.rglob("*") if ".npatch-" in p.name and not p.name.endswith("-backup")]
    return sorted(found)


@dataclass(frozen=True)
class Blob:
    """A cached data region and the tensor table it belongs to."""

    preset: str
    scale: float
    tensors: dict[str, TensorInfo]
    path: Path
    sha: str


class Workspace:
    """Directories on ext4 and tmpfs, cached data regions, and the in-process planner."""

    def __init__(self, root: Path, shm: Path | None) -> None:
        self.root = root
        self.shm = shm
        self.cache = root / "cache"
        self.cache.mkdir(parents=True, exist_ok=True)
        self.hf_home = root / "hf-home"
        self.hf_home.mkdir(exist_ok=True)
        self._blobs: dict[tuple[str, float], Blob] = {}
        self._lock = threading.Lock()
        self.strace = _strace_works()
        self.insert_ok = plat.insert_range_likely(str(root))

    def blob(self, preset: str, scale: float) -> Blob:
        """Return the random data region of ``preset`` at ``scale`` (written once, then reused)."""
        with self._lock:
            key = (preset, scale)
            if key not in self._blobs:
                tensors = synth.table_to_tensors(synth.build_table(synth.preset(preset, scale=scale)))
                path = self.cache / f"{preset}-{scale}.data"
                size = synth.data_size(tensors)
                seed = int.from_bytes(hashlib.sha256(f"{preset}:{scale}".encode()).digest()[:4], "little")
                rng = random.Random(seed)
                with open(path, "wb") as handle:
                    remaining = size
                    while remaining:
                        chunk = min(remaining, 1 << 22)
                        handle.write(rng.randbytes(chunk))
                        remaining -= chunk
                self._blobs[key] = Blob(preset, scale, tensors, path, sha256_of(path))
            return self._blobs[key]

    def env(self, fault: str | None = None) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if k != splice.FAULT_ENV}
        env.update(NO_COLOR="1", HF_HUB_OFFLINE="1", HF_HOME=str(self.hf_home))
        if fault is not None:
            env[splice.FAULT_ENV] = fault
        return env

    def expected_metadata(self, path: Path, preset: str) -> dict[str, str]:
        """Return the metadata a clean run writes into ``path`` (the planner, in process)."""
        from patcher.plan import PatchOptions, Planner

        planner = Planner(PatchOptions(model=preset, force=True), log=lambda _line: None)
        return dict(planner.plan(str(path), read_header(path)).new_metadata)


def _strace_works() -> bool:
    if shutil.which("strace") is None:
        return False
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        probe = subprocess.run(["strace", "-f", "-qq", "-o", os.devnull, "true"], capture_output=True, timeout=30)
        return probe.returncode == 0
    return False


_ALPHABET = "abcXYZ019 _-./:\"\\'{}[],\n\t\x01é漢字😀𝄞\u2028"


def random_text(rng: random.Random, length: int) -> str:
    return "".join(rng.choice(_ALPHABET) for _ in range(length))


def random_metadata(rng: random.Random) -> dict[str, str] | None:
    roll = rng.random()
    if roll < 0.15:
        return None
    if roll < 0.25:
        return {}
    metadata = {"format": "pt"} if rng.random() < 0.8 else {}
    for _ in range(rng.choice((0, 0, 1, 2, 5))):
        size = rng.choice((0, 3, 40, 500, 5000, 30000))
        metadata[random_text(rng, rng.randint(1, 12))] = random_text(rng, size)
    return metadata


@dataclass
class Subject:
    """One file of a case and what it must look like afterwards."""

    path: Path
    preset: str
    blob: Blob
    original_metadata: dict[str, str] | None
    whole: str
    mode: int
    #: The original header length, and whether the original data region was 8-byte aligned.
    header_len: int = 0
    aligned: bool = True
    expected: dict[str, str] = field(default_factory=dict)
    #: Where the result goes (-o), else the file itself.
    result: Path | None = None


def write_subject(path: Path, blob: Blob, rng: random.Random, *, room: str, aligned: bool) -> tuple[int, bytes]:
    """Write a file of ``blob``'s table with random metadata and header padding; return its mode and header."""
    metadata = random_metadata(rng)
    tensors = blob.tensors
    if rng.random() < 0.1:  # JSON order is free; only the offsets fix the layout
        names = list(tensors)
        rng.shuffle(names)
        tensors = {n: tensors[n] for n in names}
    compact = len(serialize(metadata, tensors).rstrip(b" "))
    # Room for the new metadata (fit) or too little (insert, copy): the metadata adds a few KiB.
    length = compact + (rng.randint(8 * 1024, 64 * 1024) if room == "fit" else rng.randint(0, 600))
    if aligned:
        length += -(PREFIX_SIZE + length) % 8
    elif (PREFIX_SIZE + length) % 8 == 0:
        length += rng.randint(1, 7)
    raw = serialize(metadata, tensors, length=length)
    with open(path, "wb") as dst, open(blob.path, "rb") as src:
        dst.write(pack_prefix(raw))
        shutil.copyfileobj(src, dst, 1 << 22)
    mode = rng.choice((0o644, 0o600, 0o640, 0o664))
    path.chmod(mode)
    return mode, raw


# --------------------------------------------------------------------------------------------
# Running the command line


@dataclass(frozen=True)
class Run:
    returncode: int
    stdout: str
    stderr: str
    #: Calls strace made fail or killed at (from its log), if it ran.
    injected: int = 0

    @property
    def errors(self) -> list[str]:
        return [line for line in self.stderr.splitlines() if line.startswith("error:")]

    def describe(self) -> str:
        return f"exit {self.returncode}; stderr: {self.stderr.strip()[-1500:]!r}; stdout: {self.stdout[-600:]!r}"


def run_cli(
    ws: Workspace,
    stats: Stats,
    args: Sequence[str],
    *,
    fault: str | None = None,
    inject: str | None = None,
    timeout: float = CASE_TIMEOUT,
) -> Run:
    """Run the command line, with a fault step or an strace injection; record the run."""
    stats.cli_runs += 1
    prefix: list[str] = []
    log = None
    if inject is not None:
        fd, log = tempfile.mkstemp(prefix="strace-", dir=ws.root)
        os.close(fd)
        specs = inject.split(" & ")  # a double fault: one spec per system call (strace keeps one per call)
        calls = ",".join(dict.fromkeys(spec.split(":", 1)[0] for spec in specs))
        prefix = ["strace", "-f", "-qq", "-o", log, "-e", f"trace={calls}"]
        for spec in specs:
            prefix += ["-e", f"inject={spec}"]
    try:
        proc = subprocess.run(
            [*prefix, *CLI, *args], env=ws.env(fault), capture_output=True, text=True, timeout=timeout, cwd=REPO
        )
        injected = 0
        if log is not None:
            injected = Path(log).read_text(errors="replace").count("(INJECTED)")
    finally:
        if log is not None:
            os.unlink(log)
    return Run(proc.returncode, proc.stdout, proc.stderr, injected)


def records(run: Run) -> list[dict[str, Any]]:
    out = []
    for line in run.stdout.splitlines():
        with contextlib.suppress(ValueError):
            if line.startswith("{"):
                out.append(json.loads(line))
    return out


def check_clean_output(run: Run, what: str) -> None:
    if "Traceback" in run.stderr or "internal error" in run.stderr:
        raise CaseFailure(f"{what}: a traceback or internal error: {run.describe()}")


# --------------------------------------------------------------------------------------------
# Write cases


@dataclass
class Injection:
    kind: str  # fault, kill, error, signal, none
    fault: str | None = None
    inject: str | None = None
    label: str = "none"


def choose_injection(ws: Workspace, rng: random.Random, intent: str) -> Injection:
    roll = rng.random()
    if not ws.strace or roll < 0.35:
        if roll > 0.95:
            return Injection("none")
        step = rng.choice(STEPS[intent])
        return Injection("fault", fault=step, label=f"step {step}")
    if roll < 0.65:
        call = rng.choice(sorted(KILL_CALLS))
        when = rng.randint(1, KILL_CALLS[call])
        return Injection("kill", inject=f"{call}:signal=KILL:when={when}", label=f"kill {call}#{when}")
    if roll < 0.87:
        call = rng.choice(sorted(ERRORS))
        name = rng.choice(ERRORS[call])
        when = rng.randint(1, KILL_CALLS[call])
        return Injection("error", inject=f"{call}:error={name}:when={when}", label=f"{name} {call}#{when}")
    if roll < 0.97:
        call = rng.choice(("pwrite64", "fsync", "rename", "fallocate", "copy_file_range"))
        sig = rng.choice(("INT", "TERM"))
        when = rng.randint(1, KILL_CALLS[call])
        return Injection("signal", inject=f"{call}:signal={sig}:when={when}", label=f"SIG{sig} {call}#{when}")
    return Injection("none")


@dataclass
class Setup:
    intent: str
    subjects: list[Subject]
    args: list[str]
    dirs: list[Path]
    backup: bool
    held: list[int] = field(default_factory=list)


def make_setup(ws: Workspace, rng: random.Random, intent: str, case_dir: Path, shm_dir: Path | None) -> Setup:
    """Write the case's files where the command takes the strategy ``intent`` names."""
    if intent == "insert" and not ws.insert_ok:
        intent = "copy-held"
    if intent == "copy-tmpfs" and shm_dir is None:
        intent = "copy-held"
    count = rng.randint(2, 4) if intent == "batch" else 1
    home = shm_dir if intent == "copy-tmpfs" and shm_dir is not None else case_dir
    work = home / "work"
    work.mkdir(parents=True)
    dirs = [work]
    subjects = []
    for index in range(count):
        preset, scale = rng.choice(PRESETS), rng.choice(SCALES)
        blob = ws.blob(preset, scale)
        path = work / (f"m{index}-{preset}.safetensors" if intent == "batch" else "model.safetensors")
        room = "fit" if intent == "fit" or (intent == "batch" and rng.random() < 0.4) else "tight"
        aligned = intent != "copy-unaligned" and (intent != "batch" or rng.random() < 0.85)
        mode, raw = write_subject(path, blob, rng, room=room, aligned=aligned)
        subject = Subject(path, preset, blob, read_header(path).metadata, sha256_of(path), mode, len(raw), aligned)
        subject.expected = ws.expected_metadata(path, preset)
        subjects.append(subject)
    presets = {s.preset for s in subjects}
    model = subjects[0].preset if len(presets) == 1 else None
    # A batch of mixed families: each file's own table names its model (--force keeps the scaled widths).
    base = ["--force", "--json", *(["--model", model] if model else [])]
    backup = intent not in ("output", "batch") and rng.random() < 0.3
    if intent == "output":
        out_home = shm_dir if shm_dir is not None and rng.random() < 0.3 else case_dir
        out = out_home / "out" / "patched.safetensors"
        out.parent.mkdir(parents=True)
        dirs.append(out.parent)
        subjects[0].result = out
        args = [str(subjects[0].path), "-o", str(out), *base]
    elif intent == "batch":
        args = [str(work), *base]
    else:
        args = [str(subjects[0].path), *base, *(["--backup"] if backup else [])]
    setup = Setup(intent, subjects, args, dirs, backup)
    if intent == "copy-held":  # another process (here: us) has the file open: no write lease, so a copy
        setup.held.append(os.open(subjects[0].path, os.O_RDONLY))
    if model is None:
        for subject in subjects:  # no --model: the planner resolves from the table alone
            from patcher.plan import PatchOptions, Planner

            planner = Planner(PatchOptions(force=True), log=lambda _line: None)
            subject.expected = dict(planner.plan(str(subject.path), read_header(subject.path)).new_metadata)
    return setup


def classify(subject: Subject, stats: Stats) -> str:
    """Return the state of an in-place subject right after a mishap: old, new or broken (with a journal)."""
    path = subject.path
    if not path.exists():
        raise CaseFailure(f"{path} is gone")
    if sha256_of(path, stats=stats) == subject.whole:
        return "old"
    try:
        header = read_header(path)
    except HeaderError as exc:
        if not os.path.lexists(splice.journal_path(path)):
            raise CaseFailure(f"{path} is broken ({exc}) and no journal is there to repair it") from None
        return "broken"
    if sha256_of(path, header.data_start, stats) != subject.blob.sha:
        raise CaseFailure(f"{path}: the data region changed")
    metadata = oracle_metadata(path)
    if metadata != subject.expected:
        raise CaseFailure(f"{path}: valid but neither old nor the expected result: {str(metadata)[:300]}")
    return "new"


def check_final(subject: Subject, stats: Stats) -> None:
    """The subject's result is exactly the expected one, intact, with its mode; the source of -o unchanged."""
    target = subject.result or subject.path
    try:
        metadata = oracle_metadata(target)
    except Exception as exc:
        raise CaseFailure(f"{target}: safetensors rejects the result: {exc}") from None
    if metadata != subject.expected:
        raise CaseFailure(f"{target}: metadata {str(metadata)[:300]} is not the expected {str(subject.expected)[:300]}")
    header = read_header(target)
    table = {n: (t.dtype, tuple(t.shape), tuple(t.data_offsets)) for n, t in header.tensors.items()}
    if table != {n: (t.dtype, tuple(t.shape), tuple(t.data_offsets)) for n, t in subject.blob.tensors.items()}:
        raise CaseFailure(f"{target}: the tensor table changed")
    # An unaligned original stays so only when its header was rewritten in place at the same length (fit).
    if (PREFIX_SIZE + header.header_len) % 8 and (subject.aligned or header.header_len != subject.header_len):
        raise CaseFailure(f"{target}: the data region is not 8-byte aligned")
    if sha256_of(target, header.data_start, stats) != subject.blob.sha:
        raise CaseFailure(f"{target}: the data region changed")
    if subject.result is None and (subject.path.stat().st_mode & 0o7777) != subject.mode:
        raise CaseFailure(f"{target}: mode {subject.path.stat().st_mode & 0o7777:o}, was {subject.mode:o}")
    if subject.result is not None and sha256_of(subject.path, stats=stats) != subject.whole:
        raise CaseFailure(f"{subject.path}: the source of -o changed")
    stats.files_checked += 1


def after_mishap(setup: Setup, injection: Injection, run: Run, stats: Stats) -> None:
    """Check the outcome of the run that had the mishap, and count what happened."""
    check_clean_output(run, "the run with the mishap")
    code = run.returncode
    killed = code in (-signal.SIGKILL, 128 + signal.SIGKILL)
    termed = code in (-signal.SIGTERM, 128 + signal.SIGTERM, -signal.SIGHUP, 128 + signal.SIGHUP)
    double = injection.kind == "double"
    if killed or termed:
        if injection.kind == "error" or injection.kind == "none":
            raise CaseFailure(f"died without being killed: {run.describe()}")
        kinds = {"fault": "fault-step SIGKILL", "kill": "strace SIGKILL", "double": "double fault (2nd: a kill)"}
        stats.crashes[kinds.get(injection.kind, "SIGTERM")] += 1
    elif code == 130:
        if "signal=INT" not in (injection.inject or ""):
            raise CaseFailure(f"exit 130 without an interrupt: {run.describe()}")
        stats.crashes["double fault (2nd: SIGINT)" if double else "SIGINT"] += 1
        if len(run.errors) != 1 or "interrupted" not in run.errors[0]:
            raise CaseFailure(f"an interrupt did not say so in one line: {run.describe()}")
    elif code == 3:
        if injection.kind not in ("error", "double") or not run.injected:
            raise CaseFailure(f"failed without a fault: {run.describe()}")
        stats.faults["double fault (errors)" if double else injection.label.split()[0]] += 1
        failed = [r for r in records(run) if r.get("status") == "failed"]
        if not failed or len(run.errors) != len(failed):
            raise CaseFailure(f"not one error line per failed file: {run.describe()}")
    elif code == 0:
        if injection.kind in ("fault", "kill") and run.injected:
            raise CaseFailure(f"survived a kill: {run.describe()}")
        if injection.kind in ("error", "double") and run.injected:
            stats.faults[f"absorbed {'double fault' if double else injection.label.split()[0]}"] += 1
        for rec in records(run):
            if rec.get("strategy"):
                stats.strategies[str(rec["strategy"])] += 1
                # A fault step on the path the file took must fire (else the fault points test nothing).
                passed = PASSES.get(str(rec["strategy"]), ())
                if injection.fault in passed and len(setup.subjects) == 1:
                    raise CaseFailure(f"passed fault step {injection.fault} without dying: {run.describe()}")
    else:
        raise CaseFailure(f"unexpected exit status: {run.describe()}")
    for subject in setup.subjects:
        if subject.result is None:
            classify(subject, stats)
        else:
            if sha256_of(subject.path, stats=stats) != subject.whole:
                raise CaseFailure(f"{subject.path}: the source of -o changed")
            if subject.result.exists() and (
                not oracle_accepts(subject.result) or oracle_metadata(subject.result) != subject.expected
            ):
                raise CaseFailure(f"{subject.result}: a partial output under the final name")


def run_write_case(
    ws: Workspace,
    case_seed: int,
    *,
    intent: str | None = None,
    inject: Injection | None = None,
    keep: bool = False,
    verbose: bool = False,
) -> Stats:
    """Run one write case (random unless ``intent``/``inject`` are given); return its counts."""
    stats = Stats()
    rng = random.Random(case_seed)
    intent = intent or rng.choices(INTENTS, INTENT_WEIGHTS)[0]
    case_dir = ws.root / f"case-{case_seed}"
    shm_dir = ws.shm / f"case-{case_seed}" if ws.shm is not None else None
    setup = make_setup(ws, rng, intent, case_dir, shm_dir)
    if inject is not None and inject.kind == "double" and setup.backup:  # the call counts assume no backup
        setup.args.remove("--backup")
        setup.backup = False
    injection = inject or choose_injection(ws, rng, setup.intent)
    label = f"case {case_seed}: {setup.intent}, {injection.label}, {len(setup.subjects)} file(s)"
    reproduce = f"python scripts/torture.py --replay {case_seed} --keep"
    if inject is not None:
        how = f"--fault {inject.fault}" if inject.fault else f"--inject {inject.inject}" if inject.inject else ""
        reproduce += f" --intent {setup.intent} {how}"
    stats.cases[setup.intent] += 1
    ok = False
    try:
        try:
            first = run_cli(ws, stats, setup.args, fault=injection.fault, inject=injection.inject)
            if verbose:
                print(f"{label}\n  first run: {first.describe()}")
            after_mishap(setup, injection, first, stats)
            journals = sum(os.path.lexists(splice.journal_path(s.path)) for s in setup.subjects)
            temps = [p for d in setup.dirs for p in d.iterdir() if ".npatch-" in p.name and p.name.endswith(".tmp")]
            rerun = run_cli(ws, stats, setup.args)
            reported = re.findall(r"an interrupted patch was (finished|rolled back|discarded)", rerun.stderr)
            if len(reported) != journals:
                raise CaseFailure(f"{journals} journal(s) left, {len(reported)} recovery reported: {rerun.describe()}")
            stats.recoveries.update(f"journal {what}" for what in reported)
            stats.recoveries["dead temp swept"] += len([p for p in temps if not p.exists()])
            if verbose:
                print(f"  rerun: {rerun.describe()}")
            check_clean_output(rerun, "the rerun")
            if rerun.returncode != 0:
                raise CaseFailure(f"the same command again did not finish the job: {rerun.describe()}")
            for rec in records(rerun):
                if rec.get("strategy"):
                    stats.strategies[str(rec["strategy"])] += 1
            for subject in setup.subjects:
                check_final(subject, stats)
            if leftovers(*setup.dirs):
                raise CaseFailure(f"left behind: {leftovers(*setup.dirs)}")
            for fd in setup.held:  # the process that had the file open still reads its old bytes
                view = hashlib.sha256(plat.pread_exact(fd, os.fstat(fd).st_size, 0)).hexdigest()
                if view != setup.subjects[0].whole:
                    raise CaseFailure("a process holding the file open saw its bytes change")
            if setup.backup:
                check_restore(ws, stats, setup.subjects[0])
            ok = True
        except CaseFailure as exc:
            stats.failures.append(f"{label}: {exc}  [reproduce: {reproduce}]")
        except Exception as exc:  # a crash of the harness itself is a failure too, with its reproducer
            stats.failures.append(f"{label}: harness error {type(exc).__name__}: {exc}  [reproduce: {reproduce}]")
    finally:
        for fd in setup.held:
            os.close(fd)
        if ok and not keep:
            shutil.rmtree(case_dir, ignore_errors=True)
            if shm_dir is not None:
                shutil.rmtree(shm_dir, ignore_errors=True)
    return stats


def check_restore(ws: Workspace, stats: Stats, subject: Subject) -> None:
    """``restore`` brings back the original metadata exactly, on the same data, and removes the backup."""
    run = run_cli(ws, stats, ["restore", str(subject.path)])
    check_clean_output(run, "restore")
    if run.returncode != 0:
        raise CaseFailure(f"restore failed: {run.describe()}")
    metadata = oracle_metadata(subject.path)
    if metadata != subject.original_metadata:
        raise CaseFailure(
            f"restore gave {str(metadata)[:200]}, not the original {str(subject.original_metadata)[:200]}"
        )
    header = read_header(subject.path)
    if sha256_of(subject.path, header.data_start, stats) != subject.blob.sha:
        raise CaseFailure("restore changed the data region")
    if os.path.lexists(splice.backup_path(subject.path)) or leftovers(subject.path.parent):
        raise CaseFailure("restore left files behind")
    stats.restores += 1
    stats.files_checked += 1


# --------------------------------------------------------------------------------------------
# The sweep: every call of every kind, for every strategy


def count_calls(ws: Workspace, intent: str, seed: int) -> Counter[str]:
    """Patch a fresh case cleanly under strace and count its calls of each kind in SWEEP_CALLS."""
    stats = Stats()
    rng = random.Random(seed)
    case_dir = ws.root / f"count-{seed}"
    shm_dir = ws.shm / f"count-{seed}" if ws.shm is not None else None
    setup = make_setup(ws, rng, intent, case_dir, shm_dir)
    log = ws.root / f"count-{seed}.log"
    try:
        argv = ["strace", "-f", "-qq", "-o", str(log), "-e", "trace=" + ",".join(SWEEP_CALLS), *CLI, *setup.args]
        proc = subprocess.run(argv, env=ws.env(), capture_output=True, text=True, timeout=CASE_TIMEOUT, cwd=REPO)
        if proc.returncode != 0:
            raise CaseFailure(f"a clean traced run of {intent} failed: {proc.stderr[-800:]}")
        for subject in setup.subjects:
            check_final(subject, stats)
        return Counter(m.group(1) for m in map(_STRACE_LINE.match, log.read_text().splitlines()) if m)
    finally:
        for fd in setup.held:
            os.close(fd)
        log.unlink(missing_ok=True)
        shutil.rmtree(case_dir, ignore_errors=True)
        if shm_dir is not None:
            shutil.rmtree(shm_dir, ignore_errors=True)


def sweep_cases(ws: Workspace, seed: int) -> Iterator[tuple[str, Injection]]:
    """Yield (intent, injection) for a kill, and an EIO, at every call of every kind, for every strategy."""
    for index, intent in enumerate(SWEEP_INTENTS):
        counts = count_calls(ws, intent, seed * 1000 + index)
        for call in SWEEP_CALLS:
            for when in range(1, counts[call] + 1):
                yield intent, Injection("kill", inject=f"{call}:signal=KILL:when={when}", label=f"kill {call}#{when}")
                yield intent, Injection("error", inject=f"{call}:error=EIO:when={when}", label=f"EIO {call}#{when}")


# --------------------------------------------------------------------------------------------
# Double faults: a first fault makes the writer roll back, a second one hits the rollback

#: The first fault (the write after the journal fails, or Ctrl-C), by the system call it hits; with no backup the
#: in-place paths make pwrite64 #1 journal, #2 new prefix, #3 old prefix (rollback); fsync #1 journal, #2 its folder,
#: #3 the file, #4 after the rollback; fallocate #1 insert, #2 collapse (rollback); unlink #1 the journal.
DOUBLE_FIRST = ("fsync:error=EIO:when=3", "fsync:signal=INT:when=3", "pwrite64:error=EIO:when=2")
#: The second fault, inside the rollback: (system call, which call, what), and the rollback's own fault steps.
DOUBLE_SECOND = {
    "fsync": [("pwrite64", 3), ("fallocate", 2), ("unlink", 1)],
    "pwrite64": [("fsync", 3), ("fallocate", 2), ("unlink", 1)],
}
DOUBLE_WHAT = ("signal=KILL", "signal=INT", "signal=HUP", "signal=TERM", "error=EIO")


def double_fault_cases(ws: Workspace) -> Iterator[tuple[str, Injection]]:
    """Yield (intent, injection) for every pair of a first fault and a second one during the rollback."""
    intents = ("fit", "insert") if ws.insert_ok else ("fit",)
    for intent in intents:
        for first in DOUBLE_FIRST:
            call = first.split(":", 1)[0]
            for second_call, when in DOUBLE_SECOND[call]:
                if second_call == "fallocate" and intent == "fit":
                    continue
                for what in DOUBLE_WHAT:
                    spec = f"{second_call}:{what}:when={when}"
                    label = f"double {first} + {spec}"
                    yield intent, Injection("double", inject=f"{first} & {spec}", label=label)
            for step in splice.ROLLBACK_STEPS:
                if step == "rollback-collapsed" and intent == "fit":
                    continue
                yield intent, Injection("double", fault=step, inject=first, label=f"double {first} + step {step}")


# --------------------------------------------------------------------------------------------
# Hostile files: planted journals, odd auxiliary files and output targets, an append-only folder

HOSTILE_KINDS = (
    "journal-other-user",
    "journal-group-writable",
    "journal-fifo",
    "journal-symlink",
    "journal-swapped-offsets",
    "backup-fifo",
    "backup-foreign",
    "output-device",
    "output-fifo",
    "output-symlink",
    "output-folder",
    "folder-append-only",
)
OTHER_UID = 4242
HOSTILE_TIMEOUT = 60


def _swapped_journal(path: Path) -> bytes:
    """Return a journal of our format, built so that finishing it would swap two same-size tensors."""
    header = read_header(path)
    by_size: dict[tuple[str, int], str] = {}
    tensors = dict(header.tensors)
    for name, info in header.tensors.items():
        key = (info.dtype, info.nbytes)
        if key in by_size and info.nbytes:
            other = by_size[key]
            tensors[name], tensors[other] = tensors[other], tensors[name]
            break
        by_size[key] = name
    evil = serialize(
        {**(header.metadata or {}), "planted": "yes"}, tensors, length=max(header.header_len, 64 * 1024)
    )
    if len(evil) > header.header_len:
        evil = serialize({**(header.metadata or {}), "planted": "yes"}, tensors)
    return splice.plant_journal_for_tests(path, pack_prefix(header.raw), pack_prefix(evil.ljust(header.header_len)))


def run_hostile_case(ws: Workspace, case_seed: int, kind: str, *, keep: bool = False) -> Stats:
    """Plant ``kind`` beside a fresh file; the command must refuse with one line, touching nothing, then work."""
    stats = Stats()
    stats.cases["hostile"] += 1
    rng = random.Random(case_seed)
    is_root = hasattr(os, "geteuid") and os.geteuid() == 0
    if kind in ("journal-other-user", "output-device", "folder-append-only") and not is_root:
        return stats
    case_dir = ws.root / f"hostile-{case_seed}"
    setup = make_setup(ws, rng, "fit", case_dir, None)
    subject = setup.subjects[0]
    path = subject.path
    args = [a for a in setup.args if a != "--backup"]
    planted: Path | None = None
    cleanup: list[Callable[[], None]] = []
    reproduce = f"python scripts/torture.py --replay-hostile {case_seed} --hostile-kind {kind} --keep"
    ok = False
    try:
        try:
            journal = Path(splice.journal_path(path))
            if kind.startswith("journal-") and kind != "journal-swapped-offsets":
                if kind in ("journal-other-user", "journal-group-writable"):
                    crash = run_cli(ws, stats, args, fault="prefix-half")  # a real journal of ours first
                    if crash.returncode not in (-signal.SIGKILL, 128 + signal.SIGKILL):
                        raise CaseFailure(f"the fault step did not fire: {crash.describe()}")
                    if kind == "journal-other-user":
                        os.chown(journal, OTHER_UID, OTHER_UID)
                        cleanup.append(lambda: os.chown(journal, 0, 0))
                    else:
                        journal.chmod(0o660)
                        cleanup.append(lambda: journal.chmod(0o600))
                elif kind == "journal-fifo":
                    os.mkfifo(journal)
                    cleanup.append(journal.unlink)
                else:
                    (case_dir / "elsewhere").write_bytes(b"x")
                    journal.symlink_to(case_dir / "elsewhere")
                    cleanup.append(journal.unlink)
                planted = journal
            elif kind == "journal-swapped-offsets":
                journal.write_bytes(_swapped_journal(path))
                journal.chmod(0o600)
                cleanup.append(journal.unlink)
                planted = journal
            elif kind.startswith("backup-"):
                saved = Path(splice.backup_path(path))
                if kind == "backup-fifo":
                    os.mkfifo(saved)
                else:
                    other = ws.blob("sana-1600m" if subject.preset != "sana-1600m" else "flux.1-dev", SCALES[0])
                    saved.write_bytes(pack_prefix(serialize({"format": "pt"}, other.tensors)))
                cleanup.append(saved.unlink)
                planted = saved
                args.append("--backup")
            elif kind.startswith("output-"):
                out = case_dir / "out.safetensors"
                if kind == "output-device":
                    os.mknod(out, 0o20666, os.makedev(1, 3))
                elif kind == "output-fifo":
                    os.mkfifo(out)
                elif kind == "output-symlink":
                    (case_dir / "target.safetensors").write_bytes(b"someone's file")
                    out.symlink_to(case_dir / "target.safetensors")
                else:  # -o DIR, where DIR/NAME (the name the copy would take) is a folder
                    out = case_dir / "outdir"
                    (out / path.name).mkdir(parents=True)
                planted = out if kind != "output-folder" else out / path.name
                args += ["-o", str(out)]  # with --force (the scaled tables need it): still refused
                cleanup.append(out.unlink if kind != "output-folder" else (out / path.name).rmdir)
            else:  # folder-append-only
                done = subprocess.run(["chattr", "+a", str(path.parent)], capture_output=True, text=True)
                if done.returncode != 0:
                    return stats
                cleanup.append(lambda: subprocess.run(["chattr", "-a", str(path.parent)], check=False))
                planted = path.parent
            before = path.read_bytes()
            listing = sorted(p.name for p in path.parent.iterdir())
            planted_st = planted.lstat()
            try:
                run = run_cli(ws, stats, args, timeout=HOSTILE_TIMEOUT)
            except subprocess.TimeoutExpired:
                raise CaseFailure(f"{kind}: the command hung") from None
            check_clean_output(run, kind)
            if run.returncode != 3 or len(run.errors) != 1:
                raise CaseFailure(f"{kind}: not refused with one error line: {run.describe()}")
            if path.read_bytes() != before:
                raise CaseFailure(f"{kind}: the file changed")
            if sorted(p.name for p in path.parent.iterdir()) != listing:
                raise CaseFailure(f"{kind}: files appeared or vanished beside it")
            after = planted.lstat()
            if (after.st_mode, after.st_ino, after.st_uid) != (
                planted_st.st_mode,
                planted_st.st_ino,
                planted_st.st_uid,
            ):
                raise CaseFailure(f"{kind}: the planted {planted} was replaced")
            if kind == "backup-fifo":  # restore must not hang on it either
                try:
                    restored = run_cli(ws, stats, ["restore", str(path)], timeout=HOSTILE_TIMEOUT)
                except subprocess.TimeoutExpired:
                    raise CaseFailure("restore hung on a FIFO backup") from None
                if restored.returncode != 3 or len(restored.errors) != 1:
                    raise CaseFailure(f"restore of a FIFO backup: {restored.describe()}")
            for undo in reversed(cleanup):
                undo()
            cleanup.clear()
            rerun = run_cli(ws, stats, args)  # the planted file gone (or given back its owner and mode)
            if rerun.returncode != 0:
                raise CaseFailure(f"{kind}: the command failed once the planted file was gone: {rerun.describe()}")
            if kind.startswith("output-"):
                subject.result = case_dir / ("outdir" if kind == "output-folder" else "") / (
                    path.name if kind == "output-folder" else "out.safetensors"
                )
            check_final(subject, stats)
            if leftovers(path.parent, case_dir):
                raise CaseFailure(f"{kind}: left behind {leftovers(path.parent, case_dir)}")
            stats.hostile[kind] += 1
            ok = True
        except CaseFailure as exc:
            stats.failures.append(f"hostile case {case_seed} ({kind}): {exc}  [reproduce: {reproduce}]")
        except Exception as exc:
            stats.failures.append(f"hostile case {case_seed} ({kind}): harness error {exc!r}  [reproduce: {reproduce}]")
    finally:
        for undo in reversed(cleanup):
            with contextlib.suppress(OSError):
                undo()
        if ok and not keep:
            shutil.rmtree(case_dir, ignore_errors=True)
    return stats


# --------------------------------------------------------------------------------------------
# Header cases: random headers against the reference reader


_DTYPES = sorted(DTYPE_BITS)
_BOGUS_DTYPES = ("f32", "bf16", "F128", "", "float32", "I4", "Bool", "U128", "F8_E4M3FN")
_NUMBERS = ("-1", "0", "1", "18446744073709551615", "18446744073709551616", "1e3", "1.0", "9007199254740993", "-0")
_INSERTS = (
    b"{",
    b"}",
    b'"',
    b",",
    b":",
    b"\\",
    b"\x00",
    b" ",
    b"0",
    b"[",
    b"]",
    b"\xef\xbb\xbf",
    b"\n",
    b"\xff",
    b"null",
    b"\\ud800",
)


def random_valid_header(rng: random.Random) -> tuple[str, bytes]:
    """Return (JSON text, data bytes) of a valid file: random tensors, order, metadata and formatting."""
    entries: list[tuple[str, dict[str, Any], int]] = []
    for index in range(rng.randint(0, 6)):
        dtype = rng.choice(_DTYPES)
        bits = DTYPE_BITS[dtype]
        while True:
            shape = [rng.randint(0, 5) for _ in range(rng.randint(0, 3))]
            count = 1
            for dim in shape:
                count *= dim
            if count * bits % 8 == 0:
                break
        name = rng.choice(("w", "b", "x.y", "é", "long_" * 3, "")) + str(index)
        entries.append((name, {"dtype": dtype, "shape": shape}, count * bits // 8))
    order = list(range(len(entries)))
    rng.shuffle(order)  # the data order need not be the JSON order
    position, offsets = 0, {}
    for index in order:
        offsets[index] = (position, position + entries[index][2])
        position += entries[index][2]
    obj: dict[str, Any] = {}
    if rng.random() < 0.7:
        obj["__metadata__"] = random_metadata(rng)
    for index, (name, entry, _) in enumerate(entries):
        fields = {**entry, "data_offsets": list(offsets[index])}
        keys = list(fields)
        rng.shuffle(keys)
        obj[name] = {k: fields[k] for k in keys}
        if rng.random() < 0.1:
            obj[name]["extra"] = rng.choice((1, "x", None, [1]))
    separators = rng.choice(((",", ":"), (", ", ": ")))
    text = json.dumps(obj, separators=separators, ensure_ascii=rng.random() < 0.5)
    text += " " * rng.randint(0, 9)
    return text, rng.randbytes(position)


def mutate(rng: random.Random, text: str, data: bytes) -> bytes:
    """Return file bytes for ``text`` and ``data``, with zero to three random mutations."""
    raw = text.encode("utf-8")
    prefix: bytes | None = None
    for _ in range(rng.choice((0, 1, 1, 2, 3))):
        op = rng.randrange(12)
        if op == 0 and raw:  # flip a byte
            i = rng.randrange(len(raw))
            raw = raw[:i] + bytes([raw[i] ^ (1 << rng.randrange(8))]) + raw[i + 1 :]
        elif op == 1 and raw:
            i = rng.randrange(len(raw))
            raw = raw[:i] + raw[i + 1 :]
        elif op == 2:
            i = rng.randint(0, len(raw))
            raw = raw[:i] + rng.choice(_INSERTS) + raw[i:]
        elif op == 3:
            found = list(re.finditer(rb"-?\d+", raw))
            if found:
                m = rng.choice(found)
                raw = raw[: m.start()] + rng.choice(_NUMBERS).encode() + raw[m.end() :]
        elif op == 4:
            found = list(re.finditer(rb'"dtype": ?"(\w*)"', raw))
            if found:
                m = rng.choice(found)
                raw = raw[: m.start(1)] + rng.choice(_BOGUS_DTYPES).encode() + raw[m.end(1) :]
        elif op == 5:
            prefix = struct.pack("<Q", rng.choice((0, 1, 7, len(raw) - 1, len(raw) + 1, 2**63, 100_000_001, 2**64 - 1)))
        elif op == 6:
            data = data[: rng.randint(0, len(data))] if data else data
        elif op == 7:
            data += rng.randbytes(rng.randint(1, 9))
        elif op == 8:
            raw = rng.choice((b"\xef\xbb\xbf", b" ", b"\n", b"\x00")) + raw
        elif op == 9:
            raw = raw.rstrip() + rng.choice((b"\x00", b"\t", b"\r\n", b",", b"}", b"x"))
        elif op == 10:
            raw = re.sub(
                rb'"__metadata__": ?', rng.choice((b'"__metadata__":null,"__metadata__":', b'"m":')), raw, count=1
            )
        else:
            found = list(re.finditer(rb':("[^"\\]*")', raw))
            if found:
                m = rng.choice(found)
                raw = raw[: m.start(1)] + rng.choice((b"1", b"null", b"[]", b"{}", b"true")) + raw[m.end(1) :]
    return (prefix if prefix is not None else struct.pack("<Q", len(raw))) + raw + data


def run_header_case(ws: Workspace, case_seed: int, *, cli: bool, scratch: Path, keep: bool = False) -> Stats:
    """Compare our reader with safetensors on one random header; optionally give it to the command line."""
    stats = Stats()
    stats.cases["header"] += 1
    rng = random.Random(case_seed)
    text, data = random_valid_header(rng)
    blob = mutate(rng, text, data)
    home = scratch / f"h{case_seed}"
    home.mkdir(parents=True, exist_ok=True)
    path = home / "model.safetensors"
    path.write_bytes(blob)
    reproduce = f"[reproduce: python scripts/torture.py --replay-header {case_seed} --keep]"
    try:
        try:
            parse_file_bytes(blob, source=str(path))
            ours = True
        except HeaderError:
            ours = False
        try:
            read_header(path)
            ours_io = True
        except HeaderError:
            ours_io = False
        theirs = oracle_accepts(path)
        stats.headers += 1
        stats.headers_valid += theirs
        if ours != theirs or ours_io != ours:
            stats.disagreements += 1
            stats.failures.append(
                f"header case {case_seed}: ours {ours} (file {ours_io}), safetensors {theirs}: "
                f"{blob[:160]!r} {reproduce}"
            )
            keep = True
        elif cli:
            problem = hostile_cli(ws, stats, path, blob, theirs)
            if problem:
                keep = True
                stats.failures.append(f"header case {case_seed} on the command line: {problem} {reproduce}")
    finally:
        if not keep:
            shutil.rmtree(home, ignore_errors=True)
    return stats


def hostile_cli(ws: Workspace, stats: Stats, path: Path, blob: bytes, valid: bool) -> str | None:
    """Give a random file to the command line: one error line and the file untouched, or a valid patch."""
    stats.hostile_cli += 1
    run = run_cli(ws, stats, [str(path), "--model", "flux.1-dev", "--force", "--json"])
    if "Traceback" in run.stderr or "internal error" in run.stderr:
        return f"a traceback: {run.describe()}"
    if run.returncode == 3:
        if len(run.errors) != 1:
            return f"not exactly one error line: {run.describe()}"
        if path.read_bytes() != blob:
            return "a refused file was changed"
    elif run.returncode == 0:
        if not valid or not oracle_accepts(path):
            return f"an invalid file was accepted, or a valid one broken: {run.describe()}"
        before = parse_file_bytes(blob)
        after = read_header(path)
        if path.read_bytes()[after.data_start :] != blob[before.data_start :]:
            return "the data region changed"
        if [(n, t.dtype, t.shape, t.data_offsets) for n, t in after.tensors.items()] != [
            (n, t.dtype, t.shape, t.data_offsets) for n, t in before.tensors.items()
        ]:
            return "the tensor table changed"
        stats.bytes_verified += len(blob) - before.data_start
    else:
        return f"exit {run.returncode}: {run.describe()}"
    if leftovers(path.parent):
        return f"left behind {leftovers(path.parent)}"
    stats.files_checked += 1
    return None


# --------------------------------------------------------------------------------------------
# Driver


def make_workspace(args: argparse.Namespace) -> tuple[Workspace, Callable[[], None]]:
    base = Path(args.workdir) if args.workdir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(prefix="npatch-torture-", dir=base))
    shm = None
    if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) and not args.no_tmpfs:
        shm = Path(tempfile.mkdtemp(prefix="npatch-torture-", dir="/dev/shm"))
    ws = Workspace(root, shm)

    def cleanup() -> None:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
            if shm is not None:
                shutil.rmtree(shm, ignore_errors=True)

    return ws, cleanup


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, default=1.0, help="how long to run (default: 1)")
    parser.add_argument("--seed", type=int, default=None, help="seed of the run (default: from the clock)")
    parser.add_argument("--jobs", type=int, default=1, help="cases run at once (default 1; the machine may be shared)")
    parser.add_argument("--sweep", action="store_true", help="first kill and fail at every call of every strategy")
    parser.add_argument("--headers-per-case", type=int, default=25, help="header cases between write cases")
    parser.add_argument("--cli-every", type=int, default=40, help="give every Nth header case to the command line")
    parser.add_argument("--workdir", help="where the files go (default: the temp directory; ext4 for insert)")
    parser.add_argument("--no-tmpfs", action="store_true", help="do not use /dev/shm")
    parser.add_argument("--keep", action="store_true", help="keep every case's files")
    parser.add_argument("--replay", type=int, metavar="CASE", help="run one write case again, verbosely")
    parser.add_argument("--intent", choices=INTENTS, help="with --replay: the setup of a sweep case")
    parser.add_argument("--fault", metavar="STEP", help="with --replay: the fault step of a sweep case")
    parser.add_argument("--inject", metavar="SPEC", help="with --replay: the strace injection of a sweep case")
    parser.add_argument("--replay-header", type=int, metavar="CASE", help="run one header case again")
    parser.add_argument("--replay-hostile", type=int, metavar="CASE", help="run one hostile-file case again")
    parser.add_argument("--hostile-kind", choices=HOSTILE_KINDS, help="with --replay-hostile: what was planted")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args(argv)
    seed = args.seed if args.seed is not None else int(time.time()) % 100_000
    ws, cleanup = make_workspace(args)
    print(
        f"torture: seed {seed}, work in {ws.root}"
        + (f" and {ws.shm}" if ws.shm else "")
        + f"; strace {'on' if ws.strace else 'MISSING: fault steps only'}"
        + f"; insert-range {'on' if ws.insert_ok else 'unavailable'}",
        flush=True,
    )
    total = Stats()
    started = time.monotonic()
    try:
        if args.replay_hostile is not None:
            total.add(run_hostile_case(ws, args.replay_hostile, args.hostile_kind or HOSTILE_KINDS[0], keep=args.keep))
        elif args.replay is not None or args.replay_header is not None:
            if args.replay is not None:
                injection = None
                if args.inject and (" & " in args.inject or args.fault):
                    injection = Injection("double", fault=args.fault, inject=args.inject, label="double fault")
                elif args.fault:
                    injection = Injection("fault", fault=args.fault, label=f"step {args.fault}")
                elif args.inject:
                    kind = "kill" if "signal=KILL" in args.inject else "signal" if "signal=" in args.inject else "error"
                    injection = Injection(kind, inject=args.inject, label=args.inject)
                total.add(
                    run_write_case(ws, args.replay, intent=args.intent, inject=injection, keep=args.keep, verbose=True)
                )
            else:
                scratch = ws.root / "headers"
                scratch.mkdir(exist_ok=True)
                total.add(run_header_case(ws, args.replay_header, cli=True, scratch=scratch, keep=args.keep))
        else:
            run_all(ws, args, seed, total, started)
    except KeyboardInterrupt:
        print("torture: interrupted; figures so far:", flush=True)
    finally:
        elapsed = time.monotonic() - started
        for failure in total.failures:
            print(f"FAILURE {failure}")
        lines = total.summary(seed, elapsed)
        print("\n".join(lines), flush=True)
        if args.json:
            figures = {
                "seed": seed,
                "minutes": round(elapsed / 60, 2),
                "cases": dict(total.cases),
                "crashes": dict(total.crashes),
                "faults": dict(total.faults),
                "recoveries": dict(total.recoveries),
                "restores": total.restores,
                "strategies": dict(total.strategies),
                "files_checked": total.files_checked,
                "bytes_verified": total.bytes_verified,
                "headers": total.headers,
                "disagreements": total.disagreements,
                "cli_runs": total.cli_runs,
                "failures": total.failures,
            }
            Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
        if args.keep or total.failures:
            print(f"torture: files kept in {ws.root}" + (f" and {ws.shm}" if ws.shm else ""))
        if not total.failures:
            cleanup()
    return 1 if total.failures else 0


def run_all(ws: Workspace, args: argparse.Namespace, seed: int, total: Stats, started: float) -> None:
    """Run the sweep (if asked), then random cases until the time is up."""
    deadline = started + args.minutes * 60
    scratch = (ws.shm or ws.root) / "headers"
    scratch.mkdir(exist_ok=True)
    last_report = started

    def work() -> Iterator[Callable[[], Stats]]:
        index = 0
        if args.sweep and ws.strace:
            for kind in HOSTILE_KINDS:
                index += 1
                yield lambda s=seed * 1_000_000 + index, k=kind: run_hostile_case(ws, s, k, keep=args.keep)
            for intent, injection in [*double_fault_cases(ws), *sweep_cases(ws, seed)]:
                index += 1
                case_seed = seed * 1_000_000 + index
                yield lambda s=case_seed, i=intent, j=injection: run_write_case(
                    ws, s, intent=i, inject=j, keep=args.keep
                )
        while True:
            index += 1
            case_seed = seed * 1_000_000 + index
            yield lambda s=case_seed: run_write_case(ws, s, keep=args.keep)
            if random.Random(case_seed).random() < 0.2:
                kind = HOSTILE_KINDS[index % len(HOSTILE_KINDS)]
                yield lambda s=case_seed, k=kind: run_hostile_case(ws, s, k, keep=args.keep)
            for h in range(args.headers_per_case):
                header_seed = case_seed * 100 + h
                cli = args.cli_every > 0 and random.Random(-header_seed).random() < 1 / args.cli_every
                yield lambda s=header_seed, c=cli: run_header_case(ws, s, cli=c, scratch=scratch, keep=args.keep)

    source = work()
    with ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        running: set[Future[Stats]] = set()
        while True:
            while len(running) < max(1, args.jobs) and time.monotonic() < deadline:
                running.add(pool.submit(next(source)))
            if not running:
                break
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                total.add(future.result())
            now = time.monotonic()
            if now - last_report > 30:
                last_report = now
                print(
                    f"  {(now - started) / 60:.1f} min: {sum(total.cases.values()):,} cases, "
                    f"{sum(total.crashes.values()):,} crashes, {sum(total.faults.values()):,} faults, "
                    f"{total.disagreements} disagreements, {len(total.failures)} failures",
                    flush=True,
                )


if __name__ == "__main__":
    sys.exit(main())
