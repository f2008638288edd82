"""Load a recipe: YAML (with positions) -> ``--set`` overrides -> variables -> validated Recipe.

Every problem is collected and reported together as ``FILE:LINE:COL: field.path: message``;
a malformed recipe never surfaces as a Python traceback (only :class:`RecipeError`).
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from recipec.recipe import expr
from recipec.recipe.errors import Location, Problem, RecipeError, format_path
from recipec.recipe.schema import MODIFIER_TYPES, TRAINING_PAIRS, Recipe, StageSpec, TrainingSpec

MAX_NODES = 100_000
MAX_DEPTH = 64
MAX_BYTES = 2_000_000

Path_ = tuple[Any, ...]


class _Loader(yaml.SafeLoader):
    """SafeLoader that also reads ``5e-5`` (no dot) as a float, as YAML 1.2 does."""


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


class _Positions:
    """Source positions of values and keys, by path into the loaded data."""

    def __init__(self, source: str):
        self.source = source
        self.values: dict[Path_, Location] = {}
        self.keys: dict[Path_, Location] = {}

    def at(self, path: Path_, *, key: bool = False) -> Location:
        """The position of ``path`` or of its nearest known ancestor."""
        table = self.keys if key else self.values
        for cut in range(len(path), -1, -1):
            sub = path[:cut]
            if sub in table:
                return table[sub]
            if sub in self.values:
                return self.values[sub]
        return Location(self.source, 1, 1)


def _mark(source: str, mark: yaml.Mark | None) -> Location:
    if mark is None:
        return Location(source, 1, 1)
    return Location(source, mark.line + 1, mark.column + 1)


def _parse_yaml(text: str, source: str) -> tuple[Any, _Positions, list[Problem]]:
    """Parse YAML into plain data while recording where every key and value came from.

    A problem that stops parsing (size, syntax, node count, nesting, tags, a value that cannot
    be built) is reported alone; non-string and duplicate keys are collected and parsing goes on.
    """
    positions = _Positions(source)
    try:
        _check_size(text, source)
        loader = _open_loader(text, source)
        try:
            root = _compose_root(loader, source)
            builder = _TreeBuilder(loader, positions)
            data = _build_tree(builder, root, source)
        finally:
            loader.dispose()
    except _Stop as stop:
        return None, positions, [stop.problem]
    return data, positions, builder.problems


class _Stop(Exception):
    """Parsing stops with this one problem."""

    def __init__(self, location: Location, message: str):
        self.problem = Problem(location, "", message)


def _check_size(text: str, source: str) -> None:
    if len(text.encode("utf-8", errors="replace")) > MAX_BYTES:
        raise _Stop(Location(source, 1, 1), f"file larger than {MAX_BYTES} bytes")


def _open_loader(text: str, source: str) -> _Loader:
    """A loader over ``text``; a character YAML does not allow is reported where it is."""
    try:
        return _Loader(text)
    except yaml.reader.ReaderError as exc:
        line = text.count("\n", 0, exc.position) + 1
        col = exc.position - (text.rfind("\n", 0, exc.position) + 1) + 1
        message = f"invalid YAML: character {exc.character!r} is not allowed"
        raise _Stop(Location(source, line, col), message) from None


def _compose_root(loader: _Loader, source: str) -> yaml.Node:
    """The document's root node (syntax errors and an empty document stop parsing)."""
    try:
        root = loader.get_single_node()
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        msg = " ".join(part for part in (exc.context, exc.problem) if part) or "invalid YAML"
        raise _Stop(_mark(source, mark), f"invalid YAML: {msg}") from None
    except (yaml.YAMLError, RecursionError, MemoryError) as exc:
        raise _Stop(Location(source, 1, 1), f"invalid YAML: {type(exc).__name__}") from None
    if root is None:
        raise _Stop(Location(source, 1, 1), "the recipe is empty")
    return root


def _build_tree(builder: _TreeBuilder, root: yaml.Node, source: str) -> Any:
    """Plain data from ``root``; a limit, a tag or a value that cannot be built stops parsing."""
    try:
        return builder.build(root, (), 0)
    except _TooLarge:
        raise _Stop(Location(source, 1, 1), f"recipe has more than {MAX_NODES} values") from None
    except _TooDeep as exc:
        message = f"recipe nested deeper than {MAX_DEPTH} levels"
        raise _Stop(_mark(source, exc.node.start_mark), message) from None
    except _BadTag as exc:
        message = f"YAML tags are not allowed here ({exc.node.tag})"
        raise _Stop(_mark(source, exc.node.start_mark), message) from None
    except yaml.constructor.ConstructorError as exc:
        msg = exc.problem or "cannot construct value"
        if "could not determine a constructor" in msg:
            msg = f"YAML tags are not allowed here ({msg.split('for the tag')[-1].strip()})"
        raise _Stop(_mark(source, exc.problem_mark), msg) from None
    except KeyError as exc:  # PyYAML's typed constructors, e.g. ``!!bool maybe``
        message = f"invalid YAML: a value with an explicit type tag cannot be read ({exc})"
        raise _Stop(Location(source, 1, 1), message) from None
    except (yaml.YAMLError, RecursionError, MemoryError, ValueError, OverflowError) as exc:
        message = f"invalid YAML: {type(exc).__name__}: {exc}"
        raise _Stop(Location(source, 1, 1), message) from None


class _TreeBuilder:
    """Walk composed YAML nodes into plain data, recording positions and enforcing limits.

    Only plain mappings and sequences are walked here; scalars are constructed by the loader.
    """

    def __init__(self, loader: _Loader, positions: _Positions):
        self.loader = loader
        self.positions = positions
        self.source = positions.source
        self.problems: list[Problem] = []
        self.count = 0

    def build(self, node: yaml.Node, path: Path_, depth: int) -> Any:
        """Plain data for ``node``, found at ``path`` (``depth`` levels down)."""
        self._count(node, depth)
        self.positions.values[path] = _mark(self.source, node.start_mark)
        if isinstance(node, yaml.MappingNode | yaml.SequenceNode) and node.tag not in _PLAIN_TAGS:
            raise _BadTag(node)
        if isinstance(node, yaml.MappingNode):
            return self._mapping(node, path, depth)
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, (*path, i), depth + 1) for i, item in enumerate(node.value)]
        return self.loader.construct_object(node, deep=True)

    def _count(self, node: yaml.Node, depth: int) -> None:
        """Enforce MAX_NODES (over the whole document) and MAX_DEPTH."""
        self.count += 1
        if self.count > MAX_NODES:
            raise _TooLarge()
        if depth > MAX_DEPTH:
            raise _TooDeep(node)

    def _mapping(self, node: yaml.MappingNode, path: Path_, depth: int) -> dict[Any, Any]:
        out: dict[Any, Any] = {}
        self.loader.flatten_mapping(node)
        for key_node, value_node in node.value:
            key = self._key(key_node, path, out)
            if key is None:
                continue
            self.positions.keys[(*path, key)] = _mark(self.source, key_node.start_mark)
            out[key] = self.build(value_node, (*path, key), depth + 1)
        return out

    def _key(self, key_node: yaml.Node, path: Path_, taken: dict[Any, Any]) -> str | None:
        """The key as a string, or None (a problem recorded) for a non-scalar or repeated key."""
        where = _mark(self.source, key_node.start_mark)
        if not isinstance(key_node, yaml.ScalarNode):
            self.problems.append(Problem(where, format_path(path), "keys must be plain strings"))
            return None
        key = self.loader.construct_object(key_node)
        if not isinstance(key, str):
            key = str(key)
        if key in taken:
            self.problems.append(Problem(where, format_path((*path, key)), "duplicate key"))
            return None
        return key


_PLAIN_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


class _BadTag(Exception):
    def __init__(self, node: yaml.Node):
        self.node = node


class _TooLarge(Exception):
    pass


class _TooDeep(Exception):
    def __init__(self, node: yaml.Node):
        self.node = node


def parse_set(override: str) -> tuple[list[Any], Any]:
    """``"training.epochs=3"`` -> (["training", "epochs"], 3). A bare name means a variable."""
    if "=" not in override:
        raise ValueError(f"--set expects KEY=VALUE, got {override!r}")
    key, _, raw = override.partition("=")
    key = key.strip()
    if not key:
        raise ValueError(f"--set expects KEY=VALUE, got {override!r}")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    parts: list[Any] = [int(p) if p.isdigit() else p for p in key.split(".")]
    if len(parts) == 1 and parts[0] not in Recipe.model_fields:
        parts = ["variables", parts[0]]
    return parts, value


def _apply_sets(
    data: dict[str, Any], overrides: Sequence[str], positions: _Positions
) -> list[Problem]:
    problems: list[Problem] = []
    for override in overrides:
        where = Location(f"--set {override}")
        try:
            parts, value = parse_set(override)
        except ValueError as exc:
            problems.append(Problem(where, "", str(exc)))
            continue
        if parts[0] == "variables" and len(parts) == 2 and "." not in override.partition("=")[0]:
            known = data.get("variables") or {}
            if not isinstance(known, dict) or parts[1] not in known:
                names = sorted(known) if isinstance(known, dict) else []
                hint = difflib.get_close_matches(str(parts[1]), names, n=1)
                problems.append(
                    Problem(
                        where,
                        str(parts[1]),
                        f"the recipe has no variable {parts[1]!r}"
                        + (f" (did you mean {hint[0]!r}?)" if hint else "")
                        + (
                            f"; its variables: {', '.join(names)}"
                            if names
                            else "; it defines no variables"
                        )
                        + f" (set variables.{parts[1]}=... to add one on purpose)",
                    )
                )
                continue
        node: Any = data
        ok = True
        for i, part in enumerate(parts[:-1]):
            if isinstance(node, dict):
                if part not in node or node[part] is None:
                    node[part] = {}
                node = node[part]
            elif isinstance(node, list) and isinstance(part, int) and part < len(node):
                node = node[part]
            else:
                problems.append(
                    Problem(where, format_path(tuple(parts[: i + 1])), "no such element to set")
                )
                ok = False
                break
        if not ok:
            continue
        last = parts[-1]
        if isinstance(node, dict):
            node[last] = value
        elif isinstance(node, list) and isinstance(last, int) and last < len(node):
            node[last] = value
        else:
            problems.append(Problem(where, format_path(tuple(parts)), "no such element to set"))
            continue
        path = tuple(parts)
        for table in (positions.values, positions.keys):
            for known in [p for p in table if p[: len(path)] == path]:
                del table[known]
            for cut in range(1, len(path) + 1):
                table.setdefault(path[:cut], where)
            table[path] = where
    return problems


def _substitute(
    data: Any,
    env: dict[str, expr.Number],
    path: Path_,
    positions: _Positions,
    problems: list[Problem],
) -> Any:
    if isinstance(data, dict):
        return {k: _substitute(v, env, (*path, k), positions, problems) for k, v in data.items()}
    if isinstance(data, list):
        return [_substitute(v, env, (*path, i), positions, problems) for i, v in enumerate(data)]
    if expr.is_reference(data):
        try:
            return expr.evaluate_text(expr.strip_braces(data), env)
        except expr.ExprError as exc:
            problems.append(Problem(positions.at(path), format_path(path), str(exc)))
            return data
    return data


def _model_for(loc: Sequence[Any]) -> type[BaseModel] | None:
    """The spec class whose field set applies at ``loc`` (the parent of an offending key)."""
    for i in range(len(loc) - 1, -1, -1):
        part = loc[i]
        if (
            isinstance(part, str)
            and part in MODIFIER_TYPES
            and i > 0
            and isinstance(loc[i - 1], int)
        ):
            return MODIFIER_TYPES[part]
    if loc and loc[-1] == "training":
        return TrainingSpec
    if len(loc) == 2 and loc[0] == "stages" and isinstance(loc[1], int):
        return StageSpec
    if not loc:
        return Recipe
    return None


def _data_path(data: Any, loc: Sequence[Any]) -> tuple[Path_, bool]:
    """Map a pydantic ``loc`` onto a data path, dropping discriminator tags.

    Returns (path, complete) where ``complete`` tells whether the whole loc exists in the data.
    """
    path: list[Any] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
            path.append(part)
        elif isinstance(node, dict) and node.get("type") == part:
            continue  # the union's tag
        else:
            return tuple(path), False
    return tuple(path), True


def _problems_from_validation(
    exc: ValidationError, data: Any, positions: _Positions
) -> list[Problem]:
    problems: list[Problem] = []
    seen: set[tuple[str, str]] = set()
    for err in exc.errors(include_url=False):
        loc = err["loc"]
        kind = err["type"]
        path, complete = _data_path(data, loc)
        message = err["msg"]
        if message.startswith("Value error, "):
            message = message[len("Value error, ") :]
        location = positions.at(path)
        if kind == "extra_forbidden":
            location = positions.at(path, key=True)
            model = _model_for([p for p in loc[:-1]])
            name = str(loc[-1])
            message = f"unknown key {name!r}"
            if model is not None:
                fields = [f for f in model.model_fields if f != "type"]
                close = difflib.get_close_matches(name, fields, n=1, cutoff=0.6)
                if close:
                    message += f"; did you mean {close[0]!r}?"
                message += f" (valid keys: {', '.join(fields)})"
        elif kind == "union_tag_invalid":
            tag = str(err.get("ctx", {}).get("tag", ""))
            location = positions.at((*path, "type"))
            path = (*path, "type")
            message = f"unknown modifier type {tag!r}"
            close = difflib.get_close_matches(tag, list(MODIFIER_TYPES), n=1, cutoff=0.5)
            if close:
                message += f"; did you mean {close[0]!r}?"
            message += f" (valid types: {', '.join(MODIFIER_TYPES)})"
        elif kind == "union_tag_not_found":
            message = f"a modifier needs 'type:', one of: {', '.join(MODIFIER_TYPES)}"
        elif kind == "missing":
            message = f"required field {loc[-1]!r} is missing"
            path = (*path, loc[-1]) if not complete else path
        elif kind == "literal_error" and "expected" in err.get("ctx", {}):
            message = f"{message} (got {err.get('input')!r})"
        elif kind in (
            "float_type",
            "int_type",
            "string_type",
            "bool_type",
            "list_type",
            "dict_type",
            "model_type",
        ):
            message = (
                f"{message} (got {type(err.get('input')).__name__} {_short(err.get('input'))})"
            )
        key = (format_path(path), message)
        if key in seen:
            continue
        seen.add(key)
        problems.append(Problem(location, format_path(path), message))
    return problems


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _at_modifier(
    recipe: Recipe, positions: _Positions, stage_index: int, *tail: Any, message: str
) -> Problem:
    """A problem at a stage's modifier (``stages.N.modifiers.I...`` or ``modifiers.I...``)."""
    base: Path_ = (
        ("stages", stage_index, "modifiers") if recipe.stages is not None else ("modifiers",)
    )
    path = (*base, *tail)
    return Problem(positions.at(path), format_path(path), message)


def _check_overlaps(recipe: Recipe, data: Any, positions: _Positions) -> list[Problem]:
    """Pruning modifiers on the same weights, or two LR modifiers, must not overlap in time.

    Only windows given in the same unit can be compared here; the planner re-checks in steps.
    """
    from recipec.recipe.checks import overlap_problems

    return [
        _at_modifier(recipe, positions, stage_index, index, message=message)
        for stage_index, stage in enumerate(recipe.resolved_stages())
        for index, message in overlap_problems(stage.modifiers, recipe, steps_per_epoch=None)
    ]


def _check_prune_only(recipe: Recipe, positions: _Positions) -> list[Problem]:
    """Modifiers that a prune-only stage (``training.steps: 0``) cannot run."""
    from recipec.recipe.checks import prune_only_problems

    problems: list[Problem] = []
    for stage_index, stage in enumerate(recipe.resolved_stages()):
        if not recipe.stage_training(stage).prune_only:
            continue
        why = ""
        if recipe.stages is not None and (
            stage.training is None or "steps" not in stage.training.model_fields_set
        ):
            where = positions.at(("training", "steps"))
            why = (
                f" (stage {stage.name!r} inherits training.steps: 0 from line {where.line or '?'})"
            )
        for index, name, message in prune_only_problems(stage.modifiers):
            problems.append(
                _at_modifier(recipe, positions, stage_index, index, name, message=message + why)
            )
    return problems


def _check_windows(recipe: Recipe, positions: _Positions) -> list[Problem]:
    """Pruning windows that outlast their stage (in the stage's own unit; the planner checks the rest)."""
    from recipec.recipe.checks import window_problems

    return [
        _at_modifier(recipe, positions, stage_index, index, name, message=message)
        for stage_index, stage in enumerate(recipe.resolved_stages())
        for index, name, message in window_problems(
            stage.modifiers, recipe.stage_training(stage), None
        )
    ]


def _check_shadowed_sets(
    recipe: Recipe, overrides: Sequence[str], positions: _Positions
) -> list[Problem]:
    """A ``--set training.X=...`` that no stage uses, because every stage sets X (or its pair) itself."""
    if recipe.stages is None:
        return []
    problems: list[Problem] = []
    for override in overrides:
        try:
            parts, _ = parse_set(override)
        except ValueError:
            continue  # reported by _apply_sets
        if len(parts) != 2 or parts[0] != "training":
            continue
        field = str(parts[1])
        names = next((pair for pair in TRAINING_PAIRS if field in pair), (field,))
        shadowing = [
            i
            for i, stage in enumerate(recipe.stages)
            if stage.training is not None and set(names) & stage.training.model_fields_set
        ]
        if len(shadowing) == len(recipe.stages):
            lines = ", ".join(
                f"stages.{i}.training (line {positions.at(('stages', i, 'training')).line or '?'})"
                for i in shadowing
            )
            problems.append(
                Problem(
                    Location(f"--set {override}"),
                    format_path(tuple(parts)),
                    f"has no effect: every stage sets its own {' / '.join(names)} ({lines}); set "
                    f"stages.N.training.{field}, or a variable the recipe uses there",
                )
            )
    return problems


def _check_lower_targets(recipe: Recipe, positions: _Positions) -> list[Problem]:
    from recipec.recipe.checks import lower_target_problems

    return [
        _at_modifier(recipe, positions, stage_index, index, "final_sparsity", message=message)
        for stage_index, index, message in lower_target_problems(recipe)
    ]


def _check_quantize(recipe: Recipe, positions: _Positions) -> list[Problem]:
    """Quantize windows: one per stage, after the last pruning step, calibrated when PTQ."""
    from recipec.recipe.checks import later_pruning_problems, stage_quantize_problems

    problems = [
        _at_modifier(recipe, positions, stage_index, index, name, message=message)
        for stage_index, stage in enumerate(recipe.resolved_stages())
        for index, name, message in stage_quantize_problems(
            stage.modifiers, recipe.stage_training(stage), None
        )
    ]
    for stage_index, index, message in later_pruning_problems(recipe):
        if index is None:
            path = ("stages", stage_index, "name")
            problems.append(Problem(positions.at(path), format_path(path), message))
        else:
            problems.append(
                _at_modifier(recipe, positions, stage_index, index, "type", message=message)
            )
    return problems


def load_recipe_text(text: str, source: str = "<recipe>", overrides: Iterable[str] = ()) -> Recipe:
    """Validate recipe text; raises :class:`RecipeError` listing every problem."""
    overrides = list(overrides)  # read twice (applied, then checked for shadowing)
    data, positions, problems = _parse_yaml(text, source)
    if data is None:
        raise RecipeError(problems or [Problem(positions.at(()), "", "the recipe is empty (null)")])
    if not isinstance(data, dict):
        raise RecipeError(
            [
                Problem(
                    positions.at(()),
                    "",
                    "a recipe must be a mapping of keys (version, training, modifiers, ...)",
                )
            ]
        )
    problems += _apply_sets(data, overrides, positions)

    raw_vars = data.get("variables") or {}
    if not isinstance(raw_vars, dict):
        problems.append(
            Problem(
                positions.at(("variables",)),
                "variables",
                "must be a mapping of name: number or expression",
            )
        )
        raw_vars = {}
    values, var_errors = expr.resolve_variables(raw_vars)
    for name, message in var_errors.items():
        path = ("variables", name)
        problems.append(Problem(positions.at(path), format_path(path), message))
    if var_errors:  # every use of a broken variable would only repeat it: stop here
        raise RecipeError(problems)
    body = {k: v for k, v in data.items() if k != "variables"}
    body = _substitute(body, values, (), positions, problems)
    if "variables" in data:
        body["variables"] = values
    try:
        recipe = Recipe.model_validate(body)
    except ValidationError as exc:
        problems += _problems_from_validation(exc, body, positions)
        raise RecipeError(problems) from None
    problems += _check_overlaps(recipe, body, positions)
    problems += _check_prune_only(recipe, positions)
    problems += _check_windows(recipe, positions)
    problems += _check_lower_targets(recipe, positions)
    problems += _check_quantize(recipe, positions)
    problems += _check_shadowed_sets(recipe, overrides, positions)
    if problems:
        raise RecipeError(problems)
    return recipe


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Load and validate a recipe file (YAML), applying ``--set`` style overrides."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RecipeError(
            [Problem(Location(str(path)), "", "no such file" + _bundled_hint(path))]
        ) from None
    except IsADirectoryError:
        raise RecipeError(
            [Problem(Location(str(path)), "", "is a directory, not a recipe file")]
        ) from None
    except UnicodeDecodeError as exc:
        raise RecipeError(
            [Problem(Location(str(path)), "", f"not UTF-8 text ({exc.reason})")]
        ) from None
    except OSError as exc:
        raise RecipeError(
            [Problem(Location(str(path)), "", f"cannot read: {exc.strerror}")]
        ) from None
    return load_recipe_text(text, str(path), overrides)


def find_bundled(name: str) -> Path | None:
    """Resolve a bundled recipe by name (``quickstart`` or ``quickstart.yaml``). Only a bare
    name of the library's own recipes is looked up: nothing with a folder part (``../x``) or
    outside the library resolves."""
    from importlib import resources

    stem = name[:-5] if name.endswith(".yaml") else name
    if stem not in bundled_names():
        return None
    item = resources.files("recipec.recipes").joinpath(f"{stem}.yaml")
    return Path(str(item)) if item.is_file() else None


def bundled_names() -> list[str]:
    """Names of the bundled recipes (``recipes/*.yaml``), sorted."""
    from importlib import resources

    root = resources.files("recipec.recipes")
    return sorted(item.name[:-5] for item in root.iterdir() if item.name.endswith(".yaml"))


def _bundled_hint(path: Path) -> str:
    """For a missing recipe: the closest bundled name, and the list of bundled ones."""
    import difflib

    names = bundled_names()
    stem = path.name[:-5] if path.name.endswith(".yaml") else path.name
    close = difflib.get_close_matches(stem, names, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{hint} (bundled recipes, by name: {', '.join(names)})"


def resolve_recipe_path(path_or_name: str) -> Path:
    """A recipe path as given, or a bundled recipe by name when no such file exists."""
    path = Path(path_or_name)
    if path.exists():
        return path
    bundled = find_bundled(path_or_name) or find_bundled(path.name)
    return bundled or path
