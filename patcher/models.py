"""The models nunchaku-patch knows: names and aliases, Hugging Face repos, family, and embedded configs.

Pure apart from reading its own package data (``patcher/configs/*.json``, verbatim copies of the reference configs
and their ``index.json``). Nothing here looks at the user's files or the Hugging Face cache: that is
:mod:`patcher.resolve`.

shuttle-jaguar has no embedded config: no verified copy of ``shuttleai/shuttle-jaguar``'s ``transformer/config.json``
is known. Its architecture is FLUX.1-schnell's (no guidance embedder, ``in_channels`` 64, 19 / 38 blocks), so the
registry records ``stand_in="flux.1-schnell"``; :mod:`patcher.resolve` uses that config for it only when nothing
better is found, and logs the substitution every time.

Not every entry is a diffusion transformer: ``sdxl`` / ``sdxl-turbo`` carry a UNet config (``unet/config.json``) and
``t5-xxl`` the FLUX.1 T5-XXL text encoder's ``T5Config`` (``text_encoder_2/config.json``). Published fine-tunes
and distillations whose architecture is their base model's (Qwen-Image Lightning, FLUX.1-dev Colossus) are name
rules (:data:`DERIVED`): :func:`find` maps them to the base model and :func:`derived_note` says so for the log.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import re
from collections.abc import Mapping
from typing import Any

from ._record import dataclass
from .errors import ConfigError
from .facts import CLASS_DEFAULTS, MODEL_CLASS, Family

#: Package folder holding the verbatim configs and ``index.json``.
CONFIG_PACKAGE = "patcher"
CONFIG_DIR = "configs"
INDEX_FILE = "index.json"

#: Config keys that are diffusers bookkeeping, not architecture (every other ``_``-key except ``_class_name`` too).
BOOKKEEPING_KEYS = frozenset({"_diffusers_version", "_name_or_path"})

#: Keys a class's ``from_config`` drops as unexpected: Qwen-Image's first config carried Flux's
#: ``pooled_projection_dim``, which ``QwenImageTransformer2DModel`` has no parameter for.
CLASS_IGNORED: Mapping[str, frozenset[str]] = {
    "QwenImageTransformer2DModel": frozenset({"pooled_projection_dim"}),
}

#: Classes that build with ``out_channels or in_channels``, so a null ``out_channels`` means ``in_channels``.
OUT_FALLS_BACK_TO_IN = frozenset({"FluxTransformer2DModel", "QwenImageTransformer2DModel"})


@dataclass(frozen=True)
class KnownModel:
    """A base model Nunchaku has a loader for, with where its transformer config lives."""

    #: Short name, e.g. ``flux.1-dev`` (deepcompressor's ``pipeline.name`` where it has one).
    name: str
    #: Hugging Face repository of the base model, e.g. ``black-forest-labs/FLUX.1-dev``.
    repo_id: str
    #: The config inside that repository (``transformer/config.json``, ``unet/config.json``, ...).
    repo_file: str
    family: Family
    #: The Nunchaku class that loads this family (``MODEL_CLASS[family]``).
    model_class: str
    #: Names it answers to, case-insensitively (short name, repo id, pipeline names, published file names, spellings).
    aliases: tuple[str, ...]
    #: File name of the embedded config in ``patcher/configs``; ``None`` when no verified config is known.
    embedded_config: str | None
    #: How sure the embedded copy is (from ``index.json``).
    certainty: str
    #: The diffusers ``in_channels`` (Flux: 64, 128 for Canny/Depth, 384 for Fill; SDXL: 4; T5: 0, no latent input).
    in_channels: int
    #: Whether the model has a guidance embedder (``guidance_embeds``; false when the config has no such field).
    guidance_embeds: bool
    #: Main (Flux: double) blocks; SDXL: every transformer block of the UNet; T5: encoder blocks.
    num_layers: int | None
    #: Flux single blocks; ``None`` for families without them.
    num_single_layers: int | None
    #: Input width of the patch embedder's weight, which is what a header shows (``in_channels`` times the patch
    #: volume for Z-Image, whose ``all_x_embedder`` sees 2x2x1 patches; ``in_channels`` elsewhere).
    embedder_width: int
    #: Known model whose config stands in when this one has none (a documented, logged decision).
    stand_in: str | None = None


@dataclass(frozen=True)
class _Spec:
    name: str
    index_key: str
    family: Family
    aliases: tuple[str, ...]
    stand_in: str | None = None
    #: Whether the repo id names this model (not for a component of another model's repo, like FLUX.1-dev's T5).
    repo_is_alias: bool = True
    #: More aliases (Nunchaku's repositories of the model, when stripping their prefix leaves no known name).
    extra: tuple[str, ...] = ()


def _flux_spellings(variant: str) -> tuple[str, ...]:
    """Return the common spellings of FLUX.1 ``variant`` (``dev``, ``fill-dev``, ...)."""
    variants = [variant]
    if variant.endswith("-dev") and variant != "dev":
        variants.append(variant[: -len("-dev")])
    return tuple(f"{prefix}{v}" for v in variants for prefix in ("flux.1-", "flux-", "flux1-"))


def _published(name: str) -> tuple[str, ...]:
    """Return the file names Nunchaku's published conversions use for ``name``."""
    return (f"svdq-int4_r32-{name}", f"svdq-fp4_r32-{name}", f"svdq-int4-{name}", f"svdq-fp4-{name}")


def _spellings(name: str) -> tuple[str, ...]:
    """Return ``name`` without its hyphens (``qwenimage-edit``, ``sdxlturbo``) besides the published names."""
    return (name.replace("-", ""), *_published(name))


# Registry order matters: among candidates with functionally identical configs, the first is the canonical one.
_SPECS: tuple[_Spec, ...] = (
    _Spec("flux.1-dev", "flux.1-dev", Family.FLUX, _flux_spellings("dev") + _published("flux.1-dev")),
    _Spec("flux.1-schnell", "flux.1-schnell", Family.FLUX, _flux_spellings("schnell") + _published("flux.1-schnell")),
    _Spec(
        "flux.1-fill-dev", "flux.1-fill-dev", Family.FLUX, _flux_spellings("fill-dev") + _published("flux.1-fill-dev")
    ),
    _Spec(
        "flux.1-canny-dev",
        "flux.1-canny-dev",
        Family.FLUX,
        _flux_spellings("canny-dev") + _published("flux.1-canny-dev"),
    ),
    _Spec(
        "flux.1-depth-dev",
        "flux.1-depth-dev",
        Family.FLUX,
        _flux_spellings("depth-dev") + _published("flux.1-depth-dev"),
    ),
    _Spec(
        "flux.1-kontext-dev",
        "flux.1-kontext-dev",
        Family.FLUX,
        _flux_spellings("kontext-dev") + _published("flux.1-kontext-dev"),
    ),
    _Spec(
        "flux.1-krea-dev", "flux.1-krea-dev", Family.FLUX, _flux_spellings("krea-dev") + _published("flux.1-krea-dev")
    ),
    _Spec(
        "shuttle-jaguar",
        "shuttle-jaguar",
        Family.FLUX,
        ("shuttle_jaguar", *_published("shuttle-jaguar")),
        stand_in="flux.1-schnell",
    ),
    _Spec("qwen-image", "qwen-image", Family.QWEN_IMAGE, ("qwenimage", *_published("qwen-image"))),
    _Spec(
        "qwen-image-edit",
        "qwen-image-edit",
        Family.QWEN_IMAGE,
        ("qwenimage-edit", "qwen-image-edit-v1", *_published("qwen-image-edit")),
    ),
    _Spec(
        "qwen-image-edit-2509",
        "qwen-image-edit-2509",
        Family.QWEN_IMAGE,
        ("qwenimage-edit-2509", *_published("qwen-image-edit-2509")),
    ),
    _Spec(
        "sana-1600m",
        "sana-1600m-1024px",
        Family.SANA,
        ("sana-1600m-1024px", "sana-1.6b", "sana-1.6b-1024px", "sana1.6b", *_published("sana-1600m")),
    ),
    _Spec("z-image-turbo", "z-image-turbo", Family.Z_IMAGE, ("zimage-turbo", *_published("z-image-turbo"))),
    # deepcompressor's pipeline.name is "sdxl" / "sdxl-turbo"; Nunchaku publishes svdq-int4_r32-sdxl(-turbo).
    _Spec(
        "sdxl",
        "sdxl",
        Family.SDXL,
        ("sdxl-base", "sdxl-base-1.0", "stable-diffusion-xl-base-1.0", "sd-xl-base-1.0", *_spellings("sdxl")),
    ),
    _Spec("sdxl-turbo", "sdxl-turbo", Family.SDXL, ("sd-xl-turbo", "sd-xl-turbo-1.0", *_spellings("sdxl-turbo"))),
    # nunchaku-tech/nunchaku-t5 publishes awq-int4-flux.1-t5xxl.safetensors (FLUX.1-dev's text_encoder_2).
    _Spec(
        "t5-xxl",
        "t5-xxl",
        Family.T5,
        ("flux.1-t5xxl", "t5xxl", "t5-v1.1-xxl", "t5-v1_1-xxl", "awq-int4-flux.1-t5xxl"),
        repo_is_alias=False,
        extra=("mit-han-lab/nunchaku-t5", "nunchaku-tech/nunchaku-t5", "nunchaku-ai/nunchaku-t5"),
    ),
)


@dataclass(frozen=True)
class DerivedName:
    """A name rule: published weights whose architecture is a known base model's (a distillation, a fine-tune)."""

    #: Matches the whole normalized name (after the published prefix is stripped).
    pattern: re.Pattern[str]
    #: The known model whose config the weights use.
    base: str
    #: What such weights are, for the log ("a Lightning (step-distilled) version").
    what: str


#: Nunchaku's published derivatives (its examples and model repos), each mapped to its base model's config.
DERIVED: tuple[DerivedName, ...] = (
    # svdq-{precision}_r{rank}-qwen-image-lightningv1.0-4steps, -lightningv1.1-8steps (nunchaku-qwen-image)
    DerivedName(
        re.compile(r"qwen-image-lightning(?:v\d+(?:\.\d+)*)?-\d+steps"),
        "qwen-image",
        "a Lightning (step-distilled) version",
    ),
    # -qwen-image-edit-lightningv1.0-{4,8}steps (nunchaku-qwen-image-edit)
    DerivedName(
        re.compile(r"qwen-image-edit-lightning(?:v\d+(?:\.\d+)*)?-\d+steps"),
        "qwen-image-edit",
        "a Lightning (step-distilled) version",
    ),
    # -qwen-image-edit-2509-lightningv2.0-{4,8}steps and lightning-251115/...-lightning-{N}steps-251115
    DerivedName(
        re.compile(r"qwen-image-edit-2509-lightning(?:v\d+(?:\.\d+)*)?-\d+steps(?:-\d{6})?"),
        "qwen-image-edit-2509",
        "a Lightning (step-distilled) version",
    ),
    # svdq-{precision}_r32-flux.1-dev-colossusv12 (nunchaku-flux.1-dev-colossus)
    DerivedName(re.compile(r"flux\.1-dev-colossus(?:v\d+(?:\.\d+)*)?"), "flux.1-dev", "a fine-tune (Colossus)"),
)

# Organisations and prefixes of Nunchaku's own repositories and files, stripped before a second lookup:
# ``mit-han-lab/svdq-int4-flux.1-dev``, ``nunchaku-tech/nunchaku-qwen-image``, ``svdq-fp4_r128-qwen-image``.
_PUBLISHED_PREFIX = re.compile(
    r"^(?:(?:mit-han-lab|nunchaku-tech|nunchaku-ai)/)?(?:nunchaku-|svdq-(?:int4|fp4|nvfp4)(?:-r\d+)?-|awq-int4-)?"
)


def normalize_name(name: str) -> str:
    """Return the comparison key of a model name: lower case, ``_`` and spaces as ``-``, no ``.safetensors``."""
    key = re.sub(r"[\s_]+", "-", name.strip().lower())
    return key.removesuffix(".safetensors")


def _read_package_text(file_name: str) -> str:
    # Bytes then decode: ``read_text`` would translate newlines, and the text must stay byte for byte.
    beside = os.path.join(os.path.dirname(os.path.abspath(__file__)), CONFIG_DIR, file_name)
    if os.path.isfile(beside):  # an ordinary install: no need for importlib.resources (and zipfile) at start-up
        with open(beside, "rb") as f:
            return f.read().decode("utf-8")
    from importlib import resources  # a zipped install

    return (resources.files(CONFIG_PACKAGE) / CONFIG_DIR / file_name).read_bytes().decode("utf-8")


@functools.cache
def _index() -> Mapping[str, Mapping[str, str]]:
    data = json.loads(_read_package_text(INDEX_FILE))
    return {key: dict(value) for key, value in data.items()}


@functools.cache
def _embedded_dict(file_name: str) -> Mapping[str, Any]:
    loaded: dict[str, Any] = json.loads(_read_package_text(file_name))
    return loaded


def unet_layout(config: Mapping[str, Any]) -> tuple[tuple[str, int, int], ...]:
    """Return a UNet2DConditionModel config's cross-attention blocks: ``(block, attentions, transformer blocks)``.

    As diffusers builds them: a down block has ``layers_per_block`` attentions, an up block one more, the mid block
    one; each attention holds ``transformer_layers_per_block`` transformer blocks (reversed for the up blocks unless
    ``reverse_transformer_layers_per_block`` says otherwise; the mid block takes the last down entry).
    """
    down = [str(t) for t in config.get("down_block_types", ())]
    up = [str(t) for t in config.get("up_block_types", ())]
    count = len(down)

    def per_block(value: object, default: int) -> list[int]:
        if isinstance(value, (list, tuple)):
            return [int(v[0] if isinstance(v, (list, tuple)) else v) for v in value]
        return [int(value) if isinstance(value, int) else default] * count

    depth = per_block(config.get("transformer_layers_per_block", 1), 1)
    layers = per_block(config.get("layers_per_block", 2), 2)
    reverse = config.get("reverse_transformer_layers_per_block")
    up_depth = per_block(reverse, 1) if reverse is not None else list(reversed(depth))
    up_layers = list(reversed(layers))
    out: list[tuple[str, int, int]] = []
    for i, kind in enumerate(down):
        if kind.startswith("CrossAttn") and i < len(depth):
            out.append((f"down_blocks.{i}", layers[i], depth[i]))
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") == "UNetMidBlock2DCrossAttn" and depth:
        out.append(("mid_block", 1, depth[-1]))
    for i, kind in enumerate(up):
        if kind.startswith("CrossAttn") and i < len(up_depth):
            out.append((f"up_blocks.{i}", up_layers[i] + 1, up_depth[i]))
    return tuple(out)


def describe_layout(layout: tuple[tuple[str, int, int], ...]) -> str:
    """Return a UNet layout as ``down_blocks.1: 2x2, ..., up_blocks.1: 3x2`` (attentions x transformer blocks)."""
    return ", ".join(f"{block}: {attentions}x{depth}" for block, attentions, depth in layout)


def _variant_facts(config: Mapping[str, Any]) -> tuple[int, bool, int | None, int | None, int]:
    in_channels = int(config.get("in_channels", 0))  # a T5Config has no latent input
    guidance = bool(config.get("guidance_embeds", False))
    layers = config.get("num_layers", config.get("n_layers"))
    if config.get("_class_name") == "UNet2DConditionModel":
        layers = sum(attentions * depth for _, attentions, depth in unet_layout(config))
    single = config.get("num_single_layers")
    width = in_channels
    if "all_patch_size" in config:
        patch = int(config["all_patch_size"][0])
        frames = int(config.get("all_f_patch_size", [1])[0])
        width = in_channels * patch * patch * frames
    return (
        in_channels,
        guidance,
        None if layers is None else int(layers),
        None if single is None else int(single),
        width,
    )


def _build(spec: _Spec) -> KnownModel:
    entry = _index()[spec.index_key]
    file_name = f"{spec.index_key}.json" if spec.stand_in is None else None
    config = _embedded_dict(file_name or f"{spec.stand_in}.json")
    in_channels, guidance, layers, single, width = _variant_facts(config)
    names = (spec.name, *([entry["repo_id"]] if spec.repo_is_alias else []), *spec.aliases, *spec.extra)
    aliases = tuple(dict.fromkeys(names))  # keep order, drop repeats
    return KnownModel(
        name=spec.name,
        repo_id=entry["repo_id"],
        repo_file=entry["file"],
        family=spec.family,
        model_class=MODEL_CLASS[spec.family],
        aliases=aliases,
        embedded_config=file_name,
        certainty=entry["certainty"],
        in_channels=in_channels,
        guidance_embeds=guidance,
        num_layers=layers,
        num_single_layers=single,
        embedder_width=width,
        stand_in=spec.stand_in,
    )


@functools.cache
def _registry() -> tuple[tuple[KnownModel, ...], Mapping[str, KnownModel]]:
    known = tuple(_build(spec) for spec in _SPECS)
    by_alias: dict[str, KnownModel] = {}
    for model in known:
        for alias in model.aliases:
            key = normalize_name(alias)
            other = by_alias.setdefault(key, model)
            if other is not model:
                raise RuntimeError(f"alias {alias!r} names both {other.name} and {model.name}")
    return known, by_alias


def all_models() -> tuple[KnownModel, ...]:
    """Return every known model, canonical ones first within a family."""
    return _registry()[0]


def _derived(name: str) -> tuple[DerivedName, KnownModel] | None:
    """Return the name rule ``name`` (normalized, published prefix stripped or not) follows, with its base model."""
    key = normalize_name(name)
    for candidate in dict.fromkeys((key, _PUBLISHED_PREFIX.sub("", key))):
        for rule in DERIVED:
            if rule.pattern.fullmatch(candidate):
                return rule, _registry()[1][normalize_name(rule.base)]
    return None


def find(name: str) -> KnownModel | None:
    """Return the known model ``name`` designates (an alias, a published Nunchaku name, or a derivative's name
    mapped to its base model by :data:`DERIVED`), or ``None``."""
    by_alias = _registry()[1]
    key = normalize_name(name)
    if key in by_alias:
        return by_alias[key]
    found = by_alias.get(_PUBLISHED_PREFIX.sub("", key))
    if found is not None:
        return found
    derived = _derived(name)
    return derived[1] if derived is not None else None


def derived_note(name: str) -> str | None:
    """Return the log line saying that ``name`` is a derivative using its base model's config, or ``None``."""
    derived = _derived(name)
    if derived is None:
        return None
    rule, base = derived
    short = _PUBLISHED_PREFIX.sub("", normalize_name(name))
    return f"{short!r} is {rule.what} of {base.name}: same architecture, so {base.name}'s config is used"


def lookup(name: str) -> KnownModel:
    """Return the known model ``name`` designates; raise ConfigError with close matches when there is none."""
    model = find(name)
    if model is not None:
        return model
    known, by_alias = _registry()
    key = _PUBLISHED_PREFIX.sub("", normalize_name(name))
    import difflib  # only for the "did you mean" of an unknown name

    close = difflib.get_close_matches(key, list(by_alias), n=10, cutoff=0.6)
    suggestions = list(dict.fromkeys(by_alias[alias].name for alias in close))[:3]
    names = ", ".join(m.name for m in known)
    if suggestions:
        choices = " or ".join([", ".join(suggestions[:-1]), suggestions[-1]] if len(suggestions) > 1 else suggestions)
        hint = f"Did you mean {choices}? Known models: {names}; or pass --config FILE"
    else:
        hint = f"Known models: {names}; or pass a Hugging Face repo id, --model-path DIR or --config FILE"
    raise ConfigError(f"unknown model name {name!r}", hint=hint)


def find_in_name(text: str) -> KnownModel | None:
    """Return the known model a file or folder name mentions, or ``None`` if it mentions none or several."""
    haystack = normalize_name(text)
    spans: list[tuple[int, int, KnownModel]] = []
    for key, model in _registry()[1].items():
        if "/" in key:
            continue
        for match in re.finditer(rf"(?<![a-z0-9]){re.escape(key)}(?![a-z0-9])", haystack):
            spans.append((match.start(), match.end(), model))
    # A mention inside a longer one is part of it ("qwen-image" in "qwen-image-edit-2509"), not a second model.
    outer = [s for s in spans if not any(o[0] <= s[0] and s[1] <= o[1] and o[1] - o[0] > s[1] - s[0] for o in spans)]
    named = {model.name: model for _, _, model in outer}
    if len(named) == 1:
        return next(iter(named.values()))
    derived = {base.name: base for _, base in _derived_mentions(haystack)}
    return next(iter(derived.values())) if len(derived) == 1 else None


def _derived_mentions(haystack: str) -> list[tuple[str, KnownModel]]:
    """Return each derivative name a normalized file name mentions (as written), with its base model."""
    found = []
    for rule in DERIVED:
        match = re.search(rf"(?<![a-z0-9.]){rule.pattern.pattern}(?![a-z0-9.])", haystack)
        if match is not None:
            found.append((match[0], _registry()[1][normalize_name(rule.base)]))
    return found


def derived_in_name(text: str) -> str | None:
    """Return :func:`derived_note` for the derivative a file or folder name mentions, or ``None``."""
    mentions = _derived_mentions(normalize_name(text))
    return derived_note(mentions[0][0]) if mentions else None


def config_note(model: KnownModel) -> str:
    """Return which config ships for ``model``: its embedded file, or the model whose config stands in."""
    if model.embedded_config is not None:
        return model.embedded_config
    if model.stand_in is not None:
        return f"none ({model.stand_in}'s stands in)"
    return "none"


def model_json(model: KnownModel) -> dict[str, Any]:
    """Return what ``nunchaku-patch models --json`` says of ``model`` (from the registry, nothing hard-coded)."""
    return {
        "name": model.name,
        "aliases": [a for a in model.aliases if a not in (model.name, model.repo_id)],
        "repo_id": model.repo_id,
        "repo_file": model.repo_file,
        "family": model.family.value,
        "model_class": model.model_class,
        "embedded_config": model.embedded_config,
        "stand_in": model.stand_in,
        "certainty": model.certainty,
    }


def completion_names(incomplete: str = "") -> list[str]:
    """Return the names ``--model`` accepts that start with ``incomplete`` (case-insensitive): names, then aliases."""
    prefix = incomplete.lower()
    names = [m.name for m in all_models()] + [a for m in all_models() for a in m.aliases]
    return [n for n in dict.fromkeys(names) if n.lower().startswith(prefix)]


def embedded_config_text(model: KnownModel) -> str:
    """Return the raw text of ``model``'s embedded config (formatting kept); raise ConfigError if it has none."""
    if model.embedded_config is None:
        raise ConfigError(
            f"no verified config of {model.name} is known",
            hint=f"Pass --config FILE, --model-path DIR, or --allow-download to fetch {model.repo_id}'s own",
        )
    return _read_package_text(model.embedded_config)


def embedded_config(model: KnownModel) -> dict[str, Any]:
    """Return ``model``'s embedded config parsed (a fresh copy); raise ConfigError if it has none."""
    if model.embedded_config is None:
        embedded_config_text(model)  # raises the message
        raise AssertionError  # unreachable: for mypy
    return copy.deepcopy(dict(_embedded_dict(model.embedded_config)))


def candidates(
    family: Family | None = None,
    in_channels: int | None = None,
    guidance_embeds: bool | None = None,
    num_layers: int | None = None,
    num_single_layers: int | None = None,
) -> list[KnownModel]:
    """Return the known models that fit what a header says; ``None`` means the header does not tell."""
    fits = []
    for model in all_models():
        if family is not None and model.family != family:
            continue
        if in_channels is not None and in_channels not in (model.in_channels, model.embedder_width):
            continue
        if guidance_embeds is not None and guidance_embeds != model.guidance_embeds:
            continue
        if num_layers is not None and num_layers != model.num_layers:
            continue
        if num_single_layers is not None and num_single_layers != (model.num_single_layers or 0):
            continue
        fits.append(model)
    return fits


def architecture(config: Mapping[str, Any]) -> dict[str, Any]:
    """Return the fields of a diffusers config that decide the model built from it, defaults filled in."""
    class_name = config.get("_class_name")
    fields = {k: v for k, v in config.items() if not (k.startswith("_") and k != "_class_name")}
    if isinstance(class_name, str):
        for key in CLASS_IGNORED.get(class_name, ()):
            fields.pop(key, None)
        for key, value in CLASS_DEFAULTS.get(class_name, {}).items():
            fields.setdefault(key, value)
        if class_name in OUT_FALLS_BACK_TO_IN and fields.get("out_channels") is None:
            fields["out_channels"] = fields.get("in_channels")
    # JSON has no tuples, but a caller may pass a config built in Python.
    return {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()}


def _as_config(item: KnownModel | Mapping[str, Any]) -> Mapping[str, Any] | None:
    if isinstance(item, KnownModel):
        return None if item.embedded_config is None else _embedded_dict(item.embedded_config)
    return item


def config_differences(a: KnownModel | Mapping[str, Any], b: KnownModel | Mapping[str, Any]) -> list[str]:
    """Return the architecture fields on which two configs differ (sorted); a model with no config differs on all."""
    left, right = _as_config(a), _as_config(b)
    if left is None or right is None:
        return ["<no verified config>"]
    fa, fb = architecture(left), architecture(right)
    return sorted(k for k in fa.keys() | fb.keys() if k not in fa or k not in fb or fa[k] != fb[k])


def functionally_identical(a: KnownModel | Mapping[str, Any], b: KnownModel | Mapping[str, Any]) -> bool:
    """Return whether two configs build the same model (bookkeeping fields and spelled-out defaults ignored)."""
    return not config_differences(a, b)
