"""Evaluation metrics implemented with numpy only (no scikit-learn / scipy dependency).

Conventions:
- Degenerate cases return 0.0 instead of NaN (an MCC with a constant prediction, a correlation
  with a constant input, an F1 with no positive labels or predictions), so metrics can always
  be written to JSON and compared when picking the best checkpoint.
- ``compute_metrics`` accepts logits (``[N, C]``) or predicted ids (``[N]``); for regression it
  accepts ``[N]`` or ``[N, 1]`` scores. Torch tensors are converted through ``.numpy()``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

if TYPE_CHECKING:
    from recipec.tasks.base import TaskInfo

__all__ = [
    "METRICS",
    "METRICS_BY_KIND",
    "accuracy",
    "compute_metrics",
    "f1",
    "matthews_corrcoef",
    "pearson",
    "predictions_from_logits",
    "rankdata",
    "spearman",
]


def _as_array(x: Any) -> np.ndarray:
    """Converts a list, numpy array or torch tensor to a numpy array."""
    if hasattr(x, "detach"):  # torch.Tensor without importing torch
        x = x.detach().cpu()
        if str(x.dtype) in ("torch.bfloat16", "torch.float16"):
            x = x.float()
        x = x.numpy()
    return np.asarray(x)


def _check_same_length(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"predictions and labels differ in length: {a.shape[0]} vs {b.shape[0]}")
    if a.shape[0] == 0:
        raise ValueError("cannot compute a metric on zero examples")


def accuracy(predictions: Any, labels: Any) -> float:
    """Fraction of predicted class ids equal to the labels."""
    p, y = _as_array(predictions).reshape(-1), _as_array(labels).reshape(-1)
    _check_same_length(p, y)
    return float(np.mean(p == y))


def _f1_for_class(p: np.ndarray, y: np.ndarray, cls: int) -> float:
    tp = float(np.sum((p == cls) & (y == cls)))
    fp = float(np.sum((p == cls) & (y != cls)))
    fn = float(np.sum((p != cls) & (y == cls)))
    denom = 2 * tp + fp + fn
    return 0.0 if denom == 0 else 2 * tp / denom


def f1(predictions: Any, labels: Any, num_classes: int | None = None) -> float:
    """F1 score: binary (positive class 1) for 2 classes, macro-averaged otherwise.

    Args:
        predictions: Predicted class ids.
        labels: True class ids.
        num_classes: Number of classes; inferred from the data when None (binary when all ids
            are in {0, 1}).

    Returns:
        The F1 score. The macro average runs over classes present in labels or predictions.
    """
    p, y = _as_array(predictions).reshape(-1), _as_array(labels).reshape(-1)
    _check_same_length(p, y)
    present = np.union1d(np.unique(p), np.unique(y))
    binary = num_classes == 2 if num_classes is not None else set(present.tolist()) <= {0, 1}
    if binary:
        return _f1_for_class(p, y, 1)
    return float(np.mean([_f1_for_class(p, y, int(c)) for c in present]))


def matthews_corrcoef(predictions: Any, labels: Any) -> float:
    """Matthews correlation coefficient (multiclass form); 0.0 when undefined."""
    p, y = _as_array(predictions).reshape(-1), _as_array(labels).reshape(-1)
    _check_same_length(p, y)
    classes, inverse = np.unique(np.concatenate([y, p]), return_inverse=True)
    k = len(classes)
    yi, pi = inverse[: len(y)], inverse[len(y) :]
    confusion = np.zeros((k, k), dtype=np.float64)
    np.add.at(confusion, (yi, pi), 1.0)
    t = confusion.sum(axis=1)  # true counts per class
    q = confusion.sum(axis=0)  # predicted counts per class
    correct = np.trace(confusion)
    s = confusion.sum()
    cov_yp = correct * s - float(t @ q)
    cov_yy = s * s - float(t @ t)
    cov_pp = s * s - float(q @ q)
    denom = cov_yy * cov_pp
    if denom <= 0:
        return 0.0
    return float(cov_yp / np.sqrt(denom))


def pearson(predictions: Any, labels: Any) -> float:
    """Pearson correlation; 0.0 when either input is constant."""
    x = _as_array(predictions).astype(np.float64).reshape(-1)
    y = _as_array(labels).astype(np.float64).reshape(-1)
    _check_same_length(x, y)
    dx, dy = x - x.mean(), y - y.mean()
    denom = np.sqrt(float(dx @ dx) * float(dy @ dy))
    if denom == 0:
        return 0.0
    return float(np.clip((dx @ dy) / denom, -1.0, 1.0))


def rankdata(values: Any) -> np.ndarray:
    """Ranks starting at 1, ties get the average of the ranks they span."""
    a = _as_array(values).reshape(-1)
    order = np.argsort(a, kind="stable")
    sorted_a = a[order]
    # start index of each run of equal values in sorted order
    starts = np.flatnonzero(np.r_[True, sorted_a[1:] != sorted_a[:-1]])
    ends = np.r_[starts[1:], len(a)]
    avg = (starts + ends + 1) / 2.0  # mean of 1-based ranks starts+1 .. ends
    ranks = np.empty(len(a), dtype=np.float64)
    ranks[order] = np.repeat(avg, ends - starts)
    return ranks


def spearman(predictions: Any, labels: Any) -> float:
    """Spearman rank correlation (Pearson on average ranks); 0.0 when undefined."""
    x, y = _as_array(predictions).reshape(-1), _as_array(labels).reshape(-1)
    _check_same_length(x, y)
    return pearson(rankdata(x), rankdata(y))


def predictions_from_logits(kind: str, predictions: Any) -> np.ndarray:
    """Turns model outputs into class ids (classification) or scores (regression).

    Args:
        kind: ``"classification"``, ``"multiple_choice"`` or ``"regression"``.
        predictions: Logits ``[N, C]``, class ids ``[N]`` or regression scores ``[N]``/``[N, 1]``.

    Returns:
        A 1-D array of class ids or float scores.
    """
    a = _as_array(predictions)
    if kind == "regression":
        if a.ndim == 2 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim != 1:
            raise ValueError(f"regression predictions must be [N] or [N, 1], got {a.shape}")
        return a.astype(np.float64)
    if a.ndim == 2:
        return a.argmax(axis=-1)
    if a.ndim != 1:
        raise ValueError(f"expected logits [N, C] or class ids [N], got shape {a.shape}")
    return a


METRICS = {
    "accuracy": accuracy,
    "f1": f1,
    "mcc": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}
"""Metric name -> function(predictions, labels). Names used in ``TaskInfo.metrics``."""

METRICS_BY_KIND = {
    "classification": ("accuracy", "f1", "mcc"),
    "regression": ("pearson", "spearman"),
    "multiple_choice": ("accuracy",),
}
"""The metrics each task kind can be scored with (``--metric``)."""


def compute_metrics(info: TaskInfo, predictions: Any, labels: Any) -> dict[str, float]:
    """Computes every metric named in ``info.metrics``.

    Args:
        info: The task description (kind, number of labels, metric names).
        predictions: Logits, class ids or regression scores (see ``predictions_from_logits``).
        labels: True labels (class ids or float scores).

    Returns:
        ``{metric_name: value}`` in the order of ``info.metrics``.
    """
    preds = predictions_from_logits(info.kind, predictions)
    y = _as_array(labels).reshape(-1)
    out: dict[str, float] = {}
    for name in info.metrics:
        if name not in METRICS:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)}")
        if name == "f1":
            out[name] = f1(preds, y, num_classes=info.num_labels if info.num_labels > 1 else None)
        else:
            out[name] = METRICS[name](preds, y)
    return out
