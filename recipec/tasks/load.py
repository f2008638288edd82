"""Downstream tasks: what to train on and how to score it.

``load_task`` turns a task name and/or data paths into a ``TaskData``: a ``TaskInfo`` (kind,
number of labels/choices, metrics) plus train and eval lists of ``Example``. Sources:

- ``None`` / ``"builtin"``: the synthetic sentiment task of ``recipec.tasks.builtin``.
- Local files (``data=[DIR]`` or ``data=[TRAIN, EVAL]``): GLUE-style TSV with a header, CSV,
  JSONL/JSON (text + label records, CommonsenseQA, WinoGrande). In a directory, ``train*`` and
  ``dev*``/``validation*`` files are used and ``test*`` files (unlabelled) are ignored with a note.
- Hugging Face dataset names (``glue/sst2``, ``tau/commonsense_qa``, ``winogrande``...), loaded
  through a lazy ``import datasets`` (``pip install 'recipec[hub]'``).

Every user-facing problem (missing file, ill-formed row, unknown name, no examples) raises
``TaskError`` with one message naming the file and line where it applies.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = [
    "Example",
    "TaskData",
    "TaskError",
    "TaskInfo",
    "known_tasks",
    "load_task",
    "resolve_task_name",
]

logger = logging.getLogger(__name__)

Kind = Literal["classification", "regression", "multiple_choice"]
KINDS = ("classification", "regression", "multiple_choice")


class TaskError(Exception):
    """A task or its data cannot be loaded; the message says why and where."""


@dataclass(frozen=True, slots=True)
class Example:
    """One labelled example.

    Attributes:
        text: The (first) input text; for multiple choice, the shared context or question.
        text_pair: Optional second segment (sentence pairs); None for single sentences.
        label: Class id (classification, multiple choice: index of the right choice), float
            score (regression) or None when unlabelled.
        choices: For multiple choice, the second segment paired with ``text`` for each choice.
    """

    text: str
    text_pair: str | None = None
    label: int | float | None = None
    choices: tuple[str, ...] | None = None


@dataclass(frozen=True)
class TaskInfo:
    """What a task is and how it is scored.

    Attributes:
        name: Display name (``"builtin"``, ``"glue/sst2"``, a folder name...).
        kind: ``"classification"``, ``"regression"`` or ``"multiple_choice"``.
        num_labels: Classes for classification, 1 for regression, choices for multiple choice.
        num_choices: Choices per example for multiple choice, else None.
        metrics: Metric names understood by ``recipec.tasks.metrics.compute_metrics``.
        primary_metric: The metric used to compare runs and pick the best checkpoint.
        label_names: Optional class names, index = class id.
        source: Where the data came from (paths or hub id), for reports.
    """

    name: str
    kind: Kind
    num_labels: int
    num_choices: int | None = None
    metrics: tuple[str, ...] = ("accuracy",)
    primary_metric: str = "accuracy"
    label_names: tuple[str, ...] | None = None
    source: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.primary_metric not in self.metrics:
            raise ValueError(f"primary metric {self.primary_metric!r} not in {self.metrics}")
        if self.kind == "multiple_choice" and not self.num_choices:
            raise ValueError("a multiple-choice task needs num_choices")
        if self.kind == "regression" and self.num_labels != 1:
            raise ValueError("a regression task has num_labels == 1")

    @property
    def is_regression(self) -> bool:
        """True for regression tasks (float labels, MSE loss)."""
        return self.kind == "regression"

    def to_dict(self) -> dict[str, Any]:
        """Plain-data form for reports and JSON."""
        d = asdict(self)
        d["metrics"] = list(self.metrics)
        d["label_names"] = list(self.label_names) if self.label_names else None
        return d


@dataclass
class TaskData:
    """A loaded task: its description, train and eval examples, and notes for the user.

    Attributes:
        info: The task description.
        train: Training examples.
        eval: Evaluation (dev) examples.
        notes: Human-readable remarks made while loading (ignored test files, subsampling).
    """

    info: TaskInfo
    train: list[Example]
    eval: list[Example]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------
# Known tasks
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _KnownTask:
    name: str
    kind: Kind
    num_labels: int
    metrics: tuple[str, ...]
    primary: str
    hub_path: str
    hub_config: str | None = None
    train_split: str = "train"
    eval_split: str = "validation"
    num_choices: int | None = None
    label_names: tuple[str, ...] | None = None


_GLUE = "nyu-mll/glue"
_KNOWN: dict[str, _KnownTask] = {
    t.name: t
    for t in [
        _KnownTask("glue/sst2", "classification", 2, ("accuracy", "f1"), "accuracy", _GLUE, "sst2"),
        _KnownTask("glue/mrpc", "classification", 2, ("accuracy", "f1"), "f1", _GLUE, "mrpc"),
        _KnownTask("glue/qqp", "classification", 2, ("accuracy", "f1"), "accuracy", _GLUE, "qqp"),
        _KnownTask("glue/cola", "classification", 2, ("mcc", "accuracy"), "mcc", _GLUE, "cola"),
        _KnownTask(
            "glue/stsb", "regression", 1, ("pearson", "spearman"), "spearman", _GLUE, "stsb"
        ),
        _KnownTask(
            "glue/mnli",
            "classification",
            3,
            ("accuracy",),
            "accuracy",
            _GLUE,
            "mnli",
            eval_split="validation_matched",
            label_names=("entailment", "neutral", "contradiction"),
        ),
        _KnownTask(
            "glue/qnli",
            "classification",
            2,
            ("accuracy",),
            "accuracy",
            _GLUE,
            "qnli",
            label_names=("entailment", "not_entailment"),
        ),
        _KnownTask(
            "glue/rte",
            "classification",
            2,
            ("accuracy",),
            "accuracy",
            _GLUE,
            "rte",
            label_names=("entailment", "not_entailment"),
        ),
        _KnownTask("glue/wnli", "classification", 2, ("accuracy",), "accuracy", _GLUE, "wnli"),
        _KnownTask(
            "tau/commonsense_qa",
            "multiple_choice",
            5,
            ("accuracy",),
            "accuracy",
            "tau/commonsense_qa",
            num_choices=5,
        ),
        _KnownTask(
            "allenai/winogrande",
            "multiple_choice",
            2,
            ("accuracy",),
            "accuracy",
            "allenai/winogrande",
            "winogrande_xl",
            num_choices=2,
        ),
    ]
}
_ALIASES = {
    "csqa": "tau/commonsense_qa",
    "commonsense_qa": "tau/commonsense_qa",
    "commonsenseqa": "tau/commonsense_qa",
    "winogrande": "allenai/winogrande",
    "winogrande_xl": "allenai/winogrande",
}
for _name in list(_KNOWN):
    if _name.startswith("glue/"):
        _short = _name.split("/", 1)[1]
        _ALIASES[_short] = _name
        _ALIASES[f"{_GLUE}/{_short}"] = _name
_BUILTIN_NAMES = ("builtin", "built-in", "synthetic")


def known_tasks() -> list[str]:
    """Names accepted by ``load_task`` without data: ``builtin`` and the hub tasks."""
    return ["builtin", *_KNOWN]


def resolve_task_name(name: str) -> str | None:
    """Maps a task name or alias to its canonical name; None when unknown.

    Args:
        name: e.g. ``"sst2"``, ``"SST-2"``, ``"glue/sst2"``, ``"csqa"``, ``"builtin"``.

    Returns:
        The canonical name (``"glue/sst2"``...) or None.
    """
    key = name.strip().lower().replace("-", "")
    if key in {n.replace("-", "") for n in _BUILTIN_NAMES}:
        return "builtin"
    for candidate in (key, key.replace("_", "")):
        if candidate in _KNOWN:
            return candidate
        if candidate in _ALIASES:
            return _ALIASES[candidate]
    return None


def _unknown_task_message(name: str) -> str:
    return (
        f"Unknown task {name!r}. Known tasks: {', '.join(known_tasks())} "
        f"(aliases such as sst2, mrpc, stsb, csqa, winogrande also work). "
        "To use your own data, pass local files: data=[DIR] or data=[TRAIN, EVAL] (--data)."
    )


# --------------------------------------------------------------------------------------------
# Public entry point
# --------------------------------------------------------------------------------------------


def load_task(
    task: str | None = None,
    data: str | os.PathLike | list[str | os.PathLike] | None = None,
    *,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
) -> TaskData:
    """Loads a task from the built-in generator, local files or the Hugging Face hub.

    Args:
        task: ``None``/``"builtin"``, a known hub task (``glue/sst2``, ``csqa``...), or a name
            for local data. An existing path is treated as ``data=[task]``.
        data: One directory holding ``train.*`` and ``dev.*`` files, or ``[train, eval]`` file
            paths. With data, ``task`` only names the task (a known name also fixes its
            metrics and label count).
        max_train: Keep at most this many train examples (a seeded random subset, original
            order kept). For the built-in task it is the generated train size (default 2000).
        max_eval: Same for eval examples (built-in default 400).
        seed: Seed for subsampling and for the built-in generator.

    Returns:
        The loaded ``TaskData``.

    Raises:
        TaskError: Missing or ill-formed files, unknown task names, empty data, or a hub
            dataset that cannot be fetched.
    """
    for label, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and value < 1:
            raise TaskError(f"{label} must be at least 1, got {value}")
    if data is None and task is not None and Path(task).expanduser().exists():
        data, task = [task], None
    if data is not None:
        paths = [data] if isinstance(data, str | os.PathLike) else list(data)
        return _load_local(task, [Path(p).expanduser() for p in paths], max_train, max_eval, seed)
    canonical = "builtin" if task is None else resolve_task_name(task)
    if canonical is None:
        raise TaskError(_unknown_task_message(task or ""))
    if canonical == "builtin":
        return _load_builtin(max_train, max_eval, seed)
    return _load_hub(_KNOWN[canonical], max_train, max_eval, seed)


def _load_builtin(max_train: int | None, max_eval: int | None, seed: int) -> TaskData:
    from recipec.tasks import builtin as builtin_task

    n_train = max_train or builtin_task.DEFAULT_TRAIN_SIZE
    n_eval = max_eval or builtin_task.DEFAULT_EVAL_SIZE
    train, dev = builtin_task.generate_splits(n_train, n_eval, seed)
    info = TaskInfo(
        name="builtin",
        kind="classification",
        num_labels=2,
        metrics=("accuracy", "f1"),
        primary_metric="accuracy",
        label_names=builtin_task.LABEL_NAMES,
        source=f"recipec built-in synthetic sentiment task (seed {seed})",
    )
    return TaskData(info, train, dev)


# --------------------------------------------------------------------------------------------
# Record parsing (shared by local files and hub rows)
# --------------------------------------------------------------------------------------------

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
_TEXT_HELP = (
    "expected a text column (sentence, text, sentence1/sentence2, question1/question2, "
    "premise/hypothesis, question/sentence, text/text_pair) and a label column (label, "
    "gold_label, score...)"
)


@dataclass
class _Raw:
    """A text example before its label is typed: raw label value and where it came from."""

    text: str
    text_pair: str | None
    label: Any
    where: str


@dataclass
class _Columns:
    first: str
    second: str | None
    label: str | None


def _pick_columns(keys: Iterable[str]) -> _Columns | None:
    """Finds text and label columns among ``keys`` (case-insensitive); None if no text column."""
    lower = {k.strip().lower(): k for k in keys}
    label = next((lower[c] for c in _LABEL_COLUMNS if c in lower), None)
    for a, b in _PAIR_COLUMNS:
        if a in lower and b in lower:
            return _Columns(lower[a], lower[b], label)
    for a in _SINGLE_COLUMNS:
        if a in lower:
            return _Columns(lower[a], None, label)
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


def _csqa_example(record: Mapping[str, Any], fmt: str, where: str) -> Example | None:
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


def _winogrande_example(record: Mapping[str, Any], where: str) -> Example | None:
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


def _parse_records(
    records: Iterable[tuple[Mapping[str, Any], str]], source: str
) -> list[Example] | list[_Raw]:
    """Turns dict rows into multiple-choice ``Example``s or untyped text ``_Raw`` rows.

    Args:
        records: ``(row, where)`` pairs; ``where`` is ``file:line`` for messages.
        source: File or dataset name, for messages about the whole source.

    Returns:
        A list of ``Example`` (multiple choice) or ``_Raw`` (text rows, labels typed later).
    """
    fmt: str | None = None
    columns: _Columns | None = None
    out: list = []
    unlabelled: list[str] = []
    for record, where in records:
        if not isinstance(record, Mapping):
            raise TaskError(f"{where}: expected a JSON object, got {type(record).__name__}")
        if fmt is None:
            fmt = _record_format(record)
            if fmt == "text":
                columns = _pick_columns(record.keys())
                if columns is None:
                    raise TaskError(
                        f"{where}: no recognised text field in {sorted(record)}; {_TEXT_HELP}"
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
                text = record.get(columns.first)
                pair = record.get(columns.second) if columns.second else None
                if not isinstance(text, str) or (columns.second and not isinstance(pair, str)):
                    missing = columns.first if not isinstance(text, str) else columns.second
                    raise TaskError(f"{where}: field {missing!r} is missing or not a string")
                label = record.get(columns.label) if columns.label else None
                out.append(
                    _Raw(text.strip(), pair.strip() if pair is not None else None, label, where)
                )
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


# --------------------------------------------------------------------------------------------
# Local files
# --------------------------------------------------------------------------------------------

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
        if _pick_columns(header) is None:
            raise TaskError(
                f"{path}:1: header {header} has no recognised text column; {_TEXT_HELP}"
            )
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


def _read_file(path: Path) -> list[Example] | list[_Raw]:
    if not path.exists():
        raise TaskError(f"{path}: no such file")
    if path.is_dir():
        raise TaskError(f"{path}: expected a file, got a directory")
    suffix = path.suffix.lower()
    if suffix in (".tsv", ".csv"):
        return _parse_records(_read_delimited(path), str(path))
    if suffix in (".jsonl", ".json"):
        return _parse_records(_read_json(path), str(path))
    raise TaskError(f"{path}: unsupported file type {suffix!r}; use .tsv, .csv, .jsonl or .json")


def _split_of(stem: str) -> str | None:
    stem = stem.lower()
    if stem.startswith("train"):
        return "train"
    if stem.startswith(_EVAL_PREFIXES):
        return "eval"
    if stem.startswith("test"):
        return "test"
    return None


def _choose(candidates: list[Path], exact: tuple[str, ...], what: str, directory: Path) -> Path:
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


def _load_local(
    task: str | None, paths: list[Path], max_train: int | None, max_eval: int | None, seed: int
) -> TaskData:
    notes: list[str] = []
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
        default_name = directory.resolve().name
    elif len(paths) == 2:
        train_path, eval_path = paths
        default_name = train_path.resolve().parent.name or train_path.stem
    else:
        raise TaskError(
            f"data takes one directory or two files [TRAIN, EVAL], got {len(paths)} paths"
        )

    name = task or default_name
    canonical = resolve_task_name(name)
    known = _KNOWN.get(canonical) if canonical else None
    if canonical == "builtin":
        raise TaskError("the built-in task is generated, it takes no data files; drop --data")
    train_rows, eval_rows = _read_file(train_path), _read_file(eval_path)
    if task is None and known is not None:
        # a folder that happens to share a known task's name: use its metrics only if the
        # layout matches
        if (known.kind == "multiple_choice") != isinstance(train_rows[0], Example):
            known = None
    info, train, dev = _build(name, known, train_rows, eval_rows, f"{train_path} | {eval_path}")
    return _finish(info, train, dev, max_train, max_eval, seed, notes)


# --------------------------------------------------------------------------------------------
# Label typing and TaskInfo
# --------------------------------------------------------------------------------------------

_INT_RE = re.compile(r"^[+-]?\d+$")
_FLOAT_RE = re.compile(r"^[+-]?(\d+\.\d*|\.\d+|\d+(\.\d*)?[eE][+-]?\d+)$")


def _label_type(value: Any) -> str:
    """Classifies a raw label as ``int``, ``float`` or ``str``."""
    if isinstance(value, bool):
        return "int"
    if isinstance(value, int):
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
    rows: list[_Raw], known: _KnownTask | None
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


def _build(
    name: str,
    known: _KnownTask | None,
    train_rows: list,
    eval_rows: list,
    source: str,
) -> tuple[TaskInfo, list[Example], list[Example]]:
    """Types labels and builds the TaskInfo for parsed train/eval rows."""
    train_mc = bool(train_rows) and isinstance(train_rows[0], Example)
    eval_mc = bool(eval_rows) and isinstance(eval_rows[0], Example)
    if train_mc != eval_mc:
        raise TaskError(f"{source}: train and eval files have different layouts")
    display = known.name if known else name
    if train_mc:
        train, dev = list(train_rows), list(eval_rows)
        counts = {len(ex.choices or ()) for ex in train + dev}
        if len(counts) != 1:
            raise TaskError(
                f"{source}: examples have different numbers of choices {sorted(counts)}"
            )
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
    if known and known.kind == "multiple_choice":
        raise TaskError(
            f"{source}: {known.name} is a multiple-choice task, but the files hold text rows"
        )
    kind, labels, label_names = _type_labels(list(train_rows) + list(eval_rows), known)
    examples = [
        Example(r.text, r.text_pair, lab)
        for r, lab in zip(list(train_rows) + list(eval_rows), labels)
    ]
    train, dev = examples[: len(train_rows)], examples[len(train_rows) :]
    if kind == "regression":
        num_labels = 1
        metrics, primary = ("pearson", "spearman"), "spearman"
    else:
        observed = int(max(labels)) + 1
        num_labels = len(label_names) if label_names else max(2, observed)
        if known and known.kind == "classification":
            if observed > known.num_labels:
                raise TaskError(
                    f"{source}: {known.name} has {known.num_labels} classes, the files have ids up to {observed - 1}"
                )
            num_labels = known.num_labels
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


def _subsample(examples: list[Example], k: int | None, seed: int, salt: int) -> list[Example]:
    """A seeded random subset of size ``k`` in original order (all when ``k`` is None/large)."""
    if k is None or k >= len(examples):
        return examples
    rng = np.random.default_rng([seed, salt])
    keep = np.sort(rng.choice(len(examples), size=k, replace=False))
    return [examples[i] for i in keep]


def _finish(
    info: TaskInfo,
    train: list[Example],
    dev: list[Example],
    max_train: int | None,
    max_eval: int | None,
    seed: int,
    notes: list[str],
) -> TaskData:
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


# --------------------------------------------------------------------------------------------
# Hugging Face hub
# --------------------------------------------------------------------------------------------


def _load_hub(
    known: _KnownTask, max_train: int | None, max_eval: int | None, seed: int
) -> TaskData:
    """Loads a known task through ``datasets.load_dataset`` (imported lazily)."""
    hint = (
        "or pass local files instead: data=[DIR] with train/dev files, or data=[TRAIN, EVAL] "
        "(--data); `recipec apply` without a task uses the offline built-in task"
    )
    try:
        import datasets
    except ImportError as e:
        raise TaskError(
            f"Task {known.name!r} comes from the Hugging Face hub and needs the 'datasets' "
            f"package: pip install 'recipec[hub]', {hint}."
        ) from e
    try:
        splits = datasets.load_dataset(known.hub_path, known.hub_config)
        train_split, eval_split = splits[known.train_split], splits[known.eval_split]
    except Exception as e:  # network errors come in many types (OSError, ConnectionError, ...)
        raise TaskError(
            f"Could not load {known.hub_path}"
            f"{'/' + known.hub_config if known.hub_config else ''} from the Hugging Face hub "
            f"({type(e).__name__}: {e}). The machine may be offline; {hint}."
        ) from e
    source = f"hf:{known.hub_path}{':' + known.hub_config if known.hub_config else ''}"

    def rows(split: Iterable[Mapping[str, Any]], split_name: str) -> list:
        label_field = "label"
        records = []
        for i, r in enumerate(split):
            r = dict(r)
            # GLUE test splits mark missing labels with -1
            if label_field in r and r[label_field] == -1:
                r[label_field] = None
            records.append((r, f"{known.name}[{split_name}] row {i}"))
        return _parse_records(records, f"{known.name}[{split_name}]")

    train_rows = rows(train_split, known.train_split)
    eval_rows = rows(eval_split, known.eval_split)
    info, train, dev = _build(known.name, known, train_rows, eval_rows, source)
    return _finish(info, train, dev, max_train, max_eval, seed, [])
