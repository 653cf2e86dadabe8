"""Synthetic SVDQuant conversions: tensor tables named and shaped like the real files, and thin writers.

The tables follow deepcompressor's nunchaku backend and nunchaku's ``merge_safetensors`` (nunchaku-contract.md
section 4): W4A4 layers carry ``qweight`` I8 ``[oc, ic/2]``, ``wscales`` ``[ic/g, oc]``, ``bias``, the smoothing
vectors and the low-rank branch; AWQ W4A16 modulation layers carry ``qweight`` I32 ``[oc/4, ic/2]`` with
``wscales``/``wzeros``; everything outside the blocks is plain BF16. They exist for tests, the demo and
benchmarks: :func:`build_table` is pure, :func:`write_sparse` writes a real header over a sparse data region
(no data bytes), :func:`write_random` writes real random bytes.

Where the published layout is only partly known (SANA's depth-wise conv, SDXL's resnets, which T5 linears are
quantized) the table is plausible rather than exact; the comments say so. What Nunchaku's loaders fix is
followed: SDXL's quantized layers per transformer block (``attn1.to_qkv``, ``attn1.to_out.0``, ``attn2.to_q``,
``attn2.to_out.0``, ``ff.net.0.proj``, ``ff.net.2``; ``attn2.to_k``/``to_v`` stay 16-bit) with deepcompressor's
``lora_down``/``smooth`` names (``convert_sdxl_state_dict`` renames them), and T5's ``W4Linear`` (``qweight`` I16
``[out/4, in]``, ``scales``/``scaled_zeros`` ``[groups, out]``, group 128).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from ._record import dataclass
from .errors import UsageError, WriteError
from .facts import PRECISIONS, Family, Precision
from .header import DTYPE_BITS, PREFIX_SIZE, Header, TensorInfo, pack_prefix, parse_header, serialize_header
from .inspect import GROUP_SIZE

#: ``(dtype, shape)`` of one tensor in a table.
TableEntry = tuple[str, tuple[int, ...]]
#: An ordered tensor table: name -> (dtype, shape).
Table = dict[str, TableEntry]
#: Low-rank branch naming: deepcompressor's ``lora_down``/``smooth`` or nunchaku v1's ``proj_down``/``smooth_factor``.
Naming = Literal["lora", "proj"]

#: Quantized kernels work on widths padded to this (``GEMM_W4A4`` pads ``ic``/``oc`` to multiples of 128).
PAD = 128
#: Group size of the AWQ W4A16 layers (the W4A4 ones come from inspect.GROUP_SIZE).
AWQ_GROUP_SIZE = 64
#: Width of the sinusoidal timestep projection every diffusion family feeds its time embedder.
TIMESTEP_DIM = 256
#: Head dimension of the per-head RMSNorm weights (``norm_q``/``norm_k``) of Flux, Qwen-Image and Z-Image.
HEAD_DIM = 128

_SUFFIXES: Mapping[Naming, tuple[str, str, str, str]] = {
    "lora": ("lora_down", "lora_up", "smooth", "smooth_orig"),
    "proj": ("proj_down", "proj_up", "smooth_factor", "smooth_factor_orig"),
}
#: The naming each family's published files use when the spec does not choose one.
DEFAULT_NAMING: Mapping[Family, Naming] = {
    Family.FLUX: "lora",
    Family.SANA: "lora",
    Family.SDXL: "lora",
    Family.QWEN_IMAGE: "proj",
    Family.Z_IMAGE: "proj",
    Family.T5: "lora",
}
#: Main block count of each family's published model (Flux: double blocks).
DEFAULT_LAYERS: Mapping[Family, int] = {
    Family.FLUX: 19,
    Family.QWEN_IMAGE: 60,
    Family.Z_IMAGE: 30,
    Family.SANA: 20,
    Family.SDXL: 0,  # a UNet: its transformer blocks are laid out by _sdxl, not counted
    Family.T5: 24,
}
FLUX_SINGLE_LAYERS = 38
ZIMAGE_REFINER_LAYERS = 2
_FLOAT_DTYPES = ("BF16", "F16")


@dataclass(frozen=True)
class SynthSpec:
    """What synthetic conversion to build: family, precision, rank, variant and size knobs."""

    family: Family = Family.FLUX
    precision: Precision = "int4"
    rank: int = 32
    #: Flux: the diffusers ``in_channels`` (64 dev/schnell/Kontext/Krea, 128 Canny/Depth, 384 Fill).
    in_channels: int = 64
    #: Flux: whether ``time_text_embed.guidance_embedder`` exists (dev-like) or not (schnell-like).
    guidance: bool = True
    #: Main blocks (Flux double blocks); ``None`` = the family's published count.
    num_layers: int | None = None
    #: Flux single blocks; ``None`` = 38.
    num_single_layers: int | None = None
    #: False gives a blocks-only file like deepcompressor's ``transformer_blocks.safetensors``.
    include_unquantized: bool = True
    #: ``None`` = the naming the family's published files use.
    naming: Naming | None = None
    #: Width multiplier in (0, 1] for fast tests; widths stay multiples of 128 and the structure is kept.
    scale: float = 1.0
    #: Z-Image: leave the refiner blocks unquantized (nunchaku's ``skip_refiners``).
    skip_refiners: bool = False
    #: Dtype of the 16-bit tensors (scales of int4 layers, biases, unquantized weights).
    float_dtype: str = "BF16"

    @property
    def resolved_naming(self) -> Naming:
        """Return the low-rank naming in effect."""
        return self.naming if self.naming is not None else DEFAULT_NAMING[self.family]

    @property
    def resolved_layers(self) -> int:
        """Return the main block count in effect."""
        return self.num_layers if self.num_layers is not None else DEFAULT_LAYERS[self.family]

    @property
    def resolved_single_layers(self) -> int:
        """Return the Flux single block count in effect (0 for other families)."""
        if self.family is not Family.FLUX:
            return 0
        return self.num_single_layers if self.num_single_layers is not None else FLUX_SINGLE_LAYERS

    def with_(self, **changes: Any) -> SynthSpec:
        """Return a copy with some fields changed."""
        return dataclasses.replace(self, **changes)


# --------------------------------------------------------------------------------------------
# Presets: one per model the contract lists, plus two families without a named model.

_FLUX_VARIANTS: Mapping[str, tuple[int, bool]] = {
    # name: (in_channels, guidance embedder)
    "flux.1-dev": (64, True),
    "flux.1-schnell": (64, False),
    "flux.1-fill-dev": (384, True),
    "flux.1-canny-dev": (128, True),
    "flux.1-depth-dev": (128, True),
    "flux.1-kontext-dev": (64, True),
    "flux.1-krea-dev": (64, True),
    "shuttle-jaguar": (64, False),  # schnell-like: no guidance embedder
}

#: Named presets for every model of the contract (nunchaku-contract.md, issue 3's registry).
PRESETS: Mapping[str, SynthSpec] = {
    **{
        name: SynthSpec(family=Family.FLUX, in_channels=channels, guidance=guidance)
        for name, (channels, guidance) in _FLUX_VARIANTS.items()
    },
    "qwen-image": SynthSpec(family=Family.QWEN_IMAGE, in_channels=64, guidance=False),
    # Same architecture as qwen-image: the tensor table cannot tell them apart.
    "qwen-image-edit": SynthSpec(family=Family.QWEN_IMAGE, in_channels=64, guidance=False),
    "qwen-image-edit-2509": SynthSpec(family=Family.QWEN_IMAGE, in_channels=64, guidance=False),
    "sana-1600m": SynthSpec(family=Family.SANA, in_channels=32, guidance=False),
    "z-image-turbo": SynthSpec(family=Family.Z_IMAGE, in_channels=16, guidance=False),
    # SDXL base and Turbo share one UNet: the same table (deepcompressor naming, as Nunchaku's loader expects).
    "sdxl": SynthSpec(family=Family.SDXL, in_channels=4, guidance=False),
    "sdxl-turbo": SynthSpec(family=Family.SDXL, in_channels=4, guidance=False),
    "t5-xxl": SynthSpec(family=Family.T5, in_channels=0, guidance=False),
}
_ALIASES = {"sana-1600m-1024px": "sana-1600m"}


def preset(name: str, **changes: Any) -> SynthSpec:
    """Return the spec of a known model (case-insensitive; any name ``--model`` accepts), with field changes."""
    key = name.strip().lower()
    key = _ALIASES.get(key, key)
    if key not in PRESETS:
        from . import models  # a published name (svdq-int4_r32-sdxl, a Lightning file): its base model's table

        found = models.find(key)
        key = found.name if found is not None else key
    spec = PRESETS.get(key)
    if spec is None:
        known = ", ".join(PRESETS)
        raise UsageError(f"unknown synthetic preset {name!r}", expected=f"one of {known}", got=name)
    return spec.with_(**changes)


def flux_dev_int4_r32() -> dict[str, TensorInfo]:
    """Return the tensor entries of a full-size FLUX.1-dev int4 rank-32 merged file (~2,600 tensors, ~6.8 GB)."""
    return table_to_tensors(build_table(preset("flux.1-dev")))


# --------------------------------------------------------------------------------------------
# Table building (pure)


def _pad(width: int) -> int:
    return -(-width // PAD) * PAD


class _Builder:
    """Accumulates one table; knows how each layer kind is laid out for the spec's precision and naming."""

    def __init__(self, spec: SynthSpec) -> None:
        self.spec = spec
        self.table: Table = {}
        self.fdt = spec.float_dtype
        self.down, self.up, self.smooth, self.smooth_orig = _SUFFIXES[spec.resolved_naming]

    def width(self, base: int) -> int:
        """Scale a published width, keeping it a positive multiple of 128."""
        return max(PAD, round(base * self.spec.scale / PAD) * PAD)

    def add(self, name: str, dtype: str, *shape: int) -> None:
        self.table[name] = (dtype, tuple(shape))

    def dense(self, prefix: str, ic: int, oc: int, *, bias: bool = True) -> None:
        """Add a plain 16-bit linear layer."""
        self.add(f"{prefix}.weight", self.fdt, oc, ic)
        if bias:
            self.add(f"{prefix}.bias", self.fdt, oc)

    def vector(self, name: str, size: int) -> None:
        self.add(name, self.fdt, size)

    def w4a4(self, prefix: str, ic: int, oc: int, *, bias: bool = True, fused_qkv: bool = False) -> None:
        """Add an SVDQuant W4A4 layer (widths padded to 128, as GEMM_W4A4 allocates them)."""
        ic, oc = _pad(ic), _pad(oc)
        group = GROUP_SIZE[self.spec.precision]
        self.add(f"{prefix}.qweight", "I8", oc, ic // 2)
        if self.spec.precision == "nvfp4":
            self.add(f"{prefix}.wscales", "F8_E4M3", ic // group, oc)
            # deepcompressor gives fused qkv layers per-channel scales and the others one tensor-wide scale.
            if fused_qkv:
                self.add(f"{prefix}.wcscales", self.fdt, oc)
            else:
                self.add(f"{prefix}.wtscale", self.fdt, 1)
        else:
            self.add(f"{prefix}.wscales", self.fdt, ic // group, oc)
        if bias:
            self.add(f"{prefix}.bias", self.fdt, oc)
        self.add(f"{prefix}.{self.smooth}", self.fdt, ic)
        self.add(f"{prefix}.{self.smooth_orig}", self.fdt, ic)
        self.add(f"{prefix}.{self.down}", self.fdt, ic, self.spec.rank)
        self.add(f"{prefix}.{self.up}", self.fdt, oc, self.spec.rank)

    def awq(self, prefix: str, ic: int, oc: int) -> None:
        """Add an AWQ W4A16 layer (the modulation linears): never affected by the W4A4 precision."""
        self.add(f"{prefix}.qweight", "I32", oc // 4, ic // 2)
        self.add(f"{prefix}.wscales", self.fdt, ic // AWQ_GROUP_SIZE, oc)
        self.add(f"{prefix}.wzeros", self.fdt, ic // AWQ_GROUP_SIZE, oc)
        self.add(f"{prefix}.bias", self.fdt, oc)

    def head_norms(self, prefix: str, *names: str) -> None:
        for name in names:
            self.vector(f"{prefix}.{name}.weight", HEAD_DIM)


def _flux(b: _Builder) -> None:
    spec = b.spec
    hidden = b.width(3072)
    mlp = 4 * hidden
    for i in range(spec.resolved_layers):
        p = f"transformer_blocks.{i}"
        b.awq(f"{p}.norm1.linear", hidden, 6 * hidden)
        b.awq(f"{p}.norm1_context.linear", hidden, 6 * hidden)
        b.w4a4(f"{p}.qkv_proj", hidden, 3 * hidden, fused_qkv=True)
        b.w4a4(f"{p}.qkv_proj_context", hidden, 3 * hidden, fused_qkv=True)
        b.head_norms(p, "norm_q", "norm_k", "norm_added_q", "norm_added_k")
        b.w4a4(f"{p}.out_proj", hidden, hidden)
        b.w4a4(f"{p}.out_proj_context", hidden, hidden)
        b.w4a4(f"{p}.mlp_fc1", hidden, mlp)
        b.w4a4(f"{p}.mlp_fc2", mlp, hidden)
        b.w4a4(f"{p}.mlp_context_fc1", hidden, mlp)
        b.w4a4(f"{p}.mlp_context_fc2", mlp, hidden)
    for i in range(spec.resolved_single_layers):
        p = f"single_transformer_blocks.{i}"
        b.awq(f"{p}.norm.linear", hidden, 3 * hidden)
        b.w4a4(f"{p}.qkv_proj", hidden, 3 * hidden, fused_qkv=True)
        b.head_norms(p, "norm_q", "norm_k")
        b.w4a4(f"{p}.out_proj", hidden, hidden)
        b.w4a4(f"{p}.mlp_fc1", hidden, mlp)
        b.w4a4(f"{p}.mlp_fc2", mlp, hidden)
    if spec.include_unquantized:
        b.dense("x_embedder", spec.in_channels, hidden)
        b.dense("context_embedder", b.width(4096), hidden)
        embedders = ["timestep_embedder", *(["guidance_embedder"] if spec.guidance else []), "text_embedder"]
        for embedder in embedders:
            p = f"time_text_embed.{embedder}"
            b.dense(f"{p}.linear_1", b.width(768) if embedder == "text_embedder" else TIMESTEP_DIM, hidden)
            b.dense(f"{p}.linear_2", hidden, hidden)
        b.dense("norm_out.linear", hidden, 2 * hidden)
        b.dense("proj_out", hidden, 64)  # out_channels is 64 for every FLUX.1 variant, Fill included


def _qwen_image(b: _Builder) -> None:
    spec = b.spec
    hidden = b.width(3072)
    text = b.width(3584)
    for i in range(spec.resolved_layers):
        p = f"transformer_blocks.{i}"
        b.awq(f"{p}.img_mod.1", hidden, 6 * hidden)
        b.awq(f"{p}.txt_mod.1", hidden, 6 * hidden)
        b.w4a4(f"{p}.attn.to_qkv", hidden, 3 * hidden, fused_qkv=True)
        b.w4a4(f"{p}.attn.add_qkv_proj", hidden, 3 * hidden, fused_qkv=True)
        b.w4a4(f"{p}.attn.to_out.0", hidden, hidden)
        b.w4a4(f"{p}.attn.to_add_out", hidden, hidden)
        b.head_norms(f"{p}.attn", "norm_q", "norm_k", "norm_added_q", "norm_added_k")
        for stream in ("img_mlp", "txt_mlp"):
            b.w4a4(f"{p}.{stream}.net.0.proj", hidden, 4 * hidden)
            b.w4a4(f"{p}.{stream}.net.2", 4 * hidden, hidden)
    if spec.include_unquantized:
        b.dense("img_in", spec.in_channels, hidden)
        b.vector("txt_norm.weight", text)
        b.dense("txt_in", text, hidden)
        b.dense("time_text_embed.timestep_embedder.linear_1", TIMESTEP_DIM, hidden)
        b.dense("time_text_embed.timestep_embedder.linear_2", hidden, hidden)
        b.dense("norm_out.linear", hidden, 2 * hidden)
        b.dense("proj_out", hidden, 64)  # patch 2 x 2 x 16 latent channels


def _zimage_block(b: _Builder, p: str, dim: int, ffn: int, *, quantized: bool, modulation: bool) -> None:
    if quantized:
        b.w4a4(f"{p}.attention.to_qkv", dim, 3 * dim, bias=False, fused_qkv=True)
        b.w4a4(f"{p}.attention.to_out.0", dim, dim, bias=False)
        b.w4a4(f"{p}.feed_forward.net.0.proj", dim, 2 * ffn, bias=False)  # SwiGLU: w1 and w3 fused
        b.w4a4(f"{p}.feed_forward.net.2", ffn, dim, bias=False)
    else:
        # nunchaku's skip_refiners keeps these in 16 bits (feed-forward already renamed to diffusers' layout).
        for name in ("to_q", "to_k", "to_v", "to_out.0"):
            b.dense(f"{p}.attention.{name}", dim, dim, bias=False)
        b.dense(f"{p}.feed_forward.net.0.proj", dim, 2 * ffn, bias=False)
        b.dense(f"{p}.feed_forward.net.2", ffn, dim, bias=False)
    b.head_norms(f"{p}.attention", "norm_q", "norm_k")
    for norm in ("attention_norm1", "attention_norm2", "ffn_norm1", "ffn_norm2"):
        b.vector(f"{p}.{norm}.weight", dim)
    if modulation:
        b.dense(f"{p}.adaLN_modulation.0", TIMESTEP_DIM, 4 * dim)


def _zimage(b: _Builder) -> None:
    spec = b.spec
    dim = b.width(3840)
    ffn = _pad(dim * 8 // 3)
    caption = b.width(2560)
    for i in range(spec.resolved_layers):
        _zimage_block(b, f"layers.{i}", dim, ffn, quantized=True, modulation=True)
    for refiner, modulation in (("noise_refiner", True), ("context_refiner", False)):
        for i in range(ZIMAGE_REFINER_LAYERS):
            _zimage_block(b, f"{refiner}.{i}", dim, ffn, quantized=not spec.skip_refiners, modulation=modulation)
    if spec.include_unquantized:
        patch, frames = 2, 1  # the key names carry them: all_x_embedder.{patch}-{frame patch}
        tokens = patch * patch * frames * spec.in_channels
        b.dense(f"all_x_embedder.{patch}-{frames}", tokens, dim)
        b.dense(f"all_final_layer.{patch}-{frames}.linear", dim, tokens)
        b.dense(f"all_final_layer.{patch}-{frames}.adaLN_modulation.1", TIMESTEP_DIM, dim)
        b.dense("t_embedder.mlp.0", TIMESTEP_DIM, 1024)
        b.dense("t_embedder.mlp.2", 1024, TIMESTEP_DIM)
        b.vector("cap_embedder.0.weight", caption)
        b.dense("cap_embedder.1", caption, dim)
        b.add("x_pad_token", b.fdt, 1, dim)
        b.add("cap_pad_token", b.fdt, 1, dim)


def _sana(b: _Builder) -> None:
    spec = b.spec
    # 70 heads of 32: 2240 is no multiple of 128, so the quantized layers are padded (as nunchaku's SanaModel does).
    hidden = max(1, round(70 * spec.scale)) * 32
    inner = -(-round(2.5 * hidden) // 64) * 64
    caption = b.width(2304)
    for i in range(spec.resolved_layers):
        p = f"transformer_blocks.{i}"
        b.w4a4(f"{p}.attn.qkv_proj", hidden, 3 * _pad(hidden), bias=False, fused_qkv=True)
        b.w4a4(f"{p}.attn.out_proj", _pad(hidden), hidden, bias=False)
        b.w4a4(f"{p}.cross_attn.q_linear", hidden, hidden)
        b.dense(f"{p}.cross_attn.kv_linear", hidden, 2 * hidden)
        b.w4a4(f"{p}.cross_attn.out_proj", hidden, hidden)
        b.w4a4(f"{p}.ff.inverted_conv", hidden, 2 * inner)
        # Depth-wise 3x3 conv of the C++ engine; the exact layout of the published file is not known.
        b.add(f"{p}.ff.depth_conv.weight", b.fdt, 2 * inner, 3, 3, 1)
        b.vector(f"{p}.ff.depth_conv.bias", 2 * inner)
        b.w4a4(f"{p}.ff.point_conv", inner, hidden, bias=False)
        b.add(f"{p}.scale_shift_table", b.fdt, 6, hidden)
    if spec.include_unquantized:
        b.add("patch_embed.proj.weight", b.fdt, hidden, spec.in_channels, 1, 1)
        b.vector("patch_embed.proj.bias", hidden)
        b.dense("time_embed.emb.timestep_embedder.linear_1", TIMESTEP_DIM, hidden)
        b.dense("time_embed.emb.timestep_embedder.linear_2", hidden, hidden)
        b.dense("time_embed.linear", hidden, 6 * hidden)
        b.dense("caption_projection.linear_1", caption, hidden)
        b.dense("caption_projection.linear_2", hidden, hidden)
        b.add("scale_shift_table", b.fdt, 2, hidden)
        b.dense("proj_out", hidden, spec.in_channels)


def _sdxl(b: _Builder) -> None:
    spec = b.spec
    narrow, wide = b.width(640), b.width(1280)
    base = narrow // 2
    cross = 2048  # the two text encoders' concatenated width, not scaled: it only shapes 16-bit tensors
    # (UNet block, attentions, transformer blocks per attention, width): SDXL's transformer_layers_per_block.
    layout = (
        ("down_blocks.1", 2, 2, narrow),
        ("down_blocks.2", 2, 10, wide),
        ("mid_block", 1, 10, wide),
        ("up_blocks.0", 3, 10, wide),
        ("up_blocks.1", 3, 2, narrow),
    )
    for block, attentions, depth, width in layout:
        for a in range(attentions):
            ap = f"{block}.attentions.{a}"
            b.vector(f"{ap}.norm.weight", width)
            b.vector(f"{ap}.norm.bias", width)
            b.dense(f"{ap}.proj_in", width, width)
            for t in range(depth):
                p = f"{ap}.transformer_blocks.{t}"
                for norm in ("norm1", "norm2", "norm3"):
                    b.vector(f"{p}.{norm}.weight", width)
                    b.vector(f"{p}.{norm}.bias", width)
                b.w4a4(f"{p}.attn1.to_qkv", width, 3 * width, bias=False, fused_qkv=True)
                b.w4a4(f"{p}.attn1.to_out.0", width, width)
                b.w4a4(f"{p}.attn2.to_q", width, width, bias=False)
                b.dense(f"{p}.attn2.to_k", cross, width, bias=False)
                b.dense(f"{p}.attn2.to_v", cross, width, bias=False)
                b.w4a4(f"{p}.attn2.to_out.0", width, width)
                b.w4a4(f"{p}.ff.net.0.proj", width, 8 * width)  # GEGLU
                b.w4a4(f"{p}.ff.net.2", 4 * width, width)
            b.dense(f"{ap}.proj_out", width, width)
    if spec.include_unquantized:
        # The UNet's convolutions and resnets are left out: only what inference looks at, plus the time path.
        b.add("conv_in.weight", b.fdt, base, spec.in_channels, 3, 3)
        b.vector("conv_in.bias", base)
        b.dense("time_embedding.linear_1", base, 4 * base)
        b.dense("time_embedding.linear_2", 4 * base, 4 * base)
        b.dense("add_embedding.linear_1", 2816, 4 * base)
        b.dense("add_embedding.linear_2", 4 * base, 4 * base)
        b.vector("conv_norm_out.weight", base)
        b.vector("conv_norm_out.bias", base)
        b.add("conv_out.weight", b.fdt, spec.in_channels, base, 3, 3)
        b.vector("conv_out.bias", spec.in_channels)


def _t5_linear(b: _Builder, prefix: str, ic: int, oc: int) -> None:
    # nunchaku's TinyChat W4Linear: int16 packing, group 128, groups padded to whole int32 packs of 8.
    groups = -(-(ic // 128) // 8) * 8
    b.add(f"{prefix}.qweight", "I16", oc // 4, ic)
    b.add(f"{prefix}.scales", b.fdt, groups, oc)
    b.add(f"{prefix}.scaled_zeros", b.fdt, groups, oc)


def _t5(b: _Builder) -> None:
    spec = b.spec
    model, ffn = b.width(4096), b.width(10240)
    for i in range(spec.resolved_layers):
        p = f"encoder.block.{i}.layer"
        for name in ("q", "k", "v", "o"):
            _t5_linear(b, f"{p}.0.SelfAttention.{name}", model, model)
        if i == 0:
            b.add(f"{p}.0.SelfAttention.relative_attention_bias.weight", b.fdt, 32, 64)
        b.vector(f"{p}.0.layer_norm.weight", model)
        _t5_linear(b, f"{p}.1.DenseReluDense.wi_0", model, ffn)
        _t5_linear(b, f"{p}.1.DenseReluDense.wi_1", model, ffn)
        _t5_linear(b, f"{p}.1.DenseReluDense.wo", ffn, model)
        b.vector(f"{p}.1.layer_norm.weight", model)
    if spec.include_unquantized:
        b.add("shared.weight", b.fdt, 32128, model)
        b.vector("encoder.final_layer_norm.weight", model)


_BUILDERS = {
    Family.FLUX: _flux,
    Family.QWEN_IMAGE: _qwen_image,
    Family.Z_IMAGE: _zimage,
    Family.SANA: _sana,
    Family.SDXL: _sdxl,
    Family.T5: _t5,
}


def _check_spec(spec: SynthSpec) -> None:
    problems: list[tuple[str, object, object]] = []
    if not isinstance(spec.family, Family):
        problems.append(("family", "a Family", spec.family))
    if spec.precision not in PRECISIONS:
        problems.append(("precision", " or ".join(PRECISIONS), spec.precision))
    if spec.family is Family.T5 and spec.precision != "int4":
        problems.append(("precision", "int4 (T5 files are AWQ W4A16 only)", spec.precision))
    if isinstance(spec.rank, bool) or not isinstance(spec.rank, int) or spec.rank < 1:
        problems.append(("rank", "a positive integer", spec.rank))
    if not 0 < spec.scale <= 1:
        problems.append(("scale", "a number in (0, 1]", spec.scale))
    if spec.in_channels < 0:
        problems.append(("in_channels", "a non-negative integer", spec.in_channels))
    for field_name in ("num_layers", "num_single_layers"):
        value = getattr(spec, field_name)
        if value is not None and value < 0:
            problems.append((field_name, "None or a non-negative integer", value))
    if spec.naming is not None and spec.naming not in _SUFFIXES:
        problems.append(("naming", "'lora' or 'proj'", spec.naming))
    if spec.float_dtype not in _FLOAT_DTYPES:
        problems.append(("float_dtype", " or ".join(_FLOAT_DTYPES), spec.float_dtype))
    if problems:
        name, expected, got = problems[0]
        raise UsageError(f"bad synthetic spec field {name!r}", expected=expected, got=repr(got))


def build_table(spec: SynthSpec) -> Table:
    """Return the ordered tensor table ``{name: (dtype, shape)}`` of the conversion ``spec`` describes."""
    _check_spec(spec)
    builder = _Builder(spec)
    _BUILDERS[spec.family](builder)
    return builder.table


def table_to_tensors(table: Mapping[str, TableEntry]) -> dict[str, TensorInfo]:
    """Return header entries for ``table`` with consecutive data offsets in table order."""
    tensors: dict[str, TensorInfo] = {}
    position = 0
    for name, (dtype, shape) in table.items():
        count = 1
        for dim in shape:
            count *= dim
        bits = count * DTYPE_BITS[dtype]
        if bits % 8:
            raise UsageError(f"tensor {name!r} does not fill whole bytes", expected="a multiple of 8 bits", got=bits)
        end = position + bits // 8
        tensors[name] = TensorInfo(dtype, tuple(shape), (position, end))
        position = end
    return tensors


def data_size(tensors: Mapping[str, TensorInfo]) -> int:
    """Return the length of the data region the entries describe."""
    return max((info.data_offsets[1] for info in tensors.values()), default=0)


def header_of(tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None = None) -> Header:
    """Return the parsed :class:`Header` a file with these entries would have (pure: no file)."""
    raw = serialize_header(metadata, tensors)
    return parse_header(raw, PREFIX_SIZE + len(raw) + data_size(tensors), source="<synthetic>")


def synth_header(spec: SynthSpec, metadata: Mapping[str, str] | None = None) -> Header:
    """Return the parsed header of the conversion ``spec`` describes (pure: no file)."""
    return header_of(table_to_tensors(build_table(spec)), metadata)


# --------------------------------------------------------------------------------------------
# Thin writers

#: Chunk of random bytes written at a time by :func:`write_random` (bounded memory for 7 GB files).
RANDOM_CHUNK = 16 * 1024 * 1024


def _write(
    path: str | os.PathLike[str],
    tensors: Mapping[str, TensorInfo],
    metadata: Mapping[str, str] | None,
    seed: int | None,
) -> Path:
    target = Path(path)
    head = pack_prefix(serialize_header(metadata, tensors))
    total = len(head) + data_size(tensors)
    try:
        with open(target, "wb") as f:
            f.write(head)
            if seed is None:
                f.truncate(total)  # a hole: the data region takes no disk space and reads as zeros
            else:
                import numpy as np  # only the benchmark writer needs it

                rng = np.random.default_rng(seed)
                remaining = total - len(head)
                while remaining:
                    size = min(RANDOM_CHUNK, remaining)
                    f.write(rng.bytes(size))
                    remaining -= size
    except OSError as exc:
        raise WriteError(f"cannot write synthetic file: {exc.strerror}", path=target, code="io") from None
    return target


def write_sparse(
    path: str | os.PathLike[str], tensors: Mapping[str, TensorInfo], metadata: Mapping[str, str] | None = None
) -> Path:
    """Write a valid safetensors file whose data region is a hole (real header, no data bytes); return its path."""
    return _write(path, tensors, metadata, None)


def write_random(
    path: str | os.PathLike[str],
    tensors: Mapping[str, TensorInfo],
    metadata: Mapping[str, str] | None = None,
    seed: int = 0,
) -> Path:
    """Write a valid safetensors file filled with seeded random bytes, streamed in chunks; return its path."""
    return _write(path, tensors, metadata, seed)
