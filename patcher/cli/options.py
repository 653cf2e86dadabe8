"""What every command shares on the click side: the command class, usage-error lines and the option sets.

A command module declares itself with ``@click.command(NAME, cls=Command, context_settings=CONTEXT_SETTINGS)``
so its usage errors are our one-line ``error: ...``, not click's usage block.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from ..facts import PRECISIONS
from ..report import ExitCode
from .console import colour_for

F = TypeVar("F", bound=Callable[..., Any])

CONTEXT_SETTINGS: dict[str, Any] = {"help_option_names": ["-h", "--help"], "max_content_width": 100}


class OneLineError(click.ClickException):
    """A click usage error shown as our one-line ``error: ...`` instead of click's usage block."""

    exit_code = ExitCode.USAGE

    def show(self, file: Any = None) -> None:
        """Print ``error: message`` on stderr."""
        stream = file if file is not None else sys.stderr
        label = click.style("error: ", fg="red", bold=True) if colour_for(stream) else "error: "
        click.echo(label + self.message, file=stream, color=colour_for(stream))


class Interrupted(OneLineError):
    """Ctrl-C: one line and the shell's exit code for SIGINT, instead of click's ``Aborted!``."""

    exit_code = ExitCode.INTERRUPTED


def usage_line(exc: click.UsageError, where: str) -> str:
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


class Command(click.Command):
    """A click command whose usage errors are one ``error:`` line naming the command's ``--help``."""

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as exc:
            # click leaves ctx unset on some parser errors: name the subcommand ourselves.
            where = " ".join(p for p in (parent.command_path if parent else "", info_name or "") if p)
            raise OneLineError(usage_line(exc, where)) from None


def _complete_model(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[str]:
    """Complete ``--model`` with the known models' names, then their aliases (read from the registry)."""
    from ..models import completion_names

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
        click.option(
            "--config-yaml", multiple=True, metavar="FILE", help="One deepcompressor YAML; repeat for each (in order)."
        ),
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


def output_options(func: F) -> F:
    """Add ``--json``, ``-v`` and ``-q`` (every command)."""
    func = click.option("-q", "--quiet", is_flag=True, help="Print only errors and the data.")(func)
    func = click.option("-v", "--verbose", count=True, help="Say more: evidence, each check, tracebacks.")(func)
    func = click.option("--json", "json_mode", is_flag=True, help="Print one JSON record per file on stdout.")(func)
    return func


__all__ = [
    "CONTEXT_SETTINGS",
    "Command",
    "Interrupted",
    "OneLineError",
    "config_options",
    "output_options",
    "usage_line",
]
