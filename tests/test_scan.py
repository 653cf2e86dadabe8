"""scan: a ComfyUI-like models folder and a populated Hugging Face cache, every row's verdict, and its fix run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli_hub import run
from test_merge import small_config as merge_config

from patcher import merge, scan, splice, synth
from patcher.header import read_header
from patcher.plan import PatchOptions, Planner

SPEC = synth.preset("flux.1-dev", num_layers=2, num_single_layers=2, scale=1 / 24)
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def small_config(spec: synth.SynthSpec = SPEC) -> str:
    """A diffusers Flux config matching the scaled synthetic table (one 128-wide head), as text."""
    return json.dumps(merge_config(spec), indent=2)


def halves() -> tuple[dict[str, synth.TensorInfo], dict[str, synth.TensorInfo]]:
    table = synth.build_table(SPEC)
    blocks = {k: v for k, v in table.items() if k.startswith(BLOCK_PREFIXES)}
    rest = {k: v for k, v in table.items() if k not in blocks}
    return synth.table_to_tensors(blocks), synth.table_to_tensors(rest)


def early_merge(path: Path, seed: int) -> Path:
    """An early single-file conversion: its own config in the metadata, nothing else a loader needs."""
    tensors = synth.table_to_tensors(synth.build_table(SPEC))
    return synth.write_random(path, tensors, {"config": small_config()}, seed=seed)


def deepcompressor_folder(folder: Path, *, config: bool = True, seed: int = 1) -> Path:
    folder.mkdir(parents=True)
    blocks, rest = halves()
    synth.write_random(folder / merge.BLOCKS_FILE, blocks, seed=seed)
    synth.write_random(folder / merge.UNQUANTIZED_FILE, rest, seed=seed + 1)
    if config:
        (folder / "config.json").write_text(small_config())
    return folder


def cache_repo(cache: Path, repo_id: str, files: dict[str, Path], *, kind: str = "models") -> Path:
    """Lay out ``files`` in the cache as huggingface_hub does: blobs by sha256, snapshot symlinks, refs/main."""
    root = cache / f"{kind}--{repo_id.replace('/', '--')}"
    (root / "blobs").mkdir(parents=True)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(COMMIT)
    snapshot = root / "snapshots" / COMMIT
    for relative, source in files.items():
        digest = hashlib.sha256(source.read_bytes()).hexdigest()
        blob = root / "blobs" / digest
        if not blob.exists():
            shutil.copyfile(source, blob)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture
def tree(tmp_path: Path) -> dict[str, Path]:
    """A ComfyUI models folder with one of each kind, and an HF cache with a single file and a folder."""
    models = tmp_path / "ComfyUI" / "models"
    dm = models / "diffusion_models"
    dm.mkdir(parents=True)
    old = early_merge(dm / "svdq-int4_r32-old-finetune.safetensors", seed=3)
    good = dm / "svdq-int4_r32-patched.safetensors"
    early_merge(tmp_path / "source.safetensors", seed=4)
    plan = Planner(PatchOptions(), log=lambda _line: None).plan("x", read_header(tmp_path / "source.safetensors"))
    splice.write_metadata(tmp_path / "source.safetensors", plan.new_metadata, output=good)
    folder = deepcompressor_folder(dm / "svdq-int4-finetune-folder", seed=5)
    merged_folder = deepcompressor_folder(dm / "already-merged", seed=7)
    nobody = Planner(PatchOptions(), log=lambda _line: None)
    merged_output = merge.write_merge(merge.plan_merge(merged_folder, nobody)).output
    lone = dm / "lone"
    lone.mkdir()
    synth.write_random(lone / merge.BLOCKS_FILE, halves()[0], seed=9)
    vae = models / "vae" / "ae.safetensors"
    vae.parent.mkdir()
    synth.write_random(vae, {"decoder.conv_in.weight": synth.TensorInfo("F16", (8, 4), (0, 64))}, seed=1)
    broken = dm / "broken.safetensors"
    early_merge(broken, seed=11)
    with open(broken, "r+b") as f:
        f.truncate(broken.stat().st_size - 3)
    (dm / ".hidden").mkdir()
    early_merge(dm / ".hidden" / "skipped.safetensors", seed=12)

    cache = tmp_path / "hf-home" / "hub"
    cached_file = cache_repo(cache, "someone/old-flux", {"svdq-int4_r32-old.safetensors": old})
    staged = deepcompressor_folder(tmp_path / "staged" / "svdq-int4-dc", seed=13)
    cached_folder = cache_repo(
        cache, "someone/dc-flux", {f"svdq-int4-dc/{p.name}": p for p in staged.iterdir()} | {"README.md": old}
    )
    cache_repo(cache, "someone/a-dataset", {"data.safetensors": old}, kind="datasets")
    return {
        "models": models,
        "old": old,
        "good": good,
        "folder": folder,
        "merged_folder": merged_folder,
        "merged_output": Path(merged_output),
        "lone": lone / merge.BLOCKS_FILE,
        "vae": vae,
        "broken": broken,
        "cache": cache,
        "cached_file": cached_file / "svdq-int4_r32-old.safetensors",
        "cached_folder": cached_folder / "svdq-int4-dc",
    }


def rows(items: list[scan.Item]) -> dict[str, tuple[str, bool]]:
    return {item.path: (item.judgement.kind, item.needs_work) for item in items}


def test_every_local_item_has_the_right_verdict(tree: dict[str, Path]) -> None:
    items = list(scan.scan_paths([os.fspath(tree["models"])]))
    got = rows(items)
    assert got == {
        os.fspath(tree["old"]): ("single file", True),
        os.fspath(tree["good"]): ("single file", False),
        os.fspath(tree["folder"]): ("deepcompressor folder", True),
        os.fspath(tree["merged_folder"]): ("deepcompressor folder", False),
        os.fspath(tree["merged_output"]): ("single file", False),
        os.fspath(tree["lone"]): ("blocks-only half", True),
        os.fspath(tree["vae"]): ("not an SVDQuant file", False),
        os.fspath(tree["broken"]): ("unreadable", True),
    }
    by_path = {i.path: i for i in items}
    old = by_path[os.fspath(tree["old"])]
    assert (old.judgement.family and old.judgement.family.value, old.judgement.precision, old.judgement.rank) == (
        "flux",
        "int4",
        32,
    )
    assert not old.judgement.verdicts["comfyui-nunchaku"] and all(
        by_path[os.fspath(tree["good"])].judgement.verdicts.values()
    )
    assert by_path[os.fspath(tree["merged_folder"])].note == f"merged into {tree['merged_output']}"
    assert by_path[os.fspath(tree["lone"])].fix is None and by_path[os.fspath(tree["broken"])].fix is None


def test_cache_items_and_their_fixes_write_copies(tree: dict[str, Path], tmp_path: Path) -> None:
    fix_dir = os.fspath(tmp_path / "fixed")
    items = list(scan.scan_hf_cache(tree["cache"], fix_dir=fix_dir))
    assert rows(items) == {
        os.fspath(tree["cached_folder"]): ("deepcompressor folder", True),
        os.fspath(tree["cached_file"]): ("single file", True),
    }
    assert {i.repo for i in items} == {"someone/dc-flux", "someone/old-flux"}
    assert {i.revision for i in items} == {"main"}
    for item in items:
        assert item.fix is not None and item.fix.startswith("mkdir -p ") and f" -o {fix_dir}" in item.fix


def test_hf_home_is_honoured(tree: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", os.fspath(tree["cache"].parent))
    assert len(list(scan.scan_hf_cache())) == 2


def _run(command: str, cwd: Path) -> None:
    """Run a fix line through bash as a user would paste it, ``nunchaku-patch`` being this checkout's package."""
    bindir = cwd / "bin"
    bindir.mkdir(exist_ok=True)
    shim = bindir / "nunchaku-patch"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m patcher "$@"\n')
    shim.chmod(0o755)
    root = os.fspath(Path(__file__).resolve().parents[1])
    env = dict(
        os.environ,
        PATH=os.fspath(bindir) + os.pathsep + os.environ.get("PATH", ""),
        PYTHONPATH=root + os.pathsep + os.environ.get("PYTHONPATH", ""),
    )
    done = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{command}\n{done.stderr}"


@pytest.mark.skipif(shutil.which("bash") is None, reason="the fix lines are POSIX shell commands")
def test_pasted_fix_commands_work(tree: dict[str, Path], tmp_path: Path) -> None:
    fix_dir = os.fspath(tmp_path / "fixed copies")  # a space: the commands must quote it
    before = list(scan.scan_paths([os.fspath(tree["models"])], fix_dir=fix_dir))
    before += list(scan.scan_hf_cache(tree["cache"], fix_dir=fix_dir))
    fixes = [i.fix for i in before if i.fix]
    assert len(fixes) == 4  # the old file, the folder, the cached file and the cached folder
    blobs = {p: p.read_bytes() for p in (tree["cache"]).rglob("blobs/*")}
    for fix in fixes:
        _run(fix, tmp_path)
    after = rows(list(scan.scan_paths([os.fspath(tree["models"]), fix_dir])))
    assert after[os.fspath(tree["old"])] == ("single file", False)
    assert after[os.fspath(tree["folder"])] == ("deepcompressor folder", False)
    copies = {path: kind for path, kind in after.items() if path.startswith(fix_dir)}
    assert sorted(copies.values()) == [("single file", False), ("single file", False)]
    # The cache is left exactly as it was.
    assert {p: p.read_bytes() for p in (tree["cache"]).rglob("blobs/*")} == blobs
    assert all(item.needs_work for item in scan.scan_hf_cache(tree["cache"], fix_dir=fix_dir))


def test_scan_table_json_and_exit_code(tree: dict[str, Path], tmp_path: Path) -> None:
    done = run("scan", os.fspath(tree["models"]), "--hf-cache", cwd=tmp_path, HF_HUB_CACHE=os.fspath(tree["cache"]))
    assert done.returncode == 1, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].split() == ["STATUS", "KIND", "MODEL", "SIZE", "LOADS", "IN", "PATH"]
    table = lines[1 : lines.index("")]
    assert len(table) == 10
    column = lines[0].index("PATH")
    assert all(len(line) > column and line[column - 2 : column] == "  " for line in table)  # aligned
    assert any("MiB" in line or "KiB" in line for line in table)
    fixes = lines[lines.index("to fix:") + 1 :]
    assert sum(1 for f in fixes if f.strip().startswith(("nunchaku-patch", "mkdir -p"))) == 4
    done = run(
        "scan", "--json", os.fspath(tree["models"]), "--hf-cache", cwd=tmp_path, HF_HUB_CACHE=os.fspath(tree["cache"])
    )
    records = [json.loads(line) for line in done.stdout.splitlines()]
    assert len(records) == 10
    for record in records:
        assert {"path", "status", "kind", "fix", "verdicts", "findings", "error"} <= set(record)
        assert record["status"] == ("skipped" if record["kind"] == "not an SVDQuant file" else record["status"])
        assert record["status"] in ("valid", "needs work", "skipped")
        assert (record["fix"] is not None) <= (record["status"] == "needs work")
    assert {r["source"] for r in records} == {"local", "hf-cache"}
