"""Collapse detection: the diagnostics an evaluation adds, and when they mean a collapsed model."""

import numpy as np
import pytest

from recipec.tasks.base import TaskInfo
from recipec.tasks.collapse import collapse_of, prediction_diagnostics, scores

SST = TaskInfo("sst", "classification", 2, label_names=("negative", "positive"))
STSB = TaskInfo("stsb", "regression", 1, metrics=("pearson",), primary_metric="pearson")
MC = TaskInfo("csqa", "multiple_choice", 5, num_choices=5)


def test_the_top_class_and_its_share_are_counted():
    logits = np.array([[0.0, 1.0]] * 7 + [[1.0, 0.0]] * 3)
    diag = prediction_diagnostics(SST, logits, np.zeros(10))
    assert diag == {"top_class": 1.0, "top_class_share": 0.7}


def test_regression_spread_is_the_predictions_std_over_the_labels():
    labels = np.array([0.0, 2.0, 4.0, 6.0])  # std sqrt(5)
    preds = np.array([1.0, 1.0, 1.0, 3.0])  # std sqrt(0.75)
    diag = prediction_diagnostics(STSB, preds, labels)
    assert diag["prediction_spread"] == pytest.approx(np.sqrt(0.75) / np.sqrt(5.0), abs=1e-12)


@pytest.mark.parametrize(
    ("share", "examples", "collapsed"),
    [(1.0, 64, True), (0.98, 100, True), (0.97, 100, False), (1.0, 9, False), (0.5, 64, False)],
)
def test_one_class_for_almost_every_example_is_a_collapse(share, examples, collapsed):
    message = collapse_of(SST, {"top_class": 1.0, "top_class_share": share}, examples)
    assert (message is not None) is collapsed
    if collapsed:
        count = round(share * examples)
        assert message == (
            f"the model predicts one class (class 'positive') for {count} of {examples} eval "
            "examples"
        )


def test_a_constant_regressor_and_a_fixed_choice_are_collapses():
    assert collapse_of(STSB, {"prediction_spread": 0.5}, 50) is None
    assert "same score for all 50 eval examples (their spread is 0.50%" in collapse_of(
        STSB, {"prediction_spread": 0.005}, 50
    )
    message = collapse_of(MC, {"top_class": 0.0, "top_class_share": 1.0}, 20)
    assert message == "the model predicts one choice (choice 0) for 20 of 20 eval examples"


def test_scores_leave_out_the_diagnostics():
    metrics = {"accuracy": 0.5, "top_class": 0.0, "top_class_share": 1.0, "loss": 0.69}
    assert scores(metrics) == {"accuracy": 0.5, "loss": 0.69}
