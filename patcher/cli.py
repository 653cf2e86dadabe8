"""The ``nunchaku-patch`` command line: the only module that imports click.

Data (diffs, ``--json`` records, ``inspect`` and ``validate`` output) goes to stdout; status,
progress, log lines and errors go to stderr. The :class:`~patcher.report.Report` owns the exit code.
Every failure is one line, ``error: FILE: what is wrong (expected X, got Y). what to do``.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

import click

from . import __version__, splice
from .errors import HeaderError, LockedError, PatchError
from .facts import PRECISIONS, Finding, Severity
from .header import ALIGNMENT, PREFIX_SIZE, Header, read_header
from .metadata import pretty_value
from .plan import MetadataPlan, PatchOptions, PatchPlan, Planner, inference_json
from .report import ExitCode, Record, Report, Status, exit_code_for

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}
SUFFIX = ".safetensors"
#: How long to wait for another patcher's write lease (held only while it writes a header) before giving up.
_LEASE_WAIT = 2.0

#: A hint for errors raised without one, by error code: every error line should say what to do.
_DEFAULT_HINTS = {
    "not-found": "check the path",
    "not-a-file": f"pass a {SUFFIX} file or a folder of them",
    "permission": "check the file's permissions",
    "io": "try again; if it keeps failing, check the disk",
}
_HEADER_HINT = "the file is not valid safetensors (safetensors itself would refuse it): re-download or re-convert it"

#: What each write strategy means, for dry-run and verbose output.
_STRATEGY_NOTES = {
    "fit": "the new header fits in the old one and is rewritten in place",
    "insert": "whole filesystem blocks are inserted at the front with fallocate; the tensor data is not moved",
    "copy": "a copy with the new header is written beside the file, then renamed over it",
    "output": "a patched copy is written to the output; the source is not changed",
    "none": "nothing to write",
}


# --------------------------------------------------------------------------------------------
# Console: one object decides colour, verbosity and where each kind of text goes.


def _colour_for(stream: Any) -> bool:
    """Return whether ``stream`` gets ANSI colour: a terminal, and no ``NO_COLOR`` (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class Console:
    """Write data to stdout and status to stderr, honouring ``-q``/``-v``, ``--json`` and ``NO_COLOR``."""

    def __init__(self, *, verbose: int = 0, quiet: bool = False, json_mode: bool = False) -> None:
        self.verbose = verbose
        self.quiet = quiet
        self.json_mode = json_mode
        self.color_out = _colour_for(sys.stdout)
        self.color_err = _colour_for(sys.stderr)
        self._progress_shown = False
        # A batch resolves configs per file; the same log line for every file would drown the results.
        self._logged: set[str] = set()

    def data(self, text: str = "") -> None:
        """Print data to stdout (suppressed in ``--json`` mode, where records are the data)."""
        if not self.json_mode:
            self._clear_progress()
            click.echo(text, color=self.color_out)

    def record(self, record: Record) -> None:
        """Print one ``--json`` record as a JSON line."""
        if self.json_mode:
            click.echo(json.dumps(record.to_json(), ensure_ascii=False))

    def status(self, text: str) -> None:
        """Print a status line to stderr unless quiet."""
        if not self.quiet:
            self._clear_progress()
            click.echo(text, err=True, color=self.color_err)

    def log(self, text: str) -> None:
        """Print a config-resolution line (``  Loaded config from ...``) once per run, unless quiet."""
        if self.quiet or text in self._logged:
            return
        self._logged.add(text)
        self._clear_progress()
        click.echo(self.style(f"  {text}", fg="bright_black", err=True), err=True, color=self.color_err)

    def debug(self, text: str) -> None:
        """Print a line only with ``-v``."""
        if self.verbose and not self.quiet:
            self._clear_progress()
            click.echo(self.style(f"  {text}", fg="bright_black", err=True), err=True, color=self.color_err)

    def warning(self, text: str) -> None:
        """Print a warning line to stderr unless quiet."""
        if not self.quiet:
            self._clear_progress()
            click.echo(self.style("warning: ", fg="yellow", bold=True, err=True) + text, err=True, color=self.color_err)

    def error(self, text: str) -> None:
        """Print an error line to stderr (even when quiet)."""
        self._clear_progress()
        click.echo(self.style("error: ", fg="red", bold=True, err=True) + text, err=True, color=self.color_err)

    def progress(self, index: int, total: int, path: str) -> None:
        """Show ``[i/n] file`` on a terminal for batch runs (overwritten in place, never in a pipe or log)."""
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


class _OneLineError(click.ClickException):
    """A click usage error shown as our one-line ``error: ...`` instead of click's usage block."""

    exit_code = ExitCode.USAGE

    def show(self, file: Any = None) -> None:
        """Print ``error: message`` on stderr."""
        stream = file if file is not None else sys.stderr
        label = click.style("error: ", fg="red", bold=True) if _colour_for(stream) else "error: "
        click.echo(label + self.message, file=stream, color=_colour_for(stream))


class _Interrupted(_OneLineError):
    """Ctrl-C: one line and the shell's exit code for SIGINT, instead of click's ``Aborted!``."""

    exit_code = ExitCode.INTERRUPTED


def _usage_line(exc: click.UsageError, where: str) -> str:
    """Return click's usage error as ``what is wrong. see 'COMMAND --help'`` (one line, our style)."""
    if isinstance(exc, click.NoSuchOption):
        message = f"no such option {exc.option_name}"
        if exc.possibilities:
            message += f" (did you mean {' or '.join(exc.possibilities)}?)"
    else:
        message = exc.format_message().strip().rstrip(".")
        if message[:1].isupper() and not message[1:2].isupper():
            message = message[0].lower() + message[1:]
    if exc.ctx is not None:
        where = exc.ctx.command_path
    return f"{message}. see '{where} --help'"


class _Command(click.Command):
    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            # click leaves ctx unset on some parser errors: name the subcommand ourselves.
            where = " ".join(p for p in (parent.command_path if parent else "", info_name or "") if p)
            raise _OneLineError(_usage_line(exc, where)) from None


class _DefaultToPatch(click.Group):
    command_class = _Command

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("-h", "--help", "--version"):
            args = ["patch", *args]
        return super().parse_args(ctx, args)

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # click prints the help: the friendliest answer to a bare `nunchaku-patch`
        except click.UsageError as exc:
            raise _OneLineError(_usage_line(exc, info_name or "nunchaku-patch")) from None

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except BrokenPipeError:
            # Nobody reads stdout any more: stop quietly; stdout goes to /dev/null so the exit flush cannot fail.
            with contextlib.suppress(OSError, ValueError):  # ValueError: a stdout without a descriptor
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, sys.stdout.fileno())
                os.close(devnull)
            raise click.exceptions.Exit(ExitCode.PIPE_CLOSED) from None
        except KeyboardInterrupt:
            # Every write is crash-safe, so stopping mid-batch leaves each file either patched or untouched.
            click.echo(err=True)
            raise _Interrupted("interrupted; the files already done stay patched, the rest are untouched") from None


@click.group("nunchaku-patch", cls=_DefaultToPatch, context_settings=CONTEXT_SETTINGS)
@click.version_option(__version__, "--version", prog_name="nunchaku-patch")
def main() -> None:
    """Give old SVDQuant .safetensors files the metadata Nunchaku and ComfyUI-nunchaku need.

    Only the header is rewritten: the tensor bytes are never touched, so a 7 GB file is fixed in
    milliseconds. `nunchaku-patch PATH...` is short for `nunchaku-patch patch PATH...`; PATH may be
    a file or a folder (every *.safetensors below it).

    \b
    Examples:
      nunchaku-patch svdq-int4_r32-flux.1-dev.safetensors --model flux.1-dev
      nunchaku-patch old-conversions/ --dry-run
      nunchaku-patch validate -v model.safetensors
      nunchaku-patch inspect model.safetensors

    \b
    Exit codes: 0 done or nothing to do, 1 --check/validate found files needing work,
    2 usage error, 3 at least one file failed.
    """


def _complete_model(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Complete ``--model`` with the known models' names, then their aliases (read from the registry)."""
    from .models import completion_names

    return completion_names(incomplete)


def config_options(func: F) -> F:
    """Add the options that say where the config comes from and what to write (shared by patch and merge)."""
    options = [
        click.option(
            "--model",
            metavar="NAME|REPO_ID",
            help="Known model name or Hugging Face repo id (flux.1-dev; see `nunchaku-patch models`).",
            shell_complete=_complete_model,
        ),
        click.option("--model-path", metavar="DIR|REPO_ID", help="Local diffusers folder (or repo id) holding it."),
        click.option(
            "--config", "config_file", metavar="FILE", help="The transformer's config.json (merge: beats the folder's)."
        ),
        click.option("--config-yaml", multiple=True, metavar="FILE", help="deepcompressor YAML (repeatable)."),
        click.option("--precision", type=click.Choice(PRECISIONS), help="Override the precision (must match tensors)."),
        click.option("--rank", type=click.IntRange(min=1), help="Override the rank (must match the tensors)."),
        click.option("--model-class", metavar="CLASS", help="Override the Nunchaku class written to model_class."),
        click.option("--comfy-config", metavar="FILE", help="Use this comfy_config.json instead of generating one."),
        click.option("--compat-fields", is_flag=True, help="Also write the extended deepcompressor-proposal fields."),
        click.option("--allow-download", is_flag=True, help="Let huggingface_hub fetch a missing config.json."),
    ]
    for option in reversed(options):  # decorators apply bottom-up; keep the help in this order
        func = option(func)
    return func


def _output_options(func: F) -> F:
    func = click.option("-q", "--quiet", is_flag=True, help="Print only errors and the data.")(func)
    func = click.option("-v", "--verbose", count=True, help="Say more: evidence, each check, tracebacks.")(func)
    func = click.option("--json", "json_mode", is_flag=True, help="Print one JSON record per file on stdout.")(func)
    return func


@main.command("patch", context_settings=CONTEXT_SETTINGS, short_help="Add the Nunchaku metadata (the default).")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@config_options
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
    check_output_option(console, paths, output, backup)
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
    files = _collect(paths, report, console)
    for index, path in enumerate(files, 1):
        console.progress(index, len(files), path)
        work = functools.partial(
            _patch_one,
            console,
            planner,
            path,
            writing=writing,
            show_diff=dry_run,
            backup=backup,
            output=output,
            follow_symlinks=follow_symlinks,
        )
        console.record(report.add(_run_one(console, work, path)))
    _summarize(console, report, paths)
    sys.exit(report.exit_code)


def check_output_option(
    console: Console, paths: Sequence[str], output: str | None, backup: bool, *, verb: str = "patch"
) -> None:
    """Exit with a usage error unless ``-o`` comes with exactly one input file and no ``--backup``."""
    if output is not None and (len(paths) != 1 or os.path.isdir(paths[0])):
        got = f"{len(paths)} inputs" if len(paths) != 1 else "a folder"
        _usage_error(
            console,
            f"-o/--output takes exactly one input file (got {got}). "
            f"{verb} several files in place, or run once per file",
        )
    if output is not None and backup:
        _usage_error(
            console,
            "--backup and -o/--output do not mix: -o never changes the source, so there is "
            "nothing to back up. drop --backup",
        )


@dataclass(frozen=True)
class Verbs:
    """How the status lines name what happens to a file (``patched``, ``would patch``, ``already correct``)."""

    done: str = "patched"
    would: str = "would patch"
    same: str = "already correct"


def read_for_write(console: Console, path: str, *, writing: bool, output: str | None, follow_symlinks: bool) -> Header:
    """Finish or roll back an interrupted write of ``path`` (when this run writes in place), then read its header."""
    if os.path.lexists(splice.journal_path(os.path.realpath(path))):
        if writing and output is None:
            # The header may be half-written: finish or roll back before reading it.
            what = splice.recover(os.path.realpath(path) if follow_symlinks else path)
            if what:
                console.status(f"recovered {path}: an interrupted patch was {what}")
        else:
            console.warning(f"{path}: has an interrupted patch; run without --dry-run/--check/-o to finish it")
    return _read_header(path)


def _patch_one(
    console: Console,
    planner: Planner,
    path: str,
    *,
    writing: bool,
    show_diff: bool,
    backup: bool,
    output: str | None,
    follow_symlinks: bool,
) -> Record:
    """Plan one file, then write it, or show what would be written."""
    header = read_for_write(console, path, writing=writing, output=output, follow_symlinks=follow_symlinks)
    plan = planner.plan(path, header)
    record = Record(path, Status.UNCHANGED, details=_plan_details(plan), findings=_findings_json(plan.findings))
    for line in _evidence_lines(plan):
        console.debug(line)
    for finding in plan.findings:
        if finding.severity is Severity.ERROR:  # only reached with --force
            console.warning(f"{path}: {finding.message} (overridden by --force)")
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
    )


def apply_plan(
    console: Console,
    plan: MetadataPlan,
    record: Record,
    *,
    writing: bool,
    show_diff: bool,
    backup: bool,
    output: str | None,
    follow_symlinks: bool,
    verbs: Verbs = Verbs(),
) -> Record:
    """Write a metadata plan (a patch, set or unset), or show what would be written; fill in ``record``.

    Every metadata change goes through here to :func:`patcher.splice.write_metadata`: the same strategies,
    journal, locks, refusals, backup and ``-o`` whatever asked for the change.
    """
    path = plan.path
    if not plan.changed and output is None:
        console.status(f"{verbs.same} {path}")
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
        record.details["header"] = _header_json(result)
        target = f" to {result.output}" if result.output else ""
        console.status(f"{verbs.would} {path}{target} ({result.strategy.value})")
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
    record.details["header"] = _header_json(result)
    record.details["output"] = result.output
    record.details["backup"] = result.backup
    sizes = f"header {result.old_header_len:,} -> {result.new_header_len:,} bytes"
    if result.output:
        record.status = Status.PATCHED
        what = "a patched copy" if result.changed else "an exact copy (the source is already correct)"
        console.status(f"wrote {result.output}: {what} of {path} ({result.strategy.value}, {sizes})")
    elif not result.changed:
        # Another process patched it between our read and our lock: nothing was written.
        console.status(f"{verbs.same} {path}")
        record.strategy = None
    else:
        record.status = Status.PATCHED
        saved = f", old header saved to {result.backup}" if result.backup else ""
        console.status(f"{verbs.done} {path} ({result.strategy.value}, {sizes}{saved})")
    return record


def _held_by_a_writer(path: str) -> bool:
    """Return whether opening ``path`` would block: another process holds a write lease (a patch in progress)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    except BlockingIOError:
        return True
    except OSError:
        return False
    os.close(fd)
    return False


def _read_header(path: str) -> Header:
    """Read a header; wait out a patch in progress, and report a header torn by an interrupted one as that."""
    deadline = time.monotonic() + _LEASE_WAIT
    while True:
        try:
            return read_header(path)
        except HeaderError as exc:
            # A patcher holds a write lease only while it writes the prefix: a moment, then the file is ours.
            if exc.code == "io" and _held_by_a_writer(path):
                if time.monotonic() < deadline:
                    time.sleep(0.05)
                    continue
                raise LockedError(
                    "another nunchaku-patch is writing this file",
                    path=path,
                    hint="wait for it to finish, then run again",
                ) from None
            if not os.path.lexists(splice.journal_path(os.path.realpath(path))):
                raise
            raise PatchError(
                "has an interrupted patch: its header is half-written (the tensor data is intact)",
                path=path,
                code="interrupted",
                hint=(
                    f"run `nunchaku-patch restore --follow-symlinks {path}` or the same patch command (with "
                    "--follow-symlinks) again to finish it"
                    if os.path.islink(path)
                    else f"run `nunchaku-patch restore {path}` or the same patch command again to finish it"
                ),
            ) from None


def make_planner(console: Console, options: PatchOptions) -> Planner:
    """Return a Planner whose option-named config is resolved; a problem with it is a usage error (exit 2)."""
    try:
        planner = Planner(options, log=console.log)
        planner.prepare()
    except PatchError as exc:
        # Options that name a config are the same for every file: a problem with them is a usage error.
        _fail(console, exc, ExitCode.USAGE)
    return planner


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


def _header_json(result: splice.WriteResult) -> dict[str, Any]:
    start = PREFIX_SIZE + result.new_header_len
    return {
        "old_len": result.old_header_len,
        "new_len": result.new_header_len,
        "spare": result.spare,
        "data_offset": start,
        "aligned": start % ALIGNMENT == 0,
    }


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


def _findings_json(findings: Iterable[Finding]) -> list[dict[str, Any]]:
    return [{"severity": f.severity.value, "code": f.code, "message": f.message, "scope": f.scope} for f in findings]


def _evidence_lines(plan: PatchPlan) -> list[str]:
    from .inspect import describe

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


# --------------------------------------------------------------------------------------------
# validate / inspect / restore


@main.command("validate", context_settings=CONTEXT_SETTINGS, short_help="Check files against every loader.")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@_output_options
def validate_command(paths: tuple[str, ...], json_mode: bool, verbose: int, quiet: bool) -> None:
    """Check that each file's metadata satisfies every Nunchaku / ComfyUI-nunchaku loader.

    Prints `FILE: ok` or `FILE: needs work` and what is wrong; -v prints every check and each
    loader's verdict. Exits 1 when a file needs work, 3 when a file cannot be read.

    \b
    Examples:
      nunchaku-patch validate model.safetensors
      nunchaku-patch validate -v ~/models/
    """
    from . import contract
    from .inspect import infer

    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode)
    report = Report()
    files = _collect(paths, report, console)

    def one(path: str) -> Record:
        header = _read_header(path)
        result = contract.validate_metadata(header.metadata, infer(header))
        warnings = [f for f in result.findings if f.severity is Severity.WARNING]
        if result.ok:
            word = console.style("ok", fg="green") + (f" ({_plural(len(warnings), 'warning')})" if warnings else "")
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
        return Record(path, status, details=details, findings=_findings_json(result.findings))

    for index, path in enumerate(files, 1):
        console.progress(index, len(files), path)
        console.record(report.add(_run_one(console, functools.partial(one, path), path)))
    _summarize(console, report, paths)
    if report.counts[Status.INVALID]:
        console.status("fix with: nunchaku-patch FILE... (add --model NAME if it asks; --dry-run shows the change)")
    sys.exit(report.exit_code)


@main.command("inspect", context_settings=CONTEXT_SETTINGS, short_help="Summarize a file's header and metadata.")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...", type=click.Path())
@click.option("--tensors", "list_tensors", is_flag=True, help="List every tensor: name, dtype, shape, bytes, offset.")
@click.option("--filter", "patterns", multiple=True, metavar="GLOB", help="Only tensors matching GLOB (repeatable).")
@click.option("--markdown", is_flag=True, help="Print the summary and the tensor table as Markdown.")
@click.option("--diff", "compare", is_flag=True, help="Compare two files: metadata, tensors only in one, dtype/shape.")
@_output_options
def inspect_command(
    paths: tuple[str, ...],
    list_tensors: bool,
    patterns: tuple[str, ...],
    markdown: bool,
    compare: bool,
    json_mode: bool,
    verbose: int,
    quiet: bool,
) -> None:
    """Summarize each file's header, what the tensors say (with evidence), and its current metadata.

    --tensors (or --filter GLOB) adds the tensor table; --markdown prints it all as Markdown, to
    paste into an issue; --json records always hold the tensor table. `inspect A B --diff` shows
    what differs between two files: metadata keys, tensors only in one, dtype or shape changes.

    \b
    Examples:
      nunchaku-patch inspect svdq-int4_r32-flux.1-dev.safetensors
      nunchaku-patch inspect model.safetensors --filter '*.lora_down'
      nunchaku-patch inspect model.safetensors --markdown > report.md
      nunchaku-patch inspect loads.safetensors fails.safetensors --diff
    """
    from .inspect import describe, infer
    from .tensors import diff_headers, markdown_report, render_header_diff, tensor_rows, tensor_table

    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode)
    report = Report()
    if compare:
        if len(paths) != 2:
            _usage_error(console, f"--diff compares exactly two files (got {len(paths)}). name two .safetensors files")
        first, second = paths

        def differ() -> Record:
            diff = diff_headers(_read_header(first), _read_header(second))
            console.data(console.style(f"# {first} -> {second}", bold=True))
            for line in render_header_diff(diff, first, second):
                console.data(_colour_diff(console, line))
            return Record(first, Status.INSPECTED, details={"other": second, "diff": diff.to_json()})

        console.record(report.add(_run_one(console, differ, first)))
        sys.exit(report.exit_code)
    files = _collect(paths, report, console)

    def one(path: str) -> Record:
        header = _read_header(path)
        inference = infer(header)
        rows = tensor_rows(header, patterns)
        if len(report.records) > 0:
            console.data()
        if markdown:
            for line in markdown_report(path, header, describe(inference), rows):
                console.data(line)
        else:
            console.data(console.style(path, bold=True))
            for line in _header_summary(header):
                console.data(line)
            console.data("inferred from the tensors:")
            for line in describe(inference):
                console.data(f"  {line}")
            for line in _metadata_lines(header):
                console.data(line)
            if list_tensors or patterns:
                console.data(f"tensors ({len(rows):,} of {len(header.tensors):,}):")
                for line in tensor_table(rows):
                    console.data(f"  {line}")
        histogram = _dtype_histogram(header)
        details = {
            "tensors": len(header.tensors),
            "dtypes": {name: {"count": count, "bytes": size} for name, (count, size) in histogram.items()},
            "file_size": header.file_size,
            "header_len": header.header_len,
            "data_offset": header.data_start,
            "data_len": header.data_len,
            "spare": header.padding,
            "aligned": header.aligned,
            "warnings": list(header.warnings),
            "inferred": inference_json(inference),
            "metadata": dict(header.metadata) if header.metadata is not None else None,
            "tensor_table": [row.to_json() for row in rows],
        }
        return Record(path, Status.INSPECTED, details=details)

    for path in files:
        console.record(report.add(_run_one(console, functools.partial(one, path), path)))
    if len(report.records) > 1:
        console.status(report.summary())
    sys.exit(report.exit_code)


@main.command("restore", context_settings=CONTEXT_SETTINGS, short_help="Undo a --backup patch.")
@click.argument("paths", nargs=-1, required=True, metavar="PATH...")
@click.option("--follow-symlinks", is_flag=True, help="Restore the target of a symlink.")
@_output_options
def restore_command(paths: tuple[str, ...], follow_symlinks: bool, json_mode: bool, verbose: int, quiet: bool) -> None:
    """Put back the header saved by --backup, or finish an interrupted patch.

    A folder means every file below it that has a backup or an interrupted patch.

    \b
    Examples:
      nunchaku-patch restore model.safetensors
      nunchaku-patch restore ~/models/
    """
    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode)
    report = Report()
    files = _collect(paths, report, console, restorable=True)

    def one(path: str) -> Record:
        result = splice.restore(path, follow_symlinks=follow_symlinks)
        record = Record(path, Status.RESTORED, strategy=result.strategy.value)
        record.details = {"header": _header_json(result), "backup": result.backup, "recovered": result.recovered}
        if result.backup is None:
            console.status(f"finished {path}: the interrupted patch was {result.recovered} (there was no backup)")
        else:
            sizes = f"header {result.old_header_len:,} -> {result.new_header_len:,} bytes"
            console.status(f"restored {path} from {result.backup} ({result.strategy.value}, {sizes})")
        return record

    for index, path in enumerate(files, 1):
        console.progress(index, len(files), path)
        console.record(report.add(_run_one(console, functools.partial(one, path), path)))
    _summarize(console, report, paths)
    sys.exit(report.exit_code)


# --------------------------------------------------------------------------------------------
# Helpers shared by the commands


def _is_restorable(path: str) -> bool:
    return os.path.lexists(splice.backup_path(path)) or os.path.lexists(splice.journal_path(path))


def _walk(folder: str, restorable: bool) -> list[str]:
    """Return the *.safetensors files below ``folder``, sorted; hidden files and folders are skipped."""
    found: list[str] = []
    # Symlinked folders are not entered: a loop, or a shared cache, would be walked twice.
    for root, dirs, names in os.walk(folder, followlinks=False):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            if name.startswith(".") or not name.lower().endswith(SUFFIX):
                continue
            path = os.path.join(root, name)
            if not restorable or _is_restorable(path):
                found.append(path)
    return sorted(found)


def _collect(paths: Iterable[str], report: Report, console: Console, *, restorable: bool = False) -> list[str]:
    """Return the files to process (folders expanded); record a failure for each path that gives none."""
    files: list[str] = []
    seen: set[str] = set()

    def fail(raw: str, error: PatchError) -> None:
        console.error(error.render())
        console.record(report.add(Record(raw, Status.FAILED, error=error)))

    for raw in paths:
        if os.path.isdir(raw):  # a symlink to a folder named on the command line is followed
            found = _walk(raw, restorable)
            if not found and restorable:
                fail(
                    raw,
                    PatchError(
                        "no backup or interrupted patch below this folder",
                        path=raw,
                        code="no-backup",
                        hint="backups are made by patching with --backup",
                    ),
                )
            elif not found:
                fail(
                    raw,
                    PatchError(
                        f"no {SUFFIX} files in this folder or below it",
                        path=raw,
                        code="no-files",
                        hint=f"pass a {SUFFIX} file, or a folder that holds some",
                    ),
                )
        elif os.path.islink(raw) and not os.path.exists(raw):
            found = []
            fail(
                raw,
                PatchError(
                    "is a broken symbolic link",
                    path=raw,
                    code="not-found",
                    expected="a link to a file",
                    got=f"a link to {os.readlink(raw)}, which is missing",
                    hint="fix or remove the link",
                ),
            )
        elif not os.path.lexists(raw):
            found = []
            fail(raw, PatchError("no such file or directory", path=raw, code="not-found", hint="check the path"))
        else:
            found = [raw]
        for path in found:
            key = os.path.normpath(path)
            if key not in seen:
                seen.add(key)
                files.append(path)
    return files


def _with_hint(exc: PatchError) -> PatchError:
    """Give an error without a hint the usual one for its kind, so every line says what to do."""
    if not exc.hint:
        exc.hint = _DEFAULT_HINTS.get(exc.code) or (_HEADER_HINT if isinstance(exc, HeaderError) else None)
        exc.args = (exc.render(),)
    return exc


def _run_one(console: Console, work: Callable[[], Record], path: str) -> Record:
    """Run one file's work; turn every failure into a FAILED record and one error line."""
    try:
        return work()
    except PatchError as exc:
        error = _with_hint(exc.with_path(path))
        console.error(error.render())
        return Record(path, Status.FAILED, error=error)
    except (KeyboardInterrupt, SystemExit, BrokenPipeError):
        raise  # Ctrl-C, an exit, or a reader that stopped reading (`| head`): end the run, not this file
    except Exception as exc:  # a bug: still one line, the traceback only with -v
        error = PatchError(
            f"internal error: {type(exc).__name__}: {exc}",
            path=path,
            code="internal",
            hint="please report this; -v shows the traceback",
        )
        console.error(error.render())
        if console.verbose:
            traceback.print_exc()
        return Record(path, Status.FAILED, error=error)


def _summarize(console: Console, report: Report, paths: Sequence[str] = (), *, dry_run: bool = False) -> None:
    """Print the summary line when it adds something: several files, a folder given, or a dry run."""
    if len(report.records) > 1 or dry_run or any(os.path.isdir(p) for p in paths):
        console.status(report.summary())


def _usage_error(console: Console, message: str) -> NoReturn:
    console.error(message)
    sys.exit(ExitCode.USAGE)


def _fail(console: Console, exc: PatchError, code: ExitCode) -> NoReturn:
    console.error(_with_hint(exc).render())
    sys.exit(code)


def _finish_with_error(console: Console, exc: PatchError) -> NoReturn:
    """Print ``exc`` as the run's only error line and exit with the code its class means."""
    _fail(console, exc, exit_code_for(exc))


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _dtype_histogram(header: Header) -> dict[str, tuple[int, int]]:
    """Return ``{dtype: (tensor count, bytes)}``, largest first."""
    counts: dict[str, list[int]] = {}
    for info in header.tensors.values():
        entry = counts.setdefault(info.dtype, [0, 0])
        entry[0] += 1
        entry[1] += info.nbytes
    ordered = sorted(counts.items(), key=lambda item: (-item[1][1], item[0]))
    return {name: (count, size) for name, (count, size) in ordered}


def _header_summary(header: Header) -> list[str]:
    histogram = _dtype_histogram(header)
    width = max((len(name) for name in histogram), default=0)
    lines = [
        f"file: {_size(header.file_size)} ({header.file_size:,} bytes)",
        f"tensors: {len(header.tensors):,} ({_size(header.data_len)} of data)",
    ]
    for name, (count, size) in histogram.items():
        share = 100 * size / header.data_len if header.data_len else 0.0
        lines.append(f"  {name:<{width}}  {count:>7,} tensors  {_size(size):>10}  {share:5.1f}%")
    aligned = "8-byte aligned" if header.aligned else "NOT 8-byte aligned: some readers will refuse it"
    lines += [
        f"header: {header.header_len:,} bytes ({header.json_len:,} of JSON, {header.padding:,} spare: "
        f"a metadata change growing it by up to {header.padding:,} bytes is written in place)",
        f"data: {header.data_len:,} bytes at offset {header.data_start:,} ({aligned})",
        *[f"warning: {w}" for w in header.warnings],
    ]
    return lines


def _metadata_lines(header: Header) -> list[str]:
    if header.metadata is None:
        return ["metadata: none" + (" (__metadata__ is null)" if header.has_metadata_key else " (no __metadata__)")]
    count = len(header.metadata)
    lines = [f"metadata: {count:,} {'entry' if count == 1 else 'entries'}"]
    for key, value in header.metadata.items():
        shown = pretty_value(value)
        if len(shown) == 1:
            lines.append(f"  {key}: {shown[0]}")
        else:
            lines.append(f"  {key}:")
            lines += [f"    {line}" for line in shown]
    return lines


def _size(n: int) -> str:
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{n:,} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError  # unreachable: the loop returns at GiB


__all__ = ["Console", "main"]


# Registered last: cli_merge reuses this module's Console and helpers, so it must import a complete module.
from .cli_edit import models_command, set_command, unset_command  # noqa: E402
from .cli_merge import merge_command  # noqa: E402

for _command in (merge_command, set_command, unset_command, models_command):
    main.add_command(_command)
