"""The command line as real processes: ``python -m patcher``, the installed script, pipes, a terminal, crashes.

One test patches a full-size (sparse) FLUX.1-dev file with the headline command; the others use small
synthetic files (width scale 0.05) with a config scaled the same way.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import pty
import shutil
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from oracle import oracle_read
from safetensors import safe_open

from patcher import __version__, models, splice, synth
from patcher.header import read_header
from patcher.inspect import infer

SCALE = 0.05
FIXTURES = Path(__file__).parent / "fixtures"
SCRIPT = Path(sys.executable).parent / "nunchaku-patch"
ROOT = Path(__file__).resolve().parent.parent
#: The conftest fixture that hashes a byte range: sha256_range(path, start=0, end=None).
Sha256Range = Callable[..., str]


def env(**extra: str) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", "NUNCHAKU_PATCH_FAULT")}
    out.update(HF_HUB_OFFLINE="1", **extra)
    return out


def patcher(*args: str, cwd: Path | None = None, **extra: str) -> subprocess.CompletedProcess[str]:
    """Run ``python -m patcher ARGS`` and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "patcher", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env(**extra),
        timeout=120,
        check=False,
    )


def errors(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def data_sha256(path: Path, sha256_range: Sha256Range) -> str:
    """Hash the data region (wherever the header currently ends)."""
    return sha256_range(path, read_header(path).data_start)


@pytest.fixture(scope="module")
def small(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Build a small old conversion (random data) and its scaled config once."""
    root = tmp_path_factory.mktemp("subprocess")
    tensors = synth.table_to_tensors(synth.build_table(synth.preset("flux.1-dev", scale=SCALE)))
    sample = synth.write_random(root / "template.safetensors", tensors, seed=7)
    config: dict[str, Any] = json.loads(models.embedded_config_text(models.lookup("flux.1-dev")))
    hidden = infer(read_header(sample)).hidden_size
    assert hidden is not None
    config["num_attention_heads"] = hidden.value // config["attention_head_dim"]
    config_path = root / "config.json"
    config_path.write_text(json.dumps(config))
    return sample, config_path


@pytest.fixture
def sample(small: tuple[Path, Path], tmp_path: Path) -> Path:
    path = tmp_path / "svdq-int4_r32-flux.1-dev.safetensors"
    shutil.copyfile(small[0], path)
    return path


@pytest.fixture
def config(small: tuple[Path, Path]) -> str:
    return os.fspath(small[1])


# --------------------------------------------------------------------------------------------


def test_python_dash_m_version_and_help() -> None:
    version = patcher("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"nunchaku-patch, version {__version__}"
    helped = patcher("--help")
    assert helped.returncode == 0
    for command in ("patch", "validate", "inspect", "restore", "merge"):
        assert f"  {command} " in helped.stdout
    patch_help = patcher("patch", "--help")
    assert "--dry-run" in patch_help.stdout and "Examples:" in patch_help.stdout


def test_python_dash_m_patcher_cli_runs_too() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "patcher.cli", "--version"], capture_output=True, text=True, check=False, env=env()
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"nunchaku-patch, version {__version__}"


# Prints, as the interpreter shuts down, whether the collector was frozen on the way out (the exit code is run's own).
_ON_EXIT = """
import atexit, gc, sys
from patcher.cli.app import run
atexit.register(lambda: print("frozen", gc.get_freeze_count() > 0))
sys.argv = ["nunchaku-patch", *sys.argv[1:]]
run()
"""


@pytest.mark.parametrize(("args", "code"), [(["--version"], 0), (["validate", "missing.safetensors"], 2)])
def test_every_entry_point_runs_main_and_skips_the_final_collection(args: list[str], code: int) -> None:
    """The console script and ``python -m`` call ``run``: main's exit code, the collector frozen on the way out.

    Freezing spares the interpreter a full collection of every object at exit (7-9 ms of a 60 ms patch).
    """
    entry = next(
        line.split("=", 1)[1].strip()
        for line in (ROOT / "setup.cfg").read_text(encoding="utf-8").splitlines()
        if line.strip().startswith("nunchaku-patch =")
    )
    assert entry == "patcher.cli.app:run"
    for module in ("patcher/__main__.py", "patcher/cli/__main__.py"):
        assert "    run()" in (ROOT / module).read_text(encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-c", _ON_EXIT, *args], capture_output=True, text=True, check=False, env=env()
    )
    assert proc.returncode == code, proc.stderr
    assert proc.stdout.splitlines()[-1] == "frozen True"


# Runs a command in a fresh interpreter and prints which patcher modules it imported.
_IMPORTED = """
import sys
from patcher.cli import main
try:
    main(sys.argv[1:])
except SystemExit:
    pass
print(" ".join(sorted(m for m in sys.modules if m.startswith("patcher"))))
"""


@pytest.mark.parametrize(
    ("args", "loaded", "not_loaded"),
    [
        (
            ["patch", "missing.safetensors"],
            "patcher.cli.patch",
            ("patcher.cli.merge", "patcher.merge", "patcher.cli.inspect"),
        ),
        (["missing.safetensors"], "patcher.cli.patch", ("patcher.cli.merge", "patcher.cli.validate")),
        (["merge", "missing-dir"], "patcher.cli.merge", ("patcher.cli.patch", "patcher.cli.inspect")),
    ],
)
def test_a_command_imports_only_its_own_module(args: list[str], loaded: str, not_loaded: tuple[str, ...]) -> None:
    proc = subprocess.run(
        [sys.executable, "-c", _IMPORTED, *args], capture_output=True, text=True, check=False, env=env()
    )
    modules = proc.stdout.split()
    assert loaded in modules, proc.stderr
    assert not set(not_loaded) & set(modules)


def test_the_installed_script_runs() -> None:
    if not SCRIPT.exists():
        pytest.skip("the nunchaku-patch script is not installed next to this Python")
    proc = subprocess.run([os.fspath(SCRIPT), "--version"], capture_output=True, text=True, check=False, env=env())
    assert proc.returncode == 0 and __version__ in proc.stdout


def test_headline_command_on_a_full_size_flux_dev_file(tmp_path: Path) -> None:
    """``nunchaku-patch existing.safetensors --model flux.1-dev`` on FLUX.1-dev's real tensor table, full width."""
    path = tmp_path / "svdq-int4_r32-flux.1-dev.safetensors"
    synth.write_sparse(path, synth.flux_dev_int4_r32())
    before = read_header(path)
    size = path.stat().st_size
    proc = patcher(os.fspath(path), "--model", "flux.1-dev")
    assert proc.returncode == 0, proc.stderr
    after = read_header(path)
    assert path.stat().st_size == size + after.header_len - before.header_len
    assert list(after.tensors.items()) == list(before.tensors.items())
    # Still sparse: the 6.8 GB data region was neither read nor rewritten.
    assert path.stat().st_blocks * 512 < 64 * 1024 * 1024
    with safe_open(os.fspath(path), framework="np") as handle:
        metadata = handle.metadata()
    config = json.loads(metadata["config"])
    assert config == json.loads(models.embedded_config_text(models.lookup("flux.1-dev")))
    assert json.loads(metadata["quantization_config"])["rank"] == 32
    stamp = path.stat().st_mtime_ns
    again = patcher(os.fspath(path), "--model", "flux.1-dev")
    assert again.returncode == 0
    assert f"already correct {path}" in again.stderr.splitlines()
    assert path.stat().st_mtime_ns == stamp
    assert patcher("validate", os.fspath(path)).returncode == 0


def test_patch_is_idempotent_and_keeps_the_data(sample: Path, config: str, sha256_range: Sha256Range) -> None:
    data = data_sha256(sample, sha256_range)
    first = patcher(os.fspath(sample), "--config", config)
    assert first.returncode == 0, first.stderr
    assert first.stdout == ""  # status goes to stderr; stdout is for data
    assert data_sha256(sample, sha256_range) == data
    metadata, _ = oracle_read(sample)
    assert metadata is not None and json.loads(metadata["config"])["num_layers"] == 19
    blob, stamp = sample.read_bytes(), sample.stat().st_mtime_ns
    second = patcher(os.fspath(sample), "--config", config)
    assert second.returncode == 0
    assert sample.read_bytes() == blob
    assert sample.stat().st_mtime_ns == stamp


def test_every_exit_code(sample: Path, config: str, tmp_path: Path) -> None:
    assert patcher(os.fspath(sample), "--config", config, "--dry-run").returncode == 0
    assert patcher(os.fspath(sample), "--config", config, "--check").returncode == 1
    assert patcher("validate", os.fspath(sample)).returncode == 1
    usage = patcher(os.fspath(sample), os.fspath(sample), "-o", os.fspath(tmp_path / "x.safetensors"))
    assert usage.returncode == 2
    assert usage.stderr.count("\n") == 1 and "Traceback" not in usage.stderr
    assert patcher(os.fspath(tmp_path / "missing.safetensors"), "--config", config).returncode == 2
    assert patcher(os.fspath(sample), "--config", config).returncode == 0
    assert patcher(os.fspath(sample), "--config", config, "--check").returncode == 0
    assert patcher("validate", os.fspath(sample)).returncode == 0


def test_batch_json_through_a_pipe(small: tuple[Path, Path], config: str, tmp_path: Path) -> None:
    tree = tmp_path / "conversions"
    for name in ("a/one.safetensors", "b/two.safetensors"):
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(small[0], tree / name)
    broken = tree / "b" / "broken.safetensors"
    shutil.copyfile(FIXTURES / "invalid" / "truncated-json.safetensors", broken)
    proc = patcher(os.fspath(tree), "--config", config, "--json")
    assert proc.returncode == 3
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["path"], r["status"]) for r in records] == [
        (os.fspath(tree / "a" / "one.safetensors"), "patched"),
        (os.fspath(broken), "failed"),
        (os.fspath(tree / "b" / "two.safetensors"), "patched"),
    ]
    assert records[1]["error"]["message"].startswith(f"{broken}: header is not valid JSON")
    assert proc.stderr.splitlines()[-1] == "2 patched, 1 failed"
    assert "\x1b" not in proc.stdout + proc.stderr  # a pipe gets no colour


def _run_in_terminal(args: list[str], **extra: str) -> str:
    """Run ``python -m patcher ARGS`` with a pseudo-terminal as stdout and stderr; return what it printed."""
    main, child = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "patcher", *args], stdout=child, stderr=child, env=env(**extra))
        os.close(child)
        chunks = []
        while True:
            try:
                chunk = os.read(main, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(timeout=120)
    finally:
        with contextlib.suppress(OSError):
            os.close(main)
    return b"".join(chunks).decode("utf-8", "replace")


def test_colour_on_a_terminal_and_none_with_no_color(sample: Path) -> None:
    coloured = _run_in_terminal(["validate", os.fspath(sample)])
    assert "needs work" in coloured and "\x1b[" in coloured
    plain = _run_in_terminal(["validate", os.fspath(sample)], NO_COLOR="1")
    assert "needs work" in plain and "\x1b[" not in plain


def test_an_interrupted_patch_is_reported_then_finished(sample: Path, config: str, sha256_range: Sha256Range) -> None:
    data = data_sha256(sample, sha256_range)
    killed = patcher(os.fspath(sample), "--config", config, NUNCHAKU_PATCH_FAULT="prefix-half")
    assert killed.returncode == -signal.SIGKILL
    assert os.path.exists(splice.journal_path(sample))
    looked = patcher("inspect", os.fspath(sample))
    assert looked.returncode == 3
    assert errors(looked) == [
        f"error: {sample}: has an interrupted patch: its header is half-written (the tensor data is intact). "
        f"run `nunchaku-patch restore {sample}` or the same patch command again to finish it"
    ]
    finished = patcher(os.fspath(sample), "--config", config)
    assert finished.returncode == 0, finished.stderr
    assert f"recovered {sample}: an interrupted patch was finished" in finished.stderr.splitlines()
    assert not os.path.exists(splice.journal_path(sample))
    assert data_sha256(sample, sha256_range) == data
    assert patcher("validate", os.fspath(sample)).returncode == 0


@contextlib.contextmanager
def _read_only_mount(folder: Path) -> Iterator[None]:
    """Bind-mount ``folder`` read-only over itself (root ignores permission bits, not a read-only mount)."""
    if shutil.which("mount") is None:
        pytest.skip("no mount command")
    bind = subprocess.run(["mount", "--bind", os.fspath(folder), os.fspath(folder)], capture_output=True, check=False)
    if bind.returncode != 0:
        pytest.skip(f"cannot bind-mount: {bind.stderr.decode().strip()}")
    try:
        remount = subprocess.run(
            ["mount", "-o", "remount,ro,bind", os.fspath(folder)], capture_output=True, check=False
        )
        if remount.returncode != 0:
            pytest.skip(f"cannot remount read-only: {remount.stderr.decode().strip()}")
        yield
    finally:
        subprocess.run(["umount", os.fspath(folder)], check=False)


def test_a_file_on_a_read_only_mount(small: tuple[Path, Path], config: str, tmp_path: Path) -> None:
    folder = tmp_path / "ro"
    folder.mkdir()
    path = folder / "model.safetensors"
    shutil.copyfile(small[0], path)
    blob = path.read_bytes()
    with _read_only_mount(folder):
        refused = patcher(os.fspath(path), "--config", config)
        dry = patcher(os.fspath(path), "--config", config, "--dry-run")
        copy = patcher(os.fspath(path), "--config", config, "-o", os.fspath(tmp_path / "copy.safetensors"))
    assert refused.returncode == 3
    assert errors(refused) == [
        f"error: {path}: is not writable (permissions, an immutable attribute, or a read-only filesystem). "
        "write a patched copy with -o"
    ]
    assert dry.returncode == 3 and errors(dry) == errors(refused)  # the dry run tells what the real run would do
    assert copy.returncode == 0, copy.stderr
    assert path.read_bytes() == blob
    metadata, _ = oracle_read(tmp_path / "copy.safetensors")
    assert metadata is not None and "quantization_config" in metadata


def test_a_reader_that_stops_early_ends_the_run_quietly(sample: Path, tmp_path: Path) -> None:
    """``nunchaku-patch inspect ... | head -1``: exit 141 (SIGPIPE's code), no traceback, no error line."""
    read_end, write_end = os.pipe()
    fcntl.fcntl(write_end, getattr(fcntl, "F_SETPIPE_SZ", 1031), 4096)  # a small pipe: the output overflows it
    links = []
    for index in range(4):
        links.append(tmp_path / f"copy{index}.safetensors")
        links[-1].symlink_to(sample)
    proc = subprocess.Popen(
        [sys.executable, "-m", "patcher", "inspect", *map(os.fspath, links)],
        stdout=write_end,
        stderr=subprocess.PIPE,
        env=env(),
    )
    os.close(write_end)
    assert os.read(read_end, 100).startswith(os.fspath(links[0]).encode())
    os.close(read_end)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 141
    assert b"Traceback" not in err and b"error:" not in err
