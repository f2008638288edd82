"""Local task data: a folder with train and dev files, or two files (train, then eval).

Formats: GLUE-style TSV with a header (split on tabs, no quoting), GLUE's headerless CoLA TSV
(source, label, annotation, sentence), CSV, JSONL and JSON arrays (text + label records,
CommonsenseQA, WinoGrande), all UTF-8. In a folder, ``train*`` and ``dev*``/``validation*``
files are used and ``test*`` files (unlabelled) are ignored with a note. Every problem (binary
or non-UTF-8 bytes, ragged rows, bad JSON, odd labels) names the file and, where it applies,
the line or byte offset.
"""

from __future__ import annotations

import codecs
import csv
import io
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recipec.tasks.base import Example, TaskData, TaskError, TaskOptions
from recipec.tasks.known import KNOWN, KnownTask, resolve_task_name
from recipec.tasks.labels import build_task, finish_task
from recipec.tasks.records import TEXT_HELP, RawRow, parse_records, pick_columns

__all__ = ["DATA_FORMS", "load_local", "read_file", "read_text"]

_EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json")
_EVAL_PREFIXES = ("dev", "validation", "valid", "val", "eval")
_FORMATS = "TSV, CSV, JSONL or JSON"
DATA_FORMS = "--data TRAIN EVAL (or --data DIR)"
"""How the command line takes local data, for messages (``load_task(data=...)`` in Python)."""
_HEADERLESS = "GLUE's headerless CoLA files are recognised; every other GLUE TSV has a header line"


def read_text(path: Path) -> str:
    """The text of a data file, decoded as UTF-8 (a byte-order mark is skipped).

    Raises:
        TaskError: The file cannot be read, is binary (a NUL byte), UTF-16, or not UTF-8; the
            message names the file, the byte offset and the line.
    """
    try:
        data = path.read_bytes()
    except OSError as e:
        raise TaskError(f"{path}: cannot read the file: {e.strerror or e}") from None
    if data.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        raise TaskError(f"{path}: the file is UTF-16 text; save it as UTF-8")
    nul = data.find(b"\x00")
    if nul >= 0:
        line = data.count(b"\n", 0, nul) + 1
        raise TaskError(
            f"{path}:{line}: not a text file (a NUL byte at byte offset {nul}); "
            f"expected UTF-8 {_FORMATS}"
        )
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        raise TaskError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset "
            f"{e.start}); save the file as UTF-8"
        ) from None


# GLUE's CoLA train/dev files have no header: source code, label, original annotation, sentence.
_COLA_COLUMNS = ["source", "label", "annotation", "sentence"]
_COLA_SOURCE = re.compile(r"^[A-Za-z_]+[0-9]*$")


def _is_cola_row(fields: list[str]) -> bool:
    """Whether a headerless first line is a GLUE CoLA row (``gj04<TAB>1<TAB><TAB>sentence``)."""
    return (
        len(fields) == 4
        and bool(_COLA_SOURCE.match(fields[0].strip()))
        and fields[1].strip() in ("0", "1")
        and fields[2].strip() in ("", "*", "?", "??", "#")
        and bool(fields[3].strip())
    )


def _no_header_message(path: Path, header: list[str], is_tsv: bool) -> str:
    """Why the first line is no usable header, and what to add."""
    last = header[-1].strip() if header else ""
    if re.fullmatch(r"[+-]?[0-9.eE+-]+", last) and len(header) > 1:
        sep = "<TAB>" if is_tsv else ","
        return (
            f"{path}:1: the first line looks like data, not a header: add a header line such "
            f"as 'sentence{sep}label' (or 'sentence1{sep}sentence2{sep}label'); {_HEADERLESS}"
        )
    return f"{path}:1: header {header} has no recognised text column; {TEXT_HELP}"


def _delimited_lines(path: Path, text: str, is_tsv: bool) -> Iterator[tuple[int, list[str]]]:
    """``(line number, fields)`` of the non-blank lines: tabs without quoting (TSV) or CSV."""
    stream = io.StringIO(text, newline="")
    if is_tsv:
        for i, line in enumerate(stream, 1):
            if line.strip():
                yield i, line.rstrip("\r\n").split("\t")
        return
    reader = csv.reader(stream)
    try:
        for row in reader:
            if any(c.strip() for c in row):
                yield reader.line_num, row
    except csv.Error as e:
        raise TaskError(f"{path}:{reader.line_num}: {e}") from None


def _read_delimited(path: Path, notes: list[str]) -> Iterator[tuple[dict[str, str], str]]:
    """Yields ``(row, "file:line")`` from a TSV (GLUE: split on tabs, no quoting) or CSV file.

    A TSV without a header whose first line is a GLUE CoLA row is read with CoLA's columns.
    """
    is_tsv = path.suffix.lower() == ".tsv"
    lines = _delimited_lines(path, read_text(path), is_tsv)
    first = next(lines, None)
    if first is None:
        raise TaskError(f"{path}: the file is empty")
    _, header = first
    header = [h.strip() for h in header]
    if pick_columns(header) is None:
        if not (is_tsv and _is_cola_row(header)):
            raise TaskError(_no_header_message(path, header, is_tsv))
        notes.append(f"{path}: no header; read as GLUE CoLA ({', '.join(_COLA_COLUMNS)})")
        lines = itertools.chain([first], lines)
        header = _COLA_COLUMNS
    sep = "tab-separated" if is_tsv else "comma-separated"
    for lineno, fields in lines:
        if len(fields) != len(header):
            raise TaskError(
                f"{path}:{lineno}: expected {len(header)} {sep} fields "
                f"({', '.join(header)}), got {len(fields)}"
            )
        yield dict(zip(header, fields)), f"{path}:{lineno}"


def _json_value(text: str, where: str) -> Any:
    """One JSON document; every way it can fail becomes a TaskError naming ``where``."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise TaskError(f"{where}: invalid JSON ({e.msg}, column {e.colno})") from None
    except RecursionError:
        raise TaskError(f"{where}: JSON nested too deeply to be a data record") from None
    except ValueError as e:  # e.g. an integer of more than 4300 digits
        raise TaskError(f"{where}: unreadable JSON value ({e})") from None


def _read_json(path: Path) -> Iterator[tuple[Any, str]]:
    """Yields ``(record, "file:line")`` from JSONL, or from a JSON array (``file:item N``)."""
    text = read_text(path)
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        items = _json_value(text, str(path))
        for i, item in enumerate(items):
            yield item, f"{path}:item {i}"
        return
    for lineno, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        yield _json_value(line, f"{path}:{lineno}"), f"{path}:{lineno}"


def read_file(path: Path, notes: list[str] | None = None) -> list[Example] | list[RawRow]:
    """Parsed rows of one data file, by suffix: ``.tsv``/``.csv`` or ``.jsonl``/``.json``.

    Args:
        path: The file.
        notes: Remarks about how the file was read (a headerless GLUE layout) go here.
    """
    notes = [] if notes is None else notes
    if not path.exists():
        raise TaskError(f"{path}: no such file")
    if path.is_dir():
        raise TaskError(f"{path}: expected a file, got a directory")
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        return parse_records(_read_delimited(path, notes), str(path))
    if suffix in (".jsonl", ".json"):
        return parse_records(_read_json(path), str(path))
    raise TaskError(f"{path}: unsupported file type {suffix!r}; use .tsv, .csv, .jsonl or .json")


def _split_of(stem: str) -> str | None:
    """``train``, ``eval`` or ``test`` from a file name's stem; None for other files."""
    stem = stem.lower()
    if stem.startswith("train"):
        return "train"
    if stem.startswith(_EVAL_PREFIXES):
        return "eval"
    if stem.startswith("test"):
        return "test"
    return None


def _choose(candidates: list[Path], exact: tuple[str, ...], what: str, directory: Path) -> Path:
    """The one file of a split: the exact name (``dev``) among several, or the only one."""
    if not candidates:
        raise TaskError(
            f"{directory}: no {what} file found (expected names like "
            f"{'train.tsv' if what == 'train' else 'dev.tsv / validation.jsonl'}); "
            f"or pass the files: {DATA_FORMS}"
        )
    exact_hits = [p for p in candidates if p.stem.lower() in exact]
    if len(exact_hits) == 1:
        return exact_hits[0]
    if len(candidates) == 1:
        return candidates[0]
    names = ", ".join(sorted(p.name for p in candidates))
    raise TaskError(
        f"{directory}: several {what} files ({names}); pass the two you mean: {DATA_FORMS}"
    )


def _find_split_files(directory: Path, notes: list[str]) -> tuple[Path, Path]:
    """Picks the train and eval files of a directory; notes ignored test files."""
    files = sorted(
        p for p in directory.iterdir() if p.is_file() and p.suffix.lower() in _EXTENSIONS
    )
    by_split: dict[str, list[Path]] = {"train": [], "eval": [], "test": []}
    for p in files:
        split = _split_of(p.stem)
        if split:
            by_split[split].append(p)
    for p in by_split["test"]:
        notes.append(f"ignored {p} (a test split: no labels to train or evaluate on)")
    train = _choose(by_split["train"], ("train",), "train", directory)
    evaluation = _choose(by_split["eval"], ("dev", "validation"), "dev/validation", directory)
    return train, evaluation


def load_local(
    task: str | None,
    paths: list[Path],
    max_train: int | None,
    max_eval: int | None,
    seed: int,
    options: TaskOptions | None = None,
) -> tuple[TaskData, str]:
    """Loads local data: ``[DIR]`` (train and dev files found in it) or ``[TRAIN, EVAL]``.

    Args:
        task: A name for the task; a known name also fixes its metrics and label count.
            Without it the folder's name is used (and matched against known names when the
            layout fits).
        paths: One directory or two files.
        max_train: Keep at most this many train examples (seeded subset).
        max_eval: Same for eval examples.
        seed: Seed for subsampling.
        options: What the user said about the labels (``--task-kind``, ``--labels``).

    Returns:
        ``(task data, how its labels were read)``.
    """
    notes: list[str] = []
    train_path, eval_path, default_name = _split_paths(paths, notes)
    name = task or default_name
    canonical = resolve_task_name(name)
    known = KNOWN.get(canonical) if canonical else None
    if canonical == "builtin":
        raise TaskError("the built-in task is generated, it takes no data files; drop --data")
    train_rows, eval_rows = read_file(train_path, notes), read_file(eval_path, notes)
    if task is None and known is not None:
        # a folder that happens to share a known task's name: use its metrics only if the
        # layout matches
        if (known.kind == "multiple_choice") != isinstance(train_rows[0], Example):
            known = None
    notes.insert(0, _task_name_note(task, name, known))
    source = f"{train_path} | {eval_path}"
    info, train, dev, how = build_task(name, known, train_rows, eval_rows, source, options)
    return finish_task(info, train, dev, max_train, max_eval, seed, notes), how


def _task_name_note(task: str | None, name: str, known: KnownTask | None) -> str:
    """Which task the files are taken for, and why (a known name fixes labels and metrics)."""
    if known and task:
        return f"task {known.name} (--task {task}): its classes and metrics apply"
    if known:
        return (
            f"task {known.name}: the data folder is named {name!r}, like this known task, so "
            "its classes and metrics apply (--task NAME to call it something else)"
        )
    if task:
        return f"task {name!r} (--task): not a known task name, so labels and metrics are inferred"
    return (
        f"task {name!r} (the data folder's name): not a known task name, so labels and "
        "metrics are inferred from the files (--task NAME gives a known task's classes and "
        "metrics, e.g. --task glue/mrpc)"
    )


def _split_paths(paths: list[Path], notes: list[str]) -> tuple[Path, Path, str]:
    """``(train file, eval file, default task name)`` for ``[DIR]`` or ``[TRAIN, EVAL]``."""
    if len(paths) == 1:
        directory = paths[0]
        if not directory.exists():
            raise TaskError(f"{directory}: no such file or directory")
        if not directory.is_dir():
            raise TaskError(
                f"{directory}: a single data path must be a directory with train and dev files; "
                f"to use files, pass two paths, the train file then the eval file: {DATA_FORMS}"
            )
        train_path, eval_path = _find_split_files(directory, notes)
        return train_path, eval_path, directory.resolve().name
    if len(paths) == 2:
        train_path, eval_path = paths
        return train_path, eval_path, train_path.resolve().parent.name or train_path.stem
    raise TaskError(
        f"--data takes one directory or two files (the train file then the eval file), got "
        f"{len(paths)} paths: {DATA_FORMS}"
    )
