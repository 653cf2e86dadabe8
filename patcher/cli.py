"""The ``nunchaku-patch`` command line: the only module that imports click.

Data (diffs, ``--json`` records, ``inspect`` and ``validate`` output) goes to stdout; status,
progress, log lines and errors go to stderr. The :class:`~patcher.report.Report` owns the exit code.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import traceback
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import click

from . import __version__, splice
from .errors import PatchError
from .facts import PRECISIONS
from .header import Header, read_header
from .plan import PatchOptions, Planner
from .report import ExitCode, Record, Report, Status, exit_code_for

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
SUFFIX = ".safetensors"


# --------------------------------------------------------------------------------------------
# Console: one object decides colour, verbosity and where each kind of text goes.


class Console:
    """Write data to stdout and status to stderr, honouring ``-q``/``-v``, ``--json`` and ``NO_COLOR``."""

    def __init__(self, *, verbose: int = 0, quiet: bool = False, json_mode: bool = False) -> None:
        self.verbose = verbose
        self.quiet = quiet
        self.json_mode = json_mode
        no_color = "NO_COLOR" in os.environ
        self.color_out = not no_color and sys.stdout.isatty()
        self.color_err = not no_color and sys.stderr.isatty()
        self._progress_shown = False

    def data(self, text: str = "") -> None:
        """Print data to stdout (suppressed in ``--json`` mode, where records are the data)."""
        if not self.json_mode:
            click.echo(text, color=self.color_out)

    def record(self, record: Record) -> None:
        """Print one ``--json`` record as a JSON line."""
        if self.json_mode:
            click.echo(json.dumps(record.to_json(), sort_keys=False))

    def status(self, text: str) -> None:
        """Print a status line to stderr unless quiet."""
        if not self.quiet:
            self._clear_progress()
            click.echo(text, err=True, color=self.color_err)

    def log(self, text: str) -> None:
        """Print a resolution/log line (``  Found model snapshot at ...``) unless quiet."""
        if not self.quiet:
            self._clear_progress()
            click.echo(self.style(f"  {text}", fg="bright_black", err=True), err=True, color=self.color_err)

    def debug(self, text: str) -> None:
        """Print a line only with ``-v``."""
        if self.verbose and not self.quiet:
            self._clear_progress()
            click.echo(self.style(f"  {text}", fg="bright_black", err=True), err=True, color=self.color_err)

    def error(self, text: str) -> None:
        """Print an error line to stderr (even when quiet)."""
        self._clear_progress()
        click.echo(self.style("error: ", fg="red", bold=True, err=True) + text, err=True, color=self.color_err)

    def progress(self, index: int, total: int, path: str) -> None:
        """Show ``[i/n] file`` on a terminal for batch runs (overwritten in place)."""
        if self.quiet or total < 2 or not self.color_err:
            return
        name = path if len(path) < 60 else "..." + path[-57:]
        sys.stderr.write(f"\r\x1b[K[{index}/{total}] {name}")
        sys.stderr.flush()
        self._progress_shown = True

    def _clear_progress(self) -> None:
        if self._progress_shown:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()
            self._progress_shown = False

    def style(self, text: str, *, err: bool = False, **styles: Any) -> str:
        """Return ``text`` styled when the target stream gets colour."""
        if (self.color_err if err else self.color_out) and styles:
            return click.style(text, **styles)
        return text


# --------------------------------------------------------------------------------------------
# The command group: ``nunchaku-patch PATH...`` means ``nunchaku-patch patch PATH...``.


class _DefaultToPatch(click.Group):
    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            args = ["patch", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultToPatch, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="nunchaku-patch")
def main() -> None:
    """Give old SVDQuant .safetensors files the metadata Nunchaku and ComfyUI-nunchaku need.

    Only the header is rewritten: the tensor bytes are never touched, so a 7 GB file is fixed in
    milliseconds. PATH may be a file or a directory (every *.safetensors below it).

    \b
    Examples:
      nunchaku-patch svdq-int4_r32-flux.1-dev.safetensors --model flux.1-dev
      nunchaku-patch old-conversions/ --dry-run
      nunchaku-patch validate -v model.safetensors
      nunchaku-patch inspect model.safetensors
    """


def _output_options(func: F) -> F:
    func = click.option("-q", "--quiet", is_flag=True, help="Print only errors and the data.")(func)
    func = click.option("-v", "--verbose", count=True, help="Say more: evidence, each check, tracebacks.")(func)
    func = click.option("--json", "json_mode", is_flag=True, help="Print one JSON record per file on stdout.")(func)
    return func


@main.command("patch", context_settings=CONTEXT_SETTINGS)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--model", metavar="NAME|REPO_ID", help="Known model name or Hugging Face repo id (e.g. flux.1-dev).")
@click.option("--model-path", metavar="DIR|REPO_ID", help="Local diffusers folder (or repo id) holding the config.")
@click.option("--config", "config_file", metavar="FILE", help="The transformer's config.json.")
@click.option("--config-yaml", multiple=True, metavar="FILE", help="deepcompressor YAML (repeatable, composed).")
@click.option("--precision", type=click.Choice(PRECISIONS), help="Override the precision (must match the tensors).")
@click.option("--rank", type=click.IntRange(min=1), help="Override the rank (must match the tensors).")
@click.option("--model-class", metavar="CLASS", help="Override the Nunchaku class written to model_class.")
@click.option("--comfy-config", metavar="FILE", help="Use this comfy_config.json instead of generating one.")
@click.option("--compat-fields", is_flag=True, help="Also write the extended deepcompressor-proposal fields.")
@click.option("--allow-download", is_flag=True, help="Let huggingface_hub fetch a missing config.json.")
@click.option("-n", "--dry-run", is_flag=True, help="Show the metadata diff and the write strategy; write nothing.")
@click.option("--check", is_flag=True, help="Write nothing; exit 1 if any file would change.")
@click.option("--backup", is_flag=True, help="Save the old header beside the file (undo with `restore`).")
@click.option("-o", "--output", metavar="FILE", help="Write a patched copy here (single input only).")
@click.option("--follow-symlinks", is_flag=True, help="Patch the target of a symlink (changes a shared blob).")
@click.option("--force", is_flag=True, help="Write even when the config or overrides contradict the tensors.")
@_output_options
def patch_command(
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
    """Patch PATH... (files, or directories of *.safetensors) with Nunchaku metadata.

    \b
    Examples:
      nunchaku-patch existing.safetensors --model flux.1-dev
      nunchaku-patch existing.safetensors --config transformer/config.json
      nunchaku-patch model.safetensors --config-yaml configs/model/flux.1-dev.yaml configs/svdquant/int4.yaml
      nunchaku-patch ~/models/old-svdq/ --dry-run
      nunchaku-patch ~/models/ --check --json
    """
    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode)
    report = Report()
    writing = not (dry_run or check)
    if output is not None and (len(paths) != 1 or os.path.isdir(paths[0])):
        _usage_error(console, "-o/--output takes exactly one input file")
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
    try:
        planner = Planner(options, log=console.log)
    except PatchError as exc:
        _finish_with_error(console, exc)
    files = list(_collect(paths, report, console))
    for index, path in enumerate(files, 1):
        console.progress(index, len(files), path)
        record = _run_one(
            console,
            functools.partial(_patch_one, console, planner, path, writing, dry_run, backup, output, follow_symlinks),
            path,
        )
        report.add(record)
        console.record(record)
    _summarize(console, report, dry_run=dry_run or check)
    sys.exit(report.exit_code)


def _patch_one(
    console: Console,
    planner: Planner,
    path: str,
    writing: bool,
    dry_run: bool,
    backup: bool,
    output: str | None,
    follow_symlinks: bool,
) -> Record:
    pending = os.path.exists(splice.journal_path(path))
    if pending and writing and output is None:
        what = splice.recover(path)
        if what:
            console.status(f"recovered {path}: an interrupted patch was {what}")
    elif pending:
        console.status(f"note: {path} has an interrupted patch; running without --dry-run/--check finishes it")
    header = read_header(path)
    plan = planner.plan(path, header)
    details = _plan_details(plan)
    for line in _evidence_lines(plan.inference):
        console.debug(line)
    if not plan.changed and output is None:
        console.status(f"unchanged {path} (already correct)")
        return Record(path, Status.UNCHANGED, details=details)
    if not writing:
        strategy = splice.plan_write(
            header, plan.new_metadata, path=path, block_size=splice.block_size(path), output=output
        )
        if dry_run:
            for line in plan.diff():
                console.data(_colour_diff(console, line))
            console.data(
                f"# header {header.header_len:,} -> {strategy.new_header_len:,} bytes "
                f"({strategy.new_header_len - header.header_len:+,}), data region "
                f"{'aligned' if (8 + strategy.new_header_len) % 8 == 0 else 'NOT aligned'}, "
                f"strategy: {strategy.strategy.value}"
            )
        console.status(f"would patch {path} ({strategy.strategy.value})")
        details["new_header_len"] = strategy.new_header_len
        return Record(path, Status.WOULD_PATCH, strategy=strategy.strategy.value, details=details)
    result = splice.write_metadata(
        path, plan.new_metadata, output=output, backup=backup, follow_symlinks=follow_symlinks
    )
    target = result.output or path
    console.status(
        f"patched {target} ({result.strategy.value}, header {result.old_header_len:,} -> "
        f"{result.new_header_len:,} bytes)"
    )
    details["new_header_len"] = result.new_header_len
    details["old_header_len"] = result.old_header_len
    if result.output:
        details["output"] = result.output
    if result.backup:
        details["backup"] = result.backup
    return Record(path, Status.PATCHED, strategy=result.strategy.value, details=details)


def _plan_details(plan: Any) -> dict[str, Any]:
    return {
        "family": plan.family.value,
        "precision": plan.precision,
        "rank": plan.rank,
        "model": plan.model_name,
        "config_source": plan.config_source,
        "changes": [{"key": c.key, "kind": c.kind} for c in plan.changes if c.kind != "unchanged"],
        "findings": [
            {"severity": f.severity.value, "code": f.code, "message": f.message, "scope": f.scope}
            for f in plan.findings
        ],
        "old_header_len": plan.header.header_len,
    }


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


# --------------------------------------------------------------------------------------------
# validate / inspect / restore


@main.command("validate", context_settings=CONTEXT_SETTINGS)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@_output_options
def validate_command(paths: tuple[str, ...], json_mode: bool, verbose: int, quiet: bool) -> None:
    """Check that each file's metadata satisfies every Nunchaku / ComfyUI-nunchaku loader.

    Exits 1 when a file needs work, 3 when a file cannot be read.

    \b
    Examples:
      nunchaku-patch validate model.safetensors
      nunchaku-patch validate -v ~/models/
    """
    from . import contract
    from .inspect import infer

    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode)
    report = Report()
    files = list(_collect(paths, report, console))

    def one(path: str) -> Record:
        header = read_header(path)
        result = contract.validate_metadata(header.metadata, infer(header))
        status = Status.VALID if result.ok else Status.INVALID
        console.data(f"{path}: {'ok' if result.ok else 'needs work'}")
        if verbose:
            for check in result.checks:
                mark = console.style("✓", fg="green") if check.passed else console.style("✗", fg="red")
                console.data(f"  {mark} {check.name}" + (f": {check.detail}" if check.detail else ""))
        for loader, verdict in result.verdicts.items():
            if verbose or not verdict.ok:
                word = console.style("ok", fg="green") if verdict.ok else console.style("FAIL", fg="red")
                reasons = f" ({'; '.join(verdict.reasons)})" if verdict.reasons else ""
                console.data(f"  {loader}: {word}{reasons}")
        for finding in result.findings:
            if verbose or finding.severity.value != "info":
                console.data(f"  {finding.severity.value}: {finding.message}")
        details = {
            "verdicts": {k: {"ok": v.ok, "reasons": list(v.reasons)} for k, v in result.verdicts.items()},
            "findings": [
                {"severity": f.severity.value, "code": f.code, "message": f.message, "scope": f.scope}
                for f in result.findings
            ],
        }
        return Record(path, status, details=details)

    for index, path in enumerate(files, 1):
        console.progress(index, len(files), path)
        record = report.add(_run_one(console, functools.partial(one, path), path))
        console.record(record)
    _summarize(console, report, dry_run=False)
    sys.exit(report.exit_code)


@main.command("inspect", context_settings=CONTEXT_SETTINGS)
@click.argument("path", metavar="PATH")
@_output_options
def inspect_command(path: str, json_mode: bool, verbose: int, quiet: bool) -> None:
    """Summarize a file's header, what the tensors say, and its current metadata.

    \b
    Example:
      nunchaku-patch inspect svdq-int4_r32-flux.1-dev.safetensors
    """
    from .inspect import describe, infer

    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode)
    report = Report()

    def one(p: str) -> Record:
        header = read_header(p)
        inference = infer(header)
        for line in _header_summary(header):
            console.data(line)
        console.data("inferred:")
        for line in describe(inference):
            console.data(f"  {line}")
        console.data("metadata:" if header.metadata is not None else "metadata: none")
        for key, value in (header.metadata or {}).items():
            console.data(f"  {key}: {_pretty_value(value)}")
        details = {
            "tensors": len(header.tensors),
            "header_len": header.header_len,
            "data_len": header.data_len,
            "spare": header.padding,
            "aligned": header.aligned,
            "metadata": dict(header.metadata) if header.metadata is not None else None,
            "inferred": describe(inference),
        }
        return Record(p, Status.INSPECTED, details=details)

    record = report.add(_run_one(console, lambda: one(path), path))
    console.record(record)
    sys.exit(report.exit_code)


@main.command("restore", context_settings=CONTEXT_SETTINGS)
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@_output_options
def restore_command(paths: tuple[str, ...], json_mode: bool, verbose: int, quiet: bool) -> None:
    """Put back the header saved by --backup, or finish an interrupted patch.

    \b
    Example:
      nunchaku-patch restore model.safetensors
    """
    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode)
    report = Report()

    def one(p: str) -> Record:
        result = splice.restore(p)
        console.status(f"restored {p} ({result.strategy.value})")
        return Record(p, Status.RESTORED, strategy=result.strategy.value)

    for path in paths:
        record = report.add(_run_one(console, functools.partial(one, path), path))
        console.record(record)
    _summarize(console, report, dry_run=False)
    sys.exit(report.exit_code)


# --------------------------------------------------------------------------------------------
# Helpers shared by the commands


def _collect(paths: Iterable[str], report: Report, console: Console) -> Iterator[str]:
    """Yield the files to process: files as given, directories expanded to their *.safetensors."""
    for raw in paths:
        path = Path(raw)
        if path.is_dir() and not path.is_symlink():
            found = sorted(
                str(p) for p in path.rglob(f"*{SUFFIX}") if not p.name.startswith(".") and not p.is_dir()
            )
            if not found:
                console.status(f"note: no {SUFFIX} files under {raw}")
            yield from found
        elif not path.exists() and not path.is_symlink():
            error = PatchError("no such file or directory", path=raw, code="not-found")
            console.error(error.render())
            record = report.add(Record(raw, Status.FAILED, error=error))
            console.record(record)
        else:
            yield raw


def _run_one(console: Console, work: Callable[[], Record], path: str) -> Record:
    """Run one file's work; turn every failure into a FAILED record and one error line."""
    try:
        return work()
    except PatchError as exc:
        if exc.path is None:
            exc.with_path(path)
        console.error(exc.render())
        return Record(path, Status.FAILED, error=exc)
    except KeyboardInterrupt:
        raise
    except Exception as exc:  # a bug: still one line, the traceback only with -v
        error = PatchError(f"internal error: {type(exc).__name__}: {exc}", path=path, code="internal")
        console.error(error.render() + " (please report this; -v shows the traceback)")
        if console.verbose:
            traceback.print_exc()
        return Record(path, Status.FAILED, error=error)


def _summarize(console: Console, report: Report, *, dry_run: bool) -> None:
    if len(report.records) > 1 or dry_run:
        console.status(report.summary())


def _usage_error(console: Console, message: str) -> None:
    console.error(message)
    sys.exit(ExitCode.USAGE)


def _finish_with_error(console: Console, exc: PatchError) -> None:
    console.error(exc.render())
    sys.exit(exit_code_for(exc))


def _header_summary(header: Header) -> list[str]:
    histogram: dict[str, int] = {}
    sizes: dict[str, int] = {}
    for info in header.tensors.values():
        histogram[info.dtype] = histogram.get(info.dtype, 0) + 1
        sizes[info.dtype] = sizes.get(info.dtype, 0) + info.nbytes
    dtypes = ", ".join(
        f"{name} {histogram[name]} ({_size(sizes[name])})" for name in sorted(histogram, key=lambda n: -sizes[n])
    )
    return [
        f"tensors: {len(header.tensors):,}",
        f"dtypes: {dtypes or 'none'}",
        f"data: {_size(header.data_len)} ({header.data_len:,} bytes) at offset {header.data_start:,}"
        f" ({'aligned' if header.aligned else 'NOT 8-byte aligned'})",
        f"header: {header.header_len:,} bytes, {header.padding:,} spare",
        *[f"warning: {w}" for w in header.warnings],
    ]


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def _pretty_value(value: str) -> str:
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    if not isinstance(parsed, (dict, list)):
        return value
    return json.dumps(parsed, indent=2, sort_keys=True).replace("\n", "\n  ")


def _evidence_lines(inference: Any) -> list[str]:
    from .inspect import describe

    return list(describe(inference))


__all__ = ["main"]
