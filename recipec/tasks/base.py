"""What a loaded task is: its kind, examples, description and the one error type."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal

__all__ = ["KINDS", "Example", "Kind", "TaskData", "TaskError", "TaskInfo", "TaskOptions"]

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


@dataclass(frozen=True)
class TaskOptions:
    """What the user says about a task instead of letting recipec infer it.

    Attributes:
        kind: ``"classification"`` or ``"regression"`` (``--task-kind``): how numeric labels
            are read when the files alone are ambiguous (integers mixed with decimals).
        labels: Every class, in id order (``--labels``): labels outside it are refused, and
            rare, missing or dev-only classes in it are accepted.
        metric: The primary metric (``--metric``), one the task's kind supports.
    """

    kind: str | None = None
    labels: tuple[str, ...] | None = None
    metric: str | None = None


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
