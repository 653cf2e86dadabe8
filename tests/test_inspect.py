"""Inference from the header alone: table-driven over every family / variant / precision / rank, contradictions,
non-nunchaku files, file-name hints, the human summary, and one synthetic file end to end."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors import safe_open

from patcher.facts import Fact, Family, Inference
from patcher.header import parse_header, read_header
from patcher.inspect import FileHints, describe, filename_hints, infer, infer_tensors
from patcher.synth import SynthSpec, Table, build_table, header_of, preset, table_to_tensors, write_sparse

HEADERS = Path(__file__).parent / "fixtures" / "headers"

#: Hidden size of each family's published model (the width the tables are built with at scale 1).
HIDDEN = {
    Family.FLUX: 3072,
    Family.QWEN_IMAGE: 3072,
    Family.Z_IMAGE: 3840,
    Family.SANA: 2240,
    Family.T5: 4096,
    Family.SDXL: None,  # a UNet has several widths: no single hidden size
}


#: The unquantized layers a blocks-only file of each family lacks (the loaders need every one of them).
BLOCKS_ONLY_MISSING = {
    Family.FLUX: (
        "x_embedder",
        "context_embedder",
        "time_text_embed.timestep_embedder",
        "time_text_embed.text_embedder",
        "norm_out.linear",
        "proj_out",
    ),
    Family.QWEN_IMAGE: (
        "img_in",
        "txt_norm",
        "txt_in",
        "time_text_embed.timestep_embedder",
        "norm_out.linear",
        "proj_out",
    ),
    Family.Z_IMAGE: ("all_x_embedder", "all_final_layer", "t_embedder", "cap_embedder", "x_pad_token", "cap_pad_token"),
    Family.SANA: ("patch_embed.proj", "time_embed", "caption_projection", "scale_shift_table", "proj_out"),
}
#: SDXL's cross-attention blocks: (UNet block, attentions, transformer blocks per attention).
SDXL_LAYOUT = (
    ("down_blocks.1", 2, 2),
    ("down_blocks.2", 2, 10),
    ("mid_block", 1, 10),
    ("up_blocks.0", 3, 10),
    ("up_blocks.1", 3, 2),
)


def run(spec: SynthSpec) -> Inference:
    """Build the header of ``spec`` the way a file would have it and infer from it."""
    return infer(header_of(table_to_tensors(build_table(spec))))


def expected(spec: SynthSpec, hidden: int | None) -> dict[str, object]:
    """Return what the inference must say about a table built from ``spec``."""
    svdq = spec.family is not Family.T5  # the T5 encoder is AWQ W4A16: int4 weights, group 128, no rank
    sdxl = spec.family is Family.SDXL
    flux = spec.family is Family.FLUX
    full = spec.include_unquantized
    return {
        "family": spec.family,
        "quantized": True,
        "precision": spec.precision,
        "rank": spec.rank if svdq else None,
        "group_size": {"int4": 64, "nvfp4": 16}[spec.precision] if svdq else 128,
        # SDXL: every transformer block of the UNet (2x2 + 2x10 + 1x10 + 3x10 + 3x2)
        "num_layers": 70 if sdxl else spec.resolved_layers,
        "unet_layout": SDXL_LAYOUT if sdxl else None,
        "num_single_layers": (spec.resolved_single_layers or None) if flux else None,
        "in_channels": spec.in_channels if full and spec.family is not Family.T5 else None,
        "guidance_embeds": spec.guidance if flux and full else None,
        "hidden_size": hidden,
        "skip_refiners": spec.skip_refiners if spec.family is Family.Z_IMAGE else None,
        "has_unquantized": full,
        "missing_unquantized": () if full else BLOCKS_ONLY_MISSING.get(spec.family, ()),
        "contradictions": (),
    }


def actual(inference: Inference) -> dict[str, object]:
    """Return the inference as plain values (facts unwrapped)."""
    out: dict[str, object] = {}
    for key in expected(SynthSpec(), None):
        value = getattr(inference, key)
        out[key] = value.value if isinstance(value, Fact) else value
    return out


# One row per family / variant / precision / rank / naming / layout the contract describes.
CASES: list[tuple[str, SynthSpec, str]] = [
    ("flux.1-dev-int4-r32", preset("flux.1-dev"), "the published svdq-int4-flux.1-dev layout"),
    ("flux.1-dev-nvfp4-r32", preset("flux.1-dev", precision="nvfp4"), "F8_E4M3 scales, group 16, wtscale/wcscales"),
    ("flux.1-dev-int4-r128", preset("flux.1-dev", rank=128), "rank from lora_down.shape[1]"),
    ("flux.1-dev-nvfp4-r128", preset("flux.1-dev", precision="nvfp4", rank=128), "both knobs at once"),
    ("flux.1-schnell-int4-r32", preset("flux.1-schnell"), "no guidance embedder: schnell-like"),
    ("flux.1-schnell-nvfp4-r32", preset("flux.1-schnell", precision="nvfp4"), "svdq-fp4-flux.1-schnell"),
    ("flux.1-fill-dev-int4-r32", preset("flux.1-fill-dev"), "x_embedder width 384"),
    ("flux.1-fill-dev-nvfp4-r128", preset("flux.1-fill-dev", precision="nvfp4", rank=128), "Fill, fp4 r128"),
    ("flux.1-canny-dev-int4-r32", preset("flux.1-canny-dev"), "x_embedder width 128"),
    ("flux.1-depth-dev-nvfp4-r32", preset("flux.1-depth-dev", precision="nvfp4"), "same shape as Canny"),
    ("flux.1-kontext-dev-int4-r32", preset("flux.1-kontext-dev"), "dev-shaped: 64 + guidance"),
    ("flux.1-krea-dev-nvfp4-r128", preset("flux.1-krea-dev", precision="nvfp4", rank=128), "dev-shaped"),
    ("shuttle-jaguar-int4-r32", preset("shuttle-jaguar"), "schnell-shaped"),
    ("flux.1-dev-proj-naming", preset("flux.1-dev", naming="proj"), "proj_down/smooth_factor names"),
    ("flux.1-dev-f16-scales", preset("flux.1-dev", float_dtype="F16"), "int4 wscales may be F16"),
    (
        "flux.1-dev-blocks-only",
        preset("flux.1-dev", include_unquantized=False),
        "deepcompressor transformer_blocks.safetensors: variant unknowable",
    ),
    (
        "flux.1-schnell-blocks-only-nvfp4-r128",
        preset("flux.1-schnell", include_unquantized=False, precision="nvfp4", rank=128),
        "blocks-only: guidance and in_channels are None, not False",
    ),
    ("flux-custom-depth", preset("flux.1-dev", num_layers=5, num_single_layers=10), "block counts are counted"),
    (
        "flux-double-blocks-only",
        preset("flux.1-dev", num_single_layers=0, include_unquantized=False),
        "no single blocks: qkv_proj_context still says Flux",
    ),
    ("qwen-image-int4-r32", preset("qwen-image"), "img_mod.1 AWQ + attn.to_qkv, proj naming"),
    ("qwen-image-nvfp4-r128", preset("qwen-image", precision="nvfp4", rank=128), "svdq-fp4_r128-qwen-image"),
    ("qwen-image-edit-2509-int4-r128", preset("qwen-image-edit-2509", rank=128), "same table as qwen-image"),
    ("qwen-image-lora-naming", preset("qwen-image", naming="lora"), "old suffixes on Qwen layers"),
    ("qwen-image-blocks-only", preset("qwen-image", include_unquantized=False), "no img_in: in_channels None"),
    ("z-image-turbo-int4-r32", preset("z-image-turbo"), "refiners quantized: skip_refiners False"),
    (
        "z-image-turbo-nvfp4-r128-skip-refiners",
        preset("z-image-turbo", precision="nvfp4", rank=128, skip_refiners=True),
        "refiners in 16 bits: skip_refiners True",
    ),
    (
        "z-image-turbo-blocks-only-skip-refiners",
        preset("z-image-turbo", include_unquantized=False, skip_refiners=True),
        "blocks only",
    ),
    ("sana-1600m-int4-r32", preset("sana-1600m"), "C++ SanaModel names, padded widths"),
    ("sana-1600m-nvfp4-r32", preset("sana-1600m", precision="nvfp4"), "svdq-fp4-sana"),
    ("sdxl-int4-r32", preset("sdxl"), "UNet transformer blocks"),
    ("sdxl-nvfp4-r128", preset("sdxl", precision="nvfp4", rank=128), "UNet, fp4"),
    ("sdxl-turbo-int4-r32", preset("sdxl-turbo"), "same UNet as SDXL: the tensors cannot tell them apart"),
    ("sdxl-blocks-only", preset("sdxl", include_unquantized=False), "no conv_in: in_channels None"),
    ("t5-xxl-awq", preset("t5-xxl"), "AWQ W4A16 T5 encoder: int4, group 128, 24 blocks, no rank"),
    ("qwen-image-edit-int4-r32", preset("qwen-image-edit"), "same table as qwen-image"),
]


@pytest.mark.parametrize(("spec", "comment"), [(spec, c) for _, spec, c in CASES], ids=[i for i, _, _ in CASES])
def test_inference_matches_spec(spec: SynthSpec, comment: str) -> None:
    inference = run(spec)
    assert actual(inference) == expected(spec, HIDDEN[spec.family]), comment


@pytest.mark.parametrize("spec", [spec for _, spec, _ in CASES[::4]], ids=[i for i, _, _ in CASES[::4]])
def test_evidence_names_real_tensors(spec: SynthSpec) -> None:
    table = build_table(spec)
    inference = run(spec)
    facts = [getattr(inference, key) for key in ("family", "precision", "rank", "group_size", "num_layers")]
    facts += [inference.num_single_layers, inference.in_channels, inference.guidance_embeds, inference.hidden_size]
    present = [fact for fact in facts if fact is not None]
    assert present
    for fact in present:
        assert fact.evidence and fact.note
        assert all(name in table for name in fact.evidence), fact


@settings(max_examples=40, deadline=None)
@given(
    name=st.sampled_from(
        ["flux.1-dev", "flux.1-schnell", "flux.1-fill-dev", "qwen-image", "z-image-turbo", "sana-1600m"]
    ),
    precision=st.sampled_from(["int4", "nvfp4"]),
    rank=st.integers(1, 16).map(lambda k: 16 * k),
    naming=st.sampled_from([None, "lora", "proj"]),
    full=st.booleans(),
    layers=st.integers(1, 4),
    singles=st.integers(1, 4),
    skip=st.booleans(),
)
def test_inference_matches_random_small_specs(
    name: str, precision: str, rank: int, naming: str | None, full: bool, layers: int, singles: int, skip: bool
) -> None:
    spec = preset(
        name,
        precision=precision,
        rank=rank,
        naming=naming,
        include_unquantized=full,
        num_layers=layers,
        num_single_layers=singles,
        skip_refiners=skip,
        scale=0.05,
    )
    got = actual(run(spec))
    want = expected(spec, got["hidden_size"])  # widths are scaled: the hidden size is checked by the table cases
    assert got == want


# --------------------------------------------------------------------------------------------
# Hand-edited tables: every contradiction is reported


def _base(**changes: object) -> Table:
    return build_table(preset("flux.1-dev", num_layers=3, num_single_layers=2, scale=1 / 24, **changes))


def _reshape(table: Table, name: str, shape: tuple[int, ...], dtype: str | None = None) -> Table:
    out = dict(table)
    out[name] = (dtype or table[name][0], shape)
    return out


def _set_rank(table: Table, head: str, rank: int, *, down: bool = True, up: bool = True) -> Table:
    out = dict(table)
    for suffix, flag in (("lora_down", down), ("lora_up", up)):
        if flag:
            dtype, shape = out[f"{head}.{suffix}"]
            out[f"{head}.{suffix}"] = (dtype, (shape[0], rank))
    return out


def _drop(table: Table, predicate: Callable[[str], bool]) -> Table:
    return {name: entry for name, entry in table.items() if not predicate(name)}


def _rename(table: Table, old: str, new: str) -> Table:
    return {name.replace(old, new): entry for name, entry in table.items()}


def _scales_to(table: Table, dtype: str, group: int) -> Table:
    """Give every W4A4 layer wscales of ``dtype`` for group size ``group``."""
    out = dict(table)
    for name, (qtype, shape) in table.items():
        if name.endswith(".qweight") and qtype == "I8":
            oc, half = shape
            out[name.replace(".qweight", ".wscales")] = (dtype, (2 * half // group, oc))
    return out


Q = "transformer_blocks.1.qkv_proj"
CONTRADICTIONS: list[tuple[str, Callable[[], Table], str, dict[str, object]]] = [
    # (id, hand-edited table, text a contradiction line must contain, facts that must come out so)
    ("mixed-ranks", lambda: _set_rank(_base(), Q, 64), "mixed ranks: 32 (31 layers", {"rank": None}),
    ("rank-not-multiple-of-16", lambda: _base(rank=24), "rank is not a multiple of 16: 24", {"rank": 24}),
    ("down-up-disagree", lambda: _set_rank(_base(), Q, 16, down=False), "down/up ranks disagree", {}),
    (
        "down-vs-qweight",
        lambda: _reshape(_base(), f"{Q}.lora_down", (256, 32)),
        "down.shape[0] != 2*qweight.shape[1]",
        {"rank": 32},
    ),
    ("up-vs-qweight", lambda: _reshape(_base(), f"{Q}.lora_up", (128, 32)), "up.shape[0] != qweight.shape[0]", {}),
    (
        "down-without-up",
        lambda: _drop(_base(), lambda n: n == f"{Q}.lora_up"),
        "down projection without up projection",
        {},
    ),
    (
        "up-without-down",
        lambda: _drop(_base(), lambda n: n == f"{Q}.lora_down"),
        "up projection without down projection",
        {},
    ),
    (
        "f8-scales-group-64",
        lambda: _scales_to(_base(), "F8_E4M3", 64),
        "F8 scales with group size 64",
        {"precision": "nvfp4", "group_size": 64},
    ),
    (
        "16-bit-scales-group-16",
        lambda: _drop(_scales_to(_base(precision="nvfp4"), "BF16", 16), lambda n: n.endswith(("wtscale", "wcscales"))),
        "16-bit scales with group size 16",
        {"precision": "int4", "group_size": 16},
    ),
    (
        "one-f8-wscales-in-int4",
        lambda: _reshape(_base(), f"{Q}.wscales", (2, 384), "F8_E4M3"),
        "W4A4 wscales mix dtypes",
        {"precision": "nvfp4"},
    ),
    (
        "wtscale-in-int4",
        lambda: {**_base(), f"{Q}.wtscale": ("BF16", (1,))},
        "wtscale/wcscales in an int4 file",
        {"precision": "int4"},
    ),
    (
        "mixed-group-sizes",
        lambda: _reshape(_base(), f"{Q}.wscales", (4, 384)),
        "mixed group sizes: 32 (1 layers",
        {"group_size": None},
    ),
    (
        "group-not-integer",
        lambda: _reshape(_base(), f"{Q}.wscales", (3, 384)),
        "2*qweight.shape[1] is no multiple of wscales.shape[0]",
        {"group_size": 64},
    ),
    (
        "wscales-columns",
        lambda: _reshape(_base(), f"{Q}.wscales", (2, 128)),
        "wscales.shape[1] != qweight.shape[0]",
        {},
    ),
    (
        "wscales-missing",
        lambda: _drop(_base(), lambda n: n == f"{Q}.wscales"),
        "W4A4 layer without wscales",
        {"group_size": 64},
    ),
    (
        "mixed-naming",
        lambda: _rename(_rename(_base(), f"{Q}.lora_down", f"{Q}.proj_down"), f"{Q}.lora_up", f"{Q}.proj_up"),
        "mixed low-rank naming",
        {"rank": 32},
    ),
    (
        "missing-double-block",
        lambda: _drop(_base(), lambda n: n.startswith("transformer_blocks.1.")),
        "double block indices are not contiguous: missing [1]",
        {"num_layers": 2},
    ),
    (
        "two-families",
        lambda: {**_base(), "transformer_blocks.0.img_mod.1.qweight": ("I32", (192, 64))},
        "tensor names fit several families: flux",
        {"family": None},
    ),
    (
        "x-embedder-width",
        lambda: _reshape(_base(), "x_embedder.weight", (256, 64)),
        "input embedder width disagrees with the hidden size",
        {"hidden_size": 128},
    ),
    (
        "qkv-widths-disagree",
        lambda: _reshape(_base(), f"{Q}.qweight", (768, 64)),
        "fused qkv layers disagree on the hidden size",
        {"hidden_size": None},
    ),
]


@pytest.mark.parametrize(
    ("make", "text", "facts"), [(m, t, f) for _, m, t, f in CONTRADICTIONS], ids=[c[0] for c in CONTRADICTIONS]
)
def test_contradictions_are_reported(make: Callable[[], Table], text: str, facts: dict[str, object]) -> None:
    inference = infer_tensors(table_to_tensors(make()))
    assert any(text in line for line in inference.contradictions), inference.contradictions
    assert all("\n" not in line for line in inference.contradictions)
    got = actual(inference)
    for key, value in facts.items():
        assert got[key] == value, key
    assert any(line.startswith("contradiction: ") for line in describe(inference))


def test_base_table_is_clean() -> None:
    # The contradiction cases above start from this table: it must say nothing against itself.
    assert infer_tensors(table_to_tensors(_base())).contradictions == ()


def test_one_line_per_kind_of_problem() -> None:
    table = _base()
    for i in range(3):
        table = _set_rank(table, f"transformer_blocks.{i}.out_proj", 16, down=False)
    lines = infer_tensors(table_to_tensors(table)).contradictions
    assert len(lines) == 1 and lines[0].startswith("down/up ranks disagree in 3 places, e.g. transformer_blocks.0")


# --------------------------------------------------------------------------------------------
# Files that are not Nunchaku conversions


def test_empty_table() -> None:
    inference = infer(header_of({}))
    assert inference == Inference()
    assert describe(inference)[0] == "family: unknown"


PLAIN_FLUX: Table = {
    # A diffusers FLUX.1 transformer as plain BF16 weights: no qweight anywhere.
    "x_embedder.weight": ("BF16", (3072, 64)),
    "transformer_blocks.0.attn.to_q.weight": ("BF16", (3072, 3072)),
    "transformer_blocks.0.attn.to_q.bias": ("BF16", (3072,)),
    "transformer_blocks.0.norm1.linear.weight": ("BF16", (18432, 3072)),
    "single_transformer_blocks.0.proj_mlp.weight": ("BF16", (12288, 3072)),
    "time_text_embed.guidance_embedder.linear_1.weight": ("BF16", (3072, 256)),
}


@pytest.mark.parametrize(
    "table",
    [
        PLAIN_FLUX,
        # The same checkpoint stored as FP8: an 8-bit float dtype alone does not make it nvfp4.
        {name: ("F8_E4M3", shape) for name, (_, shape) in PLAIN_FLUX.items()},
        # Only AWQ W4A16 layers: no SVDQuant W4A4 layer to read a precision or rank from.
        {"transformer_blocks.0.norm1.linear.qweight": ("I32", (4608, 1536))},
        # An unrelated model.
        {"model.embed_tokens.weight": ("BF16", (32000, 4096)), "lm_head.weight": ("BF16", (32000, 4096))},
    ],
    ids=["plain-bf16-flux", "plain-fp8-flux", "awq-only", "llm"],
)
def test_non_nunchaku_file(table: Table) -> None:
    inference = infer(header_of(table_to_tensors(table)))
    assert inference.family is None
    assert inference.quantized is False
    assert inference.precision is None and inference.rank is None and inference.group_size is None
    assert inference.contradictions == ()
    assert any("not an SVDQuant file" in line for line in describe(inference))


# --------------------------------------------------------------------------------------------
# File name hints


@pytest.mark.parametrize(
    ("name", "hints"),
    [
        # merge_safetensors' naming: svdq-{precision}_r{rank}-{model}
        ("svdq-int4_r32-flux.1-dev.safetensors", FileHints("int4", 32, "flux.1-dev")),
        ("svdq-fp4_r128-qwen-image.safetensors", FileHints("nvfp4", 128, "qwen-image")),
        ("svdq-nvfp4_r32-z-image-turbo.sft", FileHints("nvfp4", 32, "z-image-turbo")),
        # pre-1.0 repo / folder names carry no rank
        ("svdq-int4-flux.1-schnell", FileHints("int4", None, "flux.1-schnell")),
        # model names with versions and step counts stay whole
        (
            "svdq-int4_r32-qwen-image-lightningv1.0-4steps.safetensors",
            FileHints("int4", 32, "qwen-image-lightningv1.0-4steps"),
        ),
        # a deepcompressor folder: the file name says nothing, the folder does
        ("/models/svdq-int4-flux.1-dev/transformer_blocks.safetensors", FileHints("int4", None, "flux.1-dev")),
        # the Hugging Face cache layout: models--org--name/snapshots/<commit>/file
        (
            "/hf/hub/models--mit-han-lab--svdq-int4-flux.1-fill-dev/snapshots/0123abc/transformer_blocks.safetensors",
            FileHints("int4", None, "flux.1-fill-dev"),
        ),
        (r"C:\models\SVDQ-INT4_R32-FLUX.1-Krea-dev.safetensors", FileHints("int4", 32, "flux.1-krea-dev")),
        # the T5 encoder: AWQ, so no SVDQuant precision
        ("awq-int4-flux.1-t5xxl.safetensors", FileHints(None, None, "flux.1-t5xxl")),
        # nothing to read
        ("flux1-dev-fp8.safetensors", FileHints()),
        ("transformer_blocks.safetensors", FileHints()),
    ],
)
def test_filename_hints(name: str, hints: FileHints) -> None:
    got = filename_hints(name)
    assert (got.precision, got.rank, got.model) == (hints.precision, hints.rank, hints.model)
    assert (got.source is None) == (hints.model is None)


# --------------------------------------------------------------------------------------------
# The human summary


def test_describe_full_file() -> None:
    lines = describe(run(preset("flux.1-fill-dev", precision="nvfp4", rank=128)))
    text = "\n".join(lines)
    assert lines[0].startswith("family: flux (") and "single_transformer_blocks.0.qkv_proj.qweight" in lines[0]
    assert "precision: nvfp4 (" in text and "F8_E4M3" in text
    assert "rank: 128 (" in text and "transformer_blocks.0.qkv_proj.lora_down" in text
    assert "group size: 16 (" in text
    assert "in_channels: 384 (" in text and "(Fill)" in text
    assert "guidance_embeds: True (" in text
    assert "unquantized layers: present" in text
    assert "contradiction" not in text


def test_describe_blocks_only() -> None:
    lines = describe(run(preset("flux.1-dev", include_unquantized=False, num_layers=2, num_single_layers=2)))
    assert not any(line.startswith(("in_channels", "guidance_embeds")) for line in lines)
    assert lines[-1] == (
        "unquantized layers: missing x_embedder, context_embedder, time_text_embed.timestep_embedder, "
        "time_text_embed.text_embedder, norm_out.linear, proj_out (a blocks-only file: no loader can use it "
        "alone, and the variant cannot be told)"
    )


# --------------------------------------------------------------------------------------------
# Golden headers and a synthetic file end to end


GOLDEN_EXPECTED = {
    # fixture: (family, precision, rank, layers, single layers, in_channels, guidance, hidden)
    "flux.1-dev_int4_r32_2x2": (Family.FLUX, "int4", 32, 2, 2, 64, True, 128),
    "flux.1-fill-dev_nvfp4_r128_2x2": (Family.FLUX, "nvfp4", 128, 2, 2, 384, True, 128),
    "flux.1-schnell_int4_r32_blocks-only_2x2": (Family.FLUX, "int4", 32, 2, 2, None, None, 128),
    "qwen-image_int4_r32_2": (Family.QWEN_IMAGE, "int4", 32, 2, None, 64, None, 128),
    "z-image-turbo_nvfp4_r32_skip-refiners_2": (Family.Z_IMAGE, "nvfp4", 32, 2, None, 16, None, 128),
    "sana-1600m_int4_r32_1": (Family.SANA, "int4", 32, 1, None, 32, None, 128),
}


@pytest.mark.parametrize("name", sorted(GOLDEN_EXPECTED))
def test_golden_header_inference(name: str) -> None:
    header = parse_header((HEADERS / f"{name}.json").read_bytes())
    inference = infer(header)
    got = actual(inference)
    keys = ("family", "precision", "rank", "num_layers", "num_single_layers", "in_channels", "guidance_embeds")
    assert (*(got[k] for k in keys), got["hidden_size"]) == GOLDEN_EXPECTED[name]
    assert inference.contradictions == ()


def test_sparse_file_end_to_end(tmp_path: Path) -> None:
    spec = preset("flux.1-fill-dev", precision="nvfp4", rank=128)
    tensors = table_to_tensors(build_table(spec))
    path = write_sparse(tmp_path / "svdq-fp4_r128-flux.1-fill-dev.safetensors", tensors)
    with safe_open(str(path), framework="np") as f:  # the reference reader accepts it
        assert f.metadata() is None
        assert len(f.keys()) == len(tensors)
    inference = infer(read_header(path))
    assert actual(inference) == expected(spec, 3072)
    hints = filename_hints(str(path))
    assert (hints.precision, hints.rank, hints.model) == ("nvfp4", 128, "flux.1-fill-dev")


def test_order_of_the_table_does_not_matter() -> None:
    # safetensors writers sort names (transformer_blocks.10 before transformer_blocks.2): inference must not care.
    spec = preset("flux.1-dev", precision="nvfp4", rank=64, num_layers=12, num_single_layers=3, scale=1 / 24)
    table = build_table(spec)
    shuffled = {name: table[name] for name in sorted(table, key=lambda n: n[::-1])}
    assert list(shuffled) != list(table)
    assert actual(infer_tensors(table_to_tensors(shuffled))) == actual(infer_tensors(table_to_tensors(table)))
    assert actual(infer_tensors(table_to_tensors(dict(sorted(table.items()))))) == expected(spec, 128)
