"""Synthetic conversions: table layout against the contract, offsets, and the sparse / random writers.

Golden headers live in tests/fixtures/headers/; regenerate them after a deliberate layout change with
``.venv/bin/python tests/test_synth.py --regen``.
"""

from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from safetensors import safe_open

from patcher import models
from patcher.errors import UsageError, WriteError
from patcher.facts import Family
from patcher.header import DTYPE_BITS, parse_header, read_header
from patcher.inspect import infer
from patcher.synth import (
    PRESETS,
    SynthSpec,
    build_table,
    data_size,
    flux_dev_int4_r32,
    header_of,
    preset,
    synth_header,
    table_to_tensors,
    write_random,
    write_sparse,
)

HEADERS = Path(__file__).parent / "fixtures" / "headers"

#: Small specs pinned as golden header files (name -> spec); widths scaled down to keep them readable.
GOLDEN: dict[str, SynthSpec] = {
    "flux.1-dev_int4_r32_2x2": preset("flux.1-dev", num_layers=2, num_single_layers=2, scale=1 / 24),
    "flux.1-fill-dev_nvfp4_r128_2x2": preset(
        "flux.1-fill-dev", precision="nvfp4", rank=128, num_layers=2, num_single_layers=2, scale=1 / 24
    ),
    "flux.1-schnell_int4_r32_blocks-only_2x2": preset(
        "flux.1-schnell", num_layers=2, num_single_layers=2, scale=1 / 24, include_unquantized=False
    ),
    "qwen-image_int4_r32_2": preset("qwen-image", num_layers=2, scale=1 / 24),
    "z-image-turbo_nvfp4_r32_skip-refiners_2": preset(
        "z-image-turbo", precision="nvfp4", num_layers=2, scale=1 / 30, skip_refiners=True
    ),
    "sana-1600m_int4_r32_1": preset("sana-1600m", num_layers=1, scale=1 / 16),
}

W4A4_SUFFIXES = {"qweight", "wscales", "bias", "smooth", "smooth_orig", "lora_down", "lora_up"}
AWQ_SUFFIXES = {"qweight", "wscales", "wzeros", "bias"}


def golden_text(spec: SynthSpec) -> str:
    """Return the header JSON of ``spec`` with one tensor per line (valid JSON, diff-friendly)."""
    tensors = table_to_tensors(build_table(spec))
    lines = [
        f"{json.dumps(name)}: {json.dumps(info.to_json_obj(), separators=(',', ':'))}" for name, info in tensors.items()
    ]
    return "{\n" + ",\n".join(lines) + "\n}\n"


def _modules(table: dict[str, tuple[str, tuple[int, ...]]]) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for name in table:
        head, _, leaf = name.rpartition(".")
        out.setdefault(head, set()).add(leaf)
    return out


# --------------------------------------------------------------------------------------------
# The full FLUX.1-dev table against the numbers of the contract


@pytest.fixture(scope="module")
def flux_dev() -> dict[str, tuple[str, tuple[int, ...]]]:
    return build_table(preset("flux.1-dev"))


def test_flux_dev_size_and_count(flux_dev: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    # Contract: about 2,600 tensors and about 6.8 GB for svdq-int4-flux.1-dev.
    tensors = table_to_tensors(flux_dev)
    assert 2500 <= len(tensors) <= 2700
    assert 6.6e9 <= data_size(tensors) <= 7.0e9
    assert flux_dev_int4_r32() == tensors


def test_flux_dev_anchor_shapes(flux_dev: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    # The two shapes the contract quotes from the published file.
    assert flux_dev["transformer_blocks.0.qkv_proj.qweight"] == ("I8", (9216, 1536))
    assert flux_dev["transformer_blocks.0.norm1.linear.qweight"] == ("I32", (4608, 1536))
    assert flux_dev["single_transformer_blocks.0.norm.linear.qweight"] == ("I32", (2304, 1536))
    assert flux_dev["transformer_blocks.0.mlp_fc2.qweight"] == ("I8", (3072, 6144))
    assert flux_dev["transformer_blocks.0.qkv_proj.wscales"] == ("BF16", (48, 9216))
    assert flux_dev["transformer_blocks.0.qkv_proj.lora_down"] == ("BF16", (3072, 32))
    assert flux_dev["transformer_blocks.0.qkv_proj.lora_up"] == ("BF16", (9216, 32))
    assert flux_dev["transformer_blocks.0.norm_q.weight"] == ("BF16", (128,))


def test_flux_dev_layer_kinds(flux_dev: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    modules = _modules(flux_dev)
    double_w4a4 = ["qkv_proj", "qkv_proj_context", "out_proj", "out_proj_context"]
    double_w4a4 += ["mlp_fc1", "mlp_fc2", "mlp_context_fc1", "mlp_context_fc2"]
    for i in range(19):
        for layer in double_w4a4:
            assert modules[f"transformer_blocks.{i}.{layer}"] == W4A4_SUFFIXES
        for layer in ("norm1.linear", "norm1_context.linear"):
            assert modules[f"transformer_blocks.{i}.{layer}"] == AWQ_SUFFIXES
        for norm in ("norm_q", "norm_k", "norm_added_q", "norm_added_k"):
            assert modules[f"transformer_blocks.{i}.{norm}"] == {"weight"}
    for i in range(38):
        for layer in ("qkv_proj", "out_proj", "mlp_fc1", "mlp_fc2"):
            assert modules[f"single_transformer_blocks.{i}.{layer}"] == W4A4_SUFFIXES
        assert modules[f"single_transformer_blocks.{i}.norm.linear"] == AWQ_SUFFIXES
        assert modules[f"single_transformer_blocks.{i}.norm_q"] == {"weight"}
    assert "transformer_blocks.19.qkv_proj" not in modules and "single_transformer_blocks.38.qkv_proj" not in modules


def test_flux_dev_geometry_is_consistent(flux_dev: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    # Every W4A4 layer: qweight [oc, ic/2], wscales [ic/64, oc], lora_down [ic, r], lora_up [oc, r], all 128-aligned.
    modules = _modules(flux_dev)
    checked = 0
    for head, leaves in modules.items():
        if "lora_down" not in leaves:
            continue
        _, (oc, half_ic) = flux_dev[f"{head}.qweight"]
        ic = 2 * half_ic
        assert oc % 128 == 0 and ic % 128 == 0
        assert flux_dev[f"{head}.wscales"] == ("BF16", (ic // 64, oc))
        assert flux_dev[f"{head}.smooth"] == ("BF16", (ic,)) == flux_dev[f"{head}.smooth_orig"]
        assert flux_dev[f"{head}.bias"] == ("BF16", (oc,))
        assert flux_dev[f"{head}.lora_down"] == ("BF16", (ic, 32))
        assert flux_dev[f"{head}.lora_up"] == ("BF16", (oc, 32))
        checked += 1
    assert checked == 19 * 8 + 38 * 4


def test_flux_dev_unquantized_layers(flux_dev: dict[str, tuple[str, tuple[int, ...]]]) -> None:
    expected = {
        "x_embedder.weight": (3072, 64),
        "context_embedder.weight": (3072, 4096),
        "time_text_embed.timestep_embedder.linear_1.weight": (3072, 256),
        "time_text_embed.timestep_embedder.linear_2.weight": (3072, 3072),
        "time_text_embed.guidance_embedder.linear_1.weight": (3072, 256),
        "time_text_embed.text_embedder.linear_1.weight": (3072, 768),
        "norm_out.linear.weight": (6144, 3072),
        "proj_out.weight": (64, 3072),
    }
    for name, shape in expected.items():
        assert flux_dev[name] == ("BF16", shape), name
        assert flux_dev[name.replace(".weight", ".bias")] == ("BF16", (shape[0],))
    outside = [n for n in flux_dev if not n.startswith(("transformer_blocks.", "single_transformer_blocks."))]
    assert len(outside) == 20  # 10 linear layers, weight + bias each


# --------------------------------------------------------------------------------------------
# Precision, naming, variants, blocks-only, scale


def test_nvfp4_layout() -> None:
    table = build_table(preset("flux.1-dev", precision="nvfp4", rank=128, num_layers=1, num_single_layers=1))
    # Fused qkv layers get per-channel wcscales, the others one wtscale (deepcompressor's choice).
    assert table["transformer_blocks.0.qkv_proj.wscales"] == ("F8_E4M3", (192, 9216))
    assert table["transformer_blocks.0.qkv_proj.wcscales"] == ("BF16", (9216,))
    assert "transformer_blocks.0.qkv_proj.wtscale" not in table
    assert table["single_transformer_blocks.0.qkv_proj.wcscales"] == ("BF16", (9216,))
    assert table["transformer_blocks.0.mlp_fc2.wscales"] == ("F8_E4M3", (768, 3072))
    assert table["transformer_blocks.0.mlp_fc2.wtscale"] == ("BF16", (1,))
    assert "transformer_blocks.0.mlp_fc2.wcscales" not in table
    assert table["transformer_blocks.0.qkv_proj.lora_down"] == ("BF16", (3072, 128))
    # AWQ modulation layers are W4A16 int4 whatever the W4A4 precision.
    assert table["transformer_blocks.0.norm1.linear.qweight"] == ("I32", (4608, 1536))
    assert table["transformer_blocks.0.norm1.linear.wscales"] == ("BF16", (48, 18432))


def test_int4_has_no_f8_and_no_tensor_scales() -> None:
    table = build_table(preset("qwen-image", num_layers=2))
    assert not {dtype for dtype, _ in table.values()} & {"F8_E4M3", "F8_E5M2"}
    assert not [n for n in table if n.endswith((".wtscale", ".wcscales"))]


@pytest.mark.parametrize(
    ("naming", "present", "absent"),
    [
        # deepcompressor's names (the Flux default)
        ("lora", {"lora_down", "lora_up", "smooth", "smooth_orig"}, {"proj_down", "proj_up", "smooth_factor"}),
        # nunchaku v1's module names (the Qwen-Image / Z-Image default)
        ("proj", {"proj_down", "proj_up", "smooth_factor", "smooth_factor_orig"}, {"lora_down", "lora_up", "smooth"}),
    ],
)
def test_naming(naming: str, present: set[str], absent: set[str]) -> None:
    table = build_table(preset("flux.1-dev", naming=naming, num_layers=1, num_single_layers=1, scale=1 / 24))
    leaves = {name.rpartition(".")[2] for name in table}
    assert present <= leaves
    assert not absent & leaves


@pytest.mark.parametrize(
    ("name", "in_channels", "guidance"),
    [
        ("flux.1-dev", 64, True),
        ("flux.1-schnell", 64, False),  # no guidance embedder
        ("flux.1-fill-dev", 384, True),  # image + mask latents
        ("flux.1-canny-dev", 128, True),  # image + control latents
        ("flux.1-depth-dev", 128, True),
        ("flux.1-kontext-dev", 64, True),
        ("flux.1-krea-dev", 64, True),
        ("shuttle-jaguar", 64, False),  # schnell-like
    ],
)
def test_flux_variant_evidence(name: str, in_channels: int, guidance: bool) -> None:
    table = build_table(preset(name, num_layers=1, num_single_layers=1))
    assert table["x_embedder.weight"] == ("BF16", (3072, in_channels))
    assert ("time_text_embed.guidance_embedder.linear_1.weight" in table) is guidance
    assert table["proj_out.weight"] == ("BF16", (64, 3072))


@pytest.mark.parametrize("name", list(PRESETS))
def test_blocks_only_has_no_unquantized_layers(name: str) -> None:
    spec = preset(name, include_unquantized=False, num_layers=2, num_single_layers=1, scale=0.05)
    full = build_table(spec.with_(include_unquantized=True))
    blocks = build_table(spec)
    assert blocks and set(blocks) < set(full)
    assert all(full[n] == entry for n, entry in blocks.items())
    removed = set(full) - set(blocks)
    assert not any(".qweight" in n for n in removed)  # only 16-bit layers go


@pytest.mark.parametrize("name", list(PRESETS))
def test_scale_keeps_structure(name: str) -> None:
    spec = preset(name, num_layers=2, num_single_layers=2)
    full, small = build_table(spec), build_table(spec.with_(scale=0.05))
    assert list(full) == list(small)
    assert [dtype for dtype, _ in full.values()] == [dtype for dtype, _ in small.values()]
    assert data_size(table_to_tensors(small)) < data_size(table_to_tensors(full)) / 10
    for name_, (dtype, shape) in small.items():
        if name_.endswith(".qweight") and dtype == "I8":
            assert shape[0] % 128 == 0 and (2 * shape[1]) % 128 == 0, name_


def test_default_layer_counts() -> None:
    assert (
        len({n.split(".")[1] for n in build_table(preset("qwen-image", scale=0.05)) if n.startswith("transformer_")})
        == 60
    )
    zimage = build_table(preset("z-image-turbo", scale=0.05))
    assert len({n.split(".")[1] for n in zimage if n.startswith("layers.")}) == 30
    assert len({n.split(".")[1] for n in zimage if n.startswith("noise_refiner.")}) == 2
    assert (
        len({n.split(".")[1] for n in build_table(preset("sana-1600m", scale=0.05)) if n.startswith("transformer_")})
        == 20
    )


def test_zimage_skip_refiners_keeps_refiners_in_16_bits() -> None:
    table = build_table(preset("z-image-turbo", num_layers=1, skip_refiners=True, scale=1 / 30))
    refiner = [n for n in table if n.startswith(("noise_refiner.", "context_refiner."))]
    assert refiner and not [n for n in refiner if n.endswith(".qweight")]
    assert "noise_refiner.0.attention.to_q.weight" in table
    assert "layers.0.attention.to_qkv.qweight" in table


def test_sana_pads_quantized_widths() -> None:
    table = build_table(preset("sana-1600m", num_layers=1))
    # 2240 = 70 heads x 32 is padded to 2304 inside the W4A4 layers (nunchaku's SanaModel).
    assert table["transformer_blocks.0.attn.qkv_proj.qweight"] == ("I8", (6912, 1152))
    assert table["transformer_blocks.0.attn.out_proj.qweight"] == ("I8", (2304, 1152))
    assert table["transformer_blocks.0.scale_shift_table"] == ("BF16", (6, 2240))


def test_t5_is_awq_only() -> None:
    table = build_table(preset("t5-xxl", num_layers=1))
    assert table["encoder.block.0.layer.0.SelfAttention.q.qweight"] == ("I16", (1024, 4096))
    assert table["encoder.block.0.layer.1.DenseReluDense.wo.scales"] == ("BF16", (80, 4096))
    assert not [n for n in table if n.endswith(("lora_down", "proj_down"))]


def test_float_dtype_f16() -> None:
    table = build_table(preset("flux.1-dev", num_layers=1, num_single_layers=0, float_dtype="F16", scale=1 / 24))
    assert {dtype for dtype, _ in table.values()} == {"F16", "I8", "I32"}


# --------------------------------------------------------------------------------------------
# Bad specs and names


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"precision": "fp8"}, "precision"),
        ({"rank": 0}, "rank"),
        ({"rank": True}, "rank"),
        ({"scale": 0}, "scale"),
        ({"scale": 1.5}, "scale"),
        ({"num_layers": -1}, "num_layers"),
        ({"naming": "lora2"}, "naming"),
        ({"float_dtype": "F32"}, "float_dtype"),
        ({"family": Family.T5, "precision": "nvfp4"}, "precision"),
    ],
)
def test_bad_spec_is_refused(changes: dict[str, object], field: str) -> None:
    with pytest.raises(UsageError, match=f"bad synthetic spec field '{field}'"):
        build_table(SynthSpec().with_(**changes))


def test_unknown_preset() -> None:
    with pytest.raises(UsageError, match=r"unknown synthetic preset 'flux\.2-dev'.*flux\.1-dev"):
        preset("flux.2-dev")


def test_preset_names_are_case_insensitive_and_take_changes() -> None:
    spec = preset("FLUX.1-Fill-dev", precision="nvfp4", rank=128, scale=0.5)
    assert (spec.family, spec.in_channels, spec.precision, spec.rank, spec.scale) == (
        Family.FLUX,
        384,
        "nvfp4",
        128,
        0.5,
    )
    assert preset("sana-1600m-1024px") == PRESETS["sana-1600m"]


def test_every_known_model_has_a_preset() -> None:
    assert set(PRESETS) == {m.name for m in models.all_models()}


@pytest.mark.parametrize(
    ("name", "base"),
    [
        # a published file name maps to its model's preset
        ("svdq-int4_r32-sdxl-turbo", "sdxl-turbo"),
        # the T5 encoder's published name
        ("awq-int4-flux.1-t5xxl", "t5-xxl"),
        # a Lightning name: the base model's table (same architecture)
        ("qwen-image-edit-2509-lightningv2.0-4steps", "qwen-image-edit-2509"),
    ],
)
def test_preset_accepts_published_names(name: str, base: str) -> None:
    assert preset(name) == PRESETS[base]


# --------------------------------------------------------------------------------------------
# Offsets and headers


def test_offsets_are_consecutive_and_sized() -> None:
    table = build_table(preset("flux.1-fill-dev", precision="nvfp4", num_layers=1, num_single_layers=1, scale=1 / 24))
    tensors = table_to_tensors(table)
    assert list(tensors) == list(table)
    position = 0
    for name, info in tensors.items():
        assert info.data_offsets[0] == position, name
        assert info.nbytes * 8 == math.prod(info.shape) * DTYPE_BITS[info.dtype]
        assert (info.dtype, info.shape) == table[name]
        position = info.data_offsets[1]
    assert data_size(tensors) == position


def test_partial_byte_tensor_is_refused() -> None:
    with pytest.raises(UsageError, match="whole bytes"):
        table_to_tensors({"x": ("F4", (3,))})


def test_header_of_round_trips() -> None:
    tensors = table_to_tensors(build_table(preset("qwen-image", num_layers=1, scale=1 / 24)))
    header = header_of(tensors, {"format": "pt"})
    assert dict(header.tensors) == tensors and dict(header.metadata or {}) == {"format": "pt"}
    assert header.aligned and synth_header(preset("qwen-image", num_layers=1, scale=1 / 24)).tensors == header.tensors


# --------------------------------------------------------------------------------------------
# Writers, checked by the reference reader


def _spec_small() -> SynthSpec:
    return preset("flux.1-dev", precision="nvfp4", rank=64, num_layers=2, num_single_layers=1, scale=1 / 24)


def test_write_sparse_is_valid_and_sparse(tmp_path: Path) -> None:
    tensors = table_to_tensors(build_table(preset("flux.1-dev", num_layers=3, num_single_layers=3)))
    path = write_sparse(tmp_path / "sparse.safetensors", tensors, {"format": "pt"})
    header = read_header(path)
    assert dict(header.tensors) == tensors
    assert os.path.getsize(path) == header.file_size == 8 + header.header_len + data_size(tensors)
    assert header.aligned
    # The data region is a hole: far fewer blocks are allocated than the file's length needs.
    assert os.stat(path).st_blocks * 512 < data_size(tensors) / 10
    with safe_open(str(path), framework="np") as f:
        assert f.metadata() == {"format": "pt"}
        assert set(f.keys()) == set(tensors)
        assert not f.get_tensor("transformer_blocks.0.qkv_proj.qweight").any()  # holes read as zeros


def test_write_random_is_valid_and_seeded(tmp_path: Path) -> None:
    tensors = table_to_tensors(build_table(_spec_small()))
    first = write_random(tmp_path / "a.safetensors", tensors, seed=1)
    again = write_random(tmp_path / "b.safetensors", tensors, seed=1)
    other = write_random(tmp_path / "c.safetensors", tensors, seed=2)
    assert first.read_bytes() == again.read_bytes() != other.read_bytes()
    header = read_header(first)
    assert dict(header.tensors) == tensors and header.metadata is None
    blob = first.read_bytes()
    name = "transformer_blocks.1.mlp_fc1.qweight"
    begin, end = tensors[name].data_offsets
    with safe_open(str(first), framework="np") as f:
        array = f.get_tensor(name)
    assert array.dtype == np.int8 and array.shape == tensors[name].shape
    assert array.tobytes() == blob[header.data_start + begin : header.data_start + end]
    assert len(set(array.tobytes())) > 200  # random, not zeros


def test_write_random_streams_in_chunks(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import patcher.synth as synth

    monkeypatch.setattr(synth, "RANDOM_CHUNK", 1000)  # many chunks, and a short last one
    tensors = table_to_tensors(build_table(_spec_small()))
    path = write_random(tmp_path / "chunked.safetensors", tensors, seed=3)
    assert os.path.getsize(path) == read_header(path).file_size


def test_write_error_names_the_file(tmp_path: Path) -> None:
    target = tmp_path / "missing-dir" / "x.safetensors"
    with pytest.raises(WriteError, match=r"missing-dir.*cannot write synthetic file"):
        write_sparse(target, table_to_tensors({"x": ("BF16", (2,))}))


@pytest.mark.parametrize(
    ("name", "precision"),
    # T5 files are AWQ int4 only: no nvfp4 case.
    [(n, p) for n in list(PRESETS) for p in ("int4", "nvfp4") if (n, p) != ("t5-xxl", "nvfp4")],
)
def test_every_preset_writes_a_file_the_reader_accepts(tmp_path: Path, name: str, precision: str) -> None:
    spec = preset(name, precision=precision, num_layers=2, num_single_layers=2, scale=0.05)
    tensors = table_to_tensors(build_table(spec))
    path = write_sparse(tmp_path / f"{name}.safetensors", tensors)
    with safe_open(str(path), framework="np") as f:
        assert len(f.keys()) == len(tensors)


# --------------------------------------------------------------------------------------------
# Golden headers


@pytest.mark.parametrize("name", sorted(GOLDEN))
def test_golden_header(name: str) -> None:
    path = HEADERS / f"{name}.json"
    text = path.read_text()
    assert golden_text(GOLDEN[name]) == text, f"layout changed: regenerate {path} if that was meant"
    header = parse_header(text.encode())
    assert dict(header.tensors) == table_to_tensors(build_table(GOLDEN[name]))


def _regen() -> None:
    HEADERS.mkdir(parents=True, exist_ok=True)
    for name, spec in GOLDEN.items():
        (HEADERS / f"{name}.json").write_text(golden_text(spec))
        print(f"wrote {HEADERS / name}.json", file=sys.stderr)


if __name__ == "__main__":
    if sys.argv[1:] == ["--regen"]:
        _regen()
    else:
        print("usage: python tests/test_synth.py --regen", file=sys.stderr)


# --------------------------------------------------------------------------------------------
# scripts/make_sample.py --preset: every known model, and the published names --model accepts


def _make_sample() -> Any:
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "scripts" / "make_sample.py"
    spec = importlib.util.spec_from_file_location("make_sample", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("name", "family"),
    [
        ("sdxl", Family.SDXL),
        ("sdxl-turbo", Family.SDXL),
        ("t5-xxl", Family.T5),
        ("qwen-image-edit", Family.QWEN_IMAGE),
        # a published Lightning file name: its base model's table
        ("svdq-int4_r32-qwen-image-edit-2509-lightningv2.0-4steps", Family.QWEN_IMAGE),
    ],
)
def test_make_sample_writes_every_new_model(tmp_path: Path, name: str, family: Family) -> None:
    out = tmp_path / "sample.safetensors"
    assert _make_sample().main([str(out), "--preset", name, "--scale", "0.1"]) == 0
    with safe_open(str(out), framework="np") as f:  # the reference reader accepts it, with no metadata
        assert f.metadata() is None
    inference = infer(read_header(out))
    assert inference.family is not None and inference.family.value is family


def test_make_sample_refuses_nvfp4_for_t5_in_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _make_sample().main([str(tmp_path / "t5.safetensors"), "--preset", "t5-xxl", "--precision", "nvfp4"]) == 2
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith("error: bad synthetic spec field 'precision'")
