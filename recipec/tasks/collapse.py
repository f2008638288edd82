"""A collapsed model: one class (or one score) for (almost) every eval example.

A recipe that prunes too hard for its budget, a head that never trained, or a few hundred
examples can leave a model that answers the same thing whatever the input; its accuracy is then
the share of that class in the eval set, which reads like a (poor) result. The evaluation adds
one diagnostic to its metrics (``top_class_share`` for classification and multiple choice, with
``top_class``; ``prediction_spread`` for regression) and :func:`collapse_of` judges it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from recipec.tasks.metrics import _as_array, predictions_from_logits

if TYPE_CHECKING:
    from recipec.tasks.base import TaskInfo

COLLAPSE_SHARE = 0.98
"""A classifier is collapsed when one class takes at least this share of its predictions."""

COLLAPSE_SPREAD = 0.01
"""A regressor is collapsed when its predictions' std is below this fraction of the labels'."""

MIN_EXAMPLES = 10
"""Fewer eval examples than this are not judged (one class for 4 examples can be chance)."""

DIAGNOSTICS = ("top_class", "top_class_share", "prediction_spread")
"""Metric keys that describe the predictions rather than score them (not metrics to compare)."""


def prediction_diagnostics(info: TaskInfo, predictions: Any, labels: Any) -> dict[str, float]:
    """What the predictions look like: the most predicted class and its share of all
    predictions, or (regression) the std of the predictions over the std of the labels."""
    preds = predictions_from_logits(info.kind, predictions)
    if len(preds) == 0:
        return {}
    if info.kind == "regression":
        y = _as_array(labels).astype(np.float64).reshape(-1)
        label_std = float(y.std())
        spread = float(preds.std()) / label_std if label_std > 0 else 1.0
        return {"prediction_spread": spread}
    classes, counts = np.unique(preds.astype(np.int64), return_counts=True)
    top = int(np.argmax(counts))
    return {"top_class": float(classes[top]), "top_class_share": float(counts[top] / len(preds))}


def collapse_of(info: TaskInfo, metrics: Mapping[str, float], examples: int) -> str | None:
    """A sentence saying how the model collapsed, or None when it did not (or cannot be told)."""
    if examples < MIN_EXAMPLES:
        return None
    spread = metrics.get("prediction_spread")
    if spread is not None and spread < COLLAPSE_SPREAD:
        return (
            f"the model predicts (almost) the same score for all {examples} eval examples "
            f"(their spread is {100 * spread:.2f}% of the labels')"
        )
    share = metrics.get("top_class_share")
    if share is None or share < COLLAPSE_SHARE:
        return None
    top = int(metrics.get("top_class", 0))
    what = "choice" if info.kind == "multiple_choice" else "class"
    name = f"{what} {top}"
    if info.kind != "multiple_choice" and info.label_names and 0 <= top < len(info.label_names):
        name = f"{what} {info.label_names[top]!r}"
    count = round(share * examples)
    return f"the model predicts one {what} ({name}) for {count} of {examples} eval examples"


def scores(metrics: Mapping[str, float]) -> dict[str, float]:
    """``metrics`` without the prediction diagnostics (the metrics a report tabulates)."""
    return {k: v for k, v in metrics.items() if k not in DIAGNOSTICS}
