"""Shared CLI helpers: recipe options and error printing (no heavy imports)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import click

EXIT_USAGE = 2

set_option = click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="Override a recipe value, validated like the file: training.epochs=3, "
    "modifiers.0.final_sparsity=0.8, or a variable by bare name (target_sparsity=0.8).",
)


def fail(message: str) -> None:
    """Print a one-line error (or several) to stderr and exit with status 2."""
    click.echo(message, err=True)
    sys.exit(EXIT_USAGE)


def load_or_exit(path: str, overrides: tuple[str, ...]) -> Any:
    """Load a recipe (a path, or a bundled recipe's name) or print every problem and exit 2."""
    from recipec.recipe.errors import RecipeError
    from recipec.recipe.load import load_recipe, resolve_recipe_path

    try:
        return load_recipe(resolve_recipe_path(path), overrides)
    except RecipeError as exc:
        n = len(exc.problems)
        lines = [str(p) for p in exc.problems]
        lines.append(f"{n} problem{'s' if n != 1 else ''} found.")
        fail("\n".join(lines))


def guarded(fn: Callable[[], Any], *errors: type[BaseException]) -> Any:
    """Run ``fn``; turn the given exception types into a clean exit-2 message."""
    try:
        return fn()
    except errors as exc:  # noqa: B030 - a tuple of types
        fail(f"error: {exc}")


def check_image_path(path: Any, option: str) -> None:
    """Exit 2 before any work when ``path``'s suffix is not an image format matplotlib writes."""
    from pathlib import Path

    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        fail(
            f"error: {option} {path}: {'.' + suffix if suffix else 'no file extension'} is not an image format; "
            "use .png, .svg or .pdf"
        )
