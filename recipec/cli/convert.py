"""``recipec convert``: turn a SparseML recipe into a recipec recipe."""

from __future__ import annotations

from pathlib import Path

import click

from recipec.cli._common import fail, fail_with_problems, to_stderr


def _report(conversion, echo) -> None:
    """Print what was not converted and the notes, one finding per line."""
    for title, items in (("not converted", conversion.unsupported), ("notes", conversion.notes)):
        if items:
            echo(f"{title} ({len(items)}):")
            for item in items:
                echo(f"  {item}")


@click.command("convert")
@click.argument("sparseml_recipe")
@click.option(
    "--output",
    "-o",
    default=None,
    type=click.Path(dir_okay=False),
    help="Write the recipec recipe here (default: print it to stdout, the report to stderr).",
)
@click.option(
    "--strict",
    is_flag=True,
    help="Fail (exit 2, nothing written) when any part of the recipe is not converted.",
)
@click.option("--overwrite", is_flag=True, help="Replace an existing --output file.")
def command(sparseml_recipe: str, output: str | None, strict: bool, overwrite: bool) -> None:
    """Convert SPARSEML_RECIPE (YAML, or a Markdown recipe card) into a recipec recipe.

    The result is validated before it is written. A summary and every modifier or field that
    has no recipec equivalent (with its line) are printed; nothing is dropped silently.

    \b
    Examples:
      recipec convert sparseml_recipe.yaml -o recipe.yaml
      recipec convert recipe.md --strict > recipe.yaml
    """
    from recipec.convert.sparseml import ConvertError, convert_file

    if output is not None and Path(output).resolve() == Path(sparseml_recipe).resolve():
        fail("--output must not be the SparseML recipe itself")
    if output is not None and Path(output).exists() and not overwrite:
        fail(f"{output} already exists: pass --overwrite to replace it")
    try:
        result = convert_file(sparseml_recipe)
    except ConvertError as exc:
        n = len(exc.problems)
        fail_with_problems(
            [*exc.problems, f"{n} problem{'s' if n != 1 else ''} found; nothing converted."]
        )
    if strict and result.unsupported:
        lines = [
            f"error: --strict: {len(result.unsupported)} part(s) of {sparseml_recipe} have no recipec equivalent:"
        ]
        lines += [f"  {item}" for item in result.unsupported]
        fail_with_problems([*lines, "nothing written."])
    if output is None:
        click.echo(result.text, nl=False)
        echo = to_stderr()  # the report goes to stderr
    else:
        try:
            Path(output).write_text(result.text, encoding="utf-8")
        except OSError as exc:
            fail(f"cannot write {output}: {exc.strerror}")
        echo = click.echo
    target = output or "stdout"
    echo(f"converted {sparseml_recipe} -> {target}: {result.summary()}")
    _report(result, echo)
