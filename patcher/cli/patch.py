"""``nunchaku-patch patch`` (also ``nunchaku-patch PATH...``): add the Nunchaku metadata to old files."""

from __future__ import annotations

import functools
import os
import sys

import click

from ..errors import InferenceError, PatchError
from ..facts import BLOCKS_FILE, UNQUANTIZED_FILE
from ..plan import PatchOptions, PatchPlan, Planner
from ..report import Record, Report, Status
from .batch import (
    REMOTE,
    Target,
    collect,
    make_planner,
    output_key,
    require_paths,
    run_one,
    summarize,
    usage_error,
)
from .console import Console
from .options import CONTEXT_SETTINGS, Command, config_options, output_options
from .render import WRITE_FIELDS, findings_json, plan_details, quote
from .write import WriteMode, apply_plan, check_output_option, read_for_write, warn_findings, write_options


@click.command(
    "patch", cls=Command, context_settings=CONTEXT_SETTINGS, short_help="Add the Nunchaku metadata (the default)."
)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...", type=click.Path())
@config_options
@write_options(
    copy="a patched copy",
    force="Write even when the config or overrides contradict the tensors; replace an existing -o file; "
    "accept a copy that cannot keep the owner or group.",
)
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
    mode = WriteMode(dry_run, check, backup, output, follow_symlinks, force)
    check_output_option(console, paths, mode)
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

            work = functools.partial(
                patch_one, console, planner, target.path, output=output, writing=writing, force=force
            )
        elif target.pair:
            work = functools.partial(
                _merge_folder, console, planner, target.path, writing, dry_run, force, no_merge, claimed
            )
        else:
            work = functools.partial(_patch_one, console, planner, mode, target)
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
            f"merge the folder into one file: nunchaku-patch merge {quote(folder)}"
            if sibling
            else f"copy {BLOCKS_FILE} from the conversion's output beside it, then run nunchaku-patch merge on it"
        ),
    )


def _patch_one(console: Console, planner: Planner, mode: WriteMode, target: Target) -> Record:
    """Plan one file, then write it, or show what would be written."""
    path = target.path
    if os.path.basename(path) == UNQUANTIZED_FILE:
        raise _half_error(path)
    header = read_for_write(console, path, mode)
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
    warn_findings(console, path, plan.findings)
    return apply_plan(console, plan, record, mode)


def _evidence_lines(plan: PatchPlan) -> list[str]:
    from ..inspect import describe

    return [f"{plan.path}: config from {plan.config_source}", *describe(plan.inference)]


__all__ = ["command"]

