"""Remote headers through huggingface_hub against the local stand-in Hub (tests/hubserver.py): no internet."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hubserver import FakeHub
from test_hubwrite import SPEC, small_config

from patcher import synth
from patcher.errors import HeaderError, HubError, UsageError
from patcher.header import read_header
from patcher.hub import Hub, HubPath, parse_hub_path

REPO = "old-convs/svdq-flux"


def small_spec(name: str = "flux.1-dev", **changes: object) -> synth.SynthSpec:
    extra = {"num_single_layers": 1} if name.startswith("flux") else {}
    return synth.preset(name, scale=0.0625, num_layers=1, **extra, **changes)


def write_model(
    path: Path, name: str = "flux.1-dev", metadata: dict[str, str] | None = None, **changes: object
) -> Path:
    tensors = synth.table_to_tensors(synth.build_table(small_spec(name, **changes)))
    return synth.write_random(path, tensors, metadata, seed=len(path.name))


# --------------------------------------------------------------------------------------------
# hf:// paths


@pytest.mark.parametrize(
    ("text", "repo", "revision", "path"),
    [
        ("hf://a/b", "a/b", None, ""),
        ("hf://a/b/", "a/b", None, ""),
        ("hf://a/b@v1.0/x/y.safetensors", "a/b", "v1.0", "x/y.safetensors"),
        ("hf://a/b@refs%2Fpr%2F3/m.safetensors", "a/b", "refs/pr/3", "m.safetensors"),
        (
            "hf://nunchaku-tech/nunchaku-flux.1-dev/svdq-int4_r32-flux.1-dev.safetensors",
            "nunchaku-tech/nunchaku-flux.1-dev",
            None,
            "svdq-int4_r32-flux.1-dev.safetensors",
        ),
    ],
)
def test_parse_hub_path(text: str, repo: str, revision: str | None, path: str) -> None:
    where = parse_hub_path(text)
    assert (where.repo_id, where.revision, where.path) == (repo, revision, path)
    assert parse_hub_path(str(where)) == where


@pytest.mark.parametrize("text", ["hf://", "hf://onlyowner", "hf://a/b@", "hf://a/b/../c.safetensors", "hf://a/b c/x"])
def test_parse_hub_path_refuses(text: str) -> None:
    with pytest.raises(UsageError):
        parse_hub_path(text)


# --------------------------------------------------------------------------------------------
# Header reads


def test_header_read_never_touches_the_data_region(tmp_path: Path, hub_server: FakeHub, hub: Hub) -> None:
    local = write_model(tmp_path / "svdq-int4_r32-flux.1-dev.safetensors")
    hub_server.add_repo(REPO, {"svdq-int4_r32-flux.1-dev.safetensors": local})
    got = hub.read_header(HubPath(REPO, None, "svdq-int4_r32-flux.1-dev.safetensors"))
    want = read_header(local)
    assert got.header == want
    assert got.size == local.stat().st_size
    assert got.commit == hub_server.repos[REPO].commit
    assert got.sha256 == hub_server.repos[REPO].files["svdq-int4_r32-flux.1-dev.safetensors"].sha256
    # Exactly the prefix and the header were sent: not one byte of the data region.
    assert hub_server.highest_offset(REPO, "svdq-int4_r32-flux.1-dev.safetensors") == want.data_start
    assert hub_server.bytes_sent(REPO, "svdq-int4_r32-flux.1-dev.safetensors") == want.data_start


def test_large_header_is_read_exactly(tmp_path: Path, hub_server: FakeHub, hub: Hub) -> None:
    # 300 KB of metadata: past the 100 KB huggingface_hub's own parser fetches first.
    local = write_model(tmp_path / "big.safetensors", metadata={"notes": "x" * 300_000})
    hub_server.add_repo(REPO, {"big.safetensors": local})
    got = hub.read_header(HubPath(REPO, None, "big.safetensors"))
    want = read_header(local)
    assert got.header == want and want.header_len > 300_000
    transfers = hub_server.transfers(REPO, "big.safetensors")
    assert len(transfers) >= 2
    assert [(t.start, t.sent) for t in transfers] == [(0, 8), (8, want.header_len)]
    assert hub_server.highest_offset(REPO, "big.safetensors") == want.data_start


def test_remote_verdict_is_the_local_one(tmp_path: Path, hub_server: FakeHub, hub: Hub) -> None:
    # A file whose header claims more data than it has: the strict parser refuses it remotely as locally.
    local = write_model(tmp_path / "cut.safetensors")
    with open(local, "r+b") as f:
        f.truncate(local.stat().st_size - 1)
    hub_server.add_repo(REPO, {"cut.safetensors": local})
    with pytest.raises(HeaderError) as remote:
        hub.read_header(HubPath(REPO, None, "cut.safetensors"))
    with pytest.raises(HeaderError) as here:
        read_header(local)
    assert remote.value.code == here.value.code
    assert "hf://old-convs/svdq-flux/cut.safetensors" in remote.value.render()


def test_git_stored_file_has_a_blob_id(tmp_path: Path, hub_server: FakeHub, hub: Hub) -> None:
    local = tmp_path / "tiny.safetensors"
    local.write_bytes(
        b'\x10\x00\x00\x00\x00\x00\x00\x00{"__metadata__":{}}'[:8]
        + b'{"a":{"dtype":"U8","shape":[0],"data_offsets":[0,0]}}'
    )
    raw = local.read_bytes()[8:]
    local.write_bytes(len(raw).to_bytes(8, "little") + raw)
    hub_server.add_repo(REPO, {"tiny.safetensors": local})
    got = hub.read_header(HubPath(REPO, None, "tiny.safetensors"))
    assert got.sha256 is None
    assert got.git_blob_id == hub_server.repos[REPO].files["tiny.safetensors"].git_sha1


# --------------------------------------------------------------------------------------------
# Listing and one clear line per failure


def test_snapshot_lists_files_with_hashes(tmp_path: Path, hub_server: FakeHub, hub: Hub) -> None:
    a = write_model(tmp_path / "a.safetensors")
    config = tmp_path / "config.json"
    config.write_text("{}")
    hub_server.add_repo(REPO, {"sub/a.safetensors": a, "sub/config.json": config})
    snap = hub.snapshot(HubPath(REPO))
    assert snap.commit == hub_server.repos[REPO].commit
    by_path = {f.path: f for f in snap.files}
    assert by_path["sub/a.safetensors"].sha256 == hub_server.repos[REPO].files["sub/a.safetensors"].sha256
    assert by_path["sub/config.json"].sha256 is None
    assert [f.path for f in snap.under("sub")] == ["sub/a.safetensors", "sub/config.json"]


def _published(tmp_path: Path, hub_server: FakeHub, **repo: object) -> None:
    local = write_model(tmp_path / "m.safetensors")
    hub_server.add_repo(REPO, {"m.safetensors": local}, **repo)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("repo", "where", "token", "code", "words"),
    [
        ({"gated": True}, HubPath(REPO, None, "m.safetensors"), False, "gated", "gated repo"),
        ({"gated": True}, HubPath(REPO, None, "m.safetensors"), "hf_other", "gated", "no access"),
        ({"private": True}, HubPath(REPO, None, "m.safetensors"), False, "unauthorized", "private"),
        ({}, HubPath("nobody/nothing", None, "m.safetensors"), "hf_other", "repo-not-found", "no repo"),
        ({}, HubPath(REPO, "v9", "m.safetensors"), False, "revision-not-found", "no revision 'v9'"),
        ({}, HubPath(REPO, None, "other.safetensors"), False, "entry-not-found", "no file 'other.safetensors'"),
    ],
)
def test_each_failure_is_one_clear_line(
    tmp_path: Path,
    hub_server: FakeHub,
    repo: dict[str, object],
    where: HubPath,
    token: str | bool,
    code: str,
    words: str,
) -> None:
    _published(tmp_path, hub_server, **repo)
    client = Hub(endpoint=hub_server.url, token=token)
    with pytest.raises(HubError) as caught:
        client.read_header(where)
    assert caught.value.code == code
    line = caught.value.render()
    assert words in line and "\n" not in line and line.startswith(str(where))


def test_granted_token_reads_a_gated_repo(tmp_path: Path, hub_server: FakeHub) -> None:
    _published(tmp_path, hub_server, gated=True, granted={"hf_member"})
    got = Hub(endpoint=hub_server.url, token="hf_member").read_header(HubPath(REPO, None, "m.safetensors"))
    assert got.header.tensors


def test_offline_mode_sends_nothing(
    tmp_path: Path, hub_server: FakeHub, hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub.constants

    _published(tmp_path, hub_server)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(HubError) as caught:
        hub.read_header(HubPath(REPO, None, "m.safetensors"))
    assert caught.value.code == "offline" and "HF_HUB_OFFLINE" in caught.value.render()
    with pytest.raises(HubError):
        hub.snapshot(HubPath(REPO))
    assert hub_server.requests == []


def test_unreachable_server_is_a_network_error(tmp_path: Path) -> None:
    with FakeHub() as server:
        url = server.url
    with pytest.raises(HubError) as caught:
        Hub(endpoint=url, token=False, timeout=5).read_header(HubPath(REPO, None, "m.safetensors"))
    assert caught.value.code == "network"


def test_scan_of_a_repo_reads_headers_only(tmp_path: Path, hub_server: FakeHub, hub: Hub) -> None:
    from patcher import merge, scan

    table = synth.build_table(small_spec())
    blocks = {k: v for k, v in table.items() if k.startswith(("transformer_blocks.", "single_transformer_blocks."))}
    rest = {k: v for k, v in table.items() if k not in blocks}
    files = {
        # An early merge carrying its own config (so a patch needs no option) and one that needs --model.
        "svdq-int4_r32-flux.1-dev.safetensors": synth.write_random(
            tmp_path / "single.safetensors",
            synth.table_to_tensors(synth.build_table(SPEC)),
            {"config": json.dumps(small_config())},
        ),
        "unknown.safetensors": write_model(tmp_path / "unknown.safetensors"),
        f"old/{merge.BLOCKS_FILE}": synth.write_random(tmp_path / "b.safetensors", synth.table_to_tensors(blocks)),
        f"old/{merge.UNQUANTIZED_FILE}": synth.write_random(tmp_path / "u.safetensors", synth.table_to_tensors(rest)),
        "vae/ae.safetensors": synth.write_random(
            tmp_path / "ae.safetensors", {"decoder.conv_in.weight": synth.TensorInfo("F16", (64, 64), (0, 8192))}
        ),
    }
    hub_server.add_repo(REPO, files)
    items = list(scan.scan_hub(parse_hub_path(f"hf://{REPO}"), hub, fix_dir="fixed"))
    got = {item.path: (item.judgement.kind, item.needs_work, item.fix) for item in items}
    assert got == {
        f"hf://{REPO}/old": (
            "deepcompressor folder",
            True,
            f"mkdir -p fixed && nunchaku-patch merge hf://{REPO}/old -o fixed",
        ),
        f"hf://{REPO}/svdq-int4_r32-flux.1-dev.safetensors": (
            "single file",
            True,
            f"mkdir -p fixed && nunchaku-patch hf://{REPO}/svdq-int4_r32-flux.1-dev.safetensors "
            "-o fixed/svdq-int4_r32-flux.1-dev.safetensors",
        ),
        f"hf://{REPO}/vae/ae.safetensors": ("not an SVDQuant file", False, None),
        f"hf://{REPO}/unknown.safetensors": ("single file", True, None),
    }
    (unknown,) = (item for item in items if item.path.endswith("unknown.safetensors"))
    assert unknown.note is not None and "--model" in unknown.note
    for path, local in files.items():
        assert hub_server.highest_offset(REPO, path) == read_header(local).data_start
