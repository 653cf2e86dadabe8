"""Tests of patcher.contract: config against the tensors, and each loader's reads replayed on metadata."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from oracle import oracle_accepts, write_safetensors
from safetensors import safe_open

from patcher.contract import (
    FILE_SCOPE,
    LOADERS,
    Report,
    check_config_against_header,
    scope_loaders,
    validate_metadata,
)
from patcher.facts import MODEL_CLASS, Fact, Family, Inference, Precision, Severity
from patcher.header import read_header
from patcher.metadata import build_entries, quantization_config_text

CONFIGS = Path(__file__).resolve().parent.parent / "patcher" / "configs"


def config_text(name: str) -> str:
    return (CONFIGS / f"{name}.json").read_text()


def fact(value: Any, *evidence: str) -> Fact[Any]:
    return Fact(value, evidence)


# --------------------------------------------------------------------------------------------
# Hand-built inferences (what inspect would say), one per family / variant


def flux(
    precision: Precision = "int4",
    rank: int = 32,
    *,
    guidance: bool | None = True,
    in_channels: int | None = 64,
    layers: int = 19,
    single: int = 38,
) -> Inference:
    return Inference(
        family=fact(Family.FLUX, "single_transformer_blocks.0.qkv_proj.qweight"),
        precision=fact(precision, "transformer_blocks.0.qkv_proj.wscales"),
        rank=fact(rank, "transformer_blocks.0.qkv_proj.lora_down"),
        group_size=fact(64 if precision == "int4" else 16, "transformer_blocks.0.qkv_proj.wscales"),
        num_layers=fact(layers, "transformer_blocks.18.qkv_proj.qweight"),
        num_single_layers=fact(single, "single_transformer_blocks.37.qkv_proj.qweight"),
        in_channels=fact(in_channels, "x_embedder.weight") if in_channels else None,
        guidance_embeds=fact(guidance, "time_text_embed.guidance_embedder.linear_1.weight")
        if guidance is not None
        else None,
        hidden_size=fact(3072, "transformer_blocks.0.qkv_proj.qweight"),
        has_unquantized=in_channels is not None,
        quantized=True,
    )


def qwen(precision: Precision = "int4", rank: int = 128) -> Inference:
    return Inference(
        family=fact(Family.QWEN_IMAGE, "transformer_blocks.0.img_mod.1.qweight"),
        precision=fact(precision, "transformer_blocks.0.attn.to_qkv.wscales"),
        rank=fact(rank, "transformer_blocks.0.attn.to_qkv.proj_down"),
        group_size=fact(64 if precision == "int4" else 16, "transformer_blocks.0.attn.to_qkv.wscales"),
        num_layers=fact(60, "transformer_blocks.59.attn.to_qkv.qweight"),
        hidden_size=fact(3072, "transformer_blocks.0.attn.to_qkv.qweight"),
        quantized=True,
    )


def zimage(rank: int = 128, skip_refiners: bool | None = True) -> Inference:
    return Inference(
        family=fact(Family.Z_IMAGE, "layers.0.attention.to_qkv.qweight"),
        precision=fact("int4", "layers.0.attention.to_qkv.wscales"),
        rank=fact(rank, "layers.0.attention.to_qkv.proj_down"),
        group_size=fact(64, "layers.0.attention.to_qkv.wscales"),
        num_layers=fact(30, "layers.29.attention.to_qkv.qweight"),
        hidden_size=fact(3840, "layers.0.attention.to_qkv.qweight"),
        skip_refiners=fact(skip_refiners, "noise_refiner.0.attention.to_qkv.weight")
        if skip_refiners is not None
        else None,
        quantized=True,
    )


def sana() -> Inference:
    return Inference(
        family=fact(Family.SANA, "transformer_blocks.0.attn1.qkv_proj.qweight"),
        precision=fact("int4"),
        rank=fact(32),
        num_layers=fact(20),
        hidden_size=fact(2240),
        quantized=True,
    )


def entries(
    name: str = "flux.1-dev",
    family: Family = Family.FLUX,
    precision: str = "int4",
    rank: int = 32,
    **kwargs: Any,
) -> dict[str, str]:
    return build_entries(family=family, config_text=config_text(name), precision=precision, rank=rank, **kwargs)


def without(metadata: Mapping[str, str], *keys: str) -> dict[str, str]:
    return {k: v for k, v in metadata.items() if k not in keys}


def replaced(metadata: Mapping[str, str], **values: str) -> dict[str, str]:
    return {**metadata, **values}


def qc_without_rank(precision: str = "int4") -> str:
    # Files merged before nunchaku v1.0.1: the same object without "rank".
    qc = json.loads(quantization_config_text(precision, 32))
    del qc["rank"]
    return json.dumps(qc)


# --------------------------------------------------------------------------------------------
# check_config_against_header


def test_config_matching_the_tensors_gives_no_finding() -> None:
    for name, inf in [
        ("flux.1-dev", flux()),
        ("flux.1-schnell", flux(guidance=False)),
        ("flux.1-fill-dev", flux(in_channels=384)),
        ("flux.1-canny-dev", flux(in_channels=128)),
        ("qwen-image", qwen()),
        ("z-image-turbo", zimage()),
        ("sana-1600m-1024px", sana()),
    ]:
        assert check_config_against_header(json.loads(config_text(name)), inf) == [], name


def test_schnell_config_on_dev_weights_is_an_error() -> None:
    findings = check_config_against_header(json.loads(config_text("flux.1-schnell")), flux())
    assert [(f.severity, f.code) for f in findings] == [(Severity.ERROR, "config-guidance")]
    assert findings[0].message == (
        "config guidance_embeds does not match the tensors: the file has a guidance embedder "
        "(a guidance-distilled, dev-like model) "
        "(expected true (time_text_embed.guidance_embedder.linear_1.weight), got false)"
    )


@pytest.mark.parametrize(
    ("config", "inf", "code", "text"),
    [
        # Dev config on Fill weights: x_embedder takes 384 channels.
        (json.loads(config_text("flux.1-dev")), flux(in_channels=384), "config-in-channels", "expected 384"),
        # Dev config on schnell weights.
        (json.loads(config_text("flux.1-dev")), flux(guidance=False), "config-guidance", "got true"),
        # A config with another block count.
        ({"num_layers": 8}, flux(), "config-num-layers", "the file has 19 double blocks"),
        ({"num_single_layers": 10}, flux(), "config-num-single-layers", "expected 38"),
        # Width: 24 heads * 64 = 1536, but the qkv layers are 3072 wide.
        ({"attention_head_dim": 64}, flux(), "config-hidden-size", "got 1536"),
        # A Qwen-Image config on Flux weights.
        (json.loads(config_text("qwen-image")), flux(), "config-family", "expected FluxTransformer2DModel"),
        # Z-Image names its fields differently.
        ({"_class_name": "ZImageTransformer2DModel", "n_layers": 28}, zimage(), "config-num-layers", "got 28"),
        ({"_class_name": "ZImageTransformer2DModel", "dim": 3072}, zimage(), "config-hidden-size", "got 3072"),
        # An unknown class name for Flux weights.
        ({"_class_name": "SD3Transformer2DModel"}, flux(), "config-family", "got SD3Transformer2DModel"),
    ],
)
def test_config_contradictions(config: dict[str, Any], inf: Inference, code: str, text: str) -> None:
    findings = check_config_against_header(config, inf)
    assert code in {f.code for f in findings}
    finding = next(f for f in findings if f.code == code)
    assert finding.severity is Severity.ERROR
    assert text in finding.message


def test_config_missing_fields_take_diffusers_defaults() -> None:
    # diffusers fills num_layers=19, guidance_embeds=false...: a bare Flux config is schnell-like.
    findings = check_config_against_header({"_class_name": "FluxTransformer2DModel"}, flux())
    assert [f.code for f in findings] == ["config-guidance"]
    assert check_config_against_header({"_class_name": "FluxTransformer2DModel"}, flux(guidance=False)) == []


def test_config_without_class_name_is_only_informational() -> None:
    cfg = without(json.loads(config_text("flux.1-dev")), "_class_name")
    findings = check_config_against_header(cfg, flux())
    assert [(f.severity, f.code) for f in findings] == [(Severity.INFO, "config-no-class")]


# --------------------------------------------------------------------------------------------
# validate_metadata: the table

DEV = entries()
QWEN = entries("qwen-image", Family.QWEN_IMAGE, rank=128)

# (id, metadata, inference, ok, verdicts, codes expected among the findings)
CASES: list[tuple[str, Mapping[str, str] | None, Inference, bool, dict[str, bool], set[str]]] = [
    # An old deepcompressor conversion: no __metadata__ at all. Every loader fails.
    (
        "no-metadata-flux",
        None,
        flux(),
        False,
        {"nunchaku": False, "nunchaku-v2": False, "comfyui-nunchaku": False},
        {"no-metadata"},
    ),
    # Qwen-Image without metadata: Nunchaku fails on metadata["config"], ComfyUI on None.get.
    ("no-metadata-qwen", None, qwen(), False, {"nunchaku": False, "comfyui-nunchaku": False}, {"no-metadata"}),
    # What this tool writes for FLUX.1-dev: every loader accepts it, nothing to do.
    ("correct-flux-dev", DEV, flux(), True, {"nunchaku": True, "nunchaku-v2": True, "comfyui-nunchaku": True}, set()),
    # The deepcompressor --add-metadata proposal wrote comfy_config "{}": ComfyUI's Flux loader fails.
    (
        "empty-comfy-config",
        replaced(DEV, comfy_config="{}"),
        flux(),
        False,
        {"nunchaku": True, "nunchaku-v2": True, "comfyui-nunchaku": False},
        {"comfy-config-no-model-class"},
    ),
    # Merged before v1.0.1 (no "rank") with r128 tensors: the loaders that default to 32 fail; the C++ engine
    # reads the rank off lora_down and is fine.
    (
        "r128-no-rank-flux",
        replaced(entries(rank=128), quantization_config=qc_without_rank()),
        flux(rank=128),
        False,
        {"nunchaku": True, "nunchaku-v2": False, "comfyui-nunchaku": True},
        {"missing-rank"},
    ),
    # The same on Qwen-Image: both loaders default to 32.
    (
        "r128-no-rank-qwen",
        replaced(QWEN, quantization_config=qc_without_rank()),
        qwen(rank=128),
        False,
        {"nunchaku": False, "comfyui-nunchaku": False},
        {"missing-rank"},
    ),
    # r32 without "rank": the default happens to match; loadable, but worth fixing (a warning).
    (
        "r32-no-rank",
        replaced(DEV, quantization_config=qc_without_rank()),
        flux(),
        True,
        {"nunchaku": True, "nunchaku-v2": True, "comfyui-nunchaku": True},
        {"missing-rank"},
    ),
    # fp4 metadata on int4 tensors: the C++ engine checks weight.dtype (and ComfyUI goes through it).
    (
        "fp4-on-int4",
        replaced(DEV, quantization_config=quantization_config_text("nvfp4", 32)),
        flux(),
        False,
        {"nunchaku": False, "nunchaku-v2": True, "comfyui-nunchaku": False},
        {"precision-mismatch"},
    ),
    # A schnell config (and its FluxSchnell comfy_config) on dev weights: wrong model built everywhere.
    (
        "schnell-config-on-dev",
        entries("flux.1-schnell"),
        flux(),
        False,
        {"nunchaku": False, "nunchaku-v2": False, "comfyui-nunchaku": False},
        {"config-guidance", "comfy-config-model-class", "comfy-config-guidance"},
    ),
    # Dev metadata on Fill weights: config in_channels and comfy_config in_channels are both wrong.
    (
        "dev-on-fill",
        DEV,
        flux(in_channels=384),
        False,
        {"nunchaku": False, "nunchaku-v2": False, "comfyui-nunchaku": False},
        {"config-in-channels", "comfy-config-mismatch"},
    ),
    # Z-Image with unquantized refiners but skip_refiners false: Nunchaku's class expects quantized refiners.
    (
        "z-image-skip-refiners-wrong",
        replaced(
            entries("z-image-turbo", Family.Z_IMAGE, rank=128, skip_refiners=True),
            quantization_config=quantization_config_text("int4", 128, family=Family.Z_IMAGE, skip_refiners=False),
        ),
        zimage(skip_refiners=True),
        False,
        {"nunchaku": False, "comfyui-nunchaku": True},
        {"skip-refiners-mismatch"},
    ),
    # Z-Image with the key missing: the default (false) is wrong for these tensors.
    (
        "z-image-skip-refiners-missing",
        replaced(
            entries("z-image-turbo", Family.Z_IMAGE, rank=128, skip_refiners=True),
            quantization_config=quantization_config_text("int4", 128),
        ),
        zimage(skip_refiners=True),
        False,
        {"nunchaku": False, "comfyui-nunchaku": True},
        {"missing-skip-refiners"},
    ),
    # Z-Image written by this tool: fine.
    (
        "z-image-correct",
        entries("z-image-turbo", Family.Z_IMAGE, rank=128, skip_refiners=True),
        zimage(skip_refiners=True),
        True,
        {"nunchaku": True, "comfyui-nunchaku": True},
        set(),
    ),
    # Metadata without config: KeyError 'config' in Nunchaku; ComfyUI's Qwen loader does not read it.
    (
        "qwen-no-config",
        without(QWEN, "config"),
        qwen(),
        False,
        {"nunchaku": False, "comfyui-nunchaku": True},
        {"missing-config"},
    ),
    # Flux without quantization_config: the C++ engine (and ComfyUI through it) require it.
    (
        "flux-no-qc",
        without(DEV, "quantization_config"),
        flux(),
        False,
        {"nunchaku": False, "nunchaku-v2": True, "comfyui-nunchaku": False},
        {"missing-quantization-config", "missing-rank"},
    ),
    # Flux without comfy_config: json.loads(None) in ComfyUI.
    (
        "flux-no-comfy-config",
        without(DEV, "comfy_config"),
        flux(),
        False,
        {"nunchaku": True, "nunchaku-v2": True, "comfyui-nunchaku": False},
        {"missing-comfy-config"},
    ),
    # A config that is not JSON.
    (
        "config-not-json",
        replaced(DEV, config="{'single': 'quotes'}"),
        flux(),
        False,
        {"nunchaku": False, "nunchaku-v2": False, "comfyui-nunchaku": False},
        {"config-not-json"},
    ),
    # shuttle-jaguar style comfy_config (no disable_unet_model_creation): a warning only.
    (
        "comfy-no-disable-unet",
        replaced(
            DEV,
            comfy_config=json.dumps(
                {
                    "model_class": "Flux",
                    "model_config": without(
                        json.loads(DEV["comfy_config"])["model_config"], "disable_unet_model_creation"
                    ),
                }
            ),
        ),
        flux(),
        True,
        {"nunchaku": True, "nunchaku-v2": True, "comfyui-nunchaku": True},
        {"comfy-config-unet-creation"},
    ),
    # comfy_config without guidance_embed: KeyError in ComfyUI.
    (
        "comfy-no-guidance-embed",
        replaced(DEV, comfy_config='{"model_class": "Flux", "model_config": {"disable_unet_model_creation": true}}'),
        flux(),
        False,
        {"nunchaku": True, "nunchaku-v2": True, "comfyui-nunchaku": False},
        {"comfy-config-no-guidance-embed"},
    ),
    # A comfy_config naming a non-Flux ComfyUI class.
    (
        "comfy-bad-class",
        replaced(DEV, comfy_config='{"model_class": "SD3", "model_config": {"guidance_embed": true}}'),
        flux(),
        False,
        {"nunchaku": True, "nunchaku-v2": True, "comfyui-nunchaku": False},
        {"comfy-config-bad-model-class"},
    ),
    # A rank that is present but wrong: the Python loaders build the wrong shapes.
    (
        "rank-mismatch",
        replaced(DEV, quantization_config=quantization_config_text("int4", 128)),
        flux(),
        False,
        {"nunchaku": True, "nunchaku-v2": False, "comfyui-nunchaku": True},
        {"rank-mismatch"},
    ),
    # nvfp4 Qwen-Image whose group size is not 16: ComfyUI's Qwen loader refuses it.
    (
        "qwen-fp4-group",
        replaced(
            entries("qwen-image", Family.QWEN_IMAGE, precision="nvfp4", rank=128),
            quantization_config=quantization_config_text("nvfp4", 128).replace(
                '"group_size": 16}, "act', '"group_size": 64}, "act'
            ),
        ),
        qwen("nvfp4"),
        False,
        {"nunchaku": True, "comfyui-nunchaku": False},
        {"group-size-mismatch"},
    ),
    # int4 group size wrong: no loader reads it, so only a warning.
    (
        "int4-group-unread",
        replaced(
            QWEN,
            quantization_config=quantization_config_text("int4", 128).replace(
                '"group_size": 64}, "act', '"group_size": 128}, "act'
            ),
        ),
        qwen(),
        True,
        {"nunchaku": True, "comfyui-nunchaku": True},
        {"group-size-mismatch"},
    ),
    # A model_class naming another family's class: not read by these loaders, a warning.
    (
        "wrong-model-class",
        replaced(QWEN, model_class=MODEL_CLASS[Family.FLUX]),
        qwen(),
        True,
        {"nunchaku": True, "comfyui-nunchaku": True},
        {"model-class-mismatch"},
    ),
    # SANA's loader does not read quantization_config: a wrong rank there is only a warning.
    (
        "sana-rank-unread",
        entries("sana-1600m-1024px", Family.SANA, rank=128),
        sana(),
        True,
        {"nunchaku": True},
        {"rank-mismatch"},
    ),
    # A tensor table that contradicts itself fails everywhere, whatever the metadata says.
    (
        "tensor-contradiction",
        DEV,
        dataclasses.replace(flux(), contradictions=("mixed ranks: 32 and 128",)),
        False,
        {"nunchaku": False, "nunchaku-v2": False, "comfyui-nunchaku": False},
        {"tensor-contradiction"},
    ),
    # Nothing tells the family: the generic loader check still replays metadata["config"].
    ("unknown-family", {"format": "pt"}, Inference(), False, {"nunchaku": False}, {"unknown-family", "missing-config"}),
    # The family comes from model_class when the tensors do not tell it.
    (
        "family-from-model-class",
        QWEN,
        dataclasses.replace(qwen(), family=None),
        True,
        {"nunchaku": True, "comfyui-nunchaku": True},
        set(),
    ),
]


@pytest.mark.parametrize(("case", "metadata", "inf", "ok", "verdicts", "codes"), CASES, ids=[c[0] for c in CASES])
def test_validate_table(
    case: str,
    metadata: Mapping[str, str] | None,
    inf: Inference,
    ok: bool,
    verdicts: dict[str, bool],
    codes: set[str],
) -> None:
    report = validate_metadata(metadata, inf)
    found = {f.code for f in report.findings}
    assert codes <= found, report.findings
    assert report.ok is ok, report.findings
    assert {key: v.ok for key, v in report.verdicts.items()} == verdicts
    # A report needs work exactly when it has an error or a warning; correct files have none of either.
    assert report.needs_work is bool(codes)
    for verdict in report.verdicts.values():
        assert verdict.ok is (not verdict.reasons)
    assert all("\n" not in f.message for f in report.findings)


def test_no_metadata_names_the_exact_failures() -> None:
    report = validate_metadata(None, qwen())
    by_scope = {f.scope: f.message for f in report.by_code("no-metadata")}
    assert by_scope["nunchaku"].endswith("TypeError: 'NoneType' object is not subscriptable")
    assert by_scope["comfyui-nunchaku"].endswith("AttributeError: 'NoneType' object has no attribute 'get'")
    present = next(c for c in report.checks if c.name == "metadata present")
    assert not present.passed and present.severity is Severity.ERROR
    assert report.checks[-1].name == "rank matches the tensors" and report.checks[-1].skipped == "no __metadata__"


def test_empty_comfy_config_message() -> None:
    report = validate_metadata(replaced(DEV, comfy_config="{}"), flux())
    (finding,) = report.by_code("comfy-config-no-model-class")
    assert finding.scope == "comfyui-nunchaku"
    assert "KeyError: 'model_class'" in finding.message
    assert report.verdicts["comfyui-nunchaku"].reasons == (finding.message,)


def test_missing_rank_message_says_expected_and_got() -> None:
    report = validate_metadata(replaced(QWEN, quantization_config=qc_without_rank()), qwen(rank=128))
    (finding,) = report.by_code("missing-rank")
    assert finding.severity is Severity.ERROR
    assert scope_loaders(finding.scope) == ("nunchaku", "comfyui-nunchaku")
    assert "the loader defaults to 32 but the tensors are rank 128" in finding.message
    assert '(expected "rank": 128, got no rank)' in finding.message


def test_unread_wrong_value_is_a_file_warning() -> None:
    report = validate_metadata(entries("sana-1600m-1024px", Family.SANA, rank=128), sana())
    (finding,) = report.by_code("rank-mismatch")
    assert finding.severity is Severity.WARNING and finding.scope == FILE_SCOPE


def test_checks_of_a_correct_flux_file() -> None:
    report = validate_metadata(DEV, flux())
    names = [c.name for c in report.checks]
    assert names == [
        "model family",
        "tensor table is consistent",
        "unquantized layers present",
        "metadata present",
        "fields found",
        "required fields present",
        "config is valid JSON",
        "config matches the tensors",
        "quantization_config is valid JSON",
        "weight.dtype matches the tensors",
        "group_size matches the tensors",
        "rank matches the tensors",
        "model_class",
        "comfy_config is valid JSON",
        "comfy_config model_class",
        "comfy_config guidance_embed",
        "comfy_config matches the tensors",
    ]
    assert all(c.passed for c in report.checks)
    assert report.checks[4].detail == "config, comfy_config, model_class, quantization_config"


def test_failed_check_carries_the_reason() -> None:
    report = validate_metadata(replaced(DEV, quantization_config=quantization_config_text("nvfp4", 32)), flux())
    check = next(c for c in report.checks if c.name == "weight.dtype matches the tensors")
    assert not check.passed
    assert 'expected "int4" (transformer_blocks.0.qkv_proj.wscales), got "fp4_e2m1_all"' in check.detail


@pytest.mark.parametrize(
    ("name", "family", "inf", "kwargs"),
    [
        ("flux.1-schnell", Family.FLUX, flux(guidance=False), {}),
        ("flux.1-fill-dev", Family.FLUX, flux("nvfp4", 128, in_channels=384), {"precision": "nvfp4", "rank": 128}),
        ("flux.1-depth-dev", Family.FLUX, flux(in_channels=128), {}),
        # A blocks-only file (no x_embedder): the config cannot be checked against the channels, still fine.
        ("flux.1-dev", Family.FLUX, flux(in_channels=None, guidance=None), {}),
        ("qwen-image", Family.QWEN_IMAGE, qwen("nvfp4"), {"precision": "nvfp4", "rank": 128}),
        ("z-image-turbo", Family.Z_IMAGE, zimage(skip_refiners=False), {"rank": 128, "skip_refiners": False}),
        ("sana-1600m-1024px", Family.SANA, sana(), {}),
    ],
)
def test_built_entries_validate_for_every_family(
    name: str, family: Family, inf: Inference, kwargs: dict[str, Any]
) -> None:
    report = validate_metadata(entries(name, family, **kwargs), inf)
    assert report.ok and not report.needs_work, report.findings
    assert set(report.verdicts) == {loader.key for loader in LOADERS[family]}
    assert all(c.passed for c in report.checks)


def test_t5_needs_model_class_for_comfyui() -> None:
    t5 = Inference(family=fact(Family.T5, "encoder.block.0.layer.0.SelfAttention.q.qweight"), quantized=True)
    metadata = {"config": '{"architectures": ["T5EncoderModel"], "d_model": 4096}'}
    report = validate_metadata(metadata, t5)
    assert report.verdicts["nunchaku"].ok
    assert not report.verdicts["comfyui-nunchaku"].ok
    assert report.by_code("missing-model-class")
    fixed = validate_metadata({**metadata, "model_class": "NunchakuT5EncoderModel"}, t5)
    assert fixed.ok and all(v.ok for v in fixed.verdicts.values())


def test_report_ok_and_needs_work() -> None:
    assert Report(None, (), {}, ()).ok
    assert not Report(None, (), {}, ()).needs_work


# --------------------------------------------------------------------------------------------
# End to end: a real file carrying the built entries, read back with safetensors, loaders' reads replayed


def small_flux_file(path: Path, metadata: Mapping[str, str] | None, *, rank: int, guidance: bool) -> Path:
    """Write a tiny but well-formed Flux-like file (one double and one single block) with real tensors."""
    oc, ic = 384, 128
    tensors: dict[str, tuple[str, list[int]]] = {}
    for block in ("transformer_blocks.0", "single_transformer_blocks.0"):
        prefix = f"{block}.qkv_proj"
        tensors[f"{prefix}.qweight"] = ("I8", [oc, ic // 2])
        tensors[f"{prefix}.wscales"] = ("BF16", [ic // 64, oc])
        tensors[f"{prefix}.lora_down"] = ("BF16", [ic, rank])
        tensors[f"{prefix}.lora_up"] = ("BF16", [oc, rank])
    tensors["x_embedder.weight"] = ("BF16", [16, 64])
    if guidance:
        tensors["time_text_embed.guidance_embedder.linear_1.weight"] = ("BF16", [16, 256])
    return write_safetensors(path, tensors, metadata, data="zeros")


def replay_nunchaku(metadata: Mapping[str, str] | None, lora_rank: int) -> dict[str, Any]:
    """Do what Nunchaku's loaders do with the metadata (contract section 2); return what they would build."""
    config = json.loads(metadata["config"])  # type: ignore[index]  # None raises TypeError, as in nunchaku
    assert isinstance(config, dict)
    qc = json.loads(metadata["quantization_config"])  # type: ignore[index]  # the Flux C++ engine requires it
    assert qc["weight"]["dtype"] in ("int4", "fp4_e2m1_all")  # checked against the GPU's architecture
    rank = qc.get("rank", 32)  # NunchakuFluxTransformer2DModelV2, Qwen-Image, Z-Image, SDXL
    if rank != lora_rank:
        raise ValueError(f"size mismatch for lora_down: rank {rank} vs {lora_rank} in the checkpoint")
    return {"config": config, "qc": qc}


def replay_comfyui_flux(metadata: Mapping[str, str] | None) -> tuple[str, bool]:
    """Do what ComfyUI-nunchaku's Flux loader does with comfy_config."""
    comfy = json.loads(metadata.get("comfy_config"))  # type: ignore[union-attr,arg-type]
    model_class = comfy["model_class"]
    assert model_class in ("Flux", "FluxSchnell")
    return model_class, comfy["model_config"]["guidance_embed"]


@pytest.mark.parametrize(
    ("name", "rank", "guidance", "comfy_class"),
    [("flux.1-dev", 32, True, "Flux"), ("flux.1-schnell", 128, False, "FluxSchnell")],
)
def test_end_to_end_built_entries_load(tmp_path: Path, name: str, rank: int, guidance: bool, comfy_class: str) -> None:
    metadata = {"format": "pt", **entries(name, rank=rank)}
    path = small_flux_file(tmp_path / "model.safetensors", metadata, rank=rank, guidance=guidance)
    assert oracle_accepts(path)
    with safe_open(str(path), framework="np") as f:
        read = f.metadata()
        lora_rank = f.get_slice("transformer_blocks.0.qkv_proj.lora_down").get_shape()[1]
    assert read == metadata
    built = replay_nunchaku(read, lora_rank)
    assert built["config"]["guidance_embeds"] is guidance
    assert built["qc"]["weight"]["dtype"] == "int4"
    assert replay_comfyui_flux(read) == (comfy_class, guidance)
    # Our validator agrees with the replay (the inference is what the written tensors show).
    inf = flux(rank=rank, guidance=guidance)
    assert validate_metadata(read_header(path).metadata, inf).ok


def test_end_to_end_failures_match_the_validator(tmp_path: Path) -> None:
    # No metadata: the replayed read fails exactly as the validator says.
    bare = small_flux_file(tmp_path / "bare.safetensors", None, rank=32, guidance=True)
    with safe_open(str(bare), framework="np") as f:
        read = f.metadata()
    with pytest.raises(TypeError) as info:
        replay_nunchaku(read, 32)
    (finding,) = [
        f for f in validate_metadata(read, flux()).findings if f.scope == "nunchaku,nunchaku-v2,comfyui-nunchaku"
    ]
    assert finding.message.endswith(f"TypeError: {info.value}")

    # r128 tensors, metadata without "rank": the default 32 builds the wrong shapes.
    old = replaced(entries(rank=128), quantization_config=qc_without_rank())
    path = small_flux_file(tmp_path / "old.safetensors", old, rank=128, guidance=True)
    with safe_open(str(path), framework="np") as f:
        read = f.metadata()
    with pytest.raises(ValueError, match="rank 32 vs 128"):
        replay_nunchaku(read, 128)
    assert not validate_metadata(read, flux(rank=128)).verdicts["nunchaku-v2"].ok

    # comfy_config "{}": KeyError 'model_class', as the validator says.
    empty = small_flux_file(tmp_path / "empty.safetensors", replaced(DEV, comfy_config="{}"), rank=32, guidance=True)
    with safe_open(str(empty), framework="np") as f:
        read = f.metadata()
    with pytest.raises(KeyError, match="model_class"):
        replay_comfyui_flux(read)
    assert not validate_metadata(read, flux()).verdicts["comfyui-nunchaku"].ok


# --------------------------------------------------------------------------------------------
# Half files: the family's unquantized layers must be in the file

FLUX_UNQUANTIZED = (
    "x_embedder",
    "context_embedder",
    "time_text_embed.timestep_embedder",
    "time_text_embed.text_embedder",
    "norm_out.linear",
    "proj_out",
)


def blocks_only(inf: Inference, missing: tuple[str, ...] = FLUX_UNQUANTIZED) -> Inference:
    """Return ``inf`` as a deepcompressor transformer_blocks.safetensors says it: no unquantized layer."""
    return dataclasses.replace(
        inf, in_channels=None, guidance_embeds=None, has_unquantized=False, missing_unquantized=missing
    )


def test_a_blocks_only_flux_file_fails_every_loader_naming_the_missing_layers() -> None:
    report = validate_metadata(DEV, blocks_only(flux()))
    (finding,) = report.by_code("missing-unquantized")
    assert finding.severity is Severity.ERROR and finding.scope == FILE_SCOPE
    # dev's config has guidance_embeds: its guidance embedder is needed too.
    assert (
        "the unquantized layers x_embedder, context_embedder, time_text_embed.timestep_embedder, "
        "time_text_embed.text_embedder, norm_out.linear, proj_out, time_text_embed.guidance_embedder are missing"
    ) in finding.message
    assert "AssertionError" in finding.message and "uninitialised" in finding.message
    assert not report.ok
    assert {key: verdict.ok for key, verdict in report.verdicts.items()} == {
        "nunchaku": False,
        "nunchaku-v2": False,
        "comfyui-nunchaku": False,
    }
    check = next(c for c in report.checks if c.name == "unquantized layers present")
    assert not check.passed and check.severity is Severity.ERROR


def test_a_blocks_only_schnell_file_does_not_need_a_guidance_embedder() -> None:
    report = validate_metadata(entries("flux.1-schnell"), blocks_only(flux(guidance=False)))
    (finding,) = report.by_code("missing-unquantized")
    assert "guidance_embedder" not in finding.message


def test_a_blocks_only_qwen_file_fails_comfyui_too() -> None:
    missing = ("img_in", "txt_in", "proj_out")
    report = validate_metadata(QWEN, dataclasses.replace(qwen(), missing_unquantized=missing))
    (finding,) = report.by_code("missing-unquantized")
    assert "img_in, txt_in, proj_out are missing" in finding.message
    assert "AssertionError" not in finding.message  # that is Flux V2's symptom
    assert not any(verdict.ok for verdict in report.verdicts.values())


def test_a_real_blocks_only_table_is_never_ok() -> None:
    from patcher import synth
    from patcher.inspect import infer

    for preset, family, name in (
        ("flux.1-dev", Family.FLUX, "flux.1-dev"),
        ("qwen-image", Family.QWEN_IMAGE, "qwen-image"),
        ("z-image-turbo", Family.Z_IMAGE, "z-image-turbo"),
        ("sana-1600m", Family.SANA, "sana-1600m-1024px"),
    ):
        single = {"num_single_layers": 1} if family is Family.FLUX else {}
        spec = synth.preset(preset, scale=0.05, num_layers=2, include_unquantized=False, **single)
        inf = infer(synth.synth_header(spec))
        kwargs: dict[str, Any] = {"skip_refiners": inf.skip_refiners.value} if inf.skip_refiners else {}
        report = validate_metadata(entries(name, family, **kwargs), inf)
        assert report.by_code("missing-unquantized"), preset
        assert not report.ok, preset


# --------------------------------------------------------------------------------------------
# Check lines: skipped checks and severities


def test_a_check_without_its_input_is_skipped_not_passed() -> None:
    report = validate_metadata(without(DEV, "quantization_config"), flux())
    by_name = {c.name: c for c in report.checks}
    for name in ("quantization_config is valid JSON", "weight.dtype matches the tensors"):
        assert by_name[name].skipped == "no quantization_config", name
    assert by_name["rank matches the tensors"].skipped is None  # the loaders' default rank is still checked
    assert by_name["config is valid JSON"].skipped is None


def test_a_check_says_whether_it_failed_with_a_warning_or_an_error() -> None:
    report = validate_metadata(replaced(DEV, quantization_config=qc_without_rank()), flux())
    check = next(c for c in report.checks if c.name == "rank matches the tensors")
    assert not check.passed and check.severity is Severity.WARNING
    wrong = validate_metadata(replaced(DEV, quantization_config=quantization_config_text("nvfp4", 32)), flux())
    check = next(c for c in wrong.checks if c.name == "weight.dtype matches the tensors")
    assert not check.passed and check.severity is Severity.ERROR
    assert all(c.severity is None for c in validate_metadata(DEV, flux()).checks)


# SDXL and the T5 encoder: exactly the entries their loaders read, and validate replaying those reads


def synth_inference(preset_name: str, **changes: Any) -> Inference:
    from patcher.inspect import infer
    from patcher.synth import preset, synth_header

    # T5 at full width (its config's d_model is compared with the tensors); the diffusion models at 0.1
    changes.setdefault("scale", 1.0 if preset_name == "t5-xxl" else 0.1)
    return infer(synth_header(preset(preset_name, **changes)))


def test_sdxl_and_t5_entries_are_exactly_what_their_loaders_read() -> None:
    # NunchakuSDXLUNet2DConditionModel: metadata["config"] and quantization_config.get("rank", 32); nothing else.
    sdxl = build_entries(family=Family.SDXL, config_text=config_text("sdxl"), precision="int4", rank=32)
    assert list(sdxl) == ["config", "quantization_config"]
    assert sdxl["quantization_config"] == quantization_config_text("int4", 32)
    # NunchakuT5EncoderModel: T5Config(**json.loads(metadata["config"])); ComfyUI-nunchaku: model_class.
    t5 = build_entries(family=Family.T5, config_text=config_text("t5-xxl"), precision=None, rank=None)
    assert t5 == {"config": config_text("t5-xxl"), "model_class": "NunchakuT5EncoderModel"}
    # An explicit --model-class is still written.
    named = build_entries(
        family=Family.SDXL, config_text=config_text("sdxl"), precision="int4", rank=32, model_class="X"
    )
    assert named["model_class"] == "X"


@pytest.mark.parametrize(
    ("name", "family", "precision", "rank"),
    [
        ("sdxl", Family.SDXL, "int4", 32),
        ("sdxl-turbo", Family.SDXL, "nvfp4", 128),
        ("t5-xxl", Family.T5, None, None),
        ("qwen-image-edit", Family.QWEN_IMAGE, "int4", 128),
    ],
)
def test_new_models_built_entries_validate(name: str, family: Family, precision: str | None, rank: int | None) -> None:
    inf = synth_inference(name, **({"precision": precision, "rank": rank} if rank else {}))
    text = config_text(name)
    if family is not Family.T5 and family is not Family.SDXL:
        # the synthetic table is 0.1 wide: scale the config's heads to it
        config = json.loads(text)
        assert inf.hidden_size is not None
        config["num_attention_heads"] = inf.hidden_size.value // config["attention_head_dim"]
        text = json.dumps(config)
    report = validate_metadata(build_entries(family=family, config_text=text, precision=precision, rank=rank), inf)
    assert report.ok and not report.needs_work, report.findings
    assert set(report.verdicts) == {loader.key for loader in LOADERS[family]}
    assert all(c.passed for c in report.checks), [c for c in report.checks if not c.passed]


def test_t5_without_metadata_fails_both_loaders_for_their_own_reasons() -> None:
    report = validate_metadata(None, synth_inference("t5-xxl"))
    nunchaku, comfy = report.verdicts["nunchaku"], report.verdicts["comfyui-nunchaku"]
    assert not nunchaku.ok and "TypeError: 'NoneType' object is not subscriptable" in nunchaku.reasons[0]
    assert not comfy.ok and "does not recognise the file" in comfy.reasons[0]
    assert "NunchakuT5EncoderModel" in comfy.reasons[0]


def test_t5_file_without_config_fails_comfyui_too() -> None:
    # ComfyUI-nunchaku builds the encoder through NunchakuT5EncoderModel.from_pretrained, which reads the config.
    report = validate_metadata({"model_class": "NunchakuT5EncoderModel"}, synth_inference("t5-xxl"))
    assert not report.verdicts["comfyui-nunchaku"].ok and report.by_code("missing-config")


def test_t5_quantization_config_is_not_checked_and_sdxl_needs_no_model_class() -> None:
    t5 = {"config": config_text("t5-xxl"), "model_class": MODEL_CLASS[Family.T5]}
    # an SVDQuant quantization_config left by an older tool: no T5 loader reads it
    report = validate_metadata(
        {**t5, "quantization_config": quantization_config_text("int4", 32)}, synth_inference("t5-xxl")
    )
    assert report.ok and not report.needs_work, report.findings
    sdxl = {"config": config_text("sdxl"), "quantization_config": quantization_config_text("int4", 32)}
    report = validate_metadata(sdxl, synth_inference("sdxl"))
    assert report.ok and not report.needs_work and not report.by_code("missing-model-class")


def _edited(name: str, **fields: Any) -> dict[str, Any]:
    config: dict[str, Any] = json.loads(config_text(name))
    config.update(fields)
    return config


@pytest.mark.parametrize(
    ("config", "preset_name", "code", "text"),
    [
        # an SD 1.5-shaped UNet (one transformer block per attention, three cross-attention down blocks)
        (
            _edited(
                "sdxl",
                transformer_layers_per_block=1,
                down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
                up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
            ),
            "sdxl",
            "config-unet-layout",
            "expected down_blocks.1: 2x2, down_blocks.2: 2x10",
        ),
        # an inpainting UNet's 9 input channels on 4-channel weights
        (_edited("sdxl", in_channels=9), "sdxl", "config-in-channels", "conv_in takes 4 input channels"),
        # a T5-base config on T5-XXL weights
        (_edited("t5-xxl", d_model=768, num_layers=12), "t5-xxl", "config-num-layers", "the file has 24 layers"),
        (_edited("t5-xxl", d_model=768), "t5-xxl", "config-hidden-size", "expected 4096"),
    ],
)
def test_sdxl_and_t5_config_contradictions(config: dict[str, Any], preset_name: str, code: str, text: str) -> None:
    inf = synth_inference(preset_name)
    findings = [f for f in check_config_against_header(config, inf) if f.code == code]
    assert findings and text in findings[0].message, check_config_against_header(config, inf)


def test_t5_with_another_group_size_fails_its_loaders() -> None:
    from patcher.inspect import infer
    from patcher.synth import build_table, header_of, preset, table_to_tensors

    table = build_table(preset("t5-xxl", scale=0.25))
    # group 64: TinyChat pads 1024 / 64 = 16 groups to 2 packs of 8 -> 16 rows (group 128 would give 8)
    for name, (dtype, shape) in list(table.items()):
        if name.endswith((".scales", ".scaled_zeros")):
            table[name] = (dtype, (shape[0] * 2, shape[1]))
    inf = infer(header_of(table_to_tensors(table)))
    assert inf.group_size is not None and inf.group_size.value == 64
    metadata = {"config": config_text("t5-xxl"), "model_class": "NunchakuT5EncoderModel"}
    report = validate_metadata(metadata, inf)
    assert not report.verdicts["nunchaku"].ok and not report.verdicts["comfyui-nunchaku"].ok
    assert "group_size=128" in report.by_code("t5-group-size")[0].message


def replay_sdxl(metadata: Mapping[str, str] | None, lora_rank: int) -> dict[str, Any]:
    """NunchakuSDXLUNet2DConditionModel.from_pretrained's reads: config, then quantization_config's rank."""
    config = json.loads(metadata["config"])  # type: ignore[index]
    rank = json.loads(metadata.get("quantization_config", "{}")).get("rank", 32)  # type: ignore[union-attr]
    if rank != lora_rank:
        raise ValueError(f"size mismatch for proj_down: rank {rank} vs {lora_rank} in the checkpoint")
    return {"config": config, "rank": rank}


def replay_t5(metadata: Mapping[str, str] | None) -> dict[str, Any]:
    """ComfyUI-nunchaku's text-encoder loader, then NunchakuT5EncoderModel.from_pretrained's read of the config."""
    if metadata is None or metadata.get("model_class", None) != "NunchakuT5EncoderModel":
        raise LookupError("not a Nunchaku T5 encoder: loaded as a plain T5")
    config = json.loads(metadata["config"])
    # T5Config(**config): the fields T5EncoderModel is built from
    return {k: config[k] for k in ("d_model", "d_ff", "d_kv", "num_heads", "num_layers", "feed_forward_proj")}


def test_end_to_end_sdxl_and_t5_entries_load(tmp_path: Path) -> None:
    sdxl = {
        "format": "pt",
        **build_entries(family=Family.SDXL, config_text=config_text("sdxl"), precision="int4", rank=128),
    }
    tensors = {
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_qkv.qweight": ("I8", [384, 64]),
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_qkv.lora_down": ("BF16", [128, 128]),
    }
    path = write_safetensors(tmp_path / "sdxl.safetensors", tensors, sdxl, data="zeros")
    assert oracle_accepts(path)
    with safe_open(str(path), framework="np") as f:
        read = f.metadata()
        lora_rank = f.get_slice("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_qkv.lora_down").get_shape()[1]
    assert read == sdxl
    assert replay_sdxl(read, lora_rank)["config"]["_class_name"] == "UNet2DConditionModel"
    # a file merged before "rank" was written: the default 32 on r128 tensors, as the validator says
    with pytest.raises(ValueError, match="rank 32 vs 128"):
        replay_sdxl(replaced(read, quantization_config=qc_without_rank()), 128)

    t5 = build_entries(family=Family.T5, config_text=config_text("t5-xxl"), precision=None, rank=None)
    tensors = {"encoder.block.0.layer.0.SelfAttention.q.qweight": ("I16", [1024, 4096])}
    path = write_safetensors(tmp_path / "t5.safetensors", tensors, t5, data="zeros")
    with safe_open(str(path), framework="np") as f:
        read = f.metadata()
    assert replay_t5(read) == {
        "d_model": 4096,
        "d_ff": 10240,
        "d_kv": 64,
        "num_heads": 64,
        "num_layers": 24,
        "feed_forward_proj": "gated-gelu",
    }
    with pytest.raises(LookupError):
        replay_t5(None)
