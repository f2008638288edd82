"""The package's folders are layers: every import of a recipec module goes down, never up.

``LAYERS`` lists the units from the bottom up. A module may import from its own unit (the same
package or module) and from units listed before its own; anything else is a wrong-way import.
Imports inside functions count too (lazy imports are still dependencies). ``recipec/__init__``
is the public facade and may import anything.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "recipec"

# Bottom to top. One unit per entry: a package (all its modules) or a single module.
LAYERS: tuple[str, ...] = (
    "recipec.recipe",  # schema, loading, expressions, recipe checks: pure data, no torch
    "recipec.recipes",  # the bundled YAML library (package data)
    "recipec.schedules",  # pure functions of the step
    "recipec.plan",  # a recipe resolved to optimizer steps
    "recipec.outputs",  # files recipec writes: atomic writes, output-folder rules
    "recipec.architectures",  # which linear layers of each encoder family are prunable
    "recipec.sparsity",  # masks, mask state, Fisher, OBS: torch only
    "recipec.quant",  # int8 fake quantization of linear layers: torch only
    "recipec.distributed",  # process groups, collectives with clear errors
    "recipec.kernels",  # sparse CPU kernels and the layers built on them
    "recipec.tasks",  # task data, data loading, metrics
    "recipec.models",  # the one model loader (transformers)
    "recipec.checkpoint",  # the sparse checkpoint format (HF folder + masks)
    "recipec.modifiers",  # runtime modifiers, one module per type (distill loads its teacher)
    "recipec.program",  # the hook surface of a compiled stage
    "recipec.compiler",  # recipe + model + optimizer -> Program
    "recipec.train",  # drivers: plain loop, HF Trainer, the apply run
    "recipec.export",  # ONNX export and verification
    "recipec.runtime",  # CPU runtimes and the benchmark
    "recipec.convert",  # SparseML recipe conversion
    "recipec.cli",  # one module per command
)


def unit_of(module: str) -> str | None:
    """The layer unit a dotted module name belongs to (None outside the package)."""
    for unit in LAYERS:
        if module == unit or module.startswith(unit + "."):
            return unit
    return None


def module_name(path: Path, root: Path = PACKAGE) -> str:
    rel = path.relative_to(root.parent).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imported_modules(path: Path, root: Path = PACKAGE) -> list[tuple[int, str]]:
    """``(line, module)`` for every ``recipec`` import in a file, lazy ones included."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    me = module_name(path, root)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, a.name) for a in node.names if a.name.startswith("recipec")]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative import
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("recipec"):
                continue
            # "from recipec import distributed" imports the module recipec.distributed
            for alias in node.names:
                sub = f"{target}.{alias.name}"
                found.append((node.lineno, sub if unit_of(sub) else target))
    return found


def wrong_way_imports(root: Path = PACKAGE) -> list[str]:
    problems = []
    rank = {unit: i for i, unit in enumerate(LAYERS)}
    for path in sorted(root.rglob("*.py")):
        me = module_name(path, root)
        if me == "recipec":
            continue  # the lazy public facade
        mine = unit_of(me)
        if mine is None:
            problems.append(f"{path}: module {me} is in no layer (add its unit to LAYERS)")
            continue
        for line, target in imported_modules(path, root):
            theirs = unit_of(target)
            if theirs is None:
                if target != "recipec":
                    problems.append(f"{me}:{line} imports {target}, which is in no layer")
                continue
            if theirs != mine and rank[theirs] > rank[mine]:
                problems.append(f"{me}:{line} imports {target} ({theirs} is above {mine})")
    return problems


def test_imports_only_go_down():
    problems = wrong_way_imports()
    assert not problems, "wrong-way imports:\n" + "\n".join(problems)


def test_a_wrong_way_import_is_caught(tmp_path):
    # A copy of two units where the lower one imports the higher one.
    pkg = tmp_path / "recipec"
    (pkg / "sparsity").mkdir(parents=True)
    (pkg / "train").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "sparsity" / "__init__.py").write_text("")
    (pkg / "sparsity" / "masks.py").write_text("def f():\n    from recipec.train import loop\n")
    (pkg / "train" / "__init__.py").write_text("")
    (pkg / "train" / "loop.py").write_text("from recipec.sparsity import masks\n")
    problems = wrong_way_imports(pkg)
    assert problems == [
        "recipec.sparsity.masks:2 imports recipec.train.loop (recipec.train is above recipec.sparsity)"
    ]


def test_the_documented_layers_are_the_enforced_ones():
    doc = (PACKAGE.parent / "docs" / "contracts.md").read_text(encoding="utf-8")
    documented = re.findall(r"^\| `(recipec\.[a-z_.]+)` \|", doc, flags=re.M)
    assert documented == list(LAYERS)


@pytest.mark.parametrize("module", ["recipec.recipe.schema", "recipec.plan"])
def test_recipe_layers_import_no_torch(module):
    """Validating and planning a recipe stays instant: no torch in the bottom layers."""
    path = PACKAGE.parent / (module.replace(".", "/") + ".py")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = {
        a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names
    }
    names |= {
        (n.module or "").split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)
    }
    assert "torch" not in names and "transformers" not in names
