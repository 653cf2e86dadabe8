"""Plan a patch: read the header, infer, resolve the config, build and merge the metadata (no writes).

A :class:`PatchPlan` is a value the command line prints (dry run, ``--check``) or hands to the
writer. Everything here is pure except the config resolution, which ``patcher.resolve`` owns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import field, fields
from pathlib import Path
from typing import Any

from . import contract, metadata, resolve
from ._record import dataclass
from .errors import ConfigError, InferenceError, PatchError, UsageError
from .facts import BLOCKS_FILE, UNQUANTIZED_FILE, Fact, Family, Finding, Inference, Precision, Severity
from .header import Header, metadata_equal
from .inspect import infer

#: diffusers ``_class_name`` of each family's transformer, to tell the family from a config alone.
_CLASS_NAME_FAMILY: dict[str, Family] = {
    "FluxTransformer2DModel": Family.FLUX,
    "QwenImageTransformer2DModel": Family.QWEN_IMAGE,
    "ZImageTransformer2DModel": Family.Z_IMAGE,
    "SanaTransformer2DModel": Family.SANA,
    "UNet2DConditionModel": Family.SDXL,
    "T5EncoderModel": Family.T5,
}


@dataclass(frozen=True)
class PatchOptions:
    """What the user asked for; the same for every file of a batch."""

    model: str | None = None
    model_path: str | None = None
    config: str | None = None
    config_yaml: tuple[str, ...] = ()
    precision: Precision | None = None
    rank: int | None = None
    model_class: str | None = None
    comfy_config: str | None = None
    compat_fields: bool = False
    allow_download: bool = False
    force: bool = False


@dataclass(frozen=True, kw_only=True)
class MetadataPlan:
    """What one file's ``__metadata__`` becomes, decided before anything is written.

    The one value every metadata write hands to the writer (a patch, ``set``, ``unset``): the command line
    prints it (dry run, ``--check``) or writes it with :func:`patcher.splice.write_metadata`, so every kind of
    edit gets the same strategies, journal, locks, refusals, backup and ``-o``.
    """

    path: str
    header: Header
    #: The metadata to write; ``None`` removes the ``__metadata__`` key.
    new_metadata: dict[str, str] | None
    changes: list[metadata.MetadataChange]
    findings: list[Finding] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Return whether writing would change the file's metadata (the presence of the key included)."""
        same_presence = self.header.has_metadata_key == (self.new_metadata is not None)
        return not (same_presence and metadata_equal(self.header.metadata, self.new_metadata))

    def diff(self) -> list[str]:
        """Return the unified diff of the metadata, JSON values pretty-printed with their keys sorted."""
        lines: list[str] = metadata.diff_metadata(self.header.metadata, self.new_metadata)
        return lines


@dataclass(frozen=True, kw_only=True)
class PatchPlan(MetadataPlan):
    """Everything decided for one file before a patch: the metadata and what it was derived from."""

    new_metadata: dict[str, str]
    inference: Inference
    family: Family
    precision: Precision
    #: ``None`` for the T5 encoder (AWQ W4A16: no low-rank branch, no quantization_config).
    rank: int | None
    config_source: str
    model_name: str | None


class Planner:
    """Build plans for many files, resolving each distinct config request once."""

    def __init__(self, options: PatchOptions, *, log: Callable[[str], None]) -> None:
        self.options = options
        self.log = log
        self._configs: dict[tuple[object, ...], resolve.ResolvedConfig] = {}
        #: The config every file shares, once :meth:`prepare` resolved it (explicit options only).
        self._shared: resolve.ResolvedConfig | None = None
        self._comfy_text: str | None = None
        if options.comfy_config is not None:
            self._comfy_text = _read_text(options.comfy_config, what="comfy_config file")
            try:
                json.loads(self._comfy_text)
            except ValueError as exc:
                raise ConfigError(
                    f"comfy_config file is not valid JSON: {exc}",
                    path=options.comfy_config,
                    hint="pass a comfy_config.json (a JSON object), or drop --comfy-config to generate one",
                ) from None

    def prepare(self) -> None:
        """Resolve up front a config named by the options alone, so a bad option fails once, as a usage error.

        ``--config``, ``--model-path``, ``--model`` and YAMLs naming a pipeline do not depend on the file: a batch
        shares their config, and a problem with them (missing file, unknown name) is the options' fault, not each
        file's. Without this call :meth:`plan` resolves lazily and reports such problems per file.
        """
        opts = self.options
        if self._shared is not None or not (opts.config or opts.model_path or opts.model or opts.config_yaml):
            return
        try:
            if not (opts.config or opts.model_path or opts.model):
                yaml = resolve.read_yaml_facts(opts.config_yaml, log=lambda _line: None)
                if not (yaml.pipeline_name or yaml.pipeline_path):
                    return  # quantization settings only: the model still comes from each file's header
            self._shared = resolve.resolve_config(self._request(None, resolve.HeaderFacts()), log=self.log)
        except UsageError:
            raise
        except PatchError as exc:
            raise _as_usage(exc) from None

    def plan(self, path: str, header: Header) -> PatchPlan:
        """Return the plan for one file whose header has been read."""
        inference = infer(header)
        opts = self.options
        if not inference.quantized and inference.family is None and not opts.force:
            # Nothing to recognise: every model would "fit", and the metadata would describe weights that aren't there.
            raise InferenceError(
                "is not an SVDQuant (Nunchaku) conversion: no quantized layer and no known model's tensor names",
                path=path,
                code="not-svdquant",
                expected="W4A4 layers (*.qweight with *.wscales and a low-rank branch)",
                got=f"{len(header.tensors):,} tensor(s) of another kind",
                hint="nunchaku-patch only adds metadata to Nunchaku SVDQuant files; check that this is the right file",
            )
        half = contract.missing_unquantized_message(inference, None)
        if half is not None and not opts.force:
            # Metadata cannot make half a conversion loadable (nunchaku-contract.md section 8).
            raise InferenceError(half, path=path, code="blocks-only", hint=half_file_fix(path, force_note=True))
        kept = self._kept(path, header, inference)
        if kept is not None:
            return kept
        resolved = self._own_config(header, inference) or self._resolve(path, inference)
        config = resolved.config
        family = _family(inference, resolved, path)
        findings = list(contract.check_config_against_header(config, inference))
        half = contract.missing_unquantized_message(inference, config)
        if half is not None:  # only reached with --force
            findings.insert(0, Finding(Severity.ERROR, "missing-unquantized", half))
        errors = [f for f in findings if f.severity is Severity.ERROR]
        if errors and not opts.force:
            more = f" (and {len(errors) - 1} more mismatch{'es' if len(errors) > 2 else ''})" if len(errors) > 1 else ""
            raise ConfigError(
                f"{errors[0].message}{more}",
                path=path,
                code="config-mismatch",
                hint=f"config used: {resolved.source}; name the right model with --model or --config, "
                "or pass --force to write it anyway",
            )
        try:
            precision, rank = self._quantization(family, inference, resolved)
            entries = metadata.build_entries(
                family=family,
                config_text=resolved.text,
                precision=precision,
                rank=rank,
                model_class=opts.model_class,
                comfy_config_text=self._comfy_text,
                skip_refiners=inference.skip_refiners.value if inference.skip_refiners is not None else None,
                compat_fields=opts.compat_fields,
            )
        except PatchError as exc:
            raise exc.with_path(path) from None
        merged = metadata.merge_metadata(header.metadata, entries)
        changes = metadata.metadata_changes(header.metadata, merged)
        return PatchPlan(
            path=path,
            header=header,
            inference=inference,
            family=family,
            precision=precision,
            rank=rank,
            config_source=resolved.source,
            model_name=resolved.model.name if resolved.model is not None else None,
            new_metadata=merged,
            changes=changes,
            findings=findings,
        )

    def _quantization(
        self, family: Family, inference: Inference, resolved: resolve.ResolvedConfig
    ) -> tuple[Precision, int | None]:
        """Return the precision and rank to write; the T5 encoder has neither setting to choose (AWQ int4 only)."""
        opts = self.options
        if family is not Family.T5:
            return metadata.choose_quantization(
                inference,
                precision=opts.precision,
                rank=opts.rank,
                yaml_facts=_yaml_mapping(resolved.yaml_facts),
                force=opts.force,
            )
        if (opts.precision not in (None, "int4") or opts.rank is not None) and not opts.force:
            raise UsageError(
                "--precision / --rank do not apply to the T5 encoder",
                code="t5-quantization",
                expected="no --precision (the encoder is AWQ int4) and no --rank (it has no low-rank branch)",
                got=f"--precision {opts.precision}" if opts.rank is None else f"--rank {opts.rank}",
                hint="drop them: the T5 encoder's metadata is its config and model_class only",
            )
        return "int4", None

    def _names_config(self) -> bool:
        """Return whether the options say where the config comes from."""
        opts = self.options
        return bool(opts.config or opts.model_path or opts.model or opts.config_yaml)

    def _kept(self, path: str, header: Header, inference: Inference) -> PatchPlan | None:
        """Return an unchanged plan when the file already satisfies every loader and no option asks for a change.

        Without this, a batch over a folder mixing old and already-patched files would rewrite the good ones
        with a re-derived config (cosmetic differences, or a fine-tune's own config replaced by the base model's).
        """
        opts = self.options
        overrides = opts.precision or opts.rank or opts.model_class or opts.comfy_config or opts.compat_fields
        if self._names_config() or overrides or header.metadata is None or "config" not in header.metadata:
            return None
        report = contract.validate_metadata(header.metadata, inference)
        rank_needed = report.family is not Family.T5
        if report.needs_work or report.family is None or inference.precision is None:
            return None
        if rank_needed and inference.rank is None:
            return None
        kept = dict(header.metadata)
        return PatchPlan(
            path=path,
            header=header,
            inference=inference,
            family=report.family,
            precision=inference.precision.value,
            rank=inference.rank.value if inference.rank is not None else None,
            config_source="the config already in the file",
            model_name=None,
            new_metadata=kept,
            changes=metadata.metadata_changes(kept, kept),
            findings=list(report.findings),
        )

    def _own_config(self, header: Header, inference: Inference) -> resolve.ResolvedConfig | None:
        """Return the file's own ``config`` entry when no option names one and it agrees with the tensors."""
        text = (header.metadata or {}).get("config")
        if self._names_config() or text is None:
            return None
        try:
            config = json.loads(text)
        except ValueError:
            return None
        if not isinstance(config, dict) or any(
            f.severity is Severity.ERROR for f in contract.check_config_against_header(config, inference)
        ):
            return None
        line = "No model named; using the config already in the file (it matches the tensors)"
        self.log(line)
        return resolve.ResolvedConfig(
            text=text, config=config, source="the config already in the file", model=None, log=(line,)
        )

    def _request(self, path: str | None, facts: resolve.HeaderFacts) -> resolve.ConfigRequest:
        opts = self.options
        return resolve.ConfigRequest(
            config_file=opts.config,
            model_path=opts.model_path,
            config_yaml=list(opts.config_yaml),
            model=opts.model,
            allow_download=opts.allow_download,
            filename=path,  # the whole path: errors name it as the user gave it, the folder's name is a hint too
            facts=facts,
        )

    def _resolve(self, path: str, inference: Inference) -> resolve.ResolvedConfig:
        if self._shared is not None:
            return self._shared
        opts = self.options
        facts = resolve.HeaderFacts.from_inference(inference)
        # --config/--model-path/--model do not depend on the file, so a batch resolves them once; otherwise the
        # header facts and the file and folder names (tie-breaking hints) decide, YAMLs without a pipeline included.
        explicit = bool(opts.config or opts.model_path or opts.model)
        key: tuple[object, ...] = ("explicit",) if explicit else (facts, path)
        cached = self._configs.get(key)
        if cached is not None:
            return cached
        try:
            resolved = resolve.resolve_config(self._request(path, facts), log=self.log)
        except PatchError as exc:
            raise (exc if explicit else exc.with_path(path)) from None
        self._configs[key] = resolved
        return resolved


def half_file_fix(path: str, *, force_note: bool = False) -> str:
    """Return what to do with a file lacking its unquantized layers: merge it with its sibling when it has one."""
    folder = os.path.dirname(path) or "."
    if os.path.isfile(os.path.join(folder, UNQUANTIZED_FILE)) and os.path.basename(path) != UNQUANTIZED_FILE:
        import shlex  # only this advice quotes a path

        return f"merge it with the {UNQUANTIZED_FILE} beside it: nunchaku-patch merge {shlex.quote(folder)}"
    return (
        f"use the whole conversion: deepcompressor writes these layers to {UNQUANTIZED_FILE} beside {BLOCKS_FILE}; "
        "`nunchaku-patch merge DIR` makes one loadable file of the two"
        + (" (--force writes metadata to this half anyway)" if force_note else "")
    )


def _as_usage(exc: PatchError) -> UsageError:
    """Return ``exc`` as a usage error (same message, code and hint): the options themselves are wrong."""
    return UsageError(exc.message, path=exc.path, code=exc.code, expected=exc.expected, got=exc.got, hint=exc.hint)


def _fact_json(fact: Fact[Any] | None) -> dict[str, Any] | None:
    if fact is None:
        return None
    value = fact.value.value if isinstance(fact.value, Family) else fact.value
    return {"value": value, "evidence": list(fact.evidence), "note": fact.note}


def inference_json(inference: Inference) -> dict[str, Any]:
    """Return what the tensors say as JSON: ``{fact: {value, evidence, note} | null, ...}`` plus flags."""
    out: dict[str, Any] = {}
    for item in fields(inference):
        value = getattr(inference, item.name)
        if isinstance(value, Fact) or value is None:
            out[item.name] = _fact_json(value)
        elif isinstance(value, tuple):
            out[item.name] = list(value)
        else:
            out[item.name] = value
    return out


def _yaml_mapping(facts: resolve.YamlFacts | None) -> dict[str, object] | None:
    if facts is None:
        return None
    return {"precision": facts.precision, "rank": facts.rank, "source": ", ".join(facts.files)}


def _family(inference: Inference, resolved: resolve.ResolvedConfig, path: str) -> Family:
    if inference.family is not None:
        return inference.family.value
    if resolved.model is not None:
        return resolved.model.family
    class_name = resolved.config.get("_class_name")
    if isinstance(class_name, str) and class_name in _CLASS_NAME_FAMILY:
        return _CLASS_NAME_FAMILY[class_name]
    raise InferenceError(
        "cannot tell the model family from the tensors or the config",
        path=path,
        code="unknown-family",
        hint="is this a Nunchaku (SVDQuant) conversion? name the model with --model",
    )


def _read_text(path: str, *, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError(f"{what} not found", path=path, code="not-found", hint="check the path") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what}: {exc}", path=path) from None


__all__ = ["MetadataPlan", "PatchOptions", "PatchPlan", "Planner", "half_file_fix", "inference_json"]
