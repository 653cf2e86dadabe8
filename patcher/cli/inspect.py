"""``nunchaku-patch inspect``: a file's header, what its tensors say (with evidence), and its metadata."""

from __future__ import annotations

import functools
import sys

import click

from ..header import Header
from ..metadata import pretty_value
from ..plan import inference_json
from ..report import Record, Report, Status
from .batch import collect, load_header, run_one
from .console import Console
from .options import CONTEXT_SETTINGS, Command, output_options
from .render import size


@click.command(
    "inspect", cls=Command, context_settings=CONTEXT_SETTINGS, short_help="Summarize a file's header and metadata."
)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@output_options
def command(paths: tuple[str, ...], json_mode: bool, verbose: int, quiet: bool) -> None:
    """Summarize each file's header, what the tensors say (with evidence), and its current metadata.

    \b
    Example:
      nunchaku-patch inspect svdq-int4_r32-flux.1-dev.safetensors
    """
    from ..inspect import describe, infer

    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode)
    report = Report()
    files = collect(paths, report, console)

    def one(path: str) -> Record:
        header = load_header(path)
        inference = infer(header)
        if len(report.records) > 0:
            console.data()
        console.data(console.style(path, bold=True))
        for line in header_summary(header):
            console.data(line)
        console.data("inferred from the tensors:")
        for line in describe(inference):
            console.data(f"  {line}")
        for line in metadata_lines(header):
            console.data(line)
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
        }
        return Record(path, Status.INSPECTED, details=details)

    for path in files:
        console.record(report.add(run_one(console, functools.partial(one, path), path)))
    if len(report.records) > 1:
        console.status(report.summary())
    sys.exit(report.exit_code)


def dtype_histogram(header: Header) -> dict[str, tuple[int, int]]:
    """Return ``{dtype: (tensor count, bytes)}``, largest first."""
    counts: dict[str, list[int]] = {}
    for info in header.tensors.values():
        entry = counts.setdefault(info.dtype, [0, 0])
        entry[0] += 1
        entry[1] += info.nbytes
    ordered = sorted(counts.items(), key=lambda item: (-item[1][1], item[0]))
    return {name: (count, nbytes) for name, (count, nbytes) in ordered}


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


__all__ = ["command", "dtype_histogram", "header_summary", "metadata_lines"]
