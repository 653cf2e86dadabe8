"""A realistic ``models/diffusion_models/`` tree fixed by one ``nunchaku-patch models/`` run.

Old single files, two deepcompressor folders, one folder already merged, a blocks-only file without its sibling,
a Qwen-Image file and an unrelated safetensors. Files are synthetic tables at width scale 0.05 with every block;
the matching (scaled) diffusers configs sit in a fake Hugging Face cache, as a user's downloaded models would,
so the run needs no option at all.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result
from oracle import oracle_read
from test_resolve import add_to_cache

from patcher import merge, models, synth
from patcher.cli import main
from patcher.contract import validate_metadata
from patcher.header import read_header
from patcher.inspect import infer
from patcher.report import ExitCode

SCALE = 0.05
FIXTURES = Path(__file__).parent / "fixtures"
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def run(*args: str) -> Result:
    return CliRunner().invoke(main, list(args), catch_exceptions=False)


def table(preset: str, **changes: Any) -> synth.Table:
    return synth.build_table(synth.preset(preset, scale=SCALE, **changes))


def scaled_config(preset: str) -> bytes:
    """Return the model's real config with the width of the scaled synthetic file (heads x head_dim)."""
    config: dict[str, Any] = json.loads(models.embedded_config_text(models.lookup(preset)))
    hidden = infer(synth.header_of(synth.table_to_tensors(table(preset)))).hidden_size
    assert hidden is not None
    config["num_attention_heads"] = hidden.value // config["attention_head_dim"]
    return (json.dumps(config, indent=2) + "\n").encode()


def write_file(path: Path, tab: synth.Table, seed: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    synth.write_random(path, synth.table_to_tensors(tab), seed=seed)
    return path


def write_folder(folder: Path, tab: synth.Table, seed: int) -> Path:
    """Write a deepcompressor output folder: the blocks, then everything else."""
    blocks = {k: v for k, v in tab.items() if k.startswith(BLOCK_PREFIXES)}
    rest = {k: v for k, v in tab.items() if k not in blocks}
    write_file(folder / merge.BLOCKS_FILE, blocks, seed)
    write_file(folder / merge.UNQUANTIZED_FILE, rest, seed + 1)
    return folder


def summary(result: Result) -> str:
    return result.stderr.splitlines()[-1]


@pytest.fixture
def tree(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    hub = tmp_path / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", os.fspath(hub))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.delenv("NO_COLOR", raising=False)
    for name in ("flux.1-dev", "flux.1-schnell", "qwen-image"):
        model = models.lookup(name)
        add_to_cache(hub, model.repo_id, {model.repo_file: scaled_config(name)})
    root = tmp_path / "models" / "diffusion_models"
    write_file(root / "old-flux-dev.safetensors", table("flux.1-dev"), 1)
    write_file(root / "schnell-old.safetensors", table("flux.1-schnell"), 2)
    write_folder(root / "svdq-int4-flux.1-dev", table("flux.1-dev"), 3)
    schnell = write_folder(root / "svdq-int4-flux.1-schnell", table("flux.1-schnell"), 5)
    (schnell / "config.json").write_bytes(scaled_config("flux.1-schnell"))  # older folders ship theirs
    done = write_folder(root / "already" / "svdq-int4-flux.1-dev", table("flux.1-dev"), 7)
    assert run("merge", "-q", os.fspath(done)).exit_code == ExitCode.OK
    write_file(root / "lonely" / merge.BLOCKS_FILE, table("flux.1-dev", include_unquantized=False), 9)
    write_file(root / "svdq-int4_r128-qwen-image.safetensors", table("qwen-image", rank=128), 10)
    (root / "vae").mkdir()
    shutil.copyfile(FIXTURES / "valid" / "every-dtype.safetensors", root / "vae" / "ae.safetensors")
    return root


def statuses(result: Result, root: Path) -> dict[str, str]:
    """Return ``{path relative to root: status}`` from a --json run."""
    out = {}
    for line in result.stdout.splitlines():
        record = json.loads(line)
        out[os.path.relpath(record["path"], root)] = record["status"]
    return out


def test_one_run_fixes_a_real_tree_and_the_second_finds_nothing_to_do(tree: Path) -> None:
    files = sorted(p for p in tree.rglob("*.safetensors"))
    before = {p: p.read_bytes() for p in files}

    # What the run will do, three ways, before it runs: they agree.
    dry = run(os.fspath(tree), "--dry-run", "--json")
    check = run(os.fspath(tree), "--check")
    validated = run("validate", "--json", os.fspath(tree))
    assert {p: p.read_bytes() for p in files} == before  # none of them wrote anything
    expected_summary = "3 would patch, 2 would merge, 1 already correct, 1 skipped, 1 failed"
    assert summary(dry) == expected_summary
    assert summary(check) == expected_summary
    assert check.stdout == "" and check.exit_code == ExitCode.FAILED  # the blocks-only file is refused
    plan = statuses(dry, tree)
    assert plan == {
        "old-flux-dev.safetensors": "would patch",
        "schnell-old.safetensors": "would patch",
        "svdq-int4_r128-qwen-image.safetensors": "would patch",
        "svdq-int4-flux.1-dev": "would merge",
        "svdq-int4-flux.1-schnell": "would merge",
        "already/svdq-int4-flux.1-dev": "already correct",
        f"lonely/{merge.BLOCKS_FILE}": "failed",
        "vae/ae.safetensors": "skipped",
    }
    verdicts = statuses(validated, tree)
    assert verdicts == {
        path: {"would patch": "needs work", "would merge": "needs work", "failed": "needs work"}.get(
            status, "valid" if status == "already correct" else status
        )
        for path, status in plan.items()
    }

    # The run.
    fixed = run(os.fspath(tree), "--json")
    assert fixed.exit_code == ExitCode.FAILED, fixed.stderr
    assert summary(fixed) == "3 patched, 2 merged, 1 already correct, 1 skipped, 1 failed"
    done = statuses(fixed, tree)
    assert done == {
        path: {"would patch": "patched", "would merge": "merged"}.get(status, status) for path, status in plan.items()
    }
    # Every result loads by the loader contract, and safetensors reads it.
    results = [
        tree / "old-flux-dev.safetensors",
        tree / "schnell-old.safetensors",
        tree / "svdq-int4_r128-qwen-image.safetensors",
        tree / "svdq-int4_r32-flux.1-dev.safetensors",
        tree / "svdq-int4_r32-flux.1-schnell.safetensors",
        tree / "already" / "svdq-int4_r32-flux.1-dev.safetensors",
    ]
    for path in results:
        header = read_header(path)
        report = validate_metadata(header.metadata, infer(header))
        assert report.ok and all(v.ok for v in report.verdicts.values()), (path, report.findings)
        metadata, _ = oracle_read(path)
        assert metadata == header.metadata
    # The sources of the merges, the refused and the unrelated files are untouched.
    for path, data in before.items():
        if path not in results:
            assert path.read_bytes() == data, path

    # A second run: everything that could be fixed is already correct; nothing is written.
    after = {p: p.stat().st_mtime_ns for p in tree.rglob("*.safetensors")}
    again = run(os.fspath(tree))
    assert again.exit_code == ExitCode.FAILED
    assert summary(again) == "6 already correct, 1 skipped, 1 failed"
    assert {p: p.stat().st_mtime_ns for p in tree.rglob("*.safetensors")} == after
    assert summary(run(os.fspath(tree), "--check")) == "6 already correct, 1 skipped, 1 failed"
    assert summary(run("validate", os.fspath(tree))) == "6 valid, 1 needs work, 1 skipped"


def test_no_merge_skips_folders_with_a_note_naming_merge(tree: Path) -> None:
    result = run(os.fspath(tree), "--no-merge", "--dry-run")
    folder = tree / "svdq-int4-flux.1-dev"
    assert (
        f"skipped {folder}: a deepcompressor output folder (transformer_blocks.safetensors + "
        f"unquantized_layers.safetensors); merge it into one file with: nunchaku-patch merge {folder}"
    ) in result.stderr.splitlines()
    # The already merged folder is skipped too; its merged file is then checked like any file.
    assert summary(result) == "3 would patch, 1 already correct, 4 skipped, 1 failed"


def test_validate_names_the_fix_for_a_folder(tree: Path) -> None:
    folder = tree / "svdq-int4-flux.1-dev"
    result = run("validate", os.fspath(folder))
    assert result.exit_code == ExitCode.NEEDS_WORK
    lines = result.stdout.splitlines()
    assert lines[0] == f"{folder}: needs work"
    assert f"  fix: nunchaku-patch merge {folder}" in lines
