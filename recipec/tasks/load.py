"""Downstream tasks: what to train on and how to score it.

``load_task`` turns a task name and/or data paths into a ``TaskData``: a ``TaskInfo`` (kind,
number of labels/choices, metrics) plus train and eval lists of ``Example``. Sources:

- ``None`` / ``"builtin"``: the synthetic sentiment task of ``recipec.tasks.builtin``.
- Local files (``data=DIR`` or ``data=[TRAIN, EVAL]``; ``--data DIR`` / ``--data TRAIN EVAL``):
  ``recipec.tasks.files``.
- Hugging Face dataset names (``glue/sst2``, ``tau/commonsense_qa``, ``winogrande``...), loaded
  through a lazy ``import datasets`` (``pip install 'recipec[hub]'``): ``recipec.tasks.hub``.

Every user-facing problem (missing file, ill-formed row, unknown name, no examples) raises
``TaskError`` with one message naming the file and line where it applies.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from recipec.tasks.base import TaskData, TaskError, TaskOptions
from recipec.tasks.builtin import load_builtin
from recipec.tasks.files import load_local
from recipec.tasks.hub import load_hub
from recipec.tasks.known import KNOWN, resolve_task_name, unknown_task_message
from recipec.tasks.labels import describe_task

__all__ = ["load_task"]


def load_task(
    task: str | None = None,
    data: str | os.PathLike | list[str | os.PathLike] | None = None,
    *,
    max_train: int | None = None,
    max_eval: int | None = None,
    seed: int = 0,
    task_kind: str | None = None,
    labels: Sequence[str] | None = None,
    metric: str | None = None,
) -> TaskData:
    """Loads a task from the built-in generator, local files or the Hugging Face hub.

    The returned notes say what was inferred and why: the task (a known name, a folder's name),
    the kind and how the labels were read, the label counts of each split, and the primary
    metric. Label sets that look accidental are refused (see docs/safety.md): one class in
    train, classes only in the eval file, gaps in integer class ids, a class seen once,
    integers mixed with decimals.

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
        task_kind: ``"classification"`` or ``"regression"``: how to read numeric labels
            (``--task-kind``); by default integers are class ids and decimals scores.
        labels: Every class, in id order (``--labels``); labels outside it are refused, rare
            or dev-only classes in it are accepted.
        metric: The primary metric (``--metric``), one of ``METRICS_BY_KIND[kind]``.

    Returns:
        The loaded ``TaskData``.

    Raises:
        TaskError: Missing or ill-formed files, unknown task names, empty data, accidental
            looking labels, a metric the task's kind does not support, or a hub dataset that
            cannot be fetched.
    """
    for label, value in (("max_train", max_train), ("max_eval", max_eval)):
        if value is not None and value < 1:
            raise TaskError(f"{label} must be at least 1, got {value}")
    if task_kind not in (None, "classification", "regression"):
        raise TaskError(f"task_kind must be classification or regression, got {task_kind!r}")
    options = TaskOptions(task_kind, _label_list(labels), metric)
    if data is None and task is not None and Path(task).expanduser().exists():
        data, task = [task], None
    if data is not None:
        paths = [data] if isinstance(data, str | os.PathLike) else list(data)
        paths = [Path(p).expanduser() for p in paths]
        loaded, how = load_local(task, paths, max_train, max_eval, seed, options)
        return describe_task(loaded, how, metric)
    canonical = "builtin" if task is None else resolve_task_name(task)
    if canonical is None:
        raise TaskError(unknown_task_message(task or ""))
    if canonical == "builtin":
        if task_kind or labels:
            raise TaskError("--task-kind and --labels describe local data (--data)")
        return describe_task(load_builtin(max_train, max_eval, seed), "generated", metric)
    loaded, how = load_hub(KNOWN[canonical], max_train, max_eval, seed, options)
    return describe_task(loaded, how, metric)


def _label_list(labels: Sequence[str] | None) -> tuple[str, ...] | None:
    """``--labels`` as a tuple of distinct, non-empty class names (None when not given)."""
    if labels is None:
        return None
    names = tuple(str(n).strip() for n in labels)
    if len(names) < 2 or any(not n for n in names):
        raise TaskError(f"--labels needs at least two non-empty classes, got {list(names)}")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise TaskError(f"--labels lists {dup!r} twice")
    return names
