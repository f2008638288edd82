"""Typing labels and describing a task: parsed rows -> ``TaskInfo`` + examples -> ``TaskData``.

Labels are typed once every row of a task is read (train then eval): class names, class ids or
float scores (regression). ``build_task`` checks the rows against the known task they belong to,
if any, refuses label sets that look accidental (one train class, eval-only classes, gaps in
class ids, a class seen once, integers mixed with decimals; ``TaskOptions`` says otherwise) and
picks the metrics; ``finish_task`` checks that both splits have examples and takes the seeded
subsets asked for; ``describe_task`` applies ``--metric`` and says what was inferred and why.
"""

from __future__ import annotations

import itertools
import logging
import math
import re
from collections import Counter
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from recipec.tasks.base import Example, Kind, TaskData, TaskError, TaskInfo, TaskOptions
from recipec.tasks.known import KNOWN, KnownTask
from recipec.tasks.metrics import METRICS_BY_KIND
from recipec.tasks.records import RawRow

__all__ = ["MAX_CLASSES", "build_task", "choose_metric", "describe_task", "finish_task"]

logger = logging.getLogger(__name__)

_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$")
MAX_CLASSES = 10_000
"""Class ids at or above this are refused (a head that size is never what a file means)."""
_ONCE_MIN_ROWS = 20
"""With fewer rows than this, a class seen in one row only is not taken for a typo."""


@dataclass
class TypedLabels:
    """Labels of train + eval rows, typed: the kind, the values, class names, and why."""

    kind: Kind
    values: list[int | float]
    names: tuple[str, ...] | None
    how: str
    explicit: bool = False  # the classes were listed by the user (--labels)


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


def _class_id(row: RawRow) -> int:
    """A numeric label as a class id: integer-valued, >= 0 and < ``MAX_CLASSES``."""
    value = row.label
    text = str(value).strip()
    if isinstance(value, str) and _INT_RE.match(text) and len(text.lstrip("+-")) > 9:
        raise TaskError(f"{row.where}: class id {text[:20]}... is too large for a class id")
    try:
        number = float(value) if not isinstance(value, int) else value
    except OverflowError:
        number = float("inf")
    if isinstance(number, float):
        if not number.is_integer():
            raise TaskError(f"{row.where}: label {text[:40]!r} should be a class id (an integer)")
        number = int(number)
    if number < 0:
        raise TaskError(f"{row.where}: class id {text[:40]!r} is negative")
    if number >= MAX_CLASSES:
        raise TaskError(
            f"{row.where}: class id {text[:40]} is too large (class ids count from 0; at most "
            f"{MAX_CLASSES - 1})"
        )
    return number


def _score(row: RawRow) -> float:
    """A numeric label as a finite regression score."""
    text = str(row.label).strip()
    if _label_type(row.label) == "str":
        raise TaskError(f"{row.where}: label {text[:40]!r} is not a number (a regression score)")
    try:
        value = float(row.label)
    except OverflowError:
        value = float("inf")
    if not math.isfinite(value):
        raise TaskError(f"{row.where}: label {text[:40]} is not a finite number")
    return value


def _label_key(value: Any) -> str:
    """A label as the string ``--labels`` lists it by (integers without sign or zeros)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    s = str(int(value) if isinstance(value, bool) else value).strip()
    if _INT_RE.match(s) and len(s) < 10:
        return str(int(s))
    return s


def _listed_labels(
    rows: list[RawRow], known: KnownTask | None, listed: tuple[str, ...]
) -> TypedLabels:
    """Labels typed against the classes the user listed (``--labels``), in their order."""
    if known and known.kind != "classification":
        raise TaskError(f"--labels: {known.name} is a {known.kind} task, not classification")
    if known and known.label_names and tuple(listed) != known.label_names:
        raise TaskError(
            f"--labels {','.join(listed)}: {known.name}'s classes are "
            f"{','.join(known.label_names)} (in this order)"
        )
    if known and len(listed) != known.num_labels:
        raise TaskError(
            f"--labels lists {len(listed)} classes, {known.name} has {known.num_labels}"
        )
    index = {name: i for i, name in enumerate(listed)}
    values: list[int | float] = []
    for r in rows:
        key = _label_key(r.label)
        if key not in index:
            raise TaskError(f"{r.where}: label {key[:40]!r} is not one of --labels {list(listed)}")
        values.append(index[key])
    return TypedLabels("classification", values, tuple(listed), "classes listed by --labels", True)


def _mixed_types_error(rows: list[RawRow], types: list[str], numeric: list[bool]) -> TaskError:
    majority_numeric = sum(numeric) * 2 >= len(numeric)
    bad = next(r for r, n in zip(rows, numeric) if n != majority_numeric)
    expected = "a number" if majority_numeric else "a class name"
    return TaskError(f"{bad.where}: label {bad.label!r} should be {expected} like the other rows")


def _numeric_kind(rows: list[RawRow], types: list[str]) -> tuple[Kind, str]:
    """Classification (integers) or regression (decimals) from numeric labels; refuses a mix."""
    ints = [r for r, t in zip(rows, types) if t == "int"]
    decimals = [r for r, t in zip(rows, types) if t == "float"]
    if ints and decimals:
        few, many = (ints, decimals) if len(ints) < len(decimals) else (decimals, ints)
        raise TaskError(
            f"{few[0].where}: label {str(few[0].label).strip()[:40]} is "
            f"{'an integer' if few is ints else 'a decimal'}, but {len(many)} of the "
            f"{len(rows)} labels are {'decimals' if few is ints else 'integers'} (e.g. "
            f"{str(many[0].label).strip()[:40]} at {many[0].where}): fix the file, or say "
            "what the labels are: --task-kind classification (class ids) or --task-kind "
            "regression (scores)"
        )
    if decimals:
        return "regression", "decimal labels: regression scores"
    return "classification", "integer labels: class ids"


def _type_labels(rows: list[RawRow], known: KnownTask | None, options: TaskOptions) -> TypedLabels:
    """Decides the task kind from all raw labels and converts them.

    Args:
        rows: Train rows followed by eval rows.
        known: The known task these files belong to, if any (fixes kind and label order).
        options: What the user said (``--task-kind``, ``--labels``).
    """
    if known and options.kind and options.kind != known.kind:
        raise TaskError(f"--task-kind {options.kind}: {known.name} is a {known.kind} task")
    if options.labels is not None:
        if options.kind == "regression":
            raise TaskError("--labels lists classes: it does not go with --task-kind regression")
        return _listed_labels(rows, known, options.labels)
    types = [_label_type(r.label) for r in rows]
    kind = options.kind or (known.kind if known else None)
    how = (
        f"--task-kind {options.kind}"
        if options.kind
        else (f"{known.name}'s labels" if known else "")
    )
    if kind == "regression":
        return TypedLabels("regression", [_score(r) for r in rows], None, how)
    numeric = [t != "str" for t in types]
    if any(numeric) and not all(numeric):
        raise _mixed_types_error(rows, types, numeric)
    if not any(numeric):
        observed = sorted({str(r.label).strip() for r in rows})
        names = known.label_names if known and known.label_names else tuple(observed)
        index = {n: i for i, n in enumerate(names)}
        for r in rows:
            if str(r.label).strip() not in index:
                raise TaskError(
                    f"{r.where}: unknown label {r.label!r}; expected one of {list(names)}"
                )
        how = how or "class names (ids in sorted order)"
        return TypedLabels(
            "classification", [index[str(r.label).strip()] for r in rows], names, how
        )
    if kind is None:
        kind, how = _numeric_kind(rows, types)
    if kind == "regression":
        return TypedLabels("regression", [_score(r) for r in rows], None, how)
    return TypedLabels("classification", [_class_id(r) for r in rows], None, how)


def _class_name(typed: TypedLabels, i: int) -> str:
    return typed.names[i] if typed.names and i < len(typed.names) else str(i)


def _check_classes(
    typed: TypedLabels, rows: list[RawRow], n_train: int, known: KnownTask | None
) -> None:
    """Refuses a label set that looks accidental (see docs/safety.md): one class in train,
    classes only in the eval file, gaps in inferred class ids, a class seen in one row only."""
    values = typed.values
    train = Counter(values[:n_train])
    every = Counter(values)
    if len(train) == 1:
        (only,) = train
        raise TaskError(
            f"{rows[0].where.rsplit(':', 1)[0]}: every train example has the label "
            f"{_class_name(typed, int(only))!r}: a classifier needs at least two classes"
        )
    dev_only = sorted(set(values[n_train:]) - set(train))
    if dev_only and not typed.explicit:
        first = next(r for r, v in zip(rows[n_train:], values[n_train:]) if v in dev_only)
        shown = ", ".join(_class_name(typed, int(c)) for c in dev_only[:5])
        raise TaskError(
            f"{first.where}: class {shown} is in the eval file but not in the train file (the "
            "model could never predict it); fix the files, or pass --labels with every class"
        )
    if typed.names is None and not known and not typed.explicit:
        ids = sorted(every)
        missing = sorted(set(range(ids[-1] + 1)) - set(ids))
        if missing:
            stray = next(r for r, v in zip(rows, values) if v > missing[0])
            every_id = ",".join(str(i) for i in range(ids[-1] + 1))
            raise TaskError(
                f"{stray.where}: class ids {_ranges(ids)} skip {_ranges(missing)}: a head for "
                f"{ids[-1] + 1} classes would be trained, {len(missing)} of them never seen; "
                "fix the label, or list the classes: --labels "
                + (every_id if len(every_id) <= 60 else every_id[:60].rsplit(",", 1)[0] + ",...")
            )
    once = [c for c, n in every.items() if n == 1]
    if once and len(values) >= _ONCE_MIN_ROWS and not typed.explicit:
        row = next(r for r, v in zip(rows, values) if v == once[0])
        raise TaskError(
            f"{row.where}: class {_class_name(typed, int(once[0]))!r} appears in this row only, "
            f"of {len(values)} (a typo?); fix it, or pass --labels with every class to accept it"
        )


def _ranges(ids: list[int]) -> str:
    """``[0, 1, 2, 7]`` -> ``"0-2, 7"``."""
    parts: list[str] = []
    for _, group in itertools.groupby(enumerate(ids), lambda p: p[1] - p[0]):
        run = [v for _, v in group]
        parts.append(str(run[0]) if len(run) == 1 else f"{run[0]}-{run[-1]}")
    return ", ".join(parts[:8]) + (", ..." if len(parts) > 8 else "")


def build_task(
    name: str,
    known: KnownTask | None,
    train_rows: list[Example] | list[RawRow],
    eval_rows: list[Example] | list[RawRow],
    source: str,
    options: TaskOptions | None = None,
) -> tuple[TaskInfo, list[Example], list[Example], str]:
    """Types labels, checks they look intended, and builds the TaskInfo for parsed rows.

    Args:
        name: The task's name when it is not a known one (a folder name...).
        known: The known task these rows belong to, if any (fixes kind, labels and metrics).
        train_rows: Parsed train rows: multiple-choice ``Example``s or text ``RawRow``s.
        eval_rows: Parsed eval rows, in the same layout as the train rows.
        source: Where the rows came from, for messages and ``TaskInfo.source``.
        options: What the user said about the labels (``--task-kind``, ``--labels``).

    Returns:
        ``(info, train, dev, how)``; ``how`` says how the labels were read, for the log.
    """
    options = options or TaskOptions()
    train_mc = bool(train_rows) and isinstance(train_rows[0], Example)
    eval_mc = bool(eval_rows) and isinstance(eval_rows[0], Example)
    if train_mc != eval_mc:
        raise TaskError(f"{source}: train and eval files have different layouts")
    display = known.name if known else name
    if train_mc:
        if options.kind or options.labels:
            raise TaskError(
                f"{source}: multiple-choice data: its labels are answer positions, "
                "--task-kind and --labels do not apply"
            )
        info, train, dev = _multiple_choice_task(
            display, known, list(train_rows), list(eval_rows), source
        )
        return info, train, dev, "labels are the right choice's position"
    return _text_task(display, known, list(train_rows), list(eval_rows), source, options)


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
    options: TaskOptions,
) -> tuple[TaskInfo, list[Example], list[Example], str]:
    if known and known.kind == "multiple_choice":
        raise TaskError(
            f"{source}: {known.name} is a multiple-choice task, but the files hold text rows"
        )
    rows = train_rows + eval_rows
    typed = _type_labels(rows, known, options)
    if typed.kind == "classification":
        _check_classes(typed, rows, len(train_rows), known)
    elif len(set(typed.values)) == 1:
        raise TaskError(f"{source}: every label is {typed.values[0]}: nothing to learn")
    examples = [Example(r.text, r.text_pair, lab) for r, lab in zip(rows, typed.values)]
    train, dev = examples[: len(train_rows)], examples[len(train_rows) :]
    if typed.kind == "regression":
        num_labels = 1
        metrics, primary = ("pearson", "spearman"), "spearman"
    else:
        num_labels = _num_classes(typed.values, typed.names, known, source)
        metrics, primary = ("accuracy", "f1"), "accuracy"
        if num_labels == 2:
            metrics = ("accuracy", "f1", "mcc")
    if known:
        metrics, primary = known.metrics, known.primary
    info = TaskInfo(
        name=display,
        kind=typed.kind,
        num_labels=num_labels,
        metrics=metrics,
        primary_metric=primary,
        label_names=typed.names or (known.label_names if known else None),
        source=source,
    )
    return info, train, dev, typed.how


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
    """Checks both splits have examples and takes the seeded subsets asked for."""
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
        lost = {e.label for e in train} - {e.label for e in sub_train}
        if info.kind != "regression" and lost:
            notes.append(
                f"[warn] the {len(sub_train)} train examples have no example of class "
                f"{', '.join(_display(info, c) for c in sorted(lost)[:5])}: raise --max-train"
            )
    if len(sub_dev) < len(dev):
        notes.append(f"using {len(sub_dev)} of {len(dev)} eval examples (max_eval, seed {seed})")
    return TaskData(info, sub_train, sub_dev, notes)


def _display(info: TaskInfo, label: Any) -> str:
    names = info.label_names
    if names and isinstance(label, int) and 0 <= label < len(names):
        return names[label]
    return str(label)


def _counts(info: TaskInfo, examples: list[Example]) -> str:
    """``{negative: 12, positive: 30}`` for classes, the range and mean for scores."""
    labels = [e.label for e in examples if e.label is not None]
    if not labels:
        return "unlabelled"
    if info.kind == "regression":
        return f"{min(labels):g} to {max(labels):g} (mean {sum(labels) / len(labels):.3g})"
    counts = sorted(Counter(labels).items())
    shown = ", ".join(f"{_display(info, c)}: {n}" for c, n in counts[:12])
    return "{" + shown + (f", ... ({len(counts)} classes)" if len(counts) > 12 else "") + "}"


def choose_metric(info: TaskInfo, metric: str | None) -> tuple[TaskInfo, str]:
    """The task with ``metric`` as its primary metric (validated), and a line saying why.

    Raises:
        TaskError: ``metric`` is not one the task's kind supports.
    """
    supported = METRICS_BY_KIND[info.kind]
    choose = f"choose with --metric {'|'.join(supported)}" if len(supported) > 1 else ""
    if metric is not None:
        if metric not in supported:
            raise TaskError(
                f"--metric {metric}: a {info.kind.replace('_', '-')} task is scored with "
                f"{', '.join(supported)}"
            )
        metrics = info.metrics if metric in info.metrics else (*info.metrics, metric)
        info = replace(info, metrics=metrics, primary_metric=metric)
        return info, f"primary metric {metric} (--metric)"
    if info.name in KNOWN:
        why = f"{info.name}'s standard metric"
    elif info.name == "builtin":
        why = "the built-in task's metric"
    else:
        why = f"the default for {info.kind.replace('_', '-')} data"
    others = [m for m in info.metrics if m != info.primary_metric]
    also = f"; also reported: {', '.join(others)}" if others else ""
    return info, f"primary metric {info.primary_metric}: {why}{also}" + (
        f"; {choose}" if choose else ""
    )


def describe_task(task: TaskData, how: str, metric: str | None) -> TaskData:
    """Applies ``--metric`` and adds what was inferred to the notes: the kind and how the
    labels were read, the label counts of each split, the primary metric and why; logs them."""
    info, metric_line = choose_metric(task.info, metric)
    kind = info.kind.replace("_", "-")
    classes = {
        "classification": f", {info.num_labels} classes",
        "multiple_choice": f", {info.num_choices} choices",
    }.get(info.kind, "")
    notes = [
        *task.notes,
        f"{kind}{classes} ({how}); labels: train {_counts(info, task.train)}, "
        f"eval {_counts(info, task.eval)}",
        metric_line,
    ]
    for note in notes:
        logger.info(note)
    return TaskData(info, task.train, task.eval, notes)
