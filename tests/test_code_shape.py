"""Functions stay small enough to read: at most ~80 lines of code (docstrings not counted).

A function that is long for a good reason says so in its docstring ("Long because ...").
Complexity (at most 15 per function) is ruff's C901, checked by `ruff check` in CI.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "recipec"
MAX_LINES = 80


def code_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    """Lines from the ``def`` to the end, less the docstring's lines."""
    lines = node.end_lineno - node.lineno + 1
    body = node.body
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        if isinstance(body[0].value.value, str):
            lines -= body[0].end_lineno - body[0].lineno + 1
    return lines


def long_functions(root: Path = PACKAGE) -> list[str]:
    found = []
    for path in sorted(root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            n = code_lines(node)
            doc = ast.get_docstring(node) or ""
            if n > MAX_LINES and "Long because" not in doc:
                found.append(
                    f"{path.relative_to(root.parent)}:{node.lineno} {node.name} ({n} lines)"
                )
    return found


def test_no_function_is_too_long():
    found = long_functions()
    assert not found, "split these (or say 'Long because ...' in the docstring):\n" + "\n".join(
        found
    )


def test_a_long_function_is_caught(tmp_path):
    body = "\n".join(f"    x{i} = {i}" for i in range(MAX_LINES + 1))
    (tmp_path / "recipec").mkdir()
    (tmp_path / "recipec" / "m.py").write_text(f'def f():\n    """Doc."""\n{body}\n')
    (tmp_path / "recipec" / "ok.py").write_text(
        f'def g():\n    """Long because a flat table reads best here."""\n{body}\n'
    )
    assert long_functions(tmp_path / "recipec") == [f"recipec/m.py:1 f ({MAX_LINES + 2} lines)"]
