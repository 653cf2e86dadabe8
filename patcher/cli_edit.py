"""``nunchaku-patch set`` / ``unset`` (any metadata key) and ``nunchaku-patch models`` (registered by cli.py).

``set`` and ``unset`` plan with :mod:`patcher.edit` and write with the patch command's own
:func:`~patcher.cli.apply_plan`: same strategies, journal, locks, refusals, backup, ``-o`` and records.
"""

from __future__ import annotations

import functools
import json
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from .cli import (
    CONTEXT_SETTINGS,
    Console,
    Verbs,
    _collect,
    _fail,
    _findings_json,
    _output_options,
    _run_one,
    _summarize,
    _usage_error,
    apply_plan,
    check_output_option,
    read_for_write,
)
from .edit import Edit, Editor, EditPlan, parse_assignments
from .errors import PatchError
from .facts import Severity
from .models import all_models, config_note, model_json
from .report import ExitCode, Record, Report, Status

F = TypeVar("F", bound=Callable[..., Any])

SUFFIX = ".safetensors"
SET_VERBS = Verbs(done="set", would="would set", same="already set")
UNSET_VERBS = Verbs(done="unset", would="would unset", same="nothing to remove in")


def _write_options(func: F) -> F:
    """Add the options set and unset share with patch: dry run, check, backup, -o, symlinks, force."""
    options = [
        click.option(
            "-n", "--dry-run", is_flag=True, help="Show the metadata diff and the write strategy; write nothing."
        ),
        click.option("--check", is_flag=True, help="Write nothing; exit 1 if any file would change."),
        click.option("--backup", is_flag=True, help="Save the old header beside the file (undo with `restore`)."),
        click.option("-o", "--output", metavar="FILE", help="Write an edited copy here (single input only)."),
        click.option("--follow-symlinks", is_flag=True, help="Edit the target of a symlink (changes a shared blob)."),
        click.option("--force", is_flag=True, help="Write even when the edit makes a Nunchaku loader fail."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _is_path(arg: str) -> bool:
    """Return whether an argument of ``unset`` names a file to edit rather than a key."""
    return arg.lower().endswith(SUFFIX) or os.path.isdir(arg)


def split_set_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Return ``set``'s arguments as (paths, ``KEY=VALUE`` entries).

    An existing file or folder is a path; otherwise an argument with ``=`` is an entry, and one without is a path
    if it ends in ``.safetensors`` (a missing file, reported as such), else an entry (refused as not KEY=VALUE).
    """
    paths = [a for a in args if os.path.lexists(a) or ("=" not in a and a.lower().endswith(SUFFIX))]
    return paths, [a for a in args if a not in paths]


def split_unset_args(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """Return ``unset``'s arguments as (paths, keys): a ``*.safetensors`` name or a folder is a path."""
    paths = [a for a in args if _is_path(a)]
    return paths, [a for a in args if a not in paths]


def _edit_details(plan: EditPlan) -> dict[str, Any]:
    return {
        "changes": [{"key": c.key, "kind": c.kind} for c in plan.changes if c.kind != "unchanged"],
        "absent": list(plan.absent),
        "verdicts": {k: {"ok": v.ok, "reasons": list(v.reasons)} for k, v in plan.verdicts.items()},
        "header": {"old_len": plan.header.header_len, "new_len": plan.header.header_len},
        "output": None,
        "backup": None,
    }


def _edit_one(
    console: Console,
    editor: Editor,
    path: str,
    *,
    writing: bool,
    show_diff: bool,
    backup: bool,
    output: str | None,
    follow_symlinks: bool,
    verbs: Verbs,
) -> Record:
    """Plan one file's edit, then write it, or show what would be written."""
    header = read_for_write(console, path, writing=writing, output=output, follow_symlinks=follow_symlinks)
    plan = editor.plan(path, header)
    record = Record(path, Status.UNCHANGED, details=_edit_details(plan), findings=_findings_json(plan.findings))
    for key in plan.absent:
        console.status(f"{path}: no key {key!r} to remove")
    for finding in plan.findings:
        if finding.severity is Severity.ERROR:  # only reached with --force
            console.warning(f"{path}: {finding.message} (written anyway: --force)")
        elif finding.severity is Severity.WARNING:
            console.warning(f"{path}: {finding.message}")
    return apply_plan(
        console,
        plan,
        record,
        writing=writing,
        show_diff=show_diff,
        backup=backup,
        output=output,
        follow_symlinks=follow_symlinks,
        verbs=verbs,
    )


def _run_edit(
    console: Console,
    make_edit: Callable[[], Edit],
    paths: Sequence[str],
    *,
    dry_run: bool,
    check: bool,
    backup: bool,
    output: str | None,
    follow_symlinks: bool,
    verbs: Verbs,
) -> None:
    check_output_option(console, paths, output, backup, verb="edit")
    try:
        editor = Editor(make_edit())
    except PatchError as exc:
        _fail(console, exc, ExitCode.USAGE)
    writing = not (dry_run or check)
    report = Report(check=check)
    files = _collect(paths, report, console)
    for index, path in enumerate(files, 1):
        console.progress(index, len(files), path)
        work = functools.partial(
            _edit_one,
            console,
            editor,
            path,
            writing=writing,
            show_diff=dry_run,
            backup=backup,
            output=output,
            follow_symlinks=follow_symlinks,
            verbs=verbs,
        )
        console.record(report.add(_run_one(console, work, path)))
    _summarize(console, report, paths)
    sys.exit(report.exit_code)


@click.command("set", context_settings=CONTEXT_SETTINGS, short_help="Set any metadata key (KEY=VALUE).")
@click.argument("args", nargs=-1, required=True, metavar="FILE... KEY=VALUE...", type=click.Path())
@click.option("--json-value", is_flag=True, help="Check that each VALUE is JSON and store it compactly.")
@_write_options
@_output_options
def set_command(
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
    """Set metadata keys of FILE... (files, or folders of *.safetensors): KEY=VALUE, KEY=@FILE for a file's text.

    Values are strings; KEY=@@TEXT stores @TEXT. Existing keys keep their place, new ones go last.
    Written like a patch (in place, crash-safe; -o for a copy). An edit of config,
    quantization_config, comfy_config or model_class that makes a Nunchaku loader fail is
    refused unless --force.

    \b
    Examples:
      nunchaku-patch set model.safetensors modelspec.title="My model" modelspec.author=me
      nunchaku-patch set model.safetensors comfy_config=@comfy_config.json --json-value
      nunchaku-patch set ~/models/ modelspec.license=apache-2.0 --dry-run
    """
    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode)
    paths, entries = split_set_args(args)
    if not paths:
        _usage_error(console, "name at least one FILE or folder to edit before the KEY=VALUE entries")
    if not entries:
        _usage_error(console, "name at least one KEY=VALUE (or KEY=@FILE) to set. see 'nunchaku-patch set --help'")

    def make_edit() -> Edit:
        items = parse_assignments(entries, json_value=json_value)
        return Edit(set_items={item.key: item.value for item in items}, force=force)

    _run_edit(
        console,
        make_edit,
        paths,
        dry_run=dry_run,
        check=check,
        backup=backup,
        output=output,
        follow_symlinks=follow_symlinks,
        verbs=SET_VERBS,
    )


@click.command("unset", context_settings=CONTEXT_SETTINGS, short_help="Remove metadata keys (or --all).")
@click.argument("args", nargs=-1, required=True, metavar="FILE... KEY...", type=click.Path())
@click.option("--all", "unset_all", is_flag=True, help="Remove every key, and the __metadata__ entry itself.")
@_write_options
@_output_options
def unset_command(
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
    """Remove metadata keys from FILE... (files ending in .safetensors, or folders of them).

    A key the file does not have is reported and skipped. Removing the last key, or --all,
    removes the __metadata__ entry itself. Removing a key Nunchaku reads from a file that
    loads is refused unless --force.

    \b
    Examples:
      nunchaku-patch unset model.safetensors full_config model_type architectures
      nunchaku-patch unset ~/models/ modelspec.thumbnail --dry-run
      nunchaku-patch unset model.safetensors --all --force
    """
    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode)
    paths, keys = split_unset_args(args)
    if not paths:
        _usage_error(console, f"name at least one FILE (*{SUFFIX}) or folder to edit before the KEYs")
    if not keys and not unset_all:
        _usage_error(console, "name at least one KEY, or --all. see 'nunchaku-patch unset --help'")
    _run_edit(
        console,
        lambda: Edit(unset_keys=tuple(dict.fromkeys(keys)), unset_all=unset_all, force=force),
        paths,
        dry_run=dry_run,
        check=check,
        backup=backup,
        output=output,
        follow_symlinks=follow_symlinks,
        verbs=UNSET_VERBS,
    )


@click.command("models", context_settings=CONTEXT_SETTINGS, short_help="List the models --model knows.")
@click.option("--json", "json_mode", is_flag=True, help="Print one JSON record per model on stdout.")
def models_command(json_mode: bool) -> None:
    """List the known models: name, family, repository, the config shipped for it and how sure it is, aliases.

    --model accepts the name or any alias (case-insensitive), or a Hugging Face repo id.

    \b
    Example:
      nunchaku-patch models
    """
    known = all_models()
    if json_mode:
        for model in known:
            click.echo(json.dumps(model_json(model), ensure_ascii=False))
        return
    width = max(len(m.name) for m in known)
    family_width = max(len(m.family.value) for m in known)
    for index, model in enumerate(known):
        record = model_json(model)
        if index:
            click.echo()
        click.echo(f"{model.name:<{width}}  {model.family.value:<{family_width}}  {model.repo_id}")
        click.echo(f"  config: {config_note(model)} ({model.certainty})")
        click.echo(f"  aliases: {', '.join(record['aliases'])}")


__all__ = ["models_command", "set_command", "unset_command"]
