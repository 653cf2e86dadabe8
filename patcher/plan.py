"""Plan a patch: read the header, infer, resolve the config, build and merge the metadata (no writes).

A :class:`PatchPlan` is a value the command line prints (dry run, ``--check``) or hands to the
writer. Everything here is pure except the config resolution, which ``patcher.resolve`` owns.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from . import contract, metadata, resolve
from .errors import ConfigError, InferenceError, PatchError, UsageError
from .facts import MODEL_CLASS, Family, Finding, Inference, Precision, Severity
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


@dataclass(frozen=True)
class PatchPlan:
    """Everything decided for one file before anything is written."""

    path: str
    header: Header
    inference: Inference
    family: Family
    precision: Precision
    rank: int
    config_source: str
    model_name: str | None
    new_metadata: dict[str, str]
    changes: list[metadata.MetadataChange]
    findings: list[Finding] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        """Return whether writing would change the file's metadata."""
        return not (self.header.has_metadata_key and metadata_equal(self.header.metadata, self.new_metadata))

    def diff(self) -> list[str]:
        """Return the unified diff of the metadata, JSON values pretty-printed."""
        lines: list[str] = metadata.diff_metadata(self.header.metadata, self.new_metadata)
        return lines


class Planner:
    """Build plans for many files, resolving each distinct config request once."""

    def __init__(self, options: PatchOptions, *, log: Callable[[str], None]) -> None:
        self.options = options
        self.log = log
        self._configs: dict[tuple[object, ...], resolve.ResolvedConfig] = {}
        self._comfy_text: str | None = None
        if options.comfy_config is not None:
            self._comfy_text = _read_text(options.comfy_config, what="comfy_config file")
            try:
                json.loads(self._comfy_text)
            except ValueError as exc:
                raise ConfigError(
                    f"comfy_config file is not valid JSON: {exc}", path=options.comfy_config
                ) from None

    def plan(self, path: str, header: Header) -> PatchPlan:
        """Return the plan for one file whose header has been read."""
        inference = infer(header)
        opts = self.options
        resolved = self._resolve(path, inference)
        config = resolved.config
        family = _family(inference, resolved, path)
        findings = list(contract.check_config_against_header(config, inference))
        errors = [f for f in findings if f.severity is Severity.ERROR]
        if errors and not opts.force:
            first = errors[0]
            raise ConfigError(
                f"config from {resolved.source} does not match the tensors: {first.message}",
                path=path,
                code="config-mismatch",
                hint="name the right model with --model or --config, or use --force to write it anyway",
            )
        try:
            precision, rank = metadata.choose_quantization(
                inference,
                precision=opts.precision,
                rank=opts.rank,
                yaml_facts=_yaml_mapping(resolved.yaml_facts),
                force=opts.force,
            )
            entries = metadata.build_entries(
                family=family,
                config_text=resolved.text,
                precision=precision,
                rank=rank,
                model_class=opts.model_class or MODEL_CLASS[family],
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

    def _resolve(self, path: str, inference: Inference) -> resolve.ResolvedConfig:
        opts = self.options
        facts = resolve.HeaderFacts.from_inference(inference)
        # Explicit sources do not depend on the file, so a batch resolves them once.
        explicit = bool(opts.config or opts.model_path or opts.config_yaml or opts.model)
        filename = os.path.basename(path)
        key: tuple[object, ...] = ("explicit",) if explicit else (facts, filename)
        cached = self._configs.get(key)
        if cached is not None:
            return cached
        request = resolve.ConfigRequest(
            config_file=opts.config,
            model_path=opts.model_path,
            config_yaml=list(opts.config_yaml),
            model=opts.model,
            allow_download=opts.allow_download,
            filename=filename,
            facts=facts,
        )
        try:
            resolved = resolve.resolve_config(request, log=self.log)
        except PatchError as exc:
            raise (exc if explicit else exc.with_path(path)) from None
        self._configs[key] = resolved
        return resolved


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
        raise UsageError(f"{what} not found", path=path) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"cannot read {what}: {exc}", path=path) from None


__all__ = ["PatchOptions", "PatchPlan", "Planner"]
