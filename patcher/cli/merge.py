"""``nunchaku-patch merge``: deepcompressor output folders into Nunchaku's single file.

Same conventions as ``patch``: data (dry-run plans, ``--json`` records) on stdout, status on stderr, one
:class:`~patcher.report.Record` per folder, and the :class:`~patcher.report.Report` owns the exit code.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import click

from .. import merge
from ..errors import PatchError
from ..facts import Severity
from ..metadata import diff_metadata
from ..plan import PatchOptions, Planner
from ..report import Record, Report, Status
from .batch import make_planner, run_one, summarize, usage_error
from .console import Console
from .options import CONTEXT_SETTINGS, Command, config_options, output_options
from .render import findings_json, size

#: The strategy named in records: the data regions are copied, never decoded.
STRATEGY = "merge"


def _details(plan: merge.MergePlan) -> dict[str, Any]:
    patch = plan.patch
    blocks, unquantized = plan.sources
    return {
        "output": plan.output,
        "family": patch.family.value,
        "precision": patch.precision,
        "rank": patch.rank,
        "model": patch.model_name,
        "config_source": patch.config_source,
        "folder_configs": list(plan.folder_configs),
        "tensors": {
            blocks.name: len(blocks.header.tensors),
            unquantized.name: len(unquantized.header.tensors),
            "total": len(plan.tensors),
        },
        "data_len": plan.data_len,
        "header_len": plan.header_len,
        "file_size": plan.file_size,
        "metadata_keys": list(plan.metadata),
        "warnings": list(plan.warnings),
    }


def _show_plan(console: Console, plan: merge.MergePlan) -> None:
    """Print what a merge would write (dry run): output name, tensor counts, sizes, metadata keys."""
    console.data(f"# {plan.folder} -> {plan.output}")
    for source in plan.sources:
        head = source.header
        console.data(f"#   {source.name}: {len(head.tensors):,} tensors, {size(head.data_len)}")
    console.data(
        f"#   merged: {len(plan.tensors):,} tensors, header {plan.header_len:,} bytes, "
        f"file {size(plan.file_size)} ({plan.file_size:,} bytes)"
    )
    console.data(f"#   metadata: {', '.join(plan.metadata)}")
    if console.verbose:
        for line in diff_metadata(None, plan.metadata):
            console.data(line)


def _merge_one(
    console: Console,
    planner: Planner,
    folder: str,
    output: str | None,
    dry_run: bool,
    force: bool,
    claimed: dict[str, str],
) -> Record:
    plan = merge.plan_merge(folder, planner, output=output)
    record = Record(plan.folder, Status.UNCHANGED, strategy=STRATEGY, details=_details(plan))
    record.findings = findings_json(plan.patch.findings)
    for warning in plan.warnings:
        console.warning(f"{plan.folder}: {warning}")
    for finding in plan.patch.findings:
        if finding.severity is Severity.ERROR:  # only reached with --force
            console.warning(f"{plan.folder}: {finding.message} (written anyway: --force)")
        elif finding.severity is Severity.WARNING:
            console.warning(f"{plan.folder}: {finding.message}")
    key = os.path.normcase(os.path.abspath(plan.output))
    if key in claimed:
        raise PatchError(
            f"the output {plan.output} is also where {claimed[key]} is merged in this run",
            path=plan.folder,
            code="output-clash",
            hint="merge the folders one at a time with -o FILE",
        )
    claimed[key] = plan.folder
    if dry_run:
        _show_plan(console, plan)
        # The same refusals as a real run (an existing, different output without --force), read-only.
        if merge.check_output(plan, force=force) and not force:
            console.status(f"already merged {plan.folder} ({plan.output} holds exactly this merge)")
            return record
        console.status(f"would merge {plan.folder} -> {plan.output}")
        record.status = Status.WOULD_PATCH
        return record
    with console.copying(plan.output, sum(source.header.data_len for source in plan.sources)):
        result = merge.write_merge(plan, force=force)
    if result.status == "unchanged":
        console.status(f"already merged {plan.folder} ({result.output} holds exactly this merge)")
        return record
    console.status(f"merged {plan.folder} -> {result.output} ({len(plan.tensors):,} tensors, {size(plan.file_size)})")
    record.status = Status.PATCHED
    return record


@click.command(
    "merge",
    cls=Command,
    context_settings=CONTEXT_SETTINGS,
    short_help="Merge deepcompressor output folders into one file.",
)
@click.argument("paths", nargs=-1, required=True, metavar="DIR...")
@click.option("-o", "--output", metavar="FILE|DIR", help="Output file (one folder), or folder for the default names.")
@config_options
@click.option("-n", "--dry-run", is_flag=True, help="Show the planned output, tensors, sizes and metadata keys.")
@click.option("--force", is_flag=True, help="Replace an existing output; write even if the config contradicts.")
@output_options
def command(
    paths: tuple[str, ...],
    output: str | None,
    model: str | None,
    model_path: str | None,
    config_file: str | None,
    config_yaml: tuple[str, ...],
    precision: str | None,
    rank: int | None,
    model_class: str | None,
    comfy_config: str | None,
    compat_fields: bool,
    allow_download: bool,
    dry_run: bool,
    force: bool,
    json_mode: bool,
    verbose: int,
    quiet: bool,
) -> None:
    """Merge deepcompressor output folders into Nunchaku's single .safetensors file.

    Each DIR (searched recursively) holding transformer_blocks.safetensors and unquantized_layers.safetensors
    becomes one svdq-{int4|fp4}_r{rank}-{model}.safetensors beside it, with the metadata `patch` writes (the
    folder's own config.json / comfy_config.json used verbatim when present). The tensor bytes are copied by
    the kernel, never decoded.

    \b
    Examples:
      nunchaku-patch merge svdq-int4-flux.1-dev/
      nunchaku-patch merge conversions/ --dry-run
      nunchaku-patch merge out/ --model flux.1-dev -o svdq-int4_r32-flux.1-dev.safetensors
    """
    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode)
    options = PatchOptions(
        model=model,
        model_path=model_path,
        config=config_file,
        config_yaml=config_yaml,
        precision=precision,  # type: ignore[arg-type]  # click.Choice restricts it to Precision
        rank=rank,
        model_class=model_class,
        comfy_config=comfy_config,
        compat_fields=compat_fields,
        allow_download=allow_download,
        force=force,
    )
    planner = make_planner(console, options)
    report = Report(check=False)  # as for patch: a plain --dry-run exits 0
    folders: list[str] = []
    for raw in paths:
        try:
            found = [os.fspath(f) for f in merge.find_folders([raw])]
        except PatchError as exc:
            console.error(exc.render())
            console.record(report.add(Record(raw, Status.FAILED, error=exc)))
            continue
        folders.extend(f for f in found if f not in folders)
    if output is not None and len(folders) > 1 and not os.path.isdir(output):
        usage_error(
            console,
            f"-o/--output names one file but {len(folders)} folders were found. "
            "pass an existing folder to -o, or merge one folder at a time",
        )
    claimed: dict[str, str] = {}
    for index, folder in enumerate(folders, 1):
        console.progress(index, len(folders), folder)
        work = functools.partial(_merge_one, console, planner, folder, output, dry_run, force, claimed)
        console.record(report.add(run_one(console, work, folder)))
    summarize(console, report, paths)
    sys.exit(report.exit_code)


__all__ = ["command"]
