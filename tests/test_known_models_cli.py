"""Issue 15 end to end: old SDXL, SDXL-Turbo, T5-XXL and Qwen-Image-Edit (and Lightning) files, as published.

Each file is a full-size synthetic conversion with no metadata (sparse: real header, the data region a hole), named
as Nunchaku publishes it. The command line patches it in place with nothing but the file (or ``--model``), then
``validate`` must pass and the real ``safetensors`` reader must return exactly the entries each family's loader
reads, with the config of the right model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from safetensors import safe_open

from patcher import cli, models, synth
from patcher.header import read_header
from patcher.metadata import quantization_config_text


def run(*args: str) -> Result:
    return CliRunner().invoke(cli.main, list(args), catch_exceptions=False)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[None]:
    """Keep the user's Hugging Face cache out: the embedded configs must be what is used."""
    monkeypatch.setenv("HF_HOME", os.fspath(tmp_path / "hf-home"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    yield


def old_file(folder: Path, name: str, preset: str, **changes: object) -> Path:
    """Write ``name``: the preset's full tensor table, no ``__metadata__`` (an old conversion)."""
    tensors = synth.table_to_tensors(synth.build_table(synth.preset(preset, **changes)))
    return synth.write_sparse(folder / name, tensors)


CASES = [
    # id, file name as published, preset of its tensors, extra args, model whose config is written, keys, rank
    ("sdxl", "svdq-int4_r32-sdxl.safetensors", "sdxl", (), "sdxl", ["config", "quantization_config"], 32),
    (
        "sdxl-turbo",
        "svdq-int4_r32-sdxl-turbo.safetensors",
        "sdxl-turbo",
        (),
        "sdxl-turbo",
        ["config", "quantization_config"],
        32,
    ),
    # same tensors, no name in the file: --model decides
    ("turbo-by-model", "unet.safetensors", "sdxl", ("--model", "sdxl-turbo"), "sdxl-turbo", None, 32),
    ("t5", "awq-int4-flux.1-t5xxl.safetensors", "t5-xxl", (), "t5-xxl", ["config", "model_class"], None),
    (
        "qwen-image-edit",
        "svdq-int4_r128-qwen-image-edit.safetensors",
        "qwen-image-edit",
        (),
        "qwen-image-edit",
        ["config", "comfy_config", "model_class", "quantization_config"],
        128,
    ),
    # a Lightning distillation: the base model's config, and the log says so
    (
        "edit-2509-lightning",
        "svdq-int4_r32-qwen-image-edit-2509-lightningv2.0-4steps.safetensors",
        "qwen-image-edit-2509",
        (),
        "qwen-image-edit-2509",
        None,
        32,
    ),
]


@pytest.mark.parametrize(
    ("name", "preset", "args", "model", "keys", "rank"), [c[1:] for c in CASES], ids=[c[0] for c in CASES]
)
def test_old_file_is_patched_with_its_family_entries_and_validates(
    tmp_path: Path, name: str, preset: str, args: tuple[str, ...], model: str, keys: list[str] | None, rank: int | None
) -> None:
    path = old_file(tmp_path, name, preset, **({"rank": rank} if rank else {}))
    result = run(str(path), *args)
    assert result.exit_code == 0, result.stderr
    assert f"patched {path}" in result.stderr
    known = models.lookup(model)
    with safe_open(str(path), framework="np") as f:
        metadata = f.metadata()
        count = len(list(f.keys()))
    assert count == len(synth.build_table(synth.preset(preset)))
    written = read_header(path).metadata  # safetensors' reader returns a map without order; ours keeps it
    assert written == metadata
    if keys is not None:
        assert written is not None and list(written) == keys
    assert metadata["config"] == models.embedded_config_text(known)
    if known.family.value == "t5":
        assert metadata["model_class"] == "NunchakuT5EncoderModel" and "quantization_config" not in metadata
    else:
        assert metadata["quantization_config"] == quantization_config_text("int4", rank or 32)
    checked = run("validate", "-v", str(path))
    assert checked.exit_code == 0 and f"{path}: ok" in checked.stdout, checked.stdout
    again = run(str(path), *args)
    assert again.exit_code == 0 and "already correct" in again.stderr


def test_lightning_file_name_says_it_uses_the_base_config(tmp_path: Path) -> None:
    path = old_file(tmp_path, "svdq-int4_r32-qwen-image-lightningv1.0-4steps.safetensors", "qwen-image")
    result = run(str(path), "--dry-run")
    assert result.exit_code == 0, result.stderr
    assert "is a Lightning (step-distilled) version of qwen-image: same architecture" in result.stderr


def test_model_option_takes_every_published_name(tmp_path: Path) -> None:
    path = old_file(tmp_path, "transformer.safetensors", "flux.1-dev")
    result = run(str(path), "--dry-run", "--model", "svdq-fp4_r32-flux.1-dev-colossusv12")
    assert result.exit_code == 0, result.stderr
    assert "is a fine-tune (Colossus) of flux.1-dev" in result.stderr


def head(path: Path) -> bytes:
    with open(path, "rb") as f:
        return f.read(1 << 20)


def test_sdxl_without_a_name_asks_for_model(tmp_path: Path) -> None:
    folder = tmp_path / "models"  # the test's own folder is named after it, "sdxl" included: not a hint here
    folder.mkdir()
    path = old_file(folder, "unet.safetensors", "sdxl")
    before = head(path)
    result = run(str(path))
    assert result.exit_code == 3
    assert "the header fits sdxl, sdxl-turbo, whose configs differ on sample_size" in result.stderr
    assert "Pass --model NAME" in result.stderr
    assert head(path) == before


def test_t5_refuses_a_rank(tmp_path: Path) -> None:
    path = old_file(tmp_path, "awq-int4-flux.1-t5xxl.safetensors", "t5-xxl")
    result = run(str(path), "--rank", "32")
    assert result.exit_code != 0
    assert "--precision / --rank do not apply to the T5 encoder" in result.stderr


def test_inspect_prints_the_sdxl_and_t5_evidence(tmp_path: Path) -> None:
    sdxl = old_file(tmp_path, "svdq-int4_r32-sdxl.safetensors", "sdxl")
    t5 = old_file(tmp_path, "awq-int4-flux.1-t5xxl.safetensors", "t5-xxl")
    out = run("inspect", str(sdxl), str(t5)).stdout
    assert "unet_layout: down_blocks.1: 2x2, down_blocks.2: 2x10, mid_block: 1x10, up_blocks.0: 3x10" in out
    assert "quantized in each block: attn1.to_out.0, attn1.to_qkv, attn2.to_out.0, attn2.to_q, ff.net.0.proj" in out
    assert "num_layers: 70" in out
    assert "precision: int4 (AWQ W4A16" in out and "group size: 128" in out and "num_layers: 24" in out
    records = [json.loads(line) for line in run("inspect", "--json", str(t5)).stdout.splitlines()]
    assert records[0]["inferred"]["group_size"]["value"] == 128
