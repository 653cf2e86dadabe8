"""Streamed remote fixes against the local stand-in Hub: byte-identical output, resume, integrity, folder merge."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from hubserver import FakeHub
from oracle import oracle_read
from test_merge import small_config as merge_config

from patcher import merge, splice, synth
from patcher.errors import HubError
from patcher.header import read_header
from patcher.hub import Hub, HubPath
from patcher.hubwrite import PART_SUFFIX, plan_merge_stream, plan_patch_stream, stream_into
from patcher.plan import PatchOptions, Planner

REPO = "someone/svdq-int4-flux-finetune"
SPEC = synth.preset("flux.1-dev", num_layers=2, num_single_layers=2, scale=1 / 8)
BLOCK_PREFIXES = ("transformer_blocks.", "single_transformer_blocks.")


def small_config(spec: synth.SynthSpec = SPEC) -> dict[str, object]:
    """A diffusers Flux config matching the scaled synthetic table (three 128-wide heads)."""
    return merge_config(spec, heads=3)


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(small_config(), indent=2) + "\n")
    return path


def planner(config: Path) -> Planner:
    return Planner(PatchOptions(config=os.fspath(config)), log=lambda _line: None)


def publish_file(tmp_path: Path, hub_server: FakeHub) -> Path:
    local = tmp_path / "published" / "svdq-int4_r32-finetune.safetensors"
    local.parent.mkdir()
    synth.write_random(local, synth.table_to_tensors(synth.build_table(SPEC)), {"format": "pt"}, seed=7)
    hub_server.add_repo(REPO, {"svdq-int4_r32-finetune.safetensors": local})
    return local


def streamed_patch(hub: Hub, config: Path, dest: Path) -> None:
    remote = hub.read_header(HubPath(REPO, None, "svdq-int4_r32-finetune.safetensors"))
    plan = planner(config).plan(str(remote.where), remote.header)
    prefix, streams, expected = plan_patch_stream(remote, plan.new_metadata, os.fspath(dest))
    stream_into(os.fspath(dest), prefix, streams, expected, hub=hub)


def local_patch(local: Path, config: Path, dest: Path) -> None:
    plan = planner(config).plan(os.fspath(local), read_header(local))
    splice.write_metadata(local, plan.new_metadata, output=dest)


def parts(folder: Path) -> list[str]:
    return [p.name for p in folder.iterdir() if p.name.endswith(PART_SUFFIX)]


def test_streamed_patch_equals_download_then_patch(
    tmp_path: Path, hub_server: FakeHub, hub: Hub, config_file: Path
) -> None:
    local = publish_file(tmp_path, hub_server)
    streamed, downloaded = tmp_path / "streamed.safetensors", tmp_path / "downloaded.safetensors"
    streamed_patch(hub, config_file, streamed)
    local_patch(local, config_file, downloaded)
    assert streamed.read_bytes() == downloaded.read_bytes()
    metadata, _ = oracle_read(streamed)
    assert metadata is not None and "quantization_config" in metadata and metadata["format"] == "pt"
    # Each byte of the file came over the wire once: the header reads, then the data region.
    header = read_header(local)
    assert hub_server.bytes_sent(REPO, "svdq-int4_r32-finetune.safetensors") == header.file_size
    assert parts(tmp_path) == []


def test_dropped_connection_resumes_on_rerun(tmp_path: Path, hub_server: FakeHub, hub: Hub, config_file: Path) -> None:
    local = publish_file(tmp_path, hub_server)
    header = read_header(local)
    dest = tmp_path / "out.safetensors"
    name = "svdq-int4_r32-finetune.safetensors"
    cut = header.data_len // 3
    remote = hub.read_header(HubPath(REPO, None, name))
    plan = planner(config_file).plan(str(remote.where), remote.header)
    prefix, streams, expected = plan_patch_stream(remote, plan.new_metadata, os.fspath(dest))
    hub_server.drop_at[(REPO, name)] = header.data_start + cut  # the data region's transfer stops there
    with pytest.raises(HubError) as caught:
        stream_into(os.fspath(dest), prefix, streams, expected, hub=hub)
    assert caught.value.code == "network" and "again" in caught.value.render()
    assert not dest.exists() and len(parts(tmp_path)) == 1
    before = len(hub_server.transfers(REPO, name))
    result = stream_into(os.fspath(dest), prefix, streams, expected, hub=hub)
    again = hub_server.transfers(REPO, name)[before:]
    assert len(again) == 1 and again[0].start == header.data_start + result.resumed
    assert result.resumed > 0 and result.resumed + result.received == header.data_len
    downloaded = tmp_path / "downloaded.safetensors"
    local_patch(local, config_file, downloaded)
    assert dest.read_bytes() == downloaded.read_bytes()
    assert parts(tmp_path) == []


def test_hash_mismatch_deletes_the_partial_output(
    tmp_path: Path, hub_server: FakeHub, hub: Hub, config_file: Path
) -> None:
    publish_file(tmp_path, hub_server)
    name = "svdq-int4_r32-finetune.safetensors"
    remote = hub.read_header(HubPath(REPO, None, name))
    plan = planner(config_file).plan(str(remote.where), remote.header)
    dest = tmp_path / "out.safetensors"
    prefix, streams, expected = plan_patch_stream(remote, plan.new_metadata, os.fspath(dest))
    hub_server.corrupt[(REPO, name)] = remote.header.data_start
    with pytest.raises(HubError) as caught:
        stream_into(os.fspath(dest), prefix, streams, expected, hub=hub)
    assert caught.value.code == "hash-mismatch"
    assert "deleted" in caught.value.render() and remote.sha256 in caught.value.render()
    assert not dest.exists() and parts(tmp_path) == []


def publish_folder(tmp_path: Path, hub_server: FakeHub, config: dict[str, object]) -> Path:
    folder = tmp_path / "published" / "svdq-int4-finetune"
    folder.mkdir(parents=True)
    table = synth.build_table(SPEC)
    blocks = {k: v for k, v in table.items() if k.startswith(BLOCK_PREFIXES)}
    rest = {k: v for k, v in table.items() if k not in blocks}
    for name, part, seed in ((merge.BLOCKS_FILE, blocks, 1), (merge.UNQUANTIZED_FILE, rest, 2)):
        synth.write_random(folder / name, synth.table_to_tensors(part), seed=seed)
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    hub_server.add_repo(
        REPO, {f"svdq-int4-finetune/{p.name}": p for p in folder.iterdir()} | {"README.md": folder / "config.json"}
    )
    return folder


def test_streamed_merge_of_a_two_file_folder(tmp_path: Path, hub_server: FakeHub, hub: Hub) -> None:
    folder = publish_folder(tmp_path, hub_server, small_config())
    out = tmp_path / "out"
    out.mkdir()
    nobody = Planner(PatchOptions(), log=lambda _line: None)
    plan, streams, expected = plan_merge_stream(
        hub, HubPath(REPO, None, "svdq-int4-finetune"), nobody, lambda name: os.fspath(out / name)
    )
    assert plan.folder_configs == ("config.json",)
    result = stream_into(plan.output, plan.prefix, streams, expected, hub=hub)
    assert len(result.verified) == 2 and not result.unverified
    local = merge.write_merge(merge.plan_merge(folder, nobody, output=tmp_path / "local.safetensors"))
    assert Path(plan.output).read_bytes() == Path(local.output).read_bytes()
    metadata, names = oracle_read(plan.output)
    assert metadata is not None and json.loads(metadata["config"]) == small_config() and len(names) == len(plan.tensors)
