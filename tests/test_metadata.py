"""Tests of patcher.metadata: exact strings, comfy_config goldens, entries, overrides, merge and diff."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from patcher.errors import ConfigError, InferenceError, UsageError
from patcher.facts import MODEL_CLASS, Fact, Family, Inference, Precision
from patcher.metadata import (
    COMPAT_KEYS,
    ENTRY_KEYS,
    OWNED_KEYS,
    MetadataChange,
    build_entries,
    choose_quantization,
    comfy_config_from_config,
    comfy_config_text,
    diff_metadata,
    merge_metadata,
    metadata_changes,
    normalize_precision,
    pretty_value,
    quantization_config_text,
)

CONFIGS = Path(__file__).resolve().parent.parent / "patcher" / "configs"
COMFY_GOLDEN = Path(__file__).resolve().parent / "fixtures" / "comfy"

# The contract's strings (nunchaku-contract.md section 3), copied by hand: the code must reproduce them exactly.
INT4_R32 = (
    '{"method": "svdquant", "weight": {"dtype": "int4", "scale_dtype": null, "group_size": 64}, '
    '"activation": {"dtype": "int4", "scale_dtype": null, "group_size": 64}, "rank": 32}'
)
FP4_R32 = (
    '{"method": "svdquant", "weight": {"dtype": "fp4_e2m1_all", "scale_dtype": [null, "fp8_e4m3_nan"], '
    '"group_size": 16}, "activation": {"dtype": "fp4_e2m1_all", "scale_dtype": "fp8_e4m3_nan", "group_size": 16}, '
    '"rank": 32}'
)


def config_text(name: str) -> str:
    return (CONFIGS / f"{name}.json").read_text()


def config(name: str) -> dict[str, Any]:
    value: dict[str, Any] = json.loads(config_text(name))
    return value


def inference(
    precision: Precision | None = "int4",
    rank: int | None = 32,
    group_size: int | None = None,
    family: Family = Family.FLUX,
) -> Inference:
    """Build what inspect would say about a file (by hand: this module must not depend on inspect)."""
    return Inference(
        family=Fact(family, ("transformer_blocks.0.qkv_proj.qweight",)),
        precision=Fact(precision, ("transformer_blocks.0.qkv_proj.wscales",), "wscales are BF16")
        if precision
        else None,
        rank=Fact(rank, ("transformer_blocks.0.qkv_proj.lora_down",), f"lora_down is [3072, {rank}]") if rank else None,
        group_size=Fact(group_size, ("transformer_blocks.0.qkv_proj.wscales",)) if group_size else None,
        quantized=True,
    )


# --------------------------------------------------------------------------------------------
# quantization_config


@pytest.mark.parametrize(
    ("precision", "rank", "expected"),
    [
        ("int4", 32, INT4_R32),
        ("nvfp4", 32, FP4_R32),
        # Aliases: the contract's "fp4", the metadata's own dtype, deepcompressor's YAML dtypes.
        ("fp4", 32, FP4_R32),
        ("fp4_e2m1_all", 32, FP4_R32),
        ("sint4", 32, INT4_R32),
        ("sfp4_e2m1_all", 32, FP4_R32),
        # The rank is the only thing that changes between r32 and r128 files.
        ("int4", 128, INT4_R32.replace('"rank": 32}', '"rank": 128}')),
        ("nvfp4", 128, FP4_R32.replace('"rank": 32}', '"rank": 128}')),
    ],
)
def test_quantization_config_exact_strings(precision: str, rank: int, expected: str) -> None:
    assert quantization_config_text(precision, rank) == expected


@pytest.mark.parametrize("skip", [True, False])
def test_quantization_config_z_image_appends_skip_refiners_after_rank(skip: bool) -> None:
    text = quantization_config_text("int4", 128, family=Family.Z_IMAGE, skip_refiners=skip)
    expected = INT4_R32.replace('"rank": 32}', f'"rank": 128, "skip_refiners": {json.dumps(skip)}}}')
    assert text == expected
    assert list(json.loads(text)) == ["method", "weight", "activation", "rank", "skip_refiners"]


def test_quantization_config_refuses_bad_inputs() -> None:
    with pytest.raises(UsageError, match="unknown precision 'int8'"):
        quantization_config_text("int8", 32)
    for bad in (0, -16, True):
        with pytest.raises(UsageError, match="rank must be a positive integer"):
            quantization_config_text("int4", bad)
    # skip_refiners means nothing outside Z-Image: refuse instead of writing a key no loader reads.
    with pytest.raises(UsageError, match="only exists for Z-Image"):
        quantization_config_text("int4", 32, family=Family.FLUX, skip_refiners=True)
    # Z-Image without it would silently take the loader default (false): refuse instead.
    with pytest.raises(InferenceError, match="skip_refiners"):
        quantization_config_text("int4", 32, family=Family.Z_IMAGE)


def test_normalize_precision_is_case_insensitive() -> None:
    assert normalize_precision(" NVFP4 ") == "nvfp4"
    assert normalize_precision("INT4") == "int4"


# --------------------------------------------------------------------------------------------
# comfy_config


@pytest.mark.parametrize(
    "name", ["flux.1-dev", "flux.1-schnell", "flux.1-fill-dev", "flux.1-canny-dev", "flux.1-depth-dev"]
)
def test_comfy_config_matches_shipped_files(name: str) -> None:
    golden = json.loads((COMFY_GOLDEN / f"{name}.json").read_text())
    built = comfy_config_from_config(config(name))
    assert built == golden
    # Same key order as the shipped files (sorted model_config keys), so the text reads the same.
    assert list(built["model_config"]) == list(golden["model_config"])
    assert json.loads(comfy_config_text(config(name))) == golden


@pytest.mark.parametrize("name", ["flux.1-kontext-dev", "flux.1-krea-dev"])
def test_comfy_config_dev_derivatives_equal_dev(name: str) -> None:
    # These configs say "out_channels": null: ComfyUI's out_channels comes from in_channels then.
    assert comfy_config_from_config(config(name)) == json.loads((COMFY_GOLDEN / "flux.1-dev.json").read_text())


def test_comfy_config_uses_diffusers_defaults_for_missing_fields() -> None:
    # diffusers' default guidance_embeds is false: a bare config is schnell-like.
    built = comfy_config_from_config({"_class_name": "FluxTransformer2DModel"})
    assert built == json.loads((COMFY_GOLDEN / "flux.1-schnell.json").read_text())


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (config("qwen-image"), "only be generated from a Flux config"),
        ({"in_channels": 66}, "'in_channels' is not a multiple of 4"),
        ({"num_layers": "19"}, "'num_layers' is not a positive integer"),
        ({"guidance_embeds": "yes"}, "'guidance_embeds' is not a boolean"),
        ({"axes_dims_rope": [16, 56.5, 56]}, "'axes_dims_rope' is not a list of integers"),
    ],
)
def test_comfy_config_refuses_unusable_configs(cfg: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        comfy_config_from_config(cfg)


# --------------------------------------------------------------------------------------------
# build_entries


def test_build_entries_flux_order_and_values() -> None:
    text = config_text("flux.1-dev")
    entries = build_entries(family=Family.FLUX, config_text=text, precision="int4", rank=32)
    assert list(entries) == list(ENTRY_KEYS)
    assert entries["config"] == text  # raw text, formatting kept
    assert entries["model_class"] == "NunchakuFluxTransformer2dModel"
    assert entries["quantization_config"] == INT4_R32
    assert json.loads(entries["comfy_config"]) == json.loads((COMFY_GOLDEN / "flux.1-dev.json").read_text())


def test_build_entries_schnell_gets_flux_schnell() -> None:
    entries = build_entries(family=Family.FLUX, config_text=config_text("flux.1-schnell"), precision="nvfp4", rank=32)
    comfy = json.loads(entries["comfy_config"])
    assert comfy["model_class"] == "FluxSchnell"
    assert comfy["model_config"]["guidance_embed"] is False
    assert entries["quantization_config"] == FP4_R32


def test_build_entries_given_comfy_config_and_model_class_win() -> None:
    given_comfy = '{"model_class": "FluxSchnell", "model_config": {"guidance_embed": false}}'
    entries = build_entries(
        family=Family.FLUX,
        config_text=config_text("flux.1-dev"),
        precision="int4",
        rank=32,
        comfy_config_text=given_comfy,
        model_class="NunchakuFluxTransformer2DModelV2",
    )
    assert entries["comfy_config"] == given_comfy
    assert entries["model_class"] == "NunchakuFluxTransformer2DModelV2"


@pytest.mark.parametrize(
    ("family", "name", "skip"),
    [
        (Family.QWEN_IMAGE, "qwen-image", None),
        (Family.Z_IMAGE, "z-image-turbo", True),
        (Family.SANA, "sana-1600m-1024px", None),
    ],
)
def test_build_entries_other_families_write_empty_comfy_config(family: Family, name: str, skip: bool | None) -> None:
    entries = build_entries(
        family=family, config_text=config_text(name), precision="int4", rank=128, skip_refiners=skip
    )
    assert list(entries) == list(ENTRY_KEYS)
    assert entries["comfy_config"] == "{}"
    assert entries["model_class"] == MODEL_CLASS[family]
    assert json.loads(entries["quantization_config"])["rank"] == 128
    assert ("skip_refiners" in json.loads(entries["quantization_config"])) is (family is Family.Z_IMAGE)


@pytest.mark.parametrize(
    ("kwargs", "error", "message"),
    [
        ({"config_text": "{not json"}, ConfigError, "config is not valid JSON"),
        ({"config_text": "[1, 2]"}, ConfigError, "config is not a JSON object"),
        ({"comfy_config_text": "nope"}, ConfigError, "comfy_config is not valid JSON"),
        ({"precision": "int3"}, UsageError, "unknown precision"),
    ],
)
def test_build_entries_refuses_bad_input(kwargs: dict[str, Any], error: type[Exception], message: str) -> None:
    args: dict[str, Any] = {
        "family": Family.FLUX,
        "config_text": config_text("flux.1-dev"),
        "precision": "int4",
        "rank": 32,
    }
    args.update(kwargs)
    with pytest.raises(error, match=message):
        build_entries(**args)


def test_compat_fields_flux() -> None:
    text = config_text("flux.1-dev")
    entries = build_entries(family=Family.FLUX, config_text=text, precision="int4", rank=32, compat_fields=True)
    assert list(entries)[:4] == list(ENTRY_KEYS)
    compat = {k: v for k, v in entries.items() if k not in ENTRY_KEYS}
    assert compat == {
        "full_config": text,
        "model_type": "flux",
        "architectures": '["FluxTransformer2DModel"]',
        "hidden_size": "3072",  # 24 heads * 128
        "num_hidden_layers": "19",  # num_layers
        "num_attention_heads": "24",
    }
    assert all(key in COMPAT_KEYS for key in compat)


def test_compat_fields_z_image_uses_its_own_names() -> None:
    entries = build_entries(
        family=Family.Z_IMAGE,
        config_text=config_text("z-image-turbo"),
        precision="int4",
        rank=128,
        skip_refiners=False,
        compat_fields=True,
    )
    assert entries["model_type"] == "z-image"
    assert entries["architectures"] == '["ZImageTransformer2DModel"]'
    assert entries["hidden_size"] == "3840"  # dim
    assert entries["num_hidden_layers"] == "30"  # n_layers
    assert entries["num_attention_heads"] == "30"  # n_heads
    assert entries["num_key_value_heads"] == "30"  # n_kv_heads
    assert entries["rope_theta"] == "256.0"
    assert all(isinstance(v, str) for v in entries.values())


# --------------------------------------------------------------------------------------------
# choose_quantization: overrides accepted only when consistent with the tensors

CHOOSE_OK: list[tuple[str, Inference, dict[str, Any], tuple[str, int]]] = [
    # Nothing given: the tensors decide.
    ("inferred", inference("int4", 32), {}, ("int4", 32)),
    # An override equal to what the tensors say is fine (and spelled any way).
    ("same-precision", inference("nvfp4", 128), {"precision": "fp4", "rank": 128}, ("nvfp4", 128)),
    # The tensors do not tell the rank (no lora_down in a partial file): --rank fills the gap.
    ("rank-gap", inference("int4", None), {"rank": 128}, ("int4", 128)),
    # Neither precision fact nor override, but the group size (16) tells nvfp4.
    ("group-tells", inference(None, 32, group_size=16), {}, ("nvfp4", 32)),
    # The svdquant YAML fills what the tensors do not say.
    ("yaml-gap", inference(None, None), {"yaml_facts": {"dtype": "sfp4_e2m1_all", "rank": 64}}, ("nvfp4", 64)),
    # The YAML agrees with the tensors.
    ("yaml-agrees", inference("int4", 32), {"yaml_facts": {"precision": "sint4", "rank": 32}}, ("int4", 32)),
    # --force lets a contradicting override through.
    ("forced", inference("int4", 32), {"precision": "nvfp4", "rank": 128, "force": True}, ("nvfp4", 128)),
]


@pytest.mark.parametrize(("case", "inf", "kwargs", "expected"), CHOOSE_OK, ids=[c[0] for c in CHOOSE_OK])
def test_choose_quantization_accepts(case: str, inf: Inference, kwargs: dict[str, Any], expected: Any) -> None:
    assert choose_quantization(inf, **kwargs) == expected


CHOOSE_REFUSED: list[tuple[str, Inference, dict[str, Any], str]] = [
    # fp4 metadata over int4 tensors: the loader would pick the wrong kernels.
    (
        "precision-contradicts",
        inference("int4", 32),
        {"precision": "nvfp4"},
        "--precision nvfp4 contradicts the tensors (expected int4 (wscales are BF16), got nvfp4). "
        "drop --precision, or pass --force to write it anyway",
    ),
    # An r128 file labelled r32 fails with a shape mismatch.
    (
        "rank-contradicts",
        inference("int4", 128),
        {"rank": 32},
        "--rank 32 contradicts the tensors (expected 128 (lora_down is [3072, 128]), got 32)",
    ),
    # Ranks are padded to 16.
    ("rank-not-16", inference("int4", None), {"rank": 40}, "--rank is not a multiple of 16"),
    # A header with no W4A4 layer and no override: refuse to guess.
    ("no-precision", inference(None, 32), {}, "the tensors do not tell the precision"),
    ("no-rank", inference("int4", None), {}, "the tensors do not tell the rank"),
    # The YAML belongs to another run.
    (
        "yaml-rank",
        inference("int4", 32),
        {"yaml_facts": {"rank": 128, "source": "int4.yaml"}},
        "int4.yaml says rank 128 but the tensors are rank 32",
    ),
    (
        "yaml-precision",
        inference("int4", 32),
        {"yaml_facts": {"dtype": "sfp4_e2m1_all"}},
        "--config-yaml says the weights are nvfp4 but the tensors are int4",
    ),
    # --precision int4 over tensors whose group size (16) says nvfp4.
    (
        "group-tells",
        inference(None, 32, group_size=16),
        {"precision": "int4"},
        "--precision int4 contradicts the tensors (expected nvfp4 (from transformer_blocks.0.qkv_proj.wscales)",
    ),
    # A table that contradicts itself (int4 by dtype, group size 16) is not written over silently.
    ("group-size", inference("int4", 32, group_size=16), {}, "precision int4 contradicts the tensors' group size"),
]


@pytest.mark.parametrize(("case", "inf", "kwargs", "message"), CHOOSE_REFUSED, ids=[c[0] for c in CHOOSE_REFUSED])
def test_choose_quantization_refuses(case: str, inf: Inference, kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(InferenceError) as info:
        choose_quantization(inf, **kwargs)
    assert message in str(info.value)
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------------------------
# merge


def test_merge_keeps_foreign_keys_and_replaces_owned_ones() -> None:
    existing = {"format": "pt", "quantization_config": "{}", "author": "me"}
    new = build_entries(family=Family.FLUX, config_text=config_text("flux.1-dev"), precision="int4", rank=32)
    merged = merge_metadata(existing, new)
    assert merged["format"] == "pt"
    assert merged["author"] == "me"
    assert merged["quantization_config"] == INT4_R32
    assert list(merged) == [*ENTRY_KEYS, "format", "author"]


def test_merge_never_clobbers_a_key_it_does_not_own() -> None:
    merged = merge_metadata({"format": "pt"}, {"format": "np", "config": "{}", "extra": "x"})
    assert merged == {"format": "pt", "config": "{}", "extra": "x"}


def test_merge_from_nothing() -> None:
    assert merge_metadata(None, {"config": "{}"}) == {"config": "{}"}


@settings(max_examples=60, deadline=None)
@given(
    existing=st.dictionaries(st.sampled_from(["format", "config", "author", "model_class", "x"]), st.text(max_size=5)),
    new=st.dictionaries(st.sampled_from([*ENTRY_KEYS, "format", "y"]), st.text(max_size=5)),
)
def test_merge_properties(existing: dict[str, str], new: dict[str, str]) -> None:
    merged = merge_metadata(existing, new)
    assert set(merged) == set(existing) | set(new)
    for key, value in merged.items():
        if key in new and (key in OWNED_KEYS or key not in existing):
            assert value == new[key]
        else:
            assert value == existing[key]
    assert merge_metadata(merged, new) == merged  # applying twice changes nothing


# --------------------------------------------------------------------------------------------
# diff


def test_metadata_changes_kinds() -> None:
    changes = metadata_changes({"format": "pt", "a": "1", "b": "2"}, {"a": "1", "b": "3", "c": "4"})
    assert changes == [
        MetadataChange("format", "removed", "pt", None),
        MetadataChange("a", "unchanged", "1", "1"),
        MetadataChange("b", "changed", "2", "3"),
        MetadataChange("c", "added", None, "4"),
    ]


def test_diff_added_changed_removed() -> None:
    old = {"format": "pt", "quantization_config": '{"rank": 32, "method": "svdquant"}', "gone": "x"}
    new = {"format": "pt", "quantization_config": '{"method": "svdquant", "rank": 128}', "model_class": "M"}
    assert diff_metadata(old, new) == [
        "--- a/__metadata__/quantization_config",
        "+++ b/__metadata__/quantization_config",
        "@@ -1,4 +1,4 @@",
        " {",
        '   "method": "svdquant",',
        '-  "rank": 32',
        '+  "rank": 128',
        " }",
        "--- a/__metadata__/gone",
        "+++ /dev/null",
        "@@ -1 +0,0 @@",
        "-x",
        "--- /dev/null",
        "+++ b/__metadata__/model_class",
        "@@ -0,0 +1 @@",
        "+M",
    ]


def test_diff_of_equal_maps_is_empty() -> None:
    entries = build_entries(family=Family.FLUX, config_text=config_text("flux.1-dev"), precision="int4", rank=32)
    assert diff_metadata(entries, dict(reversed(list(entries.items())))) == []


def test_diff_shows_raw_text_when_only_formatting_differs() -> None:
    lines = diff_metadata({"config": '{"a": 1}'}, {"config": '{"a":1}'})
    assert lines[-2:] == ['-{"a": 1}', '+{"a":1}']


def test_pretty_value() -> None:
    assert pretty_value('{"b": 1, "a": [2]}') == ["{", '  "a": [', "    2", "  ],", '  "b": 1', "}"]
    assert pretty_value("NunchakuFluxTransformer2dModel") == ["NunchakuFluxTransformer2dModel"]
    assert pretty_value("128") == ["128"]
    assert pretty_value("") == [""]
