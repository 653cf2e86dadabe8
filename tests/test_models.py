"""The known-model registry: aliases, embedded configs, candidates for header facts, functional identity."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from patcher import models
from patcher.errors import ConfigError
from patcher.facts import MODEL_CLASS, Family

# Tests run from a clone with ``../shared/reference`` beside it (the repo root's parent holds ``shared/``).
REPO_ROOT = Path(__file__).resolve().parents[1]
REFERENCE_CONFIGS = REPO_ROOT.parent / "shared" / "reference" / "configs"
PACKAGE_CONFIGS = REPO_ROOT / "patcher" / "configs"

EXPECTED_NAMES = [
    "flux.1-dev",
    "flux.1-schnell",
    "flux.1-fill-dev",
    "flux.1-canny-dev",
    "flux.1-depth-dev",
    "flux.1-kontext-dev",
    "flux.1-krea-dev",
    "shuttle-jaguar",
    "qwen-image",
    "qwen-image-edit",
    "qwen-image-edit-2509",
    "sana-1600m",
    "z-image-turbo",
    "sdxl",
    "sdxl-turbo",
    "t5-xxl",
]


def test_registry_holds_the_sixteen_models_in_canonical_order() -> None:
    assert [m.name for m in models.all_models()] == EXPECTED_NAMES


ALIASES = [
    # the short name itself
    ("flux.1-dev", "flux.1-dev"),
    # the Hugging Face repo id, and in another case
    ("black-forest-labs/FLUX.1-dev", "flux.1-dev"),
    ("BLACK-FOREST-LABS/flux.1-dev", "flux.1-dev"),
    # the spelling of the repo name
    ("FLUX.1-dev", "flux.1-dev"),
    # common spellings without the ".1" or without the dot
    ("flux-dev", "flux.1-dev"),
    ("flux1-dev", "flux.1-dev"),
    # underscores and spaces count as dashes
    ("flux1_dev", "flux.1-dev"),
    ("  Flux.1 Dev ", "flux.1-dev"),
    # the name inside Nunchaku's published merged files, with and without the extension
    ("svdq-int4_r32-flux.1-dev", "flux.1-dev"),
    ("svdq-fp4_r32-flux.1-dev.safetensors", "flux.1-dev"),
    # a rank the alias list does not spell out: the published-name prefix is stripped
    ("svdq-int4_r128-qwen-image", "qwen-image"),
    # Nunchaku's own repositories, old (mit-han-lab/svdq-*) and new (nunchaku-tech/nunchaku-*)
    ("mit-han-lab/svdq-int4-flux.1-schnell", "flux.1-schnell"),
    ("nunchaku-tech/nunchaku-flux.1-kontext-dev", "flux.1-kontext-dev"),
    ("nunchaku-ai/nunchaku-z-image-turbo", "z-image-turbo"),
    # deepcompressor pipeline.name values
    ("flux.1-schnell", "flux.1-schnell"),
    ("flux.1-canny-dev", "flux.1-canny-dev"),
    ("flux.1-depth-dev", "flux.1-depth-dev"),
    ("flux.1-fill-dev", "flux.1-fill-dev"),
    # repo ids of the control / fill / edit variants
    ("black-forest-labs/FLUX.1-Canny-dev", "flux.1-canny-dev"),
    ("black-forest-labs/FLUX.1-Depth-dev", "flux.1-depth-dev"),
    ("black-forest-labs/FLUX.1-Fill-dev", "flux.1-fill-dev"),
    ("black-forest-labs/FLUX.1-Kontext-dev", "flux.1-kontext-dev"),
    ("black-forest-labs/FLUX.1-Krea-dev", "flux.1-krea-dev"),
    # short spellings of the variants
    ("flux-fill", "flux.1-fill-dev"),
    ("flux1-canny-dev", "flux.1-canny-dev"),
    ("flux-kontext", "flux.1-kontext-dev"),
    ("flux.1-krea", "flux.1-krea-dev"),
    # shuttle-jaguar by name and by repo
    ("shuttleai/shuttle-jaguar", "shuttle-jaguar"),
    ("svdq-int4_r32-shuttle-jaguar", "shuttle-jaguar"),
    # Qwen-Image and its 2509 edit model (the longer name must not fall to the shorter)
    ("Qwen/Qwen-Image", "qwen-image"),
    ("qwen_image", "qwen-image"),
    ("Qwen/Qwen-Image-Edit-2509", "qwen-image-edit-2509"),
    ("svdq-int4_r128-qwen-image-edit-2509", "qwen-image-edit-2509"),
    # SANA 1.6B: the registry's short name, the config file's name, the repo, deepcompressor-style spellings
    ("sana-1600m", "sana-1600m"),
    ("sana-1600m-1024px", "sana-1600m"),
    ("Efficient-Large-Model/Sana_1600M_1024px_BF16_diffusers", "sana-1600m"),
    ("sana-1.6b", "sana-1600m"),
    # Z-Image-Turbo
    ("Tongyi-MAI/Z-Image-Turbo", "z-image-turbo"),
    ("Z-Image-Turbo", "z-image-turbo"),
]


@pytest.mark.parametrize(("alias", "expected"), ALIASES)
def test_alias_resolves(alias: str, expected: str) -> None:
    assert models.lookup(alias).name == expected


@pytest.mark.parametrize("model", models.all_models(), ids=lambda m: m.name)
def test_every_listed_alias_resolves_to_its_own_model(model: models.KnownModel) -> None:
    # The T5 encoder lives in FLUX.1-dev's repository: that repo id names flux.1-dev, not the encoder.
    assert model.name in model.aliases and (model.repo_id in model.aliases) == (model.name != "t5-xxl")
    for alias in model.aliases:
        assert models.lookup(alias) is model, alias
        assert models.lookup(alias.upper()) is model, alias


@pytest.mark.parametrize(
    ("typo", "suggested"),
    [
        # one letter doubled
        ("flux-deev", "flux.1-dev"),
        # one letter missing
        ("flux.1-schnel", "flux.1-schnell"),
        # truncated
        ("qwen-imag", "qwen-image"),
        # misspelt vendor
        ("shutle-jaguar", "shuttle-jaguar"),
    ],
)
def test_unknown_name_suggests_close_ones(typo: str, suggested: str) -> None:
    with pytest.raises(ConfigError) as info:
        models.lookup(typo)
    message = str(info.value)
    assert message.startswith(f"unknown model name {typo!r}")
    assert "Did you mean" in message and suggested in message.split("Known models")[0]


def test_unknown_name_far_from_everything_lists_the_known_models() -> None:
    with pytest.raises(ConfigError) as info:
        models.lookup("stable-cascade")
    message = str(info.value)
    assert "Did you mean" not in message
    assert all(name in message for name in EXPECTED_NAMES)
    assert models.find("stable-cascade") is None


@pytest.mark.parametrize("model", models.all_models(), ids=lambda m: m.name)
def test_model_facts_match_index_and_config(model: models.KnownModel) -> None:
    index = json.loads((PACKAGE_CONFIGS / "index.json").read_text())
    key = "sana-1600m-1024px" if model.name == "sana-1600m" else model.name
    assert model.repo_id == index[key]["repo_id"]
    # The file of the repo the config is: the UNet's for SDXL, the second text encoder's for FLUX.1's T5.
    inside = {Family.SDXL: "unet/config.json", Family.T5: "text_encoder_2/config.json"}
    assert model.repo_file == index[key]["file"] == inside.get(model.family, "transformer/config.json")
    assert model.certainty == index[key]["certainty"]
    assert model.model_class == MODEL_CLASS[model.family]
    if model.embedded_config is None:
        return
    config = json.loads((PACKAGE_CONFIGS / model.embedded_config).read_text())
    assert model.in_channels == config.get("in_channels", 0)
    assert model.guidance_embeds == config.get("guidance_embeds", False)
    if model.family is Family.SDXL:  # every transformer block of the UNet: 2x2 + 2x10 + 1x10 + 3x10 + 3x2
        assert model.num_layers == 70
    else:
        assert model.num_layers == config.get("num_layers", config.get("n_layers"))
    assert model.num_single_layers == config.get("num_single_layers")


VARIANTS = [
    # name, family, in_channels, guidance_embeds, blocks (double, single), embedder width
    ("flux.1-dev", Family.FLUX, 64, True, 19, 38, 64),
    ("flux.1-schnell", Family.FLUX, 64, False, 19, 38, 64),
    # Fill: image + mask latents packed into 384 input channels
    ("flux.1-fill-dev", Family.FLUX, 384, True, 19, 38, 384),
    # Canny / Depth: image + control latents, 128
    ("flux.1-canny-dev", Family.FLUX, 128, True, 19, 38, 128),
    ("flux.1-depth-dev", Family.FLUX, 128, True, 19, 38, 128),
    ("flux.1-kontext-dev", Family.FLUX, 64, True, 19, 38, 64),
    ("flux.1-krea-dev", Family.FLUX, 64, True, 19, 38, 64),
    # no config of its own: the facts are schnell's shape, the stand-in
    ("shuttle-jaguar", Family.FLUX, 64, False, 19, 38, 64),
    ("qwen-image", Family.QWEN_IMAGE, 64, False, 60, None, 64),
    ("qwen-image-edit-2509", Family.QWEN_IMAGE, 64, False, 60, None, 64),
    ("sana-1600m", Family.SANA, 32, False, 20, None, 32),
    # Z-Image's embedder sees 2x2x1 patches of 16 channels: the header shows 64
    ("z-image-turbo", Family.Z_IMAGE, 16, False, 30, None, 64),
]


@pytest.mark.parametrize(("name", "family", "in_ch", "guidance", "layers", "single", "width"), VARIANTS)
def test_variant_facts(
    name: str, family: Family, in_ch: int, guidance: bool, layers: int, single: int | None, width: int
) -> None:
    model = models.lookup(name)
    assert (model.family, model.in_channels, model.guidance_embeds) == (family, in_ch, guidance)
    assert (model.num_layers, model.num_single_layers, model.embedder_width) == (layers, single, width)


def test_shuttle_jaguar_has_no_embedded_config_and_says_so() -> None:
    jaguar = models.lookup("shuttle-jaguar")
    assert jaguar.embedded_config is None
    assert jaguar.stand_in == "flux.1-schnell"
    assert jaguar.certainty.startswith("not known")
    with pytest.raises(ConfigError, match="no verified config of shuttle-jaguar is known"):
        models.embedded_config_text(jaguar)
    with pytest.raises(ConfigError, match="no verified config"):
        models.embedded_config(jaguar)


@pytest.mark.skipif(not REFERENCE_CONFIGS.is_dir(), reason="../shared/reference is not beside this clone")
@pytest.mark.parametrize("model", [m for m in models.all_models() if m.embedded_config], ids=lambda m: m.name)
def test_embedded_config_is_byte_identical_to_reference(model: models.KnownModel) -> None:
    assert model.embedded_config is not None
    if not (REFERENCE_CONFIGS / model.embedded_config).is_file():
        pytest.skip(f"the reference holds no {model.embedded_config} (sourced for issue 15: see index.json)")
    reference = (REFERENCE_CONFIGS / model.embedded_config).read_bytes()
    assert models.embedded_config_text(model).encode("utf-8") == reference


@pytest.mark.skipif(not REFERENCE_CONFIGS.is_dir(), reason="../shared/reference is not beside this clone")
def test_embedded_index_keeps_every_reference_entry() -> None:
    package = json.loads((PACKAGE_CONFIGS / "index.json").read_text())
    reference = json.loads((REFERENCE_CONFIGS / "index.json").read_text())
    assert {key: package.get(key) for key in reference} == reference


@pytest.mark.parametrize("model", [m for m in models.all_models() if m.embedded_config], ids=lambda m: m.name)
def test_embedded_config_text_is_the_package_file(model: models.KnownModel) -> None:
    # Also runs without the reference folder: the text is the package data, byte for byte (no newline translation).
    assert model.embedded_config is not None
    raw = (PACKAGE_CONFIGS / model.embedded_config).read_bytes()
    assert models.embedded_config_text(model).encode("utf-8") == raw
    assert models.embedded_config(model) == json.loads(raw)


def test_embedded_config_returns_a_fresh_copy() -> None:
    dev = models.lookup("flux.1-dev")
    first = models.embedded_config(dev)
    first["in_channels"] = 999
    assert models.embedded_config(dev)["in_channels"] == 64


CANDIDATES = [
    # dev-like: in_channels 64 with a guidance embedder (dev first: the canonical one)
    ((Family.FLUX, 64, True, 19, 38), ["flux.1-dev", "flux.1-kontext-dev", "flux.1-krea-dev"]),
    # schnell-like: no guidance embedder
    ((Family.FLUX, 64, False, 19, 38), ["flux.1-schnell", "shuttle-jaguar"]),
    # Canny / Depth
    ((Family.FLUX, 128, True, 19, 38), ["flux.1-canny-dev", "flux.1-depth-dev"]),
    # Fill
    ((Family.FLUX, 384, True, 19, 38), ["flux.1-fill-dev"]),
    # no known model without guidance at 128 or 384 channels
    ((Family.FLUX, 128, False, 19, 38), []),
    ((Family.FLUX, 384, False, None, None), []),
    # blocks-only Flux file: every Flux model fits
    (
        (Family.FLUX, None, None, 19, 38),
        [
            "flux.1-dev",
            "flux.1-schnell",
            "flux.1-fill-dev",
            "flux.1-canny-dev",
            "flux.1-depth-dev",
            "flux.1-kontext-dev",
            "flux.1-krea-dev",
            "shuttle-jaguar",
        ],
    ),
    # in_channels 64 but the guidance embedder not visible
    (
        (Family.FLUX, 64, None, None, None),
        ["flux.1-dev", "flux.1-schnell", "flux.1-kontext-dev", "flux.1-krea-dev", "shuttle-jaguar"],
    ),
    # a Flux with other block counts (a pruned model) is none of the known ones
    ((Family.FLUX, 64, True, 8, 38), []),
    # family unknown: 64 channels, no guidance also fits Qwen-Image, and Z-Image (its embedder is 64 wide)
    (
        (None, 64, False, None, None),
        ["flux.1-schnell", "shuttle-jaguar", "qwen-image", "qwen-image-edit", "qwen-image-edit-2509", "z-image-turbo"],
    ),
    # Qwen-Image: 60 blocks, no single blocks
    ((Family.QWEN_IMAGE, 64, None, 60, None), ["qwen-image", "qwen-image-edit", "qwen-image-edit-2509"]),
    ((Family.QWEN_IMAGE, 64, None, 60, 0), ["qwen-image", "qwen-image-edit", "qwen-image-edit-2509"]),
    # SDXL: 4 latent channels and 70 UNet transformer blocks fit base and Turbo alike (the name decides)
    ((Family.SDXL, 4, None, 70, None), ["sdxl", "sdxl-turbo"]),
    # T5: 24 encoder blocks; the encoder has no latent input
    ((Family.T5, None, None, 24, None), ["t5-xxl"]),
    ((Family.T5, None, None, 12, None), []),
    # single blocks rule out every non-Flux model
    ((Family.QWEN_IMAGE, None, None, None, 38), []),
    # SANA 1600M
    ((Family.SANA, 32, None, 20, None), ["sana-1600m"]),
    # Z-Image: the header's embedder width (64) or the config's in_channels (16)
    ((Family.Z_IMAGE, 64, None, 30, None), ["z-image-turbo"]),
    ((Family.Z_IMAGE, 16, None, None, None), ["z-image-turbo"]),
    # nothing known: everything fits
    ((None, None, None, None, None), EXPECTED_NAMES),
]


@pytest.mark.parametrize(("facts", "expected"), CANDIDATES)
def test_candidates(
    facts: tuple[Family | None, int | None, bool | None, int | None, int | None], expected: list[str]
) -> None:
    assert [m.name for m in models.candidates(*facts)] == expected


def _load(name: str) -> dict[str, object]:
    loaded: dict[str, object] = json.loads((PACKAGE_CONFIGS / name).read_text())
    return loaded


DEV = _load("flux.1-dev.json")

IDENTICAL = [
    # dev vs Kontext vs Krea: only _diffusers_version, _name_or_path, out_channels null and the default rope differ
    ("flux.1-dev", "flux.1-kontext-dev", True),
    ("flux.1-dev", "flux.1-krea-dev", True),
    ("flux.1-kontext-dev", "flux.1-krea-dev", True),
    # Canny and Depth: the same architecture
    ("flux.1-canny-dev", "flux.1-depth-dev", True),
    # Qwen-Image's first config carries pooled_projection_dim, which the class ignores
    ("qwen-image", "qwen-image-edit-2509", True),
    # the guidance embedder differs
    ("flux.1-dev", "flux.1-schnell", False),
    # input channels differ
    ("flux.1-dev", "flux.1-fill-dev", False),
    ("flux.1-canny-dev", "flux.1-fill-dev", False),
    # different classes
    ("flux.1-schnell", "qwen-image", False),
    ("sana-1600m", "z-image-turbo", False),
    # no verified config: cannot be shown identical
    ("flux.1-schnell", "shuttle-jaguar", False),
]


@pytest.mark.parametrize(("a", "b", "expected"), IDENTICAL)
def test_functionally_identical_known_models(a: str, b: str, expected: bool) -> None:
    left, right = models.lookup(a), models.lookup(b)
    assert models.functionally_identical(left, right) is expected
    assert models.functionally_identical(right, left) is expected


def _with(base: dict[str, object], **changes: object) -> dict[str, object]:
    out = dict(base)
    for key, value in changes.items():
        if value is _DROP:
            out.pop(key, None)
        else:
            out[key] = value
    return out


_DROP = object()

CONFIG_CASES = [
    # bookkeeping fields are ignored
    (_with(DEV, _diffusers_version="0.99.0"), True),
    (_with(DEV, _name_or_path=_DROP), True),
    (_with(DEV, _commit_hash="abc"), True),
    # out_channels null == absent (Flux builds out_channels or in_channels)
    (_with(DEV, out_channels=None), True),
    # ... and == in_channels spelled out
    (_with(DEV, out_channels=64), True),
    # but not another value
    (_with(DEV, out_channels=16), False),
    # the default rope axes spelled out, as a list
    (_with(DEV, axes_dims_rope=[16, 56, 56]), True),
    # other rope axes
    (_with(DEV, axes_dims_rope=[16, 56, 57]), False),
    # defaults spelled out for the other fields
    (_with(DEV, pooled_projection_dim=768, patch_size=1), True),
    # a removed field that has no default equal to dev's value (guidance_embeds default is false)
    (_with(DEV, guidance_embeds=_DROP), False),
    # an architecture field changed
    (_with(DEV, num_single_layers=37), False),
    # an unknown field is compared, not ignored
    (_with(DEV, some_new_flag=True), False),
    # the class matters
    (_with(DEV, _class_name="FluxControlNetModel"), False),
]


@pytest.mark.parametrize(("config", "expected"), CONFIG_CASES)
def test_functionally_identical_configs(config: dict[str, object], expected: bool) -> None:
    assert models.functionally_identical(DEV, config) is expected
    assert models.functionally_identical(config, models.lookup("flux.1-dev")) is expected


def test_qwen_out_channels_null_is_not_the_default() -> None:
    # QwenImageTransformer2DModel defaults out_channels to 16, but builds ``out_channels or in_channels``:
    # an explicit null means 64, not 16.
    qwen = _load("qwen-image-edit-2509.json")
    assert models.functionally_identical(qwen, _with(qwen, out_channels=_DROP))
    assert not models.functionally_identical(qwen, _with(qwen, out_channels=None))


def test_config_differences_names_the_fields() -> None:
    dev, fill = models.lookup("flux.1-dev"), models.lookup("flux.1-fill-dev")
    assert models.config_differences(dev, fill) == ["in_channels"]
    assert models.config_differences(dev, models.lookup("flux.1-schnell")) == ["guidance_embeds"]


HINTS = [
    # nunchaku >= 0.3 merged file names
    ("svdq-int4_r32-flux.1-dev.safetensors", "flux.1-dev"),
    ("svdq-fp4_r32-flux.1-kontext-dev.safetensors", "flux.1-kontext-dev"),
    # the longer alias wins over a shorter one inside it
    ("svdq-int4_r128-qwen-image-edit-2509.safetensors", "qwen-image-edit-2509"),
    ("svdq-int4_r32-qwen-image.safetensors", "qwen-image"),
    # the old repository folder of a deepcompressor conversion
    ("svdq-int4-flux.1-schnell", "flux.1-schnell"),
    # a user's own naming
    ("my_flux1-fill-dev_int4.safetensors", "flux.1-fill-dev"),
    ("shuttle-jaguar-int4.safetensors", "shuttle-jaguar"),
    # names that mention no model
    ("transformer_blocks.safetensors", None),
    ("model.safetensors", None),
    # "dev" alone is not an alias; "flux.1-devil" is not flux.1-dev (word boundary)
    ("dev.safetensors", None),
    ("flux.1-devil.safetensors", None),
]


@pytest.mark.parametrize(("name", "expected"), HINTS)
def test_find_in_name(name: str, expected: str | None) -> None:
    found = models.find_in_name(name)
    assert (found.name if found else None) == expected


def test_find_in_name_refuses_two_different_models_of_equal_length() -> None:
    assert models.find_in_name("flux-dev-vs-flux-fill.safetensors") is None


# --------------------------------------------------------------------------------------------
# The listing of `nunchaku-patch models` and the completion of --model


def test_model_json_comes_from_the_registry_and_index() -> None:
    index = json.loads((PACKAGE_CONFIGS / "index.json").read_text())
    for model in models.all_models():
        record = models.model_json(model)
        assert record["name"] == model.name and record["family"] == model.family.value
        assert record["repo_id"] == model.repo_id and record["model_class"] == MODEL_CLASS[model.family]
        entry = next(e for e in index.values() if (e["repo_id"], e["file"]) == (model.repo_id, model.repo_file))
        assert record["certainty"] == entry["certainty"] and record["repo_file"] == entry["file"]
        assert model.name not in record["aliases"] and model.repo_id not in record["aliases"]
        assert set(record["aliases"]) == set(model.aliases) - {model.name, model.repo_id}
    dev = models.model_json(models.lookup("flux.1-dev"))
    assert dev["embedded_config"] == "flux.1-dev.json" and "flux-dev" in dev["aliases"]


def test_config_note_says_what_ships_or_what_stands_in() -> None:
    assert models.config_note(models.lookup("flux.1-dev")) == "flux.1-dev.json"
    assert models.config_note(models.lookup("shuttle-jaguar")) == "none (flux.1-schnell's stands in)"


def test_completion_offers_names_first_then_aliases_matching_case_insensitively() -> None:
    every = models.completion_names()
    names = [m.name for m in models.all_models()]

    assert every[: len(names)] == names
    assert set(every) == {a for m in models.all_models() for a in m.aliases}
    assert models.completion_names("FLUX.1-D") == ["flux.1-dev", "flux.1-depth-dev", "flux.1-depth"]
    assert "black-forest-labs/FLUX.1-dev" in models.completion_names("black-forest-labs/flux.1-d")
    assert models.completion_names("nothing-like-it") == []


def test_completion_and_listing_follow_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    extra = models.KnownModel(
        name="new-model",
        repo_id="org/New-Model",
        repo_file="transformer/config.json",
        family=Family.SDXL,
        model_class=MODEL_CLASS[Family.SDXL],
        aliases=("new-model", "org/New-Model", "newmodel"),
        embedded_config=None,
        certainty="test",
        in_channels=4,
        guidance_embeds=False,
        num_layers=None,
        num_single_layers=None,
        embedder_width=4,
    )
    known = models.all_models()
    monkeypatch.setattr(models, "all_models", lambda: (*known, extra))

    assert models.completion_names("new") == ["new-model", "newmodel"]


# --------------------------------------------------------------------------------------------
# Issue 15: SDXL, SDXL-Turbo, the T5-XXL encoder, Qwen-Image-Edit, and the derivatives' name rules

NEW_ENTRIES = [
    # name, repo id, file inside the repo, family, a field of the embedded config that identifies it
    ("sdxl", "stabilityai/stable-diffusion-xl-base-1.0", "unet/config.json", Family.SDXL, ("sample_size", 128)),
    ("sdxl-turbo", "stabilityai/sdxl-turbo", "unet/config.json", Family.SDXL, ("sample_size", 64)),
    ("t5-xxl", "black-forest-labs/FLUX.1-dev", "text_encoder_2/config.json", Family.T5, ("d_ff", 10240)),
    ("qwen-image-edit", "Qwen/Qwen-Image-Edit", "transformer/config.json", Family.QWEN_IMAGE, ("num_layers", 60)),
]


@pytest.mark.parametrize(("name", "repo", "inside", "family", "field"), NEW_ENTRIES)
def test_new_entries_have_repo_file_family_and_config(
    name: str, repo: str, inside: str, family: Family, field: tuple[str, object]
) -> None:
    model = models.lookup(name)
    assert (model.name, model.repo_id, model.repo_file, model.family) == (name, repo, inside, family)
    assert model.embedded_config == f"{name}.json" and model.certainty
    key, value = field
    assert models.embedded_config(model)[key] == value


def test_sdxl_config_is_the_exact_published_file() -> None:
    # The Git LFS pointer of stable-diffusion-xl-base-1.0's unet/config.json (public mirror) gives its hash and size.
    import hashlib

    raw = models.embedded_config_text(models.lookup("sdxl")).encode()
    assert len(raw) == 1680
    assert hashlib.sha256(raw).hexdigest() == "30ebc70750223e59006f7f2b4e1e6c102570aa19a9c4ae3e1fbe7591332dbae6"


def test_sdxl_and_turbo_differ_only_where_the_tensors_cannot_see() -> None:
    # Same UNet: only the sample size (1024 px vs 512 px) and spelled-out defaults differ.
    sdxl, turbo = models.lookup("sdxl"), models.lookup("sdxl-turbo")
    assert models.unet_layout(models.embedded_config(sdxl)) == models.unet_layout(models.embedded_config(turbo))
    assert models.config_differences(sdxl, turbo) == ["sample_size"]


def test_unet_layout_of_sdxl() -> None:
    layout = models.unet_layout(models.embedded_config(models.lookup("sdxl")))
    assert layout == (
        ("down_blocks.1", 2, 2),
        ("down_blocks.2", 2, 10),
        ("mid_block", 1, 10),
        ("up_blocks.0", 3, 10),
        ("up_blocks.1", 3, 2),
    )
    assert models.describe_layout(layout).startswith("down_blocks.1: 2x2, down_blocks.2: 2x10")


NAME_RULES = [
    # SDXL base: short name, deepcompressor pipeline.name, Nunchaku's published file and repo
    ("sdxl", "sdxl", None),
    ("svdq-int4_r32-sdxl.safetensors", "sdxl", None),
    ("nunchaku-tech/nunchaku-sdxl", "sdxl", None),
    ("stabilityai/stable-diffusion-xl-base-1.0", "sdxl", None),
    # SDXL-Turbo: the longer name is not taken for "sdxl"
    ("svdq-int4_r32-sdxl-turbo.safetensors", "sdxl-turbo", None),
    ("stabilityai/sdxl-turbo", "sdxl-turbo", None),
    # the T5 encoder: Nunchaku's AWQ file, its repo, and the alias
    ("awq-int4-flux.1-t5xxl.safetensors", "t5-xxl", None),
    ("flux.1-t5xxl", "t5-xxl", None),
    ("mit-han-lab/nunchaku-t5", "t5-xxl", None),
    # Qwen-Image-Edit (first version), any precision and rank
    ("svdq-fp4_r128-qwen-image-edit.safetensors", "qwen-image-edit", None),
    ("Qwen/Qwen-Image-Edit", "qwen-image-edit", None),
    # Qwen-Image Lightning v1.0 (4 steps) and v1.1 (8 steps): Qwen-Image's config
    ("svdq-int4_r32-qwen-image-lightningv1.0-4steps", "qwen-image", "Lightning"),
    ("svdq-int4_r128-qwen-image-lightningv1.1-8steps.safetensors", "qwen-image", "Lightning"),
    # Qwen-Image-Edit Lightning v1.0, 4 and 8 steps: Qwen-Image-Edit's config
    ("svdq-fp4_r32-qwen-image-edit-lightningv1.0-4steps", "qwen-image-edit", "Lightning"),
    ("qwen-image-edit-lightningv1.0-8steps", "qwen-image-edit", "Lightning"),
    # Qwen-Image-Edit-2509 Lightning v2.0, 4 and 8 steps
    ("svdq-int4_r32-qwen-image-edit-2509-lightningv2.0-4steps.safetensors", "qwen-image-edit-2509", "Lightning"),
    ("svdq-int4_r128-qwen-image-edit-2509-lightningv2.0-8steps", "qwen-image-edit-2509", "Lightning"),
    # the 251115 Lightning release of Edit-2509 (lightning-251115/ folder of nunchaku-qwen-image-edit-2509)
    ("svdq-int4_r32-qwen-image-edit-2509-lightning-4steps-251115", "qwen-image-edit-2509", "Lightning"),
    ("svdq-fp4_r128-qwen-image-edit-2509-lightning-8steps-251115", "qwen-image-edit-2509", "Lightning"),
    # FLUX.1-dev Colossus v12: a fine-tune with FLUX.1-dev's config
    ("svdq-int4_r32-flux.1-dev-colossusv12.safetensors", "flux.1-dev", "Colossus"),
    ("svdq-fp4_r32-flux.1-dev-colossusv12", "flux.1-dev", "Colossus"),
]


@pytest.mark.parametrize(("name", "expected", "derived"), NAME_RULES)
def test_name_rules_for_model_names(name: str, expected: str, derived: str | None) -> None:
    assert models.lookup(name).name == expected
    note = models.derived_note(name)
    if derived is None:
        assert note is None
    else:
        assert note is not None and derived in note and f"{expected}'s config is used" in note


@pytest.mark.parametrize(("name", "expected", "derived"), [r for r in NAME_RULES if "/" not in r[0]])
def test_name_rules_for_file_names(name: str, expected: str, derived: str | None) -> None:
    # The same names (repo ids aside) break ties as file names, inside a folder path.
    path = f"models/diffusion_models/{name}"
    found = models.find_in_name(name)
    assert found is not None and found.name == expected
    assert (models.derived_in_name(path) is not None) == (derived is not None)


def test_a_lightning_name_of_an_unknown_base_is_not_mapped() -> None:
    with pytest.raises(ConfigError, match="unknown model name"):
        models.lookup("qwen-image-edit-2511-lightning-4steps")
