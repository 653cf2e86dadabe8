"""``nunchaku-patch models``: the models ``--model`` knows, read from the registry (:mod:`patcher.models`)."""

from __future__ import annotations

import json

import click

from ..models import all_models, config_note, model_json
from .options import CONTEXT_SETTINGS, Command


@click.command("models", cls=Command, context_settings=CONTEXT_SETTINGS, short_help="List the models --model knows.")
@click.option("--json", "json_mode", is_flag=True, help="Print one JSON record per model on stdout.")
def command(json_mode: bool) -> None:
    """List the known models: name, family, repository, the config shipped for it and how sure it is, aliases.

    --model accepts the name or any alias (case-insensitive), or a Hugging Face repo id.

    \b
    Examples:
      nunchaku-patch models
      nunchaku-patch models --json
    """
    known = all_models()
    if json_mode:
        for model in known:
            click.echo(json.dumps(model_json(model), ensure_ascii=False))
        return
    width = max(len(m.name) for m in known)
    family_width = max(len(m.family.value) for m in known)
    for index, model in enumerate(known):
        if index:
            click.echo()
        click.echo(f"{model.name:<{width}}  {model.family.value:<{family_width}}  {model.repo_id}, {model.repo_file}")
        click.echo(f"  config: {config_note(model)} ({model.certainty})")
        click.echo(f"  aliases: {', '.join(model_json(model)['aliases'])}")


__all__ = ["command"]
