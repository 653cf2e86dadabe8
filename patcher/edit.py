"""Set and remove any ``__metadata__`` key: ``KEY=VALUE`` arguments in, a :class:`MetadataPlan` out (no writes).

The plan is the same value a patch produces, so ``set`` / ``unset`` are written by the same writer with the
same strategies, journal, locks, refusals, backup and ``-o``. An edit that touches a key Nunchaku reads
(:data:`LOADER_KEYS`) is checked against the loader contract (:mod:`patcher.contract`): one that would stop a
loader from accepting the file, or writes a value a loader rejects, is refused unless ``force``.

Pure apart from reading the file named by ``KEY=@FILE``, which goes through the ``read_file`` callable.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import field
from pathlib import Path
from typing import Any, Final

from . import contract, metadata
from ._record import dataclass
from .errors import MetadataError, UsageError
from .facts import Finding, Severity
from .header import Header
from .inspect import infer
from .plan import MetadataPlan

#: The keys Nunchaku and ComfyUI-nunchaku read (nunchaku-contract.md section 2): edits to them are validated.
LOADER_KEYS: Final = frozenset({"config", "quantization_config", "comfy_config", "model_class"})
#: ``KEY=@FILE`` reads the value from FILE; ``KEY=@@TEXT`` is the literal value ``@TEXT``.
FILE_MARK: Final = "@"

#: The finding that says "this key is absent", by the key it is about: an edit that leaves a key absent
#: (building the metadata one key at a time) is not refused for it, one that writes a wrong value is.
_MISSING_CODES: Final[Mapping[str, str]] = {
    "missing-config": "config",
    "missing-quantization-config": "quantization_config",
    "missing-comfy-config": "comfy_config",
    "missing-model-class": "model_class",
}


@dataclass(frozen=True)
class Assignment:
    """One ``KEY=VALUE`` argument, its value read (``@FILE``) and checked (``--json-value``)."""

    key: str
    value: str
    #: Where the value came from: ``None`` for the command line, else the file it was read from.
    source: str | None = None


def _read_text(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UsageError("value file not found", path=path, code="not-found", hint="check the path after @") from None
    except IsADirectoryError:
        raise UsageError("value file is a folder", path=path, code="not-a-file", hint="name a file after @") from None
    except UnicodeDecodeError as exc:
        raise UsageError(
            f"value file is not UTF-8 text ({exc.reason} at byte {exc.start})",
            path=path,
            code="bad-value",
            hint="metadata values are text; convert the file to UTF-8",
        ) from None
    except OSError as exc:
        raise UsageError(f"cannot read value file: {exc.strerror}", path=path, code="io") from None


def compact_json(text: str, *, key: str) -> str:
    """Return ``text`` parsed as JSON and written compactly (key order kept); raise UsageError if it is not JSON."""

    def no_constant(name: str) -> Any:
        raise ValueError(f"{name} is not JSON")

    try:
        value = json.loads(text, parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:
        detail = f"{exc.msg} at character {exc.pos}" if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise UsageError(
            f"the value of {key!r} is not valid JSON ({detail})",
            code="bad-value",
            hint="fix the JSON, or drop --json-value to store the text as it is",
        ) from None
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def parse_assignment(
    text: str, *, json_value: bool = False, read_file: Callable[[str], str] = _read_text
) -> Assignment:
    """Return ``KEY=VALUE`` (``KEY=@FILE``: FILE's text, ``KEY=@@X``: the literal ``@X``) as an Assignment."""
    key, sep, raw = text.partition("=")
    if not sep or not key:
        raise UsageError(
            f"{text!r} is not KEY=VALUE",
            code="bad-assignment",
            expected="KEY=VALUE or KEY=@FILE",
            hint="write each entry as KEY=VALUE, e.g. modelspec.title=My model",
        )
    source: str | None = None
    if raw.startswith(FILE_MARK + FILE_MARK):
        value = raw[1:]
    elif raw.startswith(FILE_MARK):
        source = raw[1:]
        if not source:
            raise UsageError(f"{text!r} names no file after @", code="bad-assignment", hint="write KEY=@FILE")
        value = read_file(source)
    else:
        value = raw
    if json_value:
        value = compact_json(value, key=key)
    return Assignment(key, value, source)


def parse_assignments(
    texts: Iterable[str], *, json_value: bool = False, read_file: Callable[[str], str] = _read_text
) -> list[Assignment]:
    """Return every ``KEY=VALUE`` argument parsed; a key given twice is a usage error."""
    out: list[Assignment] = []
    seen: set[str] = set()
    for text in texts:
        item = parse_assignment(text, json_value=json_value, read_file=read_file)
        if item.key in seen:
            raise UsageError(f"key {item.key!r} is given twice", code="bad-assignment", hint="give each key once")
        seen.add(item.key)
        out.append(item)
    return out


@dataclass(frozen=True)
class Edit:
    """What to change in every file of a run: keys to set, keys to remove, or every key."""

    set_items: Mapping[str, str] = field(default_factory=dict)
    unset_keys: tuple[str, ...] = ()
    #: Remove every key, and the ``__metadata__`` entry itself.
    unset_all: bool = False
    #: Write even when the result breaks a loader.
    force: bool = False

    def __post_init__(self) -> None:
        if self.unset_all and (self.set_items or self.unset_keys):
            raise UsageError("--all removes every key: name no key with it", code="bad-assignment")
        both = sorted(set(self.set_items) & set(self.unset_keys))
        if both:
            raise UsageError(f"key {both[0]!r} is both set and removed", code="bad-assignment")

    @property
    def keys(self) -> frozenset[str]:
        """Return the keys this edit names."""
        return frozenset(self.set_items) | frozenset(self.unset_keys)


@dataclass(frozen=True, kw_only=True)
class EditPlan(MetadataPlan):
    """The plan of a ``set`` / ``unset`` on one file."""

    #: Keys asked to be removed that the file does not have.
    absent: tuple[str, ...] = ()
    #: The loaders the result satisfies, by verdict key (only when the edit touches a key they read).
    verdicts: Mapping[str, contract.Verdict] = field(default_factory=dict)


def apply_edit(old: Mapping[str, str] | None, edit: Edit) -> tuple[dict[str, str] | None, tuple[str, ...]]:
    """Return the metadata after ``edit`` and the keys it asked to remove that were absent.

    Set keys keep their place (new ones go last). When every key is removed (``--all``, or the edit removed the
    last one), the result is ``None``: the header loses its ``__metadata__`` entry, as if it never had one.
    """
    if edit.unset_all:
        return None, ()
    new = dict(old or {})
    absent = tuple(key for key in edit.unset_keys if key not in new)
    removed = False
    for key in edit.unset_keys:
        removed = new.pop(key, None) is not None or removed
    new.update(edit.set_items)
    if removed and not new:
        return None, absent
    return new, absent


def _errors(report: contract.Report) -> set[Finding]:
    return {f for f in report.findings if f.severity is Severity.ERROR}


def loader_check(
    header: Header, new: Mapping[str, str] | None, edited: Iterable[str]
) -> tuple[list[Finding], list[str], Mapping[str, contract.Verdict]]:
    """Return what an edit does to the loaders: new problems, the reasons to refuse it, and the verdicts after.

    Refused: a loader that accepted the file rejects it afterwards, or the edit writes a value a loader rejects
    (an error finding that was not there before, other than "KEY is missing" for a key the edit leaves alone).
    Files without an SVDQuant layer are not checked: no Nunchaku loader reads them.
    """
    inference = infer(header)
    if not inference.quantized:
        return [], [], {}
    before = contract.validate_metadata(header.metadata, inference)
    after = contract.validate_metadata(new, inference)
    old_errors = _errors(before)
    fresh = [f for f in after.findings if f.severity is not Severity.INFO and f not in before.findings]
    touched = set(edited)
    refusals: list[str] = []
    for key, verdict in after.verdicts.items():
        was = before.verdicts.get(key)
        if verdict.ok:
            continue
        if was is not None and was.ok:
            refusals.append(f"{key} would fail: {'; '.join(verdict.reasons)}")
            continue
        wrong = [
            f.message
            for f in _errors(after) - old_errors
            if (f.scope == contract.FILE_SCOPE or key in contract.scope_loaders(f.scope))
            and _MISSING_CODES.get(f.code) not in (set(LOADER_KEYS) - touched)
        ]
        if wrong:
            refusals.append(f"{key} would reject it: {'; '.join(wrong)}")
    return fresh, refusals, after.verdicts


def plan_edit(path: str, header: Header, edit: Edit) -> EditPlan:
    """Return the plan of ``edit`` on one file; raise MetadataError if it breaks a loader and ``force`` is off."""
    new, absent = apply_edit(header.metadata, edit)
    plan = EditPlan(
        path=path,
        header=header,
        new_metadata=new,
        changes=metadata.metadata_changes(header.metadata, new),
        absent=absent,
    )
    edited = LOADER_KEYS & (frozenset(header.metadata or {}) if edit.unset_all else edit.keys)
    if not (edited and plan.changed):
        return plan
    findings, refusals, verdicts = loader_check(header, new, edited)
    if refusals and not edit.force:
        raise MetadataError(
            f"this edit would break a loader: {' | '.join(refusals)}",
            path=path,
            code="breaks-loader",
            hint="check the value (nunchaku-patch validate -v shows every check), or pass --force to write it",
        )
    return dataclasses.replace(plan, findings=findings, verdicts=verdicts)


class Editor:
    """Plan one :class:`Edit` for many files (the ``set`` / ``unset`` counterpart of :class:`plan.Planner`)."""

    def __init__(self, edit: Edit) -> None:
        self.edit = edit

    def plan(self, path: str, header: Header) -> EditPlan:
        """Return the plan for one file whose header has been read."""
        return plan_edit(path, header, self.edit)


__all__ = [
    "LOADER_KEYS",
    "Assignment",
    "Edit",
    "EditPlan",
    "Editor",
    "apply_edit",
    "compact_json",
    "loader_check",
    "parse_assignment",
    "parse_assignments",
    "plan_edit",
]
