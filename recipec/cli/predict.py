"""``recipec predict``: labels and scores for raw text from a deployment folder, on the engine."""

from __future__ import annotations

import json
from pathlib import Path

import click

from recipec.cli._common import fail, quiet_hf, to_stderr


def _read_items(texts: tuple[str, ...], file: Path | None, sep: str) -> list[list[str]]:
    """Every input as its parts (a line or --text split at ``sep``)."""
    lines = list(texts)
    if file is not None:
        try:
            raw = file.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            fail(f"--file {file}: cannot read: {exc}")
        lines += [ln for ln in raw.splitlines() if ln.strip()]
    if not lines:
        fail("no input: pass --text TEXT (repeatable) or --file FILE with one input per line")
    return [ln.split(sep) if sep else [ln] for ln in lines]


@click.command("predict")
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("--text", "texts", multiple=True, help="An input (repeatable).")
@click.option(
    "--file",
    type=click.Path(path_type=Path, dir_okay=False),
    default=None,
    help="A file with one input per line (blank lines skipped).",
)
@click.option(
    "--sep",
    default="\t",
    show_default="tab",
    help="Splits an input into a sentence pair (text_a SEP text_b) or, for multiple choice, "
    "the context and its choices (context SEP choice SEP choice ...).",
)
@click.option(
    "--dtype",
    type=click.Choice(["fp32", "int8"]),
    default="fp32",
    show_default=True,
    help="int8: int8 weights per output channel, activations quantized per token.",
)
@click.option("--threads", type=int, default=None, help="Threads [default: torch's].")
@click.option("--batch-size", type=int, default=16, show_default=True)
@click.option(
    "--max-length", type=int, default=None, help="Truncate to this many tokens [default: model's]."
)
@click.option(
    "--no-verify",
    is_flag=True,
    help="Skip the check of the engine's outputs against onnxruntime at load.",
)
def command(
    folder: Path,
    texts: tuple[str, ...],
    file: Path | None,
    sep: str,
    dtype: str,
    threads: int | None,
    batch_size: int,
    max_length: int | None,
    no_verify: bool,
) -> None:
    """Predict labels for raw text with the model in FOLDER (what `recipec export` wrote).

    Runs recipec's engine: sparse kernels for the pruned linear layers where a measurement
    says they are faster, torch for the rest. Prints one JSON line per input, in order:
    {"input": ..., "label": ..., "label_name": ..., "scores": [...]} (label_name when the
    model's config names its labels; "score" for a regression head).

    \b
    Examples:
      recipec predict runs/quickstart/onnx --text "a charming, funny film"
      recipec predict runs/quickstart/onnx --file reviews.txt --dtype int8
      printf 'a man plays\\ta person plays music\\n' | recipec predict DIR --file /dev/stdin
    """
    if (threads is not None and threads < 1) or batch_size < 1:
        fail("--threads and --batch-size must be positive")
    if max_length is not None and max_length < 2:
        fail("--max-length must be at least 2")
    items = _read_items(texts, file, sep)
    quiet_hf()
    from recipec.runtime.engine import EngineError, load

    try:
        engine = load(
            folder,
            dtype,
            threads=threads,
            verify=not no_verify,
            tokenizer="required",
            log=to_stderr(),
        )
        results = engine.predict(items, batch_size=batch_size, max_length=max_length)
    except EngineError as exc:
        fail(str(exc))
    for parts, result in zip(items, results):
        shown = parts[0] if len(parts) == 1 else parts
        click.echo(json.dumps({"input": shown, **result}, ensure_ascii=False))
