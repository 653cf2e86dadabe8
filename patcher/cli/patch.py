"""``nunchaku-patch patch`` (also ``nunchaku-patch PATH...``): add the Nunchaku metadata to old files."""

from __future__ import annotations

import functools
import os
import shlex
import sys

import click

from .. import splice
from ..errors import InferenceError, PatchError
from ..facts import BLOCKS_FILE, UNQUANTIZED_FILE, Severity
from ..header import ALIGNMENT, PREFIX_SIZE
from ..plan import PatchOptions, PatchPlan, Planner
from ..report import Record, Report, Status
from .batch import (
    REMOTE,
    Target,
    collect,
    load_header,
    make_planner,
    output_key,
    require_paths,
    run_one,
    summarize,
    usage_error,
)
from .console import Console
from .options import CONTEXT_SETTINGS, Command, config_options, output_options
from .render import WRITE_FIELDS, findings_json, header_json, plan_details

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
@click.option("--no-merge", is_flag=True, help="Skip deepcompressor output folders instead of merging them.")
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
    no_merge: bool,
    json_mode: bool,
    verbose: int,
    quiet: bool,
) -> None:
    """Patch PATH... (files, or folders of *.safetensors) with the metadata Nunchaku needs.

    The config comes from --config, --model-path, --config-yaml or --model, in that order;
    with none of them the model is recognised from the tensors. Files already correct are not
    touched. A deepcompressor output folder met on the way (transformer_blocks.safetensors +
    unquantized_layers.safetensors) is merged into one file, as `merge` does (--no-merge skips it).

    \b
    Examples:
      nunchaku-patch existing.safetensors --model flux.1-dev
      nunchaku-patch existing.safetensors --config transformer/config.json
      nunchaku-patch model.safetensors --config-yaml model.yaml --config-yaml svdquant.yaml
      nunchaku-patch ~/ComfyUI/models/diffusion_models/ --dry-run
      nunchaku-patch ~/models/ --check
    """
    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode, fields=WRITE_FIELDS, terse=check)
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
    require_paths(console, paths)
    remote = [p for p in paths if p.startswith(REMOTE)]
    if remote and output is None:
        usage_error(
            console,
            f"{remote[0]}: a Hub file cannot be patched in place. write a patched copy with -o OUT (a file, or "
            "an existing folder)",
        )
    if remote and output is not None and not os.path.isdir(output) and not remote[0].endswith(".safetensors"):
        usage_error(console, f"{remote[0]}: names a repo or folder: -o must be an existing folder for its files")
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
    targets = collect(paths, report, console, pairs=True)
    # Folders first: a merged file already in the tree is reported by its folder, not a second time.
    ordered = [t for t in targets if t.pair] + [t for t in targets if not t.pair]
    claimed: dict[str, str] = {}
    for index, target in enumerate(ordered, 1):
        if not target.pair and output_key(target.path) in claimed:
            continue
        console.progress(index, len(ordered), target.path)
        if target.path.startswith(REMOTE):  # a Hub file: the patched copy is streamed to -o (patcher.cli.remote)
            from .remote import patch_one

            work = functools.partial(patch_one, console, planner, target.path, output=output, writing=writing)
        elif target.pair:
            work = functools.partial(
                _merge_folder, console, planner, target.path, writing, dry_run, force, no_merge, claimed
            )
        else:
            work = functools.partial(
                _patch_one,
                console,
                planner,
                target,
                writing=writing,
                show_diff=dry_run,
                backup=backup,
                output=output,
                follow_symlinks=follow_symlinks,
            )
        console.record(report.add(run_one(console, work, target.path)))
    summarize(console, report, paths, dry_run=check)
    sys.exit(report.exit_code)


def _merge_folder(
    console: Console,
    planner: Planner,
    folder: str,
    writing: bool,
    show: bool,
    force: bool,
    no_merge: bool,
    claimed: dict[str, str],
) -> Record:
    """Merge a deepcompressor output folder met by the walk, as ``merge`` would (or skip it: ``--no-merge``)."""
    from .folders import describe_pair, merge_command_line, merge_one

    if no_merge:
        fix = merge_command_line(folder)
        console.status(f"skipped {folder}: {describe_pair()}; merge it into one file with: {fix}")
        return Record(folder, Status.SKIPPED)
    return merge_one(
        console, planner, folder, output=None, dry_run=not writing, force=force, claimed=claimed, show=show
    )


def _half_error(path: str) -> PatchError:
    """Return the refusal of an ``unquantized_layers.safetensors`` met on its own."""
    folder = os.path.dirname(path) or "."
    sibling = os.path.isfile(os.path.join(folder, BLOCKS_FILE))
    return PatchError(
        "is the unquantized half of a deepcompressor conversion" + ("" if sibling else f", without its {BLOCKS_FILE}"),
        path=path,
        code="incomplete-folder",
        hint=(
            f"merge the folder into one file: nunchaku-patch merge {shlex.quote(folder)}"
            if sibling
            else f"copy {BLOCKS_FILE} from the conversion's output beside it, then run nunchaku-patch merge on it"
        ),
    )


def _patch_one(
    console: Console,
    planner: Planner,
    target: Target,
    *,
    writing: bool,
    show_diff: bool,
    backup: bool,
    output: str | None,
    follow_symlinks: bool,
) -> Record:
    """Plan one file, then write it, or show what would be written."""
    path = target.path
    if os.path.basename(path) == UNQUANTIZED_FILE:
        raise _half_error(path)
    if os.path.lexists(splice.journal_path(os.path.realpath(path))):
        if writing and output is None:
            # The header may be half-written: finish or roll back before reading it.
            what = splice.recover(os.path.realpath(path) if follow_symlinks else path)
            if what:
                console.status(f"recovered {path}: an interrupted patch was {what}")
        else:
            console.warning(f"{path}: has an interrupted patch; run without --dry-run/--check/-o to finish it")
    header = load_header(path)
    try:
        plan = planner.plan(path, header)
    except InferenceError as exc:
        if exc.code != "not-svdquant" or not target.walked:
            raise
        # Met by a walk (a VAE, a text encoder, a regular checkpoint): not ours to change, and not a failure.
        console.status(f"skipped {path}: not an SVDQuant (Nunchaku) conversion")
        return Record(path, Status.SKIPPED)
    record = Record(path, Status.UNCHANGED, details=plan_details(plan), findings=findings_json(plan.findings))
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
        to = f" to {result.output}" if result.output else ""
        console.change(f"would patch {path}{to} ({result.strategy.value})")
        return record
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
