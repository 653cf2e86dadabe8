"""Where a model's config comes from: the only module that reads config files, YAMLs and the Hugging Face cache.

Precedence (the first that applies wins; every step is logged):

1. ``config_file``: a diffusers ``config.json``, kept byte for byte;
2. ``model_path``: a local diffusers folder (``DIR/transformer/config.json`` or ``DIR/config.json``), or a repo id
   resolved like step 4;
3. ``config_yaml``: deepcompressor YAMLs composed in order (``pipeline.path``, else ``pipeline.name``);
4. ``model``: a known name or a repo id, through the local Hugging Face cache (the network only with
   ``allow_download``);
5. the embedded config of a known model (when step 4 found nothing);
6. nothing named: the header's facts pick among the known models (the file name may break ties); when the
   candidates' configs differ, refuse and ask for ``--model``.

The svdquant YAMLs' rank and weight dtype are returned as :class:`YamlFacts` whenever YAMLs are given, whichever
step supplied the config, so the caller can cross-check them against the tensors.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field, replace
from pathlib import Path
from typing import Any

from . import models
from ._record import dataclass
from .errors import ConfigError, PatchError
from .facts import Fact, Family, Inference, Precision, config_kind
from .models import KnownModel

#: What to pass when a config file is unusable (the family is not known yet when a file is read).
CONFIG_HINT = "Pass the model's config.json (transformer/config.json; SDXL: unet/; T5: text_encoder_2/)"


def folder_configs(family: Family | None) -> tuple[str, ...]:
    """Return the files a folder or repo may hold the family's config in: its own component first (``unet/`` for
    SDXL, ``text_encoder_2/`` for FLUX.1's T5), then ``config.json``; the transformer's when the family is unknown."""
    return (config_kind(family)[1], "config.json")


#: deepcompressor's ``quant.wgts.dtype`` for each SVDQuant precision.
YAML_DTYPES: Mapping[str, Precision] = {"sint4": "int4", "sfp4_e2m1_all": "nvfp4"}

# A Hugging Face repo id: ``owner/name`` (letters, digits, ``-``, ``_``, ``.``), no path separators beyond the one.
_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*")
_BOM = "\ufeff"


@dataclass(frozen=True)
class HeaderFacts:
    """What the tensor table says about the model; ``None`` where it does not tell."""

    family: Family | None = None
    in_channels: int | None = None
    guidance_embeds: bool | None = None
    num_layers: int | None = None
    num_single_layers: int | None = None

    @classmethod
    def from_inference(cls, inference: Inference) -> HeaderFacts:
        """Return the facts an :class:`~patcher.facts.Inference` holds."""

        def value(fact: Fact[Any] | None) -> Any:
            return None if fact is None else fact.value

        return cls(
            family=value(inference.family),
            in_channels=value(inference.in_channels),
            guidance_embeds=value(inference.guidance_embeds),
            num_layers=value(inference.num_layers),
            num_single_layers=value(inference.num_single_layers),
        )

    def describe(self) -> str:
        """Return the facts as a short phrase for log lines and errors."""
        parts = []
        if self.family is not None:
            parts.append(f"family {self.family}")
        if self.in_channels is not None:
            parts.append(f"in_channels {self.in_channels}")
        if self.guidance_embeds is not None:
            parts.append("guidance embedder " + ("present" if self.guidance_embeds else "absent"))
        if self.num_layers is not None and self.num_single_layers:
            parts.append(f"{self.num_layers} double and {self.num_single_layers} single blocks")
        elif self.num_layers is not None:
            parts.append(f"{self.num_layers} blocks")
        return ", ".join(parts) or "nothing recognisable"


@dataclass(frozen=True)
class ConfigRequest:
    """Every way the user may name a config; empty fields are skipped."""

    config_file: str | os.PathLike[str] | None = None
    model_path: str | os.PathLike[str] | None = None
    config_yaml: Sequence[str | os.PathLike[str]] = ()
    model: str | None = None
    allow_download: bool = False
    #: The safetensors file being patched (its name, or its path: the parent folder's name is a hint too).
    filename: str | os.PathLike[str] | None = None
    facts: HeaderFacts = field(default_factory=HeaderFacts)


@dataclass(frozen=True)
class YamlFacts:
    """What deepcompressor YAMLs say, after composing them (later files override earlier ones)."""

    files: tuple[str, ...]
    pipeline_name: str | None = None
    pipeline_path: str | None = None
    #: The files that set ``pipeline.name`` / ``pipeline.path`` (errors name them; a relative path is also
    #: tried relative to its file's folder).
    pipeline_name_file: str | None = None
    pipeline_path_file: str | None = None
    #: ``quant.wgts.low_rank.rank``.
    rank: int | None = None
    #: ``quant.wgts.dtype`` as written (``sint4``, ``sfp4_e2m1_all``, ...).
    weight_dtype: str | None = None
    #: The SVDQuant precision that dtype means, when it is one.
    precision: Precision | None = None


@dataclass(frozen=True)
class ResolvedConfig:
    """A transformer config, where it came from, and the log of how it was found."""

    #: The raw JSON text (from a file: byte for byte, a UTF-8 byte order mark removed).
    text: str
    config: dict[str, Any]
    #: Short description of the source, e.g. ``embedded config of flux.1-dev``.
    source: str
    model: KnownModel | None
    log: tuple[str, ...]
    yaml_facts: YamlFacts | None = None


@dataclass(frozen=True)
class _Found:
    text: str
    config: dict[str, Any]
    source: str
    model: KnownModel | None


class _Log:
    """Collect log lines and forward each to the caller's sink as it happens."""

    def __init__(self, sink: Callable[[str], None]) -> None:
        self.lines: list[str] = []
        self._sink = sink

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        self._sink(line)


def hf_cache_dir() -> Path:
    """Return the Hugging Face hub cache folder, reading ``HF_HUB_CACHE`` / ``HF_HOME`` now (not at import)."""
    env = os.environ
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if env.get(var):
            return Path(os.path.expandvars(env[var])).expanduser()
    home = env.get("HF_HOME") or os.path.join(env.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(os.path.expandvars(home)).expanduser() / "hub"


def _offline() -> bool:
    # Read now, not huggingface_hub's import-time constant, so a change of environment is honoured.
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in {"1", "ON", "YES", "TRUE"}


#: Seconds to wait for the Hub to answer a connection before calling the network down.
PROBE_TIMEOUT = 3.0


def _endpoint() -> tuple[str, int]:
    """Return the Hub's host and port (``HF_ENDPOINT``, default https://huggingface.co)."""
    from urllib.parse import urlsplit  # only when the network is asked for (as socket and logging below)

    parsed = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    return parsed.hostname or "huggingface.co", parsed.port or (80 if parsed.scheme == "http" else 443)


def network_problem() -> str | None:
    """Return why the Hub cannot be reached (one TCP connection, a few seconds at most), or ``None``.

    huggingface_hub retries a failing download with back-off for a long time, and logs each retry: without a
    network, one quick connection attempt first is the difference between a second and minutes.
    """
    import socket

    host, port = _endpoint()
    try:
        socket.create_connection((host, port), PROBE_TIMEOUT).close()
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        return f"Cannot reach {host}:{port} ({reason})"
    return None


def parse_config_text(text: str, *, source: str | os.PathLike[str]) -> dict[str, Any]:
    """Return a diffusers config parsed from ``text``; raise ConfigError naming ``source`` when it is not one."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(
            f"config is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})",
            path=source,
            hint=CONFIG_HINT,
        ) from exc
    if not isinstance(value, dict):
        raise ConfigError("config is not a JSON object", path=source, expected="an object", got=type(value).__name__)
    class_name = value.get("_class_name")
    if isinstance(class_name, str) and class_name.endswith("Pipeline"):
        raise ConfigError(
            f"this is a pipeline's model_index.json ({class_name}), not a model config",
            path=source,
            hint="Pass the config.json of its transformer/ (SDXL: unet/, T5: text_encoder_2/) folder, "
            "or the pipeline folder with --model-path",
        )
    return value


def read_config_file(path: str | os.PathLike[str]) -> tuple[str, dict[str, Any]]:
    """Return the raw text and the parsed dict of a config.json; raise ConfigError naming it when unusable."""
    where = Path(path)
    if where.is_dir():
        raise ConfigError(
            "is a folder, not a config.json", path=where, hint="Pass a folder with --model-path, or the file in it"
        )
    try:
        raw = where.read_bytes()
    except FileNotFoundError as exc:
        raise ConfigError("config file not found", path=where, hint="Check the path") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read config file ({exc.strerror or exc})", path=where) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"config is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})",
            path=where,
            hint=CONFIG_HINT,
        ) from exc
    # json.loads rejects a BOM, and so would Nunchaku reading the metadata: drop it, keep the rest as is.
    text = text.removeprefix(_BOM)
    return text, parse_config_text(text, source=where)


# --- deepcompressor YAML --------------------------------------------------------------------------------------------


def _merge(into: dict[str, Any], update: Mapping[str, Any]) -> None:
    """Merge ``update`` into ``into`` the way deepcompressor composes configs: mappings recursively, rest replaced."""
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(into.get(key), dict):
            _merge(into[key], value)
        elif isinstance(value, Mapping):
            into[key] = {}
            _merge(into[key], value)
        else:
            into[key] = value


def _dig(data: Mapping[str, Any], dotted: str) -> tuple[bool, Any]:
    node: Any = data
    for part in dotted.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return False, None
        node = node[part]
    return True, node


def _load_yaml(path: Path) -> dict[str, Any]:
    try:
        import yaml
    except ImportError as exc:
        raise ConfigError(
            "reading deepcompressor YAML needs PyYAML, which is not installed",
            path=path,
            hint="Run: pip install pyyaml",
        ) from exc
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError("YAML file not found", path=path, hint="Check the path") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read YAML file ({exc})", path=path) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1} column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"not valid YAML ({problem}{where})", path=path) from exc
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError("YAML is not a mapping", path=path, expected="a mapping", got=type(data).__name__)
    return data


def read_yaml_facts(paths: Sequence[str | os.PathLike[str]], *, log: Callable[[str], None]) -> YamlFacts:
    """Compose deepcompressor YAMLs (later override earlier) and return what they say about the model."""
    files = [Path(p) for p in paths]
    loaded = [(f, _load_yaml(f)) for f in files]
    merged: dict[str, Any] = {}
    for f, data in loaded:
        _merge(merged, data)
        log(f"Read deepcompressor config {f}")

    def origin(dotted: str) -> Path:
        # The last file that sets a value is the one an error about it should name.
        return next((f for f, data in reversed(loaded) if _dig(data, dotted)[0]), files[-1])

    def text_value(dotted: str) -> str | None:
        present, value = _dig(merged, dotted)
        if not present or value is None:
            return None
        if not isinstance(value, str) or not value.strip():
            raise ConfigError(f"{dotted} is not a name", path=origin(dotted), expected="a string", got=repr(value))
        return value.strip()

    name = text_value("pipeline.name")
    where = text_value("pipeline.path")
    weight_dtype = text_value("quant.wgts.dtype")
    present, rank = _dig(merged, "quant.wgts.low_rank.rank")
    if present and rank is not None and (isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0):
        raise ConfigError(
            "quant.wgts.low_rank.rank is not a positive integer",
            path=origin("quant.wgts.low_rank.rank"),
            got=repr(rank),
        )
    precision = YAML_DTYPES.get(weight_dtype) if weight_dtype else None
    facts = YamlFacts(
        files=tuple(str(f) for f in files),
        pipeline_name=name,
        pipeline_path=where,
        pipeline_name_file=str(origin("pipeline.name")) if name else None,
        pipeline_path_file=str(origin("pipeline.path")) if where else None,
        rank=rank if present else None,
        weight_dtype=weight_dtype,
        precision=precision,
    )
    said = [f"pipeline.name {name!r}" if name else "", f"pipeline.path {where!r}" if where else ""]
    if weight_dtype:
        meaning = precision or "not an SVDQuant 4-bit format"
        said.append(f"quant.wgts.dtype {weight_dtype!r} ({meaning})")
    if facts.rank is not None:
        said.append(f"rank {facts.rank}")
    log("deepcompressor config says: " + (", ".join(s for s in said if s) or "nothing about the model"))
    return facts


# --- sources --------------------------------------------------------------------------------------------------------


def _quiet_find(name: str | None) -> KnownModel | None:
    return models.find(name) if name else None


def _from_folder(folder: Path, label: KnownModel | None, log: _Log, family: Family | None) -> _Found:
    files = folder_configs(family or (label.family if label is not None else None))
    for relative in files:
        candidate = folder / relative
        if candidate.is_file():
            text, config = read_config_file(candidate)
            log(f"Loaded config from {candidate}")
            return _Found(text, config, f"local folder {folder} ({relative})", label or _quiet_find(folder.name))
    raise ConfigError(
        f"no {config_kind(family or (label.family if label is not None else None))[0]} in this folder",
        path=folder,
        expected=" or ".join(files),
        hint="Pass a diffusers model folder, or the config with --config FILE",
    )


def _from_hub(
    repo_id: str, files: Sequence[str], allow_download: bool, log: _Log, failed: list[str] | None = None
) -> _Found | None:
    """Return the config of ``repo_id`` from the local cache, or downloaded when allowed; ``None`` when neither.

    ``failed``: where to put the line saying why an allowed download did not happen (the caller adds what it
    falls back to); without it the line is logged.
    """
    say = failed.append if failed is not None else log
    cache = hf_cache_dir()
    # Importing huggingface_hub costs ~0.2 s, more than the whole patch: skip it when the cache cannot hold the
    # repo at all (its folder, named by the library's own layout, is absent) and no download is allowed.
    # (Ids with "--" or ".." are left to the library, which rejects them with its own message.)
    folder = cache / ("models--" + repo_id.replace("/", "--"))
    plain_id = "--" not in repo_id and ".." not in repo_id
    try:
        present = folder.is_dir()
    except OSError as exc:  # a cache we may not read is a cache without the model
        log(f"warning: cannot read the Hugging Face cache {cache} ({exc.strerror or exc}); trying the next source")
        return None
    if plain_id and not allow_download and not present:
        log(f"{repo_id} has no {' or '.join(files)} in the local Hugging Face cache ({cache})")
        return None
    import huggingface_hub as hub

    for relative in files:
        try:
            hit = hub.try_to_load_from_cache(repo_id, relative, cache_dir=cache)
        except ValueError as exc:  # HFValidationError is a ValueError
            raise ConfigError(f"not a valid Hugging Face repo id: {repo_id!r} ({exc})") from exc
        except OSError as exc:
            log(f"warning: cannot read the Hugging Face cache {cache} ({exc.strerror or exc}); trying the next source")
            return None
        if isinstance(hit, str):
            snapshot = Path(hit)
            for _ in Path(relative).parts:
                snapshot = snapshot.parent
            log(f"Found model snapshot at {snapshot}")
            text, config = read_config_file(hit)
            log(f"Loaded config from {hit}")
            return _Found(text, config, f"Hugging Face cache: {repo_id} ({relative})", None)
    log(f"{repo_id} has no {' or '.join(files)} in the local Hugging Face cache ({cache})")
    if not allow_download:
        return None
    if _offline():
        say(f"HF_HUB_OFFLINE=1 is set: not downloading {repo_id}")
        return None
    problem = network_problem()
    if problem is not None:
        say(f"{problem}: not downloading {repo_id}")
        return None
    import logging

    failures = []
    # The library's own warnings (retries, symlink notes) would break our one-line output; errors still raise.
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    for relative in files:
        log(f"Downloading {relative} from {repo_id}")
        try:
            fetched = hub.hf_hub_download(repo_id, relative, cache_dir=cache, etag_timeout=PROBE_TIMEOUT)
        # huggingface_hub raises many types across versions (HTTP, gated repo, entry not found, offline): all mean
        # "not available", and the message says which.
        except Exception as exc:
            failures.append(f"{relative}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            continue
        text, config = read_config_file(fetched)
        log(f"Loaded config from {fetched}")
        return _Found(text, config, f"Hugging Face Hub download: {repo_id} ({relative})", None)
    say(f"Download from {repo_id} failed ({'; '.join(failures)})")
    return None


def _from_known(model: KnownModel, allow_download: bool, log: _Log) -> _Found:
    """Return ``model``'s config: the Hugging Face cache (or Hub when allowed), else the embedded copy."""
    failed: list[str] = []
    found = _from_hub(model.repo_id, (model.repo_file,), allow_download, log, failed)
    if failed:
        fallback = model.name if model.embedded_config is not None else model.stand_in
        log(f"{failed[0]}; using the embedded config of {fallback}")
    if found is not None:
        differences = models.config_differences(found.config, model) if model.embedded_config else []
        if differences:
            log(f"Note: it differs from the embedded copy of {model.name} on {', '.join(differences)}")
        return _Found(found.text, found.config, found.source, model)
    if model.embedded_config is not None:
        log(f"Using the embedded config of {model.name} ({model.repo_id} {model.repo_file}; {model.certainty})")
        text = models.embedded_config_text(model)
        return _Found(text, models.embedded_config(model), f"embedded config of {model.name}", model)
    stand_in = models.lookup(model.stand_in) if model.stand_in else None
    if stand_in is None or stand_in.embedded_config is None:
        models.embedded_config_text(model)  # raises: no config at all
        raise AssertionError  # unreachable: for mypy
    log(
        f"No verified config of {model.name} is known; using {stand_in.name}'s embedded config as a stand-in "
        f"(same architecture: in_channels {model.in_channels}, guidance_embeds "
        f"{str(model.guidance_embeds).lower()}, {model.num_layers}/{model.num_single_layers} blocks). "
        + (
            f"Pass --config FILE, or --allow-download for {model.repo_id}'s own"
            if not allow_download
            else "Pass --config FILE for its own" + (" (HF_HUB_OFFLINE=1 forbids downloading)" if _offline() else "")
        )
    )
    return _Found(
        models.embedded_config_text(stand_in),
        models.embedded_config(stand_in),
        f"embedded config of {stand_in.name} (stand-in for {model.name})",
        model,
    )


def _from_name(name: str, allow_download: bool, log: _Log, *, what: str, family: Family | None = None) -> _Found:
    """Resolve a model name or repo id (steps 4 and 5)."""
    model = models.find(name)
    note = models.derived_note(name)
    if note is not None:
        log(note)
    if model is not None:
        if models.normalize_name(name) == models.normalize_name(model.repo_id):
            log(f"{what} {name!r} is the known model {model.name}")
        else:
            log(f"Mapped {what} {name!r} to {model.repo_id}")
        return _from_known(model, allow_download, log)
    if _REPO_ID.fullmatch(name):
        log(f"{what} {name!r} is not a known model; treating it as a Hugging Face repo id")
        files = folder_configs(family)
        found = _from_hub(name, files, allow_download, log)
        if found is None:
            raise ConfigError(
                f"no config for {name} found (no {' or '.join(files)} in the local Hugging Face "
                f"cache {hf_cache_dir()}" + (")" if allow_download else ", and downloading was not allowed)"),
                hint=(
                    "Pass --allow-download, --model-path DIR or --config FILE"
                    if not allow_download
                    else "Pass --model-path DIR or --config FILE"
                    + ("; HF_HUB_OFFLINE=1 forbids downloading (unset it to download)" if _offline() else "")
                ),
            )
        return found
    models.lookup(name)  # raises with close matches
    raise AssertionError  # unreachable: for mypy


def _local_path(raw: str | os.PathLike[str], base: Path | None = None) -> Path | None:
    """Return ``raw`` as an existing local path (relative to the working folder, else to ``base``), or ``None``."""
    path = Path(raw).expanduser()
    if path.exists():
        return path
    if base is not None and not path.is_absolute() and (base / path).exists():
        return base / path
    return None


def _from_model_path(
    raw: str | os.PathLike[str],
    request: ConfigRequest,
    log: _Log,
    *,
    base: Path | None = None,
    label: KnownModel | None = None,
    what: str = "--model-path",
) -> _Found:
    """Resolve a local diffusers folder (or config file), else a repo id (step 2, and ``pipeline.path``)."""
    local = _local_path(raw, base)
    if local is not None and local.is_dir():
        log(f"{what}: using local folder {local}")
        return _from_folder(local, label or _quiet_find(request.model), log, request.facts.family)
    if local is not None:
        text, config = read_config_file(local)
        log(f"Loaded config from {local}")
        return _Found(text, config, f"config file {local}", label or _quiet_find(request.model))
    name = os.fspath(raw)
    if _REPO_ID.fullmatch(name) and not name.startswith((".", "/", "~")):
        found = _from_name(name, request.allow_download, log, what=what, family=request.facts.family)
        return found if found.model is not None else replace(found, model=label)
    raise ConfigError(
        f"{what} is neither a folder nor a Hugging Face repo id",
        path=name,
        hint="Pass a diffusers folder (with transformer/config.json) or a repo id like black-forest-labs/FLUX.1-dev",
    )


def _from_yaml(facts: YamlFacts, request: ConfigRequest, log: _Log) -> _Found:
    """Resolve ``pipeline.path`` / ``pipeline.name`` of composed deepcompressor YAMLs (step 3)."""
    named: KnownModel | None = None
    if facts.pipeline_name is not None:
        try:
            named = models.lookup(facts.pipeline_name)
        except PatchError as exc:
            raise exc.with_path(facts.pipeline_name_file or facts.files[-1]) from None
        log(f"Mapped pipeline.name {facts.pipeline_name!r} to {named.repo_id}")
    if facts.pipeline_path is not None:
        base = Path(facts.pipeline_path_file or facts.files[-1]).parent
        return _from_model_path(facts.pipeline_path, request, log, base=base, label=named, what="pipeline.path")
    assert named is not None  # the caller only comes here with a name or a path
    return _from_known(named, request.allow_download, log)


def _hint_names(filename: str | os.PathLike[str] | None) -> list[str]:
    if filename is None:
        return []
    path = Path(filename)
    return [n for n in (path.name, path.parent.name) if n]


def _from_facts(request: ConfigRequest, log: _Log) -> _Found:
    """Pick a known model from what the header says (step 6)."""
    facts = request.facts
    fits = models.candidates(
        facts.family, facts.in_channels, facts.guidance_embeds, facts.num_layers, facts.num_single_layers
    )
    described = facts.describe()
    where = request.filename
    if not fits:
        kind, inside = config_kind(facts.family)
        raise ConfigError(
            f"no known model matches the header ({described})",
            path=where,
            hint=f"Pass --config FILE with the model's {kind} ({inside}), or --model-path DIR",
        )
    log(f"No model named; the header ({described}) fits: {', '.join(m.name for m in fits)}")
    for name in _hint_names(request.filename):
        hinted = models.find_in_name(name)
        if hinted is None:
            continue
        if hinted in fits:
            log(f"The name {name!r} says {hinted.name}; using it")
            note = models.derived_in_name(name)
            if note is not None:
                log(note)
            return _from_known(hinted, request.allow_download, log)
        log(f"The name {name!r} suggests {hinted.name}, which does not fit the header; ignoring the name")
        break
    served = [m for m in fits if m.embedded_config is not None]
    unserved = [m for m in fits if m.embedded_config is None]
    if not served:
        return _from_known(unserved[0], request.allow_download, log)
    first = served[0]
    differing = sorted({f for m in served[1:] for f in models.config_differences(first, m)})
    if differing:
        shown = {"in_channels": facts.in_channels, "guidance_embeds": facts.guidance_embeds}
        unknown = [name for name, value in shown.items() if value is None and name in differing]
        why = f"; the header does not show {' or '.join(unknown)}" if unknown else ""
        if not set(differing) & {"in_channels", "guidance_embeds", "num_layers", "num_single_layers"}:
            why = "; the tensors cannot tell them apart (same architecture): the file name or --model decides"
        raise ConfigError(
            f"cannot tell which model this is: the header fits {', '.join(m.name for m in fits)}, whose configs "
            f"differ on {', '.join(differing)}{why}",
            path=where,
            hint=f"Pass --model NAME (e.g. --model {first.name}) or --config FILE",
        )
    if len(fits) > 1:
        others = ", ".join(m.name for m in served[1:])
        if others:
            log(
                f"{first.name} and {others} have functionally identical configs; using {first.name} (canonical); "
                "pass --model to name another"
            )
        for model in unserved:
            log(f"{model.name} also fits but has no verified config of its own; using {first.name}")
    return _from_known(first, request.allow_download, log)


def _skipped(request: ConfigRequest, winner: str) -> list[str]:
    given = [
        ("--config", request.config_file is not None),
        ("--model-path", request.model_path is not None),
        ("--config-yaml", bool(request.config_yaml)),
        ("--model", request.model is not None),
    ]
    names = [n for n, present in given if present]
    return names[names.index(winner) + 1 :] if winner in names else []


def resolve_config(request: ConfigRequest, *, log: Callable[[str], None]) -> ResolvedConfig:
    """Return the transformer config the request designates, following the documented precedence."""
    say = _Log(log)
    yaml_facts = read_yaml_facts(request.config_yaml, log=say) if request.config_yaml else None

    def note(winner: str) -> None:
        later = _skipped(request, winner)
        if later:
            say(f"{winner} takes precedence over {', '.join(later)} for the config")

    if request.config_file is not None:
        note("--config")
        text, config = read_config_file(request.config_file)
        say(f"Loaded config from {request.config_file}")
        found = _Found(text, config, f"config file {request.config_file}", _quiet_find(request.model))
    elif request.model_path is not None:
        note("--model-path")
        found = _from_model_path(request.model_path, request, say)
    elif yaml_facts is not None and (yaml_facts.pipeline_name or yaml_facts.pipeline_path):
        note("--config-yaml")
        found = _from_yaml(yaml_facts, request, say)
    elif request.model is not None:
        found = _from_name(request.model, request.allow_download, say, what="model name", family=request.facts.family)
    else:
        found = _from_facts(request, say)
    return ResolvedConfig(
        text=found.text,
        config=found.config,
        source=found.source,
        model=found.model,
        log=tuple(say.lines),
        yaml_facts=yaml_facts,
    )
