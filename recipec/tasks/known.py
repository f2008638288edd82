"""Tasks recipec knows by name: the Hugging Face hub tasks, their aliases and how they score.

A known name fixes a task's kind, label count, label order and metrics, whether its data comes
from the hub (``recipec.tasks.hub``) or from local files in a folder of the same name.
"""

from __future__ import annotations

from dataclasses import dataclass

from recipec.tasks.base import Kind

__all__ = ["KNOWN", "KnownTask", "known_tasks", "resolve_task_name", "unknown_task_message"]


@dataclass(frozen=True)
class KnownTask:
    """A task known by name: what it is, how it is scored and where the hub keeps it."""

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
KNOWN: dict[str, KnownTask] = {
    t.name: t
    for t in [
        KnownTask("glue/sst2", "classification", 2, ("accuracy", "f1"), "accuracy", _GLUE, "sst2"),
        KnownTask("glue/mrpc", "classification", 2, ("accuracy", "f1"), "f1", _GLUE, "mrpc"),
        KnownTask("glue/qqp", "classification", 2, ("accuracy", "f1"), "accuracy", _GLUE, "qqp"),
        KnownTask("glue/cola", "classification", 2, ("mcc", "accuracy"), "mcc", _GLUE, "cola"),
        KnownTask("glue/stsb", "regression", 1, ("pearson", "spearman"), "spearman", _GLUE, "stsb"),
        KnownTask(
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
        KnownTask(
            "glue/qnli",
            "classification",
            2,
            ("accuracy",),
            "accuracy",
            _GLUE,
            "qnli",
            label_names=("entailment", "not_entailment"),
        ),
        KnownTask(
            "glue/rte",
            "classification",
            2,
            ("accuracy",),
            "accuracy",
            _GLUE,
            "rte",
            label_names=("entailment", "not_entailment"),
        ),
        KnownTask("glue/wnli", "classification", 2, ("accuracy",), "accuracy", _GLUE, "wnli"),
        KnownTask(
            "tau/commonsense_qa",
            "multiple_choice",
            5,
            ("accuracy",),
            "accuracy",
            "tau/commonsense_qa",
            num_choices=5,
        ),
        KnownTask(
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
for _glue_name in [n for n in KNOWN if n.startswith("glue/")]:
    _short = _glue_name.split("/", 1)[1]
    _ALIASES[_short] = _glue_name
    _ALIASES[f"{_GLUE}/{_short}"] = _glue_name
_BUILTIN_NAMES = ("builtin", "built-in", "synthetic")


def known_tasks() -> list[str]:
    """Names accepted by ``load_task`` without data: ``builtin`` and the hub tasks."""
    return ["builtin", *KNOWN]


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
        if candidate in KNOWN:
            return candidate
        if candidate in _ALIASES:
            return _ALIASES[candidate]
    return None


def unknown_task_message(name: str) -> str:
    """The message for a task name that is neither known nor a path."""
    return (
        f"Unknown task {name!r}. Known tasks: {', '.join(known_tasks())} "
        f"(aliases such as sst2, mrpc, stsb, csqa, winogrande also work). "
        "To use your own data, pass local files: --data DIR (a folder with train and dev "
        "files) or --data TRAIN EVAL."
    )
