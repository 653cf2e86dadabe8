"""``inspect --tensors / --filter / --markdown / A B --diff``, ``nunchaku-patch models`` and shell completion."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from click.shell_completion import ShellComplete
from click.testing import CliRunner, Result

from patcher import cli, models, synth
from patcher.facts import PRECISIONS
from patcher.header import read_header
from patcher.tensors import diff_headers, tensor_rows

REPO = Path(__file__).resolve().parent.parent
SCRIPT = Path(sys.executable).parent / "nunchaku-patch"
COMPLETE_VAR = "_NUNCHAKU_PATCH_COMPLETE"


def run(*args: str | os.PathLike[str]) -> Result:
    return CliRunner().invoke(cli.main, [os.fspath(a) for a in args], catch_exceptions=False)


def records(result: Result | subprocess.CompletedProcess[str]) -> list[dict[str, Any]]:
    return [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]


def errors(result: Result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error:")]


def process(*args: str | os.PathLike[str], **extra: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("NO_COLOR", COMPLETE_VAR)}
    env.update(PYTHONPATH=str(REPO), HF_HUB_OFFLINE="1", **extra)
    argv = [sys.executable, "-m", "patcher", *map(os.fspath, args)]
    return subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120, check=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tool-files")
    dev = synth.table_to_tensors(synth.build_table(synth.preset("flux.1-dev", scale=0.05)))
    fp4 = synth.table_to_tensors(synth.build_table(synth.preset("flux.1-dev", scale=0.05, precision="nvfp4")))
    return {
        "dev": synth.write_random(root / "dev.safetensors", dev, {"format": "pt"}, seed=1),
        "fp4": synth.write_random(root / "fp4.safetensors", fp4, {"format": "pt", "x": "1"}, seed=2),
    }


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    monkeypatch.setenv("HF_HOME", os.fspath(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    monkeypatch.chdir(tmp_path)
    yield


# --------------------------------------------------------------------------------------------
# inspect --tensors / --filter / --markdown / --json


def test_inspect_tensors_lists_every_tensor_with_dtype_shape_size_and_offset(files: dict[str, Path]) -> None:
    header = read_header(files["dev"])

    result = run("inspect", files["dev"], "--tensors")

    assert result.exit_code == 0
    lines = result.stdout.splitlines()
    start = lines.index(next(line for line in lines if line.split()[:2] == ["name", "dtype"]))
    listed = lines[start + 1 : start + 1 + len(header.tensors)]
    assert [line.split()[0] for line in listed] == list(header.tensors)
    first = tensor_rows(header)[0]
    assert listed[0].split()[-1] == f"{first.offset:,}" and listed[0].split()[-2] == f"{first.size:,}"


def test_inspect_filter_keeps_the_matching_tensors_and_json_has_them(files: dict[str, Path]) -> None:
    header = read_header(files["dev"])
    expected = [r.to_json() for r in tensor_rows(header, ["*.lora_down"])]

    text = run("inspect", files["dev"], "--filter", "*.lora_down")
    data = run("inspect", files["dev"], "--filter", "*.lora_down", "--json")

    assert text.exit_code == 0 and data.exit_code == 0
    listed = [line.split()[0] for line in text.stdout.splitlines() if line.endswith(tuple("0123456789"))]
    assert [n for n in listed if n.endswith(".lora_down")] == [r["name"] for r in expected]
    [record] = records(data)
    assert record["tensor_table"] == expected
    assert record["tensors"] == len(header.tensors) and record["metadata"] == {"format": "pt"}


def test_inspect_markdown_is_the_report_to_paste(files: dict[str, Path]) -> None:
    result = run("inspect", files["dev"], "--markdown", "--filter", "x_embedder.*")

    assert result.exit_code == 0
    text = result.stdout
    assert text.startswith(f"### `{files['dev']}`")
    assert "| dtype | tensors | size |" in text and "- family: flux" in text
    assert "| `x_embedder.weight` |" in text and "| `transformer_blocks.0.qkv_proj.qweight` |" not in text


def test_inspect_diff_shows_what_differs_between_two_files(files: dict[str, Path]) -> None:
    expected = diff_headers(read_header(files["dev"]), read_header(files["fp4"]))

    text = run("inspect", files["dev"], files["fp4"], "--diff")
    data = run("inspect", files["dev"], files["fp4"], "--diff", "--json")

    assert text.exit_code == 0 and data.exit_code == 0
    assert "metadata: 1 key(s) differ: x (added)" in text.stdout
    assert "tensors with another dtype or shape" in text.stdout
    [record] = records(data)
    assert record["path"] == str(files["dev"]) and record["other"] == str(files["fp4"])
    assert record["diff"] == json.loads(json.dumps(expected.to_json()))


def test_inspect_diff_needs_exactly_two_files(files: dict[str, Path]) -> None:
    result = run("inspect", files["dev"], "--diff")
    assert result.exit_code == 2 and "--diff compares exactly two files" in errors(result)[0]


def test_inspect_options_in_a_real_process(files: dict[str, Path]) -> None:
    markdown = process("inspect", files["fp4"], "--markdown", "--filter", "*.wtscale")
    compared = process("inspect", files["dev"], files["fp4"], "--diff", "--json")

    assert markdown.returncode == 0 and compared.returncode == 0, markdown.stderr + compared.stderr
    assert "- precision: nvfp4" in markdown.stdout and ".wtscale` |" in markdown.stdout
    [record] = records(compared)
    assert record["status"] == "inspected" and record["diff"]["identical"] is False


# --------------------------------------------------------------------------------------------
# models


def test_models_lists_every_known_model_with_its_repo_family_and_config() -> None:
    result = run("models")

    assert result.exit_code == 0
    for model in models.all_models():
        head = next(line for line in result.stdout.splitlines() if line.split()[:1] == [model.name])
        assert model.repo_id in head and model.family.value in head
        assert models.config_note(model) in result.stdout


def test_models_json_is_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    result = run("models", "--json")
    assert result.exit_code == 0
    assert records(result) == [models.model_json(m) for m in models.all_models()]


def test_models_is_a_subcommand_in_a_real_process() -> None:
    proc = process("models", "--json")
    assert proc.returncode == 0, proc.stderr
    assert [r["name"] for r in records(proc)] == [m.name for m in models.all_models()]


# --------------------------------------------------------------------------------------------
# Shell completion


def _complete(args: list[str], incomplete: str) -> list[str]:
    completer = ShellComplete(cli.main, {}, "nunchaku-patch", COMPLETE_VAR)
    return [item.value for item in completer.get_completions(args, incomplete)]


def test_model_completes_with_the_known_names_and_aliases() -> None:
    assert _complete(["--model"], "flux.1-d") == models.completion_names("flux.1-d")
    assert _complete(["patch", "x.safetensors", "--model"], "") == models.completion_names("")
    assert _complete(["merge", "--model"], "qwen") == models.completion_names("qwen")


def test_precision_completes_with_its_choices() -> None:
    assert _complete(["--precision"], "") == list(PRECISIONS)
    assert _complete(["merge", "--precision"], "nv") == ["nvfp4"]


def test_subcommands_complete() -> None:
    assert {"set", "unset", "models", "patch", "inspect"} <= set(_complete([], ""))
    assert _complete([], "un") == ["unset", "un"]  # the command, then the shell's file names


@pytest.mark.skipif(not SCRIPT.exists(), reason="the nunchaku-patch script is not installed")
@pytest.mark.parametrize("shell", ["bash", "zsh", "fish"])
def test_the_installed_script_prints_each_shells_completion_script(shell: str) -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env[COMPLETE_VAR] = f"{shell}_source"

    proc = subprocess.run([os.fspath(SCRIPT)], capture_output=True, text=True, env=env, timeout=60, check=False)

    assert proc.returncode == 0 and COMPLETE_VAR in proc.stdout, proc.stderr


@pytest.mark.skipif(not SCRIPT.exists(), reason="the nunchaku-patch script is not installed")
def test_bash_completion_of_model_in_a_real_process() -> None:
    env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"}
    env.update(
        {
            COMPLETE_VAR: "bash_complete",
            "COMP_WORDS": "nunchaku-patch m.safetensors --model flux.1-s",
            "COMP_CWORD": "3",
        }
    )

    proc = subprocess.run([os.fspath(SCRIPT)], capture_output=True, text=True, env=env, timeout=60, check=False)

    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == [f"plain,{name}" for name in models.completion_names("flux.1-s")]


def test_paths_complete_as_files_for_the_shell(tmp_path: Path) -> None:
    # click hands file completion to the shell for Path arguments; a plain string argument completes nothing.
    completer = ShellComplete(cli.main, {}, "nunchaku-patch", COMPLETE_VAR)
    for args in (["validate"], ["inspect"], ["set"], ["unset"], ["restore"], ["patch"], ["x.safetensors"]):
        items = completer.get_completions(args, "mod")
        assert [(i.type, i.value) for i in items] == [("file", "mod")], args
    # The first word: a command, or a file to patch.
    assert [(i.type, i.value) for i in completer.get_completions([], "mod")] == [("plain", "models"), ("file", "mod")]
    assert [(i.type, i.value) for i in completer.get_completions(["merge"], "out")] == [("dir", "out")]
