"""``nunchaku-patch patch`` (also ``nunchaku-patch PATH...``): add the Nunchaku metadata to old files."""

from __future__ import annotations

import functools
from typing import Any

import click

from ..plan import PatchOptions, PatchPlan, Planner, inference_json
from ..report import Record, Status
from .batch import make_planner
from .console import Console
from .options import CONTEXT_SETTINGS, Command, config_options, output_options
from .render import findings_json
from .write import (
    WriteMode,
    apply_plan,
    check_output_option,
    read_for_write,
    run_files,
    warn_findings,
    write_options,
)


@click.command(
    "patch", cls=Command, context_settings=CONTEXT_SETTINGS, short_help="Add the Nunchaku metadata (the default)."
)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...", type=click.Path())
@config_options
@write_options(copy="a patched copy", force="Write even when the config or overrides contradict the tensors.")
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
    mode = WriteMode(dry_run, check, backup, output, follow_symlinks)
    check_output_option(console, paths, mode)
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
    run_files(console, paths, mode, functools.partial(_patch_one, console, planner, mode))


def _patch_one(console: Console, planner: Planner, mode: WriteMode, path: str) -> Record:
    """Plan one file, then write it, or show what would be written."""
    header = read_for_write(console, path, mode)
    plan = planner.plan(path, header)
    record = Record(path, Status.UNCHANGED, details=_plan_details(plan), findings=findings_json(plan.findings))
    for line in _evidence_lines(plan):
        console.debug(line)
    warn_findings(console, path, plan.findings)
    return apply_plan(console, plan, record, mode)


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


__all__ = ["command"]
