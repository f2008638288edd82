"""Shared CLI helpers: recipe options and error printing (no heavy imports)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, NoReturn

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


def fail(message: str, code: int = EXIT_USAGE) -> NoReturn:
    """Print ``error: message`` to stderr and exit (2: bad input; 1: the work itself failed)."""
    click.echo(f"error: {message}", err=True)
    sys.exit(code)


def fail_with_problems(lines: list[str], code: int = EXIT_USAGE) -> NoReturn:
    """Print a list of problems (each already located, e.g. ``FILE:LINE:COL: ...``) and exit."""
    click.echo("\n".join(lines), err=True)
    sys.exit(code)


def to_stderr(indent: str = "") -> Callable[[str], None]:
    """A progress logger for library calls: each message on its own stderr line."""
    return lambda message: click.echo(f"{indent}{message}", err=True)


def quiet_hf() -> None:
    """Silence Hugging Face progress bars and info logs on the terminal."""
    import os

    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def load_or_exit(path: str, overrides: tuple[str, ...], model: Any = None) -> Any:
    """Load a recipe (a path, or a bundled recipe's name) or print every problem and exit 2
    (``model``: facts to check structured modifiers against, see ``load_recipe_text``)."""
    from recipec.recipe.errors import RecipeError
    from recipec.recipe.load import load_recipe, resolve_recipe_path

    try:
        return load_recipe(resolve_recipe_path(path), overrides, model=model)
    except RecipeError as exc:
        n = len(exc.problems)
        lines = [str(p) for p in exc.problems]
        lines.append(f"{n} problem{'s' if n != 1 else ''} found.")
        fail_with_problems(lines)


def check_image_path(path: Any, option: str) -> None:
    """Exit 2 before any work when ``path``'s suffix is not an image format matplotlib writes."""
    from pathlib import Path

    from matplotlib.backend_bases import FigureCanvasBase

    formats = FigureCanvasBase.get_supported_filetypes()
    suffix = Path(path).suffix.lower().lstrip(".")
    if suffix not in formats:
        fail(
            f"{option} {path}: {'.' + suffix if suffix else 'no file extension'} is not an image format; "
            "use .png, .svg or .pdf"
        )
