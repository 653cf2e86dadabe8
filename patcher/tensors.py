"""The tensor table as people read it: listed and filtered, summarised, as Markdown, and two headers compared.

Pure: a :class:`~patcher.header.Header` (and names for messages) in, rows, lines and JSON-ready values out.
``inspect --tensors``, ``inspect --markdown`` and ``inspect A B --diff`` print what these return.
"""

from __future__ import annotations

import fnmatch
import json
from collections.abc import Iterable, Sequence
from typing import Any

from ._record import dataclass
from .header import Header, TensorInfo
from .metadata import MetadataChange, diff_metadata, metadata_changes


@dataclass(frozen=True)
class TensorRow:
    """One tensor as listed: where its bytes are, in the file and in the data region."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    #: Length of its bytes.
    size: int
    #: Absolute file offset of its first byte (the data region start plus ``data_offsets[0]``).
    offset: int
    data_offsets: tuple[int, int]

    def to_json(self) -> dict[str, Any]:
        """Return ``{name, dtype, shape, size, offset, data_offsets}``."""
        return {
            "name": self.name,
            "dtype": self.dtype,
            "shape": list(self.shape),
            "size": self.size,
            "offset": self.offset,
            "data_offsets": list(self.data_offsets),
        }


def matches(name: str, patterns: Sequence[str]) -> bool:
    """Return whether a tensor name matches any of the globs (case-sensitive; no pattern: every name)."""
    return not patterns or any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns)


def tensor_rows(header: Header, patterns: Sequence[str] = ()) -> list[TensorRow]:
    """Return the tensors whose names match ``patterns`` (globs such as ``*.lora_down``), in header order."""
    return [
        TensorRow(
            name, info.dtype, info.shape, info.nbytes, header.data_start + info.data_offsets[0], info.data_offsets
        )
        for name, info in header.tensors.items()
        if matches(name, patterns)
    ]


def human_size(n: int) -> str:
    """Return ``n`` bytes as ``123 B``, ``4.0 KiB``, ``6.8 GiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB"):
        if value < 1024:
            return f"{n:,} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} GiB"


def shape_text(shape: Sequence[int]) -> str:
    """Return a shape as ``[3072, 64]`` (``[]`` for a scalar)."""
    return "[" + ", ".join(str(d) for d in shape) + "]"


def dtype_histogram(header: Header) -> dict[str, tuple[int, int]]:
    """Return ``{dtype: (tensor count, bytes)}``, largest first."""
    counts: dict[str, list[int]] = {}
    for info in header.tensors.values():
        entry = counts.setdefault(info.dtype, [0, 0])
        entry[0] += 1
        entry[1] += info.nbytes
    ordered = sorted(counts.items(), key=lambda item: (-item[1][1], item[0]))
    return {name: (count, size) for name, (count, size) in ordered}


def tensor_table(rows: Iterable[TensorRow]) -> list[str]:
    """Return the rows as aligned text columns: name, dtype, shape, size, offset."""
    cells = [(r.name, r.dtype, shape_text(r.shape), f"{r.size:,}", f"{r.offset:,}") for r in rows]
    titles = ("name", "dtype", "shape", "bytes", "offset")
    widths = [max(len(row[i]) for row in [titles, *cells]) for i in range(len(titles))]

    def line(row: Sequence[str]) -> str:
        left = [f"{row[i]:<{widths[i]}}" for i in range(3)]
        right = [f"{row[i]:>{widths[i]}}" for i in range(3, 5)]
        return "  ".join(left + right).rstrip()

    return [line(titles), *(line(c) for c in cells)]


# --------------------------------------------------------------------------------------------
# Markdown


def _cell(text: str) -> str:
    """Return ``text`` safe inside a Markdown table cell."""
    return text.replace("\\", "\\\\").replace("|", "\\|").replace("\n", " ")


def markdown_table(titles: Sequence[str], rows: Iterable[Sequence[str]], *, right: Sequence[int] = ()) -> list[str]:
    """Return a GitHub Markdown table; columns in ``right`` are right-aligned."""
    rule = ["---:" if i in right else "---" for i in range(len(titles))]
    lines = ["| " + " | ".join(_cell(t) for t in titles) + " |", "| " + " | ".join(rule) + " |"]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return lines


def _shown(value: str) -> Any:
    """Return a metadata value for display: JSON objects and arrays parsed, anything else as its text."""
    try:
        parsed = json.loads(value)
    except (ValueError, RecursionError):
        return value
    return parsed if isinstance(parsed, (dict, list)) else value


def markdown_report(
    path: str, header: Header, facts: Sequence[str], rows: Sequence[TensorRow] | None = None
) -> list[str]:
    """Return a Markdown report to paste into an issue: summary, dtypes, what the tensors say, metadata, tensors.

    ``facts``: the lines of :func:`patcher.inspect.describe`; ``rows``: the tensor table (``None``: left out).
    """
    name = path.replace("`", "'")
    aligned = "8-byte aligned" if header.aligned else "**not 8-byte aligned**"
    lines = [
        f"### `{name}`",
        "",
        f"- file: {human_size(header.file_size)} ({header.file_size:,} bytes)",
        f"- tensors: {len(header.tensors):,} ({human_size(header.data_len)} of data)",
        f"- header: {header.header_len:,} bytes ({header.padding:,} spare)",
        f"- data: at offset {header.data_start:,} ({aligned})",
        *[f"- warning: {w}" for w in header.warnings],
        "",
    ]
    histogram = dtype_histogram(header)
    lines += markdown_table(
        ("dtype", "tensors", "size"),
        [(d, f"{c:,}", human_size(s)) for d, (c, s) in histogram.items()],
        right=(1, 2),
    )
    lines += ["", "**What the tensors say**", "", *[f"- {_cell(f)}" for f in facts], ""]
    if header.metadata is None:
        state = "`__metadata__` is null" if header.has_metadata_key else "no `__metadata__`"
        lines += [f"**Metadata**: none ({state})", ""]
    else:
        lines += [f"**Metadata** ({len(header.metadata):,} entries)", "", "```json"]
        shown = {key: _shown(value) for key, value in header.metadata.items()}
        lines += [*json.dumps(shown, indent=2, sort_keys=True, ensure_ascii=False).splitlines(), "```", ""]
    if rows is not None:
        lines += [f"**Tensors** ({len(rows):,} of {len(header.tensors):,})", ""]
        lines += markdown_table(
            ("name", "dtype", "shape", "bytes", "offset"),
            [(f"`{r.name}`", r.dtype, shape_text(r.shape), f"{r.size:,}", f"{r.offset:,}") for r in rows],
            right=(3, 4),
        )
    return lines


# --------------------------------------------------------------------------------------------
# Two headers


@dataclass(frozen=True)
class TensorDifference:
    """A tensor both files have with another dtype or shape."""

    name: str
    a: TensorInfo
    b: TensorInfo

    def to_json(self) -> dict[str, Any]:
        """Return ``{name, a: {dtype, shape}, b: {dtype, shape}}``."""
        return {
            "name": self.name,
            "a": {"dtype": self.a.dtype, "shape": list(self.a.shape)},
            "b": {"dtype": self.b.dtype, "shape": list(self.b.shape)},
        }


@dataclass(frozen=True)
class HeaderDiff:
    """What differs between two headers: metadata keys, tensors only in one, tensors of another dtype or shape."""

    metadata: tuple[MetadataChange, ...]
    #: The unified diff of the metadata (JSON values pretty-printed, keys sorted).
    metadata_diff: tuple[str, ...]
    only_in_a: tuple[str, ...]
    only_in_b: tuple[str, ...]
    different: tuple[TensorDifference, ...]
    #: Tensors present in both with the same dtype and shape.
    same: int

    @property
    def identical(self) -> bool:
        """Return whether nothing differs (offsets and padding are not compared)."""
        return not (self.metadata or self.only_in_a or self.only_in_b or self.different)

    def to_json(self) -> dict[str, Any]:
        """Return the difference as JSON: ``metadata`` changes, ``metadata_diff``, tensors only in one, differing."""
        return {
            "identical": self.identical,
            "metadata": [{"key": c.key, "kind": c.kind, "a": c.old, "b": c.new} for c in self.metadata],
            "metadata_diff": list(self.metadata_diff),
            "only_in_a": list(self.only_in_a),
            "only_in_b": list(self.only_in_b),
            "different": [d.to_json() for d in self.different],
            "same": self.same,
        }


def diff_headers(a: Header, b: Header) -> HeaderDiff:
    """Return what differs between header ``a`` and header ``b``."""
    changes = tuple(c for c in metadata_changes(a.metadata, b.metadata) if c.kind != "unchanged")
    different: list[TensorDifference] = []
    same = 0
    for name, info in a.tensors.items():
        other = b.tensors.get(name)
        if other is None:
            continue
        if (info.dtype, info.shape) != (other.dtype, other.shape):
            different.append(TensorDifference(name, info, other))
        else:
            same += 1
    return HeaderDiff(
        metadata=changes,
        metadata_diff=tuple(diff_metadata(a.metadata, b.metadata)),
        only_in_a=tuple(n for n in a.tensors if n not in b.tensors),
        only_in_b=tuple(n for n in b.tensors if n not in a.tensors),
        different=tuple(different),
        same=same,
    )


def _listed(title: str, names: Sequence[str], limit: int) -> list[str]:
    if not names:
        return []
    shown = [f"  {n}" for n in names[:limit]]
    more = [f"  ... and {len(names) - limit:,} more"] if len(names) > limit else []
    return [f"{title} ({len(names):,}):", *shown, *more]


def render_header_diff(diff: HeaderDiff, a: str, b: str, *, limit: int = 50) -> list[str]:
    """Return the difference as text lines naming the files ``a`` and ``b``; ``limit`` names per list."""
    if diff.identical:
        return [f"same metadata and tensors ({diff.same:,} tensors, same dtype and shape)"]
    lines: list[str] = []
    if diff.metadata:
        kinds = ", ".join(f"{c.key} ({c.kind})" for c in diff.metadata)
        lines += [f"metadata: {len(diff.metadata):,} key(s) differ: {kinds}", *diff.metadata_diff]
    else:
        lines.append("metadata: the same")
    lines += _listed(f"tensors only in {a}", diff.only_in_a, limit)
    lines += _listed(f"tensors only in {b}", diff.only_in_b, limit)
    if diff.different:
        lines.append(f"tensors with another dtype or shape ({len(diff.different):,}):")
        for item in diff.different[:limit]:
            lines.append(
                f"  {item.name}: {item.a.dtype} {shape_text(item.a.shape)} -> {item.b.dtype} {shape_text(item.b.shape)}"
            )
        if len(diff.different) > limit:
            lines.append(f"  ... and {len(diff.different) - limit:,} more")
    lines.append(f"tensors the same in both: {diff.same:,}")
    return lines


__all__ = [
    "HeaderDiff",
    "TensorDifference",
    "TensorRow",
    "diff_headers",
    "dtype_histogram",
    "human_size",
    "markdown_report",
    "markdown_table",
    "matches",
    "render_header_diff",
    "shape_text",
    "tensor_rows",
    "tensor_table",
]
