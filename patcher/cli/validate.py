"""``nunchaku-patch validate``: check files against every Nunchaku / ComfyUI-nunchaku loader."""

from __future__ import annotations

import functools
import sys

import click

from ..facts import Severity
from ..report import Record, Report, Status
from .batch import collect, load_header, run_one, summarize
from .console import Console
from .options import CONTEXT_SETTINGS, Command, output_options
from .render import findings_json, plural


@click.command(
    "validate", cls=Command, context_settings=CONTEXT_SETTINGS, short_help="Check files against every loader."
)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@output_options
def command(paths: tuple[str, ...], json_mode: bool, verbose: int, quiet: bool) -> None:
    """Check that each file's metadata satisfies every Nunchaku / ComfyUI-nunchaku loader.

    Prints `FILE: ok` or `FILE: needs work` and what is wrong; -v prints every check and each
    loader's verdict. Exits 1 when a file needs work, 3 when a file cannot be read.

    \b
    Examples:
      nunchaku-patch validate model.safetensors
      nunchaku-patch validate -v ~/models/
    """
    from .. import contract
    from ..inspect import infer

    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode)
    report = Report()
    files = collect(paths, report, console)

    def one(path: str) -> Record:
        header = load_header(path)
        result = contract.validate_metadata(header.metadata, infer(header))
        warnings = [f for f in result.findings if f.severity is Severity.WARNING]
        if result.ok:
            word = console.style("ok", fg="green") + (f" ({plural(len(warnings), 'warning')})" if warnings else "")
        else:
            word = console.style("needs work", fg="red")
        console.data(f"{path}: {word}")
        if verbose:
            for item in result.checks:
                mark = console.style("✓", fg="green") if item.passed else console.style("✗", fg="red")
                console.data(f"  {mark} {item.name}" + (f": {item.detail}" if item.detail else ""))
            for loader, verdict in result.verdicts.items():
                state = console.style("ok", fg="green") if verdict.ok else console.style("FAIL", fg="red")
                reasons = f" ({'; '.join(verdict.reasons)})" if verdict.reasons else ""
                console.data(f"  {loader}: {state}{reasons}")
        for finding in result.findings:
            if verbose or finding.severity is not Severity.INFO:
                console.data(f"  {finding.severity.value}: {finding.message}")
        failing = [name for name, verdict in result.verdicts.items() if not verdict.ok]
        if failing and not verbose:
            console.data(f"  fails to load in: {', '.join(failing)}")
        details = {
            "family": result.family.value if result.family is not None else None,
            "verdicts": {k: {"ok": v.ok, "reasons": list(v.reasons)} for k, v in result.verdicts.items()},
            "checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in result.checks],
        }
        status = Status.VALID if result.ok else Status.INVALID
        return Record(path, status, details=details, findings=findings_json(result.findings))

    for index, path in enumerate(files, 1):
        console.progress(index, len(files), path)
        console.record(report.add(run_one(console, functools.partial(one, path), path)))
    summarize(console, report, paths)
    if report.counts[Status.INVALID]:
        console.status("fix with: nunchaku-patch FILE... (add --model NAME if it asks; --dry-run shows the change)")
    sys.exit(report.exit_code)


__all__ = ["command"]
