"""Metrics against values computed by hand on small arrays."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from recipec.tasks import TaskInfo
from recipec.tasks.metrics import (
    accuracy,
    compute_metrics,
    f1,
    matthews_corrcoef,
    pearson,
    predictions_from_logits,
    rankdata,
    spearman,
)


def test_accuracy():
    assert accuracy([0, 1, 1, 0], [0, 1, 0, 0]) == pytest.approx(0.75)


def test_binary_f1():
    # TP=2 (idx 0, 3), FP=1 (idx 1), FN=1 (idx 4): P = R = 2/3, F1 = 2/3
    assert f1([1, 1, 0, 1, 0], [1, 0, 0, 1, 1]) == pytest.approx(2 / 3)


def test_binary_f1_without_positives_is_zero():
    assert f1([0, 0, 0], [0, 0, 0], num_classes=2) == 0.0


def test_macro_f1_three_classes():
    preds = [0, 1, 2, 2, 1, 0]
    labels = [0, 1, 1, 2, 2, 2]
    # class 0: TP1 FP1 FN0 -> 2/3; class 1: TP1 FP1 FN1 -> 1/2; class 2: TP1 FP1 FN2 -> 2/5
    assert f1(preds, labels, num_classes=3) == pytest.approx((2 / 3 + 1 / 2 + 2 / 5) / 3)


def test_mcc_binary():
    # TP=2, TN=1, FP=1, FN=1: (2*1 - 1*1) / sqrt(3*3*2*2) = 1/6
    assert matthews_corrcoef([1, 1, 0, 1, 0], [1, 0, 0, 1, 1]) == pytest.approx(1 / 6)


def test_mcc_perfect_and_inverted():
    assert matthews_corrcoef([0, 1, 0, 1], [0, 1, 0, 1]) == pytest.approx(1.0)
    assert matthews_corrcoef([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)


def test_mcc_degenerate_is_zero():
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 0, 1]) == 0.0
    assert matthews_corrcoef([0, 1, 0, 1], [1, 1, 1, 1]) == 0.0


def test_mcc_multiclass_perfect():
    assert matthews_corrcoef([0, 1, 2, 2], [0, 1, 2, 2]) == pytest.approx(1.0)


def test_pearson():
    # dx = dy-ish: cov = 4, var_x = var_y = 5 -> 0.8
    assert pearson([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)


def test_pearson_constant_is_zero():
    assert pearson([1, 1, 1], [1, 2, 3]) == 0.0


def test_rankdata_with_ties():
    np.testing.assert_allclose(rankdata([10, 20, 20, 5, 20]), [2, 4, 4, 1, 4])
    np.testing.assert_allclose(rankdata([3, 1, 2]), [3, 1, 2])


def test_spearman_with_ties():
    # ranks x = [1, 2.5, 2.5, 4], y = [1, 3, 2, 4]: cov 4.5, var 4.5 and 5 -> 3 / sqrt(10)
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(3 / math.sqrt(10))


def test_spearman_is_rank_based():
    assert spearman([1, 2, 3, 4], [1, 10, 100, 1000]) == pytest.approx(1.0)


def test_length_mismatch_raises():
    with pytest.raises(ValueError, match="differ in length"):
        accuracy([0, 1], [0])


def test_predictions_from_logits():
    logits = np.array([[0.1, 0.9], [2.0, -1.0]])
    np.testing.assert_array_equal(predictions_from_logits("classification", logits), [1, 0])
    np.testing.assert_allclose(predictions_from_logits("regression", [[0.5], [1.5]]), [0.5, 1.5])


def test_compute_metrics_classification_from_torch_logits():
    info = TaskInfo(
        "t", "classification", 2, metrics=("accuracy", "f1", "mcc"), primary_metric="accuracy"
    )
    logits = torch.tensor([[0.0, 1.0], [0.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    out = compute_metrics(info, logits, torch.tensor([1, 0, 0, 1, 1]))
    assert list(out) == ["accuracy", "f1", "mcc"]
    assert out["accuracy"] == pytest.approx(0.6)
    assert out["f1"] == pytest.approx(2 / 3)
    assert out["mcc"] == pytest.approx(1 / 6)


def test_compute_metrics_regression():
    info = TaskInfo(
        "t", "regression", 1, metrics=("pearson", "spearman"), primary_metric="spearman"
    )
    out = compute_metrics(info, np.array([[1.0], [2.0], [3.0], [4.0]]), [1.0, 3.0, 2.0, 4.0])
    assert out["pearson"] == pytest.approx(0.8)
    assert out["spearman"] == pytest.approx(0.8)


def test_compute_metrics_multiple_choice():
    info = TaskInfo("t", "multiple_choice", 3, num_choices=3)
    logits = np.array([[0.1, 0.5, 0.2], [0.9, 0.0, 0.0]])
    assert compute_metrics(info, logits, [1, 2]) == {"accuracy": 0.5}
