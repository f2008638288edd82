"""Known tasks loaded from the Hugging Face hub through a lazy ``import datasets``.

``datasets`` is an optional dependency (``pip install 'recipec[hub]'``); without it, or
offline, the error says how to pass local files instead.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from recipec.tasks.base import Example, TaskData, TaskError, TaskOptions
from recipec.tasks.known import KnownTask
from recipec.tasks.labels import build_task, finish_task
from recipec.tasks.records import RawRow, parse_records

__all__ = ["load_hub"]


def load_hub(
    known: KnownTask,
    max_train: int | None,
    max_eval: int | None,
    seed: int,
    options: TaskOptions | None = None,
) -> tuple[TaskData, str]:
    """Loads a known task through ``datasets.load_dataset`` (imported lazily).

    Returns:
        ``(task data, how its labels were read)``.
    """
    hint = (
        "or pass local files instead: --data DIR (a folder with train/dev files) or --data "
        "TRAIN EVAL; `recipec apply` without a task uses the offline built-in task"
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

    train_rows = _split_rows(train_split, known, known.train_split)
    eval_rows = _split_rows(eval_split, known, known.eval_split)
    info, train, dev, how = build_task(known.name, known, train_rows, eval_rows, source, options)
    notes = [f"task {known.name} from the Hugging Face hub ({source})"]
    return finish_task(info, train, dev, max_train, max_eval, seed, notes), how


def _split_rows(
    split: Iterable[Mapping[str, Any]], known: KnownTask, split_name: str
) -> list[Example] | list[RawRow]:
    """Parsed rows of one hub split; each row is located as ``task[split] row N``."""
    records = []
    for i, row in enumerate(split):
        row = dict(row)
        # GLUE test splits mark missing labels with -1
        if row.get("label", None) == -1:
            row["label"] = None
        records.append((row, f"{known.name}[{split_name}] row {i}"))
    return parse_records(records, f"{known.name}[{split_name}]")
