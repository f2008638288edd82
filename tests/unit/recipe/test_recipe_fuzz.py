"""Property-based: mutated recipes always end in a clean RecipeError with a location.

Runs >= 1,000 mutated cases (wrong types, unknown keys, out-of-range numbers, broken YAML,
deep nesting, huge numbers, unicode, bad --set overrides) through the loader.
"""

import copy
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from recipec.recipe.errors import RecipeError
from recipec.recipe.load import load_recipe_text
from recipec.recipe.schema import Recipe

ROOT = Path(__file__).resolve().parents[3] / "recipes"
BASES = [yaml.safe_load(p.read_text()) for p in sorted(ROOT.rglob("*.yaml"))]

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=30),
    st.sampled_from(
        ["${", "${1/0}", "${nope}", "${10**10**10}", "gmp", "block4", "2:4", "∞", "é", "\x00"]
    ),
)
values = st.recursive(
    scalars,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


def _paths(node, prefix=()):
    yield prefix
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _paths(value, (*prefix, key))
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _paths(value, (*prefix, i))


@st.composite
def mutated_recipes(draw):
    data = copy.deepcopy(draw(st.sampled_from(BASES)))
    for _ in range(draw(st.integers(1, 3))):
        paths = [p for p in _paths(data) if p]
        path = draw(st.sampled_from(paths))
        parent = data
        for part in path[:-1]:
            parent = parent[part]
        action = draw(st.sampled_from(["replace", "add_key", "delete", "nest"]))
        if action == "replace":
            parent[path[-1]] = draw(values)
        elif action == "add_key" and isinstance(parent, dict):
            parent[draw(st.text(min_size=1, max_size=12))] = draw(values)
        elif action == "delete":
            del parent[path[-1]]
        else:
            nested = draw(values)
            for _ in range(draw(st.integers(1, 80))):
                nested = {"x": nested}
            parent[path[-1]] = nested
    text = yaml.safe_dump(data, allow_unicode=True, sort_keys=False, width=10**6)
    if draw(st.booleans()):
        cut = draw(st.integers(0, len(text)))
        text = text[:cut] + draw(st.text(max_size=8)) + text[cut + draw(st.integers(0, 5)) :]
    return text


overrides = st.lists(
    st.one_of(
        st.builds(
            lambda k, v: f"{k}={v}",
            st.sampled_from(
                [
                    "target_sparsity",
                    "training.epochs",
                    "modifiers.0.final_sparsity",
                    "modifiers.9.x",
                    "a.b.c",
                    "",
                ]
            ),
            st.text(max_size=10),
        ),
        # prune-only stages: every bundled recipe with training.steps 0 (its lr/distill/cram refused)
        st.sampled_from(
            ["training.steps=0", "stages.0.training.steps=0", "stages.1.training.steps=0"]
        ),
        st.text(max_size=15),
    ),
    max_size=2,
)


def _check(text, sets):
    try:
        recipe = load_recipe_text(text, "fuzz.yaml", sets)
    except RecipeError as exc:
        assert exc.problems
        for problem in exc.problems:
            loc = problem.location
            assert loc.source == "fuzz.yaml" or loc.source.startswith("--set ")
            if loc.source == "fuzz.yaml":
                assert loc.line is not None and loc.line >= 1 and loc.col >= 1
            assert problem.message
    else:
        assert isinstance(recipe, Recipe)


@settings(max_examples=1000, deadline=None, suppress_health_check=list(HealthCheck))
@given(mutated_recipes(), overrides)
def test_mutated_recipes_fail_cleanly(text, sets):
    _check(text, sets)


@settings(max_examples=300, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.text(max_size=300))
def test_arbitrary_text_fails_cleanly(text):
    _check(text, [])


def test_null_and_scalar_documents():
    for text in ("Null", "~", "null\n", "3", "'text'"):
        _check(text, [])


def test_huge_and_deep_inputs():
    _check("a: " + "[" * 5000 + "]" * 5000, [])
    _check("training:\n  steps: " + "9" * 5000 + "\n", [])
    _check(
        "x: &a [1]\n"
        + "".join(f"y{i}: &a{i} [*a, *a, *a, *a]\n" for i in range(1))
        + "z: ["
        + ", ".join(["*a"] * 2000)
        + "]\n",
        [],
    )
