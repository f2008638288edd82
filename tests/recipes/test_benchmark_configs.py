"""The accuracy benchmark's configurations give what their names say, on every bundled recipe.

The benchmark scales every recipe to one epoch budget through ``--set``; a variable a recipe
does not define used to be added silently and leave its schedule unscaled (the oBERT recipes
once ran 30 epochs in a 4-epoch table). Each configuration is resolved here to optimizer steps
and checked against the budget.
"""

import json
import sys
from pathlib import Path

import pytest

from recipec.plan import resolve_stage
from recipec.recipe.load import load_recipe

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "benchmarks"))
import accuracy  # noqa: E402

BUDGET = {"dense": 1, "prune": 2, "finetune": 1, "steps_per_epoch": 2, "num_grads": 8}
SPE = 100  # steps per epoch


def _configs():
    for task in ("sst2", "csqa"):
        for cfg in accuracy.configurations(task, BUDGET):
            if cfg.recipe != "dense":
                yield pytest.param(task, cfg, id=f"{task}-{cfg.name}")


@pytest.mark.parametrize(("task", "cfg"), list(_configs()))
def test_configuration_resolves_to_the_budget(task, cfg):
    recipe = load_recipe(ROOT / "recipes" / cfg.recipe, cfg.sets)
    (stage,) = recipe.resolved_stages()
    plan = resolve_stage(recipe, stage, SPE)
    total = BUDGET["dense"] + BUDGET["prune"] + BUDGET["finetune"]
    assert plan.total_steps == total * SPE
    (pruner,) = plan.by_type("gmp", "obert")
    assert pruner.sparsities[-1] == pytest.approx(cfg.sparsity)
    if cfg.name.startswith("smc"):
        return  # its own schedule: from 0% over 10-80% of training
    assert pruner.window.start == BUDGET["dense"] * SPE
    assert pruner.window.end == (BUDGET["dense"] + BUDGET["prune"]) * SPE
    steps = pruner.pruning_steps
    assert len(steps) == BUDGET["prune"] * BUDGET["steps_per_epoch"] + 1
    if "no_first_step" in cfg.name:
        assert pruner.sparsities[0] == pytest.approx(0.0)
        (cyclic,) = [m for m in plan.by_type("lr") if m.spec.schedule == "cyclic_linear"]
        assert cyclic.cycle == BUDGET["prune"] * SPE  # one cycle: no rewinding
    else:
        assert pruner.sparsities[0] == pytest.approx(0.3)
    if cfg.name.startswith("obert"):
        assert pruner.spec.num_grads == BUDGET["num_grads"]


@pytest.mark.parametrize(
    "name",
    [
        "downstream_gmp_80",
        "downstream_gmp_90",
        "obert_80",
        "obert_90",
        "obert_block4_80",
        "obert_block4_90",
    ],
)
def test_paper_recipes_share_the_schedule_variables(name):
    import yaml

    variables = yaml.safe_load((ROOT / "recipes" / f"{name}.yaml").read_text())["variables"]
    for var in (
        "target_sparsity",
        "init_sparsity",
        "dense_epochs",
        "pruning_epochs",
        "pruning_steps_per_epoch",
        "finetune_epochs",
    ):
        assert var in variables, var


def test_every_option_is_forwarded_to_children_or_set_per_child():
    parser = accuracy.build_parser()
    dests = {a.dest for a in parser._actions}
    assert dests == set(accuracy.FORWARDED) | set(accuracy.PER_CHILD)
    assert not set(accuracy.FORWARDED) & set(accuracy.PER_CHILD)


def test_child_runs_get_the_parents_budget_and_settings():
    parser = accuracy.build_parser()
    parent = parser.parse_args(
        [
            "--task",
            "all",
            "--jobs",
            "3",
            "--max-train",
            "100",
            "--prune-epochs",
            "5",
            "--max-seq-length",
            "48",
            "--num-grads",
            "16",
            "--device",
            "cuda:1",
            "--threads",
            "2",
            "--workdir",
            "/tmp/w x",
            "--configs",
            "gmp_90",
            "--series",
            "KD T=5.5",
        ]
    )
    child = parser.parse_args(accuracy._child_argv(parent) + ["--task", "sst2"])
    for dest in accuracy.FORWARDED:
        assert getattr(child, dest) == getattr(parent, dest), dest
    assert child.max_eval is None and child.configs is None and child.jobs == 1
    assert accuracy.run_budget(child)["series"] == "KD T=5.5"
    # Without --series the budget has no such key: the records written before it still match.
    plain = parser.parse_args(["--max-train", "4000", "--max-seq-length", "64"])
    assert accuracy.run_budget(plain) == {**CPU_BUDGET, "max_seq_length": 64}


# A results record's budget as the CPU table wrote it before max_seq_length joined it.
CPU_BUDGET = {
    "dense": 1,
    "prune": 2,
    "finetune": 1,
    "steps_per_epoch": 2,
    "num_grads": 64,
    "max_train": 4000,
    "max_eval": None,
    "batch_size": 32,
}


def test_records_written_before_the_sequence_length_joined_the_budget_keep_matching(tmp_path):
    old = {
        "task": "sst2",
        "config": "dense",
        "accuracy": 0.8,
        "sets": ["training.epochs=4", "training.batch_size=32", "training.max_seq_length=64"],
        "budget": dict(CPU_BUDGET),
    }
    path = tmp_path / "accuracy.json"
    path.write_text(json.dumps([old]))
    (record,) = accuracy.load_results(path)
    assert record["budget"]["max_seq_length"] == 64
    assert record["budget"] == {**old["budget"], "max_seq_length": 64}


def test_a_series_keeps_rows_of_one_budget_apart_each_against_its_own_dense(tmp_path):
    """Rows re-measured after a recipe default changed (T=2 -> 5.5) under the same epochs and
    data get their own table and their own dense row; none is reused by the other series."""
    budget = {**CPU_BUDGET, "max_seq_length": 64}

    def row(config, acc, budget):
        return {
            "task": "sst2",
            "config": config,
            "accuracy": acc,
            "target_sparsity": 0.8,
            "sparsity_targets": 0.8,
            "steps": 500,
            "wall_seconds": 60.0,
            "device": "cpu",
            "budget": budget,
        }

    later = {**budget, "series": "KD T=5.5"}
    text = accuracy.write_tables(
        [
            row("dense", 0.80, budget),
            row("gmp_80", 0.72, budget),
            row("dense", 0.90, later),
            row("gmp_80", 0.81, later),
        ],
        tmp_path / "a.md",
        tmp_path / "a.png",
    )
    tables = text.split("Budget: ")[1:]
    assert len(tables) == 2
    assert sorted("series: KD T=5.5" in t for t in tables) == [False, True]
    assert "| 90.0% |" in tables[0] and "| 90.0% |" in tables[1]  # 72/80 and 81/90


def _structured_recipe(cfg: dict, tmp_path: Path, sets: list[str]):
    if "bundled" in cfg:
        return load_recipe(ROOT / "recipes" / cfg["bundled"], sets)
    path = tmp_path / "r.yaml"
    path.write_text(cfg["text"])
    return load_recipe(path, sets)


@pytest.mark.parametrize("saliency", ["magnitude", "fisher"])
def test_structured_benchmark_rows_share_one_budget(saliency, tmp_path, load_benchmark):
    """Every row of benchmarks/structured.py: 4 epochs of batch 32 at LR 5e-5, KD from the
    dense model (T 5.5) except the dense row, and the removal its name says."""
    bench = load_benchmark("structured")
    configs = bench.configurations(saliency)
    assert set(bench.DEFAULT_CONFIGS) <= set(configs)
    removes = {}
    for name, cfg in configs.items():
        recipe = _structured_recipe(cfg, tmp_path, bench.run_sets(cfg, 64))
        (stage,) = recipe.resolved_stages()
        plan = resolve_stage(recipe, stage, SPE)
        assert plan.total_steps == 4 * SPE, name
        assert (plan.training.max_seq_length, plan.eval_every) == (64, 4 * SPE), name
        assert (plan.training.batch_size, plan.training.learning_rate) == (32, 5e-5), name
        kd = [m.spec for m in plan.by_type("distill")]
        assert [(d.temperature, d.hardness) for d in kd] == (
            [] if name == "dense" else [(5.5, 1.0)]
        )
        removes[name] = sorted(
            (m.spec.type, m.spec.keep if m.spec.type == "layers" else m.spec.final_sparsity)
            for m in plan.modifiers
            if m.spec.structured or m.spec.type == "gmp"
        )
        for m in plan.modifiers:
            if m.spec.structured in ("heads", "neurons"):
                assert m.spec.saliency == saliency, name
    assert removes["dense"] == []
    assert removes["ffn50"] == [("neurons", 0.5)]
    assert removes["heads33"] == [("heads", 0.3333)]
    assert removes["ffn50_gmp80"] == [("gmp", 0.8), ("neurons", 0.5)]
    assert removes["layers3_kd"] == [("layers", 3)]


def test_benchmark_scripts_do_not_shadow_installed_packages():
    """benchmarks/ goes on sys.path for these tests: a script named like an installed top-level
    module (``kernels.py`` vs the ``kernels`` package transformers imports) would replace it."""
    import importlib.metadata

    installed = set(importlib.metadata.packages_distributions())
    scripts = {p.stem for p in (ROOT / "benchmarks").glob("*.py")}
    assert not scripts & installed, f"rename benchmarks/{sorted(scripts & installed)}.py"
