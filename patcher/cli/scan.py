"""``nunchaku-patch scan``: list old conversions in folders, the Hugging Face cache and Hub repos, with their fixes."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

import click

from ..errors import PatchError
from ..report import Record, Report, Status
from .batch import REMOTE, usage_error, with_hint
from .console import Console
from .options import CONTEXT_SETTINGS, Command, output_options
from .render import findings_json, size

if TYPE_CHECKING:
    from ..scan import Item

HEADINGS = ("STATUS", "KIND", "MODEL", "SIZE", "LOADS IN", "PATH")
NOT_SVDQUANT = "not an SVDQuant file"
#: The fields of every ``scan`` record (``null`` where they do not apply, e.g. a path that could not be read).
SCAN_FIELDS = (
    "path",
    "status",
    "strategy",
    "kind",
    "fix",
    "source",
    "repo",
    "revision",
    "family",
    "precision",
    "rank",
    "size",
    "verdicts",
    "note",
    "findings",
    "error",
)


@click.command(
    "scan",
    cls=Command,
    context_settings=CONTEXT_SETTINGS,
    short_help="List old conversions and the fix for each.",
)
@click.argument("paths", nargs=-1, metavar="[PATH | hf://OWNER/REPO[@REV][/PATH]]...")
@click.option("--hf-cache", is_flag=True, help="Also list every model file in the Hugging Face cache.")
@click.option(
    "--fix-dir",
    metavar="DIR",
    default="nunchaku-patched",
    show_default=True,
    help="Where the fixes of cache and Hub files write their patched copies.",
)
@output_options
def command(paths: tuple[str, ...], hf_cache: bool, fix_dir: str, json_mode: bool, verbose: int, quiet: bool) -> None:
    """List every .safetensors file and deepcompressor folder below PATH..., what it is, and its fix.

    Read-only: only headers are read (for hf:// paths with range requests, nothing else is
    downloaded). --hf-cache adds every model in the Hugging Face cache (HF_HUB_CACHE, or
    HF_HOME/hub); cache files are shared blobs, so their fixes write patched copies into
    --fix-dir. Exits 1 when anything needs work, 3 when a path cannot be read.

    \b
    Examples:
      nunchaku-patch scan ~/ComfyUI/models
      nunchaku-patch scan --hf-cache --fix-dir ~/ComfyUI/models/diffusion_models
      nunchaku-patch scan hf://OWNER/REPO --json
    """
    from .. import scan

    console = Console(verbose=verbose, quiet=quiet, json_mode=json_mode, fields=SCAN_FIELDS)
    if not paths and not hf_cache:
        usage_error(
            console, "name a PATH or hf://OWNER/REPO to scan, or pass --hf-cache. see 'nunchaku-patch scan --help'"
        )
    report = Report()
    items: list[Item] = []

    def fail(raw: str, exc: PatchError) -> None:
        error = with_hint(exc.with_path(raw))
        console.error(error.render())
        console.record(report.add(Record(raw, Status.FAILED, error=error)))

    def take(make: Callable[[], Iterable[Item]], raw: str) -> None:
        try:
            for item in make():
                items.append(item)
                status = (
                    Status.INVALID
                    if item.needs_work
                    else Status.SKIPPED
                    if item.judgement.kind == NOT_SVDQUANT
                    else Status.VALID
                )
                findings = findings_json(item.judgement.findings)
                console.record(report.add(Record(item.path, status, details=scan.item_json(item), findings=findings)))
        except PatchError as exc:
            fail(raw, exc)

    for raw in paths:
        if raw.startswith(REMOTE):
            take(functools.partial(_hub_items, raw, fix_dir), raw)
        else:
            take(functools.partial(scan.scan_paths, [raw], fix_dir=fix_dir), raw)
    if hf_cache:
        take(functools.partial(scan.scan_hf_cache, fix_dir=fix_dir), "--hf-cache")
    if not json_mode:
        table(console, items)
    needing = sum(1 for i in items if i.needs_work)
    others = sum(1 for i in items if i.judgement.kind == NOT_SVDQUANT)
    console.status(
        f"{len(items):,} found: {needing:,} need work, {len(items) - needing - others:,} ok, {others:,} not SVDQuant"
    )
    sys.exit(report.exit_code)


def _hub_items(raw: str, fix_dir: str) -> Iterator[Item]:
    from ..hub import parse_hub_path
    from ..scan import scan_hub
    from .remote import client

    return scan_hub(parse_hub_path(raw), client(), fix_dir=fix_dir)


def _model(item: Item) -> str:
    j = item.judgement
    parts = (j.family.value if j.family is not None else "", j.precision or "", f"r{j.rank}" if j.rank else "")
    return " ".join(p for p in parts if p) or "-"


def _loads_in(verdicts: Mapping[str, bool]) -> str:
    if not verdicts:
        return "-"
    accepted = [key for key, ok in verdicts.items() if ok]
    return "all" if len(accepted) == len(verdicts) else ", ".join(accepted) or "none"


def label(item: Item) -> str:
    """Return how the table names a row: cache files by repo, revision and path in the repo."""
    if item.source == "hf-cache" and item.repo:
        inside = item.path.split("/snapshots/", 1)[-1].partition("/")[2]
        return f"{item.repo}@{item.revision}" + (f"/{inside}" if inside else "") + " (HF cache)"
    return item.path


def table(console: Console, items: Sequence[Item]) -> None:
    """Print the rows as an aligned table, then the fix of each row that needs work."""
    if not items:
        return
    rows = [
        (
            "needs work" if item.needs_work else "ok",
            item.judgement.kind,
            _model(item),
            size(item.size) if item.size is not None else "?",
            _loads_in(item.judgement.verdicts),
            label(item),
        )
        for item in items
    ]
    widths = [max(len(heading), *(len(row[i]) for row in rows)) for i, heading in enumerate(HEADINGS)]

    def line(cells: Sequence[str]) -> str:
        return "  ".join(cell.ljust(width) for cell, width in zip(cells[:-1], widths, strict=False)) + "  " + cells[-1]

    console.data(console.style(line(HEADINGS), bold=True))
    for row in rows:
        colour = "red" if row[0] == "needs work" else None if row[1] == NOT_SVDQUANT else "green"
        console.data(console.style(line(row), fg=colour) if colour else line(row))
    needing = [item for item in items if item.needs_work]
    if needing:
        console.data()
        console.data(console.style("to fix:", bold=True))
        for item in needing:
            console.data(f"  {item.fix}" if item.fix else f"  # {label(item)}: {item.note or 'no automatic fix'}")


__all__ = ["command", "label", "table"]
