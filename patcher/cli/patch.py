"""``nunchaku-patch patch`` (also ``nunchaku-patch PATH...``): add the Nunchaku metadata to old files."""

from __future__ import annotations

import functools
import os
import sys
from typing import Any

import click

from .. import splice
from ..facts import Severity
from ..header import ALIGNMENT, PREFIX_SIZE
from ..plan import PatchOptions, PatchPlan, Planner, inference_json
from ..report import Record, Report, Status
from .batch import collect, load_header, make_planner, run_one, summarize, usage_error
from .console import Console
from .options import CONTEXT_SETTINGS, Command, config_options, output_options
from .render import findings_json, header_json

#: What each write strategy means, for dry-run and verbose output.
_STRATEGY_NOTES = {
    "fit": "the new header fits in the old one and is rewritten in place",
    "insert": "whole filesystem blocks are inserted at the front with fallocate; the tensor data is not moved",
    "copy": "a copy with the new header is written beside the file, then renamed over it",
    "output": "a patched copy is written to the output; the source is not changed",
    "none": "nothing to write",
}


@click.command(
    "patch", cls=Command, context_settings=CONTEXT_SETTINGS, short_help="Add the Nunchaku metadata (the default)."
)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@config_options
@click.option("-n", "--dry-run", is_flag=True, help="Show the metadata diff and the write strategy; write nothing.")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if any file would change.")
@click.option("--backup", is_flag=True, help="Save the old header beside the file (undo with `restore`).")
@click.option("-o", "--output", metavar="FILE", help="Write a patched copy here (single input only).")
@click.option("--follow-symlinks", is_flag=True, help="Patch the target of a symlink (changes a shared blob).")
@click.option("--force", is_flag=True, help="Write even when the config or overrides contradict the tensors.")
@output_options
def command(
    paths: tuple[str, ...],
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
    check: bool,
    backup: bool,
    output: str | None,
    follow_symlinks: bool,
    force: bool,
    json_mode: bool,
    verbose: int,
    quiet: bool,
) -> None:
    """Patch PATH... (files, or folders of *.safetensors) with the metadata Nunchaku needs.

    The config comes from --config, --model-path, --config-yaml or --model, in that order;
    with none of them the model is recognised from the tensors. Files already correct are not
    touched.

    \b
    Examples:
      nunchaku-patch existing.safetensors --model flux.1-dev
      nunchaku-patch existing.safetensors --config transformer/config.json
      nunchaku-patch model.safetensors --config-yaml configs/model/flux.1-dev.yaml configs/svdquant/int4.yaml
      nunchaku-patch ~/models/old-svdq/ --dry-run
      nunchaku-patch ~/models/ --check --json
    """
    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode)
    if output is not None and (len(paths) != 1 or os.path.isdir(paths[0])):
        got = f"{len(paths)} inputs" if len(paths) != 1 else "a folder"
        usage_error(
            console,
            f"-o/--output takes exactly one input file (got {got}). patch several files in place, or run once per file",
        )
    if output is not None and backup:
        usage_error(
            console,
            "--backup and -o/--output do not mix: -o never changes the source, so there is "
            "nothing to back up. drop --backup",
        )
    planner = make_planner(
        console,
        PatchOptions(
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
        ),
    )
    writing = not (dry_run or check)
    report = Report(check=check)  # a plain dry run exits 0: only --check turns found work into exit 1
    files = collect(paths, report, console)
    for index, path in enumerate(files, 1):
        console.progress(index, len(files), path)
        work = functools.partial(
            _patch_one,
            console,
            planner,
            path,
            writing=writing,
            show_diff=dry_run,
            backup=backup,
            output=output,
            follow_symlinks=follow_symlinks,
        )
        console.record(report.add(run_one(console, work, path)))
    summarize(console, report, paths)
    sys.exit(report.exit_code)


def _patch_one(
    console: Console,
    planner: Planner,
    path: str,
    *,
    writing: bool,
    show_diff: bool,
    backup: bool,
    output: str | None,
    follow_symlinks: bool,
) -> Record:
    """Plan one file, then write it, or show what would be written."""
    if os.path.lexists(splice.journal_path(os.path.realpath(path))):
        if writing and output is None:
            # The header may be half-written: finish or roll back before reading it.
            what = splice.recover(os.path.realpath(path) if follow_symlinks else path)
            if what:
                console.status(f"recovered {path}: an interrupted patch was {what}")
        else:
            console.warning(f"{path}: has an interrupted patch; run without --dry-run/--check/-o to finish it")
    header = load_header(path)
    plan = planner.plan(path, header)
    record = Record(path, Status.UNCHANGED, details=_plan_details(plan), findings=findings_json(plan.findings))
    for line in _evidence_lines(plan):
        console.debug(line)
    for finding in plan.findings:
        if finding.severity is Severity.ERROR:  # only reached with --force
            console.warning(f"{path}: {finding.message} (overridden by --force)")
        elif finding.severity is Severity.WARNING:
            console.warning(f"{path}: {finding.message}")
    if not plan.changed and output is None:
        console.status(f"already correct {path}")
        return record
    if not writing:
        if show_diff:
            diff = plan.diff()
            record.details["diff"] = diff
            console.data(console.style(f"# {path}", bold=True))
            for line in diff:
                console.data(_colour_diff(console, line))
        # The writer's own dry run: opened read-only, the same strategy choice and refusals as a real run.
        result = splice.write_metadata(
            path, plan.new_metadata, output=output, dry_run=True, follow_symlinks=follow_symlinks
        )
        if show_diff:
            console.data(console.style(f"# {_layout_line(result)}", bold=True))
        record.status = Status.WOULD_PATCH
        record.strategy = result.strategy.value
        record.details["header"] = header_json(result)
        target = f" to {result.output}" if result.output else ""
        console.status(f"would patch {path}{target} ({result.strategy.value})")
        return record
    with console.copying(path, plan.header.data_len):  # drawn only if the write copies the data (-o, copy)
        result = splice.write_metadata(
            path,
            plan.new_metadata,
            output=output,
            backup=backup,
            follow_symlinks=follow_symlinks,
            expected=None if output is not None else plan.header,
        )
    if result.recovered:
        console.status(f"recovered {path}: an interrupted patch was {result.recovered}")
    record.strategy = result.strategy.value
    record.details["header"] = header_json(result)
    record.details["output"] = result.output
    record.details["backup"] = result.backup
    sizes = f"header {result.old_header_len:,} -> {result.new_header_len:,} bytes"
    if result.output:
        record.status = Status.PATCHED
        what = "a patched copy" if result.changed else "an exact copy (the source is already correct)"
        console.status(f"wrote {result.output}: {what} of {path} ({result.strategy.value}, {sizes})")
    elif not result.changed:
        # Another process patched it between our read and our lock: nothing was written.
        console.status(f"already correct {path}")
        record.strategy = None
    else:
        record.status = Status.PATCHED
        saved = f", old header saved to {result.backup}" if result.backup else ""
        console.status(f"patched {path} ({result.strategy.value}, {sizes}{saved})")
    return record


def _layout_line(result: splice.WriteResult) -> str:
    """Return the dry-run summary of the header change, the data alignment and the write strategy."""
    delta = result.new_header_len - result.old_header_len
    start = PREFIX_SIZE + result.new_header_len
    aligned = "8-byte aligned" if start % ALIGNMENT == 0 else "NOT 8-byte aligned"
    strategy = result.strategy.value
    note = _STRATEGY_NOTES.get(strategy, "")
    if strategy == "output":
        note = f"a patched copy is written to {result.output}; the source is not changed"
    return (
        f"header {result.old_header_len:,} -> {result.new_header_len:,} bytes ({delta:+,}), "
        f"data region at offset {start:,} ({aligned}), {result.spare:,} bytes spare; "
        f"strategy: {strategy} ({note})"
    )


def _plan_details(plan: PatchPlan) -> dict[str, Any]:
    return {
        "model": plan.model_name,
        "config_source": plan.config_source,
        "family": plan.family.value,
        "precision": plan.precision,
        "rank": plan.rank,
        "inferred": inference_json(plan.inference),
        "changes": [{"key": c.key, "kind": c.kind} for c in plan.changes if c.kind != "unchanged"],
        "header": {"old_len": plan.header.header_len, "new_len": plan.header.header_len},
    }


def _evidence_lines(plan: PatchPlan) -> list[str]:
    from ..inspect import describe

    return [f"{plan.path}: config from {plan.config_source}", *describe(plan.inference)]


def _colour_diff(console: Console, line: str) -> str:
    if line.startswith(("+++", "---")):
        return console.style(line, bold=True)
    if line.startswith("+"):
        return console.style(line, fg="green")
    if line.startswith("-"):
        return console.style(line, fg="red")
    if line.startswith("@@"):
        return console.style(line, fg="cyan")
    return line


__all__ = ["command"]
