"""The ``nunchaku-patch`` command group: ``nunchaku-patch PATH...`` means ``nunchaku-patch patch PATH...``.

Each command lives in its own module of this package and is imported only when it runs (or for ``--help``),
so ``nunchaku-patch FILE`` loads the patch path and nothing else. To add a command: write
``patcher/cli/NAME.py`` defining ``command`` (``@click.command(NAME, cls=Command, ...)``, see
:mod:`patcher.cli.options`), and add it to :data:`COMMANDS`.
"""

from __future__ import annotations

import contextlib
import gc
import importlib
import os
import sys
from typing import TYPE_CHECKING, Any

import click

from .. import __version__
from ..report import ExitCode
from .options import CONTEXT_SETTINGS, Command, Interrupted, OneLineError, usage_line

if TYPE_CHECKING:
    from click.shell_completion import CompletionItem

#: Command name -> module (relative to this package) whose ``command`` attribute is the click command.
COMMANDS: dict[str, str] = {
    "patch": ".patch",
    "validate": ".validate",
    "inspect": ".inspect",
    "restore": ".restore",
    "merge": ".merge",
    "set": ".set",
    "unset": ".unset",
    "models": ".models",
    "scan": ".scan",
}

#: What a first word that is no command means: the arguments of ``patch``.
DEFAULT_COMMAND = "patch"


class CommandGroup(click.Group):
    """The group: commands imported on first use, a default command, one-line usage errors, clean exits."""

    command_class = Command

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*COMMANDS, *self.commands})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in self.commands and cmd_name in COMMANDS:
            module = importlib.import_module(COMMANDS[cmd_name], __package__)
            self.add_command(module.command, cmd_name)
        return self.commands.get(cmd_name)

    def shell_complete(self, ctx: click.Context, incomplete: str) -> list[CompletionItem]:
        items = super().shell_complete(ctx, incomplete)
        if incomplete.startswith("-"):
            return items
        from click.shell_completion import CompletionItem  # only completion needs it

        # `nunchaku-patch PATH...` patches: a file name is as likely as a command name here.
        return [*items, CompletionItem(incomplete, type="file")]

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.list_commands(ctx) and args[0] not in ("-h", "--help", "--version"):
            self._refuse_typo(args[0])
            args = [DEFAULT_COMMAND, *args]
        return super().parse_args(ctx, args)

    def _refuse_typo(self, word: str) -> None:
        """Refuse a first word that is no path but looks like a mistyped command (``valdiate``).

        Taken as a path, it would fail while the other arguments got patched in place.
        """
        if word.startswith("-") or os.path.lexists(word):
            return
        import difflib  # only for a first word that is neither a command nor a path

        close = difflib.get_close_matches(word, list(COMMANDS), n=1, cutoff=0.6)
        if close:
            raise OneLineError(f"no such command '{word}' (did you mean {close[0]}?). see 'nunchaku-patch --help'")

    def make_context(
        self, info_name: str | None, args: list[str], parent: click.Context | None = None, **extra: Any
    ) -> click.Context:
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.exceptions.NoArgsIsHelpError:
            raise  # click prints the help: the friendliest answer to a bare `nunchaku-patch`
        except click.UsageError as exc:
            raise OneLineError(usage_line(exc, info_name or "nunchaku-patch")) from None

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
            raise Interrupted("interrupted; the files already done stay patched, the rest are untouched") from None


@click.group("nunchaku-patch", cls=CommandGroup, context_settings=CONTEXT_SETTINGS)
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


def run() -> None:
    """Run the command line as a process (the ``nunchaku-patch`` script, ``python -m patcher``) and exit.

    On the way out the collector is frozen (:func:`gc.freeze`): the interpreter's shutdown then skips a full
    collection over every object the run made (the tensor table, the configs, the modules), 7-9 ms of a
    60 ms patch. Nothing needs that collection: every file is written, fsynced and closed before ``main``
    returns, and the standard streams are flushed at shutdown as usual. Tests call ``main`` directly.
    """
    try:
        main()
    finally:
        gc.freeze()


__all__ = ["COMMANDS", "CommandGroup", "main", "run"]
