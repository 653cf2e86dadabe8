"""The command line on Hub repos and the HF cache: scan, validate, inspect, streamed patch and merge.

Each command runs as a user runs it (``python -m patcher``) with ``HF_ENDPOINT`` pointing at the local stand-in
Hub (tests/hubserver.py), so huggingface_hub reads the endpoint the way it does in real use.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hubserver import FakeHub
from test_hubwrite import BLOCK_PREFIXES, SPEC, small_config

from patcher import merge, splice, synth
from patcher.header import read_header
from patcher.plan import PatchOptions, Planner

REPO = "someone/old-svdq"
FILE = "svdq-int4_r32-finetune.safetensors"
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def published(tmp_path: Path, hub_server: FakeHub) -> dict[str, Path]:
    """A repo with one old single file (its own config in the metadata) and one deepcompressor folder."""
    src = tmp_path / "src"
    src.mkdir()
    single = synth.write_random(
        src / FILE,
        synth.table_to_tensors(synth.build_table(SPEC)),
        {"config": json.dumps(small_config()), "format": "pt"},
        seed=21,
    )
    table = synth.build_table(SPEC)
    blocks = {k: v for k, v in table.items() if k.startswith(BLOCK_PREFIXES)}
    rest = {k: v for k, v in table.items() if k not in blocks}
    folder = src / "svdq-int4-finetune"
    folder.mkdir()
    synth.write_random(folder / merge.BLOCKS_FILE, synth.table_to_tensors(blocks), seed=22)
    synth.write_random(folder / merge.UNQUANTIZED_FILE, synth.table_to_tensors(rest), seed=23)
    (folder / "config.json").write_text(json.dumps(small_config(), indent=2))
    hub_server.add_repo(
        REPO,
        {FILE: single, **{f"svdq-int4-finetune/{p.name}": p for p in folder.iterdir()}},
    )
    hub_server.add_repo("someone/gated", {FILE: single}, gated=True)
    return {"single": single, "folder": folder}


def run(*args: str, cwd: Path, hub: FakeHub | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    environment.update(
        PYTHONPATH=os.fspath(ROOT),
        HF_HOME=os.fspath(cwd / "hf-home"),
        HF_HUB_DISABLE_TELEMETRY="1",
        NO_COLOR="1",
    )
    if hub is not None:
        environment["HF_ENDPOINT"] = hub.url
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "patcher", *args], cwd=cwd, env=environment, capture_output=True, text=True, timeout=300
    )


def test_validate_and_inspect_a_hub_file(tmp_path: Path, hub_server: FakeHub, published: dict[str, Path]) -> None:
    done = run("validate", f"hf://{REPO}/{FILE}", cwd=tmp_path, hub=hub_server)
    assert done.returncode == 1, done.stderr
    assert done.stdout.startswith(f"hf://{REPO}/{FILE}: needs work")
    done = run("inspect", "--json", f"hf://{REPO}/{FILE}", cwd=tmp_path, hub=hub_server)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    header = read_header(published["single"])
    assert record["tensors"] == len(header.tensors) and record["file_size"] == header.file_size
    assert hub_server.highest_offset(REPO, FILE) == header.data_start


def test_validate_a_whole_repo(tmp_path: Path, hub_server: FakeHub, published: dict[str, Path]) -> None:
    done = run("validate", "--json", f"hf://{REPO}", cwd=tmp_path, hub=hub_server)
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert sorted(r["path"] for r in records) == sorted(
        [f"hf://{REPO}/{FILE}"] + [f"hf://{REPO}/svdq-int4-finetune/{n}" for n in merge.SOURCE_FILES]
    )
    status = {r["path"].rpartition("/")[2]: r["status"] for r in records}
    # The unquantized half alone is no SVDQuant file: walked past, as in a local folder.
    assert status == {FILE: "needs work", merge.BLOCKS_FILE: "needs work", merge.UNQUANTIZED_FILE: "skipped"}
    assert done.returncode == 1


def test_streamed_patch_from_the_command_line(tmp_path: Path, hub_server: FakeHub, published: dict[str, Path]) -> None:
    done = run(f"hf://{REPO}/{FILE}", "-o", "out.safetensors", "--json", cwd=tmp_path, hub=hub_server)
    assert done.returncode == 0, done.stderr
    record = json.loads(done.stdout)
    assert record["status"] == "patched" and record["output"] == "out.safetensors" and record["verified"]
    expected = tmp_path / "local.safetensors"
    plan = Planner(PatchOptions(), log=lambda _l: None).plan("x", read_header(published["single"]))
    splice.write_metadata(published["single"], plan.new_metadata, output=expected)
    assert (tmp_path / "out.safetensors").read_bytes() == expected.read_bytes()
    assert "\r" not in done.stderr  # no progress bar outside a terminal


def test_patch_of_a_hub_file_needs_an_output(tmp_path: Path, hub_server: FakeHub, published: dict[str, Path]) -> None:
    done = run(f"hf://{REPO}/{FILE}", cwd=tmp_path, hub=hub_server)
    assert done.returncode == 2
    assert "-o" in done.stderr and len(done.stderr.strip().splitlines()) == 1
    assert hub_server.requests == []  # refused before anything was asked


def test_streamed_merge_from_the_command_line(tmp_path: Path, hub_server: FakeHub, published: dict[str, Path]) -> None:
    (tmp_path / "merged").mkdir()
    # The repo's root: the folder holding both halves is found in its listing.
    done = run("merge", f"hf://{REPO}", "-o", "merged", cwd=tmp_path, hub=hub_server)
    assert done.returncode == 0, done.stderr
    assert f"merged hf://{REPO}/svdq-int4-finetune -> merged/" in done.stderr
    (output,) = (tmp_path / "merged").iterdir()
    local = merge.write_merge(
        merge.plan_merge(published["folder"], Planner(PatchOptions(), log=lambda _l: None), output=tmp_path / "l")
    )
    assert output.read_bytes() == Path(local.output).read_bytes()


@pytest.mark.parametrize(
    ("target", "env", "words"),
    [
        (f"hf://someone/gated/{FILE}", {}, "gated repo"),
        (f"hf://someone/missing/{FILE}", {}, "not found, or it is private"),
        (f"hf://{REPO}@nope/{FILE}", {}, "no revision 'nope'"),
        (f"hf://{REPO}/other.safetensors", {}, "no file 'other.safetensors'"),
        (f"hf://{REPO}/{FILE}", {"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE"),
    ],
)
def test_remote_failures_are_one_line(
    tmp_path: Path, hub_server: FakeHub, published: dict[str, Path], target: str, env: dict[str, str], words: str
) -> None:
    done = run("validate", target, cwd=tmp_path, hub=hub_server, **env)
    assert done.returncode == 3
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {target}") and words in lines[0], done.stderr


def test_merge_of_a_repo_without_folders(tmp_path: Path, hub_server: FakeHub, published: dict[str, Path]) -> None:
    done = run("merge", "hf://someone/gated", cwd=tmp_path, hub=hub_server)
    assert done.returncode == 3
    assert done.stderr.strip() == (
        "error: hf://someone/gated: no deepcompressor output folder here (expected a folder holding "
        "transformer_blocks.safetensors and unquantized_layers.safetensors). scan hf://OWNER/REPO lists what the "
        "repo holds"
    )


def test_scan_of_a_hub_repo(tmp_path: Path, hub_server: FakeHub, published: dict[str, Path]) -> None:
    done = run("scan", "--json", f"hf://{REPO}", cwd=tmp_path, hub=hub_server)
    assert done.returncode == 1, done.stderr
    kinds = sorted(json.loads(line)["kind"] for line in done.stdout.splitlines())
    assert kinds == ["deepcompressor folder", "single file"]


def test_scan_needs_something_to_scan(tmp_path: Path) -> None:
    done = run("scan", cwd=tmp_path)
    assert done.returncode == 2 and "--hf-cache" in done.stderr


def test_byte_progress_draws_rate_and_eta_on_a_terminal(capsys: pytest.CaptureFixture[str]) -> None:
    from patcher.cli.console import Console
    from patcher.cli.remote import ByteProgress

    console = Console()
    bar = ByteProgress(console, "model.safetensors")
    assert not bar.enabled  # captured stderr is no terminal
    bar.enabled = True  # as on one
    bar(0, 4 << 20)
    bar(4 << 20, 4 << 20)
    bar.close()
    err = capsys.readouterr().err
    assert "afetensors" in err and "100%" in err and "4.19 MB / 4.19 MB" in err and "/s" in err  # name cut to fit
    assert err.endswith("\r")  # the line is erased for the result line
    quiet = ByteProgress(Console(quiet=True), "x")
    quiet(1, 2)
    quiet.close()
    assert capsys.readouterr().err == ""


def test_interrupted_download_resumes_when_the_command_is_run_again(
    tmp_path: Path, hub_server: FakeHub, published: dict[str, Path]
) -> None:
    header = read_header(published["single"])
    args = (f"hf://{REPO}/{FILE}", "-o", "out.safetensors")
    hub_server.drop_at[(REPO, FILE)] = header.data_start + header.data_len // 2
    cut = run(*args, cwd=tmp_path, hub=hub_server)
    assert cut.returncode == 3 and "connection dropped" in cut.stderr and "again" in cut.stderr, cut.stderr
    assert not (tmp_path / "out.safetensors").exists()
    again = run(*args, cwd=tmp_path, hub=hub_server)
    assert again.returncode == 0 and "resumed after" in again.stderr, again.stderr
    first, last = hub_server.transfers(REPO, FILE)[2], hub_server.transfers(REPO, FILE)[-1]
    assert first.start == header.data_start and header.data_start < last.start <= first.end
    assert last.end == header.file_size
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".part")]
    expected = tmp_path / "local.safetensors"
    plan = Planner(PatchOptions(), log=lambda _l: None).plan("x", header)
    splice.write_metadata(published["single"], plan.new_metadata, output=expected)
    assert (tmp_path / "out.safetensors").read_bytes() == expected.read_bytes()


def test_hash_mismatch_from_the_command_line(tmp_path: Path, hub_server: FakeHub, published: dict[str, Path]) -> None:
    hub_server.corrupt[(REPO, FILE)] = read_header(published["single"]).data_start
    done = run(f"hf://{REPO}/{FILE}", "-o", "out.safetensors", cwd=tmp_path, hub=hub_server)
    assert done.returncode == 3
    line = done.stderr.strip().splitlines()[-1]  # after the config log line
    assert line.startswith("error: ")
    assert "do not match the sha256 the Hub reports; the partial output was deleted" in line
    assert sorted(p.name for p in tmp_path.iterdir() if p.name not in ("hf-home", "src")) == []
