"""Convert a SparseML recipe (YAML, or Markdown with YAML front matter) into a recipec recipe.

Safety: the YAML is read by :class:`SparseMLLoader`, a ``yaml.SafeLoader`` whose one addition
is a multi-constructor for local ``!Name`` tags that records the tag name, its fields and its
line (:class:`Tagged`). No object is ever constructed from a tag, and every other tag
(``!!python/object/apply:...`` included) is refused. ``eval(...)`` values are parsed and
interpreted by recipec's safe expression language (:mod:`recipec.recipe.expr`), never by
Python's ``eval``.

Semantics kept (docs/convert.md has the full mapping):

- epochs stay epochs. A staged SparseML recipe runs every stage on one epoch clock, so each
  recipec stage gets its windows relative to the end of the previous stage;
- SparseML prunes at start, start + update_frequency, ..., end with the interpolation
  ``y0 + (1 - (1 - x)^3) (y1 - y0)``, which is recipec's cubic GMP schedule;
- ``params`` (``re:`` regexes are matched with ``re.match``) become start-anchored regexes;
- SparseML leaves the last learning rate a window set in place until another LR modifier
  changes it; the converter writes that as ``constant`` lr modifiers, so that ``recipec plan``
  shows the LR SparseML would use at every step.

Anything with no recipec equivalent is reported as a :class:`Finding` with its name and line,
never dropped silently.
"""

from __future__ import annotations

import ast
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from recipec.recipe import expr
from recipec.recipe.errors import RecipeError
from recipec.recipe.load import load_recipe_text
from recipec.recipe.schema import Recipe
from recipec.recipe.structure import parse_structure

MAX_BYTES = 2_000_000
MAX_VALUES = 100_000
_EPS = 1e-9

Number = int | float

# SparseML's __ALL_PRUNABLE__ means the weights of every Linear / ConvNd layer. In BERT-family
# models that is every ``.weight`` except embeddings (nn.Embedding) and LayerNorms; note that it
# includes the pooler and the classification head (the paper's guideline 1 advises against that).
ALL_PRUNABLE_TARGETS = (r"\.weight$",)
ALL_PRUNABLE_EXCLUDE = (r"embeddings\.", r"[Nn]orm\.weight$")
# SparseML's __ALL__ is the regex ``re:.*``: every parameter, biases and LayerNorms included.
ALL_TARGETS = (r".*",)

_DEFAULT_TEMPERATURE = 2.0  # SparseML DistillationModifier defaults
_DEFAULT_HARDNESS = 0.5
_DEFAULT_CYCLE_EPOCHS = 1.0  # SparseML LearningRateFunctionModifier default


class ConvertError(ValueError):
    """A SparseML recipe that cannot be converted; ``problems`` are ``FILE:LINE:COL: message``."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class Finding:
    """A part of the SparseML recipe that is not converted, or converted with a caveat."""

    source: str
    line: int
    name: str
    message: str

    def __str__(self) -> str:
        return f"{self.source}:{self.line}: {self.name}: {self.message}"


@dataclass
class Conversion:
    """The result: recipec YAML text, the validated recipe, and what was not converted."""

    source: str
    text: str
    recipe: Recipe
    unsupported: list[Finding]
    notes: list[Finding]

    def summary(self) -> str:
        """One line: stages with their length and modifier types, and the variable count."""
        n = len(self.recipe.variables)
        return f"{self.recipe.summary()}; {n} variable{'s' if n != 1 else ''}"


# --------------------------------------------------------------------------- safe YAML


class _Map(dict):
    """A mapping from the recipe that remembers the 1-based (line, col) of each key."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: dict[Any, tuple[int, int]] = {}


@dataclass
class Tagged:
    """A ``!Name``-tagged mapping: a SparseML modifier kept as data, never as an object."""

    tag: str
    fields: _Map
    line: int
    col: int

    def line_of(self, key: Any) -> int:
        """The line of ``key`` (or of the tag when the key is absent)."""
        return self.fields.lines.get(key, (self.line, self.col))[0]


class SparseMLLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` for SparseML recipes.

    Adds only a multi-constructor for local ``!Name`` tags (recorded as :class:`Tagged`), key
    positions on mappings, and YAML 1.2 floats such as ``1e-7``. Tags outside YAML's safe
    schema (``!!python/...``) have no constructor and are refused.
    """

    line_offset = 0  # lines before the YAML text (Markdown front matter)


_TAG_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")


def _position(loader: SparseMLLoader, mark: yaml.Mark) -> tuple[int, int]:
    return mark.line + 1 + loader.line_offset, mark.column + 1


def _construct_map(loader: SparseMLLoader, node: yaml.MappingNode) -> _Map:
    loader.flatten_mapping(node)
    out = _Map()
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node, deep=True)
        try:
            hash(key)
        except TypeError:
            raise yaml.constructor.ConstructorError(
                None, None, "mapping keys must be plain values", key_node.start_mark
            ) from None
        out[key] = loader.construct_object(value_node, deep=True)
        out.lines[key] = _position(loader, key_node.start_mark)
    return out


def _construct_tagged(loader: SparseMLLoader, suffix: str, node: yaml.Node) -> Tagged:
    if not _TAG_NAME.fullmatch(suffix):
        raise yaml.constructor.ConstructorError(
            None,
            None,
            f"YAML tag {node.tag!r} is not allowed: only SparseML modifier tags "
            "such as !GMPruningModifier are read",
            node.start_mark,
        )
    if isinstance(node, yaml.MappingNode):
        fields = _construct_map(loader, node)
    elif isinstance(node, yaml.ScalarNode) and not node.value.strip():
        fields = _Map()
    else:
        raise yaml.constructor.ConstructorError(
            None, None, f"!{suffix} must tag a mapping of modifier fields", node.start_mark
        )
    line, col = _position(loader, node.start_mark)
    return Tagged(suffix, fields, line, col)


SparseMLLoader.add_constructor("tag:yaml.org,2002:map", _construct_map)
SparseMLLoader.add_multi_constructor("!", _construct_tagged)
SparseMLLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)

_DELIMITER = re.compile(r"^(?:---|\+\+\+)\s*$")


def split_front_matter(text: str) -> tuple[str, int] | None:
    """The YAML front matter of a Markdown recipe card and the number of lines before it."""
    lines = text.splitlines(keepends=True)
    first = 0
    while first < len(lines) and not lines[first].strip():
        first += 1
    if first == len(lines) or not _DELIMITER.match(lines[first]):
        return None
    for last in range(first + 1, len(lines)):
        if _DELIMITER.match(lines[last]):
            return "".join(lines[first + 1 : last]), first + 1
    return None


# --------------------------------------------------------------------------- values


def _tidy(value: Number) -> Number:
    """Drop float noise from arithmetic on epochs (``26.000000000000004`` -> ``26.0``)."""
    if isinstance(value, float) and math.isfinite(value):
        return float(f"{value:.12g}")
    return value


def _number_text(value: Number) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


_ATOM = re.compile(r"[A-Za-z_][A-Za-z0-9_]*|[0-9][0-9.eE+-]*")


@dataclass(frozen=True)
class Val:
    """A number of the recipe and the recipec expression computing it (``text=None``: literal)."""

    value: Number
    text: str | None = None

    def out(self) -> Number | str:
        """The value as written to the recipec recipe: a number or a ``${...}`` reference."""
        return self.value if self.text is None else "${" + self.text + "}"

    def expression(self) -> str:
        return _number_text(self.value) if self.text is None else self.text

    def minus(self, other: Val) -> Val:
        """``self - other``, written as simply as possible (``a + b - a`` is ``b``)."""
        if other.text is None and other.value == 0:
            return self
        value = _tidy(self.value - other.value)
        if self.text is None and other.text is None:
            return Val(value)
        left, right = self.expression(), other.expression()
        if left == right:
            return Val(value)
        tree = ast.parse(left, mode="eval").body
        if (
            isinstance(tree, ast.BinOp)
            and isinstance(tree.op, ast.Add)
            and ast.dump(tree.left) == ast.dump(ast.parse(right, mode="eval").body)
        ):
            rest = ast.unparse(tree.right)
            return Val(value, rest if _free(tree.right) else None)
        right = right if _ATOM.fullmatch(right) else f"({right})"
        return Val(value, f"{left} - {right}")


def _free(node: ast.AST) -> bool:
    """Whether an expression reads any variable."""
    return any(isinstance(n, ast.Name) for n in ast.walk(node) if not isinstance(n, ast.Call))


class _Problem(Exception):
    def __init__(self, line: int, message: str, col: int = 1):
        super().__init__(message)
        self.line, self.col, self.message = line, col, message


_MISSING = object()
_EVAL = re.compile(r"^\s*eval\((.*)\)\s*$", re.DOTALL)
_SPE_DEPENDENT = "depends on steps_per_epoch"


def _is_eval(value: object) -> bool:
    return isinstance(value, str) and _EVAL.match(value) is not None


@dataclass
class _Scope:
    """Variables visible to a modifier: its stage's first, then the recipe's."""

    label: str
    numeric: dict[str, str] = field(default_factory=dict)  # SparseML name -> recipec variable
    raw: dict[str, Any] = field(default_factory=dict)  # non-numeric variables (strings, lists)
    parent: _Scope | None = None

    def find(self, name: str) -> tuple[str, Any] | None:
        scope: _Scope | None = self
        while scope is not None:
            if name in scope.numeric:
                return "numeric", scope.numeric[name]
            if name in scope.raw:
                return "raw", scope.raw[name]
            scope = scope.parent
        return None

    def known(self) -> list[str]:
        names: set[str] = set()
        scope: _Scope | None = self
        while scope is not None:
            names |= set(scope.numeric) | set(scope.raw)
            scope = scope.parent
        return sorted(names)


class _Rename(ast.NodeTransformer):
    """Rename variables (not function names) in a validated expression tree."""

    def __init__(self, lookup):
        self.lookup = lookup

    def visit_Call(self, node: ast.Call) -> ast.AST:
        node.args = [self.visit(arg) for arg in node.args]
        return node

    def visit_Name(self, node: ast.Name) -> ast.AST:
        return ast.copy_location(ast.Name(id=self.lookup(node.id), ctx=node.ctx), node)


# --------------------------------------------------------------------------- converter


@dataclass
class _Out:
    """One recipec modifier being built; window values are absolute epochs."""

    kind: str  # a recipec modifier type, or "setlr" until resolved
    fields: dict[str, Any]
    tag: str
    line: int
    order: tuple[float, ...]
    comment: str = ""
    held: Val | str | None = None  # the LR SparseML keeps after this LR window
    targets_key: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    leave_enabled: bool = True

    @property
    def start(self) -> Val | None:
        return self.fields.get("start_epoch")

    @property
    def end(self) -> Val | None:
        return self.fields.get("end_epoch")


@dataclass
class _Stage:
    key: str | None
    name: str
    scope: _Scope
    mods: list[Tagged]
    line: int
    outs: list[_Out] = field(default_factory=list)
    range_end: Val | None = None
    range_line: int = 0
    range_starts: list[tuple[Val, int]] = field(default_factory=list)
    offset: Val = Val(0)
    end: Val = Val(0)
    prune_only: bool = False  # no training: one-shot pruning at the stage's start (steps: 0)


_WINDOW = ("start_epoch", "end_epoch")
_LOGGING_FIELDS = ("log_types", "constant_logging")


class _Fields:
    """Read a modifier's fields (evaluating ``eval(...)``), tracking which were used."""

    def __init__(self, conv: _Converter, tagged: Tagged, scope: _Scope):
        self.conv, self.tagged, self.scope = conv, tagged, scope
        self.used: set[str] = set()

    def has(self, key: str) -> bool:
        return key in self.tagged.fields

    def line(self, key: str) -> int:
        return self.tagged.line_of(key)

    def at(self, key: str, message: str) -> _Problem:
        """A problem located at ``key`` (or at the tag when the key is absent)."""
        line, col = self.tagged.fields.lines.get(key, (self.tagged.line, self.tagged.col))
        return _Problem(line, message, col)

    def raw(self, key: str, default: Any = _MISSING) -> Any:
        self.used.add(key)
        if key not in self.tagged.fields:
            if default is _MISSING:
                raise _Problem(
                    self.tagged.line,
                    f"!{self.tagged.tag}: required field {key!r} is missing",
                    self.tagged.col,
                )
            return default
        try:
            return self.conv.resolve(self.tagged.fields[key], self.scope, self.line(key))
        except _Problem as exc:
            if exc.col == 1 and exc.line == self.line(key):
                raise self.at(key, exc.message) from None
            raise

    def num(self, key: str, default: Any = _MISSING) -> Val:
        value = self.raw(key, default)
        if isinstance(value, int | float) and not isinstance(value, bool):
            value = Val(value)
        if isinstance(value, str):
            try:
                value = Val(float(value))
            except ValueError:
                pass
        if not isinstance(value, Val) or not math.isfinite(value.value):
            raise self.at(key, f"!{self.tagged.tag}.{key}: expected a number, got {value!r}")
        return value

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key, default)
        if isinstance(value, Val):
            return bool(value.value)
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        if not isinstance(value, bool):
            raise self.at(key, f"!{self.tagged.tag}.{key}: expected true or false, got {value!r}")
        return value

    def text(self, key: str, default: Any = _MISSING) -> str:
        value = self.raw(key, default)
        if not isinstance(value, str):
            raise self.at(key, f"!{self.tagged.tag}.{key}: expected a string, got {value!r}")
        return value

    def window(self, key: str) -> Val | None:
        """An epoch bound; SparseML's -1 ("start immediately" / "never ends") is None."""
        if not self.has(key):
            self.used.add(key)
            return None
        value = self.num(key)
        return None if value.value < 0 else value

    def leftovers(self) -> list[str]:
        return [k for k in self.tagged.fields if k not in self.used]


@dataclass
class _Pruning:
    """The fields a SparseML pruning modifier's sparsity groups share."""

    init: Val
    final_raw: Any  # a sparsity, or a mapping of sparsity -> params
    start: Val | None
    end: Val
    freq: Val
    schedule: str
    structure: str
    scope: str
    leave: bool

    def fields(
        self, init: Val, final: Val, targets: list[str], exclude: list[str]
    ) -> dict[str, Any]:
        """One group's recipec fields (the key order is the order they are written in)."""
        fields: dict[str, Any] = {
            "init_sparsity": init,
            "final_sparsity": final,
            "start_epoch": self.start,
            "end_epoch": self.end,
        }
        # dropped again for one-shot windows (start == end) once the stage start is known
        if self.freq.value > 0:
            fields["update_every_epochs"] = self.freq
        else:
            fields["update_every_steps"] = 1  # SparseML's -1: update at every step
        fields.update(schedule=self.schedule, scope=self.scope, structure=self.structure)
        fields["targets"] = list(targets)
        if exclude:
            fields["exclude"] = list(exclude)
        return fields


def _gradual_window(f: _Fields) -> tuple[Val | None, Val]:
    """(start, end) epochs of a gradual pruning window: the end is required, not before the start."""
    tag = f.tagged.tag
    start, end = f.window("start_epoch"), f.window("end_epoch")
    if end is None:
        raise f.at(
            "end_epoch",
            f"!{tag}: end_epoch must be set (a gradual pruning window needs an end)",
        )
    if start is not None and end.value < start.value:
        raise f.at(
            "end_epoch",
            f"!{tag}: end_epoch ({end.value:g}) is before start_epoch ({start.value:g})",
        )
    return start, end


class _Converter:
    def __init__(self, source: str):
        self.source = source
        self.unsupported: list[Finding] = []
        self.notes: list[Finding] = []
        self.errors: list[tuple[int, int, str]] = []
        self.values: dict[str, Number] = {}
        self.variables: dict[str, Number | str] = {}  # recipec name -> output value
        self.budget = MAX_VALUES
        self.counter = 0
        self._first_trained: int | None = 0

    # ---- reporting

    def _unsupported(self, line: int, name: str, message: str) -> None:
        self.unsupported.append(Finding(self.source, line, name, message))

    def _note(self, line: int, name: str, message: str) -> None:
        self.notes.append(Finding(self.source, line, name, message))

    def _error(self, line: int, message: str, col: int = 1) -> None:
        self.errors.append((line, col, message))

    def _raise_errors(self) -> None:
        if self.errors:
            ordered = sorted(set(self.errors))
            raise ConvertError([f"{self.source}:{line}:{col}: {msg}" for line, col, msg in ordered])

    # ---- loading

    def load(self, text: str) -> Any:
        if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
            raise ConvertError([f"{self.source}: file larger than {MAX_BYTES} bytes"])
        body, offset = text, 0
        front = split_front_matter(text)
        suffix = Path(self.source).suffix.lower()
        if suffix == ".md" and front is None:
            raise ConvertError(
                [
                    f"{self.source}:1:1: no YAML front matter (a '---' line, the recipe, a '---' line) in this Markdown recipe"
                ]
            )
        if front is not None and suffix not in (".yaml", ".yml"):
            body, offset = front
        loader = None
        try:
            loader = SparseMLLoader(body)
            loader.line_offset = offset
            data = loader.get_single_data()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line, col = (mark.line + 1 + offset, mark.column + 1) if mark else (1, 1)
            message = (
                " ".join(part for part in (exc.context, exc.problem) if part) or "invalid YAML"
            )
            found = re.search(r"could not determine a constructor for the tag '([^']*)'", message)
            if found:
                tag = found.group(1).replace("tag:yaml.org,2002:", "!!")
                message = (
                    f"YAML tag {tag!r} is not allowed: only SparseML modifier tags such as "
                    "!GMPruningModifier are read, and no Python object is ever constructed"
                )
            elif not message.startswith("YAML tag") and not message.startswith("!"):
                message = f"invalid YAML: {message}"
            raise ConvertError([f"{self.source}:{line}:{col}: {message}"]) from None
        except yaml.YAMLError as exc:
            raise ConvertError([f"{self.source}:1:1: invalid YAML: {exc}"]) from None
        except (RecursionError, MemoryError, ValueError, OverflowError) as exc:
            raise ConvertError([f"{self.source}:1:1: invalid YAML: {type(exc).__name__}"]) from None
        finally:
            if loader is not None:
                loader.dispose()
        return data

    # ---- expressions

    def _spend(self) -> None:
        self.budget -= 1
        if self.budget < 0:
            raise ConvertError([f"{self.source}: recipe has more than {MAX_VALUES} values"])

    def translate(self, inner: str, scope: _Scope, line: int) -> tuple[ast.expr, str, list[str]]:
        """Parse an ``eval(...)`` body safely and rename its variables to recipec names."""
        try:
            node = expr.parse(inner)
        except expr.ExprError as exc:
            raise _Problem(line, f"cannot convert eval({inner}): {exc}") from None
        used: list[str] = []

        def lookup(name: str) -> str:
            found = scope.find(name)
            if found is None:
                known = ", ".join(scope.known()) or "none defined"
                raise _Problem(
                    line, f"eval({inner}): unknown variable {name!r} (variables: {known})"
                )
            kind, value = found
            if kind == "raw":
                raise _Problem(
                    line, f"eval({inner}): variable {name!r} is not a number ({value!r})"
                )
            used.append(value)
            return value

        renamed = _Rename(lookup).visit(node)
        return renamed, ast.unparse(renamed), used

    def evaluate(self, value: str, scope: _Scope, line: int) -> Any:
        inner = _EVAL.match(value).group(1).strip()  # type: ignore[union-attr]
        found = scope.find(inner) if inner.isidentifier() else None
        if found is not None and found[0] == "raw":
            return self.plain(found[1])  # SparseML returns a non-numeric variable as it is
        node, text, used = self.translate(inner, scope, line)
        try:
            result = expr.evaluate(node, self.values)
        except expr.ExprError as exc:
            raise _Problem(line, f"cannot evaluate eval({inner}): {exc}") from None
        return Val(result, text if used else None)

    def plain(self, value: Any) -> Any:
        """A literal value with numbers wrapped as :class:`Val` (no evaluation)."""
        self._spend()
        if isinstance(value, bool) or value is None:
            return value
        if isinstance(value, int | float):
            return Val(value)
        if isinstance(value, list):
            return [self.plain(v) for v in value]
        if isinstance(value, dict):
            return {k: self.plain(v) for k, v in value.items()}
        return value

    def resolve(self, value: Any, scope: _Scope, line: int) -> Any:
        """Evaluate ``eval(...)`` strings in a field value, recursively."""
        self._spend()
        if _is_eval(value):
            return self.evaluate(value, scope, line)
        if isinstance(value, Tagged):
            raise _Problem(
                value.line, f"!{value.tag} cannot be nested inside a modifier field", value.col
            )
        if isinstance(value, list):
            return [self.resolve(v, scope, line) for v in value]
        if isinstance(value, dict):
            lines = value.lines if isinstance(value, _Map) else {}
            return {k: self.resolve(v, scope, lines.get(k, (line, 1))[0]) for k, v in value.items()}
        return self.plain(value)

    # ---- variables

    def collect_variables(
        self, containers: list[tuple[_Scope, dict[Any, tuple[Any, int, int]], str | None]]
    ) -> None:
        """Give every numeric variable a recipec name and resolve all of them together."""
        stage_names: dict[str, int] = {}
        for _scope, variables, stage in containers:
            if stage is not None:
                for name in variables:
                    stage_names[name] = stage_names.get(name, 0) + 1
        global_names = set(containers[0][1]) if containers and containers[0][2] is None else set()
        pending: list[tuple[str, Any, _Scope, int, int]] = []
        taken: set[str] = set()
        for scope, variables, stage in containers:
            for name, (value, line, col) in variables.items():
                numeric = (
                    isinstance(value, int | float) and not isinstance(value, bool)
                ) or _is_eval(value)
                if not numeric:
                    scope.raw[name] = value
                    continue
                if not isinstance(name, str) or not name.isidentifier():
                    self._note(
                        line,
                        f"variable {name!r}",
                        "not an identifier, so no expression can use it; not converted",
                    )
                    continue
                rname = name if name not in expr.FUNCTIONS else f"{name}_value"
                if stage is not None and (name in global_names or stage_names.get(name, 0) > 1):
                    rname = f"{re.sub(r'[^A-Za-z0-9_]', '_', stage)}_{rname}"
                base, k = rname, 2
                while rname in taken:
                    rname, k = f"{base}_{k}", k + 1
                taken.add(rname)
                scope.numeric[name] = rname
                pending.append((rname, value, scope, line, col))
        mapping: dict[str, Number | str] = {}
        where: dict[str, tuple[int, int]] = {}
        for rname, value, scope, line, col in pending:
            where[rname] = (line, col)
            if isinstance(value, int | float):
                mapping[rname] = value
                continue
            inner = _EVAL.match(value).group(1).strip()  # type: ignore[union-attr]
            try:
                _, text, _ = self.translate(inner, scope, line)
            except _Problem as exc:
                self._error(line, exc.message, col)
                continue
            mapping[rname] = text
        values, errors = expr.resolve_variables(mapping)
        for rname, message in errors.items():
            line, col = where.get(rname, (1, 1))
            self._error(line, f"variable {rname}: {message}", col)
        self._raise_errors()
        self.values = values
        self.variables = {
            n: (v if isinstance(v, int | float) else "${" + v + "}") for n, v in mapping.items()
        }

    # ---- structure

    def split(
        self, container: dict, scope: _Scope, top: bool
    ) -> tuple[dict[Any, tuple[Any, int, int]], list[Tagged]]:
        """Separate a (stage) mapping into variables and modifiers, as SparseML does."""
        lines = container.lines if isinstance(container, _Map) else {}
        variables: dict[Any, tuple[Any, int, int]] = {}
        mods: list[Tagged] = []
        for key, value in container.items():
            line, col = lines.get(key, (1, 1))
            is_group = isinstance(key, str) and "modifiers" in key
            if is_group and isinstance(value, list):
                for item in value:
                    if isinstance(item, Tagged):
                        mods.append(item)
                    else:
                        self._error(
                            line,
                            f"{key}: every entry must be a tagged modifier such as !GMPruningModifier, got {item!r}",
                            col,
                        )
            elif isinstance(value, Tagged):
                mods.append(value)
            elif isinstance(value, list) and any(isinstance(v, Tagged) for v in value):
                self._error(
                    line,
                    f"{key}: modifiers must be listed under a key whose name contains 'modifiers'",
                    col,
                )
            elif top and key == "version":
                continue  # SparseML's recipe format version
            elif key == "__metadata__":
                self._note(line, "__metadata__", "SparseML run metadata; not converted")
            else:
                variables[key] = (value, line, col)
        return variables, mods

    def convert(self, text: str) -> Conversion:
        data = self.load(text)
        root = _Scope("the recipe")
        stages: list[_Stage] = []
        if isinstance(data, Tagged):
            data = [data]
        if isinstance(data, list):
            mods = [m for m in data if isinstance(m, Tagged)]
            if len(mods) != len(data):
                self._error(1, "a SparseML recipe list must contain only tagged modifiers")
            containers = [(root, {}, None)]
            stages.append(_Stage(None, "main", root, mods, 1))
        elif isinstance(data, dict):
            lines = data.lines if isinstance(data, _Map) else {}
            stage_keys = [
                k
                for k, v in data.items()
                if isinstance(v, dict)
                and any(isinstance(kk, str) and "modifiers" in kk for kk in v)
            ]
            main = {k: v for k, v in data.items() if k not in stage_keys}
            main_map = _Map()
            main_map.update(main)
            main_map.lines = {k: lines.get(k, (1, 1)) for k in main}
            variables, mods = self.split(main_map, root, top=True)
            containers = [(root, variables, None)]
            if stage_keys:
                for mod in mods:
                    self._error(
                        mod.line,
                        f"!{mod.tag}: a staged recipe keeps its modifiers inside its stages",
                        mod.col,
                    )
                names: set[str] = set()
                for key in stage_keys:
                    scope = _Scope(f"stage {key!r}", parent=root)
                    stage_vars, stage_mods = self.split(data[key], scope, top=False)
                    containers.append((scope, stage_vars, str(key)))
                    name = _stage_name(str(key), names)
                    stages.append(
                        _Stage(str(key), name, scope, stage_mods, lines.get(key, (1, 1))[0])
                    )
            else:
                stages.append(_Stage(None, "main", root, mods, 1))
        else:
            raise ConvertError(
                [
                    f"{self.source}:1:1: a SparseML recipe is a mapping of variables and "
                    "'*modifiers' lists (or a list of modifiers); got "
                    f"{type(data).__name__}"
                ]
            )
        self._raise_errors()
        self.collect_variables(containers)
        for stage in stages:
            for tagged in stage.mods:
                self.counter += 1
                self.convert_modifier(stage, tagged, self.counter)
        self._raise_errors()
        # SparseML orders stages by when their modifiers run, not by their place in the file
        stages.sort(key=_first_epoch)
        self.place_stages(stages)
        held: Val | str | None = None
        any_lr = any(o.kind in ("lr", "setlr") for s in stages for o in s.outs)
        # the LR note belongs to the first stage that trains (not a prune-only one before it)
        self._first_trained = next((i for i, s in enumerate(stages) if not s.prune_only), None)
        for index, stage in enumerate(stages):
            self.drop_redundant_constants(stage)
            held = self.finish_lr(stage, index, held, any_lr)
        self._raise_errors()
        return self.emit(stages)

    # ---- modifiers

    def convert_modifier(self, stage: _Stage, tagged: Tagged, counter: int) -> None:
        handler = _HANDLERS.get(tagged.tag)
        name = f"!{tagged.tag}"
        if handler is None:
            reason = _UNSUPPORTED.get(tagged.tag, "no recipec equivalent")
            self._unsupported(tagged.line, name, f"{reason}; not converted")
            return
        fields = _Fields(self, tagged, stage.scope)
        try:
            handler(self, stage, fields, counter)
        except _Problem as exc:
            self._error(exc.line, exc.message, exc.col)
            return
        for key in fields.leftovers():
            line = tagged.line_of(key)
            if key in _LOGGING_FIELDS:
                continue  # logging only
            self._unsupported(
                line, f"{name}.{key}", "field has no recipec equivalent; not converted"
            )

    def _out(
        self,
        kind: str,
        fields: dict[str, Any],
        tagged: Tagged,
        counter: int,
        sub: int = 0,
        **extra: Any,
    ) -> _Out:
        return _Out(
            kind,
            fields,
            tagged.tag,
            tagged.line,
            (counter, sub),
            f"!{tagged.tag} (line {tagged.line})",
            **extra,
        )

    def pruning(self, stage: _Stage, f: _Fields, counter: int) -> None:
        """A SparseML pruning modifier -> a gmp or obert modifier per final-sparsity group."""
        kind, global_default = _PRUNING[f.tagged.tag]
        settings = self._read_pruning(f, global_default)
        if settings is None:
            return  # reported as not converted
        extra = self._obs_fields(f) if kind == "obert" else {}
        for sub, (final, params) in enumerate(self._sparsity_groups(f, settings.final_raw)):
            targets, exclude = self._targets(params, f, f.tagged.tag)
            init_out, final_out = self._nm_levels(f, settings, final)
            fields = settings.fields(init_out, final_out, targets, exclude)
            fields.update(extra)
            stage.outs.append(
                self._out(
                    kind,
                    fields,
                    f.tagged,
                    counter,
                    sub,
                    targets_key=(tuple(targets), tuple(exclude)),
                    leave_enabled=settings.leave,
                )
            )

    def _read_pruning(self, f: _Fields, global_default: bool) -> _Pruning | None:
        """The fields every group shares, in SparseML's order; None: not converted (reported)."""
        tag = f.tagged.tag
        init_raw = f.raw("init_sparsity")
        if isinstance(init_raw, str):
            self._skip_modifier(
                f,
                "init_sparsity",
                f"{init_raw!r} (start from each tensor's current sparsity) has no recipec equivalent; modifier not converted",
            )
            return None
        init = f.num("init_sparsity")
        final_raw = f.raw("final_sparsity")
        start, end = _gradual_window(f)
        freq = f.num("update_frequency", Val(-1))
        inter = f.text("inter_func", "cubic")
        if inter not in ("cubic", "linear"):
            self._skip_modifier(
                f,
                "inter_func",
                f"{inter!r} interpolation has no recipec equivalent (cubic or linear); modifier not converted",
            )
            return None
        structure = _structure(f.raw("mask_type", "unstructured"))
        if structure is None:
            self._skip_modifier(
                f,
                "mask_type",
                f"mask type {f.raw('mask_type')!r} has no recipec equivalent (unstructured, blockK, N:M); modifier not converted",
            )
            return None
        scope = "global" if f.boolean("global_sparsity", global_default) else "per_layer"
        leave = f.boolean("leave_enabled", True)
        if not leave:
            self._unsupported(
                f.line("leave_enabled"),
                f"!{tag}.leave_enabled",
                "false (stop enforcing the masks after end_epoch) has no recipec equivalent: recipec keeps masks until training ends",
            )
        return _Pruning(init, final_raw, start, end, freq, inter, structure, scope, leave)

    def _skip_modifier(self, f: _Fields, key: str, message: str) -> None:
        """Report ``key`` as having no recipec equivalent and leave the whole modifier out."""
        self._unsupported(f.line(key), f"!{f.tagged.tag}.{key}", message)
        f.used.update(f.tagged.fields)

    @staticmethod
    def _sparsity_groups(f: _Fields, final_raw: Any) -> list[tuple[Val, Any]]:
        """(final sparsity, params) pairs: one, or one per key of a ``final_sparsity`` mapping."""
        if not isinstance(final_raw, dict):
            return [(f.num("final_sparsity"), f.raw("params"))]
        groups = []
        for key, params in final_raw.items():
            level = (
                key
                if isinstance(key, Val)
                else Val(float(key))
                if isinstance(key, int | float)
                else None
            )
            if level is None:
                raise f.at(
                    "final_sparsity",
                    f"!{f.tagged.tag}.final_sparsity: keys must be sparsities, got {key!r}",
                )
            groups.append((level, params))
        f.used.add("params")
        return groups

    def _nm_levels(self, f: _Fields, settings: _Pruning, final: Val) -> tuple[Val, Val]:
        """(init, final) sparsity: N:M masks have exactly one sparsity, (M - N) / M."""
        structure, init = settings.structure, settings.init
        parsed = parse_structure(structure)
        if parsed.kind != "nm":
            return init, final
        n, m = parsed.n, parsed.m
        level = Val(_tidy(parsed.nm_sparsity))
        if abs(final.value - level.value) > 1e-9 or abs(init.value - level.value) > 1e-9:
            self._note(
                f.line("mask_type"),
                f"!{f.tagged.tag}.mask_type",
                f"{structure} masks keep exactly {n} of every {m} weights ({level.value:g} sparsity): "
                "init/final sparsity set to that; recipec applies N:M masks once, at start_epoch",
            )
        return level, level

    def _obs_fields(self, f: _Fields) -> dict[str, Any]:
        tag = f.tagged.tag
        out: dict[str, Any] = {}
        if f.has("num_grads"):
            grads = f.raw("num_grads")
            if isinstance(grads, Val):
                out["num_grads"] = _integer(grads, f, "num_grads")
            else:
                self._unsupported(
                    f.line("num_grads"),
                    f"!{tag}.num_grads",
                    f"a per-epoch schedule of gradient counts ({grads!r}) has no recipec equivalent; recipec's default (1024) is used",
                )
        else:
            out["num_grads"] = 1024
        out["damp"] = f.num("damp", Val(1e-7))
        out["fisher_block_size"] = _integer(
            f.num("fisher_block_size", Val(50)), f, "fisher_block_size"
        )
        kwargs = f.raw("grad_sampler_kwargs", {}) or {}
        if not isinstance(kwargs, dict):
            raise f.at("grad_sampler_kwargs", f"!{tag}.grad_sampler_kwargs: expected a mapping")
        for key, value in kwargs.items():
            if key == "batch_size" and isinstance(value, Val):
                out["grad_batch_size"] = _integer(value, f, "grad_sampler_kwargs.batch_size")
            else:
                self._unsupported(
                    f.line("grad_sampler_kwargs"),
                    f"!{tag}.grad_sampler_kwargs.{key}",
                    "gradient data-loader override has no recipec equivalent; not converted",
                )
        if f.has("num_recomputations"):
            out["recomputations"] = _integer(f.num("num_recomputations"), f, "num_recomputations")
        for key, default in (("magn_scorer", False), ("mask_update", True)):
            if f.has(key) and f.boolean(key, default) != default:
                self._unsupported(
                    f.line(key),
                    f"!{tag}.{key}",
                    "non-default value has no recipec equivalent; not converted",
                )
        return out

    def _targets(self, params: Any, f: _Fields, tag: str) -> tuple[list[str], list[str]]:
        if isinstance(params, str):
            params = [params]
        if (
            not isinstance(params, list)
            or not params
            or not all(isinstance(p, str) for p in params)
        ):
            raise f.at(
                "params",
                f"!{tag}.params: expected a list of parameter names or 're:' regexes, got {params!r}",
            )
        line = f.line("params")
        for token, targets, exclude, what in (
            (
                "__ALL__",
                ALL_TARGETS,
                (),
                "every parameter (biases, LayerNorms and embeddings included)",
            ),
            (
                "__ALL_PRUNABLE__",
                ALL_PRUNABLE_TARGETS,
                ALL_PRUNABLE_EXCLUDE,
                "every Linear weight: all '.weight' tensors except embeddings and LayerNorms "
                "(this includes the pooler and classifier head)",
            ),
        ):
            if token in params:
                others = [p for p in params if p != token]
                extra = (
                    f"; SparseML ignores the other entries ({', '.join(others)})" if others else ""
                )
                self._note(line, f"!{tag}.params", f"{token} converted to {what}{extra}")
                return list(targets), list(exclude)
        targets = []
        for param in params:
            if param.startswith("re:"):
                # SparseML matches with re.match: anchored at the start, not at the end
                body = param[3:]
                pattern = f"^(?:{body})" if "|" in body else f"^{body}"
            else:
                pattern = f"^{re.escape(param)}$"
            try:
                re.compile(pattern)
            except re.error as exc:
                raise _Problem(
                    line, f"!{tag}.params: invalid regular expression {param!r}: {exc}"
                ) from None
            targets.append(pattern)
        return targets, []

    def constant(self, stage: _Stage, f: _Fields, counter: int) -> None:
        targets, exclude = self._targets(f.raw("params"), f, f.tagged.tag)
        f.used.add("update_frequency")
        fields: dict[str, Any] = {
            "start_epoch": f.window("start_epoch"),
            "end_epoch": f.window("end_epoch"),
            "targets": targets,
        }
        if exclude:
            fields["exclude"] = exclude
        stage.outs.append(
            self._out(
                "constant", fields, f.tagged, counter, targets_key=(tuple(targets), tuple(exclude))
            )
        )

    def lr_function(self, stage: _Stage, f: _Fields, counter: int) -> None:
        """LearningRateFunctionModifier -> lr modifiers (linear, cosine or cyclic_linear)."""
        tag = f.tagged.tag
        func = f.text("lr_func")
        init, final = f.num("init_lr"), f.num("final_lr")
        start = f.window("start_epoch")
        end = f.window("end_epoch")
        f.used.add("update_frequency")
        if end is None or end.value <= (start.value if start else 0):
            raise f.at("end_epoch", f"!{tag}: end_epoch must be after start_epoch")
        self._param_groups(f)
        base = {
            "schedule": None,
            "init_lr": init,
            "final_lr": final,
            "start_epoch": start,
            "end_epoch": end,
        }
        if func in ("linear", "cosine"):
            self._lr_decay(stage, f, counter, func, base)
        elif func == "cyclic_linear":
            self._lr_cyclic(stage, f, counter, base)
        else:
            self._skip_modifier(
                f, "lr_func", f"{func!r} has no recipec equivalent; modifier not converted"
            )

    def _lr_decay(
        self, stage: _Stage, f: _Fields, counter: int, func: str, base: dict[str, Any]
    ) -> None:
        """A linear or cosine decay window; a linear one from LR 0 becomes a recipec warm-up.

        ``base`` holds the fields every lr window of this modifier shares.
        """
        tag = f.tagged.tag
        init, final = base["init_lr"], base["final_lr"]
        f.used.add("cycle_epochs")  # SparseML ignores it outside cyclic_linear
        if init.value <= 0:
            if func == "cosine" or final.value <= 0:
                self._unsupported(
                    f.line("init_lr"),
                    f"!{tag}.init_lr",
                    f"a {func} schedule starting from LR 0 has no recipec equivalent; not converted",
                )
                return
            self._note(
                f.line("init_lr"),
                f"!{tag}",
                "linear warm-up from 0 approximated by a recipec warm-up "
                "(LR = final_lr * (k + 1) / (n + 1) instead of final_lr * k / n at step k of n)",
            )
            fields = dict(
                base,
                schedule="constant",
                init_lr=final,
                warmup_epochs=base["end_epoch"].minus(base["start_epoch"] or Val(0)),
            )
            del fields["final_lr"]
            stage.outs.append(self._out("lr", fields, f.tagged, counter, held=final))
            return
        stage.outs.append(self._out("lr", dict(base, schedule=func), f.tagged, counter, held=final))

    def _lr_cyclic(self, stage: _Stage, f: _Fields, counter: int, base: dict[str, Any]) -> None:
        """A cyclic_linear window; a trailing partial cycle becomes a second, linear window.

        ``base`` holds the fields every lr window of this modifier shares.
        """
        tag = f.tagged.tag
        init, start, end = base["init_lr"], base["start_epoch"], base["end_epoch"]
        cycle = f.num("cycle_epochs", Val(_DEFAULT_CYCLE_EPOCHS))
        if cycle.value <= 0 or init.value <= 0:
            raise f.at("cycle_epochs", f"!{tag}: cycle_epochs and init_lr must be positive")
        if start is None:
            start = Val(0)  # SparseML's cyclic_linear counts from epoch 0 when start_epoch is -1
            base = dict(base, start_epoch=start)
        span = _tidy(end.value - start.value)
        cycles = math.floor(span / cycle.value + _EPS)
        rest = _tidy(span - cycles * cycle.value)
        held = _held_after_cycles(init, span, rest)
        if rest <= _EPS or cycles == 0:
            schedule = "cyclic_linear" if rest <= _EPS else "linear"
            fields = dict(base, schedule=schedule)
            if schedule == "cyclic_linear":
                fields["cycle_epochs"] = cycle
            stage.outs.append(self._out("lr", fields, f.tagged, counter, held=held))
            return
        split = _whole_cycles_end(start, end, cycle, cycles)
        self._note(
            f.line("cycle_epochs"),
            f"!{tag}",
            f"the last, partial cycle (epochs {split.value:g}..{end.value:g}) is written as a linear lr window: "
            "SparseML decays it over its own length",
        )
        stage.outs.append(
            self._out(
                "lr",
                dict(base, schedule="cyclic_linear", end_epoch=split, cycle_epochs=cycle),
                f.tagged,
                counter,
                0,
                held=init,
            )
        )
        stage.outs.append(
            self._out(
                "lr",
                dict(base, schedule="linear", start_epoch=split),
                f.tagged,
                counter,
                1,
                held=held,
            )
        )

    def set_lr(self, stage: _Stage, f: _Fields, counter: int) -> None:
        lr = f.num("learning_rate")
        f.used.add("end_epoch")
        self._param_groups(f)
        start = f.window("start_epoch")
        if lr.value <= 0:
            self._unsupported(
                f.line("learning_rate"),
                f"!{f.tagged.tag}.learning_rate",
                "an LR of 0 has no recipec equivalent; not converted",
            )
            return
        fields = {"schedule": "constant", "init_lr": lr, "start_epoch": start, "end_epoch": None}
        stage.outs.append(self._out("setlr", fields, f.tagged, counter, held=lr))

    def _param_groups(self, f: _Fields) -> None:
        groups = f.raw("param_groups", None)
        if groups:
            self._unsupported(
                f.line("param_groups"),
                f"!{f.tagged.tag}.param_groups",
                "recipec sets the LR of every parameter group; the group selection is not converted",
            )

    def distill(self, stage: _Stage, f: _Fields, counter: int) -> None:
        tag = f.tagged.tag
        fields: dict[str, Any] = {
            "teacher": "auto",
            "hardness": f.num("hardness", Val(_DEFAULT_HARDNESS)),
            "temperature": f.num("temperature", Val(_DEFAULT_TEMPERATURE)),
            "start_epoch": f.window("start_epoch"),
            "end_epoch": f.window("end_epoch"),
        }
        f.used.add("update_frequency")
        self._note(
            f.tagged.line,
            f"!{tag}",
            "teacher: auto (recipec fine-tunes a dense teacher first); SparseML took the teacher from the "
            "command line (--distill_teacher): set teacher: to that model's path or hub name to reuse it",
        )
        for key in ("distill_output_keys", "teacher_input_keys"):
            if f.has(key) and f.raw(key):
                self._note(
                    f.line(key),
                    f"!{tag}.{key}",
                    "recipec distills the task's logits; this selection is not needed",
                )
        stage.outs.append(self._out("distill", fields, f.tagged, counter))

    def epoch_range(self, stage: _Stage, f: _Fields, counter: int) -> None:
        start = f.window("start_epoch")
        end = f.window("end_epoch")
        if end is None:
            raise f.at("end_epoch", f"!{f.tagged.tag}: end_epoch must be set")
        if start is not None:
            stage.range_starts.append((start, f.line("start_epoch")))
        if stage.range_end is None or end.value > stage.range_end.value:
            stage.range_end, stage.range_line = end, f.tagged.line

    # ---- stages and the LR timeline

    def place_stages(self, stages: list[_Stage]) -> None:
        """Stage offsets (SparseML runs all stages on one epoch clock) and stage ends."""
        offset = Val(0)
        for index, stage in enumerate(stages):
            stage.offset = offset
            points = [v for o in stage.outs for v in (o.start, o.end) if v is not None]
            for o in stage.outs:
                if o.start is not None and o.start.value < offset.value - _EPS:
                    self._error(
                        o.line,
                        f"!{o.tag} in stage {stage.key!r} starts at epoch {o.start.value:g}, before the "
                        f"previous stage ends (epoch {offset.value:g}): SparseML runs all stages on one epoch clock",
                    )
                if o.start is None and index > 0:
                    self._note(
                        o.line,
                        f"!{o.tag}",
                        f"start_epoch -1 (start at once) taken as the start of stage {stage.key!r}",
                    )
                if o.start is None and o.kind in ("gmp", "obert", "lr", "setlr"):
                    o.fields["start_epoch"] = offset
                if o.kind in ("gmp", "obert") and o.end.value <= o.start.value + _EPS:
                    o.fields.pop("update_every_epochs", None)  # one-shot
                    o.fields.pop("update_every_steps", None)
            for start, line in stage.range_starts:
                if start.value > offset.value + _EPS:
                    self._note(
                        line,
                        "!EpochRangeModifier.start_epoch",
                        f"training starts at epoch {offset.value:g} in recipec, not {start.value:g}",
                    )
            last = max(points, key=lambda v: v.value) if points else offset
            if (
                self._one_shot_only(stage, offset)
                and last.value <= offset.value + _EPS
                and (stage.range_end is None or stage.range_end.value <= offset.value + _EPS)
            ):
                stage.prune_only = True
                end = offset
                for o in (
                    stage.outs
                ):  # step 0 is the only step: the windows say nothing (and need no epochs)
                    for name in (
                        "start_epoch",
                        "end_epoch",
                        "update_every_epochs",
                        "update_every_steps",
                    ):
                        o.fields.pop(name, None)
                self._note(
                    stage.line,
                    "one-shot",
                    f"{'stage ' + repr(stage.key) if stage.key else 'the recipe'} only prunes "
                    f"once, at epoch {offset.value:g}, and trains for 0 epochs: written as a prune-only stage "
                    "(training.steps: 0)",
                )
            elif stage.range_end is not None:
                end = stage.range_end
            elif points:
                end = last
                self._note(
                    stage.line,
                    "!EpochRangeModifier",
                    f"none in {stage.key and repr(stage.key) or 'the recipe'}: "
                    f"training.epochs set from the last modifier epoch ({end.value:g})",
                )
            else:
                end = offset
            if end.value <= offset.value + _EPS and not stage.prune_only:
                self._error(
                    stage.line,
                    f"cannot tell how long {'stage ' + repr(stage.key) if stage.key else 'training'} "
                    "is: add an !EpochRangeModifier with end_epoch",
                )
            stage.end = end
            offset = end
        self._raise_errors()

    @staticmethod
    def _one_shot_only(stage: _Stage, offset: Val) -> bool:
        """Only pruning (at least one gmp/obert), all of it one-shot at ``offset``: no training to run."""
        pruners = [o for o in stage.outs if o.kind in ("gmp", "obert")]
        if not pruners or any(o.kind not in ("gmp", "obert", "constant") for o in stage.outs):
            return False

        def at_offset(v: Val | None) -> bool:
            return v is None or abs(v.value - offset.value) <= _EPS  # None: start at once

        return all(at_offset(o.start) and o.end is not None and at_offset(o.end) for o in pruners)

    def drop_redundant_constants(self, stage: _Stage) -> None:
        """A constant right after a pruning window on the same weights repeats recipec's persistence."""
        for const in [o for o in stage.outs if o.kind == "constant"]:
            for prune in stage.outs:
                if (
                    prune.kind not in ("gmp", "obert")
                    or prune.targets_key != const.targets_key
                    or not prune.leave_enabled
                ):
                    continue
                c_start = const.start.value if const.start is not None else stage.offset.value
                if abs(c_start - prune.end.value) <= _EPS:
                    stage.outs.remove(const)
                    self._note(
                        const.line,
                        f"!{const.tag}",
                        f"not needed: recipec keeps the masks of !{prune.tag} "
                        f"(line {prune.line}) after its end_epoch; dropped",
                    )
                    break

    def finish_lr(
        self, stage: _Stage, index: int, held: Val | str | None, any_lr: bool
    ) -> Val | str | None:
        """Close SetLearningRate windows and make the LR SparseML holds between windows explicit."""
        lrs = sorted(
            (o for o in stage.outs if o.kind in ("lr", "setlr")),
            key=lambda o: ((o.start.value if o.start else stage.offset.value), o.order),
        )
        for i, out in enumerate(lrs):
            if out.kind != "setlr":
                continue
            same = [o for o in lrs if o is not out and abs(o.start.value - out.start.value) <= _EPS]
            if same:
                stage.outs.remove(out)
                self._note(
                    out.line,
                    f"!{out.tag}",
                    f"overridden by the LR modifier at line {same[0].line}, "
                    "which starts at the same epoch; dropped",
                )
                continue
            later = [o for o in lrs[i + 1 :] if o.start.value > out.start.value + _EPS]
            out.fields["end_epoch"] = later[0].start if later else None
            out.kind = "lr"
        lrs = [o for o in lrs if o in stage.outs]
        if not any_lr:
            if index == self._first_trained:
                self._note(
                    1,
                    "learning rate",
                    "no learning-rate modifiers: SparseML leaves the LR to the training "
                    "script; recipec uses training.learning_rate (5e-05) with linear decay",
                )
            return None
        cursor = stage.offset
        for out in lrs:
            start = out.start
            if start.value > cursor.value + _EPS:
                self._fill(stage, cursor, start, held, out)
            held = out.held
            if out.end is None:
                cursor = stage.end
            elif out.end.value > cursor.value:
                cursor = out.end
        if cursor.value < stage.end.value - _EPS:
            self._fill(stage, cursor, None, held, lrs[-1] if lrs else None)
        return held

    def _fill(
        self, stage: _Stage, start: Val, end: Val | None, held: Val | str | None, near: _Out | None
    ) -> None:
        until = f"{end.value:g}" if end is not None else f"{stage.end.value:g} (stage end)"
        line = near.line if near is not None else stage.line
        if isinstance(held, Val) and held.value > 0:
            fields = {
                "schedule": "constant",
                "init_lr": held,
                "start_epoch": start,
                "end_epoch": end,
            }
            if near is None:
                order, what = (0.0,), "from the previous stage"
            elif end is None:
                order, what = (near.order[0] + 0.5,), f"after the window of line {near.line}"
            else:
                order, what = (near.order[0] - 0.5,), f"before the window of line {near.line}"
            stage.outs.append(
                _Out(
                    "lr",
                    fields,
                    "lr",
                    line,
                    order,
                    f"added: the LR SparseML keeps {what} (epochs {start.value:g}..{until})",
                    held=held,
                )
            )
        elif held is None:
            instead = (
                "uses training.learning_rate with linear decay"
                if near is None
                else "starts at the next window's initial LR"
                if end is not None
                else "holds the last window's LR"
            )
            self._note(
                line,
                "learning rate",
                f"epochs {start.value:g}..{until}: SparseML uses the training script's LR "
                f"(no LR modifier has run yet); recipec {instead}",
            )
        else:
            why = "0" if isinstance(held, Val) else "a value that depends on steps_per_epoch"
            self._note(
                line,
                "learning rate",
                f"epochs {start.value:g}..{until}: SparseML keeps LR {why}, which recipec "
                "cannot write as a constant; recipec holds the previous window's last LR",
            )

    # ---- output

    def emit(self, stages: list[_Stage]) -> Conversion:
        """Write the recipec YAML, check it with recipec's own loader and return the result."""
        all_outs = [o for s in stages for o in s.outs]
        keys = {o.targets_key for o in all_outs if o.targets_key is not None}
        hoisted = next(iter(keys)) if len(keys) == 1 else None
        origin: dict[tuple[int | None, int], _Out] = {}
        lines = self._header_lines(hoisted) + self._stage_lines(stages, hoisted, origin)
        text = "\n".join(lines) + "\n"
        recipe = self._load_converted(text, origin)
        return Conversion(
            self.source,
            text,
            recipe,
            sorted(self.unsupported, key=lambda f: f.line),
            sorted(self.notes, key=lambda f: f.line),
        )

    def _header_lines(self, hoisted: tuple[tuple[str, ...], tuple[str, ...]] | None) -> list[str]:
        """The comments (what was not converted, notes), version, variables and shared targets."""
        lines = [
            f"# Converted from the SparseML recipe {Path(self.source).name} by `recipec convert`.",
            "# Epochs are SparseML's; see docs/convert.md for how each field maps.",
        ]
        for title, items in (("Not converted", self.unsupported), ("Notes", self.notes)):
            if items:
                lines.append(f"# {title}:")
                lines.extend(
                    f"#   line {f.line}: {f.name}: {_one_line(f.message)}"
                    for f in sorted(items, key=lambda f: f.line)
                )
        lines.append("version: 1")
        lines.append(
            f"description: {_scalar('Converted from the SparseML recipe ' + Path(self.source).name)}"
        )
        if self.variables:
            lines.append("variables:")
            lines.extend(f"  {name}: {_scalar(value)}" for name, value in self.variables.items())
        if hoisted is not None:
            lines.append("targets:")
            lines.extend(f"  - {_scalar(t)}" for t in hoisted[0])
            if hoisted[1]:
                lines.append("exclude:")
                lines.extend(f"  - {_scalar(t)}" for t in hoisted[1])
        return lines

    def _stage_lines(
        self,
        stages: list[_Stage],
        hoisted: tuple[tuple[str, ...], tuple[str, ...]] | None,
        origin: dict[tuple[int | None, int], _Out],
    ) -> list[str]:
        """``training`` and ``modifiers`` of a one-stage recipe, or the ``stages`` list."""
        if stages[0].key is None:
            return self._stage_body(stages[0], hoisted, "", None, origin)
        lines = ["stages:"]
        for index, stage in enumerate(stages):
            lines.append(
                f"  # SparseML stage {stage.key!r} (line {stage.line}); its epochs start at {stage.offset.value:g}"
            )
            lines.append(f"  - name: {_scalar(stage.name)}")
            lines.extend(self._stage_body(stage, hoisted, "    ", index, origin))
        return lines

    def _stage_body(
        self,
        stage: _Stage,
        hoisted: tuple[tuple[str, ...], tuple[str, ...]] | None,
        indent: str,
        stage_index: int | None,
        origin: dict[tuple[int | None, int], _Out],
    ) -> list[str]:
        """A stage's ``training`` (its length) and ``modifiers``, at ``indent``."""
        lines = [f"{indent}training:"]
        lines.append(
            f"{indent}  steps: 0"
            if stage.prune_only
            else f"{indent}  epochs: {_scalar(stage.end.minus(stage.offset))}"
        )
        lines.append(f"{indent}modifiers:" if stage.outs else f"{indent}modifiers: []")
        lines.extend(self._emit_modifiers(stage, hoisted, indent + "  ", stage_index, origin))
        return lines

    def _load_converted(self, text: str, origin: dict[tuple[int | None, int], _Out]) -> Recipe:
        """Validate the written recipe; a problem names the SparseML modifier it came from."""
        try:
            return load_recipe_text(text, "<converted>")
        except RecipeError as exc:
            problems = [
                f"{self.source}: the converted recipe does not validate: {p}"
                f"{self._origin_hint(p.path, origin)}"
                for p in exc.problems
            ]
            raise ConvertError(problems) from None

    def _origin_hint(self, path: str, origin: dict[tuple[int | None, int], _Out]) -> str:
        """`` [from !Tag (line N) of SOURCE]`` for a problem at an emitted modifier, else ``""``."""
        found = re.match(r"(?:stages\.(\d+)\.)?modifiers\.(\d+)", path)
        if not found:
            return ""
        key = (int(found.group(1)) if found.group(1) else None, int(found.group(2)))
        out = origin.get(key)
        if out is None:
            return ""
        if out.comment.startswith("added"):
            return f" [{out.comment}]"
        return f" [from {out.comment} of {self.source}]"

    def _emit_modifiers(
        self,
        stage: _Stage,
        hoisted,
        indent: str,
        stage_index: int | None,
        origin: dict[tuple[int | None, int], _Out],
    ) -> list[str]:
        lines: list[str] = []
        for number, out in enumerate(sorted(stage.outs, key=lambda o: o.order)):
            origin[(stage_index, number)] = out
            fields: dict[str, Any] = {"type": out.kind}
            for key, value in out.fields.items():
                if key in _WINDOW:
                    if value is None:
                        continue
                    value = value.minus(stage.offset)
                if (
                    key in ("targets", "exclude")
                    and hoisted is not None
                    and out.targets_key == hoisted
                ):
                    continue
                fields[key] = value
            lines.append(f"{indent}# {out.comment}")
            first = True
            for key, value in fields.items():
                lead = f"{indent}- " if first else f"{indent}  "
                first = False
                if isinstance(value, list):
                    lines.append(f"{lead}{key}:")
                    lines.extend(f"{indent}    - {_scalar(v)}" for v in value)
                else:
                    lines.append(f"{lead}{key}: {_scalar(value)}")
        return lines


def _held_after_cycles(init: Val, span: float, rest: float) -> Val | str:
    """The LR SparseML leaves after a cyclic window of ``span`` epochs ending in a ``rest`` cycle.

    SparseML decays the trailing partial cycle over its own length; at end_epoch it sets LR at
    position (span mod rest) of that cycle, which in steps depends on steps_per_epoch.
    """
    if rest > _EPS:
        position = _tidy(span % rest)
        if position > _EPS and abs(position - rest) > _EPS:
            return _SPE_DEPENDENT
    return init


def _whole_cycles_end(start: Val, end: Val, cycle: Val, cycles: int) -> Val:
    """The epoch where the last whole cycle ends (an expression when any input is one)."""
    if any(v.text for v in (start, end, cycle)):
        s, e, c = start.expression(), end.expression(), cycle.expression()
        return Val(
            _tidy(start.value + cycles * cycle.value), f"{s} + floor(({e} - {s}) / {c}) * {c}"
        )
    return Val(_tidy(start.value + cycles * cycle.value))


def _first_epoch(stage: _Stage) -> float:
    starts = [o.start.value for o in stage.outs if o.start is not None]
    starts += [start.value for start, _ in stage.range_starts]
    return min(starts, default=0.0)


def _stage_name(key: str, taken: set[str]) -> str:
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", key)[:64] or "stage"
    base, k = name, 2
    while name in taken:
        name = f"{base[:60]}_{k}"
        k += 1
    taken.add(name)
    return name


def _integer(value: Val, f: _Fields, key: str) -> int | str:
    if isinstance(value.value, float):
        if not value.value.is_integer():
            raise _Problem(
                f.line(key.split(".")[0]),
                f"!{f.tagged.tag}.{key}: expected a whole number, got {value.value:g}",
            )
        return int(value.value) if value.text is None else "${round(" + value.text + ")}"
    return value.out()


def _structure(mask: Any) -> str | None:
    """SparseML mask_type -> recipec structure (None: no equivalent)."""
    if isinstance(mask, list) and len(mask) == 2 and all(isinstance(v, Val) for v in mask):
        rows, cols = (v.value for v in mask)
        if rows == 1 and isinstance(cols, int | float) and float(cols).is_integer():
            return _recipec_structure(f"block{int(cols)}")
        return None
    if not isinstance(mask, str):
        return None
    mask = mask.strip()
    aliases = {"block": "block4", "tensorrt": "2:4"}
    return _recipec_structure(aliases.get(mask, mask))


def _recipec_structure(text: str) -> str | None:
    """``text`` when recipec's structure grammar accepts it, else None."""
    try:
        parse_structure(text)
    except ValueError:
        return None
    return text


_PLAIN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_PLAIN_EXPR = re.compile(r"\$\{[A-Za-z0-9_ .+\-*/(),]*\}")
_YAML_WORDS = {"yes", "no", "on", "off", "true", "false", "null", "y", "n"}


def _scalar(value: Any) -> str:
    """A scalar in YAML that recipec's loader reads back as the same value."""
    if isinstance(value, Val):
        value = value.out()
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return repr(value)
    text = str(value)
    if _PLAIN_EXPR.fullmatch(text) or (_PLAIN.fullmatch(text) and text.lower() not in _YAML_WORDS):
        return text
    return "'" + text.replace("'", "''") + "'"


def _one_line(text: str) -> str:
    return " ".join(text.split())


_PRUNING = {
    "GMPruningModifier": ("gmp", False),
    "MagnitudePruningModifier": ("gmp", False),
    "GlobalMagnitudePruningModifier": ("gmp", True),
    "OBSPruningModifier": ("obert", True),
}

_HANDLERS = {
    **{tag: _Converter.pruning for tag in _PRUNING},
    "ConstantPruningModifier": _Converter.constant,
    "LearningRateFunctionModifier": _Converter.lr_function,
    "SetLearningRateModifier": _Converter.set_lr,
    "DistillationModifier": _Converter.distill,
    "EpochRangeModifier": _Converter.epoch_range,
}

_UNSUPPORTED = {
    "QuantizationModifier": "quantization-aware training has no recipec equivalent",
    "LearningRateModifier": "torch LR scheduler classes (StepLR, MultiStepLR, ...) are not converted; "
    "write a recipec lr modifier",
    "SetWeightDecayModifier": "changing weight decay during training has no recipec equivalent "
    "(set training.weight_decay)",
    "TrainableParamsModifier": "freezing parameters has no recipec equivalent",
    "MFACPruningModifier": "M-FAC pruning modifier: use an oBERT modifier with fisher: mfac by hand",
    "MovementPruningModifier": "movement pruning has no recipec equivalent",
    "LayerPruningModifier": "removing layers has no recipec equivalent",
    "StructuredPruningModifier": "structured (channel/head) pruning has no recipec equivalent",
    "PerLayerDistillationModifier": "per-layer (feature) distillation has no recipec equivalent",
}


def convert_text(text: str, source: str = "<sparseml>") -> Conversion:
    """Convert SparseML recipe text (YAML, or Markdown front matter when ``source`` ends in .md).

    Raises :class:`ConvertError` when the recipe cannot be read or converted.
    """
    return _Converter(source).convert(text)


def convert_file(path: str | Path) -> Conversion:
    """Convert a SparseML recipe file (``.yaml`` / ``.yml`` / ``.md``)."""
    path = Path(path)
    try:
        if path.stat().st_size > MAX_BYTES:
            raise ConvertError([f"{path}: file larger than {MAX_BYTES} bytes"])
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConvertError([f"{path}: no such file"]) from None
    except IsADirectoryError:
        raise ConvertError([f"{path}: is a directory, not a recipe file"]) from None
    except UnicodeDecodeError as exc:
        raise ConvertError([f"{path}: not UTF-8 text ({exc.reason})"]) from None
    except OSError as exc:
        raise ConvertError([f"{path}: cannot read: {exc.strerror}"]) from None
    return convert_text(text, str(path))
