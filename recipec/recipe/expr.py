"""A small, safe arithmetic language for recipe variables.

Grammar (Python-like precedence)::

    expr   := number | name | expr (+ - * / **) expr | -expr | +expr | (expr)
            | fn(expr, ...)            fn in: min max round floor ceil abs

The text is parsed with :mod:`ast` and the tree is *interpreted* node by node against a
whitelist; nothing is ever passed to ``eval``. Results are floats or ints; booleans, strings,
attribute access, subscripts, calls of anything else and every other node are rejected.
"""

from __future__ import annotations

import ast
import math
import re
from collections.abc import Callable, Mapping

MAX_EXPR_CHARS = 500
MAX_DEPTH = 50
MAX_MAGNITUDE = 1e15

Number = int | float


class ExprError(ValueError):
    """An expression that cannot be parsed or evaluated."""


def _round(x: Number, ndigits: Number | None = None) -> Number:
    if ndigits is None:
        return int(round(x))
    return round(x, int(ndigits))


FUNCTIONS: dict[str, tuple[Callable[..., Number], int, int]] = {
    # name: (function, min args, max args)
    "min": (min, 2, 16),
    "max": (max, 2, 16),
    "round": (_round, 1, 2),
    "floor": (math.floor, 1, 1),
    "ceil": (math.ceil, 1, 1),
    "abs": (abs, 1, 1),
}

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def _check(value: Number) -> Number:
    if isinstance(value, float) and not math.isfinite(value):
        raise ExprError("result is not a finite number")
    if abs(value) > MAX_MAGNITUDE:
        shown = f"{value:.3g}" if isinstance(value, float) else f"{str(value)[:12]}..."
        raise ExprError(f"result {shown} is out of range (|x| <= {MAX_MAGNITUDE:g})")
    return value


def parse(text: str) -> ast.expr:
    """Parse ``text`` into an AST, rejecting anything outside the whitelist."""
    if not isinstance(text, str):
        raise ExprError(f"expected an expression string, got {type(text).__name__}")
    if len(text) > MAX_EXPR_CHARS:
        raise ExprError(f"expression longer than {MAX_EXPR_CHARS} characters")
    try:
        tree = ast.parse(text.strip(), mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError) as exc:
        msg = getattr(exc, "msg", None) or str(exc) or type(exc).__name__
        raise ExprError(f"cannot parse expression {text!r}: {msg}") from None
    _validate(tree.body, 0)
    return tree.body


def _validate(node: ast.AST, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise ExprError(f"expression nested deeper than {MAX_DEPTH} levels")
    if isinstance(node, ast.Constant):
        if isinstance(node.value, bool) or not isinstance(node.value, int | float):
            raise ExprError(f"only numbers are allowed, not {node.value!r}")
    elif isinstance(node, ast.Name):
        pass
    elif isinstance(node, ast.BinOp):
        if not isinstance(node.op, ast.Add | ast.Sub | ast.Mult | ast.Div | ast.Pow):
            raise ExprError(f"operator {type(node.op).__name__} is not allowed (use + - * / **)")
        _validate(node.left, depth + 1)
        _validate(node.right, depth + 1)
    elif isinstance(node, ast.UnaryOp):
        if not isinstance(node.op, ast.USub | ast.UAdd):
            raise ExprError(f"operator {type(node.op).__name__} is not allowed")
        _validate(node.operand, depth + 1)
    elif isinstance(node, ast.Call):
        if not isinstance(node.func, ast.Name) or node.func.id not in FUNCTIONS:
            raise ExprError(f"only these functions are allowed: {', '.join(FUNCTIONS)}")
        if node.keywords:
            raise ExprError("keyword arguments are not allowed")
        _, lo, hi = FUNCTIONS[node.func.id]
        if not lo <= len(node.args) <= hi:
            raise ExprError(f"{node.func.id}() takes {lo}..{hi} arguments, got {len(node.args)}")
        for arg in node.args:
            _validate(arg, depth + 1)
    else:
        raise ExprError(f"{type(node).__name__} is not allowed in an expression")


def evaluate(node: ast.expr, env: Mapping[str, Number]) -> Number:
    """Interpret a validated AST over ``env``."""
    if isinstance(node, ast.Constant):
        return _check(node.value)
    if isinstance(node, ast.Name):
        if node.id not in env:
            known = ", ".join(sorted(env)) or "none defined"
            raise ExprError(f"unknown variable {node.id!r} (variables: {known})")
        return env[node.id]
    if isinstance(node, ast.UnaryOp):
        value = evaluate(node.operand, env)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = evaluate(node.left, env), evaluate(node.right, env)
        try:
            if isinstance(node.op, ast.Add):
                return _check(left + right)
            if isinstance(node.op, ast.Sub):
                return _check(left - right)
            if isinstance(node.op, ast.Mult):
                return _check(left * right)
            if isinstance(node.op, ast.Div):
                if right == 0:
                    raise ExprError("division by zero")
                return _check(left / right)
            # Power is computed in floating point so that huge integer powers cannot hang.
            result = math.pow(left, right)
            if (
                float(result).is_integer()
                and isinstance(left, int)
                and isinstance(right, int)
                and right >= 0
            ):
                return _check(int(result))
            return _check(result)
        except (OverflowError, ValueError, ZeroDivisionError) as exc:
            if isinstance(exc, ExprError):
                raise
            raise ExprError(f"arithmetic error: {exc}") from None
    if isinstance(node, ast.Call):
        fn, _, _ = FUNCTIONS[node.func.id]  # type: ignore[union-attr]
        args = [evaluate(arg, env) for arg in node.args]
        try:
            return _check(fn(*args))
        except (OverflowError, ValueError, TypeError) as exc:
            raise ExprError(f"{node.func.id}(): {exc}") from None  # type: ignore[union-attr]
    raise ExprError(f"{type(node).__name__} is not allowed in an expression")


def evaluate_text(text: str, env: Mapping[str, Number]) -> Number:
    """Parse and evaluate an expression string."""
    return evaluate(parse(text), env)


def resolve_variables(raw: Mapping[str, object]) -> tuple[dict[str, Number], dict[str, str]]:
    """Resolve a ``variables`` mapping whose values are numbers or expressions.

    Returns ``(values, errors)`` where ``errors`` maps a variable name to a message (unknown
    names, cycles, bad syntax). Order of definition does not matter.
    """
    values: dict[str, Number] = {}
    errors: dict[str, str] = {}
    parsed: dict[str, ast.expr] = {}
    for name, value in raw.items():
        if not isinstance(name, str) or not _NAME.fullmatch(name):
            errors[str(name)] = "variable names must be identifiers (letters, digits, _)"
        elif name in FUNCTIONS:
            errors[name] = f"{name!r} is a function name and cannot be a variable"
        elif isinstance(value, bool):
            errors[name] = "booleans are not numbers; use 0 or 1"
        elif isinstance(value, int | float):
            try:
                values[name] = _check(value)
            except ExprError as exc:
                errors[name] = str(exc)
        elif isinstance(value, str):
            try:
                parsed[name] = parse(strip_braces(value))
            except ExprError as exc:
                errors[name] = str(exc)
        else:
            errors[name] = (
                f"a variable must be a number or an expression string, got {type(value).__name__}"
            )

    state: dict[str, str] = {}  # name -> "visiting" | "done"

    def visit(name: str, stack: list[str]) -> None:
        if state.get(name) == "done" or name in errors:
            return
        if state.get(name) == "visiting":
            cycle = " -> ".join([*stack[stack.index(name) :], name])
            raise ExprError(f"variables form a cycle: {cycle}")
        state[name] = "visiting"
        for dep in sorted(free_names(parsed[name])):
            if dep in parsed:
                visit(dep, [*stack, name])
            if dep in errors:
                raise ExprError(f"depends on {dep!r}, which is invalid")
            elif dep not in values:
                known = ", ".join(sorted(set(values) | set(parsed))) or "none defined"
                raise ExprError(f"unknown variable {dep!r} (variables: {known})")
        values[name] = evaluate(parsed[name], values)
        state[name] = "done"

    for name in parsed:
        try:
            visit(name, [])
        except ExprError as exc:
            for other, st in list(state.items()):
                if st == "visiting":
                    errors[other] = str(exc)
                    state[other] = "done"
    return values, errors


def free_names(node: ast.expr) -> set[str]:
    """Variable names an expression reads (function names excluded)."""
    out: set[str] = set()

    def walk(n: ast.AST) -> None:
        if isinstance(n, ast.Name):
            out.add(n.id)
        elif isinstance(n, ast.Call):
            for arg in n.args:
                walk(arg)
        else:
            for child in ast.iter_child_nodes(n):
                walk(child)

    walk(node)
    return out


_BRACED = re.compile(r"^\$\{(.*)\}$", re.DOTALL)


def strip_braces(text: str) -> str:
    """``"${a * 2}"`` -> ``"a * 2"``; other strings unchanged."""
    match = _BRACED.match(text.strip())
    return match.group(1) if match else text


def is_reference(value: object) -> bool:
    """True for a ``${...}`` string, which a recipe field evaluates against the variables."""
    return isinstance(value, str) and _BRACED.match(value.strip()) is not None
