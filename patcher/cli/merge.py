"""``nunchaku-patch merge``: deepcompressor output folders into Nunchaku's single file.

Same conventions as ``patch``: data (dry-run plans, ``--json`` records) on stdout, status on stderr, one
:class:`~patcher.report.Record` per folder, and the :class:`~patcher.report.Report` owns the exit code.
"""

from __future__ import annotations

import functools
import os
import sys

import click

from .. import merge
from ..errors import PatchError
from ..plan import PatchOptions
from ..report import Record, Report, Status
from .batch import REMOTE, make_planner, require_paths, run_one, summarize, usage_error
from .console import Console
from .folders import merge_one
from .options import CONTEXT_SETTINGS, Command, config_options, output_options
from .render import WRITE_FIELDS


@click.command(
    "merge",
    cls=Command,
    context_settings=CONTEXT_SETTINGS,
    short_help="Merge deepcompressor output folders into one file.",
)
@click.argument("paths", nargs=-1, required=True, metavar="DIR...", type=click.Path(file_okay=False))
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
    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode, fields=WRITE_FIELDS)
    require_paths(console, paths)
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
            if raw.startswith(REMOTE):  # Hub repo folders: both halves streamed into one file (patcher.cli.remote)
                from .remote import find_folders

                found = find_folders(raw)
            else:
                found = [os.fspath(f) for f in merge.find_folders([raw])]
        except PatchError as exc:
            console.error(exc.render())
            console.record(report.add(Record(raw, Status.FAILED, error=exc)))
            continue
        folders.extend(f for f in found if f not in folders)
    # -o DIR/ (a trailing separator) always means a folder, created when missing.
    wants_folder = output is not None and output.endswith(("/", os.sep))
    if output is not None and len(folders) > 1 and not os.path.isdir(output) and not wants_folder:
        usage_error(
            console,
            f"-o/--output names one file but {len(folders)} folders were found. "
            "pass a folder to -o (end it with / to create it), or merge one folder at a time",
        )
    if output is not None and wants_folder and not os.path.isdir(output):
        if dry_run:
            console.status(f"would create the folder {output}")
        else:
            try:
                os.makedirs(output, exist_ok=True)
            except OSError as exc:
                usage_error(console, f"{output}: cannot create the output folder ({exc.strerror or exc})")
    claimed: dict[str, str] = {}
    for index, folder in enumerate(folders, 1):
        console.progress(index, len(folders), folder)
        work = functools.partial(
            merge_one, console, planner, folder, output=output, dry_run=dry_run, force=force, claimed=claimed
        )
        if folder.startswith(REMOTE):
            from .remote import merge_one as merge_remote

            work = functools.partial(
                merge_remote, console, planner, folder, output=output, dry_run=dry_run, force=force
            )
        console.record(report.add(run_one(console, work, folder)))
    summarize(console, report, paths)
    sys.exit(report.exit_code)


__all__ = ["command"]
