"""Shared vocabulary: model families, precisions, and what was inferred from a header (with evidence)."""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import field
from typing import Any, Generic, Literal, TypeVar

from ._record import dataclass

T = TypeVar("T")

#: The two files deepcompressor's nunchaku backend writes (``backend/nunchaku/convert.py``), blocks first: the
#: quantized blocks, and every layer left in 16 bits (embedders, ``norm_out``, ``proj_out``).
BLOCKS_FILE = "transformer_blocks.safetensors"
UNQUANTIZED_FILE = "unquantized_layers.safetensors"

#: The two SVDQuant weight formats: int4 (W4A4, group 64) and nvfp4 (fp4_e2m1_all, F8_E4M3 scales, group 16).
Precision = Literal["int4", "nvfp4"]
PRECISIONS: tuple[Precision, ...] = ("int4", "nvfp4")


class Family(str, enum.Enum):
    """A model family Nunchaku has a loader for."""

    FLUX = "flux"
    QWEN_IMAGE = "qwen-image"
    Z_IMAGE = "z-image"
    SANA = "sana"
    SDXL = "sdxl"
    T5 = "t5"

    def __str__(self) -> str:
        return self.value


#: The Nunchaku class that loads each family (nunchaku-contract.md section 2).
MODEL_CLASS: dict[Family, str] = {
    Family.FLUX: "NunchakuFluxTransformer2dModel",
    Family.QWEN_IMAGE: "NunchakuQwenImageTransformer2DModel",
    Family.Z_IMAGE: "NunchakuZImageTransformer2DModel",
    Family.SANA: "NunchakuSanaTransformer2DModel",
    Family.SDXL: "NunchakuSDXLUNet2DConditionModel",
    Family.T5: "NunchakuT5EncoderModel",
}


#: What each family's config is, for messages: (kind, the file inside a diffusers / Hugging Face repository).
CONFIG_KIND: dict[Family, tuple[str, str]] = {
    Family.FLUX: ("transformer config", "transformer/config.json"),
    Family.QWEN_IMAGE: ("transformer config", "transformer/config.json"),
    Family.Z_IMAGE: ("transformer config", "transformer/config.json"),
    Family.SANA: ("transformer config", "transformer/config.json"),
    Family.SDXL: ("UNet config", "unet/config.json"),
    Family.T5: ("text-encoder config", "text_encoder_2/config.json"),
}


def config_kind(family: Family | None) -> tuple[str, str]:
    """Return (kind, file in the repo) of a family's config; the transformer's when the family is unknown."""
    return CONFIG_KIND[family if family is not None else Family.FLUX]


#: Parameter defaults of the diffusers classes whose configs differ only by omitted defaults
#: (``FluxTransformer2DModel.__init__``, ``UNet2DConditionModel.__init__`` and ``QwenImageTransformer2DModel.__init__``
#: in diffusers).
#: Classes not listed are compared field by field as written.
CLASS_DEFAULTS: Mapping[str, Mapping[str, Any]] = {
    "FluxTransformer2DModel": {
        "patch_size": 1,
        "in_channels": 64,
        "out_channels": None,
        "num_layers": 19,
        "num_single_layers": 38,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 4096,
        "pooled_projection_dim": 768,
        "guidance_embeds": False,
        "axes_dims_rope": [16, 56, 56],
    },
    # Only the fields SDXL-Turbo's config spells out and SDXL base's (an older diffusers) leaves to the default.
    "UNet2DConditionModel": {
        "attention_type": "default",
        "dropout": 0.0,
        "reverse_transformer_layers_per_block": None,
    },
    "QwenImageTransformer2DModel": {
        "patch_size": 2,
        "in_channels": 64,
        "out_channels": 16,
        "num_layers": 60,
        "attention_head_dim": 128,
        "num_attention_heads": 24,
        "joint_attention_dim": 3584,
        "guidance_embeds": False,
        "axes_dims_rope": [16, 56, 56],
    },
}


@dataclass(frozen=True)
class Fact(Generic[T]):
    """One conclusion drawn from the tensor table, with the tensors that support it."""

    value: T
    #: Tensor names (a few representative ones) that said so.
    evidence: tuple[str, ...] = ()
    #: A short human sentence: how the value was derived.
    note: str = ""


class Severity(str, enum.Enum):
    """How bad a finding is."""

    INFO = "info"
    WARNING = "warning"
    ERROR = "error"

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class Finding:
    """One check result: severity, a stable code, and a one-line message."""

    severity: Severity
    code: str
    message: str
    #: Which loader (or "file") the finding concerns, e.g. "nunchaku-flux", "comfyui-flux".
    scope: str = "file"


@dataclass(frozen=True)
class Inference:
    """What the tensor table says about the model. ``None`` means "the header does not tell"."""

    family: Fact[Family] | None = None
    precision: Fact[Precision] | None = None
    rank: Fact[int] | None = None
    group_size: Fact[int] | None = None
    #: Flux: double blocks; Qwen-Image / SANA / Z-Image: main transformer layers; SDXL: all the UNet's transformer
    #: blocks; T5: encoder blocks.
    num_layers: Fact[int] | None = None
    #: Flux single blocks.
    num_single_layers: Fact[int] | None = None
    #: The diffusers ``in_channels`` read off ``x_embedder.weight`` (Flux: 64, 128 or 384).
    in_channels: Fact[int] | None = None
    #: Flux: whether ``time_text_embed.guidance_embedder.*`` is present (``None``: unquantized layers absent).
    guidance_embeds: Fact[bool] | None = None
    #: Width of the model (Flux: 3072) from the quantized qkv layers.
    hidden_size: Fact[int] | None = None
    #: Z-Image: true when no refiner layer is quantized (``attention.to_qkv`` absent under ``*refiner*``).
    skip_refiners: Fact[bool] | None = None
    #: SDXL: the UNet's cross-attention blocks as ``(block, attentions, transformer blocks per attention)``.
    unet_layout: Fact[tuple[tuple[str, int, int], ...]] | None = None
    #: Whether the unquantized layers (embedders, ``proj_out``) are in the file.
    has_unquantized: bool = False
    #: The family's unquantized layers the loaders need that the file lacks (``x_embedder``, ``proj_out``...):
    #: all of them in a deepcompressor ``transformer_blocks.safetensors``. Empty when complete or not known.
    missing_unquantized: tuple[str, ...] = ()
    #: Whether any layer a Nunchaku loader quantizes is present: SVDQuant W4A4 (``qweight`` I8 with a low-rank
    #: branch), or the T5 encoder's AWQ W4A16 (``qweight`` I16).
    quantized: bool = False
    #: Self-contradictions found in the table (mixed ranks, F8 scales beside int4 group sizes, ...).
    contradictions: tuple[str, ...] = field(default=())
