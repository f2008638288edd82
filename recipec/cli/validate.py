"""``recipec validate``: check a recipe and print a one-line summary."""

from __future__ import annotations

import click

from recipec.cli._common import load_or_exit, set_option


@click.command("validate")
@click.argument("recipe")
@set_option
def command(recipe: str, overrides: tuple[str, ...]) -> None:
    """Validate RECIPE (a path or a bundled recipe name) and print a summary.

    Exit status 0 when valid, 2 with every problem as FILE:LINE:COL: field: message.

    \b
    Examples:
      recipec validate recipes/downstream_gmp_90.yaml
      recipec validate my.yaml --set target_sparsity=0.8 --set training.epochs=3
    """
    loaded = load_or_exit(recipe, overrides)
    click.echo(f"ok: {recipe}: {loaded.summary()}")
