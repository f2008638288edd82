"""Downstream tasks: what to train on (built-in, local files, hub) and how to score it.

``load_task`` is the entry; the modules below it, bottom up: ``base`` (the data types and
``TaskError``), ``known`` (task names and aliases), ``records`` (rows -> examples), ``labels``
(label typing, ``TaskInfo``, subsampling), ``files`` / ``hub`` / ``builtin`` (the sources),
then ``data`` (batching) and ``metrics``.
"""

from recipec.tasks.base import Example, TaskData, TaskError, TaskInfo
from recipec.tasks.known import known_tasks, resolve_task_name
from recipec.tasks.load import load_task

__all__ = [
    "Example",
    "TaskData",
    "TaskError",
    "TaskInfo",
    "known_tasks",
    "load_task",
    "resolve_task_name",
]
