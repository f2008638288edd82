"""Rows (dicts from a file or a hub split) -> examples, shared by local files and the hub.

A source's layout is decided by its first row: CommonsenseQA (nested or flat choices) and
WinoGrande rows become multiple-choice ``Example``s; any other row must have a recognised text
column (and a label column) and becomes a ``RawRow`` whose label is typed later, once every
row of the task is known (``recipec.tasks.labels``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from recipec.tasks.base import Example, TaskError

__all__ = ["TEXT_HELP", "Columns", "RawRow", "parse_records", "pick_columns"]

# (first, second) text columns, tried in order; matched case-insensitively.
_PAIR_COLUMNS = (
    ("sentence1", "sentence2"),
    ("question1", "question2"),
    ("#1 string", "#2 string"),
    ("premise", "hypothesis"),
    ("question", "sentence"),
    ("text", "text_pair"),
    ("sentence", "text_pair"),
    ("text", "sentence2"),
    ("sentence", "sentence2"),
    ("text_a", "text_b"),
)
_SINGLE_COLUMNS = ("sentence", "text", "text_a", "question", "sentence1", "content", "review")
_LABEL_COLUMNS = ("label", "labels", "gold_label", "score", "is_duplicate", "quality", "target")
TEXT_HELP = (
    "expected a text column (sentence, text, sentence1/sentence2, question1/question2, "
    "premise/hypothesis, question/sentence, text/text_pair) and a label column (label, "
    "gold_label, score...)"
)


@dataclass
class RawRow:
    """A text example before its label is typed: raw label value and where it came from."""

    text: str
    text_pair: str | None
    label: Any
    where: str


@dataclass
class Columns:
    """The columns of a text row: first text, optional second text, optional label."""

    first: str
    second: str | None
    label: str | None


def pick_columns(keys: Iterable[str]) -> Columns | None:
    """Finds text and label columns among ``keys`` (case-insensitive); None if no text column."""
    lower = {k.strip().lower(): k for k in keys}
    label = next((lower[c] for c in _LABEL_COLUMNS if c in lower), None)
    for a, b in _PAIR_COLUMNS:
        if a in lower and b in lower:
            return Columns(lower[a], lower[b], label)
    for a in _SINGLE_COLUMNS:
        if a in lower:
            return Columns(lower[a], None, label)
    return None


def _record_format(record: Mapping[str, Any]) -> str:
    """Says which record layout a dict row has: ``csqa``, ``csqa_flat``, ``winogrande``, ``text``."""
    question = record.get("question")
    if isinstance(question, Mapping) and "stem" in question and "choices" in question:
        return "csqa"
    if (
        "choices" in record
        and isinstance(question, str)
        and isinstance(record["choices"], Mapping | list)
    ):
        return "csqa_flat"
    if {"sentence", "option1", "option2"} <= set(record):
        return "winogrande"
    return "text"


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip() == "")


def _csqa_example(record: Mapping[str, Any], fmt: str, where: str) -> Example:
    """Builds a multiple-choice example from a CommonsenseQA row (nested or flat layout)."""
    if fmt == "csqa":
        stem = record["question"].get("stem")
        raw_choices = record["question"]["choices"]
    else:
        stem = record["question"]
        raw_choices = record["choices"]
    if isinstance(raw_choices, Mapping):  # HF layout: {"label": [...], "text": [...]}
        labels, texts = list(raw_choices.get("label", [])), list(raw_choices.get("text", []))
        if len(labels) != len(texts):
            raise TaskError(f"{where}: choices have {len(labels)} labels but {len(texts)} texts")
    else:
        try:
            labels = [c["label"] for c in raw_choices]
            texts = [c["text"] for c in raw_choices]
        except (KeyError, TypeError) as e:
            raise TaskError(f"{where}: each choice needs 'label' and 'text' fields") from e
    if not isinstance(stem, str) or not texts or not all(isinstance(t, str) for t in texts):
        raise TaskError(f"{where}: a CommonsenseQA row needs a question stem and choice texts")
    key = record.get("answerKey")
    if _is_missing(key):
        return Example(text=stem, choices=tuple(texts), label=None)
    if key not in labels:
        raise TaskError(f"{where}: answerKey {key!r} is not one of the choice labels {labels}")
    return Example(text=stem, choices=tuple(texts), label=labels.index(key))


def _winogrande_example(record: Mapping[str, Any], where: str) -> Example:
    """Builds a 2-choice example: context before ``_``; each choice = option + rest of sentence."""
    sentence, o1, o2 = record["sentence"], record["option1"], record["option2"]
    if not all(isinstance(x, str) for x in (sentence, o1, o2)):
        raise TaskError(f"{where}: sentence, option1 and option2 must be strings")
    if sentence.count("_") != 1:
        raise TaskError(f"{where}: a WinoGrande sentence must contain exactly one '_' blank")
    before, after = sentence.split("_")
    choices = (f"{o1}{after}".strip(), f"{o2}{after}".strip())
    answer = record.get("answer")
    if _is_missing(answer):
        return Example(text=before.strip(), choices=choices, label=None)
    if str(answer).strip() not in ("1", "2"):
        raise TaskError(f"{where}: answer must be '1' or '2', got {answer!r}")
    return Example(text=before.strip(), choices=choices, label=int(str(answer).strip()) - 1)


def _text_row(record: Mapping[str, Any], columns: Columns, where: str) -> RawRow:
    """A text row's texts (stripped) and its raw label."""
    text = record.get(columns.first)
    pair = record.get(columns.second) if columns.second else None
    if not isinstance(text, str) or (columns.second and not isinstance(pair, str)):
        missing = columns.first if not isinstance(text, str) else columns.second
        raise TaskError(f"{where}: field {missing!r} is missing or not a string")
    label = record.get(columns.label) if columns.label else None
    if label is not None and not isinstance(label, str | int | float):
        raise TaskError(
            f"{where}: the label must be a number or a string, got a {type(label).__name__}"
        )
    return RawRow(text.strip(), pair.strip() if pair is not None else None, label, where)


def parse_records(
    records: Iterable[tuple[Mapping[str, Any], str]], source: str
) -> list[Example] | list[RawRow]:
    """Turns dict rows into multiple-choice ``Example``s or untyped text ``RawRow`` rows.

    Args:
        records: ``(row, where)`` pairs; ``where`` is ``file:line`` for messages.
        source: File or dataset name, for messages about the whole source.

    Returns:
        A list of ``Example`` (multiple choice) or ``RawRow`` (text rows, labels typed later).
    """
    fmt: str | None = None
    columns: Columns | None = None
    out: list = []
    unlabelled: list[str] = []
    for record, where in records:
        if not isinstance(record, Mapping):
            raise TaskError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if fmt is None:
            fmt = _record_format(record)
            if fmt == "text":
                columns = pick_columns(record.keys())
                if columns is None:
                    raise TaskError(
                        f"{where}: no recognised text field in {sorted(record)}; {TEXT_HELP}"
                    )
        elif _record_format(record) != fmt:
            raise TaskError(f"{where}: row layout differs from the first row ({fmt})")
        try:
            if fmt in ("csqa", "csqa_flat"):
                out.append(_csqa_example(record, fmt, where))
            elif fmt == "winogrande":
                out.append(_winogrande_example(record, where))
            else:
                assert columns is not None
                out.append(_text_row(record, columns, where))
        except KeyError as e:
            raise TaskError(f"{where}: missing field {e.args[0]!r}") from e
        if _is_missing(out[-1].label):
            unlabelled.append(where)
    if not out:
        raise TaskError(f"{source}: no examples found")
    if len(unlabelled) == len(out):
        raise TaskError(
            f"{source}: no labels found (is this an unlabelled test split?); "
            "pass labelled train and dev data"
        )
    if unlabelled:
        raise TaskError(f"{unlabelled[0]}: row has no label")
    return out
