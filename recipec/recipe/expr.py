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
        return _variable(node.id, env)
    if isinstance(node, ast.UnaryOp):
        value = evaluate(node.operand, env)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        left, right = evaluate(node.left, env), evaluate(node.right, env)
        return _binary(node.op, left, right)
    if isinstance(node, ast.Call):
        return _call(node, env)
    raise ExprError(f"{type(node).__name__} is not allowed in an expression")


def _variable(name: str, env: Mapping[str, Number]) -> Number:
    if name not in env:
        known = ", ".join(sorted(env)) or "none defined"
        raise ExprError(f"unknown variable {name!r} (variables: {known})")
    return env[name]


def _binary(op: ast.operator, left: Number, right: Number) -> Number:
    """``left op right``; arithmetic failures (overflow, domain) become :class:`ExprError`."""
    try:
        if isinstance(op, ast.Add):
            return _check(left + right)
        if isinstance(op, ast.Sub):
            return _check(left - right)
        if isinstance(op, ast.Mult):
            return _check(left * right)
        if isinstance(op, ast.Div):
            if right == 0:
                raise ExprError("division by zero")
            return _check(left / right)
        return _power(left, right)  # Pow: the one other operator _validate lets through
    except (OverflowError, ValueError, ZeroDivisionError) as exc:
        if isinstance(exc, ExprError):
            raise
        raise ExprError(f"arithmetic error: {exc}") from None


def _power(left: Number, right: Number) -> Number:
    """``left ** right``, an int for whole results of int operands.

    Computed in floating point so that huge integer powers cannot hang.
    """
    result = math.pow(left, right)
    if (
        float(result).is_integer()
        and isinstance(left, int)
        and isinstance(right, int)
        and right >= 0
    ):
        return _check(int(result))
    return _check(result)


def _call(node: ast.Call, env: Mapping[str, Number]) -> Number:
    fn, _, _ = FUNCTIONS[node.func.id]  # type: ignore[union-attr]
    args = [evaluate(arg, env) for arg in node.args]
    try:
        return _check(fn(*args))
    except (OverflowError, ValueError, TypeError) as exc:
        raise ExprError(f"{node.func.id}(): {exc}") from None  # type: ignore[union-attr]


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
        try:
            item = _read_variable(name, value)
        except ExprError as exc:
            errors[str(name)] = str(exc)
            continue
        if isinstance(item, ast.expr):
            parsed[name] = item
        else:
            values[name] = item
    _DependencyOrder(parsed, values, errors).run()
    return values, errors


def _read_variable(name: object, value: object) -> Number | ast.expr:
    """A variable's number (range-checked) or parsed expression; :class:`ExprError` otherwise."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ExprError("variable names must be identifiers (letters, digits, _)")
    if name in FUNCTIONS:
        raise ExprError(f"{name!r} is a function name and cannot be a variable")
    if isinstance(value, bool):
        raise ExprError("booleans are not numbers; use 0 or 1")
    if isinstance(value, int | float):
        return _check(value)
    if isinstance(value, str):
        return parse(strip_braces(value))
    raise ExprError(
        f"a variable must be a number or an expression string, got {type(value).__name__}"
    )


# The longest chain of variables each defined by the next (each level is one stack frame).
MAX_CHAIN = 200


class _DependencyOrder:
    """Evaluate parsed variables depth first, each after the variables it reads.

    A failure (a cycle, an unknown or invalid dependency, an arithmetic error) is the error of
    every variable on the path being visited when it happened.
    """

    def __init__(
        self, parsed: dict[str, ast.expr], values: dict[str, Number], errors: dict[str, str]
    ):
        self.parsed, self.values, self.errors = parsed, values, errors
        self.state: dict[str, str] = {}  # name -> "visiting" | "done"

    def run(self) -> None:
        """Fill ``values`` and ``errors`` for every parsed variable."""
        for name in self.parsed:
            try:
                self.visit(name, [])
            except ExprError as exc:
                for other, st in list(self.state.items()):
                    if st == "visiting":
                        self.errors[other] = str(exc)
                        self.state[other] = "done"

    def visit(self, name: str, stack: list[str]) -> None:
        """Evaluate ``name`` after its dependencies; ``stack``: the visits that led here."""
        if self.state.get(name) == "done" or name in self.errors:
            return
        if self.state.get(name) == "visiting":
            cycle = " -> ".join([*stack[stack.index(name) :], name])
            raise ExprError(f"variables form a cycle: {cycle}")
        if len(stack) >= MAX_CHAIN:
            raise ExprError(
                f"variables depend on each other more than {MAX_CHAIN} deep "
                f"({stack[0]} -> ... -> {name}); shorten the chain"
            )
        self.state[name] = "visiting"
        for dep in sorted(free_names(self.parsed[name])):
            if dep in self.parsed:
                self.visit(dep, [*stack, name])
            self._check_dependency(dep)
        self.values[name] = evaluate(self.parsed[name], self.values)
        self.state[name] = "done"

    def _check_dependency(self, dep: str) -> None:
        """After its own visit: ``dep`` must have a value."""
        if dep in self.errors:
            raise ExprError(f"depends on {dep!r}, which is invalid")
        if dep not in self.values:
            known = ", ".join(sorted(set(self.values) | set(self.parsed))) or "none defined"
            raise ExprError(f"unknown variable {dep!r} (variables: {known})")


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
