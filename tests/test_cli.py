"""The command line through ``click.testing.CliRunner``: every command, exit code and error line.

Files are small synthetic conversions (FLUX.1-dev's real tensor table at width scale 0.05, random data)
patched with a config scaled the same way; ``safetensors`` itself checks the results.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from oracle import oracle_read
from safetensors import safe_open

from patcher import __version__, cli, models, splice, synth
from patcher.cli import batch, console
from patcher.header import ALIGNMENT, PREFIX_SIZE, read_header
from patcher.inspect import infer
from patcher.report import ExitCode, Record, Report, Status

FIXTURES = Path(__file__).parent / "fixtures"
SCALE = 0.05
HEADER_HINT = "the file is not valid safetensors (safetensors itself would refuse it): re-download or re-convert it"

MakeFile = Callable[..., Path]


# --------------------------------------------------------------------------------------------
# Helpers


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    """Invoke the command line in-process, as a user would type it."""
    return CliRunner().invoke(cli.main, list(args), env=env, catch_exceptions=False)


def errors(result: Result) -> list[str]:
    """Return the ``error:`` lines of a run's stderr."""
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def json_records(result: Result) -> list[dict[str, Any]]:
    """Parse the ``--json`` records (one JSON object per stdout line)."""
    return [json.loads(line) for line in result.stdout.splitlines()]


def tensors_of(preset: str, **changes: Any) -> dict[str, Any]:
    return synth.table_to_tensors(synth.build_table(synth.preset(preset, scale=SCALE, **changes)))


def scaled_config(preset: str) -> dict[str, Any]:
    """Return the model's real config with the width of the scaled synthetic file (heads x head_dim)."""
    config: dict[str, Any] = json.loads(models.embedded_config_text(models.lookup(preset)))
    hidden = infer(synth.header_of(tensors_of(preset))).hidden_size
    assert hidden is not None
    config["num_attention_heads"] = hidden.value // config["attention_head_dim"]
    return config


def data_region(path: Path) -> bytes:
    """Return the bytes after the header (the tensor data the patcher must never change)."""
    return path.read_bytes()[read_header(path).data_start :]


def header_json(path: Path) -> bytes:
    """Return the header's JSON text without its space padding."""
    blob = path.read_bytes()
    (n,) = struct.unpack("<Q", blob[:PREFIX_SIZE])
    return blob[PREFIX_SIZE : PREFIX_SIZE + n].rstrip(b" ")


def snapshot(path: Path) -> tuple[bytes, int]:
    """Return the file's bytes and mtime (ns), to prove nothing was written."""
    return path.read_bytes(), path.stat().st_mtime_ns


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Build each kind of sample once per module (random data, so a moved byte would show)."""
    root = tmp_path_factory.mktemp("templates")
    made = {}
    for name, preset, changes in (
        ("dev", "flux.1-dev", {}),
        ("schnell", "flux.1-schnell", {}),
        ("blocks", "flux.1-dev", {"include_unquantized": False}),
    ):
        made[name] = synth.write_random(root / f"{name}.safetensors", tensors_of(preset, **changes), seed=len(made))
    for preset in ("flux.1-dev", "flux.1-schnell"):
        made[f"{preset}.json"] = root / f"{preset}.json"
        made[f"{preset}.json"].write_text(json.dumps(scaled_config(preset), indent=2))
    return made


@pytest.fixture
def make_file(tmp_path: Path, templates: dict[str, Path]) -> MakeFile:
    """Copy a sample old conversion into the test's folder: ``make_file("name.safetensors", kind="dev")``."""

    def make(name: str = "svdq-int4_r32-flux.1-dev.safetensors", kind: str = "dev", folder: Path | None = None) -> Path:
        target = (folder or tmp_path) / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(templates[kind], target)
        return target

    return make


@pytest.fixture
def dev_config(templates: dict[str, Path]) -> str:
    return os.fspath(templates["flux.1-dev.json"])


@pytest.fixture
def schnell_config(templates: dict[str, Path]) -> str:
    return os.fspath(templates["flux.1-schnell.json"])


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Keep the user's Hugging Face cache and colour settings out of the tests."""
    monkeypatch.setenv("HF_HOME", os.fspath(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.chdir(tmp_path)
    yield


# --------------------------------------------------------------------------------------------
# patch: the headline path


def test_patch_writes_metadata_safetensors_reads_and_leaves_the_data_alone(
    make_file: MakeFile, dev_config: str
) -> None:
    path = make_file()
    before = read_header(path)
    data = data_region(path)
    result = run(os.fspath(path), "--config", dev_config)
    assert result.exit_code == ExitCode.OK, result.stderr
    after = read_header(path)
    assert re.search(
        rf"^patched {re.escape(str(path))} \((fit|insert|copy), header {before.header_len:,} -> "
        rf"{after.header_len:,} bytes\)$",
        result.stderr,
        re.M,
    ), result.stderr
    metadata, names = oracle_read(path)
    assert metadata is not None
    assert sorted(names) == sorted(before.tensors)
    config = json.loads(metadata["config"])
    assert config == json.loads(Path(dev_config).read_text())
    assert json.loads(metadata["quantization_config"])["weight"]["dtype"] == "int4"
    assert json.loads(metadata["comfy_config"])["model_class"] == "Flux"
    assert metadata["model_class"] == "NunchakuFluxTransformer2dModel"
    assert data_region(path) == data
    assert after.aligned


def test_second_run_writes_nothing(make_file: MakeFile, dev_config: str) -> None:
    path = make_file()
    assert run(os.fspath(path), "--config", dev_config).exit_code == 0
    before = snapshot(path)
    again = run(os.fspath(path), "--config", dev_config)
    assert again.exit_code == ExitCode.OK
    assert f"already correct {path}" in again.stderr.splitlines()
    assert snapshot(path) == before


def test_dry_run_shows_the_diff_and_predicts_the_real_write(make_file: MakeFile, dev_config: str) -> None:
    path = make_file()
    before = snapshot(path)
    old = read_header(path)
    dry = run(os.fspath(path), "--config", dev_config, "--dry-run")
    assert dry.exit_code == ExitCode.OK, dry.stderr  # a dry run that finds work is not a failure; --check is
    assert snapshot(path) == before
    out = dry.stdout.splitlines()
    assert out[0] == f"# {path}"
    assert [line for line in out if line.startswith("+++ ")] == [
        "+++ b/__metadata__/config",
        "+++ b/__metadata__/comfy_config",
        "+++ b/__metadata__/model_class",
        "+++ b/__metadata__/quantization_config",
    ]
    # JSON values are pretty-printed with sorted keys, so the diff reads key by key.
    config_lines = [line[1:] for line in out if line.startswith("+  ")]
    assert '  "attention_head_dim": 128,' in config_lines
    layout = re.fullmatch(
        r"# header ([\d,]+) -> ([\d,]+) bytes \(([+-][\d,]+)\), data region at offset ([\d,]+) "
        r"\((8-byte aligned|NOT 8-byte aligned)\), ([\d,]+) bytes spare; strategy: (\w+) \((.+)\)",
        out[-1],
    )
    assert layout is not None, out[-1]
    old_len, new_len, delta, offset, aligned, spare, strategy, _ = layout.groups()

    def number(text: str) -> int:
        return int(text.replace(",", ""))

    assert number(old_len) == old.header_len
    assert number(new_len) - number(old_len) == number(delta)
    assert number(offset) == PREFIX_SIZE + number(new_len)
    assert (aligned == "8-byte aligned") == (number(offset) % ALIGNMENT == 0)
    assert f"would patch {path} ({strategy})" in dry.stderr.splitlines()
    # The real run does what the dry run said.
    real = run(os.fspath(path), "--config", dev_config)
    assert f"patched {path} ({strategy}, " in real.stderr
    after = read_header(path)
    assert after.header_len == number(new_len)
    assert after.padding == number(spare)


def test_dry_run_opens_files_read_only(make_file: MakeFile, dev_config: str, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_file()
    seen: list[int] = []
    real_open = os.open

    def spy(file: Any, flags: int, *args: Any, **kwargs: Any) -> int:
        if os.path.basename(os.fspath(file)) == path.name:
            seen.append(flags)
        return real_open(file, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", spy)
    for mode in ("--dry-run", "--check"):
        result = run(os.fspath(path), "--config", dev_config, mode)
        assert result.exit_code in (0, 1), result.stderr
    assert seen, "the file was never opened"
    assert all(flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC) == 0 for flags in seen)


def test_check_exits_1_when_work_is_found_then_0_after_patching(make_file: MakeFile, dev_config: str) -> None:
    path = make_file()
    before = snapshot(path)
    check = run(os.fspath(path), "--config", dev_config, "--check")
    assert check.exit_code == ExitCode.NEEDS_WORK
    assert check.stdout == ""  # --check alone prints no diff
    assert snapshot(path) == before
    assert run(os.fspath(path), "--config", dev_config).exit_code == ExitCode.OK
    assert run(os.fspath(path), "--config", dev_config, "--check").exit_code == ExitCode.OK


def test_batch_over_a_tree_keeps_going_past_a_broken_file(make_file: MakeFile, dev_config: str, tmp_path: Path) -> None:
    tree = tmp_path / "models"
    good = [make_file("a/one.safetensors", folder=tree), make_file("b/two.safetensors", folder=tree)]
    done = make_file("c/done.safetensors", folder=tree)
    assert run(os.fspath(done), "--config", dev_config, "-q").exit_code == 0
    broken = tree / "b" / "broken.safetensors"
    shutil.copyfile(FIXTURES / "invalid" / "too-small-7-bytes.safetensors", broken)
    (tree / "b" / "notes.txt").write_text("not a model")
    hidden = make_file(".cache/hidden.safetensors", folder=tree)
    hidden_before = snapshot(hidden)
    result = run(os.fspath(tree), "--config", dev_config)
    assert result.exit_code == ExitCode.FAILED
    assert errors(result) == [
        f"error: {broken}: file too small to be safetensors (expected at least 8 bytes, got 7 bytes). {HEADER_HINT}"
    ]
    assert result.stderr.splitlines()[-1] == "2 patched, 1 already correct, 1 failed"
    for path in good:
        metadata, _ = oracle_read(path)
        assert metadata is not None and "config" in metadata
    assert snapshot(hidden) == hidden_before  # hidden folders are not walked


def test_json_records_have_the_documented_fields(make_file: MakeFile, dev_config: str, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    make_file("good.safetensors", folder=tree)
    shutil.copyfile(FIXTURES / "invalid" / "nan.safetensors", tree / "nan.safetensors")
    result = run(os.fspath(tree), "--config", dev_config, "--json")
    assert result.exit_code == ExitCode.FAILED
    good, bad = json_records(result)
    for record in (good, bad):
        assert {"path", "status", "strategy", "findings", "error"} <= set(record)
    assert good["path"] == os.fspath(tree / "good.safetensors")
    assert good["status"] == "patched"
    assert good["strategy"] in ("fit", "insert", "copy")
    assert good["error"] is None
    assert good["findings"] == []
    assert good["inferred"]["family"]["value"] == "flux"
    assert good["inferred"]["rank"]["value"] == 32
    assert good["inferred"]["rank"]["evidence"]  # the tensors that said so
    assert (good["precision"], good["rank"], good["family"]) == ("int4", 32, "flux")
    assert [c["key"] for c in good["changes"]] == ["config", "comfy_config", "model_class", "quantization_config"]
    assert good["header"]["new_len"] == read_header(tree / "good.safetensors").header_len
    assert bad["status"] == "failed"
    assert bad["strategy"] is None
    assert bad["error"]["code"] == "invalid-json"
    assert bad["error"]["message"] == errors(result)[0].removeprefix("error: ")


def test_json_and_quiet_print_only_records(make_file: MakeFile, dev_config: str) -> None:
    path = make_file()
    result = run(os.fspath(path), "--config", dev_config, "--json", "-q")
    assert result.exit_code == 0
    assert result.stderr == ""
    (record,) = json_records(result)
    assert record["status"] == "patched"


def test_quiet_prints_nothing_but_errors(make_file: MakeFile, dev_config: str, tmp_path: Path) -> None:
    path = make_file()
    assert run(os.fspath(path), "--config", dev_config, "-q").stderr == ""
    missing = tmp_path / "missing.safetensors"
    result = run(os.fspath(missing), "--config", dev_config, "-q")
    assert result.stderr.splitlines() == [
        f"error: {missing}: no such file or directory. check the path; nothing was changed"
    ]


def test_verbose_shows_the_evidence(make_file: MakeFile, dev_config: str) -> None:
    path = make_file()
    result = run(os.fspath(path), "--config", dev_config, "-n", "-v")
    lines = [line.strip() for line in result.stderr.splitlines()]
    assert f"{path}: config from config file {dev_config}" in lines
    assert any(line.startswith("rank: 32 (") and "lora_down" in line for line in lines)
    quiet = run(os.fspath(path), "--config", dev_config, "-n")
    assert not any(line.strip().startswith("rank: 32") for line in quiet.stderr.splitlines())


def test_backup_then_restore_gives_back_the_original_header(make_file: MakeFile, dev_config: str) -> None:
    path = make_file()
    original_json = header_json(path)
    original = read_header(path)
    data = data_region(path)
    patched = run(os.fspath(path), "--config", dev_config, "--backup")
    backup = Path(splice.backup_path(path))
    assert f"old header saved to {backup}" in patched.stderr
    assert backup.read_bytes()[PREFIX_SIZE:].rstrip(b" ") == original_json
    restored = run("restore", os.fspath(path))
    assert restored.exit_code == ExitCode.OK, restored.stderr
    assert f"restored {path} from {backup} (" in restored.stderr
    assert not backup.exists()
    assert header_json(path) == original_json
    assert read_header(path).metadata is None and original.metadata is None
    assert data_region(path) == data
    again = run("restore", os.fspath(path))
    assert again.exit_code == ExitCode.FAILED
    assert errors(again) == [
        f"error: {path}: there is no backup to restore (expected {backup}). backups are made by patching with --backup"
    ]


def test_restore_of_a_folder_restores_every_backup_below_it(
    make_file: MakeFile, dev_config: str, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    first = make_file("x/one.safetensors", folder=tree)
    second = make_file("two.safetensors", folder=tree)
    untouched = make_file("three.safetensors", folder=tree)
    originals = {p: header_json(p) for p in (first, second)}
    assert run(os.fspath(first), os.fspath(second), "--config", dev_config, "--backup").exit_code == 0
    result = run("restore", os.fspath(tree), "--json")
    assert result.exit_code == ExitCode.OK, result.stderr
    assert [r["path"] for r in json_records(result)] == [os.fspath(second), os.fspath(first)]
    assert all(header_json(p) == original for p, original in originals.items())
    assert read_header(untouched).metadata is None
    # Nothing left to restore is not a failure.
    empty = run("restore", os.fspath(tree))
    assert empty.exit_code == ExitCode.OK
    assert errors(empty) == []
    assert empty.stderr.splitlines() == [
        f"nothing to restore in {tree}: no backup or interrupted patch below it",
        "1 nothing to restore",
    ]
    (record,) = json_records(run("restore", os.fspath(tree), "--json"))
    assert record["status"] == "nothing to restore"


def test_output_writes_a_patched_copy_and_leaves_the_source(
    make_file: MakeFile, dev_config: str, tmp_path: Path
) -> None:
    path = make_file()
    before = snapshot(path)
    out = tmp_path / "out" / "patched.safetensors"
    out.parent.mkdir()
    result = run(os.fspath(path), "--config", dev_config, "-o", os.fspath(out))
    assert result.exit_code == 0, result.stderr
    assert snapshot(path) == before
    assert f"wrote {out}: a patched copy of {path} (output, " in result.stderr
    metadata, _ = oracle_read(out)
    assert metadata is not None and json.loads(metadata["config"])["num_layers"] == 19
    assert data_region(out) == data_region(path)


# --------------------------------------------------------------------------------------------
# Refusals: one exact line each, the file untouched


def test_missing_file_and_empty_folder(make_file: MakeFile, tmp_path: Path) -> None:
    missing = tmp_path / "nope.safetensors"
    empty = tmp_path / "empty"
    (empty / "sub").mkdir(parents=True)
    (empty / "sub" / "readme.md").write_text("no models here")
    # A path that does not exist is a usage error, found before anything is written.
    present = make_file()
    before = snapshot(present)
    result = run(os.fspath(present), os.fspath(missing), os.fspath(empty), "--model", "flux.1-dev")
    assert result.exit_code == ExitCode.USAGE
    assert errors(result) == [f"error: {missing}: no such file or directory. check the path; nothing was changed"]
    assert snapshot(present) == before
    result = run(os.fspath(empty), "--model", "flux.1-dev")
    assert result.exit_code == ExitCode.FAILED
    assert errors(result) == [
        f"error: {empty}: no .safetensors files in this folder or below it. "
        "pass a .safetensors file, or a folder that holds some",
    ]
    assert result.stderr.splitlines()[-1] == "1 failed"


def test_invalid_header_fixture_is_one_line_without_traceback(tmp_path: Path) -> None:
    fixture = FIXTURES / "invalid" / "n-past-eof.safetensors"
    name = os.fspath(fixture)
    for args in (["inspect", name], ["validate", name], [name, "--model", "flux.1-dev"], [name, "-n", "--check"]):
        result = run(*args)
        assert result.exit_code == ExitCode.FAILED
        assert errors(result) == [
            f"error: {fixture}: header length prefix points past the end of the file "
            "(expected 8 + N <= 88 (file size), got N = 4,096). the file is truncated or not safetensors"
        ]
        assert "Traceback" not in result.output


@pytest.mark.parametrize("name", sorted(p.name for p in (FIXTURES / "invalid").glob("*.safetensors")))
def test_every_invalid_fixture_fails_with_one_error_line(name: str) -> None:
    result = run("inspect", os.fspath(FIXTURES / "invalid" / name))
    assert result.exit_code == ExitCode.FAILED
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"error: {FIXTURES / 'invalid' / name}: ")
    assert result.stdout == ""


FLUX_MISSING = (
    "x_embedder, context_embedder, time_text_embed.timestep_embedder, time_text_embed.text_embedder, "
    "norm_out.linear, proj_out"
)


def test_blocks_only_file_is_refused_even_with_a_model(make_file: MakeFile, dev_config: str) -> None:
    path = make_file("old/transformer_blocks.safetensors", kind="blocks")
    before = snapshot(path)
    for extra in ([], ["--model", "flux.1-dev"], ["--config", dev_config], ["--dry-run"], ["--check"]):
        result = run(os.fspath(path), *extra)
        assert result.exit_code == ExitCode.FAILED, (extra, result.stderr)
        assert errors(result) == [
            f"error: {path}: holds only the quantized blocks: the unquantized layers {FLUX_MISSING} are missing "
            "(Nunchaku's Flux V2 class fails with AssertionError, the V1 class loads it with those weights silently "
            "uninitialised). use the whole conversion: deepcompressor writes these layers to "
            "unquantized_layers.safetensors beside transformer_blocks.safetensors; `nunchaku-patch merge DIR` "
            "makes one loadable file of the two (--force writes metadata to this half anyway)"
        ], extra
        assert snapshot(path) == before


def test_blocks_only_file_with_its_sibling_points_at_merge(make_file: MakeFile, tmp_path: Path) -> None:
    path = make_file("old/transformer_blocks.safetensors", kind="blocks")
    (tmp_path / "old" / "unquantized_layers.safetensors").write_bytes(b"")
    result = run(os.fspath(path), "--model", "flux.1-dev")
    assert result.exit_code == ExitCode.FAILED
    (line,) = errors(result)
    assert line.endswith(
        f"merge it with the unquantized_layers.safetensors beside it: nunchaku-patch merge {tmp_path / 'old'}"
    )


def test_force_writes_a_blocks_only_file_with_a_warning(make_file: MakeFile) -> None:
    path = make_file("old/transformer_blocks.safetensors", kind="blocks")
    result = run(os.fspath(path), "--model", "flux.1-dev", "--force")
    assert result.exit_code == ExitCode.OK, result.stderr
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert any(
        "holds only the quantized blocks" in w
        and "time_text_embed.guidance_embedder" in w
        and "V2" in w
        and w.endswith("(overridden by --force)")
        for w in warnings
    ), warnings
    metadata, _ = oracle_read(path)
    assert metadata is not None and "config" in metadata
    # And validate never calls it ok, for any loader.
    checked = run("validate", "--json", os.fspath(path))
    assert checked.exit_code == ExitCode.NEEDS_WORK
    (record,) = json_records(checked)
    assert record["status"] == "needs work"
    assert not any(verdict["ok"] for verdict in record["verdicts"].values())
    assert any(f["code"] == "missing-unquantized" for f in record["findings"])


def test_schnell_config_on_dev_weights_is_refused_unless_forced(make_file: MakeFile, schnell_config: str) -> None:
    path = make_file()
    before = snapshot(path)
    result = run(os.fspath(path), "--config", schnell_config)
    assert result.exit_code == ExitCode.FAILED
    assert errors(result) == [
        f"error: {path}: config guidance_embeds does not match the tensors: the file has a guidance embedder "
        "(a guidance-distilled, dev-like model) (expected true (time_text_embed.guidance_embedder.linear_1.weight), "
        f"got false). config used: config file {schnell_config}; name the right model with --model or --config, "
        "or pass --force to write it anyway"
    ]
    assert snapshot(path) == before
    forced = run(os.fspath(path), "--config", schnell_config, "--force")
    assert forced.exit_code == ExitCode.OK, forced.stderr
    assert any(
        line.startswith(f"warning: {path}: config guidance_embeds does not match") and "(overridden by --force)" in line
        for line in forced.stderr.splitlines()
    )
    metadata, _ = oracle_read(path)
    assert metadata is not None and json.loads(metadata["config"])["guidance_embeds"] is False


@pytest.mark.parametrize(
    ("option", "line"),
    [
        (
            ["--rank", "128"],
            "--rank 128 contradicts the tensors (expected 32 (shape[1] of 304 lora_down tensor(s), checked against "
            "the up projections and qweight), got 128). drop --rank, or pass --force to write it anyway",
        ),
        (
            ["--precision", "nvfp4"],
            "--precision nvfp4 contradicts the tensors (expected int4 (no 8-bit float tensor; W4A4 wscales are "
            "BF16), got nvfp4). drop --precision, or pass --force to write it anyway",
        ),
    ],
)
def test_overrides_that_contradict_the_tensors_are_refused(
    make_file: MakeFile, dev_config: str, option: list[str], line: str
) -> None:
    path = make_file()
    before = snapshot(path)
    result = run(os.fspath(path), "--config", dev_config, *option)
    assert result.exit_code == ExitCode.FAILED
    assert errors(result) == [f"error: {path}: {line}"]
    assert snapshot(path) == before


def test_symlink_is_refused_then_followed_on_request(make_file: MakeFile, dev_config: str, tmp_path: Path) -> None:
    target = make_file("blob.safetensors")
    link = tmp_path / "link.safetensors"
    link.symlink_to(target.name)
    before = snapshot(target)
    result = run(os.fspath(link), "--config", dev_config)
    assert result.exit_code == ExitCode.FAILED
    assert errors(result) == [
        f"error: {link}: is a symbolic link; writing through it would change the file it points to, which other "
        f"paths may share (a Hugging Face cache blob). write a patched copy with -o, or pass --follow-symlinks to "
        f"patch {target}"
    ]
    assert snapshot(target) == before
    followed = run(os.fspath(link), "--config", dev_config, "--follow-symlinks")
    assert followed.exit_code == ExitCode.OK, followed.stderr
    assert link.is_symlink()
    metadata, _ = oracle_read(target)
    assert metadata is not None and "config" in metadata


def test_broken_symlink(tmp_path: Path) -> None:
    link = tmp_path / "dangling.safetensors"
    link.symlink_to("gone.safetensors")
    result = run(os.fspath(link), "--model", "flux.1-dev")
    assert result.exit_code == ExitCode.FAILED
    assert errors(result) == [
        f"error: {link}: is a broken symbolic link (expected a link to a file, got a link to gone.safetensors, which "
        "is missing). fix or remove the link"
    ]


def test_read_only_file_is_refused_with_a_way_out(make_file: MakeFile, dev_config: str) -> None:
    path = make_file()
    path.chmod(0o444)
    before = snapshot(path)
    result = run(os.fspath(path), "--config", dev_config)
    assert result.exit_code == ExitCode.FAILED
    assert errors(result) == [
        f"error: {path}: is read-only (mode 0444). make it writable (chmod u+w) or write a patched copy with -o"
    ]
    assert snapshot(path) == before


def test_a_file_that_is_already_correct_is_not_refused_for_being_read_only(
    make_file: MakeFile, dev_config: str
) -> None:
    path = make_file()
    assert run(os.fspath(path), "--config", dev_config).exit_code == 0
    path.chmod(0o444)
    result = run(os.fspath(path), "--config", dev_config)
    assert result.exit_code == ExitCode.OK
    assert f"already correct {path}" in result.stderr


# --------------------------------------------------------------------------------------------
# Usage errors: exit 2, one line, nothing read


@pytest.mark.parametrize(
    ("args", "line"),
    [
        (
            ["a.safetensors", "b.safetensors", "-o", "c.safetensors"],
            "error: -o/--output takes exactly one input file (got 2 inputs). patch several files in place, or run once "
            "per file",
        ),
        (
            ["a.safetensors", "-o", "c.safetensors", "--backup"],
            "error: --backup and -o/--output do not mix: -o never changes the source, so there is nothing to back up. "
            "drop --backup",
        ),
        (
            ["a.safetensors", "--precision", "int8"],
            "error: invalid value for '--precision': 'int8' is not one of 'int4', 'nvfp4'. see 'nunchaku-patch patch "
            "--help'",
        ),
        (
            ["a.safetensors", "--modle", "x"],
            "error: no such option --modle (did you mean --model or --model-path or --model-class?). see "
            "'nunchaku-patch patch --help'",
        ),
        (["--model"], "error: option '--model' requires an argument. see 'nunchaku-patch patch --help'"),
        (["validate"], "error: missing argument 'PATH...'. see 'nunchaku-patch validate --help'"),
        (["a.safetensors", "--config", "nowhere.json"], "error: nowhere.json: config file not found. Check the path"),
        (
            ["a.safetensors", "--model", "flux.9"],
            "error: unknown model name 'flux.9'. Did you mean flux.1-dev? Known models: flux.1-dev, flux.1-schnell, "
            "flux.1-fill-dev, flux.1-canny-dev, flux.1-depth-dev, flux.1-kontext-dev, flux.1-krea-dev, shuttle-jaguar, "
            "qwen-image, qwen-image-edit, qwen-image-edit-2509, sana-1600m, z-image-turbo, sdxl, sdxl-turbo, t5-xxl; "
            "or pass --config FILE",
        ),
        (
            ["a.safetensors", "--comfy-config", "nowhere.json"],
            "error: nowhere.json: comfy_config file not found. check the path",
        ),
        # A mistyped command is never taken as a file while the other arguments get patched.
        (
            ["valdiate", "a.safetensors"],
            "error: no such command 'valdiate' (did you mean validate?). see 'nunchaku-patch --help'",
        ),
        (
            ["inpsect", "a.safetensors"],
            "error: no such command 'inpsect' (did you mean inspect?). see 'nunchaku-patch --help'",
        ),
        (["pach", "a.safetensors"], "error: no such command 'pach' (did you mean patch?). see 'nunchaku-patch --help'"),
        (
            ["a.safetensors", "gone.safetensors"],
            "error: gone.safetensors: no such file or directory. check the path; nothing was changed",
        ),
        (
            ["validate", "a.safetensors", "gone"],
            "error: gone: no such file or directory. check the path; nothing was changed",
        ),
        (["restore", "gone"], "error: gone: no such file or directory. check the path; nothing was changed"),
        (["merge", "gone"], "error: gone: no such file or directory. check the path; nothing was changed"),
        # Each YAML takes its own --config-yaml: a second one given bare is not a file to patch.
        (
            ["a.safetensors", "--config-yaml", "model.yaml", "svdquant.yaml"],
            "error: svdquant.yaml: is a YAML file where a .safetensors file or folder is expected. give each "
            "deepcompressor YAML its own --config-yaml: --config-yaml model.yaml --config-yaml svdquant.yaml",
        ),
    ],
)
def test_usage_errors_exit_2_with_one_line(make_file: MakeFile, args: list[str], line: str) -> None:
    make_file("a.safetensors")
    before = snapshot(Path("a.safetensors"))
    result = run(*args)
    assert result.exit_code == ExitCode.USAGE
    assert result.stderr.splitlines() == [line]
    assert snapshot(Path("a.safetensors")) == before


def test_a_bad_config_option_fails_once_for_a_whole_batch(make_file: MakeFile, tmp_path: Path) -> None:
    for name in ("a", "b", "c"):
        make_file(f"{name}.safetensors", folder=tmp_path / "tree")
    result = run(os.fspath(tmp_path / "tree"), "--config", "nowhere.json")
    assert result.exit_code == ExitCode.USAGE
    assert len(errors(result)) == 1


def test_bare_command_shows_help_and_version() -> None:
    assert "Usage: nunchaku-patch" in run().output
    version = run("--version")
    assert version.exit_code == 0 and version.stdout.strip() == f"nunchaku-patch, version {__version__}"
    assert "Exit codes: 0 done" in run("--help").stdout


# --------------------------------------------------------------------------------------------
# validate and inspect


def test_validate_exit_codes_and_verbose_checks(make_file: MakeFile, dev_config: str) -> None:
    path = make_file()
    before = validate = run("validate", os.fspath(path))
    assert validate.exit_code == ExitCode.NEEDS_WORK
    assert validate.stdout.splitlines()[0] == f"{path}: needs work"
    assert "fails to load in: nunchaku, nunchaku-v2, comfyui-nunchaku" in validate.stdout
    assert validate.stdout.splitlines()[-1] == f"  fix: nunchaku-patch {path}"
    assert before.stderr == ""
    verbose = run("validate", "-v", os.fspath(path)).stdout.splitlines()
    # Checks that could not run say so; they are not ticks.
    assert "  - weight.dtype matches the tensors: skipped (no __metadata__)" in verbose
    assert "  - config matches the tensors: skipped (no __metadata__)" in verbose
    run(os.fspath(path), "--config", dev_config)
    good = run("validate", "-v", os.fspath(path))
    assert good.exit_code == ExitCode.OK
    lines = good.stdout.splitlines()
    assert lines[0] == f"{path}: ok"
    assert "  ✓ required fields present: comfy_config, config, quantization_config" in lines
    assert "  ✓ rank matches the tensors: 32 (tensors: 32)" in lines
    assert {"  nunchaku: ok", "  nunchaku-v2: ok", "  comfyui-nunchaku: ok"} <= set(lines)


def test_validate_json_and_a_broken_file(make_file: MakeFile, dev_config: str, tmp_path: Path) -> None:
    good = make_file()
    run(os.fspath(good), "--config", dev_config)
    broken = tmp_path / "broken.safetensors"
    shutil.copyfile(FIXTURES / "invalid" / "nan.safetensors", broken)
    result = run("validate", "--json", os.fspath(good), os.fspath(broken))
    assert result.exit_code == ExitCode.FAILED
    ok, bad = json_records(result)
    assert ok["status"] == "valid" and ok["verdicts"]["comfyui-nunchaku"]["ok"] is True
    assert bad["status"] == "failed" and bad["error"]["code"] == "invalid-json"
    assert result.stderr.splitlines()[-1] == "1 valid, 1 failed"


def test_inspect_shows_counts_dtypes_layout_evidence_and_pretty_metadata(make_file: MakeFile, dev_config: str) -> None:
    path = make_file()
    run(os.fspath(path), "--config", dev_config)
    header = read_header(path)
    with safe_open(os.fspath(path), framework="np") as handle:
        dtypes = Counter(handle.get_slice(name).get_dtype() for name in handle.keys())  # noqa: SIM118
    result = run("inspect", os.fspath(path))
    assert result.exit_code == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == str(path)
    assert f"tensors: {sum(dtypes.values()):,} (" in lines[2]
    for dtype, count in dtypes.items():
        assert any(re.fullmatch(rf"  {dtype}\s+{count:,} tensors\s+.*%", line) for line in lines), dtype
    assert (
        f"header: {header.header_len:,} bytes ({header.json_len:,} of JSON, {header.padding:,} spare" in result.stdout
    )
    assert f"data: {header.data_len:,} bytes at offset {header.data_start:,} (8-byte aligned)" in lines
    assert any(line.startswith("  rank: 32 (") and "lora_down" in line for line in lines)
    assert "metadata: 4 entries" in lines
    start = lines.index("  config:")
    assert lines[start + 1] == "    {"
    assert lines[start + 2] == '      "_class_name": "FluxTransformer2DModel",'
    assert "  model_class: NunchakuFluxTransformer2dModel" in lines
    record = json_records(run("inspect", "--json", os.fspath(path)))[0]
    assert record["tensors"] == len(header.tensors)
    assert {k: v["count"] for k, v in record["dtypes"].items()} == dict(dtypes)
    assert record["spare"] == header.padding and record["aligned"] is True
    assert json.loads(record["metadata"]["config"])["num_layers"] == 19


def test_inspect_of_an_old_conversion_says_it_has_no_metadata(make_file: MakeFile) -> None:
    path = make_file()
    result = run("inspect", os.fspath(path))
    assert result.stdout.splitlines()[-2] == "metadata: none (no __metadata__)"


def test_inspect_of_a_folder_is_refused_with_a_hint(tmp_path: Path) -> None:
    result = run("inspect", os.fspath(tmp_path))
    assert errors(result) == [
        f"error: {tmp_path}: no .safetensors files in this folder or below it. "
        "pass a .safetensors file, or a folder that holds some"
    ]


# --------------------------------------------------------------------------------------------
# Colour, progress and the report


class _Tty:
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_colour_only_on_a_terminal_and_never_with_no_color(monkeypatch: pytest.MonkeyPatch) -> None:
    assert console.colour_for(_Tty()) is True
    monkeypatch.setenv("NO_COLOR", "1")
    assert console.colour_for(_Tty()) is False
    monkeypatch.delenv("NO_COLOR")
    assert console.colour_for(object()) is False  # a pipe or a file
    out = console.Console()
    out.color_out = True
    assert out.style("x", fg="red") != "x"
    out.color_out = False
    assert out.style("x", fg="red") == "x"


def test_output_to_a_pipe_has_no_escape_codes(make_file: MakeFile, dev_config: str) -> None:
    path = make_file()
    result = run(os.fspath(path), "--config", dev_config, "-n")
    assert "\x1b" not in result.output


def test_report_owns_the_exit_code() -> None:
    def report(*statuses: Status, check: bool = True) -> Report:
        out = Report(check=check)
        for status in statuses:
            out.add(Record("f", status))
        return out

    assert report().exit_code == ExitCode.OK
    assert report(Status.PATCHED, Status.UNCHANGED).exit_code == ExitCode.OK
    assert report(Status.WOULD_PATCH).exit_code == ExitCode.NEEDS_WORK
    assert report(Status.WOULD_PATCH, check=False).exit_code == ExitCode.OK
    assert report(Status.INVALID, check=False).exit_code == ExitCode.NEEDS_WORK
    assert report(Status.WOULD_PATCH, Status.FAILED).exit_code == ExitCode.FAILED
    assert report(Status.UNCHANGED, Status.PATCHED, Status.PATCHED, Status.FAILED).summary() == (
        "2 patched, 1 already correct, 1 failed"
    )
    assert report().summary() == "no files"


# --------------------------------------------------------------------------------------------
# Already-patched files, files that are not conversions, and the unexpected


def test_already_patched_files_are_left_alone_without_options(
    make_file: MakeFile, dev_config: str, schnell_config: str, tmp_path: Path
) -> None:
    """A fine-tune patched with its own config must not get a re-derived one when a batch runs without options."""
    tree = tmp_path / "mixed"
    other = make_file("patched/other.safetensors", kind="schnell", folder=tree)
    full = make_file("patched/full.safetensors", folder=tree)
    assert run(os.fspath(full), "--config", dev_config, "-q").exit_code == 0
    assert run(os.fspath(other), "--config", schnell_config, "-q").exit_code == 0
    before = {p: snapshot(p) for p in (other, full)}
    result = run(os.fspath(tree))  # no --model: each file's own config is kept, none re-derived
    assert result.exit_code == ExitCode.OK, result.stderr
    assert result.stderr.splitlines()[-1] == "2 already correct"
    assert {p: snapshot(p) for p in before} == before
    # An option that asks for a change is obeyed, and the file's own config is kept.
    renamed = run(os.fspath(full), "--model-class", "MyNunchakuFlux")
    assert renamed.exit_code == ExitCode.OK, renamed.stderr
    metadata, _ = oracle_read(full)
    assert metadata is not None and metadata["model_class"] == "MyNunchakuFlux"
    assert json.loads(metadata["config"]) == json.loads(Path(dev_config).read_text())


def test_a_file_that_is_not_a_conversion_is_refused(tmp_path: Path) -> None:
    plain = tmp_path / "plain.safetensors"
    shutil.copyfile(FIXTURES / "valid" / "every-dtype.safetensors", plain)
    before = snapshot(plain)
    result = run(os.fspath(plain))
    assert result.exit_code == ExitCode.FAILED
    count = len(read_header(plain).tensors)
    assert errors(result) == [
        f"error: {plain}: is not an SVDQuant (Nunchaku) conversion: no quantized layer and no known model's tensor "
        f"names (expected W4A4 layers (*.qweight with *.wscales and a low-rank branch), got {count} tensor(s) of "
        "another kind). nunchaku-patch only adds metadata to Nunchaku SVDQuant files; check that this is the right file"
    ]
    assert snapshot(plain) == before


def test_an_internal_error_is_one_line_and_the_traceback_needs_verbose(
    make_file: MakeFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = make_file()

    def broken(_path: Any) -> Any:
        raise RuntimeError("boom")

    monkeypatch.setattr(batch, "read_header", broken)
    result = run("inspect", os.fspath(path))
    assert result.exit_code == ExitCode.FAILED
    assert result.stderr.splitlines() == [
        f"error: {path}: internal error: RuntimeError: boom. please report this; -v shows the traceback"
    ]
    verbose = run("inspect", "-v", os.fspath(path))
    assert "Traceback (most recent call last)" in verbose.stderr


def test_ctrl_c_exits_130_with_one_line(make_file: MakeFile, monkeypatch: pytest.MonkeyPatch) -> None:
    path = make_file()

    def interrupted(_path: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(batch, "read_header", interrupted)
    result = run("validate", os.fspath(path))
    assert result.exit_code == ExitCode.INTERRUPTED
    assert errors(result) == ["error: interrupted; the files already done stay patched, the rest are untouched"]


def test_json_dry_run_carries_the_diff(make_file: MakeFile, dev_config: str) -> None:
    path = make_file()
    plain = run(os.fspath(path), "--config", dev_config, "--dry-run")
    (record,) = json_records(run(os.fspath(path), "--config", dev_config, "--dry-run", "--json"))
    assert record["status"] == "would patch"
    assert record["diff"] == plain.stdout.splitlines()[1:-1]  # the text output adds the two "# " lines
    assert record["header"]["old_len"] == read_header(path).header_len


# --------------------------------------------------------------------------------------------
# Issue 11: what a newcomer tripped on


def test_config_yaml_is_repeatable_and_its_rank_is_checked(
    make_file: MakeFile, dev_config: str, tmp_path: Path
) -> None:
    path = make_file()
    before = snapshot(path)
    model_dir = tmp_path / "flux-dev-diffusers"
    model_dir.mkdir()
    shutil.copyfile(dev_config, model_dir / "config.json")
    model_yaml = tmp_path / "model.yaml"
    model_yaml.write_text(f"pipeline:\n  name: flux.1-dev\n  path: {model_dir}\n")
    wrong = tmp_path / "svdquant-r128.yaml"
    wrong.write_text("quant:\n  wgts:\n    dtype: sint4\n    low_rank:\n      rank: 128\n")
    result = run(os.fspath(path), "--config-yaml", os.fspath(model_yaml), "--config-yaml", os.fspath(wrong))
    assert result.exit_code == ExitCode.FAILED, result.stderr
    (line,) = errors(result)
    assert "128" in line and "32" in line
    assert snapshot(path) == before
    right = tmp_path / "svdquant.yaml"
    right.write_text("quant:\n  wgts:\n    dtype: sint4\n    low_rank:\n      rank: 32\n")
    done = run(os.fspath(path), "--config-yaml", os.fspath(model_yaml), "--config-yaml", os.fspath(right))
    assert done.exit_code == ExitCode.OK, done.stderr
    assert "--config-yaml model.yaml --config-yaml svdquant.yaml" in run("patch", "--help").stdout


def test_check_prints_only_what_would_change_and_the_summary(
    make_file: MakeFile, dev_config: str, tmp_path: Path
) -> None:
    tree = tmp_path / "tree"
    done = make_file("done.safetensors", folder=tree)
    assert run(os.fspath(done), "--config", dev_config, "-q").exit_code == ExitCode.OK
    todo = make_file("todo.safetensors", folder=tree)
    result = run(os.fspath(tree), "--config", dev_config, "--check")
    assert result.exit_code == ExitCode.NEEDS_WORK
    assert result.stdout == ""
    assert result.stderr.splitlines() == [f"would patch {todo} (insert)", "1 would patch, 1 already correct"] or (
        result.stderr.splitlines()[1:] == ["1 would patch, 1 already correct"]
        and result.stderr.splitlines()[0].startswith(f"would patch {todo} (")
    )


def test_progress_follows_the_terminal_not_the_colour(monkeypatch: pytest.MonkeyPatch) -> None:
    written: list[str] = []

    class Terminal:
        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> None:
            written.append(text)

        def flush(self) -> None:
            pass

    monkeypatch.setattr("sys.stderr", Terminal())
    monkeypatch.setenv("NO_COLOR", "1")
    out = console.Console()
    assert not out.color_err
    out.progress(1, 2, "a.safetensors")
    assert written == ["\r\x1b[K[1/2] a.safetensors"]


def test_every_json_record_has_the_same_fields(make_file: MakeFile, dev_config: str, tmp_path: Path) -> None:
    tree = tmp_path / "tree"
    done = make_file("done.safetensors", folder=tree)
    assert run(os.fspath(done), "--config", dev_config, "-q").exit_code == ExitCode.OK
    make_file("todo.safetensors", folder=tree)
    (tree / "broken.safetensors").write_bytes(b"\x01")
    for args in (["--dry-run"], []):
        records = json_records(run(os.fspath(tree), "--config", dev_config, "--json", *args))
        assert {r["status"] for r in records} >= {"already correct", "failed"}
        keys = {tuple(r) for r in records}
        assert len(keys) == 1, keys
        for record in records:
            assert record["header"] is None or set(record["header"]) == {
                "old_len",
                "new_len",
                "spare",
                "data_offset",
                "aligned",
            }
    validated = json_records(run("validate", "--json", os.fspath(tree)))
    assert len({tuple(r) for r in validated}) == 1


def test_inspect_names_the_known_models_and_whether_it_needs_patching(make_file: MakeFile, dev_config: str) -> None:
    path = make_file()
    lines = run("inspect", os.fspath(path)).stdout.splitlines()
    assert "known models it matches: flux.1-dev, flux.1-kontext-dev, flux.1-krea-dev" in lines
    assert (
        "needs patching: yes (fails to load in: nunchaku, nunchaku-v2, comfyui-nunchaku); "
        f"fix: nunchaku-patch {path}" in lines
    )
    run(os.fspath(path), "--config", dev_config, "-q")
    record = json_records(run("inspect", "--json", os.fspath(path)))[0]
    assert record["needs_patching"] is False and record["fix"] is None
    assert "needs patching: no (every loader accepts it)" in run("inspect", os.fspath(path)).stdout.splitlines()
