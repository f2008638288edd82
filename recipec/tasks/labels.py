"""Typing labels and describing a task: parsed rows -> ``TaskInfo`` + examples -> ``TaskData``.

Labels are typed once every row of a task is read (train then eval): class names, class ids or
float scores (regression). ``build_task`` checks the rows against the known task they belong to,
if any, and picks the metrics; ``finish_task`` checks that both splits have examples and takes
the seeded subsets asked for.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import numpy as np

from recipec.tasks.base import Example, Kind, TaskData, TaskError, TaskInfo
from recipec.tasks.known import KnownTask
from recipec.tasks.records import RawRow

__all__ = ["build_task", "finish_task"]

logger = logging.getLogger(__name__)

_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$")


def _label_type(value: Any) -> str:
    """Classifies a raw label as ``int``, ``float`` or ``str``."""
    if isinstance(value, int):  # bool too
        return "int"
    if isinstance(value, float):
        return "float"
    s = str(value).strip()
    if _INT_RE.match(s):
        return "int"
    if _FLOAT_RE.match(s):
        return "float"
    return "str"


def _type_labels(
    rows: list[RawRow], known: KnownTask | None
) -> tuple[Kind, list[int | float], tuple[str, ...] | None]:
    """Decides the task kind from all raw labels and converts them.

    Args:
        rows: Train rows followed by eval rows.
        known: The known task these files belong to, if any (fixes kind and label order).

    Returns:
        ``(kind, labels, label_names)``.
    """
    types = [_label_type(r.label) for r in rows]
    numeric = [t != "str" for t in types]
    if any(numeric) and not all(numeric):
        majority_numeric = sum(numeric) * 2 >= len(numeric)
        bad = next(r for r, n in zip(rows, numeric) if n != majority_numeric)
        expected = "a number" if majority_numeric else "a class name"
        raise TaskError(
            f"{bad.where}: label {bad.label!r} should be {expected} like the other rows"
        )
    if not any(numeric):
        observed = sorted({str(r.label).strip() for r in rows})
        names = known.label_names if known and known.label_names else tuple(observed)
        index = {n: i for i, n in enumerate(names)}
        for r in rows:
            if str(r.label).strip() not in index:
                raise TaskError(
                    f"{r.where}: unknown label {r.label!r}; expected one of {list(names)}"
                )
        return "classification", [index[str(r.label).strip()] for r in rows], names
    is_regression = known.kind == "regression" if known else "float" in types
    if is_regression:
        return "regression", [float(r.label) for r in rows], None
    labels: list[int | float] = []
    for r, t in zip(rows, types):
        value = float(r.label)
        if t == "float" and not value.is_integer():
            raise TaskError(f"{r.where}: label {r.label!r} should be a class id (an integer)")
        if value < 0:
            raise TaskError(f"{r.where}: class id {r.label!r} is negative")
        labels.append(int(value))
    return "classification", labels, None


def build_task(
    name: str,
    known: KnownTask | None,
    train_rows: list[Example] | list[RawRow],
    eval_rows: list[Example] | list[RawRow],
    source: str,
) -> tuple[TaskInfo, list[Example], list[Example]]:
    """Types labels and builds the TaskInfo for parsed train/eval rows.

    Args:
        name: The task's name when it is not a known one (a folder name...).
        known: The known task these rows belong to, if any (fixes kind, labels and metrics).
        train_rows: Parsed train rows: multiple-choice ``Example``s or text ``RawRow``s.
        eval_rows: Parsed eval rows, in the same layout as the train rows.
        source: Where the rows came from, for messages and ``TaskInfo.source``.

    Returns:
        ``(info, train, dev)``.
    """
    train_mc = bool(train_rows) and isinstance(train_rows[0], Example)
    eval_mc = bool(eval_rows) and isinstance(eval_rows[0], Example)
    if train_mc != eval_mc:
        raise TaskError(f"{source}: train and eval files have different layouts")
    display = known.name if known else name
    if train_mc:
        return _multiple_choice_task(display, known, list(train_rows), list(eval_rows), source)
    return _text_task(display, known, list(train_rows), list(eval_rows), source)


def _multiple_choice_task(
    display: str,
    known: KnownTask | None,
    train: list[Example],
    dev: list[Example],
    source: str,
) -> tuple[TaskInfo, list[Example], list[Example]]:
    counts = {len(ex.choices or ()) for ex in train + dev}
    if len(counts) != 1:
        raise TaskError(f"{source}: examples have different numbers of choices {sorted(counts)}")
    (n_choices,) = counts
    if n_choices < 2:
        raise TaskError(f"{source}: a multiple-choice task needs at least 2 choices")
    if known and known.kind != "multiple_choice":
        raise TaskError(
            f"{source}: {known.name} is a {known.kind} task, but the files are multiple choice"
        )
    info = TaskInfo(
        name=display,
        kind="multiple_choice",
        num_labels=n_choices,
        num_choices=n_choices,
        metrics=("accuracy",),
        primary_metric="accuracy",
        source=source,
    )
    return info, train, dev


def _text_task(
    display: str,
    known: KnownTask | None,
    train_rows: list[RawRow],
    eval_rows: list[RawRow],
    source: str,
) -> tuple[TaskInfo, list[Example], list[Example]]:
    if known and known.kind == "multiple_choice":
        raise TaskError(
            f"{source}: {known.name} is a multiple-choice task, but the files hold text rows"
        )
    rows = train_rows + eval_rows
    kind, labels, label_names = _type_labels(rows, known)
    examples = [Example(r.text, r.text_pair, lab) for r, lab in zip(rows, labels)]
    train, dev = examples[: len(train_rows)], examples[len(train_rows) :]
    if kind == "regression":
        num_labels = 1
        metrics, primary = ("pearson", "spearman"), "spearman"
    else:
        num_labels = _num_classes(labels, label_names, known, source)
        metrics, primary = ("accuracy", "f1"), "accuracy"
        if num_labels == 2:
            metrics = ("accuracy", "f1", "mcc")
    if known:
        metrics, primary = known.metrics, known.primary
    info = TaskInfo(
        name=display,
        kind=kind,
        num_labels=num_labels,
        metrics=metrics,
        primary_metric=primary,
        label_names=label_names or (known.label_names if known else None),
        source=source,
    )
    return info, train, dev


def _num_classes(
    labels: list[int | float],
    label_names: tuple[str, ...] | None,
    known: KnownTask | None,
    source: str,
) -> int:
    """Classes of a classification task: its names, the known count, else the ids seen (>= 2)."""
    observed = int(max(labels)) + 1
    num_labels = len(label_names) if label_names else max(2, observed)
    if known and known.kind == "classification":
        if observed > known.num_labels:
            raise TaskError(
                f"{source}: {known.name} has {known.num_labels} classes, the files have ids up "
                f"to {observed - 1}"
            )
        num_labels = known.num_labels
    return num_labels


def _subsample(examples: list[Example], k: int | None, seed: int, salt: int) -> list[Example]:
    """A seeded random subset of size ``k`` in original order (all when ``k`` is None/large)."""
    if k is None or k >= len(examples):
        return examples
    rng = np.random.default_rng([seed, salt])
    keep = np.sort(rng.choice(len(examples), size=k, replace=False))
    return [examples[i] for i in keep]


def finish_task(
    info: TaskInfo,
    train: list[Example],
    dev: list[Example],
    max_train: int | None,
    max_eval: int | None,
    seed: int,
    notes: list[str],
) -> TaskData:
    """Checks both splits have examples, takes the seeded subsets and logs the notes."""
    if not train:
        raise TaskError(f"{info.source}: the train split has no examples")
    if not dev:
        raise TaskError(f"{info.source}: the eval split has no examples")
    sub_train = _subsample(train, max_train, seed, 1)
    sub_dev = _subsample(dev, max_eval, seed, 2)
    if len(sub_train) < len(train):
        notes.append(
            f"using {len(sub_train)} of {len(train)} train examples (max_train, seed {seed})"
        )
    if len(sub_dev) < len(dev):
        notes.append(f"using {len(sub_dev)} of {len(dev)} eval examples (max_eval, seed {seed})")
    for note in notes:
        logger.info(note)
    return TaskData(info, sub_train, sub_dev, notes)
