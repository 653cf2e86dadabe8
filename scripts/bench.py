#!/usr/bin/env python3
"""Benchmark nunchaku-patch against what users do today: copy the file, or load every tensor and save it again.

Builds a FLUX.1-dev int4 r32 conversion without metadata (the real 2,604-tensor table, random data bytes), then
measures, interleaved over rounds, the CLI end to end (insert, fit and copy paths), the splice alone through the
Python API, ``cp`` and a load-everything-and-save baseline, with the peak RSS of every child process. Then the
scaling points: header parse time against tensor count, patch time against file size (sparse files) and a batch
of 100 files through one CLI call. Prints a markdown table and writes the results as JSON.

    .venv/bin/python scripts/bench.py                      # full size (6.8 GB), 5 rounds
    .venv/bin/python scripts/bench.py --quick              # smoke run, well under a minute
    .venv/bin/python scripts/bench.py --cold --with-torch --profile --json bench-results/full.json

Linux only (the growth path needs fallocate insert-range: ext4 or XFS). Nothing here is a runtime dependency.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import hashlib
import io
import json
import mmap
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench-results"
TORCH_VENV = RESULTS / "torch-venv"
TORCH_REQUIREMENT = "torch==2.13.0"
MODEL = "flux.1-dev"
SMALL_SCALE = 0.1
#: Width scale giving a FLUX-shaped table of about 1 GB (data size grows with the square of the scale).
ONE_GB_SCALE = 0.384
GB = 10**9
MIB = 1024 * 1024
HASH_CHUNK = 16 * MIB
BATCH_FILES = 100
#: Files of the --quick batch (the 5 s target is scaled to it).
QUICK_BATCH_FILES = 20
#: Files of the profiled batch (--profile).
PROFILE_BATCH_FILES = 20
PARSE_COUNTS = (100, 1_000, 2_604, 10_000, 20_000, 100_000)
#: Tensors of the large-header case (issue 12: patched in at most 64 MiB, parse + plan linear).
LARGE_HEADER_TENSORS = 20_000
#: File sizes of the picture (GB): the patch is measured at each (sparse files); cp and load + save_file
#: with real bytes at the sizes the disk and memory allow, then extended at their measured throughput.
PLOT_SIZES_GB = (1, 7, 30)
#: Seconds of repeated parsing per tensor count (at least 3 repeats, at most 50).
PARSE_BUDGET = 0.5
#: Fresh processes per tensor count for the one-shot parse + plan (what one CLI call does).
FRESH_PARSES = 7
#: The one-shot child: read the header bytes, time parse + plan once, print both.
_FRESH_PARSE = """
import sys, time
from patcher.header import parse_header
from patcher.plan import PatchOptions, Planner
planner = Planner(PatchOptions(model=sys.argv[3], force=True), log=lambda _line: None)
planner.prepare()
with open(sys.argv[1], "rb") as handle:
    raw = handle.read()
start = time.perf_counter()
header = parse_header(raw, int(sys.argv[2]))
middle = time.perf_counter()
planner.plan("scaling.safetensors", header)
end = time.perf_counter()
print(middle - start, end - middle)
"""
SCHEMA = 1

# --------------------------------------------------------------------------------------------
# Targets of issue 12 (shown next to the numbers, never asserted by tests)

#: The whole CLI patch, warm, at most this many times `python -c "import click"` (the floor of a click CLI).
TARGET_CLICK_RATIO = 2.0
#: The whole CLI patch, cold, at least this many times faster than `cp` of the file.
TARGET_COLD_SPEEDUP = 60.0
#: 100 FLUX.1-dev-sized files in one call (quiet machine).
TARGET_BATCH_S = 1.5
#: Peak RSS of any CLI patch, the 20,000-tensor header included.
TARGET_RSS_MIB = 64.0
#: Parse + plan per tensor at 20,000 tensors, relative to 2,604 (1.0 is exactly linear).
TARGET_LINEAR = 1.25
#: Throughput of -o and merge relative to `cp` + `sync` of the same bytes.
TARGET_COPY_RATIO = 0.9

# --------------------------------------------------------------------------------------------
# Child programs. Each prints one JSON line: the time of the operation measured inside the child.

_API_WORKER = """
import json, sys, time
args = json.loads(sys.argv[1])
from patcher.splice import Strategy, write_metadata
with open(args["metadata"], encoding="utf-8") as f:
    metadata = json.load(f)
strategy = Strategy(args["strategy"]) if args["strategy"] else None
if args["preload"]:
    import numpy, safetensors  # what the reference-reader check imports on first use
start = time.perf_counter()
result = write_metadata(args["path"], metadata, strategy=strategy)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": seconds, "strategy": result.strategy.value, "changed": result.changed}))
"""

# Baseline B as users write it: every tensor loaded into memory, then saved again with the metadata.
_RESAVE_TORCH = """
import json, sys, time
args = json.loads(sys.argv[1])
with open(args["metadata"], encoding="utf-8") as f:
    metadata = json.load(f)
start = time.perf_counter()
from safetensors.torch import load_file, save_file
tensors = load_file(args["src"])
save_file(tensors, args["dst"], metadata=metadata)
print(json.dumps({"seconds": time.perf_counter() - start, "tensors": len(tensors)}))
"""

# numpy has no bfloat16, so safetensors.numpy.load_file refuses BF16 files: this does what it does (map the
# file, copy every tensor into its own array) with a 16-bit storage type, and saves through the same
# serializer save_file uses, under the original dtype names. Same memory profile: every tensor held at once.
_RESAVE_NUMPY = """
import json, mmap, sys, time
args = json.loads(sys.argv[1])
with open(args["metadata"], encoding="utf-8") as f:
    metadata = json.load(f)
start = time.perf_counter()
import numpy as np
from safetensors import TensorSpec, serialize_file
TYPES = {
    "BF16": ("uint16", "bfloat16"), "F16": ("float16", "float16"), "F32": ("float32", "float32"),
    "F64": ("float64", "float64"), "I8": ("int8", "int8"), "U8": ("uint8", "uint8"), "I16": ("int16", "int16"),
    "U16": ("uint16", "uint16"), "I32": ("int32", "int32"), "U32": ("uint32", "uint32"),
    "I64": ("int64", "int64"), "U64": ("uint64", "uint64"), "BOOL": ("bool", "bool"),
    "F8_E4M3": ("uint8", "float8_e4m3fn"), "F8_E5M2": ("uint8", "float8_e5m2"),
}
with open(args["src"], "rb") as f:
    n = int.from_bytes(f.read(8), "little")
    header = json.loads(f.read(n))
    mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
base = 8 + n
arrays = {}
for name, info in header.items():
    if name == "__metadata__":
        continue
    storage, dtype = TYPES[info["dtype"]]
    begin, end = info["data_offsets"]
    count = (end - begin) // np.dtype(storage).itemsize
    view = np.frombuffer(mapped, dtype=storage, count=count, offset=base + begin)
    arrays[name] = (view.reshape(info["shape"]).copy(), dtype)
    del view
specs = {
    name: TensorSpec(dtype=dtype, shape=list(a.shape), data_ptr=a.ctypes.data, data_len=a.nbytes)
    for name, (a, dtype) in arrays.items()
}
serialize_file(specs, args["dst"], metadata=metadata)
print(json.dumps({"seconds": time.perf_counter() - start, "tensors": len(arrays)}))
"""


_WARM_IMPORTS = "import patcher.cli, patcher.splice, patcher.synth, numpy, safetensors, huggingface_hub.file_download"
_RESAVE_IMPORTS = {True: "import safetensors.torch", False: "import numpy, safetensors"}


class BenchError(Exception):
    """A benchmark step that cannot go on (one line for the user, no traceback)."""


def note(text: str) -> None:
    """Print a progress line to stderr."""
    print(f"[bench] {text}", file=sys.stderr, flush=True)


# --------------------------------------------------------------------------------------------
# Running children: wall time and the peak RSS of that one child (os.wait4 reports it per process)


@dataclass(frozen=True)
class Sample:
    """One run of one child process."""

    wall: float
    maxrss_kib: int
    returncode: int
    stdout: str
    stderr: str

    @property
    def rss_mib(self) -> float:
        """Return the peak resident set size in MiB."""
        return self.maxrss_kib / 1024


# Peak RSS must come from a small parent: a child's ru_maxrss starts at the RSS of the process that forked it
# (the kernel keeps the high-water mark of the copied address space across exec), so a wait4 from this process
# would report at least this process's own size. GNU time (a few MB) or a bare `python -S` reports it instead.
_RSS_WRAPPER = """
import os, sys
pid = os.posix_spawnp(sys.argv[2], sys.argv[2:], os.environ)
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as f:
    f.write(str(usage.ru_maxrss))
code = os.waitstatus_to_exitcode(status)
sys.exit(code if code >= 0 else 128 - code)
"""
_rss_tool: list[str] = []
#: Environment of every measured child (set by :func:`use_bytecode_cache`); None: this process's own.
CHILD_ENV: dict[str, str] | None = None


def use_bytecode_cache(prefix: Path) -> None:
    """Let the children cache bytecode under ``prefix``, as an installed package has its .pyc files.

    With PYTHONDONTWRITEBYTECODE set (as in some sandboxes and CI), every CLI start would compile the patcher
    sources again; a pip-installed wheel never does. The prefix keeps the cache out of the source tree.
    """
    global CHILD_ENV
    env = {key: value for key, value in os.environ.items() if key != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(prefix)
    CHILD_ENV = env


def rss_tool() -> list[str]:
    """Return the wrapper that reports a child's peak RSS (GNU time if it works, else a bare Python)."""
    if not _rss_tool:
        gnu = shutil.which("time") or "/usr/bin/time"
        with tempfile.NamedTemporaryFile("r", suffix=".rss") as probe:
            done = subprocess.run([gnu, "-f", "%M", "-o", probe.name, "true"], capture_output=True, check=False)
            works = done.returncode == 0 and probe.read().strip().isdigit()
        _rss_tool.extend([gnu, "-f", "%M", "-o"] if works else [sys.executable, "-S", "-c", _RSS_WRAPPER])
    return _rss_tool


def run_child(argv: Sequence[str]) -> Sample:
    """Run ``argv`` to completion; return its wall time and its own peak RSS (descendants included)."""
    with (
        tempfile.TemporaryFile() as out,
        tempfile.TemporaryFile() as err,
        tempfile.NamedTemporaryFile("r", suffix=".rss") as rss,
    ):
        start = time.perf_counter()
        proc = subprocess.Popen(
            [*rss_tool(), rss.name, *argv], stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=CHILD_ENV
        )
        code = proc.wait()
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        # GNU time puts "Command exited with non-zero status N" before the number when the child failed.
        lines = rss.read().split()
        return Sample(
            wall,
            int(lines[-1]) if lines and lines[-1].isdigit() else 0,
            code,
            out.read().decode("utf-8", "replace"),
            err.read().decode("utf-8", "replace"),
        )


def checked(sample: Sample, what: str) -> Sample:
    """Return ``sample`` if the child succeeded; raise with the tail of its stderr otherwise."""
    if sample.returncode != 0:
        tail = " | ".join(sample.stderr.strip().splitlines()[-3:])
        raise BenchError(f"{what} failed (exit {sample.returncode}): {tail}")
    return sample


def json_lines(text: str) -> list[dict[str, Any]]:
    """Return the JSON objects printed one per line (other lines ignored)."""
    records = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            records.append(json.loads(line))
    return records


def cli_command() -> list[str]:
    """Return how to start the CLI: the venv's console script if present, else ``python -m patcher``."""
    script = Path(sys.executable).with_name("nunchaku-patch")
    if script.is_file() and os.access(script, os.X_OK):
        return [str(script)]
    return [sys.executable, "-m", "patcher"]


# --------------------------------------------------------------------------------------------
# Caches


def drop_caches() -> bool:
    """Flush dirty pages and drop the page cache (root only); return whether the kernel accepted it."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w", encoding="ascii") as f:
            f.write("3\n")
    except OSError:
        return False
    return True


@dataclass
class Caches:
    """Bring the machine to the same state before every measurement: dirty pages written, caches dropped if cold."""

    cold: bool

    def settle(self, source: Path | None = None) -> None:
        """Flush earlier writes (their writeback must not land in the next timing); drop caches when cold.

        Warm: read ``source`` through first. Resetting a header with insert/collapse-range drops the file's
        page cache, so without this some rows would read from disk and others from memory.
        """
        if self.cold:
            drop_caches()
            return
        os.sync()
        if source is not None:
            read_through(source)

    @property
    def label(self) -> str:
        """Return how the caches were before each measurement."""
        if self.cold:
            return "cold (sync + drop_caches before every measurement)"
        return "warm (sync, then the source file read into the page cache, before every measurement)"


def read_through(path: Path) -> None:
    """Read a whole file once so that it sits in the page cache."""
    buffer = bytearray(HASH_CHUNK)
    with open(path, "rb", buffering=0) as f:
        while f.readinto(buffer):
            pass


# --------------------------------------------------------------------------------------------
# Bench files and their header states


def fsync_path(path: Path) -> None:
    """Flush one file to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def data_digest(path: Path) -> str:
    """Return the sha256 of the data region of a safetensors file (everything after the header)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n)
        while chunk := f.read(HASH_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def tensor_digest(path: Path) -> str:
    """Return a sha256 over every tensor's name and bytes in name order (independent of the data layout)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
            for name in sorted(header):
                begin, end = header[name]["data_offsets"]
                digest.update(name.encode("utf-8"))
                digest.update(mapped[8 + n + begin : 8 + n + end])
    return digest.hexdigest()


def header_prefix_len(path: Path) -> int:
    """Return 8 + N, where the data region of ``path`` starts."""
    with open(path, "rb") as f:
        return 8 + int.from_bytes(f.read(8), "little")


class BenchFile:
    """A synthetic conversion whose header is switched between states without touching its data region.

    ``tight``: the header as written (no metadata, no spare room): patching it takes the growth path.
    ``roomy``: no metadata, but as long as the patched header: patching it takes the fit path.
    Switching inserts or collapses whole blocks at offset 0 (fallocate), the exact inverse of the insert path.
    """

    def __init__(self, path: Path, tensors: Mapping[str, Any]) -> None:
        from patcher import _platform as plat
        from patcher.header import read_header

        self.path = path
        self.tensors = dict(tensors)
        self.block = plat.block_size(str(path))
        header = read_header(path)
        with open(path, "rb") as f:
            self.tight_prefix = f.read(header.data_start)
        self.roomy_prefix: bytes | None = None

    @property
    def data_start(self) -> int:
        """Return where the data region starts in the tight state."""
        return len(self.tight_prefix)

    def learn_growth(self, patched_prefix_len: int) -> None:
        """Remember how long a patched header is, so :meth:`roomy` makes room for exactly that."""
        from patcher.header import pack_prefix, serialize_header

        self.roomy_prefix = pack_prefix(serialize_header(None, self.tensors, length=patched_prefix_len - 8))

    def set_prefix(self, prefix: bytes) -> None:
        """Shift the data region so it starts at ``len(prefix)``, then write ``prefix`` in front of it."""
        from patcher import _platform as plat

        fd = os.open(self.path, os.O_RDWR)
        try:
            current = 8 + int.from_bytes(os.pread(fd, 8, 0), "little")
            delta = len(prefix) - current
            if delta % self.block:
                raise BenchError(f"{self.path}: the data region moved by {delta} bytes, not whole blocks")
            if delta > 0 and not plat.insert_range(fd, 0, delta):
                raise BenchError(f"{self.path}: insert-range unsupported here (ext4 or XFS needed)")
            if delta < 0 and not plat.collapse_range(fd, 0, -delta):
                raise BenchError(f"{self.path}: collapse-range unsupported here (ext4 or XFS needed)")
            plat.pwrite_all(fd, prefix, 0)
            os.fsync(fd)
        finally:
            os.close(fd)

    def tight(self) -> None:
        """Put the file back as it was built: no metadata, tight header."""
        self.set_prefix(self.tight_prefix)

    def roomy(self) -> None:
        """Make the file metadata-free with enough spare header for the patch to fit."""
        if self.roomy_prefix is None:
            raise BenchError("the patched header length is not known yet")
        self.set_prefix(self.roomy_prefix)

    def strip(self) -> None:
        """Remove the metadata keeping the header length (any state: used after the copy path)."""
        from patcher.header import pack_prefix, serialize_header

        current = header_prefix_len(self.path)
        self.set_prefix(pack_prefix(serialize_header(None, self.tensors, length=current - 8)))

    def metadata(self) -> Mapping[str, str] | None:
        """Return the metadata the file has now."""
        from patcher.header import read_header

        return read_header(self.path).metadata


def build_tensors(scale: float, *, extra_bytes: int = 0) -> dict[str, Any]:
    """Return a FLUX.1-dev int4 r32 tensor table at ``scale``, optionally followed by one ballast tensor."""
    from patcher import synth
    from patcher.header import TensorInfo

    tensors = synth.table_to_tensors(synth.build_table(synth.preset(MODEL, scale=scale)))
    if extra_bytes > 0:
        end = synth.data_size(tensors)
        # One U8 tensor past the real ones makes a 30 GB file with the same table (the CLI ignores it).
        tensors["bench_ballast"] = TensorInfo("U8", (extra_bytes,), (end, end + extra_bytes))
    return tensors


# --------------------------------------------------------------------------------------------
# Statistics and formatting


def summary(values: Sequence[float]) -> dict[str, float]:
    """Return median, min and max."""
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def fmt_time(seconds: float) -> str:
    """Format a duration with a unit that keeps 3 significant digits."""
    if seconds < 0.001:
        return f"{seconds * 1e6:.0f} µs"
    if seconds < 1:
        return f"{seconds * 1e3:.3g} ms"
    return f"{seconds:.2f} s"


def fmt_bytes(size: float) -> str:
    """Format a byte count in decimal units."""
    for unit, factor in (("GB", GB), ("MB", 10**6), ("kB", 10**3)):
        if size >= factor:
            return f"{size / factor:.2f} {unit}"
    return f"{size:.0f} B"


def md_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Render a markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# The main comparison on one file


@dataclass
class Method:
    """One row of the main table: how to prepare the file, what to run, what the child should report."""

    id: str
    label: str
    timed: str
    prepare: Callable[[], None]
    argv: Callable[[], list[str]]
    after: Callable[[], None] = lambda: None
    #: "wall": the child's wall time; "inner": the time the child reports for the operation alone.
    measure: str = "wall"
    #: Strategy the patch must have taken (checked on every sample), or None.
    strategy: str | None = None
    #: Bytes moved, for a throughput column (copy-like rows).
    moved: int = 0
    #: The file the method reads (kept in the page cache before each warm measurement).
    source: Path | None = None
    #: Drop the page cache before each measurement even in a warm run (the cold rows of a warm run).
    cold: bool = False
    samples: list[dict[str, Any]] = field(default_factory=list)

    def record(self, sample: Sample) -> None:
        """Check and store one sample."""
        checked(sample, self.label)
        reported = json_lines(sample.stdout)
        entry: dict[str, Any] = {"wall": sample.wall, "maxrss_kib": sample.maxrss_kib}
        if reported:
            last = reported[-1]
            if "seconds" in last:
                entry["inner"] = last["seconds"]
            if "strategy" in last:
                entry["strategy"] = last["strategy"]
            if last.get("status") not in (None, "patched", "merged"):
                raise BenchError(f"{self.label}: the CLI reported {last.get('status')}: {last.get('error')}")
        if self.strategy is not None and entry.get("strategy") != self.strategy:
            raise BenchError(f"{self.label}: expected the {self.strategy} path, got {entry.get('strategy')}")
        entry["seconds"] = entry["inner"] if self.measure == "inner" else sample.wall
        self.samples.append(entry)

    def result(self) -> dict[str, Any]:
        """Return the row as JSON: samples and their summary."""
        seconds = summary([s["seconds"] for s in self.samples])
        rss = [s["maxrss_kib"] / 1024 for s in self.samples]
        out: dict[str, Any] = {
            "id": self.id,
            "label": self.label,
            "timed": self.timed,
            "strategy": self.strategy,
            "seconds": seconds,
            "rss_mib": summary(rss),
            "samples": self.samples,
        }
        if self.moved:
            out["throughput_gb_s"] = self.moved / seconds["median"] / GB
        if self.measure == "inner":
            out["process_wall"] = summary([s["wall"] for s in self.samples])
        return out


@dataclass
class Setup:
    """Everything the measurements share."""

    work: Path
    cli: list[str]
    cli_extra: list[str]
    caches: Caches
    rounds: int
    resave_python: str
    resave_kind: str
    load: list[tuple[float, float, float]] = field(default_factory=list)
    #: Whether the page cache can be dropped (root): the cold rows of a warm run need it.
    can_drop: bool = False

    def cli_argv(self, *paths: str, output: str | None = None) -> list[str]:
        """Return the CLI command that patches ``paths`` for FLUX.1-dev with one JSON record per file."""
        # No -q: the command as users type it (click imports difflib to parse any short option), plus --json.
        argv = [*self.cli, *paths, "--model", MODEL, *self.cli_extra, "--json"]
        return [*argv, "-o", output] if output is not None else argv

    def sample_load(self) -> None:
        """Remember the load average now (the machine is shared)."""
        self.load.append(os.getloadavg())


def api_argv(path: Path, metadata_file: Path, strategy: str | None, *, preload: bool = False) -> list[str]:
    """Return a child running ``write_metadata`` once and reporting the time of that call alone."""
    args = {"path": str(path), "metadata": str(metadata_file), "strategy": strategy, "preload": preload}
    return [sys.executable, "-c", _API_WORKER, json.dumps(args)]


def remove(path: Path) -> None:
    """Delete a file if present."""
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def main_comparison(setup: Setup, main: BenchFile, spare: BenchFile, metadata_file: Path, folder: Path) -> list[Method]:
    """Measure every method on ``main`` (``spare`` takes the in-place copy, ``folder`` the merge), interleaved."""
    out = setup.work / "out.safetensors"
    size = main.path.stat().st_size
    folder_bytes = sum(f.stat().st_size for f in folder.iterdir())
    merge_argv = [*setup.cli, "merge", str(folder), *setup.cli_extra, "--model", MODEL, "--json", "-o", str(out)]
    resave = _RESAVE_TORCH if setup.resave_kind.startswith("safetensors.torch") else _RESAVE_NUMPY
    resave_args = json.dumps({"src": str(main.path), "dst": str(out), "metadata": str(metadata_file)})

    def drop_out() -> None:
        remove(out)

    def before_resave() -> None:
        main.tight()
        drop_out()
        enough_memory(main.path.stat().st_size)

    methods = [
        Method("floor-pass", "floor: python -c pass", "process", lambda: None, lambda: [sys.executable, "-c", "pass"]),
        Method(
            "floor-click",
            'floor: python -c "import click" (any click CLI)',
            "process",
            lambda: None,
            lambda: [sys.executable, "-c", "import click"],
        ),
        Method(
            "cli-insert",
            "nunchaku-patch, growth path (insert)",
            "process, start to exit",
            main.tight,
            lambda: setup.cli_argv(str(main.path)),
            strategy="insert",
        ),
        Method(
            "cli-fit",
            "nunchaku-patch, fit path",
            "process, start to exit",
            main.roomy,
            lambda: setup.cli_argv(str(main.path)),
            strategy="fit",
        ),
        Method(
            "cli-output",
            "nunchaku-patch -o (patched copy)",
            "process, start to exit",
            main.tight,
            lambda: setup.cli_argv(str(main.path), output=str(out)),
            after=drop_out,
            strategy="output",
            moved=size,
        ),
        Method(
            "cli-merge",
            "nunchaku-patch merge (deepcompressor folder -> one file)",
            "process, start to exit",
            drop_out,
            lambda: merge_argv,
            after=drop_out,
            strategy="merge",
            moved=folder_bytes,
            source=folder / "transformer_blocks.safetensors",
        ),
        Method(
            "api-copy",
            "copy path in place (API, strategy=COPY)",
            "process, start to exit",
            spare.strip,
            lambda: api_argv(spare.path, metadata_file, "copy"),
            strategy="copy",
            moved=size,
            source=spare.path,
        ),
        Method(
            "api-insert",
            "splice alone: write_metadata, insert",
            "the call, in a fresh process",
            main.tight,
            lambda: api_argv(main.path, metadata_file, None),
            measure="inner",
            strategy="insert",
        ),
        Method(
            "api-fit",
            "splice alone: write_metadata, fit",
            "the call, in a fresh process",
            main.roomy,
            lambda: api_argv(main.path, metadata_file, None),
            measure="inner",
            strategy="fit",
        ),
        Method(
            "api-insert-preloaded",
            "splice alone, insert, numpy + safetensors preloaded",
            "the call, in a fresh process",
            main.tight,
            lambda: api_argv(main.path, metadata_file, None, preload=True),
            measure="inner",
            strategy="insert",
        ),
        Method(
            "api-fit-preloaded",
            "splice alone, fit, numpy + safetensors preloaded",
            "the call, in a fresh process",
            main.roomy,
            lambda: api_argv(main.path, metadata_file, None, preload=True),
            measure="inner",
            strategy="fit",
        ),
        Method(
            "cp",
            "baseline A: cp",
            "process",
            drop_out,
            lambda: ["cp", str(main.path), str(out)],
            after=drop_out,
            moved=size,
        ),
        Method(
            "cp-sync",
            "baseline A': cp, then sync the copy",
            "process",
            drop_out,
            lambda: ["sh", "-c", 'cp "$1" "$2" && sync "$2"', "sh", str(main.path), str(out)],
            after=drop_out,
            moved=size,
        ),
        *(
            [
                Method(
                    "cli-insert-cold",
                    "nunchaku-patch, growth path, cold caches",
                    "process, start to exit",
                    main.tight,
                    lambda: setup.cli_argv(str(main.path)),
                    strategy="insert",
                    cold=True,
                ),
                Method(
                    "cp-cold",
                    "baseline A: cp, cold caches",
                    "process",
                    drop_out,
                    lambda: ["cp", str(main.path), str(out)],
                    after=drop_out,
                    moved=size,
                    cold=True,
                ),
            ]
            if setup.can_drop and not setup.caches.cold
            else []
        ),
        Method(
            "resave",
            f"baseline B: load all tensors + save_file ({setup.resave_kind})",
            "process, start to exit",
            before_resave,
            lambda: [setup.resave_python, "-c", resave, resave_args],
            after=drop_out,
        ),
    ]
    expected_digest: list[str] = []  # the source's tensor digest, computed when first needed
    for round_index in range(setup.rounds):
        setup.sample_load()
        shift = round_index % len(methods)
        for method in methods[shift:] + methods[:shift]:
            note(f"round {round_index + 1}/{setup.rounds}: {method.id}")
            method.prepare()
            if method.cold:
                drop_caches()
            else:
                setup.caches.settle(method.source or main.path)
            method.record(run_child(method.argv()))
            if round_index == 0 and method.id in ("cli-output", "resave"):
                verify_output(out, main, expected_digest)
            method.after()
    setup.sample_load()
    return methods


def enough_memory(file_size: int) -> None:
    """Refuse to start baseline B when it would push the shared machine into the OOM killer."""
    available = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="ascii") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
    # Every tensor is copied into memory while the mapped file pages are read: about 1.2x the file, plus slack.
    needed = int(1.2 * file_size) + GB
    if available is not None and available < needed:
        raise BenchError(
            f"baseline B needs about {fmt_bytes(needed)} of memory and {fmt_bytes(available)} is available; "
            "wait for other jobs to finish or run --size small"
        )


def verify_output(out: Path, main: BenchFile, expected_digest: list[str]) -> None:
    """Check a rewritten copy with the reference reader: metadata present, same tensors, same tensor bytes."""
    from safetensors import safe_open

    with safe_open(str(out), framework="np") as handle:
        if not handle.metadata() or "model_class" not in handle.metadata():
            raise BenchError(f"{out}: the rewritten copy has no Nunchaku metadata")
        if len(list(handle.keys())) != len(main.tensors):
            raise BenchError(f"{out}: the rewritten copy has a different tensor count")
    if not expected_digest:
        expected_digest.append(tensor_digest(main.path))
    if tensor_digest(out) != expected_digest[0]:
        raise BenchError(f"{out}: the rewritten copy's tensor bytes differ from the source's")


# --------------------------------------------------------------------------------------------
# Scaling


def parse_scaling(counts: Sequence[int]) -> list[dict[str, Any]]:
    """Time ``parse_header`` (parse + validate), then planning the patch, on headers with ``counts`` tensors."""
    from patcher import synth
    from patcher.header import parse_header, serialize_header
    from patcher.plan import PatchOptions, Planner

    planner = Planner(PatchOptions(model=MODEL, force=True), log=lambda _line: None)
    planner.prepare()

    largest = max(counts)
    singles = 38 + max(0, largest - 2_604) // 34 + 1  # a FLUX single block has 34 tensors
    table = synth.table_to_tensors(synth.build_table(synth.preset(MODEL, num_single_layers=singles)))
    real = synth.flux_dev_int4_r32()
    rows = []
    for count in counts:
        # The real table for the 2,604 point; otherwise the first `count` entries of a FLUX table with more blocks.
        if count == len(real):
            tensors = real
        else:
            tensors = synth.table_to_tensors(
                {name: (info.dtype, info.shape) for name, info in list(table.items())[:count]}
            )
        raw = serialize_header(None, tensors)
        file_size = 8 + len(raw) + synth.data_size(tensors)
        parse_times: list[float] = []
        json_times: list[float] = []
        plan_times: list[float] = []
        spent = 0.0
        while len(parse_times) < 3 or (spent < PARSE_BUDGET and len(parse_times) < 50):
            start = time.perf_counter()
            header = parse_header(raw, file_size)
            middle = time.perf_counter()
            json.loads(raw)
            end = time.perf_counter()
            planner.plan(f"{count}.safetensors", header)
            planned = time.perf_counter()
            parse_times.append(middle - start)
            json_times.append(end - middle)
            plan_times.append(planned - end)
            spent += planned - start
        if len(header.tensors) != count:
            raise BenchError(f"parse scaling: built {len(header.tensors)} tensors, wanted {count}")
        fresh = fresh_parse(raw, file_size)
        rows.append(
            {
                "tensors": count,
                "header_bytes": len(raw),
                "repeats": len(parse_times),
                "best_s": min(parse_times),
                "median_s": statistics.median(parse_times),
                "json_loads_best_s": min(json_times),
                "plan_best_s": min(plan_times),
                "fresh_parse_s": statistics.median(parse for parse, _ in fresh),
                "fresh_plan_s": statistics.median(plan for _, plan in fresh),
                "fresh_total_s": statistics.median(parse + plan for parse, plan in fresh),
            }
        )
        note(f"parse {count:,} tensors: best {fmt_time(min(parse_times))}")
    return rows


def fresh_parse(raw: bytes, file_size: int) -> list[tuple[float, float]]:
    """Time parse + plan of ``raw`` once in each of :data:`FRESH_PARSES` new processes (as one CLI call does).

    Repeating the parse in one process keeps a small table's objects in the CPU caches and its memory arenas
    allocated from one repeat to the next, which a large table's do not survive: the best of repeats favours the
    small header. A fresh process pays for both sizes alike.
    """
    times = []
    with tempfile.NamedTemporaryFile("wb", suffix=".header") as handle:
        handle.write(raw)
        handle.flush()
        for _ in range(FRESH_PARSES):
            done = subprocess.run(
                [sys.executable, "-c", _FRESH_PARSE, handle.name, str(file_size), MODEL],
                capture_output=True,
                text=True,
                check=False,
                env=CHILD_ENV,
            )
            if done.returncode != 0:
                raise BenchError(f"fresh parse: {done.stderr.strip()[-300:]}")
            parse, plan = (float(value) for value in done.stdout.split())
            times.append((parse, plan))
    return times


def size_scaling(setup: Setup, sizes_gb: Sequence[int], metadata_file: Path) -> list[dict[str, Any]]:
    """Time the insert path (API and CLI) on sparse files of ``sizes_gb`` GB: the cost must not follow the size."""
    from patcher import synth

    files: list[tuple[int, BenchFile, bool]] = []
    for size in sizes_gb:
        if size <= 1:
            tensors = build_tensors(ONE_GB_SCALE)
            forced = True  # scaled widths do not match FLUX.1-dev's config
        else:
            tensors = build_tensors(1.0)
            extra = size * GB - synth.data_size(tensors)
            if extra > 0 and size > 7:
                tensors = build_tensors(1.0, extra_bytes=extra)
            forced = False
        path = setup.work / f"sparse-{size}gb.safetensors"
        synth.write_sparse(path, tensors)
        files.append((size, BenchFile(path, tensors), forced))
    cli_samples: dict[int, list[Sample]] = {size: [] for size, _, _ in files}
    api_samples: dict[int, list[float]] = {size: [] for size, _, _ in files}
    for round_index in range(setup.rounds):
        order = files[round_index % len(files) :] + files[: round_index % len(files)]
        for size, bench_file, forced in order:
            note(f"size scaling round {round_index + 1}/{setup.rounds}: {size} GB")
            force = ["--force"] if forced and "--force" not in setup.cli_extra else []
            bench_file.tight()
            setup.caches.settle()
            sample = checked(run_child([*setup.cli_argv(str(bench_file.path)), *force]), f"CLI on {size} GB")
            record = json_lines(sample.stdout)[-1]
            if record.get("strategy") != "insert":
                raise BenchError(f"CLI on {size} GB: expected insert, got {record.get('strategy')}")
            cli_samples[size].append(sample)
            bench_file.tight()
            setup.caches.settle()
            sample = checked(run_child(api_argv(bench_file.path, metadata_file, None)), f"API on {size} GB")
            api_samples[size].append(json_lines(sample.stdout)[-1]["seconds"])
    rows = []
    for size, bench_file, forced in files:
        rows.append(
            {
                "size_gb": size,
                "file_bytes": bench_file.path.stat().st_size,
                "tensors": len(bench_file.tensors),
                "cli_forced": forced,
                "api_insert_s": summary(api_samples[size]),
                "cli_insert_s": summary([s.wall for s in cli_samples[size]]),
                "cli_rss_mib": summary([s.rss_mib for s in cli_samples[size]]),
            }
        )
        remove(bench_file.path)
    return rows


def batch(setup: Setup, rounds: int, count: int) -> dict[str, Any]:
    """Patch ``count`` FLUX.1-dev-sized sparse files (the real table, 6.8 GB each) with one CLI call."""
    from patcher import synth

    folder = setup.work / "batch"
    folder.mkdir()
    tensors = build_tensors(1.0)
    files = []
    for index in range(count):
        path = folder / f"svdq-int4_r32-{index:03d}.safetensors"
        synth.write_sparse(path, tensors)
        files.append(BenchFile(path, tensors))
    samples = []
    for round_index in range(rounds):
        note(f"batch round {round_index + 1}/{rounds}: {count} files")
        for bench_file in files:
            bench_file.tight()
        setup.caches.settle()
        sample = checked(run_child(setup.cli_argv(str(folder))), "CLI batch")
        records = json_lines(sample.stdout)
        patched = [r for r in records if r.get("status") == "patched"]
        if len(patched) != count:
            raise BenchError(f"CLI batch: {len(patched)} of {count} files patched")
        samples.append(sample)
    file_bytes = files[0].path.stat().st_size
    shutil.rmtree(folder)
    return {
        "files": count,
        "file_bytes": file_bytes,
        "tensors_per_file": len(tensors),
        "seconds": summary([s.wall for s in samples]),
        "rss_mib": summary([s.rss_mib for s in samples]),
        "per_file_s": statistics.median(s.wall for s in samples) / count,
    }


def large_header(setup: Setup, tensors_wanted: int) -> dict[str, Any]:
    """Patch a sparse file with a ``tensors_wanted``-tensor header (FLUX blocks repeated) through the CLI."""
    from patcher import synth
    from patcher.header import read_header

    singles = 38 + max(0, tensors_wanted - 2_604) // 34 + 1
    table = synth.build_table(synth.preset(MODEL, num_single_layers=singles))
    tensors = synth.table_to_tensors(dict(list(table.items())[:tensors_wanted]))
    path = setup.work / "large-header.safetensors"
    synth.write_sparse(path, tensors)
    bench_file = BenchFile(path, tensors)
    samples = []
    for round_index in range(setup.rounds):
        note(f"large header round {round_index + 1}/{setup.rounds}: {len(tensors):,} tensors")
        bench_file.tight()
        setup.caches.settle()
        # --force: a FLUX.1-dev config does not describe hundreds of single blocks.
        sample = checked(run_child([*setup.cli_argv(str(path)), "--force"]), "CLI on the large header")
        if json_lines(sample.stdout)[-1].get("status") != "patched":
            raise BenchError(f"CLI on the large header: {sample.stdout.strip()[-300:]}")
        samples.append(sample)
    header_bytes = read_header(path).header_len
    remove(path)
    return {
        "tensors": len(tensors),
        "header_bytes": header_bytes,
        "seconds": summary([s.wall for s in samples]),
        "rss_mib": summary([s.rss_mib for s in samples]),
    }


def copy_points(setup: Setup, metadata_file: Path, scale: float, seed: int) -> dict[str, Any]:
    """Time ``cp`` and load + save_file on a second, smaller file of real bytes (a second point for the picture)."""
    from patcher import synth

    tensors = build_tensors(scale)
    path = setup.work / "copy-point.safetensors"
    out = setup.work / "copy-point-out.safetensors"
    synth.write_random(path, tensors, seed=seed + 7)
    fsync_path(path)
    resave = _RESAVE_TORCH if setup.resave_kind.startswith("safetensors.torch") else _RESAVE_NUMPY
    args = json.dumps({"src": str(path), "dst": str(out), "metadata": str(metadata_file)})
    cp_times, resave_times = [], []
    for round_index in range(setup.rounds):
        note(f"second size point round {round_index + 1}/{setup.rounds}: cp and load + save_file")
        for argv, times in (
            (["cp", str(path), str(out)], cp_times),
            ([setup.resave_python, "-c", resave, args], resave_times),
        ):
            remove(out)
            setup.caches.settle(path)
            times.append(checked(run_child(argv), argv[0]).wall)
    size = path.stat().st_size
    remove(out)
    remove(path)
    return {"file_bytes": size, "cp_s": summary(cp_times), "resave_s": summary(resave_times)}


# --------------------------------------------------------------------------------------------
# Profile: what bounds the CLI's end-to-end time


def best_wall(argv: Sequence[str], repeats: int = 5) -> float:
    """Return the best wall time of ``repeats`` runs of ``argv``."""
    return min(checked(run_child(argv), " ".join(argv[:2])).wall for _ in range(repeats))


def best_wall_uncached(argv: Sequence[str], repeats: int = 5) -> float | None:
    """Return the best wall time of ``argv`` with the project compiled from source at every start, if it is."""
    global CHILD_ENV
    if (REPO / "patcher" / "__pycache__").is_dir():
        return None  # the project has a bytecode cache beside its sources: nothing to compare
    saved = CHILD_ENV
    CHILD_ENV = {key: value for key, value in os.environ.items() if key != "PYTHONPYCACHEPREFIX"}
    CHILD_ENV["PYTHONDONTWRITEBYTECODE"] = "1"
    try:
        return best_wall(argv, repeats)
    finally:
        CHILD_ENV = saved


def profile_cli(setup: Setup, target: BenchFile) -> dict[str, Any]:
    """Break the CLI's time down: interpreter start, imports (``-X importtime``), then cProfile of a patch."""
    import pstats

    py = sys.executable
    startup = {
        "python -S -c pass": best_wall([py, "-S", "-c", "pass"]),
        "python -c pass": best_wall([py, "-c", "pass"]),
        "python -c 'import patcher.cli'": best_wall([py, "-c", "import patcher.cli"]),
        "python -c 'import patcher.cli', patcher compiled from source (PYTHONDONTWRITEBYTECODE=1)": (
            best_wall_uncached([py, "-c", "import patcher.cli"])
        ),
        "python -c 'import numpy'": best_wall([py, "-c", "import numpy"]),
        "python -c 'import huggingface_hub.file_download'": best_wall(
            [py, "-c", "import huggingface_hub.file_download"]
        ),
        "nunchaku-patch --version": best_wall([*setup.cli, "--version"]),
    }
    patch = ["-m", "patcher", str(target.path), "--model", MODEL, "-q", *setup.cli_extra]
    target.tight()
    imports = checked(run_child([py, "-X", "importtime", *patch]), "importtime run")
    modules: list[dict[str, Any]] = []
    for line in imports.stderr.splitlines():
        found = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| ( *)(\S+)", line)
        if found:
            own, total, indent, name = found.groups()
            modules.append(
                {"module": name, "self_us": int(own), "cumulative_us": int(total), "depth": len(indent) // 2}
            )
    top_level = sorted((m for m in modules if m["depth"] == 0), key=lambda m: -m["cumulative_us"])
    by_self = sorted(modules, key=lambda m: -m["self_us"])[:15]
    all_imports = sum(m["cumulative_us"] for m in top_level)

    prof = setup.work / "cli.prof"
    target.tight()
    checked(run_child([py, "-m", "cProfile", "-o", str(prof), *patch]), "cProfile run")
    stream = io.StringIO()
    pstats.Stats(str(prof), stream=stream).sort_stats("cumulative").print_stats(150)
    cumulative = _pstats_rows(stream.getvalue(), 25)
    remove(prof)

    # The batch: per-file costs once the imports are paid.
    folder = setup.work / "profile-batch"
    folder.mkdir()
    from patcher import synth

    tensors = build_tensors(SMALL_SCALE)
    for index in range(PROFILE_BATCH_FILES):
        synth.write_sparse(folder / f"f{index:03d}.safetensors", tensors)
    batch_prof = setup.work / "batch.prof"
    argv = [py, "-m", "cProfile", "-o", str(batch_prof), "-m", "patcher", str(folder), "--model", MODEL, "--force"]
    checked(run_child([*argv, "-q"]), "cProfile batch run")
    stream = io.StringIO()
    stats = pstats.Stats(str(batch_prof), stream=stream)
    stats.sort_stats("tottime").print_stats(15)
    per_file = _per_file_costs(stats, PROFILE_BATCH_FILES)
    batch_tottime = _pstats_rows(stream.getvalue(), 15)
    remove(batch_prof)
    shutil.rmtree(folder)
    return {
        "startup_best_s": startup,
        "imports_total_us": all_imports,
        "imports_top_level": top_level[:15],
        "imports_by_self": by_self,
        "cprofile_cumulative": cumulative,
        "batch_files": PROFILE_BATCH_FILES,
        "batch_per_file": per_file,
        "batch_tottime": batch_tottime,
    }


# Frames that only say "an import or the click dispatch is running": hidden from the cumulative listing.
_PSTATS_NOISE = re.compile(
    r"<frozen |builtins\.exec\}|builtins\.__import__\}|click/core\.py|<string>:1|__main__\.py|runpy"
)


def _pstats_rows(text: str, limit: int) -> str:
    """Keep the header line of a pstats listing and its first ``limit`` informative rows."""
    body = text.splitlines()
    start = next((i for i, line in enumerate(body) if line.strip().startswith("ncalls")), 0)
    rows = [line.rstrip() for line in body[start + 1 :] if line.strip() and not _PSTATS_NOISE.search(line)]
    return "\n".join([body[start].rstrip(), *rows[:limit]])


#: What a patch repeats per file: (label, function name as pstats keys it, file the function is in or "").
_PER_FILE = (
    ("fsync", "<built-in method posix.fsync>", ""),
    ("unlink", "<built-in method posix.unlink>", ""),
    ("parse_header", "parse_header", "header.py"),
    ("serialize_header", "serialize_header", "header.py"),
    ("safetensors check (_oracle)", "_oracle", "splice.py"),
    ("inference and plan (Planner.plan)", "plan", "plan.py"),
    ("write_metadata", "write_metadata", "splice.py"),
    ("whole patch of one file (_patch_one)", "_patch_one", "patch.py"),
)


def _per_file_costs(stats: Any, files: int) -> list[dict[str, Any]]:
    """Return calls and cumulative seconds per file of the functions a batch repeats."""
    rows = []
    for label, function, filename in _PER_FILE:
        calls, seconds = 0, 0.0
        for (path, _, name), (_, ncalls, _, cumulative, _) in stats.stats.items():
            if name == function and path.endswith(filename):
                calls += ncalls
                seconds += cumulative
        rows.append({"what": label, "calls_per_file": calls / files, "seconds_per_file": seconds / files})
    return rows


# --------------------------------------------------------------------------------------------
# Machine and environment


def machine_info(work: Path) -> dict[str, Any]:
    """Return what the numbers depend on: CPU, memory, kernel, filesystem, versions."""
    from importlib import metadata as md

    from patcher import _platform as plat

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    memory = None
    with contextlib.suppress(OSError, ValueError), open("/proc/meminfo", encoding="utf-8") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                memory = int(line.split()[1]) * 1024
                break
    versions = {}
    for package in ("nunchaku-patch", "safetensors", "numpy", "click"):
        with contextlib.suppress(md.PackageNotFoundError):
            versions[package] = md.version(package)
    return {
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_bytes": memory,
        "kernel": platform.release(),
        "os": platform.platform(terse=True),
        "python": platform.python_version(),
        "filesystem": plat.filesystem_type(str(work)),
        "block_size": plat.block_size(str(work)),
        "versions": versions,
    }


def ensure_torch_venv() -> str:
    """Create (once) bench-results/torch-venv with torch and safetensors; return its python."""
    from importlib import metadata as md

    python = TORCH_VENV / "bin" / "python"
    probe = [str(python), "-c", "import torch, safetensors.torch"]
    if python.exists() and run_child(probe).returncode == 0:
        return str(python)
    note(f"creating {TORCH_VENV} with {TORCH_REQUIREMENT} (benchmark only, never a runtime dependency)")
    subprocess.run([sys.executable, "-m", "venv", str(TORCH_VENV)], check=True)
    wanted = [TORCH_REQUIREMENT, f"safetensors=={md.version('safetensors')}", "numpy"]
    done = subprocess.run([str(python), "-m", "pip", "install", "-q", *wanted], check=False)
    if done.returncode != 0 or run_child(probe).returncode != 0:
        raise BenchError(f"could not install {TORCH_REQUIREMENT} into {TORCH_VENV}; run without --with-torch")
    return str(python)


def torch_version(python: str) -> str:
    """Return the torch version of an interpreter."""
    sample = checked(run_child([python, "-c", "import torch; print(torch.__version__)"]), "torch version")
    return sample.stdout.strip()


# --------------------------------------------------------------------------------------------
# Targets


def target(name: str, measured: float | None, threshold: float, unit: str, higher_is_better: bool) -> dict[str, Any]:
    """Return one target line: measured value, threshold and whether it passed."""
    passed = None if measured is None else (measured >= threshold if higher_is_better else measured <= threshold)
    return {
        "target": name,
        "measured": measured,
        "threshold": threshold,
        "unit": unit,
        "higher_is_better": higher_is_better,
        "passed": passed,
    }


def evaluate(results: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Compare the results with the targets of issue 12."""
    rows = {row["id"]: row for row in results["rows"]}
    cold_run = results["config"]["cold"]
    mode = "cold" if cold_run else "warm"

    def median(row_id: str) -> float:
        value: float = rows[row_id]["seconds"]["median"]
        return value

    targets = [
        # 1. One file, end to end: warm against the click floor, cold against cp.
        target(
            f'CLI patch ({mode}) / python -c "import click" ({mode}), same run',
            median("cli-insert") / median("floor-click"),
            TARGET_CLICK_RATIO,
            "x",
            False,
        )
    ]
    cold_cli, cold_cp = ("cli-insert", "cp") if cold_run else ("cli-insert-cold", "cp-cold")
    if cold_cli in rows:
        targets.append(
            target(
                "CLI patch (cold): times faster than cp (cold)",
                median(cold_cp) / median(cold_cli),
                TARGET_COLD_SPEEDUP,
                "x",
                True,
            )
        )
    # 2. The batch (the target is for 100 files; a smaller smoke batch gets the same time per file).
    batch_row = results.get("batch")
    if batch_row:
        files = batch_row["files"]
        wanted = TARGET_BATCH_S * files / BATCH_FILES
        targets.append(
            target(
                f"batch of {files} FLUX.1-dev-sized files, one CLI call",
                batch_row["seconds"]["median"],
                wanted,
                "s",
                False,
            )
        )
    # 3. Scale: parse + plan linear in the tensor count, the large header patched in bounded memory.
    parse = {row["tensors"]: row for row in results.get("parse_scaling") or []}
    if 2_604 in parse and LARGE_HEADER_TENSORS in parse:

        # One-shot in a fresh process, as the CLI parses (results of older runs: the in-process best).
        def per_tensor(row: Mapping[str, Any]) -> float:
            total = row.get("fresh_total_s", row["best_s"] + row["plan_best_s"])
            value: float = total / row["tensors"]
            return value

        targets.append(
            target(
                f"parse + plan per tensor, once in a fresh process, {LARGE_HEADER_TENSORS:,} vs 2,604 tensors",
                per_tensor(parse[LARGE_HEADER_TENSORS]) / per_tensor(parse[2_604]),
                TARGET_LINEAR,
                "x",
                False,
            )
        )
    large = results.get("large_header")
    if large:
        targets.append(
            target(
                f"CLI peak RSS, {large['tensors']:,}-tensor header",
                large["rss_mib"]["max"],
                TARGET_RSS_MIB,
                "MiB",
                False,
            )
        )
    cli_rss = [rows[r]["rss_mib"]["max"] for r in ("cli-insert", "cli-fit", "cli-output", "cli-merge")]
    cli_rss += [row["cli_rss_mib"]["max"] for row in results.get("size_scaling") or []]
    if batch_row:
        cli_rss.append(batch_row["rss_mib"]["max"])
    targets.append(target("CLI peak RSS, any file size (max)", max(cli_rss), TARGET_RSS_MIB, "MiB", False))
    # 4. Copies against cp + sync of the same bytes.
    for copy in ("cli-output", "cli-merge"):
        targets.append(
            target(
                f"{rows[copy]['label']}: throughput vs cp + sync",
                rows[copy]["throughput_gb_s"] / rows["cp-sync"]["throughput_gb_s"],
                TARGET_COPY_RATIO,
                "x",
                True,
            )
        )
    return targets


# --------------------------------------------------------------------------------------------
# Report


def fmt_value(value: float | None, unit: str) -> str:
    """Format a target's measured value or threshold."""
    if value is None:
        return "not measured"
    if unit == "s":
        return fmt_time(value)
    if unit == "x":
        return f"{value:,.2f}x" if value < 10 else f"{value:,.1f}x"
    return f"{value:.1f} {unit}"


def render(results: Mapping[str, Any]) -> str:
    """Render the results as markdown."""
    cfg, machine = results["config"], results["machine"]
    rows = {row["id"]: row for row in results["rows"]}
    cp = rows["cp"]["seconds"]["median"]
    out = [f"## nunchaku-patch benchmark ({cfg['size']}: {fmt_bytes(cfg['file_bytes'])}, {cfg['tensors']:,} tensors)"]
    out.append("")
    memory = machine["memory_bytes"]
    out.append(
        f"Machine: {machine['cpu']}, {machine['cpus']} CPUs, "
        f"{fmt_bytes(memory) if memory else '? memory'} RAM, Linux {machine['kernel']}, "
        f"{machine['filesystem']} (block {machine['block_size']}), Python {machine['python']}, "
        f"safetensors {machine['versions'].get('safetensors', '?')}."
    )
    loads = results["load"]
    out.append(
        f"Load average (1 min) during the run: {loads['min']:.2f} to {loads['max']:.2f} "
        f"(the machine was shared with other jobs). Caches: {cfg['cache']}. Rounds: {cfg['rounds']}, "
        "interleaved (each round runs every method once, order rotated). Python bytecode: cached, as after "
        "`pip install`."
    )
    out.append(f"Command: `{results['command']}`")
    out.append("")
    table = []
    for row in results["rows"]:
        seconds, rss = row["seconds"], row["rss_mib"]
        throughput = f"{row['throughput_gb_s']:.2f} GB/s" if "throughput_gb_s" in row else ""
        table.append(
            [
                row["label"],
                row["timed"],
                fmt_time(seconds["median"]),
                f"{fmt_time(seconds['min'])} – {fmt_time(seconds['max'])}",
                f"{rss['median']:.1f} MiB" + (f" (max {rss['max']:.1f})" if rss["max"] - rss["median"] > 0.5 else ""),
                f"{cp / seconds['median']:,.1f}x",
                throughput,
            ]
        )
    out.append(md_table(["Method", "Timed", "Median", "Min – max", "Peak RSS", "Speed vs cp", "Throughput"], table))
    out.append("")
    out.append(
        f"Peak RSS is each child's own `ru_maxrss` ({cfg['rss_tool']}). The splice-alone rows time the "
        "`write_metadata` call inside a fresh process (the preloaded rows import numpy and safetensors first, as the "
        "result check would); their RSS is that whole process. Copy-path rows fsync their result; `cp` does not."
    )
    if cfg["baseline_b"].startswith("numpy"):
        out.append(
            "Baseline B without torch: numpy has no bfloat16, so `safetensors.numpy.load_file` refuses these files; "
            "the child maps the file, copies every tensor into a numpy array (BF16 as 16-bit storage) and saves "
            "them with the serializer `save_file` uses: the same work and memory profile as `load_file` + `save_file`."
        )
    out.append("")
    out.append("### Targets (issue 12)")
    out.append("")
    verdicts = {True: "pass", False: "**MISS**", None: "not measured"}
    lines = []
    for item in results["targets"]:
        sign = ">=" if item["higher_is_better"] else "<="
        lines.append(
            [
                item["target"],
                fmt_value(item["measured"], item["unit"]),
                f"{sign} {fmt_value(item['threshold'], item['unit'])}",
                verdicts[item["passed"]],
            ]
        )
    out.append(md_table(["Target", "Measured", "Wanted", "Result"], lines))
    if cfg["size"] != "full":
        out.append("")
        out.append(f"(Targets are defined on the 6.8 GB file; this run used the {cfg['size']} file.)")
    if results.get("parse_scaling"):
        out.append("")
        out.append("### Header parse + validate vs tensor count (`parse_header` on bytes)")
        out.append("")
        parse_rows = [
            [
                f"{row['tensors']:,}",
                fmt_bytes(row["header_bytes"]),
                fmt_time(row["best_s"]),
                fmt_time(row["median_s"]),
                f"{row['best_s'] / row['tensors'] * 1e6:.2f} µs",
                fmt_time(row["json_loads_best_s"]),
                fmt_time(row["plan_best_s"]),
                f"{(row['best_s'] + row['plan_best_s']) / row['tensors'] * 1e6:.2f} µs",
                f"{row['fresh_total_s'] / row['tensors'] * 1e6:.2f} µs" if "fresh_total_s" in row else "",
            ]
            for row in results["parse_scaling"]
        ]
        out.append(
            md_table(
                [
                    "Tensors",
                    "Header",
                    "Parse best",
                    "Parse median",
                    "Parse per tensor",
                    "json.loads alone (best)",
                    "Plan (best)",
                    "Parse + plan per tensor",
                    "Same, once in a fresh process (median)",
                ],
                parse_rows,
            )
        )
    if results.get("size_scaling"):
        out.append("")
        out.append("### Growth path vs file size (sparse files, same 2,604-tensor table)")
        out.append("")
        size_rows = [
            [
                fmt_bytes(row["file_bytes"]),
                f"{row['tensors']:,}",
                fmt_time(row["api_insert_s"]["median"]),
                fmt_time(row["cli_insert_s"]["median"]),
                f"{row['cli_rss_mib']['max']:.1f} MiB",
            ]
            for row in results["size_scaling"]
        ]
        out.append(md_table(["File", "Tensors", "Splice alone (API)", "CLI end to end", "CLI peak RSS"], size_rows))
        out.append("")
        out.append(
            "The 1 GB point is the same table at 0.384 width (CLI run with `--force`: its widths are not "
            "FLUX.1-dev's); the 30 GB point adds one U8 ballast tensor."
        )
    if results.get("batch"):
        b = results["batch"]
        out.append("")
        out.append(
            f"Batch: {b['files']} sparse files of {fmt_bytes(b['file_bytes'] or 0)} ({b['tensors_per_file']:,} "
            f"tensors each) through one `nunchaku-patch DIR` call: median {fmt_time(b['seconds']['median'])} "
            f"(min {fmt_time(b['seconds']['min'])}, max {fmt_time(b['seconds']['max'])}), "
            f"{fmt_time(b['per_file_s'])} per file, peak RSS {b['rss_mib']['max']:.1f} MiB."
        )
    if results.get("large_header"):
        large = results["large_header"]
        out.append("")
        out.append(
            f"Large header: a sparse file with {large['tensors']:,} tensors ({fmt_bytes(large['header_bytes'])} of "
            f"header) patched by the CLI (`--force`): median {fmt_time(large['seconds']['median'])}, peak RSS "
            f"{large['rss_mib']['max']:.1f} MiB."
        )
    if results.get("copy_points"):
        point = results["copy_points"]
        out.append("")
        out.append(
            f"Second size point (real bytes, {fmt_bytes(point['file_bytes'])}): "
            f"cp {fmt_time(point['cp_s']['median'])}, load + save_file {fmt_time(point['resave_s']['median'])}."
        )
    integrity = results["integrity"]
    out.append("")
    out.append(
        "Data region of the bench files after every patch: "
        + ", ".join(f"{name} {'intact' if item['intact'] else 'CHANGED'}" for name, item in integrity.items())
        + " (sha256 before and after)."
    )
    if results.get("profile"):
        out.append("")
        out.append(render_profile(results["profile"]))
    return "\n".join(out) + "\n"


def render_profile(profile: Mapping[str, Any]) -> str:
    """Render the CLI profile as markdown."""
    out = ["### Where the CLI's time goes", ""]
    out.append(
        md_table(
            ["Start-up step (best of 5)", "Wall"],
            [[k, fmt_time(v)] for k, v in profile["startup_best_s"].items() if v is not None],
        )
    )
    out.append("")
    total = profile["imports_total_us"]
    out.append(f"Imports during one CLI patch (`python -X importtime -m patcher FILE ...`): {total / 1000:.1f} ms.")
    out.append("")
    out.append(
        md_table(
            ["Top-level import", "Cumulative", "Self"],
            [
                [m["module"], f"{m['cumulative_us'] / 1000:.1f} ms", f"{m['self_us'] / 1000:.1f} ms"]
                for m in profile["imports_top_level"][:12]
            ],
        )
    )
    out.append("")
    out.append("cProfile of one CLI patch (growth path), by cumulative time (import and click frames hidden):")
    out.append("")
    out.append("```")
    out.append(profile["cprofile_cumulative"])
    out.append("```")
    out.append("")
    out.append(f"cProfile of a batch of {profile['batch_files']} files in one CLI call, per file (under cProfile):")
    out.append("")
    out.append(
        md_table(
            ["Step", "Calls per file", "Time per file"],
            [
                [row["what"], f"{row['calls_per_file']:.1f}", fmt_time(row["seconds_per_file"])]
                for row in profile["batch_per_file"]
            ],
        )
    )
    return "\n".join(out)


# --------------------------------------------------------------------------------------------
# Picture


def plot(results: Mapping[str, Any], path: Path) -> None:
    """Draw time against file size on log-log axes: the patch, cp, and load + save_file, from one run.

    The patch is measured at every size (sparse files: its cost follows the header, not the data). cp and
    load + save_file are measured with real bytes at two sizes and extended to the largest size at the
    throughput measured on the larger file (dashed): 30 GB of real bytes, twice, does not fit the machine.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise BenchError("--plot needs matplotlib: pip install '.[bench]'") from None
    rows = {row["id"]: row for row in results["rows"]}
    cfg = results["config"]
    sizes = [row["file_bytes"] / GB for row in results["size_scaling"]]
    patch = [row["cli_insert_s"]["median"] for row in results["size_scaling"]]
    largest = max([*sizes, cfg["file_bytes"] / GB])
    matplotlib.rcParams["svg.hashsalt"] = "nunchaku-patch"  # stable ids: the file changes only with the data
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    ax.plot(sizes, patch, "o-", color="tab:green", label="nunchaku-patch FILE (whole CLI run)")
    points = results.get("copy_points") or {}
    for key, row_id, label, color in (
        ("cp_s", "cp", "cp FILE COPY", "tab:blue"),
        ("resave_s", "resave", "load all tensors + save_file", "tab:red"),
    ):
        measured = sorted(
            [(cfg["file_bytes"] / GB, rows[row_id]["seconds"]["median"])]
            + ([(points["file_bytes"] / GB, points[key]["median"])] if points else [])
        )
        xs, ys = zip(*measured, strict=True)
        ax.plot(xs, ys, "o-", color=color, label=f"{label} (measured)")
        rate = xs[-1] / ys[-1]  # GB per second on the larger file
        ax.plot([xs[-1], largest], [ys[-1], largest / rate], "--", color=color, label=f"{label} (at that rate)")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("file size (GB)")
    ax.set_ylabel("time (s)")
    ax.set_xticks([1, 2, 5, 10, 20, 30])
    ax.set_xticklabels(["1", "2", "5", "10", "20", "30"])
    ax.grid(True, which="both", alpha=0.3)
    caches = "cold caches" if cfg["cold"] else "warm caches"
    ax.set_title(f"Adding the metadata to a FLUX.1-dev SVDQuant file ({caches}, medians)", fontsize=10)
    ax.legend(fontsize=8, loc="upper left")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".svg":
        fig.savefig(path, format="svg", metadata={"Date": None})  # no date: the same data, the same file
    else:
        fig.savefig(path, dpi=110)
    plt.close(fig)
    note(f"picture written to {path}")


# --------------------------------------------------------------------------------------------
# Main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Parse the command line."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--dir", type=Path, default=None, help="parent of the work folder (default: bench-results/)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder and its files")
    parser.add_argument("--size", choices=("full", "small"), default=None, help="full: 6.8 GB; small: 0.1 width")
    parser.add_argument("--rounds", type=int, default=None, help="rounds of the interleaved comparison (default 5)")
    parser.add_argument("--quick", action="store_true", help="smoke run: small, 2 rounds, no 30 GB, no torch")
    parser.add_argument("--json", type=Path, default=None, help="write the results here (default: bench-results/)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before every measurement (root)")
    parser.add_argument("--with-torch", action="store_true", help="baseline B with safetensors.torch (own venv)")
    parser.add_argument("--profile", action="store_true", help="break the CLI's time down (importtime, cProfile)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tensor bytes")
    parser.add_argument("--plot", type=Path, default=None, help="draw time vs file size as SVG here (matplotlib)")
    parser.add_argument("--replot", type=Path, default=None, help="redraw --plot from this results JSON, run nothing")
    args = parser.parse_args(argv)
    if args.replot and not args.plot:
        parser.error("--replot needs --plot OUT")
    if args.quick:
        args.size = args.size or "small"
        args.rounds = args.rounds or 2
        if args.with_torch:
            parser.error("--quick skips the torch baseline; drop --with-torch")
    args.size = args.size or "full"
    args.rounds = args.rounds or 5
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    return args


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Run the whole benchmark and return the results."""
    from patcher import _platform as plat
    from patcher import synth

    if not plat.IS_LINUX:
        raise BenchError("the benchmark needs Linux (fallocate insert-range for the growth path)")
    parent = (args.dir or RESULTS).resolve()
    parent.mkdir(parents=True, exist_ok=True)
    if not plat.insert_range_likely(str(parent)):
        raise BenchError(f"{parent} is on {plat.filesystem_type(str(parent))}: the growth path needs ext4 or XFS")
    scale = 1.0 if args.size == "full" else SMALL_SCALE
    tensors = build_tensors(scale)
    data_bytes = synth.data_size(tensors)
    # The bench file, its copy for the in-place copy path, the merge folder, and one transient copy at a time.
    needed = 4 * data_bytes + 2 * GB
    free = shutil.disk_usage(parent).free
    if free < needed:
        raise BenchError(f"{parent}: {fmt_bytes(free)} free, the benchmark needs about {fmt_bytes(needed)}")
    cold = args.cold and drop_caches()
    if args.cold and not cold:
        note("cannot drop the page cache here (not root?): measuring with warm caches")
    caches = Caches(cold)

    resave_python, resave_kind = sys.executable, "numpy arrays, safetensors serializer"
    if args.with_torch:
        resave_python = ensure_torch_venv()
        resave_kind = f"safetensors.torch, torch {torch_version(resave_python)}"

    work = Path(tempfile.mkdtemp(prefix="work-", dir=parent))
    note(f"work folder {work}")
    started = dt.datetime.now(dt.timezone.utc)
    use_bytecode_cache(work / "pycache")
    try:
        # Fill the bytecode cache before anything is timed (a pip install compiles it the same way).
        checked(run_child([sys.executable, "-c", _WARM_IMPORTS]), "bytecode warm-up")
        checked(run_child([resave_python, "-c", _RESAVE_IMPORTS[args.with_torch]]), "bytecode warm-up")
        setup = Setup(
            work=work,
            cli=cli_command(),
            cli_extra=[] if args.size == "full" else ["--force"],  # scaled widths contradict FLUX.1-dev's config
            caches=caches,
            rounds=args.rounds,
            resave_python=resave_python,
            resave_kind=resave_kind,
            can_drop=drop_caches(),
        )
        setup.sample_load()
        main_path = work / "svdq-int4_r32-flux.1-dev.safetensors"
        note(f"writing {fmt_bytes(8 + data_bytes)} of random tensor bytes to {main_path.name}")
        synth.write_random(main_path, tensors, seed=args.seed)
        fsync_path(main_path)
        bench = BenchFile(main_path, tensors)
        note("hashing the data region")
        digest = data_digest(main_path)

        # One untimed patch: learns the metadata the CLI writes and how long the patched header is.
        sample = checked(run_child(setup.cli_argv(str(main_path))), "first CLI patch")
        if json_lines(sample.stdout)[-1].get("strategy") != "insert":
            raise BenchError(f"the first CLI patch did not take the growth path: {sample.stdout.strip()}")
        metadata = bench.metadata()
        if not metadata:
            raise BenchError("the first CLI patch wrote no metadata")
        metadata_file = work / "metadata.json"
        metadata_file.write_text(json.dumps(dict(metadata)), encoding="utf-8")
        bench.learn_growth(header_prefix_len(main_path))
        bench.tight()
        spare_path = work / "copy-path.safetensors"
        note("copying the bench file for the in-place copy path")
        shutil.copyfile(main_path, spare_path)
        fsync_path(spare_path)
        spare = BenchFile(spare_path, tensors)

        folder = work / "svdq-int4-flux.1-dev"
        folder.mkdir()
        note("writing a deepcompressor-style folder (transformer_blocks + unquantized_layers) for the merge row")
        blocks = {
            name: (info.dtype, tuple(info.shape))
            for name, info in tensors.items()
            if name.startswith(("transformer_blocks.", "single_transformer_blocks."))
        }
        rest = {name: (info.dtype, tuple(info.shape)) for name, info in tensors.items() if name not in blocks}
        for part, table, seed in (("transformer_blocks", blocks, 1), ("unquantized_layers", rest, 2)):
            part_path = folder / f"{part}.safetensors"
            synth.write_random(part_path, synth.table_to_tensors(table), seed=args.seed + seed)
            fsync_path(part_path)

        methods = main_comparison(setup, bench, spare, metadata_file, folder)

        # Leave the bench file patched by the CLI (the state --keep shows), then check no tensor byte moved.
        bench.tight()
        checked(run_child(setup.cli_argv(str(main_path))), "final CLI patch")
        note("hashing the data regions again")
        integrity: dict[str, dict[str, Any]] = {
            "bench file": {"before": digest, "after": data_digest(main_path)},
            "copy-path file": {"before": digest, "after": data_digest(spare_path)},
        }
        for item in integrity.values():
            item["intact"] = item["before"] == item["after"]
        if not args.keep:
            remove(spare_path)

        parse_rows = parse_scaling(PARSE_COUNTS[:-1] if args.quick else PARSE_COUNTS)
        if args.quick:
            setup.rounds = 1
        size_rows = size_scaling(setup, (1, 7) if args.quick else PLOT_SIZES_GB, metadata_file)
        batch_files = QUICK_BATCH_FILES if args.quick else BATCH_FILES
        batch_row = batch(setup, 1 if args.quick else min(args.rounds, 3), batch_files)
        large_row = large_header(setup, LARGE_HEADER_TENSORS)
        second_point = copy_points(setup, metadata_file, scale * ONE_GB_SCALE, args.seed)
        profile = None
        if args.profile:
            note("profiling the CLI")
            profile = profile_cli(setup, bench)
            bench.tight()
            checked(run_child(setup.cli_argv(str(main_path))), "final CLI patch")
        setup.sample_load()
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    one_minute = [load[0] for load in setup.load]
    results: dict[str, Any] = {
        "schema": SCHEMA,
        "command": shlex.join(["scripts/bench.py", *sys.argv[1:]]),
        "started": started.isoformat(timespec="seconds"),
        "finished": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine_info(parent),
        "config": {
            "size": args.size,
            "scale": scale,
            "seed": args.seed,
            "model": MODEL,
            "rounds": args.rounds,
            "scaling_rounds": setup.rounds,
            "bytecode": "cached by the children under the work folder (PYTHONPYCACHEPREFIX), as installed",
            "rss_tool": "GNU time %M" if "%M" in rss_tool() else "python -S wrapper (os.wait4)",
            "quick": args.quick,
            "cache": caches.label,
            "cold": caches.cold,
            "tensors": len(tensors),
            "data_bytes": data_bytes,
            "file_bytes": bench.data_start + data_bytes,
            "baseline_b": resave_kind,
            "cli": shlex.join(setup.cli),
            "cli_extra": setup.cli_extra,
            "work": str(work),
            "kept": args.keep,
        },
        "load": {"samples": setup.load, "min": min(one_minute), "max": max(one_minute)},
        "rows": [method.result() for method in methods],
        "parse_scaling": parse_rows,
        "size_scaling": size_rows,
        "batch": batch_row,
        "large_header": large_row,
        "copy_points": second_point,
        "integrity": integrity,
        "profile": profile,
    }
    results["targets"] = evaluate(results)
    return results


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark, print the markdown table, write the JSON; exit 1 if a tensor byte changed."""
    args = parse_args(argv)
    if args.replot:
        try:
            plot(json.loads(args.replot.read_text(encoding="utf-8")), args.plot)
        except BenchError as exc:
            print(f"bench: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.plot:
        try:
            import matplotlib  # noqa: F401  (fail now, not after the run)
        except ImportError:
            print("bench: --plot needs matplotlib: pip install '.[bench]'", file=sys.stderr)
            return 2
    try:
        results = run(args)
    except BenchError as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("bench: interrupted; the work folder was removed unless --keep", file=sys.stderr)
        return 130
    report = render(results)
    json_path = args.json
    if json_path is None:
        stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        json_path = RESULTS / f"bench-{args.size}-{stamp}.json"
    json_path.parent.mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    json_path.with_suffix(".md").write_text(report, encoding="utf-8")
    print(report)
    note(f"results written to {json_path} and {json_path.with_suffix('.md')}")
    if args.plot:
        plot(results, args.plot)
    return 0 if all(item["intact"] for item in results["integrity"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
