"""Every bundled recipe (found recursively) validates through the CLI and resolves to a plan."""

from pathlib import Path

import pytest
from click.testing import CliRunner

from recipec.cli import main
from recipec.plan import resolve
from recipec.recipe.load import load_recipe

RECIPES = sorted((Path(__file__).resolve().parents[2] / "recipes").rglob("*.yaml"))


def test_recipes_are_found():
    assert len(RECIPES) >= 4
    names = {p.name for p in RECIPES}
    assert {
        "quickstart.yaml",
        "downstream_gmp_80.yaml",
        "downstream_gmp_90.yaml",
        "smc_baseline.yaml",
        "oneshot_obert.yaml",
        "cram_plus.yaml",
        "obert_block4_80_qat.yaml",
        "obert_block4_90_qat.yaml",
        "downstream_gmp_90_qat.yaml",
        "ptq.yaml",
        "qat.yaml",
    } <= names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_validate_exit_zero(path):
    result = CliRunner().invoke(main, ["validate", str(path)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith("ok: ")


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
@pytest.mark.parametrize("steps_per_epoch", [1, 7, 2105])
def test_plans_for_any_dataset_size(path, steps_per_epoch):
    for plan in resolve(load_recipe(path), steps_per_epoch):
        for mod in plan.by_type("gmp", "obert"):
            assert mod.sparsities[-1] == pytest.approx(mod.spec.final_sparsity)
            assert list(mod.pruning_steps) == sorted(set(mod.pruning_steps))
            assert mod.pruning_steps[-1] <= plan.total_steps


def test_target_sparsity_rescales_the_paper_recipe():
    path = next(p for p in RECIPES if p.name == "downstream_gmp_90.yaml")
    (p80,) = resolve(load_recipe(path, ["target_sparsity=0.8"]), 100)
    (p90,) = resolve(load_recipe(path), 100)
    (p97,) = resolve(load_recipe(path, ["target_sparsity=0.97"]), 100)
    steps = [len(p.by_type("gmp")[0].pruning_steps) for p in (p80, p90, p97)]
    assert steps[0] < steps[1] < steps[2]
    assert p80.total_steps < p90.total_steps < p97.total_steps
    # LR rewound at every pruning step but the last (where the final fine-tuning window starts).
    gmp = p90.by_type("gmp")[0]
    assert all(p90.lr_at(s) == pytest.approx(5e-5) for s in gmp.pruning_steps)


def test_smc_baseline_prunes_everything_without_kd_or_rewinding():
    recipe = load_recipe(next(p for p in RECIPES if p.name == "smc_baseline.yaml"))
    (plan,) = resolve(recipe, 100)
    assert not plan.by_type("distill") and not plan.by_type("lr")
    (gmp,) = plan.by_type("gmp")
    assert (gmp.window.start, gmp.window.end) == (100, 800)
    assert gmp.sparsities[0] == 0.0
    lrs = [plan.lr_at(s) for s in range(plan.total_steps)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))  # one monotone decay: no rewinding


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_apply_runs_every_bundled_recipe(path, tiny_model_dir, tmp_path, monkeypatch):
    """Each recipe end to end on a tiny model and 16 examples (one step per epoch): its own
    schedule, teacher and stages, only oBERT's gradient count lowered; the run ends at the
    recipe's last target sparsity."""
    import json

    monkeypatch.setenv("RECIPEC_CACHE", str(tmp_path / "cache"))  # a fresh teacher, trained here
    recipe = load_recipe(path)
    sets = ["num_grads=4"] if "num_grads" in recipe.variables else []
    out = tmp_path / "run"
    args = [
        "apply",
        str(path),
        "--model",
        str(tiny_model_dir),
        "--max-train",
        "16",
        "--max-eval",
        "8",
        "--output",
        str(out),
        *(a for s in sets for a in ("--set", s)),
    ]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    pruners = [
        m
        for stage in recipe.resolved_stages()
        for m in stage.modifiers
        if m.type in ("gmp", "obert")
    ]
    quantizes = any(m.type == "quantize" for s in recipe.resolved_stages() for m in s.modifiers)
    if path.stem in ("ptq", "qat"):  # INT8 of the (dense) tiny model: its zeros kept, none added
        assert report["sparsity"]["targets"] == 0.0
        assert report["stages"][0].get("prune_only", False) == (path.stem == "ptq")
    else:
        assert pruners, "every bundled recipe but ptq prunes"
        assert report["sparsity"]["targets"] == pytest.approx(pruners[-1].final_sparsity, abs=2e-3)
    assert [s["steps"] for s in report["stages"]] == [p.total_steps for p in resolve(recipe, 1)]
    assert (report.get("teacher") is not None) == any(
        m.type == "distill" for s in recipe.resolved_stages() for m in s.modifiers
    )
    assert ("quantization" in report) == quantizes
    assert (out / "model" / "quantization.json").is_file() == quantizes


QAT = [p for p in RECIPES if p.stem.endswith("_qat")]


@pytest.mark.parametrize("path", QAT, ids=lambda p: p.name)
@pytest.mark.parametrize("steps_per_epoch", [1, 7, 2105])
def test_qat_recipes_quantize_the_final_masks_with_kd(path, steps_per_epoch):
    """Pruning ends, fine-tuning at the target, then 2 epochs of QAT (observers frozen after
    the first) to the end of the run, with KD throughout and its own LR window."""
    (plan,) = resolve(load_recipe(path), steps_per_epoch)
    (pruner,) = plan.with_trait("schedules_sparsity")
    (quant,) = plan.by_type("quantize")
    (kd,) = plan.by_type("distill")
    assert quant.window.start >= pruner.pruning_steps[-1] + 2 * steps_per_epoch
    assert quant.window.end == plan.total_steps == quant.window.start + 2 * steps_per_epoch
    assert quant.freeze == quant.window.start + steps_per_epoch
    assert kd.window.start == 0 and kd.window.end == plan.total_steps
    (qat_lr,) = [m for m in plan.by_type("lr") if m.window.start == quant.window.start]
    assert plan.lr_at(quant.window.start) == qat_lr.spec.init_lr == pytest.approx(1e-5)
    assert quant.spec.calibration_batches == 64
    if "obert" in path.stem:
        assert pruner.spec.structure == "block4"
        assert pruner.spec.final_sparsity == (0.8 if "_80_" in path.stem else 0.9)


PAPER_KD = [p for p in RECIPES if p.stem.startswith(("downstream_gmp", "obert_", "quickstart"))]


@pytest.mark.parametrize("path", PAPER_KD, ids=lambda p: p.name)
def test_paper_recipes_distil_at_the_papers_temperature(path):
    """T = 5.5, hardness 1.0 ("How to Prune Your Language Model"); 2.0 stays one --set away."""

    def distill(overrides=()):
        recipe = load_recipe(path, overrides)
        (kd,) = [m for s in recipe.resolved_stages() for m in s.modifiers if m.needs_teacher]
        return kd

    assert (distill().temperature, distill().hardness) == (5.5, 1.0)
    assert distill(["kd_temperature=2.0"]).temperature == 2.0
    header = "".join(line for line in path.read_text().splitlines(True) if line.startswith("#"))
    assert "T = 5.5" in header  # the header says which paper setting it follows
