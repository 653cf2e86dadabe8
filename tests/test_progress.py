"""The byte progress bar: its line, its redraw rule, and the copies that report to it."""

from __future__ import annotations

import io
import os
from pathlib import Path

import pytest

from patcher import _platform as plat
from patcher import progress, synth
from patcher.header import read_header
from patcher.splice import Strategy, write_metadata


class FakeClock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_render_shows_percentage_bytes_rate_and_time_left() -> None:
    line = progress.render("model.safetensors", 3 * 10**9, 6 * 10**9, 5.0, width=120)
    assert line.startswith("model.safetensors")
    assert " 50% [" in line
    assert "3.00 GB / 6.00 GB" in line
    assert "600.00 MB/s" in line
    assert "ETA 0:05" in line
    done = progress.render("m", 6 * 10**9, 6 * 10**9, 12.0, width=120)
    assert "100%" in done and "in 0:12" in done
    assert "ETA --:--" in progress.render("m", 0, 10, 0.0)
    assert "ETA 1:00:00" in progress.render("m", 10**9, 2 * 10**9, 3600.0, width=120)


@pytest.mark.parametrize("width", [20, 40, 80])
def test_render_fits_the_terminal(width: int) -> None:
    line = progress.render("a/very/long/path/to/" * 5 + "model.safetensors", 1, 2, 1.0, width=width)
    assert len(line) <= width - 1


def test_bar_redraws_at_most_every_interval_and_erases_itself() -> None:
    stream = io.StringIO()
    clock = FakeClock()
    bar = progress.ByteProgress("m", 100, stream, clock=clock)
    bar.advance(10)  # first report: drawn
    bar.advance(10)  # same instant: not drawn again
    assert stream.getvalue().count("\r") == 1 and " 10%" in stream.getvalue()
    clock.now += 2 * progress.REDRAW_INTERVAL
    bar.advance(10)
    assert stream.getvalue().count("\r") == 2 and " 30%" in stream.getvalue()
    bar.advance(70)  # complete: drawn whatever the time
    assert "100%" in stream.getvalue()
    bar.close()
    assert stream.getvalue().endswith("\r")
    assert stream.getvalue().rsplit("\r", 2)[-2].strip() == ""


def test_disabled_bar_is_never_active() -> None:
    stream = io.StringIO()
    with progress.showing("m", 100, stream, enabled=False) as bar:
        assert bar is None and progress.active() is None
    assert stream.getvalue() == ""


def test_copy_data_reports_every_byte(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    payload = os.urandom(3 * 1024 * 1024 + 17)
    src.write_bytes(payload)
    stream = io.StringIO()
    with (
        open(src, "rb") as s,
        open(dst, "wb") as d,
        progress.showing("copy", len(payload), stream, enabled=True) as bar,
    ):
        assert progress.active() is bar
        plat.copy_data(s.fileno(), d.fileno(), 0, 0, len(payload))
        assert bar is not None and bar.done == len(payload)
    assert progress.active() is None
    assert dst.read_bytes() == payload
    assert "100%" in stream.getvalue()


@pytest.mark.parametrize("output", [True, False])
def test_patched_copy_and_copy_strategy_report_the_data_region(tmp_path: Path, output: bool) -> None:
    source = synth.write_random(tmp_path / "m.safetensors", synth.table_to_tensors({"w": ("F32", (512, 512))}))
    data_len = read_header(source).data_len
    stream = io.StringIO()
    with progress.showing("m.safetensors", data_len, stream, enabled=True) as bar:
        if output:
            write_metadata(source, {"format": "pt"}, output=tmp_path / "out.safetensors")
        else:
            write_metadata(source, {"format": "pt"}, strategy=Strategy.COPY)
    assert bar is not None and bar.done == data_len
    assert "100%" in stream.getvalue()


def _run_on_a_terminal(args: list[str], *, tty: bool) -> str:
    """Run the CLI with stderr on a pseudo-terminal (or a pipe); return what it wrote to stderr."""
    import subprocess
    import sys

    if not tty:
        done = subprocess.run([sys.executable, "-m", "patcher", *args], capture_output=True, text=True, check=False)
        assert done.returncode == 0, done.stderr
        return done.stderr
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    try:
        proc = subprocess.Popen([sys.executable, "-m", "patcher", *args], stdout=subprocess.DEVNULL, stderr=slave)
        os.close(slave)
        chunks = []
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        assert proc.wait() == 0
    finally:
        os.close(master)
    return b"".join(chunks).decode("utf-8", "replace")


def _flux_like(scale: float) -> dict[str, tuple[str, tuple[int, ...]]]:
    return {
        name: (info[0], tuple(info[1]))
        for name, info in synth.build_table(synth.preset("flux.1-dev", scale=scale)).items()
    }


@pytest.mark.parametrize(("tty", "quiet"), [(True, False), (True, True), (False, False)])
def test_the_command_line_shows_the_bar_only_on_a_terminal(tmp_path: Path, tty: bool, quiet: bool) -> None:
    source = synth.write_random(tmp_path / "m.safetensors", synth.table_to_tensors(_flux_like(0.05)))
    args = [str(source), "--model", "flux.1-dev", "--force", "-o", str(tmp_path / "out.safetensors")]
    err = _run_on_a_terminal([*args, "-q"] if quiet else args, tty=tty)
    shown = "100% [" in err
    assert shown == (tty and not quiet), err
    if shown:
        assert "/s" in err and "\r" in err


def test_merge_shows_the_bar_on_a_terminal(tmp_path: Path) -> None:
    table = _flux_like(0.05)
    folder = tmp_path / "svdq-int4-flux.1-dev"
    folder.mkdir()
    blocks = {k: v for k, v in table.items() if k.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    rest = {k: v for k, v in table.items() if k not in blocks}
    synth.write_random(folder / "transformer_blocks.safetensors", synth.table_to_tensors(blocks))
    synth.write_random(folder / "unquantized_layers.safetensors", synth.table_to_tensors(rest), seed=1)
    err = _run_on_a_terminal(["merge", str(folder), "--model", "flux.1-dev", "--force"], tty=True)
    assert "100% [" in err, err


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here: the final fsync does it all")
@pytest.mark.parametrize("output", [True, False])
def test_copies_start_writeback_of_each_step_as_they_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, output: bool
) -> None:
    """Each step of a copy is handed to writeback once copied, so the disk writes overlap the copy.

    Without it the whole copy sits dirty in the page cache until the final fsync, which then waits for all of it
    (issue 12: ``-o`` ran at 0.82x of ``cp`` + ``sync``).
    """
    monkeypatch.setattr(plat, "COPY_STEP", 1024 * 1024)
    source = synth.write_random(tmp_path / "m.safetensors", synth.table_to_tensors({"w": ("F32", (1024, 1100))}))
    data_len = read_header(source).data_len
    real = os.posix_fadvise
    kicked: list[tuple[int, int]] = []

    def advise(fd: int, offset: int, length: int, advice: int) -> None:
        if advice == os.POSIX_FADV_DONTNEED:
            kicked.append((offset, length))
        real(fd, offset, length, advice)

    monkeypatch.setattr(os, "posix_fadvise", advise)
    out = tmp_path / "out.safetensors"
    if output:
        write_metadata(source, {"format": "pt"}, output=out)
    else:
        write_metadata(source, {"format": "pt"}, strategy=Strategy.COPY)
    written = read_header(out if output else source)
    assert written.data_len == data_len
    assert sorted(kicked) == [
        (written.data_start + start, min(plat.COPY_STEP, data_len - start))
        for start in range(0, data_len, plat.COPY_STEP)
    ]
