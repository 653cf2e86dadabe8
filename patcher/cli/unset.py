"""``nunchaku-patch unset FILE... KEY...``: remove ``__metadata__`` keys (``--all``: the whole entry)."""

from __future__ import annotations

import click

from ..edit import Edit
from .batch import usage_error
from .console import Console
from .edit import COPY, EDIT_FIELDS, FORCE, SUFFIX, run_edit, split_unset_args
from .options import CONTEXT_SETTINGS, Command, output_options
from .write import Verbs, WriteMode, write_options

VERBS = Verbs(verb="edit", done="unset", would="would unset", same="nothing to remove in")


@click.command("unset", cls=Command, context_settings=CONTEXT_SETTINGS, short_help="Remove metadata keys (or --all).")
@click.argument("args", nargs=-1, required=True, metavar="FILE... KEY...", type=click.Path())
@click.option("--all", "unset_all", is_flag=True, help="Remove every key, and the __metadata__ entry itself.")
@write_options(copy=COPY, force=FORCE)
@output_options
def command(
    args: tuple[str, ...],
    unset_all: bool,
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
    """Remove metadata keys from FILE... (names ending in .safetensors, or folders of them).

    A key the file does not have is reported and skipped. Removing the last key, or --all,
    removes the __metadata__ entry itself. Removing a key Nunchaku reads from a file that
    loads is refused unless --force.

    \b
    Examples:
      nunchaku-patch unset model.safetensors full_config model_type architectures
      nunchaku-patch unset ~/models/ modelspec.thumbnail --dry-run
      nunchaku-patch unset model.safetensors --all --force
    """
    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode, fields=EDIT_FIELDS, terse=check)
    paths, keys = split_unset_args(args)
    if not paths:
        usage_error(console, f"name at least one FILE (*{SUFFIX}) or folder to edit before the KEYs")
    if not keys and not unset_all:
        usage_error(console, "name at least one KEY, or --all. see 'nunchaku-patch unset --help'")
    run_edit(
        console,
        lambda: Edit(unset_keys=tuple(dict.fromkeys(keys)), unset_all=unset_all, force=force),
        paths,
        WriteMode(dry_run, check, backup, output, follow_symlinks, force),
        VERBS,
    )


__all__ = ["command"]
