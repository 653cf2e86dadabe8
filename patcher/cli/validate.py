"""``nunchaku-patch validate``: check files against every Nunchaku / ComfyUI-nunchaku loader."""

from __future__ import annotations

import functools
import sys
from typing import TYPE_CHECKING

import click

from ..facts import Severity
from ..report import Record, Report, Status
from .batch import Target, collect, load_header, output_key, require_paths, run_one, summarize
from .console import Console
from .options import CONTEXT_SETTINGS, Command, output_options
from .render import VALIDATE_FIELDS, findings_json, fix_command, plural

if TYPE_CHECKING:
    from ..contract import Check


@click.command(
    "validate", cls=Command, context_settings=CONTEXT_SETTINGS, short_help="Check files against every loader."
)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...", type=click.Path())
@output_options
def command(paths: tuple[str, ...], json_mode: bool, verbose: int, quiet: bool) -> None:
    """Check that each file's metadata satisfies every Nunchaku / ComfyUI-nunchaku loader.

    Prints `FILE: ok` or `FILE: needs work`, what is wrong and the command that fixes it; -v prints
    every check and each loader's verdict. A deepcompressor output folder (transformer_blocks +
    unquantized_layers) needs work until it is merged. Exits 1 when something needs work, 3 when a
    file cannot be read.

    \b
    Examples:
      nunchaku-patch validate model.safetensors
      nunchaku-patch validate -v ~/models/
    """
    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode, fields=VALIDATE_FIELDS)
    require_paths(console, paths)
    report = Report()
    targets = collect(paths, report, console, pairs=True)
    ordered = [t for t in targets if t.pair] + [t for t in targets if not t.pair]
    claimed: dict[str, str] = {}
    for index, target in enumerate(ordered, 1):
        if not target.pair and output_key(target.path) in claimed:
            continue  # the merged file of a folder reported valid above
        console.progress(index, len(ordered), target.path)
        work = functools.partial(_folder if target.pair else _file, console, target, claimed)
        console.record(report.add(run_one(console, work, target.path)))
    summarize(console, report, paths)
    sys.exit(report.exit_code)


def _folder(console: Console, target: Target, claimed: dict[str, str]) -> Record:
    from .folders import validate_folder

    record, lines = validate_folder(target.path, claimed)
    ok = record.status is Status.VALID
    console.data(
        f"{target.path}: " + (console.style("ok", fg="green") if ok else console.style("needs work", fg="red"))
    )
    for line in lines:
        console.data(line)
    return record


def _file(console: Console, target: Target, claimed: dict[str, str]) -> Record:
    from .. import contract
    from ..inspect import infer

    path = target.path
    header = load_header(path)
    inference = infer(header)
    if target.walked and not inference.quantized and inference.family is None:
        console.status(f"skipped {path}: not an SVDQuant (Nunchaku) conversion")
        return Record(path, Status.SKIPPED)
    result = contract.validate_metadata(header.metadata, inference)
    warnings = [f for f in result.findings if f.severity is Severity.WARNING]
    if result.ok:
        word = console.style("ok", fg="green") + (f" ({plural(len(warnings), 'warning')})" if warnings else "")
    else:
        word = console.style("needs work", fg="red")
    console.data(f"{path}: {word}")
    if console.verbose:
        for item in result.checks:
            console.data(f"  {_mark(console, item)} {item.name}{_check_detail(item)}")
        for loader, verdict in result.verdicts.items():
            state = console.style("ok", fg="green") if verdict.ok else console.style("FAIL", fg="red")
            reasons = f" ({'; '.join(verdict.reasons)})" if verdict.reasons else ""
            console.data(f"  {loader}: {state}{reasons}")
    for finding in result.findings:
        if console.verbose or finding.severity is not Severity.INFO:
            label = console.style(finding.severity.value, fg=_COLOURS[finding.severity])
            console.data(f"  {label}: {finding.message}")
    failing = [name for name, verdict in result.verdicts.items() if not verdict.ok]
    if failing and not console.verbose:
        console.data(f"  fails to load in: {', '.join(failing)}")
    fix = None if result.ok else fix_command(path, result)
    if fix is not None:
        console.data(f"  fix: {fix}")
    details = {
        "family": result.family.value if result.family is not None else None,
        "verdicts": {k: {"ok": v.ok, "reasons": list(v.reasons)} for k, v in result.verdicts.items()},
        "checks": [
            {
                "name": c.name,
                "passed": c.passed,
                "severity": c.severity.value if c.severity else None,
                "skipped": c.skipped,
                "detail": c.detail,
            }
            for c in result.checks
        ],
        "fix": fix,
    }
    status = Status.VALID if result.ok else Status.INVALID
    return Record(path, status, details=details, findings=findings_json(result.findings))


_COLOURS = {Severity.ERROR: "red", Severity.WARNING: "yellow", Severity.INFO: "bright_black"}


def _mark(console: Console, check: Check) -> str:
    """Return a check line's mark: passed, skipped, or failed with a warning or an error."""
    if check.skipped is not None:
        return console.style("-", fg="bright_black")
    if check.passed:
        return console.style("✓", fg="green")
    if check.severity is Severity.WARNING:
        return console.style("!", fg="yellow")
    return console.style("✗", fg="red")


def _check_detail(check: Check) -> str:
    if check.skipped is not None:
        return f": skipped ({check.skipped})"
    return f": {check.detail}" if check.detail else ""


__all__ = ["command"]
