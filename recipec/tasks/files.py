"""Local task data: a folder with train and dev files, or two files [TRAIN, EVAL].

Formats: GLUE-style TSV with a header (split on tabs, no quoting), CSV, JSONL and JSON arrays
(text + label records, CommonsenseQA, WinoGrande). In a folder, ``train*`` and
``dev*``/``validation*`` files are used and ``test*`` files (unlabelled) are ignored with a
note. Every problem names the file and, where it applies, the line.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from recipec.tasks.base import Example, TaskData, TaskError
from recipec.tasks.known import KNOWN, resolve_task_name
from recipec.tasks.labels import build_task, finish_task
from recipec.tasks.records import TEXT_HELP, RawRow, parse_records, pick_columns

__all__ = ["load_local", "read_file"]

_EXTENSIONS = (".tsv", ".csv", ".jsonl", ".json")
_EVAL_PREFIXES = ("dev", "validation", "valid", "val", "eval")


def _read_delimited(path: Path) -> Iterator[tuple[dict[str, str], str]]:
    """Yields ``(row, "file:line")`` from a TSV (GLUE: split on tabs, no quoting) or CSV file."""
    is_tsv = path.suffix.lower() == ".tsv"
    with path.open(encoding="utf-8-sig", newline="") as f:
        if is_tsv:
            lines: Iterator[tuple[int, list[str]]] = (
                (i, line.rstrip("\r\n").split("\t")) for i, line in enumerate(f, 1) if line.strip()
            )
        else:
            reader = csv.reader(f)
            lines = ((reader.line_num, row) for row in reader if any(c.strip() for c in row))
        try:
            _, header = next(lines)
        except StopIteration:
            raise TaskError(f"{path}: the file is empty") from None
        except csv.Error as e:
            raise TaskError(f"{path}:1: {e}") from e
        header = [h.strip() for h in header]
        if pick_columns(header) is None:
            raise TaskError(f"{path}:1: header {header} has no recognised text column; {TEXT_HELP}")
        sep = "tab-separated" if is_tsv else "comma-separated"
        try:
            for lineno, fields in lines:
                if len(fields) != len(header):
                    raise TaskError(
                        f"{path}:{lineno}: expected {len(header)} {sep} fields "
                        f"({', '.join(header)}), got {len(fields)}"
                    )
                yield dict(zip(header, fields)), f"{path}:{lineno}"
        except csv.Error as e:
            raise TaskError(f"{path}: {e}") from e


def _read_json(path: Path) -> Iterator[tuple[Any, str]]:
    """Yields ``(record, "file:line")`` from JSONL, or from a JSON array (``file:item N``)."""
    with path.open(encoding="utf-8-sig") as f:
        text = f.read()
    stripped = text.lstrip()
    if path.suffix.lower() == ".json" and stripped.startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{e.lineno}: invalid JSON: {e.msg}") from e
        for i, item in enumerate(items):
            yield item, f"{path}:item {i}"
        return
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield json.loads(line), f"{path}:{lineno}"
        except json.JSONDecodeError as e:
            raise TaskError(f"{path}:{lineno}: invalid JSON ({e.msg})") from e


def read_file(path: Path) -> list[Example] | list[RawRow]:
    """Parsed rows of one data file, by suffix: ``.tsv``/``.csv`` or ``.jsonl``/``.json``."""
    if not path.exists():
        raise TaskError(f"{path}: no such file")
    if path.is_dir():
        raise TaskError(f"{path}: expected a file, got a directory")
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        return parse_records(_read_delimited(path), str(path))
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
            "or pass data=[TRAIN, EVAL] explicitly"
        )
    exact_hits = [p for p in candidates if p.stem.lower() in exact]
    if len(exact_hits) == 1:
        return exact_hits[0]
    if len(candidates) == 1:
        return candidates[0]
    names = ", ".join(sorted(p.name for p in candidates))
    raise TaskError(
        f"{directory}: several {what} files ({names}); pass data=[TRAIN, EVAL] explicitly"
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
    task: str | None, paths: list[Path], max_train: int | None, max_eval: int | None, seed: int
) -> TaskData:
    """Loads local data: ``[DIR]`` (train and dev files found in it) or ``[TRAIN, EVAL]``.

    Args:
        task: A name for the task; a known name also fixes its metrics and label count.
            Without it the folder's name is used (and matched against known names when the
            layout fits).
        paths: One directory or two files.
        max_train: Keep at most this many train examples (seeded subset).
        max_eval: Same for eval examples.
        seed: Seed for subsampling.
    """
    notes: list[str] = []
    train_path, eval_path, default_name = _split_paths(paths, notes)
    name = task or default_name
    canonical = resolve_task_name(name)
    known = KNOWN.get(canonical) if canonical else None
    if canonical == "builtin":
        raise TaskError("the built-in task is generated, it takes no data files; drop --data")
    train_rows, eval_rows = read_file(train_path), read_file(eval_path)
    if task is None and known is not None:
        # a folder that happens to share a known task's name: use its metrics only if the
        # layout matches
        if (known.kind == "multiple_choice") != isinstance(train_rows[0], Example):
            known = None
    info, train, dev = build_task(name, known, train_rows, eval_rows, f"{train_path} | {eval_path}")
    return finish_task(info, train, dev, max_train, max_eval, seed, notes)


def _split_paths(paths: list[Path], notes: list[str]) -> tuple[Path, Path, str]:
    """``(train file, eval file, default task name)`` for ``[DIR]`` or ``[TRAIN, EVAL]``."""
    if len(paths) == 1:
        directory = paths[0]
        if not directory.exists():
            raise TaskError(f"{directory}: no such file or directory")
        if not directory.is_dir():
            raise TaskError(
                f"{directory}: a single data path must be a directory with train and dev files; "
                "to use files, pass two paths: data=[TRAIN, EVAL]"
            )
        train_path, eval_path = _find_split_files(directory, notes)
        return train_path, eval_path, directory.resolve().name
    if len(paths) == 2:
        train_path, eval_path = paths
        return train_path, eval_path, train_path.resolve().parent.name or train_path.stem
    raise TaskError(f"data takes one directory or two files [TRAIN, EVAL], got {len(paths)} paths")
