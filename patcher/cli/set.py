"""``nunchaku-patch set FILE... KEY=VALUE...``: set any ``__metadata__`` key, written like a patch."""

from __future__ import annotations

import click

from ..edit import Edit, parse_assignments
from .batch import usage_error
from .console import Console
from .edit import COPY, EDIT_FIELDS, FORCE, run_edit, split_set_args
from .options import CONTEXT_SETTINGS, Command, output_options
from .write import Verbs, WriteMode, write_options

VERBS = Verbs(verb="edit", done="set", would="would set", same="already set")


@click.command("set", cls=Command, context_settings=CONTEXT_SETTINGS, short_help="Set any metadata key (KEY=VALUE).")
@click.argument("args", nargs=-1, required=True, metavar="FILE... KEY=VALUE...", type=click.Path())
@click.option("--json-value", is_flag=True, help="Check that each VALUE is JSON and store it compactly.")
@write_options(copy=COPY, force=FORCE)
@output_options
def command(
    args: tuple[str, ...],
    json_value: bool,
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
    """Set metadata keys of FILE... (files, or folders of *.safetensors): KEY=VALUE, or KEY=@FILE for a file's text.

    Values are strings; KEY=@@TEXT stores @TEXT. A key that is set keeps its place, a new key goes
    last. Written like a patch: in place and crash-safe, or -o for a copy. An edit of config,
    quantization_config, comfy_config or model_class that makes a Nunchaku loader fail is
    refused unless --force.

    \b
    Examples:
      nunchaku-patch set model.safetensors modelspec.title="My model" modelspec.author=me
      nunchaku-patch set model.safetensors comfy_config=@comfy_config.json --json-value
      nunchaku-patch set ~/models/ modelspec.license=apache-2.0 --dry-run
    """
    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode, fields=EDIT_FIELDS, terse=check)
    paths, entries = split_set_args(args)
    if not paths:
        usage_error(console, "name at least one FILE or folder to edit before the KEY=VALUE entries")
    if not entries:
        usage_error(console, "name at least one KEY=VALUE (or KEY=@FILE) to set. see 'nunchaku-patch set --help'")

    def make_edit() -> Edit:
        items = parse_assignments(entries, json_value=json_value)
        return Edit(set_items={item.key: item.value for item in items}, force=force)

    run_edit(
        console,
        make_edit,
        paths,
        WriteMode(dry_run, check, backup, output, follow_symlinks, force),
        VERBS,
    )


__all__ = ["command"]
