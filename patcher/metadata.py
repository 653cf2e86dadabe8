"""Pure builders of the ``__metadata__`` entries Nunchaku and ComfyUI-nunchaku read, plus merge and diff.

Everything here takes values and returns values: the inferred facts come in as a :class:`patcher.facts.Inference`,
the config as a dict or its JSON text. The exact strings follow ``nunchaku-contract.md`` (sections 3 and 5).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any, Final, Literal

from ._record import dataclass
from .errors import ConfigError, InferenceError, UsageError
from .facts import CLASS_DEFAULTS, MODEL_CLASS, PRECISIONS, Fact, Family, Inference, Precision

# --------------------------------------------------------------------------------------------
# Names of things

#: The metadata keys merge_safetensors writes, in the order it writes them (contract section 3).
ENTRY_KEYS: Final = ("config", "comfy_config", "model_class", "quantization_config")

#: The scalar fields of the deepcompressor ``--add-metadata`` proposal, in its order (after ``model_type`` and
#: ``architectures``). Each is written as a string when the config has it or it can be derived (see
#: :func:`compat_entries`).
COMPAT_SCALAR_KEYS: Final = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "max_position_embeddings",
    "torch_dtype",
    "transformers_version",
    "num_key_value_heads",
    "rope_theta",
    "attention_dropout",
    "hidden_act",
)
#: Every key ``--compat-fields`` may add, in the order they are written.
COMPAT_KEYS: Final = ("full_config", "model_type", "architectures", *COMPAT_SCALAR_KEYS)

#: The entries written for each family: exactly what its loaders read (nunchaku-contract.md section 2), in
#: merge_safetensors' order. ``NunchakuSDXLUNet2DConditionModel`` reads ``config`` and ``quantization_config.rank``
#: (nothing reads ``model_class`` or ``comfy_config`` for SDXL); ``NunchakuT5EncoderModel`` reads ``config`` (a
#: T5Config) and ComfyUI-nunchaku recognises the encoder by ``model_class`` (no quantization_config: AWQ W4A16 has
#: no SVDQuant settings, and nothing reads one). The other families keep merge_safetensors' four keys.
FAMILY_ENTRY_KEYS: Final[Mapping[Family, tuple[str, ...]]] = {
    **{family: ENTRY_KEYS for family in Family},
    Family.SDXL: ("config", "quantization_config"),
    Family.T5: ("config", "model_class"),
}

#: The keys this tool owns: it replaces them when they differ; every other key of a file is left alone.
OWNED_KEYS: Final = frozenset(ENTRY_KEYS + COMPAT_KEYS)

#: ``quantization_config.weight.dtype`` for each precision (the C++ engine checks it against the GPU).
WEIGHT_DTYPE: Final[Mapping[Precision, str]] = {"int4": "int4", "nvfp4": "fp4_e2m1_all"}
#: Quantization group size of the W4A4 layers for each precision.
GROUP_SIZE: Final[Mapping[Precision, int]] = {"int4": 64, "nvfp4": 16}
#: Rank Nunchaku's Python loaders assume when ``quantization_config`` has no ``rank`` (``qc.get("rank", 32)``).
DEFAULT_LOADER_RANK: Final = 32
#: Low-rank branches are padded to multiples of this (contract section 4).
RANK_MULTIPLE: Final = 16

#: Spellings accepted for a precision: ours, the contract's, the metadata's, and deepcompressor's YAML dtypes.
PRECISION_ALIASES: Final[Mapping[str, Precision]] = {
    "int4": "int4",
    "sint4": "int4",
    "w4a4": "int4",
    "nvfp4": "nvfp4",
    "fp4": "nvfp4",
    "fp4_e2m1_all": "nvfp4",
    "sfp4_e2m1_all": "nvfp4",
}

#: Defaults of diffusers' ``FluxTransformer2DModel.__init__``: ``from_config`` fills in missing keys with these.
FLUX_DEFAULTS: Final[Mapping[str, Any]] = CLASS_DEFAULTS["FluxTransformer2DModel"]
#: ComfyUI's Flux ``model_class`` for guidance-distilled (dev-like) and timestep-distilled (schnell-like) models.
COMFY_FLUX_CLASSES: Final = ("Flux", "FluxSchnell")


def normalize_precision(value: str) -> Precision:
    """Return the precision named by ``value`` (int4, nvfp4, fp4, fp4_e2m1_all, sint4, sfp4_e2m1_all)."""
    found = PRECISION_ALIASES.get(value.strip().lower())
    if found is None:
        raise UsageError(
            f"unknown precision {value!r}",
            code="bad-precision",
            expected="int4 or nvfp4 (also: fp4, fp4_e2m1_all, sint4, sfp4_e2m1_all)",
        )
    return found


def precision_of_weight_dtype(dtype: object) -> Precision | None:
    """Return the precision a ``quantization_config.weight.dtype`` value stands for, or ``None`` if unknown."""
    for precision, name in WEIGHT_DTYPE.items():
        if dtype == name:
            return precision
    return None


def _check_rank(rank: object, what: str = "rank") -> int:
    if not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        raise UsageError(f"{what} must be a positive integer", code="bad-rank", got=repr(rank))
    return rank


# --------------------------------------------------------------------------------------------
# quantization_config


def quantization_config(
    precision: str, rank: int, *, family: Family | None = None, skip_refiners: bool | None = None
) -> dict[str, Any]:
    """Return the ``quantization_config`` object merge_safetensors writes, keys in its order."""
    p = normalize_precision(precision)
    _check_rank(rank)
    group = GROUP_SIZE[p]
    if p == "int4":
        weight: dict[str, Any] = {"dtype": "int4", "scale_dtype": None, "group_size": group}
        activation: dict[str, Any] = {"dtype": "int4", "scale_dtype": None, "group_size": group}
    else:
        # fp4 weights carry two scale levels: none at the top, F8 per group; activations one F8 scale.
        weight = {"dtype": "fp4_e2m1_all", "scale_dtype": [None, "fp8_e4m3_nan"], "group_size": group}
        activation = {"dtype": "fp4_e2m1_all", "scale_dtype": "fp8_e4m3_nan", "group_size": group}
    qc: dict[str, Any] = {"method": "svdquant", "weight": weight, "activation": activation, "rank": rank}
    if family is Family.Z_IMAGE:
        if skip_refiners is None:
            raise InferenceError(
                "Z-Image needs skip_refiners in quantization_config and it is not known",
                code="no-skip-refiners",
                hint="the tensor table should tell (no refiner attention.to_qkv means true)",
            )
        qc["skip_refiners"] = bool(skip_refiners)
    elif skip_refiners is not None:
        raise UsageError(
            "skip_refiners only exists for Z-Image", code="bad-skip-refiners", got=f"family {family or 'unknown'}"
        )
    return qc


def quantization_config_text(
    precision: str, rank: int, *, family: Family | None = None, skip_refiners: bool | None = None
) -> str:
    """Return the exact ``quantization_config`` string of the contract (``json.dumps`` default separators)."""
    return json.dumps(quantization_config(precision, rank, family=family, skip_refiners=skip_refiners))


# --------------------------------------------------------------------------------------------
# comfy_config (Flux)


def _config_int(config: Mapping[str, Any], key: str, defaults: Mapping[str, Any]) -> int:
    value = config.get(key, defaults.get(key))
    if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
        raise ConfigError(f"config field {key!r} is not a positive integer", code="bad-config", got=repr(value))
    return value


def comfy_config_from_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return ComfyUI-nunchaku's ``comfy_config`` for a Flux diffusers ``config`` (contract section 5).

    Missing fields take diffusers' defaults (:data:`FLUX_DEFAULTS`), as ``from_config`` does.
    """
    class_name = config.get("_class_name")
    if class_name is not None and class_name != "FluxTransformer2DModel":
        raise ConfigError(
            "comfy_config can only be generated from a Flux config",
            code="not-flux",
            expected="_class_name FluxTransformer2DModel",
            got=repr(class_name),
            hint="pass --comfy-config FILE for other models",
        )
    heads = _config_int(config, "num_attention_heads", FLUX_DEFAULTS)
    head_dim = _config_int(config, "attention_head_dim", FLUX_DEFAULTS)
    in_channels = _config_int(config, "in_channels", FLUX_DEFAULTS)
    out_value = config.get("out_channels")
    out_channels = in_channels if out_value is None else _config_int(config, "out_channels", FLUX_DEFAULTS)
    # diffusers packs 2x2 latent patches into channels; ComfyUI counts latent channels and patchifies itself.
    for key, value in (("in_channels", in_channels), ("out_channels", out_channels)):
        if value % 4:
            raise ConfigError(
                f"config field {key!r} is not a multiple of 4 (2x2 packed latent channels)",
                code="bad-config",
                got=value,
            )
    guidance = config.get("guidance_embeds", FLUX_DEFAULTS["guidance_embeds"])
    if not isinstance(guidance, bool):
        raise ConfigError("config field 'guidance_embeds' is not a boolean", code="bad-config", got=repr(guidance))
    axes = config.get("axes_dims_rope", FLUX_DEFAULTS["axes_dims_rope"])
    if not isinstance(axes, list) or not all(isinstance(a, int) and not isinstance(a, bool) for a in axes):
        raise ConfigError("config field 'axes_dims_rope' is not a list of integers", code="bad-config", got=axes)
    # Keys sorted, like the files ComfyUI-nunchaku ships.
    model_config: dict[str, Any] = {
        "axes_dim": list(axes),
        "context_in_dim": _config_int(config, "joint_attention_dim", FLUX_DEFAULTS),
        "depth": _config_int(config, "num_layers", FLUX_DEFAULTS),
        "depth_single_blocks": _config_int(config, "num_single_layers", FLUX_DEFAULTS),
        "disable_unet_model_creation": True,
        "guidance_embed": guidance,
        "hidden_size": heads * head_dim,
        "image_model": "flux",
        "in_channels": in_channels // 4,
        "mlp_ratio": 4.0,
        "num_heads": heads,
        "out_channels": out_channels // 4,
        "patch_size": 2,
        "qkv_bias": True,
        "theta": 10000,
        "vec_in_dim": _config_int(config, "pooled_projection_dim", FLUX_DEFAULTS),
    }
    return {"model_class": "Flux" if guidance else "FluxSchnell", "model_config": model_config}


def comfy_config_text(config: Mapping[str, Any]) -> str:
    """Return ``comfy_config`` as JSON text (``json.dumps`` default separators)."""
    return json.dumps(comfy_config_from_config(config))


# --------------------------------------------------------------------------------------------
# The entries


def _json_object(text: str, what: str, code: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{what} is not valid JSON: {exc.msg} at character {exc.pos}", code=code) from None
    if not isinstance(value, dict):
        raise ConfigError(f"{what} is not a JSON object", code=code, got=type(value).__name__)
    return value


def _hidden_size(config: Mapping[str, Any]) -> object:
    heads, head_dim = config.get("num_attention_heads"), config.get("attention_head_dim")
    if isinstance(heads, int) and isinstance(head_dim, int):
        return heads * head_dim
    return config.get("dim")  # Z-Image names its width directly


#: Where a compat scalar can be derived from when a diffusers config lacks the transformers-style key.
_COMPAT_SOURCES: Final[Mapping[str, tuple[str, ...]]] = {
    "num_hidden_layers": ("num_layers", "n_layers"),
    "num_attention_heads": ("n_heads",),
    "num_key_value_heads": ("n_kv_heads",),
}


def compat_entries(config: Mapping[str, Any], config_text: str, family: Family) -> dict[str, str]:
    """Return the extra fields of the deepcompressor ``--add-metadata`` layout, all strings.

    - ``full_config``: the config JSON text, as written to ``config``;
    - ``model_type``: the family (``flux``, ``qwen-image``, ``z-image``, ``sana``, ``sdxl``, ``t5``);
    - ``architectures``: a JSON list holding the config's ``_class_name`` (or its ``architectures``);
    - then, in this order, each of :data:`COMPAT_SCALAR_KEYS` the config has as a number or string:
      ``hidden_size`` (else ``num_attention_heads * attention_head_dim``, else Z-Image's ``dim``),
      ``num_hidden_layers`` (else ``num_layers`` / ``n_layers``), ``num_attention_heads`` (else ``n_heads``),
      ``intermediate_size``, ``max_position_embeddings``, ``torch_dtype``, ``transformers_version``,
      ``num_key_value_heads`` (else ``n_kv_heads``), ``rope_theta``, ``attention_dropout``, ``hidden_act``.
      Values are ``str(value)`` as in the proposal; keys the config cannot give are left out.
    """
    out: dict[str, str] = {"full_config": config_text, "model_type": family.value}
    class_name = config.get("_class_name")
    if isinstance(class_name, str):
        out["architectures"] = json.dumps([class_name])
    elif isinstance(config.get("architectures"), list):
        out["architectures"] = json.dumps(config["architectures"])
    for key in COMPAT_SCALAR_KEYS:
        value: object = config.get(key)
        if value is None and key == "hidden_size":
            value = _hidden_size(config)
        for source in _COMPAT_SOURCES.get(key, ()):
            if value is None:
                value = config.get(source)
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            out[key] = str(value)
    return out


def build_entries(
    *,
    family: Family,
    config_text: str,
    precision: str | None,
    rank: int | None,
    model_class: str | None = None,
    comfy_config_text: str | None = None,
    skip_refiners: bool | None = None,
    compat_fields: bool = False,
) -> dict[str, str]:
    """Return the metadata entries for a file, keys in merge_safetensors' order (:data:`FAMILY_ENTRY_KEYS`).

    ``comfy_config``: the given text; else, for Flux, generated from the config; else ``"{}"``. The Qwen-Image,
    Z-Image and SANA loaders never read it; ``"{}"`` keeps merge_safetensors' key set, so a re-run replaces them
    all. SDXL and T5 get only what their loaders read; an explicit ``model_class`` / ``comfy_config_text`` is
    written for them too. ``precision`` and ``rank`` are needed only when ``quantization_config`` is written.
    """
    config = _json_object(config_text, "config", "bad-config")
    keys = FAMILY_ENTRY_KEYS[family]
    entries: dict[str, str] = {"config": config_text}
    if comfy_config_text is not None:
        _json_object(comfy_config_text, "comfy_config", "bad-comfy-config")
        entries["comfy_config"] = comfy_config_text
    elif family is Family.FLUX:
        entries["comfy_config"] = json.dumps(comfy_config_from_config(config))
    elif "comfy_config" in keys:
        entries["comfy_config"] = "{}"
    if model_class is not None or "model_class" in keys:
        entries["model_class"] = model_class or MODEL_CLASS[family]
    if "quantization_config" in keys:
        if precision is None or rank is None:
            raise InferenceError(
                f"{family} needs quantization_config and the precision or rank is not known",
                code="no-quantization",
                hint="pass --precision and --rank",
            )
        entries["quantization_config"] = quantization_config_text(
            precision, rank, family=family, skip_refiners=skip_refiners
        )
    if compat_fields:
        entries.update(compat_entries(config, config_text, family))
    return entries


# --------------------------------------------------------------------------------------------
# Precision and rank: inferred, overridden, cross-checked


def _said(fact: Fact[Any] | None) -> str:
    """Describe where a fact came from, for messages."""
    if fact is None:
        return ""
    if fact.note:
        return f" ({fact.note})"
    if fact.evidence:
        return f" (from {fact.evidence[0]})"
    return ""


def _yaml_value(yaml_facts: Mapping[str, object] | None, *keys: str) -> object:
    if not yaml_facts:
        return None
    for key in keys:
        if yaml_facts.get(key) is not None:
            return yaml_facts[key]
    return None


def choose_quantization(
    inference: Inference,
    precision: str | None = None,
    rank: int | None = None,
    yaml_facts: Mapping[str, object] | None = None,
    force: bool = False,
) -> tuple[Precision, int]:
    """Return the (precision, rank) to write: the tensors' values, an override only when consistent.

    ``yaml_facts`` holds what deepcompressor's svdquant YAML says: ``precision`` (or ``dtype``: ``sint4`` /
    ``sfp4_e2m1_all``), ``rank``, and ``source`` (the file, for messages). Raises :class:`InferenceError`
    when an override or the YAML contradicts the tensors (unless ``force``), or when nothing tells.
    """
    source = str(_yaml_value(yaml_facts, "source") or "--config-yaml")
    tensor_precision: Precision | None = inference.precision.value if inference.precision else None
    group = inference.group_size.value if inference.group_size else None
    if tensor_precision is None and group in GROUP_SIZE.values():
        # The group size alone tells: 64 is int4, 16 is nvfp4.
        tensor_precision = next(p for p in PRECISIONS if GROUP_SIZE[p] == group)
    yaml_precision_raw = _yaml_value(yaml_facts, "precision", "dtype")
    yaml_precision = normalize_precision(str(yaml_precision_raw)) if yaml_precision_raw is not None else None
    yaml_rank_raw = _yaml_value(yaml_facts, "rank")
    yaml_rank = _check_rank(yaml_rank_raw, f"{source} rank") if yaml_rank_raw is not None else None
    tensor_rank = inference.rank.value if inference.rank else None
    hint = "pass --force to write it anyway"

    # Precision.
    chosen_precision: Precision
    if precision is not None:
        wanted = normalize_precision(precision)
        if tensor_precision is not None and wanted != tensor_precision and not force:
            raise InferenceError(
                f"--precision {wanted} contradicts the tensors",
                code="precision-override",
                expected=f"{tensor_precision}{_said(inference.precision or inference.group_size)}",
                got=wanted,
                hint=f"drop --precision, or {hint}",
            )
        chosen_precision = wanted
    elif tensor_precision is not None:
        if yaml_precision is not None and yaml_precision != tensor_precision and not force:
            raise InferenceError(
                f"{source} says the weights are {yaml_precision} but the tensors are {tensor_precision}",
                code="yaml-precision",
                expected=f"{tensor_precision}{_said(inference.precision or inference.group_size)}",
                got=f"quant.wgts.dtype for {yaml_precision}",
                hint=f"check the YAML belongs to this file, or {hint}",
            )
        chosen_precision = tensor_precision
    elif yaml_precision is not None:
        chosen_precision = yaml_precision
    else:
        raise InferenceError(
            "the tensors do not tell the precision (no W4A4 layer found)",
            code="no-precision",
            hint="pass --precision int4 or --precision nvfp4",
        )
    if group is not None and group != GROUP_SIZE[chosen_precision] and not force:
        raise InferenceError(
            f"precision {chosen_precision} contradicts the tensors' group size",
            code="group-size",
            expected=f"group size {GROUP_SIZE[chosen_precision]}",
            got=f"{group}{_said(inference.group_size)}",
            hint=hint,
        )

    # Rank.
    chosen_rank: int
    if rank is not None:
        wanted_rank = _check_rank(rank, "--rank")
        if tensor_rank is not None and wanted_rank != tensor_rank and not force:
            raise InferenceError(
                f"--rank {wanted_rank} contradicts the tensors",
                code="rank-override",
                expected=f"{tensor_rank}{_said(inference.rank)}",
                got=wanted_rank,
                hint=f"drop --rank, or {hint}",
            )
        if wanted_rank % RANK_MULTIPLE and not force:
            raise InferenceError(
                "--rank is not a multiple of 16 (SVDQuant pads its low-rank branch to 16)",
                code="rank-override",
                got=wanted_rank,
                hint=hint,
            )
        chosen_rank = wanted_rank
    elif tensor_rank is not None:
        if yaml_rank is not None and yaml_rank != tensor_rank and not force:
            raise InferenceError(
                f"{source} says rank {yaml_rank} but the tensors are rank {tensor_rank}",
                code="yaml-rank",
                expected=f"{tensor_rank}{_said(inference.rank)}",
                got=f"quant.wgts.low_rank.rank {yaml_rank}",
                hint=f"check the YAML belongs to this file, or {hint}",
            )
        chosen_rank = tensor_rank
    elif yaml_rank is not None:
        chosen_rank = yaml_rank
    else:
        raise InferenceError(
            "the tensors do not tell the rank (no lora_down / proj_down tensor found)",
            code="no-rank",
            hint="pass --rank (published files use 32 or 128)",
        )
    return chosen_precision, chosen_rank


# --------------------------------------------------------------------------------------------
# Merge and diff


def merge_metadata(existing: Mapping[str, str] | None, new: Mapping[str, str]) -> dict[str, str]:
    """Return the file's metadata with ``new`` applied: owned keys replaced, every other key kept.

    The result lists the entries of ``new`` first (in its order), then the file's other keys in their order.
    A key of ``new`` this tool does not own (:data:`OWNED_KEYS`) is only added when the file lacks it.
    """
    old = dict(existing or {})
    merged: dict[str, str] = {}
    for key, value in new.items():
        merged[key] = value if key in OWNED_KEYS or key not in old else old[key]
    for key, value in old.items():
        merged.setdefault(key, value)
    return merged


ChangeKind = Literal["added", "removed", "changed", "unchanged"]


@dataclass(frozen=True)
class MetadataChange:
    """What happens to one metadata key."""

    key: str
    kind: ChangeKind
    old: str | None
    new: str | None


def metadata_changes(old: Mapping[str, str] | None, new: Mapping[str, str] | None) -> list[MetadataChange]:
    """Return one change per key of either map: old keys in their order, then new keys in theirs."""
    before, after = dict(old or {}), dict(new or {})
    changes: list[MetadataChange] = []
    for key in [*before, *(k for k in after if k not in before)]:
        a, b = before.get(key), after.get(key)
        kind: ChangeKind
        if a is None:
            kind = "added"
        elif b is None:
            kind = "removed"
        else:
            kind = "unchanged" if a == b else "changed"
        changes.append(MetadataChange(key, kind, a, b))
    return changes


def pretty_value(value: str) -> list[str]:
    """Return the lines to show for a metadata value: JSON objects and arrays indented, keys sorted."""
    try:
        parsed = json.loads(value)
    except (json.JSONDecodeError, RecursionError):
        return value.splitlines() or [""]
    if isinstance(parsed, (dict, list)):
        return json.dumps(parsed, indent=2, sort_keys=True, ensure_ascii=False).splitlines()
    return value.splitlines() or [""]


def diff_metadata(old: Mapping[str, str] | None, new: Mapping[str, str] | None, *, context: int = 3) -> list[str]:
    """Return a plain-text unified diff, one section per added, removed or changed key."""
    lines: list[str] = []
    for change in metadata_changes(old, new):
        if change.kind == "unchanged":
            continue
        a = pretty_value(change.old) if change.old is not None else []
        b = pretty_value(change.new) if change.new is not None else []
        if change.kind == "changed" and a == b:
            # Same JSON value written differently (spacing, key order): show the raw text instead.
            a, b = [change.old or ""], [change.new or ""]
        from_name = f"a/__metadata__/{change.key}" if change.old is not None else "/dev/null"
        to_name = f"b/__metadata__/{change.key}" if change.new is not None else "/dev/null"
        import difflib  # dry runs only: the patch path never diffs

        lines.extend(difflib.unified_diff(a, b, fromfile=from_name, tofile=to_name, lineterm="", n=context))
    return lines
