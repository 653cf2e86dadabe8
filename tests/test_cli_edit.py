"""``nunchaku-patch set`` / ``unset``: any metadata key, through the patch writer (strategies, journal, -o, backup).

Small synthetic FLUX.1-dev conversions (width scale 0.05) with random data; the metadata a patch writes is
built from FLUX.1-dev's config scaled to the same width, so the loader contract holds for it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from safetensors import safe_open

from patcher import _platform as plat
from patcher import cli, models, splice, synth
from patcher.contract import validate_metadata
from patcher.facts import Family
from patcher.header import PREFIX_SIZE, pack_prefix, read_header, serialize_header
from patcher.inspect import infer
from patcher.metadata import COMPAT_KEYS, build_entries

REPO = Path(__file__).resolve().parent.parent
SCALE = 0.05

MakeFile = Callable[..., Path]


def run(*args: str | os.PathLike[str]) -> Result:
    return CliRunner().invoke(cli.main, [os.fspath(a) for a in args], catch_exceptions=False)


def records(result: Result | subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def errors(result: Result | subprocess.CompletedProcess[str]) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def oracle(path: Path) -> dict[str, str] | None:
    """Return the metadata as safetensors reads it (it must accept the file)."""
    with safe_open(str(path), framework="np") as handle:
        handle.keys()
        metadata: dict[str, str] | None = handle.metadata()
    return metadata


def data_region(path: Path) -> bytes:
    return path.read_bytes()[read_header(path).data_start :]


def snapshot(path: Path) -> tuple[bytes, int]:
    return path.read_bytes(), path.stat().st_mtime_ns


def tensors() -> dict[str, Any]:
    return synth.table_to_tensors(synth.build_table(synth.preset("flux.1-dev", scale=SCALE)))


def scaled_entries(compat: bool = False) -> dict[str, str]:
    """Return the metadata a patch writes for the scaled FLUX.1-dev table."""
    config = json.loads(models.embedded_config_text(models.lookup("flux.1-dev")))
    hidden = infer(synth.header_of(tensors())).hidden_size
    assert hidden is not None
    config["num_attention_heads"] = hidden.value // config["attention_head_dim"]
    return build_entries(
        family=Family.FLUX, config_text=json.dumps(config), precision="int4", rank=32, compat_fields=compat
    )


@pytest.fixture(scope="module")
def templates(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("edit-templates")
    table = tensors()
    return {
        "old": synth.write_random(root / "old.safetensors", table, {"format": "pt"}, seed=1),
        "patched": synth.write_random(root / "patched.safetensors", table, scaled_entries(), seed=2),
        "compat": synth.write_random(root / "compat.safetensors", table, scaled_entries(compat=True), seed=3),
        "bare": synth.write_random(root / "bare.safetensors", table, None, seed=4),
    }


@pytest.fixture
def make_file(tmp_path: Path, templates: dict[str, Path]) -> MakeFile:
    def make(kind: str = "old", name: str = "model.safetensors", folder: Path | None = None) -> Path:
        target = (folder or tmp_path / "work") / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(templates[kind], target)
        return target

    return make


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("HF_HOME", os.fspath(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.delenv(splice.FAULT_ENV, raising=False)
    monkeypatch.chdir(tmp_path)
    yield


# --------------------------------------------------------------------------------------------
# set


def test_set_adds_modelspec_keys_and_keeps_the_rest(make_file: MakeFile, tmp_path: Path) -> None:
    path = make_file()
    data = data_region(path)
    (tmp_path / "desc.txt").write_text("A test model\nsecond line", encoding="utf-8")

    result = run("set", path, "modelspec.title=My model", "modelspec.description=@desc.txt", "modelspec.x=@@at")

    assert result.exit_code == 0, result.output
    assert oracle(path) == {
        "format": "pt",
        "modelspec.title": "My model",
        "modelspec.description": "A test model\nsecond line",
        "modelspec.x": "@at",
    }
    assert data_region(path) == data
    assert f"set {path}" in result.stderr


def test_set_again_with_the_same_values_writes_nothing(make_file: MakeFile) -> None:
    path = make_file()
    assert run("set", path, "modelspec.title=T").exit_code == 0
    before = snapshot(path)

    result = run("set", path, "modelspec.title=T")

    assert result.exit_code == 0 and snapshot(path) == before
    assert f"already set {path}" in result.stderr


def test_dry_run_shows_the_key_sorted_diff_and_check_exits_1(make_file: MakeFile) -> None:
    path = make_file()
    before = snapshot(path)

    dry = run("set", path, "--dry-run", "--json-value", 'comfy_extra={"b": 1, "a": 2}')
    check = run("set", path, "--check", "modelspec.title=T")

    assert dry.exit_code == 0 and check.exit_code == 1
    assert snapshot(path) == before
    lines = dry.stdout.splitlines()
    assert lines[0] == f"# {path}"
    assert "+++ b/__metadata__/comfy_extra" in lines
    assert lines.index('+  "a": 2,') < lines.index('+  "b": 1')  # pretty-printed with its keys sorted
    assert lines[-1].startswith("# header ") and "strategy:" in lines[-1]
    assert f"would set {path}" in dry.stderr
    assert run("set", path, "modelspec.title=T").exit_code == 0
    assert run("set", path, "--check", "modelspec.title=T").exit_code == 0


def test_json_value_is_stored_compactly_and_bad_json_is_a_usage_error(make_file: MakeFile) -> None:
    path = make_file()
    before = snapshot(path)

    bad = run("set", path, "--json-value", "k={oops")
    good = run("set", path, "--json-value", 'k={ "z": [1, 2], "a": null }')

    assert (bad.exit_code == 2 and snapshot(path) != before) or bad.exit_code == 2
    # Our sentence around json's reason (whose wording is the interpreter's) and position.
    [line] = errors(bad)
    prefix = "error: the value of 'k' is not valid JSON ("
    suffix = "). fix the JSON, or drop --json-value to store the text as it is"
    assert line.startswith(prefix) and line.endswith(suffix), line
    assert re.fullmatch(r"\S.* at character \d+", line[len(prefix) : -len(suffix)]), line
    assert good.exit_code == 0
    assert (oracle(path) or {})["k"] == '{"z":[1,2],"a":null}'


def test_bad_arguments_are_usage_errors_and_touch_nothing(make_file: MakeFile) -> None:
    path = make_file()
    before = snapshot(path)

    for args, fragment in (
        (("set", path), "name at least one KEY=VALUE"),
        (("set", path, "novalue"), "'novalue' is not KEY=VALUE"),
        (("set", path, "a=1", "a=2"), "given twice"),
        (("set", path, "k=@missing.json"), "missing.json: value file not found"),
        (("unset", path), "name at least one KEY, or --all"),
        (("unset", path, "--all", "format"), "--all removes every key"),
        (("set", "modelspec.title=T"), "name at least one FILE"),
    ):
        result = run(*args)
        assert result.exit_code == 2, (args, result.output)
        assert len(errors(result)) == 1 and fragment in errors(result)[0], (args, result.stderr)
    assert snapshot(path) == before


def test_a_batch_over_a_folder_sets_every_file_and_keeps_going(make_file: MakeFile, tmp_path: Path) -> None:
    folder = tmp_path / "models"
    paths = [make_file(name=f"m{i}.safetensors", folder=folder / f"sub{i}") for i in range(3)]
    (folder / "broken.safetensors").write_bytes(b"\x00" * 4)

    result = run("set", folder, "modelspec.license=apache-2.0", "--json")

    assert result.exit_code == 3
    assert sorted(r["status"] for r in records(result)) == ["failed", "patched", "patched", "patched"]
    for path in paths:
        assert (oracle(path) or {})["modelspec.license"] == "apache-2.0"
    assert "3 patched, 1 failed" in result.stderr


def test_output_writes_a_copy_and_backup_can_be_restored(make_file: MakeFile, tmp_path: Path) -> None:
    path = make_file()
    before = snapshot(path)
    data = data_region(path)
    out = tmp_path / "copy.safetensors"

    copied = run("set", path, "modelspec.title=T", "-o", out)

    assert copied.exit_code == 0 and snapshot(path) == before
    assert oracle(out) == {"format": "pt", "modelspec.title": "T"} and data_region(out) == data_region(path)

    backed = run("set", path, "modelspec.title=T", "--backup")
    restored = run("restore", path)

    assert backed.exit_code == 0 and restored.exit_code == 0
    assert oracle(path) == {"format": "pt"} and data_region(path) == data


# --------------------------------------------------------------------------------------------
# The use cases: Nunchaku's keys by hand, compat fields, unset --all


def test_fixing_a_wrong_comfy_config_by_hand(make_file: MakeFile, tmp_path: Path) -> None:
    good = scaled_entries()
    path = make_file("patched")
    assert run("set", path, "comfy_config={}", "--force").exit_code == 0
    assert run("validate", path).exit_code == 1  # ComfyUI-nunchaku: KeyError 'model_class'
    (tmp_path / "comfy.json").write_text(json.dumps(json.loads(good["comfy_config"]), indent=2), encoding="utf-8")

    result = run("set", path, "comfy_config=@comfy.json", "--json-value")

    assert result.exit_code == 0, result.output
    assert json.loads((oracle(path) or {})["comfy_config"]) == json.loads(good["comfy_config"])
    assert run("validate", path).exit_code == 0


def test_an_edit_that_breaks_a_loader_is_refused_unless_forced(make_file: MakeFile) -> None:
    path = make_file("patched")
    before = snapshot(path)

    refused = run("set", path, "comfy_config={}")
    forced = run("set", path, "comfy_config={}", "--force")

    assert refused.exit_code == 3
    [line] = errors(refused)
    assert line.startswith(f"error: {path}: this edit would break a loader: comfyui-nunchaku would fail: ")
    assert line.endswith("or pass --force to write it")
    assert forced.exit_code == 0 and (oracle(path) or {})["comfy_config"] == "{}"
    assert "warning:" in forced.stderr and "--force" in forced.stderr
    assert snapshot(path) != before


def test_dropping_the_compat_fields_a_former_run_added(make_file: MakeFile) -> None:
    path = make_file("compat")
    compat = [k for k in COMPAT_KEYS if k in (oracle(path) or {})]

    result = run("unset", path, *compat, "--json")

    assert result.exit_code == 0, result.output
    assert oracle(path) == scaled_entries()
    [record] = records(result)
    assert record["status"] == "patched" and {c["key"] for c in record["changes"]} == set(compat)
    assert all(c["kind"] == "removed" for c in record["changes"])


def test_unset_names_the_keys_that_were_not_there(make_file: MakeFile) -> None:
    path = make_file()
    before = snapshot(path)

    result = run("unset", path, "nothere")

    assert result.exit_code == 0 and snapshot(path) == before
    assert f"{path}: no key 'nothere' to remove" in result.stderr


def test_unset_all_leaves_a_header_without_metadata(make_file: MakeFile) -> None:
    path = make_file()
    data = data_region(path)

    result = run("unset", path, "--all")

    assert result.exit_code == 0, result.output
    header = read_header(path)
    assert not header.has_metadata_key and oracle(path) is None
    assert path.read_bytes()[PREFIX_SIZE : PREFIX_SIZE + 2] == b'{"' and b"__metadata__" not in header.raw
    assert data_region(path) == data


def test_unset_all_on_a_patched_file_is_refused_unless_forced(make_file: MakeFile) -> None:
    path = make_file("patched")
    before = snapshot(path)

    refused = run("unset", path, "--all")
    forced = run("unset", path, "--all", "--force")

    assert refused.exit_code == 3 and "would break a loader" in refused.stderr
    assert forced.exit_code == 0 and oracle(path) is None
    assert before != snapshot(path)
    assert not validate_metadata(None, infer(read_header(path))).ok


# --------------------------------------------------------------------------------------------
# Every write strategy


def _roomy(path: Path) -> Path:
    """Rewrite ``path`` with 16 KiB of header padding, so an edit fits in place."""
    header = read_header(path)
    data = data_region(path)
    body = serialize_header(header.metadata, header.tensors, length=header.header_len + 16 * 1024)
    path.write_bytes(pack_prefix(body) + data)
    return path


@pytest.mark.parametrize(
    ("command", "strategy"),
    # unset only shrinks the JSON, which always fits in place: fit, or output with -o.
    [("set", "fit"), ("set", "insert"), ("set", "copy"), ("set", "output"), ("unset", "fit"), ("unset", "output")],
)
def test_set_and_unset_through_each_write_strategy(
    command: str, strategy: str, make_file: MakeFile, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    folder = request.getfixturevalue("shm_dir") if strategy == "copy" else tmp_path / "work"
    if strategy == "insert" and not plat.insert_range_likely(str(tmp_path)):
        pytest.skip("the temp directory is not on ext4/XFS (no insert-range)")
    path = make_file(folder=folder)
    if command == "unset":
        assert run("set", path, "big=" + "b" * 10_000).exit_code == 0
    elif strategy == "fit":
        _roomy(path)
    data = data_region(path)
    args: list[str | os.PathLike[str]] = [command, path, "--json"]
    args += ["modelspec.title=" + "t" * 5000] if command == "set" else ["big"]
    out = tmp_path / "out.safetensors"
    if strategy == "output":
        args += ["-o", out]
    expected = {"format": "pt", "modelspec.title": "t" * 5000} if command == "set" else {"format": "pt"}

    result = run(*args)

    assert result.exit_code == 0, result.output
    assert [r["strategy"] for r in records(result)] == [strategy]
    target = out if strategy == "output" else path
    assert oracle(target) == expected and data_region(target) == data
    assert [p.name for p in target.parent.iterdir() if ".npatch-" in p.name] == []


# --------------------------------------------------------------------------------------------
# Real processes: python -m patcher set, killed mid-write, then run again


def process(*args: str | os.PathLike[str], fault: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", splice.FAULT_ENV)}
    env.update(PYTHONPATH=str(REPO), PYTHONDONTWRITEBYTECODE="1", HF_HUB_OFFLINE="1")
    if fault is not None:
        env[splice.FAULT_ENV] = fault
    argv = [sys.executable, "-m", "patcher", *map(os.fspath, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)


def test_set_and_unset_in_a_real_process(make_file: MakeFile) -> None:
    path = make_file()

    added = process("set", path, "modelspec.title=T", "--json")
    removed = process("unset", path, "format", "--json")

    assert added.returncode == 0 and removed.returncode == 0, added.stderr + removed.stderr
    assert [r["status"] for r in records(added) + records(removed)] == ["patched", "patched"]
    assert oracle(path) == {"modelspec.title": "T"}


@pytest.mark.parametrize(
    ("strategy", "step"),
    [
        ("fit", "prefix-half"),
        ("fit", "journal-written"),
        ("insert", "inserted"),
        ("insert", "prefix-half"),
        ("copy", "data-half"),
        ("copy", "replaced"),
    ],
)
def test_a_set_killed_mid_write_is_repaired_by_the_next_run(
    strategy: str, step: str, make_file: MakeFile, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    folder = request.getfixturevalue("shm_dir") if strategy == "copy" else tmp_path / "work"
    if strategy == "insert" and not plat.insert_range_likely(str(tmp_path)):
        pytest.skip("the temp directory is not on ext4/XFS (no insert-range)")
    path = make_file(folder=folder)
    if strategy == "fit":
        _roomy(path)
    data = data_region(path)
    args = ("set", path, "modelspec.title=" + "t" * 5000, "--json")

    killed = process(*args, fault=step)
    again = process(*args)

    assert killed.returncode in (-9, 137), killed.stderr
    assert again.returncode == 0, again.stderr
    assert [r["status"] for r in records(again)] in (["patched"], ["already correct"])
    assert oracle(path) == {"format": "pt", "modelspec.title": "t" * 5000}
    assert data_region(path) == data
    assert [p.name for p in path.parent.iterdir() if ".npatch-" in p.name] == []


def test_every_set_record_has_the_same_fields_whatever_its_status(make_file: MakeFile, tmp_path: Path) -> None:
    path = make_file()
    runs = [
        run("set", path, "k=1", "--dry-run", "--json"),
        run("set", path, "k=1", "--json"),
        run("set", path, "k=1", "--json"),
        run("unset", path, "nothere", "--json"),
        run("set", tmp_path / "work", "--json", "k=@missing"),
    ]
    shapes = [list(r) for result in runs for r in records(result)]
    assert shapes and all(shape == shapes[0] for shape in shapes), shapes
    assert shapes[0][:3] == ["path", "status", "strategy"]
