"""``recipec validate``: check a recipe and print a one-line summary."""

from __future__ import annotations

import click

from recipec.cli._common import load_or_exit, set_option


def summary(recipe) -> str:
    """One line: stages, modifiers by type, training length."""
    parts = []
    for stage in recipe.resolved_stages():
        training = recipe.stage_training(stage)
        if training.prune_only:
            length = "prune-only"
        else:
            length = f"{training.epochs:g} epochs" if training.epochs is not None else f"{training.steps} steps"
        kinds = ", ".join(m.type for m in stage.modifiers) or "no modifiers"
        parts.append(f"{stage.name}: {length}, {kinds}")
    return "; ".join(parts)


@click.command("validate")
@click.argument("recipe")
@set_option
def command(recipe: str, overrides: tuple[str, ...]) -> None:
    """Validate RECIPE (a path or a bundled recipe name) and print a summary.

    Exit status 0 when valid, 2 with every problem as FILE:LINE:COL: field: message.

    \b
    Examples:
      recipec validate recipes/bert_gmp_90.yaml
      recipec validate my.yaml --set target_sparsity=0.8 --set training.epochs=3
    """
    loaded = load_or_exit(recipe, overrides)
    click.echo(f"ok: {recipe}: {summary(loaded)}")
