"""The run report (recipec.train.report) is written whatever the metrics are."""

from __future__ import annotations

import json

import pytest

from recipec.train.report import _markdown, _read_metrics, kept_line


def _report(final, teacher):
    return {
        "recipe": "r.yaml",
        "overrides": [],
        "model": "m",
        "task": {"name": "cola", "kind": "classification"},
        "train_examples": 10,
        "eval_examples": 5,
        "final_eval": final,
        "primary_metric": "matthews_correlation",
        "teacher": {"eval": teacher},
        "sparsity": {"targets": 0.5, "model": 0.4, "per_tensor": {}, "per_component": {}},
        "stages": [],
        "wall_seconds": 1.0,
        "resumed": False,
    }


@pytest.mark.parametrize("teacher", [0.0, -0.12, float("nan"), None])
def test_a_teacher_score_of_zero_or_below_is_reported_not_divided(teacher):
    """GLUE CoLA's Matthews correlation of a weak dense teacher is 0.0 (or negative): no
    ZeroDivisionError after all the training, no meaningless percentage."""
    metric = "matthews_correlation"
    text = _markdown(_report({metric: 0.05, "accuracy": 0.69}, {metric: teacher}))
    assert f"Dense teacher: {metric}" in text and "kept" not in text
    assert "no percentage" in text and "0.0500" in text


def test_a_positive_teacher_score_gives_the_share_kept():
    assert kept_line("accuracy", 0.8, 0.9).endswith("kept 88.89% of it.")


def test_unreadable_metric_lines_are_left_out(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = {"stage": "main", "step": 1, "loss": 0.5, "lr": 1e-3}
    path.write_text(json.dumps(good) + '\n{"stage": "main", "st\n[1, 2]\n' + json.dumps(good))
    assert _read_metrics(path) == [good, good]


def test_metrics_that_are_not_numbers_are_printed_as_they_are():
    text = _markdown(_report({"accuracy": None}, {"matthews_correlation": 0.5}))
    assert "| accuracy | None |" in text
