"""``nunchaku-patch inspect``: a file's header, what its tensors say (with evidence), and its metadata."""

from __future__ import annotations

import functools
import sys
from collections.abc import Sequence
from typing import NoReturn

import click

from ..facts import Inference
from ..header import Header
from ..metadata import pretty_value
from ..plan import inference_json
from ..report import Record, Report, Status
from ..tensors import (
    diff_headers,
    dtype_histogram,
    markdown_report,
    render_header_diff,
    tensor_rows,
    tensor_table,
)
from .batch import collect, load_header, require_paths, run_one, usage_error
from .console import Console
from .options import CONTEXT_SETTINGS, Command, output_options
from .render import colour_diff, fix_command, size


@click.command(
    "inspect", cls=Command, context_settings=CONTEXT_SETTINGS, short_help="Summarize a file's header and metadata."
)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...", type=click.Path())
@click.option("--tensors", "list_tensors", is_flag=True, help="List every tensor: name, dtype, shape, bytes, offset.")
@click.option("--filter", "patterns", multiple=True, metavar="GLOB", help="Only tensors matching GLOB (repeatable).")
@click.option("--markdown", is_flag=True, help="Print the summary and the tensor table as Markdown.")
@click.option("--diff", "compare", is_flag=True, help="Compare two files: metadata, tensors only in one, dtype/shape.")
@output_options
def command(
    paths: tuple[str, ...],
    list_tensors: bool,
    patterns: tuple[str, ...],
    markdown: bool,
    compare: bool,
    json_mode: bool,
    verbose: int,
    quiet: bool,
) -> None:
    """Summarize each file's header, what the tensors say (with evidence), and its current metadata.

    --tensors (or --filter GLOB) adds the tensor table; --markdown prints it all as Markdown, to
    paste into an issue; --json records always hold the tensor table. `inspect A B --diff` shows
    what differs between two files: metadata keys, tensors only in one, dtype or shape changes.

    \b
    Examples:
      nunchaku-patch inspect svdq-int4_r32-flux.1-dev.safetensors
      nunchaku-patch inspect model.safetensors --filter '*.lora_down'
      nunchaku-patch inspect model.safetensors --markdown > report.md
      nunchaku-patch inspect loads.safetensors fails.safetensors --diff
    """
    from ..contract import validate_metadata
    from ..inspect import describe, infer

    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode)
    require_paths(console, paths)
    report = Report()
    if compare:
        _compare(console, report, paths)
    files = [target.path for target in collect(paths, report, console)]

    def one(path: str) -> Record:
        header = load_header(path)
        inference = infer(header)
        rows = tensor_rows(header, patterns)
        matches = _known_matches(inference)
        verdict = validate_metadata(header.metadata, inference)
        fix = None if verdict.ok or not inference.quantized else fix_command(path, verdict)
        if len(report.records) > 0:
            console.data()
        if markdown:
            for line in markdown_report(path, header, describe(inference), rows):
                console.data(line)
        else:
            console.data(console.style(path, bold=True))
            for line in header_summary(header):
                console.data(line)
            console.data("inferred from the tensors:")
            for line in describe(inference):
                console.data(f"  {line}")
            console.data("known models it matches: " + (", ".join(matches) or "none"))
            for line in metadata_lines(header):
                console.data(line)
            if fix is None:
                console.data("needs patching: no (every loader accepts it)" if verdict.ok else "needs patching: no")
            else:
                failing = ", ".join(k for k, v in verdict.verdicts.items() if not v.ok)
                console.data(f"needs patching: yes (fails to load in: {failing}); fix: {fix}")
            if list_tensors or patterns:
                console.data(f"tensors ({len(rows):,} of {len(header.tensors):,}):")
                for line in tensor_table(rows):
                    console.data(f"  {line}")
        histogram = dtype_histogram(header)
        details = {
            "tensors": len(header.tensors),
            "dtypes": {name: {"count": count, "bytes": nbytes} for name, (count, nbytes) in histogram.items()},
            "file_size": header.file_size,
            "header_len": header.header_len,
            "data_offset": header.data_start,
            "data_len": header.data_len,
            "spare": header.padding,
            "aligned": header.aligned,
            "warnings": list(header.warnings),
            "inferred": inference_json(inference),
            "metadata": dict(header.metadata) if header.metadata is not None else None,
            "matches": matches,
            "needs_patching": fix is not None,
            "fix": fix,
            "tensor_table": [row.to_json() for row in rows],
        }
        return Record(path, Status.INSPECTED, details=details)

    for path in files:
        console.record(report.add(run_one(console, functools.partial(one, path), path)))
    if len(report.records) > 1:
        console.status(report.summary())
    sys.exit(report.exit_code)


def _compare(console: Console, report: Report, paths: Sequence[str]) -> NoReturn:
    """Print what differs between the two files of ``inspect A B --diff`` and exit (0 whether or not they do)."""
    if len(paths) != 2:
        usage_error(console, f"--diff compares exactly two files (got {len(paths)}). name two .safetensors files")
    first, second = paths

    def differ() -> Record:
        diff = diff_headers(load_header(first), load_header(second))
        console.data(console.style(f"# {first} -> {second}", bold=True))
        for line in render_header_diff(diff, first, second):
            console.data(colour_diff(console, line))
        return Record(first, Status.INSPECTED, details={"other": second, "diff": diff.to_json()})

    console.record(report.add(run_one(console, differ, first)))
    sys.exit(report.exit_code)


def _known_matches(inference: Inference) -> list[str]:
    """Return the known models whose architecture fits what the tensors say (none for a non-conversion)."""
    from .. import models
    from ..resolve import HeaderFacts

    if inference.family is None:
        return []
    facts = HeaderFacts.from_inference(inference)
    fits = models.candidates(
        facts.family, facts.in_channels, facts.guidance_embeds, facts.num_layers, facts.num_single_layers
    )
    return [model.name for model in fits]


def header_summary(header: Header) -> list[str]:
    histogram = dtype_histogram(header)
    width = max((len(name) for name in histogram), default=0)
    lines = [
        f"file: {size(header.file_size)} ({header.file_size:,} bytes)",
        f"tensors: {len(header.tensors):,} ({size(header.data_len)} of data)",
    ]
    for name, (count, nbytes) in histogram.items():
        share = 100 * nbytes / header.data_len if header.data_len else 0.0
        lines.append(f"  {name:<{width}}  {count:>7,} tensors  {size(nbytes):>10}  {share:5.1f}%")
    aligned = "8-byte aligned" if header.aligned else "NOT 8-byte aligned: some readers will refuse it"
    lines += [
        f"header: {header.header_len:,} bytes ({header.json_len:,} of JSON, {header.padding:,} spare: "
        f"a metadata change growing it by up to {header.padding:,} bytes is written in place)",
        f"data: {header.data_len:,} bytes at offset {header.data_start:,} ({aligned})",
        *[f"warning: {w}" for w in header.warnings],
    ]
    return lines


def metadata_lines(header: Header) -> list[str]:
    if header.metadata is None:
        return ["metadata: none" + (" (__metadata__ is null)" if header.has_metadata_key else " (no __metadata__)")]
    count = len(header.metadata)
    lines = [f"metadata: {count:,} {'entry' if count == 1 else 'entries'}"]
    for key, value in header.metadata.items():
        shown = pretty_value(value)
        if len(shown) == 1:
            lines.append(f"  {key}: {shown[0]}")
        else:
            lines.append(f"  {key}:")
            lines += [f"    {line}" for line in shown]
    return lines


__all__ = ["command", "header_summary", "metadata_lines"]
