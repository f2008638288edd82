"""Downstream tasks: what to train on and how to score it.

``load_task`` turns a task name and/or data paths into a ``TaskData``: a ``TaskInfo`` (kind,
number of labels/choices, metrics) plus train and eval lists of ``Example``. Sources:

- ``None`` / ``"builtin"``: the synthetic sentiment task of ``recipec.tasks.builtin``.
- Local files (``data=[DIR]`` or ``data=[TRAIN, EVAL]``): ``recipec.tasks.files``.
- Hugging Face dataset names (``glue/sst2``, ``tau/commonsense_qa``, ``winogrande``...), loaded
  through a lazy ``import datasets`` (``pip install 'recipec[hub]'``): ``recipec.tasks.hub``.

Every user-facing problem (missing file, ill-formed row, unknown name, no examples) raises
``TaskError`` with one message naming the file and line where it applies.
"""

from __future__ import annotations

import os
from pathlib import Path

from recipec.tasks.base import TaskData, TaskError
from recipec.tasks.builtin import load_builtin
from recipec.tasks.files import load_local
from recipec.tasks.hub import load_hub
from recipec.tasks.known import KNOWN, resolve_task_name, unknown_task_message

__all__ = ["load_task"]


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
        return load_local(task, [Path(p).expanduser() for p in paths], max_train, max_eval, seed)
    canonical = "builtin" if task is None else resolve_task_name(task)
    if canonical is None:
        raise TaskError(unknown_task_message(task or ""))
    if canonical == "builtin":
        return load_builtin(max_train, max_eval, seed)
    return load_hub(KNOWN[canonical], max_train, max_eval, seed)
