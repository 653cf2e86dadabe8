"""Pure validation: replay what each Nunchaku / ComfyUI-nunchaku loader reads from ``__metadata__``.

The reads are those of ``nunchaku-contract.md`` section 2. Each loader is described once (:data:`LOADERS`) by
what it reads; every check then emits findings scoped to the loaders that actually read the field, so a
verdict per loader says whether that loader would accept the file and why not. A wrong value that no loader
reads is still reported, as a warning on the file.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Final, Literal, NamedTuple

from . import models
from ._record import dataclass
from .facts import MODEL_CLASS, Fact, Family, Finding, Inference, Severity
from .inspect import REQUIRED_UNQUANTIZED, T5_LOADER_GROUP_SIZE
from .metadata import (
    COMFY_FLUX_CLASSES,
    DEFAULT_LOADER_RANK,
    FAMILY_ENTRY_KEYS,
    FLUX_DEFAULTS,
    GROUP_SIZE,
    WEIGHT_DTYPE,
    precision_of_weight_dtype,
)

#: Scope of a finding that concerns the file as a whole (every loader).
FILE_SCOPE: Final = "file"
#: Flux's guidance embedder: an unquantized layer the file needs when the config has ``guidance_embeds``.
GUIDANCE_EMBEDDER: Final = "time_text_embed.guidance_embedder"

#: The diffusers / transformers class a config must name for each family.
CONFIG_CLASS: Final[Mapping[Family, str]] = {
    Family.FLUX: "FluxTransformer2DModel",
    Family.QWEN_IMAGE: "QwenImageTransformer2DModel",
    Family.Z_IMAGE: "ZImageTransformer2DModel",
    Family.SANA: "SanaTransformer2DModel",
    Family.SDXL: "UNet2DConditionModel",
    Family.T5: "T5EncoderModel",
}

#: ``model_class`` values a file may carry for each family (merge_safetensors >= 1.1 takes it as an argument).
KNOWN_MODEL_CLASSES: Final[Mapping[Family, frozenset[str]]] = {
    family: frozenset({name, "NunchakuFluxTransformer2DModelV2"} if family is Family.FLUX else {name})
    for family, name in MODEL_CLASS.items()
}


@dataclass(frozen=True)
class Loader:
    """What one loader reads from ``__metadata__`` (contract section 2)."""

    key: str
    title: str
    reads_config: bool = True
    #: "required": ``metadata["quantization_config"]``; "optional": ``.get`` with defaults; "ignored".
    quantization: Literal["required", "optional", "ignored"] = "optional"
    #: Checks ``weight.dtype`` (the C++ engine against the GPU; ComfyUI's Qwen/Z-Image loaders).
    reads_dtype: bool = False
    #: Requires ``group_size == 16`` with fp4 (ComfyUI's Qwen/Z-Image loaders).
    reads_group_size: bool = False
    #: Takes the rank from ``lora_down.shape[1]`` instead of ``qc.get("rank", 32)``.
    rank_from_tensors: bool = False
    reads_skip_refiners: bool = False
    reads_comfy_config: bool = False
    #: Detects the model by this exact ``model_class`` (ComfyUI's T5 loader).
    needs_model_class: str | None = None


_FLUX_V1 = Loader(
    "nunchaku",
    "NunchakuFluxTransformer2dModel",
    quantization="required",
    reads_dtype=True,
    rank_from_tensors=True,
)
_FLUX_V2 = Loader("nunchaku-v2", "NunchakuFluxTransformer2DModelV2")
# ComfyUI-nunchaku's Flux loader builds the model through NunchakuFluxTransformer2dModel, then reads comfy_config.
_COMFY_FLUX = dataclasses.replace(
    _FLUX_V1, key="comfyui-nunchaku", title="ComfyUI-nunchaku Flux loader", reads_comfy_config=True
)


def _comfy_dit(name: str) -> Loader:
    return Loader(
        "comfyui-nunchaku",
        f"ComfyUI-nunchaku {name} loader",
        reads_config=False,
        quantization="required",
        reads_dtype=True,
        reads_group_size=True,
    )


#: The loaders checked for each family, by verdict key.
LOADERS: Final[Mapping[Family, tuple[Loader, ...]]] = {
    Family.FLUX: (_FLUX_V1, _FLUX_V2, _COMFY_FLUX),
    Family.QWEN_IMAGE: (Loader("nunchaku", MODEL_CLASS[Family.QWEN_IMAGE]), _comfy_dit("Qwen-Image")),
    Family.Z_IMAGE: (
        Loader("nunchaku", MODEL_CLASS[Family.Z_IMAGE], reads_skip_refiners=True),
        _comfy_dit("Z-Image"),
    ),
    Family.SANA: (Loader("nunchaku", MODEL_CLASS[Family.SANA], quantization="ignored"),),
    # from_pretrained: _build_model -> json.loads(metadata["config"]); json.loads(metadata.get("quantization_config",
    # "{}")).get("rank", 32); precision from the GPU. ComfyUI-nunchaku has no SDXL loader.
    Family.SDXL: (Loader("nunchaku", MODEL_CLASS[Family.SDXL]),),
    # from_pretrained: T5Config(**json.loads(metadata["config"])), W4Linear(group_size=128) for every layer with a
    # qweight. ComfyUI-nunchaku's text-encoder loader takes the file only when metadata.get("model_class") ==
    # "NunchakuT5EncoderModel", then builds it through that same from_pretrained (so it reads the config too).
    Family.T5: (
        Loader("nunchaku", MODEL_CLASS[Family.T5], quantization="ignored"),
        Loader(
            "comfyui-nunchaku",
            "ComfyUI-nunchaku T5 loader",
            quantization="ignored",
            needs_model_class=MODEL_CLASS[Family.T5],
        ),
    ),
}
#: When the family cannot be told: what every Nunchaku single-file loader does at least.
GENERIC_LOADERS: Final = (Loader("nunchaku", "Nunchaku single-file loader"),)


class Check(NamedTuple):
    """One line of the verbose validator output."""

    name: str
    passed: bool
    detail: str = ""
    #: When the check did not pass: the worst severity it found (a warning or an error).
    severity: Severity | None = None
    #: Why the check did not run (its input is absent, e.g. "no quantization_config"); nothing was found wrong.
    skipped: str | None = None


@dataclass(frozen=True)
class Verdict:
    """Whether one loader would accept the file, and why not."""

    loader: str
    title: str
    ok: bool
    reasons: tuple[str, ...] = ()


@dataclass(frozen=True)
class Report:
    """The result of validating a file's metadata against every loader of its family."""

    family: Family | None
    findings: tuple[Finding, ...]
    verdicts: dict[str, Verdict]
    checks: tuple[Check, ...]

    @property
    def ok(self) -> bool:
        """Return whether no finding is an error."""
        return not any(f.severity is Severity.ERROR for f in self.findings)

    @property
    def needs_work(self) -> bool:
        """Return whether patching would fix something (an error or a warning)."""
        return any(f.severity is not Severity.INFO for f in self.findings)

    def by_code(self, code: str) -> list[Finding]:
        """Return the findings with this code."""
        return [f for f in self.findings if f.code == code]


def scope_loaders(scope: str) -> tuple[str, ...]:
    """Return the loader keys a finding's scope names (empty for the whole file)."""
    return () if scope == FILE_SCOPE else tuple(scope.split(","))


# --------------------------------------------------------------------------------------------
# Config against the tensor table


def _fact_source(fact: Fact[Any]) -> str:
    if fact.evidence:
        return f" ({fact.evidence[0]})"
    if fact.note:
        return f" ({fact.note})"
    return ""


def _int_field(config: Mapping[str, Any], key: str, defaults: Mapping[str, Any]) -> int | None:
    value = config.get(key, defaults.get(key))
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return None


def config_family(config: Mapping[str, Any]) -> Family | None:
    """Return the family a config's ``_class_name`` (or transformers ``architectures``) names."""
    names = [config.get("_class_name")]
    if isinstance(config.get("architectures"), list):
        names.extend(config["architectures"])
    for family, class_name in CONFIG_CLASS.items():
        if class_name in names:
            return family
    return None


def check_config_against_header(
    config: Mapping[str, Any], inference: Inference, *, scope: str = FILE_SCOPE
) -> list[Finding]:
    """Return the contradictions between a config and what the tensor table says (errors), if any."""
    findings: list[Finding] = []

    def mismatch(code: str, field: str, got: object, fact: Fact[Any], what: str) -> None:
        findings.append(
            Finding(
                Severity.ERROR,
                code,
                f"config {field} does not match the tensors: {what} "
                f"(expected {json.dumps(fact.value)}{_fact_source(fact)}, got {json.dumps(got)})",
                scope,
            )
        )

    named = config_family(config)
    family = inference.family.value if inference.family else named
    if inference.family is not None:
        class_name = config.get("_class_name")
        if named is not None and named is not family:
            findings.append(
                Finding(
                    Severity.ERROR,
                    "config-family",
                    f"config is for another model family: the tensors are {family} "
                    f"(expected {CONFIG_CLASS[inference.family.value]}{_fact_source(inference.family)}, "
                    f"got {class_name or config.get('architectures')})",
                    scope,
                )
            )
            return findings  # the field names mean other things: comparing them would only add noise
        if named is None and isinstance(class_name, str):
            findings.append(
                Finding(
                    Severity.ERROR,
                    "config-family",
                    f"config names an unknown model class for {family} weights "
                    f"(expected {CONFIG_CLASS[inference.family.value]}, got {class_name})",
                    scope,
                )
            )
            return findings
        if named is None:
            findings.append(
                Finding(
                    Severity.INFO,
                    "config-no-class",
                    f"config has no _class_name (expected {CONFIG_CLASS[inference.family.value]}); "
                    "the loaders do not need it",
                    scope,
                )
            )

    defaults: Mapping[str, Any] = FLUX_DEFAULTS if family is Family.FLUX else {}
    layers_key = "n_layers" if family is Family.Z_IMAGE else "num_layers"
    if inference.num_layers is not None:
        layers = _int_field(config, layers_key, defaults)
        if layers is not None and layers != inference.num_layers.value:
            blocks = "double blocks" if family is Family.FLUX else "layers"
            mismatch(
                "config-num-layers",
                layers_key,
                layers,
                inference.num_layers,
                f"the file has {inference.num_layers.value} {blocks}",
            )
    if family is Family.FLUX and inference.num_single_layers is not None:
        single = _int_field(config, "num_single_layers", defaults)
        if single is not None and single != inference.num_single_layers.value:
            mismatch(
                "config-num-single-layers",
                "num_single_layers",
                single,
                inference.num_single_layers,
                f"the file has {inference.num_single_layers.value} single blocks",
            )
    if family in (Family.FLUX, Family.QWEN_IMAGE, Family.SDXL) and inference.in_channels is not None:
        channels = _int_field(config, "in_channels", defaults)
        if channels is not None and channels != inference.in_channels.value:
            embedder = inference.in_channels.evidence[0] if inference.in_channels.evidence else "the input embedder"
            mismatch(
                "config-in-channels",
                "in_channels",
                channels,
                inference.in_channels,
                f"{embedder.removesuffix('.weight')} takes {inference.in_channels.value} input channels",
            )
    if family is Family.SDXL and inference.unet_layout is not None and "down_block_types" in config:
        expected = models.unet_layout(config)
        if expected != inference.unet_layout.value:
            findings.append(
                Finding(
                    Severity.ERROR,
                    "config-unet-layout",
                    "config UNet layout does not match the tensors (attentions x transformer blocks: expected "
                    f"{models.describe_layout(inference.unet_layout.value)}{_fact_source(inference.unet_layout)}, "
                    f"got {models.describe_layout(expected) or 'no cross-attention block'})",
                    scope,
                )
            )
    if family is Family.FLUX and inference.guidance_embeds is not None:
        guidance = config.get("guidance_embeds", defaults["guidance_embeds"])
        if isinstance(guidance, bool) and guidance != inference.guidance_embeds.value:
            what = (
                "the file has a guidance embedder (a guidance-distilled, dev-like model)"
                if inference.guidance_embeds.value
                else "the file has no guidance embedder (a schnell-like model)"
            )
            mismatch("config-guidance", "guidance_embeds", guidance, inference.guidance_embeds, what)
    if family is Family.T5 and inference.hidden_size is not None:
        d_model = _int_field(config, "d_model", {})
        if d_model is not None and d_model != inference.hidden_size.value:
            mismatch(
                "config-hidden-size",
                "d_model",
                d_model,
                inference.hidden_size,
                f"the encoder's attention layers take {inference.hidden_size.value} inputs",
            )
    elif inference.hidden_size is not None:
        heads = _int_field(config, "num_attention_heads", defaults)
        head_dim = _int_field(config, "attention_head_dim", defaults)
        width = heads * head_dim if heads is not None and head_dim is not None else _int_field(config, "dim", {})
        if width is not None and width != inference.hidden_size.value:
            field = "num_attention_heads * attention_head_dim" if heads is not None else "dim"
            mismatch(
                "config-hidden-size",
                field,
                width,
                inference.hidden_size,
                f"the quantized layers are {inference.hidden_size.value} wide",
            )
    return findings


# --------------------------------------------------------------------------------------------
# Metadata against every loader


class _Run:
    """Collects findings and check lines while the validation runs."""

    def __init__(self, loaders: Sequence[Loader]) -> None:
        self.loaders = tuple(loaders)
        self.findings: list[Finding] = []
        self.checks: list[Check] = []
        self._mark = 0

    def add(self, severity: Severity, code: str, message: str, loaders: Sequence[Loader] | None) -> None:
        """Add a finding for ``loaders`` (``None``: the whole file)."""
        scope = FILE_SCOPE if loaders is None else ",".join(loader.key for loader in loaders)
        self.findings.append(Finding(severity, code, message, scope))

    def wrong(self, code: str, message: str, readers: Sequence[Loader]) -> None:
        """Report a wrong value: an error for the loaders that read it, a warning on the file if none does."""
        if readers:
            self.add(Severity.ERROR, code, message, readers)
        else:
            self.add(Severity.WARNING, code, f"{message} (no loader reads it, but it should be truthful)", None)

    def check(self, name: str, detail: str = "", *, skipped: str | None = None) -> None:
        """Close a check line: passed when no error or warning was added since the last one.

        ``skipped``: the check could not run, and why (its input is absent); a finding added meanwhile wins.
        """
        new = self.findings[self._mark :]
        bad = [f for f in new if f.severity is not Severity.INFO]
        if bad:
            worst = next((f for f in bad if f.severity is Severity.ERROR), bad[0])
            self.checks.append(Check(name, False, worst.message, worst.severity))
        else:
            self.checks.append(Check(name, True, detail, skipped=skipped))
        self._mark = len(self.findings)

    def select(self, predicate: Callable[[Loader], bool]) -> list[Loader]:
        """Return the loaders for which ``predicate(loader)`` is true."""
        return [loader for loader in self.loaders if predicate(loader)]


def _parse_json(text: str) -> tuple[Any, str | None]:
    try:
        return json.loads(text), None
    except json.JSONDecodeError as exc:
        return None, f"{exc.msg} at character {exc.pos}"
    except RecursionError:
        return None, "nested too deeply"


def _family_of(metadata: Mapping[str, str] | None, inference: Inference) -> tuple[Family | None, str]:
    if inference.family is not None:
        return inference.family.value, "from the tensors"
    if metadata:
        for family, names in KNOWN_MODEL_CLASSES.items():
            if metadata.get("model_class") in names:
                return family, "from model_class (the tensors do not tell)"
        config, _ = _parse_json(metadata.get("config", ""))
        if isinstance(config, dict) and config_family(config) is not None:
            return config_family(config), "from the config (the tensors do not tell)"
    return None, "unknown"


def validate_metadata(metadata: Mapping[str, str] | None, inference: Inference) -> Report:
    """Check ``metadata`` against what every loader of the file's family reads, and against the tensors."""
    family, family_source = _family_of(metadata, inference)
    run = _Run(LOADERS[family] if family is not None else GENERIC_LOADERS)

    if family is None:
        run.add(
            Severity.ERROR,
            "unknown-family",
            "cannot tell which model this is (no Flux, Qwen-Image, Z-Image, SANA, SDXL or T5 tensor names, "
            "no known model_class or config class)",
            None,
        )
    run.check("model family", f"{family} ({family_source})" if family else "unknown")
    _check_tensors(run, inference)
    _check_unquantized(run, metadata, inference, family)

    if metadata is None:
        _no_metadata(run)
        for name in _READS:
            run.check(name, skipped="no __metadata__")
        return _report(run, family)
    run.check("metadata present", f"{len(metadata)} entries")
    run.checks.append(Check("fields found", True, ", ".join(metadata) or "none"))

    _required_fields(run, metadata)
    _check_config(run, metadata, inference)
    _check_quantization_config(run, metadata, inference, family)
    _check_model_class(run, metadata, family)
    if family is Family.FLUX:
        _check_comfy_config(run, metadata, inference)
    return _report(run, family)


#: The checks of what the loaders read, reported as skipped when there is no metadata to read them from.
_READS = (
    "config is valid JSON",
    "config matches the tensors",
    "quantization_config is valid JSON",
    "weight.dtype matches the tensors",
    "rank matches the tensors",
)


def _check_tensors(run: _Run, inference: Inference) -> None:
    for contradiction in inference.contradictions:
        run.add(Severity.ERROR, "tensor-contradiction", f"the tensor table contradicts itself: {contradiction}", None)
    if not inference.quantized:
        run.add(
            Severity.WARNING,
            "not-quantized",
            "no SVDQuant layer (W4A4 qweight with a low-rank branch) in this file: "
            "no Nunchaku loader can load it on its own",
            None,
        )
    group = inference.group_size
    family = inference.family.value if inference.family is not None else None
    if family is Family.T5 and group is not None and group.value != T5_LOADER_GROUP_SIZE:
        run.add(
            Severity.ERROR,
            "t5-group-size",
            f"the T5 encoder's AWQ layers use group size {group.value}{_fact_source(group)}, but "
            f"NunchakuT5EncoderModel builds every W4Linear with group_size={T5_LOADER_GROUP_SIZE}: loading fails "
            f"with a size mismatch on scales (expected {T5_LOADER_GROUP_SIZE}, got {group.value})",
            run.loaders,
        )
    facts = [
        f"{name} {fact.value}"
        for name, fact in (("precision", inference.precision), ("rank", inference.rank))
        if fact is not None
    ]
    run.check("tensor table is consistent", ", ".join(facts))


def missing_unquantized_message(inference: Inference, config: Mapping[str, Any] | None) -> str | None:
    """Return why a file lacking its family's unquantized layers cannot load (``None``: nothing is missing).

    The layers come from :attr:`Inference.missing_unquantized`, plus Flux's guidance embedder when ``config``
    has ``guidance_embeds`` and the tensors cannot show it.
    """
    if not inference.missing_unquantized:
        return None
    family = inference.family.value if inference.family is not None else None
    missing = list(inference.missing_unquantized)
    if (
        family is Family.FLUX
        and inference.guidance_embeds is None
        and config is not None
        and config.get("guidance_embeds") is True
    ):
        missing.append(GUIDANCE_EMBEDDER)
    kind = "holds only the quantized blocks" if not inference.has_unquantized else "is incomplete"
    symptom = (
        "Nunchaku's Flux V2 class fails with AssertionError, the V1 class loads it with those weights silently "
        "uninitialised"
        if family is Family.FLUX
        else "no loader can build the model without them"
    )
    return f"{kind}: the unquantized layers {', '.join(missing)} are missing ({symptom})"


def _check_unquantized(
    run: _Run, metadata: Mapping[str, str] | None, inference: Inference, family: Family | None
) -> None:
    """A file without the family's unquantized layers (a deepcompressor half) fails every loader."""
    config, _ = _parse_json((metadata or {}).get("config", "null"))
    message = missing_unquantized_message(inference, config if isinstance(config, dict) else None)
    if message is not None:
        run.add(Severity.ERROR, "missing-unquantized", f"the file {message}", None)
        run.check("unquantized layers present")
    elif family is None or family in REQUIRED_UNQUANTIZED:
        run.check("unquantized layers present", skipped=None if family else "the model family is unknown")
    else:
        run.check("unquantized layers present", skipped=f"the layers a {family} file needs are not listed")


def _no_metadata(run: _Run) -> None:
    by_class = run.select(lambda loader: loader.needs_model_class is not None)
    if by_class:
        run.add(
            Severity.ERROR,
            "no-metadata",
            f"the header has no __metadata__: {by_class[0].title} does not recognise the file "
            f"(model_class != {by_class[0].needs_model_class!r}) and loads it as a plain, unquantized model, "
            "whose weights are not in it",
            by_class,
        )
    config_readers = run.select(lambda loader: loader.reads_config and loader.needs_model_class is None)
    others = run.select(lambda loader: not loader.reads_config and loader.needs_model_class is None)
    if config_readers:
        run.add(
            Severity.ERROR,
            "no-metadata",
            'the header has no __metadata__: json.loads(metadata["config"]) fails with '
            "TypeError: 'NoneType' object is not subscriptable",
            config_readers,
        )
    if others:
        run.add(
            Severity.ERROR,
            "no-metadata",
            "the header has no __metadata__: metadata.get(...) fails with "
            "AttributeError: 'NoneType' object has no attribute 'get'",
            others,
        )
    run.check("metadata present")


def _required_fields(run: _Run, metadata: Mapping[str, str]) -> None:
    if "config" not in metadata:
        run.add(
            Severity.ERROR,
            "missing-config",
            'metadata has no "config": json.loads(metadata["config"]) fails with KeyError: \'config\'',
            run.select(lambda loader: loader.reads_config),
        )
    if "quantization_config" not in metadata:
        required = run.select(lambda loader: loader.quantization == "required")
        if required:
            names = ", ".join(loader.title for loader in required)
            run.add(
                Severity.ERROR,
                "missing-quantization-config",
                f'metadata has no "quantization_config", which {names} require(s) '
                "(KeyError: 'quantization_config'; weight.dtype has no default)",
                required,
            )
    if "comfy_config" not in metadata:
        comfy = run.select(lambda loader: loader.reads_comfy_config)
        if comfy:
            run.add(
                Severity.ERROR,
                "missing-comfy-config",
                'metadata has no "comfy_config": json.loads(metadata.get("comfy_config")) fails with '
                "TypeError: the JSON object must be str, bytes or bytearray, not NoneType",
                comfy,
            )
    for loader in run.loaders:
        if loader.needs_model_class and "model_class" not in metadata:
            run.add(
                Severity.ERROR,
                "missing-model-class",
                f'metadata has no "model_class": {loader.title} detects the model by '
                f"model_class == {loader.needs_model_class!r}",
                [loader],
            )
    needed = sorted(
        {"config" for loader in run.loaders if loader.reads_config}
        | {"quantization_config" for loader in run.loaders if loader.quantization == "required"}
        | {"comfy_config" for loader in run.loaders if loader.reads_comfy_config}
        | {"model_class" for loader in run.loaders if loader.needs_model_class}
    )
    run.check("required fields present", ", ".join(needed))


def _check_config(run: _Run, metadata: Mapping[str, str], inference: Inference) -> None:
    if "config" not in metadata:
        run.check("config is valid JSON", skipped="no config")
        run.check("config matches the tensors", skipped="no config")
        return
    readers = run.select(lambda loader: loader.reads_config)
    config, error = _parse_json(metadata["config"])
    if error is not None:
        run.wrong("config-not-json", f'"config" is not valid JSON ({error}): json.loads fails', readers)
    elif not isinstance(config, dict):
        run.wrong(
            "config-not-object",
            f'"config" is not a JSON object (expected an object, got {type(config).__name__}): from_config fails',
            readers,
        )
    run.check("config is valid JSON", f"an object with {len(config)} keys" if isinstance(config, dict) else "")
    if isinstance(config, dict):
        scope = ",".join(loader.key for loader in readers) or FILE_SCOPE
        for finding in check_config_against_header(config, inference, scope=scope):
            if finding.severity is Severity.ERROR and not readers:
                finding = dataclasses.replace(finding, severity=Severity.WARNING)
            run.findings.append(finding)
        run.check("config matches the tensors", str(config.get("_class_name", "")))


def _check_quantization_config(
    run: _Run, metadata: Mapping[str, str], inference: Inference, family: Family | None
) -> None:
    readers = run.select(lambda loader: loader.quantization != "ignored")
    text = metadata.get("quantization_config")
    if family is Family.T5:
        # AWQ W4A16: no SVDQuant setting applies, and neither T5 loader reads the key.
        run.check("quantization_config", "not read by the T5 loaders" if text is None else "present, not read")
        return
    qc: Any = None
    if text is not None:
        qc, error = _parse_json(text)
        if error is not None:
            run.wrong("quantization-config-not-json", f'"quantization_config" is not valid JSON ({error})', readers)
            qc = None
        elif not isinstance(qc, dict):
            run.wrong(
                "quantization-config-not-object",
                f'"quantization_config" is not a JSON object (got {type(qc).__name__})',
                readers,
            )
            qc = None
    run.check("quantization_config is valid JSON", skipped="no quantization_config" if text is None else None)
    if text is None and not readers:
        return
    if qc is not None or text is None:
        # An absent quantization_config reads as {} for the loaders that .get() from it.
        qc_map: Mapping[str, Any] = qc if isinstance(qc, dict) else {}
        _check_weight(run, qc_map, inference, present=qc is not None)
        _check_rank(run, qc_map, inference)
        if family is Family.Z_IMAGE:
            _check_skip_refiners(run, qc_map, inference)


def _check_weight(run: _Run, qc: Mapping[str, Any], inference: Inference, *, present: bool) -> None:
    dtype_readers = run.select(lambda loader: loader.reads_dtype)
    weight = qc.get("weight")
    dtype = weight.get("dtype") if isinstance(weight, dict) else None
    declared = precision_of_weight_dtype(dtype)
    tensor_precision = inference.precision.value if inference.precision else None
    if not present:
        pass  # a missing quantization_config was reported with the required fields
    elif not isinstance(weight, dict):
        run.wrong(
            "bad-weight-dtype",
            f'quantization_config has no "weight" object (got {json.dumps(weight)}): qc["weight"]["dtype"] fails',
            dtype_readers,
        )
    elif declared is None:
        run.wrong(
            "bad-weight-dtype",
            f"quantization_config weight.dtype is not one Nunchaku knows "
            f'(expected "int4" or "fp4_e2m1_all", got {json.dumps(dtype)})',
            dtype_readers,
        )
    elif tensor_precision is not None and declared != tensor_precision:
        run.wrong(
            "precision-mismatch",
            f"quantization_config weight.dtype does not match the tensors: they are {tensor_precision} "
            f"(expected {json.dumps(WEIGHT_DTYPE[tensor_precision])}"
            f"{_fact_source(inference.precision) if inference.precision else ''}, got {json.dumps(dtype)})",
            dtype_readers,
        )
    run.check(
        "weight.dtype matches the tensors",
        f"{dtype} ({tensor_precision or 'tensors do not tell'})" if present else "",
        skipped=None if present else "no quantization_config",
    )

    if present and isinstance(weight, dict):
        group = weight.get("group_size")
        precision = tensor_precision or declared
        expected = inference.group_size.value if inference.group_size else None
        if expected is None and precision is not None:
            expected = GROUP_SIZE[precision]
        group_readers = run.select(lambda loader: loader.reads_group_size and precision == "nvfp4")
        if expected is not None and group != expected:
            run.wrong(
                "group-size-mismatch",
                f"quantization_config weight.group_size does not match the tensors "
                f"(expected {expected}, got {json.dumps(group)})",
                group_readers,
            )
        run.check("group_size matches the tensors", f"{group}")


def _check_rank(run: _Run, qc: Mapping[str, Any], inference: Inference) -> None:
    # Loaders that take qc.get("rank", 32); the Flux C++ engine reads the rank off lora_down instead.
    readers = run.select(lambda loader: loader.quantization != "ignored" and not loader.rank_from_tensors)
    tensor_rank = inference.rank.value if inference.rank else None
    source = _fact_source(inference.rank) if inference.rank else ""
    rank = qc.get("rank")
    if "rank" not in qc:
        if tensor_rank is not None and tensor_rank != DEFAULT_LOADER_RANK:
            run.wrong(
                "missing-rank",
                f'quantization_config has no "rank": the loader defaults to {DEFAULT_LOADER_RANK} but the '
                f"tensors are rank {tensor_rank}{source}, so loading fails with a shape mismatch "
                f'(expected "rank": {tensor_rank}, got no rank)',
                readers,
            )
        elif readers:
            run.add(
                Severity.WARNING,
                "missing-rank",
                f'quantization_config has no "rank"; the loaders\' default {DEFAULT_LOADER_RANK} '
                + ("matches the tensors" if tensor_rank is not None else "is assumed (the tensors do not tell)"),
                readers,
            )
    elif not isinstance(rank, int) or isinstance(rank, bool) or rank <= 0:
        run.wrong(
            "bad-rank",
            f"quantization_config rank is not a positive integer (got {json.dumps(rank)})",
            readers,
        )
    elif tensor_rank is not None and rank != tensor_rank:
        run.wrong(
            "rank-mismatch",
            f"quantization_config rank does not match the tensors (expected {tensor_rank}{source}, got {rank})",
            readers,
        )
    run.check("rank matches the tensors", f"{rank} (tensors: {tensor_rank})")


def _check_skip_refiners(run: _Run, qc: Mapping[str, Any], inference: Inference) -> None:
    readers = run.select(lambda loader: loader.reads_skip_refiners)
    expected = inference.skip_refiners.value if inference.skip_refiners else None
    value = qc.get("skip_refiners")
    if "skip_refiners" not in qc:
        if expected:
            run.wrong(
                "missing-skip-refiners",
                'quantization_config has no "skip_refiners": the loader defaults to false and expects '
                'quantized refiner layers, which the file does not have (expected "skip_refiners": true)',
                readers,
            )
        else:
            run.add(
                Severity.WARNING,
                "missing-skip-refiners",
                'quantization_config has no "skip_refiners"; the loader\'s default false '
                + ("matches the tensors" if expected is not None else "is assumed (the tensors do not tell)"),
                readers,
            )
    elif not isinstance(value, bool):
        run.wrong("bad-skip-refiners", f"skip_refiners is not a boolean (got {json.dumps(value)})", readers)
    elif expected is not None and value != expected:
        source = _fact_source(inference.skip_refiners) if inference.skip_refiners else ""
        run.wrong(
            "skip-refiners-mismatch",
            f"quantization_config skip_refiners does not match the tensors "
            f"(expected {json.dumps(expected)}{source}, got {json.dumps(value)})",
            readers,
        )
    run.check("skip_refiners matches the tensors", f"{value} (tensors: {expected})")


def _check_model_class(run: _Run, metadata: Mapping[str, str], family: Family | None) -> None:
    value = metadata.get("model_class")
    if family is None:
        run.check("model_class", str(value))
        return
    known = KNOWN_MODEL_CLASSES[family]
    strict = [loader for loader in run.loaders if loader.needs_model_class]
    if value is None:
        if not strict and "model_class" in FAMILY_ENTRY_KEYS[family]:
            run.add(
                Severity.WARNING,
                "missing-model-class",
                f'metadata has no "model_class" (merge_safetensors writes {MODEL_CLASS[family]!r})',
                None,
            )
    elif value not in known:
        message = f"model_class does not name the {family} class (expected {MODEL_CLASS[family]}, got {value})"
        if strict:
            run.add(Severity.ERROR, "model-class-mismatch", message, strict)
        else:
            run.add(Severity.WARNING, "model-class-mismatch", message, None)
    run.check("model_class", str(value))


def _check_comfy_config(run: _Run, metadata: Mapping[str, str], inference: Inference) -> None:
    readers = run.select(lambda loader: loader.reads_comfy_config)
    text = metadata.get("comfy_config")
    if text is None:
        run.check("comfy_config is valid JSON", skipped="no comfy_config")
        return
    comfy, error = _parse_json(text)
    if error is not None:
        run.wrong("comfy-config-not-json", f'"comfy_config" is not valid JSON ({error})', readers)
    elif not isinstance(comfy, dict):
        run.wrong(
            "comfy-config-not-object", f'"comfy_config" is not a JSON object (got {type(comfy).__name__})', readers
        )
    run.check("comfy_config is valid JSON")
    if not isinstance(comfy, dict):
        return

    model_class = comfy.get("model_class")
    if "model_class" not in comfy:
        run.wrong(
            "comfy-config-no-model-class",
            f'comfy_config has no "model_class" (got {text[:40]}): ComfyUI-nunchaku fails with '
            "KeyError: 'model_class'",
            readers,
        )
        run.check("comfy_config model_class", "absent")
        return  # the loader stops at this KeyError: nothing after it is read
    if model_class not in COMFY_FLUX_CLASSES:
        run.wrong(
            "comfy-config-bad-model-class",
            f"comfy_config model_class is not a ComfyUI Flux class "
            f'(expected "Flux" or "FluxSchnell", got {json.dumps(model_class)})',
            readers,
        )
    elif inference.guidance_embeds is not None:
        expected_class = "Flux" if inference.guidance_embeds.value else "FluxSchnell"
        if model_class != expected_class:
            run.wrong(
                "comfy-config-model-class",
                f"comfy_config model_class does not match the tensors' guidance embedder "
                f"(expected {expected_class}{_fact_source(inference.guidance_embeds)}, got {model_class})",
                readers,
            )
    run.check("comfy_config model_class", str(model_class))

    model_config = comfy.get("model_config")
    guidance: object = None
    if not isinstance(model_config, dict):
        run.wrong(
            "comfy-config-no-model-config",
            f"comfy_config has no \"model_config\" object (got {json.dumps(model_config)}): KeyError: 'model_config'",
            readers,
        )
    else:
        guidance = model_config.get("guidance_embed")
        if "guidance_embed" not in model_config:
            run.wrong(
                "comfy-config-no-guidance-embed",
                "comfy_config model_config has no \"guidance_embed\": KeyError: 'guidance_embed'",
                readers,
            )
        elif not isinstance(guidance, bool):
            run.wrong(
                "comfy-config-guidance",
                f"comfy_config guidance_embed is not a boolean (got {json.dumps(guidance)})",
                readers,
            )
        elif inference.guidance_embeds is not None and guidance != inference.guidance_embeds.value:
            run.wrong(
                "comfy-config-guidance",
                f"comfy_config guidance_embed does not match the tensors "
                f"(expected {json.dumps(inference.guidance_embeds.value)}"
                f"{_fact_source(inference.guidance_embeds)}, got {json.dumps(guidance)})",
                readers,
            )
        elif model_class in COMFY_FLUX_CLASSES and guidance != (model_class == "Flux"):
            run.wrong(
                "comfy-config-guidance",
                f"comfy_config guidance_embed contradicts its model_class "
                f"(expected {json.dumps(model_class == 'Flux')} for {model_class}, got {json.dumps(guidance)})",
                readers,
            )
    run.check("comfy_config guidance_embed", json.dumps(guidance))

    if isinstance(model_config, dict):
        if model_config.get("disable_unet_model_creation") is not True:
            run.add(
                Severity.WARNING,
                "comfy-config-unet-creation",
                'comfy_config model_config lacks "disable_unet_model_creation": true; older ComfyUI-nunchaku '
                "versions then build a full-precision Flux model first",
                readers,
            )
        _comfy_vs_tensors(run, model_config, inference, readers)
    run.check("comfy_config matches the tensors")


def _comfy_vs_tensors(run: _Run, model_config: Mapping[str, Any], inference: Inference, readers: list[Loader]) -> None:
    pairs: list[tuple[str, Fact[int] | None, int]] = [
        ("depth", inference.num_layers, 1),
        ("depth_single_blocks", inference.num_single_layers, 1),
        ("hidden_size", inference.hidden_size, 1),
        # ComfyUI counts latent channels; diffusers packs 2x2 patches into them.
        ("in_channels", inference.in_channels, 4),
    ]
    for key, fact, factor in pairs:
        value = model_config.get(key)
        if fact is None or not isinstance(value, int) or isinstance(value, bool):
            continue
        if value * factor != fact.value:
            expected = fact.value // factor if fact.value % factor == 0 else f"{fact.value}/{factor}"
            run.wrong(
                "comfy-config-mismatch",
                f"comfy_config model_config {key} does not match the tensors "
                f"(expected {expected}{_fact_source(fact)}, got {value})",
                readers,
            )


def _report(run: _Run, family: Family | None) -> Report:
    verdicts: dict[str, Verdict] = {}
    for loader in run.loaders:
        reasons = tuple(
            f.message
            for f in run.findings
            if f.severity is Severity.ERROR and (f.scope == FILE_SCOPE or loader.key in scope_loaders(f.scope))
        )
        verdicts[loader.key] = Verdict(loader.key, loader.title, not reasons, reasons)
    return Report(family, tuple(run.findings), verdicts, tuple(run.checks))
