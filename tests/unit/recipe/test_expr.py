import math

import pytest

from recipec.recipe.expr import ExprError, evaluate_text, resolve_variables


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("1 + 2 * 3", 7),
        ("(1 + 2) * 3", 9),
        ("2 ** 3 ** 2", 512),
        ("-2 ** 2", -4),
        ("7 / 2", 3.5),
        ("min(3, 1, 2) + max(4, 5)", 6),
        ("round(2.5) + round(3.14159, 2)", 2 + 3.14),
        ("floor(2.7) + ceil(2.1)", 5),
        ("abs(-4)", 4),
        ("1e-5 * 10", 1e-4),
    ],
)
def test_arithmetic(text, expected):
    assert evaluate_text(text, {}) == pytest.approx(expected)


@pytest.mark.parametrize(
    "text",
    [
        "__import__('os')",
        "a.b",
        "a[0]",
        "'text'",
        "True",
        "lambda: 1",
        "[1, 2]",
        "1 if 1 else 2",
        "1 < 2",
        "1 // 2",
        "1 % 2",
        "sum(1, 2)",
        "min(x=1)",
        "floor(1, 2)",
        "1 +",
        "",
        "-" * 200 + "1",
        "10 ** 10 ** 10",
        "1 / 0",
        "9" * 400,
        "x" * 600,
    ],
)
def test_rejected(text):
    with pytest.raises(ExprError):
        evaluate_text(text, {"x": 1})


def test_variables_in_any_order_with_cycles_and_unknowns():
    values, errors = resolve_variables(
        {
            "total": "prune_end + 2",
            "prune_end": "start + 6",
            "start": 2,
            "a": "b",
            "b": "a",
            "c": "nope",
            "d": "c * 2",
        }
    )
    assert values == {"start": 2, "prune_end": 8, "total": 10}
    assert "cycle" in errors["a"] and "cycle" in errors["b"]
    assert "unknown variable 'nope'" in errors["c"]
    assert "'c'" in errors["d"]


def test_braced_variables_and_bad_names():
    values, errors = resolve_variables(
        {"a": "${2 * 3}", "min": 1, "x": True, "y": [1], "ok": math.pi}
    )
    assert values["a"] == 6 and values["ok"] == pytest.approx(math.pi)
    assert set(errors) == {"min", "x", "y"}
