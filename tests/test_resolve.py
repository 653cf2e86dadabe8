"""Where a config comes from: file, folder, deepcompressor YAML, Hugging Face cache, embedded copy, header facts.

The Hugging Face cache is faked in the library's own layout under tmp_path and every test runs with the network
cut (sockets refuse, ``hf_hub_download`` fails the test unless a test replaces it on purpose).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub
import pytest

from patcher import models
from patcher import resolve as resolve_module
from patcher.errors import ConfigError
from patcher.facts import Fact, Family, Inference
from patcher.resolve import (
    ConfigRequest,
    HeaderFacts,
    ResolvedConfig,
    hf_cache_dir,
    read_config_file,
    resolve_config,
)

FIXTURES = Path(__file__).parent / "fixtures"
YAML = FIXTURES / "yaml"
CONFIGS = FIXTURES / "configs"
COMMIT = "0f1e2d3c4b5a69788796a5b4c3d2e1f00112233"

DEV_FACTS = HeaderFacts(Family.FLUX, 64, True, 19, 38)
SCHNELL_FACTS = HeaderFacts(Family.FLUX, 64, False, 19, 38)
BLOCKS_ONLY = HeaderFacts(Family.FLUX, None, None, 19, 38)


def _marked(name: str, marker: str) -> bytes:
    """Return a known model's config with a marker in ``_name_or_path`` and its own formatting, as bytes."""
    config = models.embedded_config(models.lookup(name))
    config["_name_or_path"] = marker
    return (json.dumps(config, indent=1) + "\n").encode()


def add_to_cache(cache: Path, repo_id: str, files: dict[str, bytes], *, commit: str = COMMIT) -> Path:
    """Put ``files`` in a fake hub cache the way huggingface_hub lays them out; return the snapshot folder."""
    repo_dir = cache / ("models--" + repo_id.replace("/", "--"))
    (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
    (repo_dir / "refs" / "main").write_text(commit)
    snapshot = repo_dir / "snapshots" / commit
    for relative, data in files.items():
        blob = repo_dir / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = snapshot / relative
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture(autouse=True)
def no_network(monkeypatch: pytest.MonkeyPatch) -> None:
    """Cut the network: any connection attempt or Hub download fails the test."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args!r} {kwargs!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", refuse)


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty fake hub cache that HF_HUB_CACHE points at, offline."""
    hub = tmp_path / "hub"
    hub.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(hub))
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hub


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    yield tmp_path


def resolve(request: ConfigRequest) -> tuple[ResolvedConfig, list[str]]:
    """Resolve and return the result with the lines the log sink received."""
    seen: list[str] = []
    result = resolve_config(request, log=seen.append)
    assert list(result.log) == seen
    return result, seen


def error_of(request: ConfigRequest) -> str:
    with pytest.raises(ConfigError) as info:
        resolve_config(request, log=lambda line: None)
    return str(info.value)


# --- the fake cache and the Hugging Face cache step ------------------------------------------------------------------


def test_fake_cache_has_the_library_layout(cache: Path) -> None:
    snapshot = add_to_cache(cache, "black-forest-labs/FLUX.1-dev", {"transformer/config.json": b"{}"})
    link = snapshot / "transformer" / "config.json"
    assert link.is_symlink()
    assert os.readlink(link) == "../../../blobs/" + hashlib.sha256(b"{}").hexdigest()
    assert (cache / "models--black-forest-labs--FLUX.1-dev" / "refs" / "main").read_text() == COMMIT
    # huggingface_hub itself finds it
    assert huggingface_hub.try_to_load_from_cache(
        "black-forest-labs/FLUX.1-dev", "transformer/config.json", cache_dir=cache
    ) == str(link)


def test_model_name_is_read_from_the_cache_offline(cache: Path) -> None:
    data = _marked("flux.1-dev", "from-the-cache")
    snapshot = add_to_cache(cache, "black-forest-labs/FLUX.1-dev", {"transformer/config.json": data})
    result, lines = resolve(ConfigRequest(model="flux.1-dev"))
    assert result.text.encode() == data
    assert result.config["_name_or_path"] == "from-the-cache"
    assert result.model is models.lookup("flux.1-dev")
    assert result.source == "Hugging Face cache: black-forest-labs/FLUX.1-dev (transformer/config.json)"
    assert lines == [
        "Mapped model name 'flux.1-dev' to black-forest-labs/FLUX.1-dev",
        f"Found model snapshot at {snapshot}",
        f"Loaded config from {snapshot / 'transformer' / 'config.json'}",
    ]


def test_cache_location_follows_hf_home_read_at_call_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HUGGINGFACE_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    assert hf_cache_dir() == tmp_path / "hf-home" / "hub"
    data = _marked("flux.1-schnell", "via-hf-home")
    add_to_cache(tmp_path / "hf-home" / "hub", "black-forest-labs/FLUX.1-schnell", {"transformer/config.json": data})
    result, _ = resolve(ConfigRequest(model="FLUX.1-schnell"))
    assert result.config["_name_or_path"] == "via-hf-home"
    # HF_HUB_CACHE wins over HF_HOME
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "elsewhere"))
    assert hf_cache_dir() == tmp_path / "elsewhere"
    result, _ = resolve(ConfigRequest(model="FLUX.1-schnell"))
    assert result.source == "embedded config of flux.1-schnell"


def test_model_not_in_cache_falls_back_to_embedded(cache: Path) -> None:
    result, lines = resolve(ConfigRequest(model="flux-dev"))
    dev = models.lookup("flux.1-dev")
    assert result.text == models.embedded_config_text(dev)
    assert result.source == "embedded config of flux.1-dev"
    assert result.model is dev
    assert lines[0] == "Mapped model name 'flux-dev' to black-forest-labs/FLUX.1-dev"
    assert "not" not in lines[0]
    assert (
        lines[1]
        == f"black-forest-labs/FLUX.1-dev has no transformer/config.json in the local Hugging Face cache ({cache})"
    )
    assert lines[2].startswith("Using the embedded config of flux.1-dev (black-forest-labs/FLUX.1-dev")


def test_snapshot_of_another_revision_is_not_used(cache: Path) -> None:
    # refs/main points at a commit whose snapshot is absent: the library does not pick a random revision.
    add_to_cache(cache, "black-forest-labs/FLUX.1-dev", {"transformer/config.json": _marked("flux.1-dev", "old")})
    (cache / "models--black-forest-labs--FLUX.1-dev" / "refs" / "main").write_text("f" * 40)
    result, _ = resolve(ConfigRequest(model="flux.1-dev"))
    assert result.source == "embedded config of flux.1-dev"


def test_cached_as_missing_falls_back_to_embedded(cache: Path) -> None:
    add_to_cache(cache, "black-forest-labs/FLUX.1-dev", {"README.md": b"# dev\n"})
    no_exist = cache / "models--black-forest-labs--FLUX.1-dev" / ".no_exist" / COMMIT / "transformer"
    no_exist.mkdir(parents=True)
    (no_exist / "config.json").write_bytes(b"")
    result, _ = resolve(ConfigRequest(model="flux.1-dev"))
    assert result.source == "embedded config of flux.1-dev"


def test_unknown_repo_id_is_read_from_the_cache(cache: Path) -> None:
    # A repo that is not a known model: transformer/config.json, else config.json at its root.
    data = _marked("flux.1-dev", "a-finetune")
    add_to_cache(cache, "someone/flux-finetune", {"config.json": data})
    result, lines = resolve(ConfigRequest(model="someone/flux-finetune"))
    assert result.text.encode() == data
    assert result.model is None
    assert lines[0] == "model name 'someone/flux-finetune' is not a known model; treating it as a Hugging Face repo id"


def test_unknown_repo_id_missing_from_cache_is_an_error(cache: Path) -> None:
    message = error_of(ConfigRequest(model="someone/flux-finetune"))
    assert message.startswith("no config for someone/flux-finetune found")
    assert "downloading was not allowed" in message and "--allow-download" in message


def test_known_repo_id_names_the_model(cache: Path) -> None:
    result, lines = resolve(ConfigRequest(model="Qwen/Qwen-Image-Edit-2509"))
    assert result.model is models.lookup("qwen-image-edit-2509")
    assert lines[0] == "model name 'Qwen/Qwen-Image-Edit-2509' is the known model qwen-image-edit-2509"


def test_cache_config_differing_from_embedded_is_noted(cache: Path) -> None:
    config = models.embedded_config(models.lookup("flux.1-krea-dev"))
    config["num_single_layers"] = 37
    add_to_cache(cache, "black-forest-labs/FLUX.1-Krea-dev", {"transformer/config.json": json.dumps(config).encode()})
    result, lines = resolve(ConfigRequest(model="flux.1-krea-dev"))
    assert result.config["num_single_layers"] == 37
    assert "Note: it differs from the embedded copy of flux.1-krea-dev on num_single_layers" in lines


# --- downloading ------------------------------------------------------------------------------------------------------


class FakeDownload:
    """Stand-in for ``hf_hub_download``: records its calls and writes the file into the given cache."""

    def __init__(self, data: bytes | None) -> None:
        self.data = data
        self.calls: list[dict[str, Any]] = []

    def __call__(self, repo_id: str, filename: str, **kwargs: Any) -> str:
        self.calls.append({"repo_id": repo_id, "filename": filename, **kwargs})
        if self.data is None:
            raise huggingface_hub.errors.EntryNotFoundError("404 Client Error: Entry Not Found")
        return str(add_to_cache(Path(kwargs["cache_dir"]), repo_id, {filename: self.data}) / filename)


@pytest.fixture
def network_up(monkeypatch: pytest.MonkeyPatch) -> None:
    """Say the Hub is reachable (the downloads themselves are faked)."""
    monkeypatch.setattr(resolve_module, "network_problem", lambda: None)


def test_download_only_with_allow_download(cache: Path, monkeypatch: pytest.MonkeyPatch, network_up: None) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    fake = FakeDownload(_marked("flux.1-schnell", "downloaded"))
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    # without the flag: no call, the stand-in is used and said to be one
    result, lines = resolve(ConfigRequest(model="shuttle-jaguar"))
    assert fake.calls == []
    assert result.source == "embedded config of flux.1-schnell (stand-in for shuttle-jaguar)"
    assert result.model is models.lookup("shuttle-jaguar")
    assert any(line.startswith("No verified config of shuttle-jaguar is known") for line in lines)
    # with it: one call, to the network (no local_files_only), into our cache
    result, lines = resolve(ConfigRequest(model="shuttle-jaguar", allow_download=True))
    assert len(fake.calls) == 1
    call = fake.calls[0]
    assert (call["repo_id"], call["filename"]) == ("shuttleai/shuttle-jaguar", "transformer/config.json")
    assert not call.get("local_files_only") and Path(call["cache_dir"]) == cache
    assert result.config["_name_or_path"] == "downloaded"
    assert result.source == "Hugging Face Hub download: shuttleai/shuttle-jaguar (transformer/config.json)"
    assert "Downloading transformer/config.json from shuttleai/shuttle-jaguar" in lines


def test_offline_environment_blocks_download(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakeDownload(b"{}")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    result, lines = resolve(ConfigRequest(model="flux.1-dev", allow_download=True))
    assert fake.calls == []
    assert (
        "HF_HUB_OFFLINE=1 is set: not downloading black-forest-labs/FLUX.1-dev; using the embedded config of flux.1-dev"
        in lines
    )
    assert result.source == "embedded config of flux.1-dev"


def test_failed_download_falls_back_to_embedded_for_known_model(
    cache: Path, monkeypatch: pytest.MonkeyPatch, network_up: None
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    fake = FakeDownload(None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    result, lines = resolve(ConfigRequest(model="flux.1-fill-dev", allow_download=True))
    assert len(fake.calls) == 1
    assert any(line.startswith("Download from black-forest-labs/FLUX.1-Fill-dev failed") for line in lines)
    assert result.source == "embedded config of flux.1-fill-dev"


def test_failed_download_of_unknown_repo_is_an_error(
    cache: Path, monkeypatch: pytest.MonkeyPatch, network_up: None
) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    fake = FakeDownload(None)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    message = error_of(ConfigRequest(model="someone/private-model", allow_download=True))
    assert [c["filename"] for c in fake.calls] == ["transformer/config.json", "config.json"]
    assert message.startswith("no config for someone/private-model found")


def test_no_network_fails_fast_and_falls_back_in_one_line(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HF_HUB_OFFLINE")
    fake = FakeDownload(b"{}")
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake)
    probes: list[tuple[object, ...]] = []

    def unreachable(address: tuple[str, int], timeout: float | None = None, *args: object) -> None:
        probes.append((address, timeout))
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket, "create_connection", unreachable)
    result, lines = resolve(ConfigRequest(model="flux.1-fill-dev", allow_download=True))
    assert fake.calls == []  # no library call, so none of its retries
    assert probes == [(("huggingface.co", 443), resolve_module.PROBE_TIMEOUT)]
    assert resolve_module.PROBE_TIMEOUT <= 5
    assert (
        "Cannot reach huggingface.co:443 (Network is unreachable): not downloading black-forest-labs/FLUX.1-Fill-dev;"
        " using the embedded config of flux.1-fill-dev"
    ) in lines
    assert result.source == "embedded config of flux.1-fill-dev"


def test_hf_hub_offline_is_named_and_allow_download_not_suggested_again(cache: Path) -> None:
    message = error_of(ConfigRequest(model="someone/private-model", allow_download=True))
    assert "HF_HUB_OFFLINE=1" in message
    assert "--allow-download" not in message
    _, lines = resolve(ConfigRequest(model="shuttle-jaguar", allow_download=True))
    assert not any("--allow-download" in line for line in lines), lines
    assert any("HF_HUB_OFFLINE" in line for line in lines)


# --- files and folders ------------------------------------------------------------------------------------------------


def test_config_file_is_kept_byte_for_byte(tmp_path: Path, cache: Path) -> None:
    data = b'{"_class_name":"FluxTransformer2DModel",\r\n   "in_channels" : 64,\t"guidance_embeds": true}\r\n'
    path = tmp_path / "odd.json"
    path.write_bytes(data)
    result, lines = resolve(ConfigRequest(config_file=path))
    assert result.text.encode() == data
    assert result.config == {"_class_name": "FluxTransformer2DModel", "in_channels": 64, "guidance_embeds": True}
    assert result.source == f"config file {path}"
    assert lines == [f"Loaded config from {path}"]


def test_byte_order_mark_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "bom.json"
    path.write_bytes(b"\xef\xbb\xbf" + b'{"in_channels": 64}\n')
    text, config = read_config_file(path)
    assert text == '{"in_channels": 64}\n' and config == {"in_channels": 64}


@pytest.mark.parametrize("layout", ["transformer/config.json", "config.json"])
def test_local_diffusers_folder(tmp_path: Path, cache: Path, layout: str) -> None:
    folder = tmp_path / "FLUX.1-Kontext-dev"
    data = _marked("flux.1-kontext-dev", "local-folder")
    (folder / layout).parent.mkdir(parents=True, exist_ok=True)
    (folder / layout).write_bytes(data)
    result, lines = resolve(ConfigRequest(model_path=folder))
    assert result.text.encode() == data
    assert result.source == f"local folder {folder} ({layout})"
    # the folder's name is a known model's: it labels the result
    assert result.model is models.lookup("flux.1-kontext-dev")
    assert lines == [f"--model-path: using local folder {folder}", f"Loaded config from {folder / layout}"]


def test_folder_prefers_transformer_config(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "m" / "transformer").mkdir(parents=True)
    (tmp_path / "m" / "transformer" / "config.json").write_bytes(_marked("flux.1-dev", "transformer"))
    (tmp_path / "m" / "config.json").write_bytes(_marked("flux.1-dev", "root"))
    result, _ = resolve(ConfigRequest(model_path=tmp_path / "m"))
    assert result.config["_name_or_path"] == "transformer"
    assert result.model is None


def test_folder_without_config_is_an_error(tmp_path: Path, cache: Path) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "model_index.json").write_text("{}")
    message = error_of(ConfigRequest(model_path=tmp_path / "empty"))
    assert message.startswith(f"{tmp_path / 'empty'}: no transformer config in this folder")
    assert "expected transformer/config.json or config.json" in message


def test_model_path_repo_id_goes_through_the_cache(cache: Path, in_tmp: Path) -> None:
    data = _marked("flux.1-depth-dev", "cached-depth")
    add_to_cache(cache, "black-forest-labs/FLUX.1-Depth-dev", {"transformer/config.json": data})
    result, _ = resolve(ConfigRequest(model_path="black-forest-labs/FLUX.1-Depth-dev"))
    assert result.text.encode() == data
    assert result.model is models.lookup("flux.1-depth-dev")


def test_model_path_neither_folder_nor_repo(cache: Path, in_tmp: Path) -> None:
    message = error_of(ConfigRequest(model_path="./no/such/folder"))
    assert message.startswith("./no/such/folder: --model-path is neither a folder nor a Hugging Face repo id")


# --- deepcompressor YAML ----------------------------------------------------------------------------------------------


def test_yaml_model_and_int4(cache: Path) -> None:
    files = [YAML / "model" / "flux.1-dev.yaml", YAML / "svdquant" / "int4.yaml"]
    result, lines = resolve(ConfigRequest(config_yaml=files))
    assert result.yaml_facts is not None
    facts = result.yaml_facts
    assert (facts.pipeline_name, facts.pipeline_path, facts.rank, facts.weight_dtype, facts.precision) == (
        "flux.1-dev",
        None,
        32,
        "sint4",
        "int4",
    )
    assert facts.files == tuple(str(f) for f in files)
    assert result.model is models.lookup("flux.1-dev")
    assert result.source == "embedded config of flux.1-dev"
    assert lines[:4] == [
        f"Read deepcompressor config {files[0]}",
        f"Read deepcompressor config {files[1]}",
        "deepcompressor config says: pipeline.name 'flux.1-dev', quant.wgts.dtype 'sint4' (int4), rank 32",
        "Mapped pipeline.name 'flux.1-dev' to black-forest-labs/FLUX.1-dev",
    ]


def test_yaml_later_files_override_earlier(cache: Path, tmp_path: Path) -> None:
    files = [YAML / "model" / "flux.1-dev.yaml", YAML / "svdquant" / "int4.yaml", YAML / "svdquant" / "nvfp4.yaml"]
    result, _ = resolve(ConfigRequest(config_yaml=files))
    assert result.yaml_facts is not None
    assert (result.yaml_facts.weight_dtype, result.yaml_facts.precision) == ("sfp4_e2m1_all", "nvfp4")
    rank128 = tmp_path / "r128.yaml"
    rank128.write_text("quant:\n  wgts:\n    low_rank:\n      rank: 128\n")
    result, _ = resolve(ConfigRequest(config_yaml=[*files, rank128]))
    assert result.yaml_facts is not None
    # the rank changed; the dtype set by an earlier file stayed (mappings merge, they are not replaced)
    assert (result.yaml_facts.rank, result.yaml_facts.precision) == (128, "nvfp4")


def test_yaml_pipeline_path_repo_id_uses_the_cache(cache: Path, in_tmp: Path) -> None:
    data = _marked("flux.1-schnell", "schnell-in-cache")
    add_to_cache(cache, "black-forest-labs/FLUX.1-schnell", {"transformer/config.json": data})
    result, lines = resolve(ConfigRequest(config_yaml=[YAML / "model" / "flux.1-schnell-path.yaml"]))
    assert result.text.encode() == data
    assert result.model is models.lookup("flux.1-schnell")
    assert "Mapped pipeline.path 'black-forest-labs/FLUX.1-schnell' to black-forest-labs/FLUX.1-schnell" not in lines
    assert "pipeline.path 'black-forest-labs/FLUX.1-schnell' is the known model flux.1-schnell" in lines


def test_yaml_pipeline_path_local_folder_relative_to_the_yaml(tmp_path: Path, cache: Path, in_tmp: Path) -> None:
    run = tmp_path / "runs" / "exp1"
    (run / "weights" / "transformer").mkdir(parents=True)
    data = _marked("flux.1-dev", "my-local-dev")
    (run / "weights" / "transformer" / "config.json").write_bytes(data)
    model_yaml = run / "model.yaml"
    model_yaml.write_text("pipeline:\n  name: flux.1-dev\n  path: weights\n  dtype: torch.bfloat16\n")
    result, lines = resolve(ConfigRequest(config_yaml=[model_yaml, YAML / "svdquant" / "int4.yaml"]))
    assert result.text.encode() == data
    assert result.model is models.lookup("flux.1-dev")
    assert result.source == f"local folder {run / 'weights'} (transformer/config.json)"
    assert f"pipeline.path: using local folder {run / 'weights'}" in lines


def test_yaml_with_only_svdquant_files_leaves_the_config_to_later_steps(cache: Path) -> None:
    result, _ = resolve(ConfigRequest(config_yaml=[YAML / "svdquant" / "nvfp4.yaml"], model="flux.1-canny-dev"))
    assert result.model is models.lookup("flux.1-canny-dev")
    assert result.yaml_facts is not None and result.yaml_facts.precision == "nvfp4"
    assert result.yaml_facts.pipeline_name is None


def test_yaml_facts_are_returned_even_when_a_config_file_wins(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(_marked("flux.1-dev", "explicit"))
    result, lines = resolve(
        ConfigRequest(
            config_file=path, config_yaml=[YAML / "model" / "flux.1-dev.yaml", YAML / "svdquant" / "int4.yaml"]
        )
    )
    assert result.config["_name_or_path"] == "explicit"
    assert result.yaml_facts is not None and result.yaml_facts.rank == 32
    assert "--config takes precedence over --config-yaml for the config" in lines


def test_yaml_unknown_pipeline_name_names_the_file(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "pixart.yaml"
    path.write_text("pipeline:\n  name: pixart-sigma\n")
    message = error_of(ConfigRequest(config_yaml=[path]))
    assert message.startswith(f"{path}: unknown model name 'pixart-sigma'")


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("pipeline:\n  name: flux.1-dev\n   dtype: [torch.bfloat16\n")
    message = error_of(ConfigRequest(config_yaml=[path]))
    assert message.startswith(f"{path}: not valid YAML (")
    assert "line 3" in message


def test_yaml_bad_rank_names_the_file_that_set_it(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "bad-rank.yaml"
    path.write_text("quant:\n  wgts:\n    low_rank:\n      rank: thirty-two\n")
    message = error_of(ConfigRequest(config_yaml=[YAML / "svdquant" / "int4.yaml", path], model="flux.1-dev"))
    assert message == f"{path}: quant.wgts.low_rank.rank is not a positive integer (got 'thirty-two')"


def test_yaml_missing_file(tmp_path: Path, cache: Path) -> None:
    message = error_of(ConfigRequest(config_yaml=[tmp_path / "nope.yaml"]))
    assert message == f"{tmp_path / 'nope.yaml'}: YAML file not found. Check the path"


def test_yaml_without_pyyaml_says_how_to_get_it(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes ``import yaml`` raise ImportError
    message = error_of(ConfigRequest(config_yaml=[YAML / "model" / "flux.1-dev.yaml"]))
    assert "needs PyYAML" in message and "pip install pyyaml" in message
    assert message.startswith(str(YAML / "model" / "flux.1-dev.yaml"))


# --- precedence -------------------------------------------------------------------------------------------------------


@pytest.fixture
def every_source(tmp_path: Path, cache: Path) -> dict[str, Any]:
    """One of each source, each naming a different model so the winner is visible."""
    config_file = tmp_path / "explicit.json"
    config_file.write_bytes(_marked("flux.1-fill-dev", "step1-config-file"))
    folder = tmp_path / "folder"
    (folder / "transformer").mkdir(parents=True)
    (folder / "transformer" / "config.json").write_bytes(_marked("flux.1-canny-dev", "step2-model-path"))
    add_to_cache(
        cache, "black-forest-labs/FLUX.1-dev", {"transformer/config.json": _marked("flux.1-dev", "step3-yaml")}
    )
    add_to_cache(
        cache,
        "black-forest-labs/FLUX.1-Krea-dev",
        {"transformer/config.json": _marked("flux.1-krea-dev", "step4-cache")},
    )
    return {
        "config_file": config_file,
        "model_path": folder,
        "config_yaml": [YAML / "model" / "flux.1-dev.yaml"],
        "model": "flux.1-krea-dev",
        # the header says schnell (step 6 would pick it)
        "facts": SCHNELL_FACTS,
    }


PRECEDENCE = [
    # everything given: the config file wins
    ((), "step1-config-file", "--config takes precedence over --model-path, --config-yaml, --model for the config"),
    # no config file: the folder wins over the YAML and the model name
    (("config_file",), "step2-model-path", "--model-path takes precedence over --config-yaml, --model for the config"),
    # no folder either: the YAML's pipeline.name (flux.1-dev, found in the cache) wins over --model
    (("config_file", "model_path"), "step3-yaml", "--config-yaml takes precedence over --model for the config"),
    # only the model name and the facts: the cache copy of the named model
    (("config_file", "model_path", "config_yaml"), "step4-cache", None),
]


@pytest.mark.parametrize(("removed", "marker", "note"), PRECEDENCE)
def test_each_step_beats_the_later_ones(
    every_source: dict[str, Any], removed: tuple[str, ...], marker: str, note: str | None
) -> None:
    kwargs = {k: v for k, v in every_source.items() if k not in removed}
    result, lines = resolve(ConfigRequest(**kwargs))
    assert result.config["_name_or_path"] == marker
    if note is not None:
        assert note in lines


def test_embedded_beats_facts_when_a_model_is_named(cache: Path) -> None:
    # step 5: the named model is not cached, its embedded copy is used, the header's facts are not consulted
    result, _ = resolve(ConfigRequest(model="flux.1-krea-dev", facts=SCHNELL_FACTS))
    assert result.text == models.embedded_config_text(models.lookup("flux.1-krea-dev"))


def test_config_file_labels_model_when_one_is_named(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "c.json"
    path.write_bytes(_marked("flux.1-dev", "x"))
    result, _ = resolve(ConfigRequest(config_file=path, model="flux-dev"))
    assert result.model is models.lookup("flux.1-dev")
    result, _ = resolve(ConfigRequest(config_file=path))
    assert result.model is None


# --- step 6: from the header ------------------------------------------------------------------------------------------

FROM_FACTS = [
    # dev-like full file: dev, Kontext and Krea are functionally identical, dev is canonical
    (DEV_FACTS, None, "flux.1-dev"),
    # schnell-like: schnell (shuttle-jaguar has no config of its own)
    (SCHNELL_FACTS, None, "flux.1-schnell"),
    # 384 input channels: Fill
    (HeaderFacts(Family.FLUX, 384, True, 19, 38), None, "flux.1-fill-dev"),
    # 128: Canny and Depth are identical, Canny is listed first
    (HeaderFacts(Family.FLUX, 128, True, 19, 38), None, "flux.1-canny-dev"),
    # the file name breaks the tie among identical configs
    (DEV_FACTS, "svdq-int4_r32-flux.1-kontext-dev.safetensors", "flux.1-kontext-dev"),
    (HeaderFacts(Family.FLUX, 128, True, 19, 38), "svdq-fp4_r32-flux.1-depth-dev.safetensors", "flux.1-depth-dev"),
    # ... and between configs that differ, for a blocks-only file
    (BLOCKS_ONLY, "svdq-int4_r32-flux.1-dev.safetensors", "flux.1-dev"),
    # the folder of a deepcompressor conversion names the model when the file does not
    (BLOCKS_ONLY, "/models/svdq-int4-flux.1-schnell/transformer_blocks.safetensors", "flux.1-schnell"),
    # a name the header contradicts is ignored (schnell named, guidance embedder present)
    (DEV_FACTS, "svdq-int4_r32-flux.1-schnell.safetensors", "flux.1-dev"),
    # shuttle-jaguar named by the file: its stand-in config, labelled as shuttle-jaguar
    (SCHNELL_FACTS, "svdq-int4_r32-shuttle-jaguar.safetensors", "shuttle-jaguar"),
    # Qwen-Image and its 2509 edit model share a config: the base model is canonical
    (HeaderFacts(Family.QWEN_IMAGE, 64, None, 60, None), None, "qwen-image"),
    (
        HeaderFacts(Family.QWEN_IMAGE, 64, None, 60, None),
        "svdq-int4_r128-qwen-image-edit-2509.safetensors",
        "qwen-image-edit-2509",
    ),
    # one candidate per family
    (HeaderFacts(Family.Z_IMAGE, 64, None, 30, None), None, "z-image-turbo"),
    (HeaderFacts(Family.SANA, 32, None, 20, None), None, "sana-1600m"),
]


@pytest.mark.parametrize(("facts", "filename", "expected"), FROM_FACTS)
def test_step6_picks_from_the_header(cache: Path, facts: HeaderFacts, filename: str | None, expected: str) -> None:
    result, lines = resolve(ConfigRequest(facts=facts, filename=filename))
    assert result.model is models.lookup(expected)
    assert lines[0].startswith(f"No model named; the header ({facts.describe()}) fits: ")
    chosen = models.lookup(expected)
    source = chosen.stand_in or chosen.name
    assert result.text == models.embedded_config_text(models.lookup(source))


def test_step6_logs_the_canonical_default(cache: Path) -> None:
    _, lines = resolve(ConfigRequest(facts=DEV_FACTS))
    assert lines[0] == (
        "No model named; the header (family flux, in_channels 64, guidance embedder present, 19 double and 38 single"
        " blocks) fits: flux.1-dev, flux.1-kontext-dev, flux.1-krea-dev"
    )
    assert lines[1] == (
        "flux.1-dev and flux.1-kontext-dev, flux.1-krea-dev have functionally identical configs; using flux.1-dev "
        "(canonical); pass --model to name another"
    )


def test_step6_uses_the_cache_too(cache: Path) -> None:
    data = _marked("flux.1-fill-dev", "fill-from-cache")
    add_to_cache(cache, "black-forest-labs/FLUX.1-Fill-dev", {"transformer/config.json": data})
    result, _ = resolve(ConfigRequest(facts=HeaderFacts(Family.FLUX, 384, True, 19, 38)))
    assert result.text.encode() == data


def test_step6_refuses_a_blocks_only_flux_file(cache: Path) -> None:
    message = error_of(ConfigRequest(facts=BLOCKS_ONLY, filename="transformer_blocks.safetensors"))
    assert message.startswith("transformer_blocks.safetensors: cannot tell which model this is: the header fits ")
    assert "whose configs differ on guidance_embeds, in_channels" in message
    assert "the header does not show in_channels or guidance_embeds" in message
    assert "Pass --model NAME (e.g. --model flux.1-dev) or --config FILE" in message


def test_step6_no_known_model_matches(cache: Path) -> None:
    message = error_of(ConfigRequest(facts=HeaderFacts(Family.FLUX, 64, True, 8, 20), filename="lite.safetensors"))
    assert message == (
        "lite.safetensors: no known model matches the header (family flux, in_channels 64, guidance embedder present,"
        " 8 double and 20 single blocks). Pass --config FILE with the model's transformer config"
        " (transformer/config.json), or --model-path DIR"
    )


def test_header_facts_from_inference() -> None:
    inference = Inference(
        family=Fact(Family.FLUX),
        in_channels=Fact(384, ("x_embedder.weight",)),
        guidance_embeds=Fact(True),
        num_layers=Fact(19),
        num_single_layers=Fact(38),
    )
    assert HeaderFacts.from_inference(inference) == HeaderFacts(Family.FLUX, 384, True, 19, 38)
    assert HeaderFacts.from_inference(Inference()) == HeaderFacts()


# --- errors -----------------------------------------------------------------------------------------------------------

ERRORS = [
    # a missing file
    ("missing.json", None, "{path}: config file not found. Check the path"),
    # a JSON array
    (None, CONFIGS / "not-an-object.json", "{path}: config is not a JSON object (expected an object, got list)"),
    # the pipeline's model_index.json instead of the transformer's config
    (
        None,
        CONFIGS / "model_index.json",
        "{path}: this is a pipeline's model_index.json (FluxPipeline), not a "
        "model config. Pass the config.json of its transformer/ (SDXL: unet/, T5: text_encoder_2/) folder, or the"
        " pipeline folder with --model-path",
    ),
]


@pytest.mark.parametrize(("missing", "fixture", "expected"), ERRORS)
def test_config_file_errors(
    tmp_path: Path, cache: Path, missing: str | None, fixture: Path | None, expected: str
) -> None:
    path = tmp_path / missing if missing else fixture
    assert path is not None
    assert error_of(ConfigRequest(config_file=path)) == expected.format(path=path)


def test_config_file_not_json(cache: Path) -> None:
    """Our sentence around json's reason and position; their wording is the interpreter's (3.13 changed it)."""
    path = CONFIGS / "trailing-comma.json"
    message = error_of(ConfigRequest(config_file=path))
    prefix = f"{path}: config is not valid JSON ("
    suffix = "). Pass the model's config.json (transformer/config.json; SDXL: unet/; T5: text_encoder_2/)"
    assert message.startswith(prefix) and message.endswith(suffix), message
    assert re.fullmatch(r"\S.* at line \d+ column \d+", message[len(prefix) : -len(suffix)]), message


def test_config_file_not_utf8(tmp_path: Path, cache: Path) -> None:
    path = tmp_path / "latin1.json"
    path.write_bytes(b'{"name": "caf\xe9"}')
    assert error_of(ConfigRequest(config_file=path)) == (
        f"{path}: config is not UTF-8 text (byte 0xe9 at offset 13). Pass the model's config.json"
        " (transformer/config.json; SDXL: unet/; T5: text_encoder_2/)"
    )


def test_config_file_is_a_folder(tmp_path: Path, cache: Path) -> None:
    message = error_of(ConfigRequest(config_file=tmp_path))
    assert message == f"{tmp_path}: is a folder, not a config.json. Pass a folder with --model-path, or the file in it"


def test_bad_json_in_the_cache_names_the_cached_file(cache: Path) -> None:
    snapshot = add_to_cache(cache, "black-forest-labs/FLUX.1-dev", {"transformer/config.json": b"{oops"})
    message = error_of(ConfigRequest(model="flux.1-dev"))
    assert message.startswith(f"{snapshot / 'transformer' / 'config.json'}: config is not valid JSON")


def test_unknown_model_name(cache: Path) -> None:
    message = error_of(ConfigRequest(model="flux.1-dve"))
    assert message.startswith("unknown model name 'flux.1-dve'. Did you mean flux.1-dev")


def test_invalid_repo_id(cache: Path) -> None:
    message = error_of(ConfigRequest(model="org/na--me"))
    assert message.startswith("not a valid Hugging Face repo id: 'org/na--me'")


@pytest.mark.parametrize(
    ("facts", "kind"),
    [
        # an SDXL-family UNet of another shape: the hint asks for a UNet config
        (HeaderFacts(Family.SDXL, 9, None, 70, None), "UNet config (unet/config.json)"),
        # a T5 encoder of another depth: a text-encoder config, not a transformer config
        (HeaderFacts(Family.T5, None, None, 12, None), "text-encoder config (text_encoder_2/config.json)"),
        # Qwen-Image with another depth: a transformer config
        (HeaderFacts(Family.QWEN_IMAGE, 64, None, 20, None), "transformer config (transformer/config.json)"),
    ],
)
def test_step6_hint_names_the_kind_of_config_of_the_family(cache: Path, facts: HeaderFacts, kind: str) -> None:
    message = error_of(ConfigRequest(facts=facts, filename="odd.safetensors"))
    assert "no known model matches the header" in message
    assert f"Pass --config FILE with the model's {kind}, or --model-path DIR" in message


def test_step6_sdxl_or_turbo_is_decided_by_the_file_name(cache: Path) -> None:
    facts = HeaderFacts(Family.SDXL, 4, None, 70, None)
    result, lines = resolve(ConfigRequest(facts=facts, filename="svdq-int4_r32-sdxl-turbo.safetensors"))
    assert result.model is not None and result.model.name == "sdxl-turbo"
    assert any("says sdxl-turbo" in line for line in lines)
    message = error_of(ConfigRequest(facts=facts, filename="unet.safetensors"))
    assert "cannot tell which model this is: the header fits sdxl, sdxl-turbo, whose configs differ on" in message
    assert "differ on sample_size;" in message
    assert "the tensors cannot tell them apart (same architecture): the file name or --model decides" in message
    assert "Pass --model NAME (e.g. --model sdxl)" in message


def test_model_name_of_a_lightning_file_logs_its_base(cache: Path) -> None:
    request = ConfigRequest(model="svdq-int4_r32-qwen-image-edit-2509-lightningv2.0-4steps")
    result, lines = resolve(request)
    assert result.model is not None and result.model.name == "qwen-image-edit-2509"
    assert any("Lightning (step-distilled) version of qwen-image-edit-2509" in line for line in lines)


def test_file_name_of_a_colossus_file_logs_its_base(cache: Path) -> None:
    facts = HeaderFacts(Family.FLUX, 64, True, 19, 38)
    result, lines = resolve(ConfigRequest(facts=facts, filename="svdq-fp4_r32-flux.1-dev-colossusv12.safetensors"))
    assert result.model is not None and result.model.name == "flux.1-dev"
    assert any("fine-tune (Colossus) of flux.1-dev" in line for line in lines)


def test_model_path_folder_of_an_sdxl_pipeline_reads_its_unet_config(tmp_path: Path, cache: Path) -> None:
    unet = tmp_path / "sdxl" / "unet"
    unet.mkdir(parents=True)
    text = models.embedded_config_text(models.lookup("sdxl"))
    (unet / "config.json").write_text(text)
    facts = HeaderFacts(Family.SDXL, 4, None, 70, None)
    result, _ = resolve(ConfigRequest(model_path=str(tmp_path / "sdxl"), facts=facts))
    assert result.text == text and result.source.endswith("(unet/config.json)")
