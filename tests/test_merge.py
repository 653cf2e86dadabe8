"""``nunchaku-patch merge``: deepcompressor folders into one file, checked against the safetensors reader."""

from __future__ import annotations

import errno
import json
import os
import stat
import subprocess
import sys
import tracemalloc
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner, Result
from safetensors import safe_open
from safetensors.numpy import save_file

from patcher import _platform, contract, merge, synth
from patcher.cli.merge import command as merge_command
from patcher.errors import PatchError, WriteError
from patcher.facts import Family
from patcher.header import Header, read_header
from patcher.inspect import infer
from patcher.plan import PatchOptions, Planner
from patcher.splice import FAULT_ENV

REPO = Path(__file__).resolve().parents[1]
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")
#: Width 1/24 of FLUX.1 (one 128-wide head), 2 double and 2 single blocks: about 2 MB of tensors.
SPEC = synth.preset("flux.1-dev", num_layers=2, num_single_layers=2, scale=1 / 24)
METADATA_KEYS = ["config", "comfy_config", "model_class", "quantization_config"]

MakeFolder = Callable[..., Path]


def small_config(spec: synth.SynthSpec = SPEC, heads: int = 1) -> dict[str, object]:
    """Return a diffusers Flux config that matches a scaled synthetic table."""
    return {
        "_class_name": "FluxTransformer2DModel",
        "attention_head_dim": 128,
        "guidance_embeds": spec.guidance,
        "in_channels": spec.in_channels,
        "joint_attention_dim": 4096,
        "num_attention_heads": heads,
        "num_layers": spec.resolved_layers,
        "num_single_layers": spec.resolved_single_layers,
        "patch_size": 1,
        "pooled_projection_dim": 768,
    }


def split(table: Mapping[str, synth.TableEntry]) -> tuple[synth.Table, synth.Table]:
    """Split a synthetic table the way deepcompressor does: the blocks, then everything else."""
    blocks = {k: v for k, v in table.items() if k.startswith(BLOCK_PREFIXES)}
    rest = {k: v for k, v in table.items() if k not in blocks}
    return blocks, rest


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "small-config.json"
    path.write_text(json.dumps(small_config(), indent=2) + "\n", encoding="utf-8")
    return path


@pytest.fixture
def make_folder(tmp_path: Path) -> MakeFolder:
    """Write a deepcompressor-like folder (real random bytes) from a synthetic table; return its path."""

    def make(
        name: str = "svdq-int4-flux.1-dev",
        *,
        spec: synth.SynthSpec = SPEC,
        parent: Path | None = None,
        seed: int = 1,
        sparse: bool = False,
        blocks_extra: synth.Table | None = None,
    ) -> Path:
        folder = (parent or tmp_path) / name
        folder.mkdir(parents=True)
        blocks, rest = split(synth.build_table(spec))
        blocks.update(blocks_extra or {})
        for file_name, table, offset in ((merge.BLOCKS_FILE, blocks, 0), (merge.UNQUANTIZED_FILE, rest, 1)):
            tensors = synth.table_to_tensors(table)
            if sparse:
                synth.write_sparse(folder / file_name, tensors)
            else:
                synth.write_random(folder / file_name, tensors, seed=seed * 10 + offset)
        return folder

    return make


def planner_for(config: Path | None = None, **options: object) -> Planner:
    return Planner(PatchOptions(config=os.fspath(config) if config else None, **options), log=lambda _: None)  # type: ignore[arg-type]


def tensor_bytes(path: Path, header: Header) -> dict[str, bytes]:
    blob = path.read_bytes()
    start = header.data_start
    return {
        name: blob[start + info.data_offsets[0] : start + info.data_offsets[1]] for name, info in header.tensors.items()
    }


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if ".npatch-" in p.name)


def run_cli(*args: str) -> Result:
    return CliRunner().invoke(merge_command, list(args), catch_exceptions=False)


# --------------------------------------------------------------------------------------------
# The merged file


def test_merged_file_is_the_union_with_every_tensors_bytes_kept(make_folder: MakeFolder, config_file: Path) -> None:
    folder = make_folder()
    plan = merge.plan_merge(folder, planner_for(config_file))
    result = merge.write_merge(plan)
    out = Path(result.output)
    assert result.status == "merged" and out == folder.parent / "svdq-int4_r32-flux.1-dev.safetensors"

    blocks_path, rest_path = folder / merge.BLOCKS_FILE, folder / merge.UNQUANTIZED_FILE
    blocks, rest, merged = read_header(blocks_path), read_header(rest_path), read_header(out)
    # Blocks first then the unquantized layers, in the header and in the data region.
    assert list(merged.tensors) == [*blocks.tensors, *rest.tensors]
    assert merged.tensors[next(iter(rest.tensors))].data_offsets[0] == blocks.data_len
    assert merged.aligned and merged.data_start % 4096 == 0

    want = {**tensor_bytes(blocks_path, blocks), **tensor_bytes(rest_path, rest)}
    got = tensor_bytes(out, merged)
    assert got.keys() == want.keys()
    assert [name for name in want if got[name] != want[name]] == []

    with safe_open(str(out), framework="np") as handle:
        assert sorted(handle.keys()) == sorted(want)
        assert sorted(handle.metadata()) == sorted(METADATA_KEYS)
    report = contract.validate_metadata(merged.metadata, infer(merged))
    assert report.ok, [f.message for f in report.findings]
    assert leftovers(folder.parent) == []


def test_numpy_arrays_read_back_equal_through_safe_open(tmp_path: Path) -> None:
    # float_dtype F16 keeps every dtype numpy knows (F16, I8, I32), so the reader decodes the arrays.
    spec = SPEC.with_(float_dtype="F16")
    rng = np.random.default_rng(7)
    numpy_dtype = {"F16": np.float16, "I8": np.int8, "I32": np.int32}
    arrays: dict[str, np.ndarray] = {}
    for name, (dtype, shape) in synth.build_table(spec).items():
        kind = numpy_dtype[dtype]
        if dtype == "F16":
            arrays[name] = rng.standard_normal(shape).astype(kind)
        else:
            arrays[name] = rng.integers(np.iinfo(kind).min, np.iinfo(kind).max, size=shape, dtype=kind)
    folder = tmp_path / "conversion"
    folder.mkdir()
    blocks = {k: v for k, v in arrays.items() if k.startswith(BLOCK_PREFIXES)}
    save_file(blocks, str(folder / merge.BLOCKS_FILE))
    save_file({k: v for k, v in arrays.items() if k not in blocks}, str(folder / merge.UNQUANTIZED_FILE))
    config = tmp_path / "config.json"
    config.write_text(json.dumps(small_config(spec)), encoding="utf-8")

    result = merge.write_merge(merge.plan_merge(folder, planner_for(config)))
    with safe_open(result.output, framework="np") as handle:
        assert set(handle.keys()) == set(arrays)
        for name, array in arrays.items():
            got = handle.get_tensor(name)
            assert got.dtype == array.dtype and got.shape == array.shape, name
            assert got.tobytes() == array.tobytes(), name


def test_the_portable_copy_gives_the_same_file(
    make_folder: MakeFolder, config_file: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    folder = make_folder()
    kernel = merge.write_merge(merge.plan_merge(folder, planner_for(config_file), output=tmp_path / "kernel.st"))
    monkeypatch.delattr(os, "copy_file_range", raising=False)
    chunked = merge.write_merge(merge.plan_merge(folder, planner_for(config_file), output=tmp_path / "chunked.st"))
    assert Path(kernel.output).read_bytes() == Path(chunked.output).read_bytes()


def test_memory_does_not_grow_with_the_data(tmp_path: Path, make_folder: MakeFolder) -> None:
    # 1/4 width: ~50 MB of tensors (sparse sources, so writing them costs nothing); a decoder would hold them all.
    spec = SPEC.with_(scale=1 / 4)
    folder = make_folder(spec=spec, sparse=True)
    config = tmp_path / "wide.json"
    config.write_text(json.dumps(small_config(spec, heads=6)), encoding="utf-8")
    plan = merge.plan_merge(folder, planner_for(config))
    assert plan.data_len > 40 * 2**20
    tracemalloc.start()
    try:
        merge.write_merge(plan)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"peak Python memory {peak:,} bytes for {plan.data_len:,} bytes of data"
    assert read_header(plan.output).data_len == plan.data_len


def test_a_folder_of_symlinks_like_a_hugging_face_snapshot_is_read_through(
    make_folder: MakeFolder, config_file: Path, tmp_path: Path
) -> None:
    blobs = make_folder("blobs")
    snapshot = tmp_path / "snapshots" / "svdq-int4-flux.1-dev"
    snapshot.mkdir(parents=True)
    for name in merge.SOURCE_FILES:
        (snapshot / name).symlink_to(os.path.relpath(blobs / name, snapshot))
    result = merge.write_merge(merge.plan_merge(snapshot, planner_for(config_file)))
    assert Path(result.output).parent == snapshot.parent and not Path(result.output).is_symlink()
    assert all((snapshot / name).is_symlink() for name in merge.SOURCE_FILES)
    merged = read_header(result.output)
    assert merged.data_len == sum(read_header(blobs / name).data_len for name in merge.SOURCE_FILES)


def test_misaligned_second_half_is_merged_with_a_warning(make_folder: MakeFolder, config_file: Path) -> None:
    folder = make_folder(blocks_extra={"transformer_blocks.0.odd": ("I8", (3,))})
    plan = merge.plan_merge(folder, planner_for(config_file))
    assert any("not a multiple of 8" in w for w in plan.warnings)
    merge.write_merge(plan)
    with safe_open(plan.output, framework="np") as handle:
        names = handle.keys()
    assert "transformer_blocks.0.odd" in names


# --------------------------------------------------------------------------------------------
# Metadata and names


def test_the_folders_own_config_files_are_used_verbatim(make_folder: MakeFolder) -> None:
    folder = make_folder()
    config_text = json.dumps(small_config(), indent=4) + "\n\n"  # odd formatting must survive byte for byte
    comfy = json.loads((REPO / "tests/fixtures/comfy/flux.1-dev.json").read_text(encoding="utf-8"))
    comfy["model_config"].update(depth=2, depth_single_blocks=2, hidden_size=128, num_heads=1)
    comfy_text = json.dumps(comfy, indent=1, sort_keys=True)
    (folder / "config.json").write_text(config_text, encoding="utf-8")
    (folder / "comfy_config.json").write_text(comfy_text, encoding="utf-8")

    plan = merge.plan_merge(folder, planner_for())
    assert plan.folder_configs == ("config.json", "comfy_config.json")
    merge.write_merge(plan)
    metadata = read_header(plan.output).metadata
    assert metadata is not None
    assert metadata["config"] == config_text
    assert metadata["comfy_config"] == comfy_text
    assert list(metadata) == METADATA_KEYS


def test_an_explicit_config_beats_the_folders(make_folder: MakeFolder, config_file: Path) -> None:
    folder = make_folder()
    (folder / "config.json").write_text(json.dumps(small_config()), encoding="utf-8")
    plan = merge.plan_merge(folder, planner_for(config_file))
    assert plan.folder_configs == ()
    assert plan.metadata["config"] == config_file.read_text(encoding="utf-8")


def test_a_config_that_contradicts_the_tensors_is_refused(make_folder: MakeFolder) -> None:
    folder = make_folder()
    (folder / "config.json").write_text(json.dumps({**small_config(), "num_layers": 19}), encoding="utf-8")
    with pytest.raises(PatchError, match="num_layers"):
        merge.plan_merge(folder, planner_for())


@pytest.mark.parametrize(
    ("precision", "rank", "model", "expected"),
    [
        ("int4", 32, "flux.1-dev", "svdq-int4_r32-flux.1-dev.safetensors"),
        # nunchaku's published files spell nvfp4 "fp4".
        ("nvfp4", 128, "qwen-image", "svdq-fp4_r128-qwen-image.safetensors"),
    ],
)
def test_output_name_follows_nunchakus_files(precision: str, rank: int, model: str, expected: str) -> None:
    assert merge.output_name(precision, rank, model) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("folder_name", "options", "expected"),
    [
        # No known model: the folder's name, without a published-style prefix.
        ("my-finetune", {}, "svdq-int4_r32-my-finetune.safetensors"),
        ("svdq-int4-my-finetune", {}, "svdq-int4_r32-my-finetune.safetensors"),
        # A named known model gives its short name (forced: the small table is no real FLUX.1-dev).
        ("conversion", {"model": "flux.1-dev", "force": True}, "svdq-int4_r32-flux.1-dev.safetensors"),
    ],
)
def test_default_output_name(
    make_folder: MakeFolder, config_file: Path, folder_name: str, options: dict[str, object], expected: str
) -> None:
    folder = make_folder(folder_name)
    config = None if "model" in options else config_file
    plan = merge.plan_merge(folder, planner_for(config, **options))
    assert Path(plan.output) == folder.parent / expected


def test_a_config_identical_to_one_known_model_names_it(make_folder: MakeFolder) -> None:
    folder = make_folder("conversion", spec=SPEC.with_(guidance=False))
    schnell = (REPO / "patcher/configs/flux.1-schnell.json").read_text(encoding="utf-8")
    (folder / "config.json").write_text(schnell, encoding="utf-8")
    plan = merge.plan_merge(folder, planner_for(force=True))
    assert plan.patch.family is Family.FLUX
    assert Path(plan.output).name == "svdq-int4_r32-flux.1-schnell.safetensors"


def test_nvfp4_rank_128_is_named_fp4(make_folder: MakeFolder, tmp_path: Path) -> None:
    spec = SPEC.with_(precision="nvfp4", rank=128)
    folder = make_folder("fp4-conversion", spec=spec)
    config = tmp_path / "fp4.json"
    config.write_text(json.dumps(small_config(spec)), encoding="utf-8")
    plan = merge.plan_merge(folder, planner_for(config))
    assert Path(plan.output).name == "svdq-fp4_r128-fp4-conversion.safetensors"
    assert '"rank": 128' in plan.metadata["quantization_config"]


# --------------------------------------------------------------------------------------------
# Refusals and failures


def test_a_name_in_both_files_is_an_error(tmp_path: Path, config_file: Path) -> None:
    folder = tmp_path / "clash"
    folder.mkdir()
    blocks, rest = split(synth.build_table(SPEC))
    rest["transformer_blocks.0.qkv_proj.bias"] = blocks["transformer_blocks.0.qkv_proj.bias"]
    synth.write_random(folder / merge.BLOCKS_FILE, synth.table_to_tensors(blocks))
    synth.write_random(folder / merge.UNQUANTIZED_FILE, synth.table_to_tensors(rest))
    with pytest.raises(PatchError) as caught:
        merge.plan_merge(folder, planner_for(config_file))
    assert caught.value.code == "name-clash"
    assert "'transformer_blocks.0.qkv_proj.bias'" in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.parametrize("missing", [merge.BLOCKS_FILE, merge.UNQUANTIZED_FILE])
def test_a_missing_half_is_an_error_naming_it(make_folder: MakeFolder, config_file: Path, missing: str) -> None:
    folder = make_folder()
    (folder / missing).unlink()
    assert merge.find_folders([folder.parent]) == [folder]
    with pytest.raises(PatchError) as caught:
        merge.plan_merge(folder, planner_for(config_file))
    assert caught.value.code == "incomplete-folder"
    assert f"no {missing}" in str(caught.value)


def test_an_existing_output_is_kept_unless_forced(make_folder: MakeFolder, config_file: Path) -> None:
    folder = make_folder()
    plan = merge.plan_merge(folder, planner_for(config_file))
    Path(plan.output).write_bytes(b"someone else's file")
    with pytest.raises(WriteError) as caught:
        merge.write_merge(plan)
    assert caught.value.code == "exists"
    assert Path(plan.output).read_bytes() == b"someone else's file"
    assert merge.write_merge(plan, force=True).status == "merged"
    assert merge.write_merge(plan).status == "unchanged"  # already holds exactly this merge


@pytest.mark.parametrize("kind", ["chardev", "fifo", "symlink"])
def test_a_device_fifo_or_link_output_is_never_replaced_even_forced(
    make_folder: MakeFolder, config_file: Path, kind: str
) -> None:
    """Issue 10: `merge --force` replaced a device node (as root, -o /dev/null became a regular file)."""
    folder = make_folder()
    plan = merge.plan_merge(folder, planner_for(config_file))
    out = Path(plan.output)
    if kind == "chardev":
        if not hasattr(os, "geteuid") or os.geteuid() != 0:
            pytest.skip("mknod needs root")
        os.mknod(out, stat.S_IFCHR | 0o666, os.makedev(1, 3))
    elif kind == "fifo":
        os.mkfifo(out)
    else:
        target = out.parent / "elsewhere.safetensors"
        target.write_bytes(b"someone else's file")
        out.symlink_to(target)
    before = out.lstat()
    with pytest.raises(WriteError):
        merge.write_merge(plan, force=True)
    after = out.lstat()
    assert (after.st_mode, after.st_ino) == (before.st_mode, before.st_ino)
    assert leftovers(out.parent) == []


def test_a_failed_copy_leaves_no_temp_and_no_output(
    make_folder: MakeFolder, config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_folder()
    plan = merge.plan_merge(folder, planner_for(config_file))

    def full_disk(*args: object) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(_platform, "copy_data", full_disk)
    with pytest.raises(WriteError) as caught:
        merge.write_merge(plan)
    message = str(caught.value)
    assert message.startswith(plan.output) and "free some disk space" in message and "\n" not in message
    assert not os.path.lexists(plan.output)
    assert leftovers(folder.parent) == []


def test_misplaced_bytes_fail_verification_and_nothing_is_left(
    make_folder: MakeFolder, config_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = make_folder()
    plan = merge.plan_merge(folder, planner_for(config_file))
    copy_data = _platform.copy_data

    def corrupting(src_fd: int, dst_fd: int, src_offset: int, dst_offset: int, length: int) -> None:
        copy_data(src_fd, dst_fd, src_offset, dst_offset, length)
        if dst_offset > plan.data_start:  # the unquantized layers' region
            os.pwrite(dst_fd, bytes(b ^ 0xFF for b in os.pread(dst_fd, 16, dst_offset)), dst_offset)

    monkeypatch.setattr(_platform, "copy_data", corrupting)
    with pytest.raises(WriteError) as caught:
        merge.write_merge(plan)
    assert caught.value.code == "verify" and caught.value.path == plan.output
    assert f"the bytes from {merge.UNQUANTIZED_FILE} are not where they should be" in str(caught.value)
    assert not os.path.lexists(plan.output) and leftovers(folder.parent) == []


def test_a_source_changed_after_planning_is_refused(make_folder: MakeFolder, config_file: Path) -> None:
    folder = make_folder()
    plan = merge.plan_merge(folder, planner_for(config_file))
    blocks, _ = split(synth.build_table(SPEC))
    blocks.popitem()
    synth.write_random(folder / merge.BLOCKS_FILE, synth.table_to_tensors(blocks))
    with pytest.raises(WriteError) as caught:
        merge.write_merge(plan)
    assert caught.value.code == "changed"
    assert not os.path.lexists(plan.output)


def test_a_merge_killed_mid_copy_leaves_no_output_and_the_next_run_cleans_up(
    make_folder: MakeFolder, config_file: Path
) -> None:
    folder = make_folder()
    code = (
        "import sys\n"
        "from patcher import merge\n"
        "from patcher.plan import PatchOptions, Planner\n"
        "planner = Planner(PatchOptions(config=sys.argv[2]), log=lambda _: None)\n"
        "print(merge.write_merge(merge.plan_merge(sys.argv[1], planner)).status)\n"
    )
    env = {**os.environ, FAULT_ENV: "data-half", "PYTHONPATH": os.fspath(REPO)}
    killed = subprocess.run(
        [sys.executable, "-c", code, os.fspath(folder), os.fspath(config_file)], env=env, capture_output=True
    )
    assert killed.returncode in (-9, 137)
    output = folder.parent / "svdq-int4_r32-flux.1-dev.safetensors"
    assert not output.exists()
    assert len(leftovers(folder.parent)) == 1  # the dead run's temp file
    del env[FAULT_ENV]
    again = subprocess.run(
        [sys.executable, "-c", code, os.fspath(folder), os.fspath(config_file)], env=env, capture_output=True, text=True
    )
    assert again.returncode == 0, again.stderr
    assert again.stdout.strip() == "merged"
    assert leftovers(folder.parent) == []
    with safe_open(str(output), framework="np") as handle:
        assert sorted(handle.metadata()) == sorted(METADATA_KEYS)


# --------------------------------------------------------------------------------------------
# Finding folders


def test_find_folders_searches_trees_and_accepts_a_file_of_the_pair(make_folder: MakeFolder, tmp_path: Path) -> None:
    a = make_folder("a", parent=tmp_path / "tree" / "x")
    b = make_folder("b", parent=tmp_path / "tree")
    make_folder("hidden", parent=tmp_path / "tree" / ".cache")
    assert merge.find_folders([tmp_path / "tree"]) == [b, a]
    assert merge.find_folders([a / merge.UNQUANTIZED_FILE, a]) == [a]
    with pytest.raises(PatchError) as caught:
        merge.find_folders([_touch(tmp_path / "other.txt")])
    assert caught.value.code == "not-a-folder"
    with pytest.raises(PatchError) as caught:
        merge.find_folders([tmp_path / "tree" / ".cache" / "hidden" / "nope"])
    assert caught.value.code == "not-found"
    (tmp_path / "empty").mkdir()
    with pytest.raises(PatchError) as caught:
        merge.find_folders([tmp_path / "empty"])
    assert caught.value.code == "no-folders"


def _touch(path: Path) -> Path:
    path.write_text("x", encoding="utf-8")
    return path


# --------------------------------------------------------------------------------------------
# The command line


def test_cli_dry_run_writes_nothing_and_says_what_it_would_do(make_folder: MakeFolder, config_file: Path) -> None:
    folder = make_folder()
    before = sorted(p.name for p in folder.parent.iterdir())
    result = run_cli(os.fspath(folder), "--config", os.fspath(config_file), "--dry-run")
    assert sorted(p.name for p in folder.parent.iterdir()) == before
    assert result.exit_code == 0
    out = result.stdout
    assert "svdq-int4_r32-flux.1-dev.safetensors" in out
    blocks, rest = split(synth.build_table(SPEC))
    assert f"{merge.BLOCKS_FILE}: {len(blocks):,} tensors" in out
    assert f"{merge.UNQUANTIZED_FILE}: {len(rest):,} tensors" in out
    assert f"merged: {len(blocks) + len(rest):,} tensors" in out
    assert "metadata: config, comfy_config, model_class, quantization_config" in out
    assert "would merge" in result.stderr


def test_cli_merges_a_tree_of_two_folders_in_one_call(
    make_folder: MakeFolder, config_file: Path, tmp_path: Path
) -> None:
    first = make_folder("svdq-int4-flux.1-dev", parent=tmp_path / "tree" / "one")
    second = make_folder("my-finetune", parent=tmp_path / "tree" / "two", seed=2)
    result = run_cli(os.fspath(tmp_path / "tree"), "--config", os.fspath(config_file), "--json")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["status"] for r in records] == ["merged", "merged"]
    assert [r["strategy"] for r in records] == ["merge", "merge"]
    outputs = [Path(r["output"]) for r in records]
    assert outputs == [
        first.parent / "svdq-int4_r32-flux.1-dev.safetensors",
        second.parent / "svdq-int4_r32-my-finetune.safetensors",
    ]
    for record, out in zip(records, outputs, strict=True):
        assert record["merge"]["tensors"]["total"] == len(read_header(out).tensors)
        assert record["merge"]["metadata_keys"] == METADATA_KEYS
    # A second run finds both already merged: nothing to do, exit 0.
    again = run_cli(os.fspath(tmp_path / "tree"), "--config", os.fspath(config_file))
    assert again.exit_code == 0
    assert again.stderr.count("already merged") == 2


def test_cli_exit_codes(make_folder: MakeFolder, config_file: Path, tmp_path: Path) -> None:
    good = make_folder("good", parent=tmp_path / "tree")
    broken = make_folder("broken", parent=tmp_path / "tree")
    (broken / merge.UNQUANTIZED_FILE).unlink()
    cfg = ["--config", os.fspath(config_file)]

    # One folder fails: the other is still merged, and the run exits 3 with one error line.
    result = run_cli(os.fspath(tmp_path / "tree"), *cfg)
    assert result.exit_code == 3
    assert (good.parent / "svdq-int4_r32-good.safetensors").exists()
    assert [line for line in result.stderr.splitlines() if line.startswith("error:")] == [
        f"error: {broken}: incomplete deepcompressor output folder: it has {merge.BLOCKS_FILE} but no "
        f"{merge.UNQUANTIZED_FILE} (expected both files deepcompressor's converter writes). copy the missing file "
        "from the conversion's output (or patch a merged file with `nunchaku-patch`)"
    ]
    assert "1 merged, 1 failed" in result.stderr

    assert run_cli(os.fspath(tmp_path / "nowhere"), *cfg).exit_code == 2  # a path that does not exist
    # -o naming one file for two folders makes no sense: a usage error, nothing written.
    (broken / merge.BLOCKS_FILE).unlink()
    other = make_folder("other", parent=tmp_path / "tree")
    usage = run_cli(os.fspath(tmp_path / "tree"), *cfg, "-o", os.fspath(tmp_path / "one.safetensors"))
    assert usage.exit_code == 2 and not (tmp_path / "one.safetensors").exists()
    # -o as a folder takes the default names; an existing different output needs --force.
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    (out_dir / "svdq-int4_r32-other.safetensors").write_bytes(b"not a merge")
    refused = run_cli(os.fspath(other), *cfg, "-o", os.fspath(out_dir))
    assert refused.exit_code == 3 and "--force" in refused.stderr
    forced = run_cli(os.fspath(other), *cfg, "-o", os.fspath(out_dir), "--force")
    assert forced.exit_code == 0, forced.stderr
    with safe_open(str(out_dir / "svdq-int4_r32-other.safetensors"), framework="np") as handle:
        assert sorted(handle.metadata()) == sorted(METADATA_KEYS)


def test_cli_two_folders_with_the_same_output_name_are_not_silently_overwritten(
    make_folder: MakeFolder, config_file: Path, tmp_path: Path
) -> None:
    make_folder("same", parent=tmp_path / "a")
    make_folder("same", parent=tmp_path / "b", seed=3)
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    result = run_cli(
        os.fspath(tmp_path / "a"),
        os.fspath(tmp_path / "b"),
        "--config",
        os.fspath(config_file),
        "-o",
        os.fspath(out_dir),
        "--force",
    )
    assert result.exit_code == 3
    assert "output-clash" not in result.stderr and "is also where" in result.stderr
    assert [p.name for p in out_dir.iterdir()] == ["svdq-int4_r32-same.safetensors"]


def test_cli_output_folder_with_a_trailing_slash_is_created(
    make_folder: MakeFolder, config_file: Path, tmp_path: Path
) -> None:
    make_folder("one", parent=tmp_path / "tree")
    make_folder("two", parent=tmp_path / "tree", seed=2)
    out_dir = tmp_path / "merged"
    args = [os.fspath(tmp_path / "tree"), "--config", os.fspath(config_file), "-o", os.fspath(out_dir) + "/"]
    dry = run_cli(*args, "--dry-run")
    assert dry.exit_code == 0, dry.stderr
    assert not out_dir.exists()  # a dry run creates nothing
    assert f"would merge {tmp_path / 'tree' / 'one'} -> {out_dir / 'svdq-int4_r32-one.safetensors'}" in dry.stderr
    result = run_cli(*args)
    assert result.exit_code == 0, result.stderr
    assert sorted(p.name for p in out_dir.iterdir()) == [
        "svdq-int4_r32-one.safetensors",
        "svdq-int4_r32-two.safetensors",
    ]
    assert result.stderr.splitlines()[-1] == "2 merged"
