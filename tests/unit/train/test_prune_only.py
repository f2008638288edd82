"""Prune-only stages (``training.steps: 0``): one-shot pruning at step 0, no optimizer step."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from click.testing import CliRunner

from recipec.cli import main
from recipec.plan import PlanError, plan_to_dict, resolve, resolve_stage
from recipec.recipe.errors import RecipeError
from recipec.recipe.load import load_recipe_text
from recipec.recipe.schema import Recipe

ONE_SHOT_GMP = {"type": "gmp", "init_sparsity": 0.6, "final_sparsity": 0.6, "scope": "global"}


def _text(modifiers, training=None):
    return yaml.safe_dump(
        {"training": training or {"steps": 0}, "modifiers": modifiers}, sort_keys=False
    )


def test_a_prune_only_stage_prunes_once_at_step_zero():
    recipe = load_recipe_text(
        _text([ONE_SHOT_GMP, {"type": "constant", "targets": ["classifier"]}])
    )
    (plan,) = resolve(recipe, steps_per_epoch=7)
    assert plan.total_steps == 0 and plan.training.prune_only
    assert plan.pruning_events() == [(0, 0, 0.6)]
    stage = plan_to_dict([plan])["stages"][0]
    assert stage["prune_only"] is True and stage["lr"] == []
    # windows given as 0, in steps or in epochs, are the same one-shot step
    recipe = load_recipe_text(
        _text([dict(ONE_SHOT_GMP, start_epoch=0.0, end_step=0, update_every_steps=3)])
    )
    assert resolve(recipe, steps_per_epoch=7)[0].pruning_events() == [(0, 0, 0.6)]


def test_epochs_that_round_to_zero_steps_still_train_one_step():
    recipe = load_recipe_text(_text([], training={"epochs": 0.01}))
    assert resolve(recipe, steps_per_epoch=7)[0].total_steps == 1


def test_training_modifiers_and_later_windows_are_errors_with_their_lines():
    text = _text(
        [
            dict(ONE_SHOT_GMP, end_step=5, update_every_steps=1),
            {"type": "lr", "init_lr": 1e-4},
            {"type": "distill", "teacher": "t"},
            {"type": "cram", "sparsities": [0.5], "targets": ["pooler"]},
            {"type": "constant", "targets": ["classifier"], "start_epoch": 1.0},
        ]
    )
    with pytest.raises(RecipeError) as info:
        load_recipe_text(text, "r.yaml")
    got = [(p.path, p.location.line) for p in info.value.problems]
    lines = text.splitlines()
    want = [
        ("modifiers.0.end_step", next(i for i, t in enumerate(lines, 1) if "end_step" in t)),
        ("modifiers.1.type", next(i for i, t in enumerate(lines, 1) if "type: lr" in t)),
        ("modifiers.2.type", next(i for i, t in enumerate(lines, 1) if "type: distill" in t)),
        ("modifiers.3.type", next(i for i, t in enumerate(lines, 1) if "type: cram" in t)),
        ("modifiers.4.start_epoch", next(i for i, t in enumerate(lines, 1) if "start_epoch" in t)),
    ]
    assert got == want
    assert all("prune-only stage (training.steps: 0)" in p.message for p in info.value.problems)


def test_the_planner_rechecks_recipes_built_in_python():
    recipe = Recipe.model_validate(
        {"training": {"steps": 0}, "modifiers": [{"type": "lr", "init_lr": 1e-4}]}
    )
    with pytest.raises(PlanError, match=r"modifiers.0.type: a prune-only stage .* lr modifier"):
        resolve_stage(recipe, recipe.resolved_stages()[0], 5)


def test_only_the_stage_with_steps_zero_is_prune_only():
    recipe = load_recipe_text(
        yaml.safe_dump(
            {
                "training": {"epochs": 1},
                "stages": [
                    {"name": "train", "modifiers": [{"type": "lr", "init_lr": 1e-4}]},
                    {"name": "prune", "training": {"steps": 0}, "modifiers": [ONE_SHOT_GMP]},
                ],
            }
        )
    )
    train, prune = resolve(recipe, steps_per_epoch=4)
    assert (train.total_steps, prune.total_steps) == (4, 0)
    with pytest.raises(RecipeError, match=r"stages.1.modifiers.0.type: a prune-only stage"):
        load_recipe_text(
            yaml.safe_dump(
                {
                    "training": {"epochs": 1},
                    "stages": [
                        {"name": "prune", "training": {"steps": 0}, "modifiers": []},
                        {
                            "name": "p2",
                            "training": {"steps": 0},
                            "modifiers": [{"type": "lr", "init_lr": 1e-4}],
                        },
                    ],
                }
            )
        )


def test_plan_cli_prints_and_plots_it(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(_text([ONE_SHOT_GMP]))
    plot = tmp_path / "plan.png"
    result = CliRunner().invoke(main, ["plan", str(recipe), "--plot", str(plot)])
    assert result.exit_code == 0, result.output
    assert "prune-only (training.steps: 0): one-shot pruning at step 0" in result.output
    assert "step       0: sparsity  60.00%" in result.output and "lr" not in result.output
    assert plot.stat().st_size > 0
    result = CliRunner().invoke(main, ["validate", str(recipe)])
    assert result.exit_code == 0 and "main: prune-only, gmp" in result.output


def _apply(recipe_text: str, model_dir, out, *extra: str):
    path = out.parent / f"{out.name}.yaml"
    path.write_text(recipe_text)
    result = CliRunner().invoke(
        main,
        [
            "apply",
            str(path),
            "--model",
            str(model_dir),
            "--max-train",
            "40",
            "--max-eval",
            "24",
            "--output",
            str(out),
            *extra,
        ],
    )
    assert result.exit_code == 0, result.output
    return result.output, json.loads((out / "report.json").read_text())


def test_apply_changes_nothing_but_the_pruned_weights(tiny_model_dir, tmp_path):
    """Global magnitude at 60%, once: exactly the smallest 60% of the target weights become zero,
    every other value of the model (kept weights, embeddings, biases, head) stays bit-identical."""
    from safetensors.torch import load_file
    from transformers import AutoModelForSequenceClassification

    out = tmp_path / "run"
    output, report = _apply(
        _text([ONE_SHOT_GMP], {"steps": 0, "batch_size": 8, "max_seq_length": 32}),
        tiny_model_dir,
        out,
    )
    before = dict(
        AutoModelForSequenceClassification.from_pretrained(tiny_model_dir).named_parameters()
    )
    after = dict(
        AutoModelForSequenceClassification.from_pretrained(out / "model").named_parameters()
    )
    masks = load_file(str(out / "model" / "masks.safetensors"))
    assert masks, "no tensor was pruned"
    scores = torch.cat([before[n].detach().abs().flatten() for n in masks])
    k = round(0.6 * scores.numel())
    threshold = scores.sort().values[k - 1]
    for name, param in after.items():
        old = before[name].detach()
        if name in masks:
            keep = old.abs() > threshold
            assert torch.equal(masks[name].bool(), keep), name
            assert torch.equal(param.detach(), old * keep), name
        else:
            assert torch.equal(param.detach(), old), name
    (stage,) = report["stages"]
    assert stage["steps"] == 0 and stage["prune_only"] is True
    assert set(stage["eval_before_pruning"]) == set(report["final_eval"])
    assert report["sparsity"]["targets"] == k / scores.numel()
    assert "accuracy" in output and "before pruning" in output
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r.get("sparsity") for r in records] == [0.0, k / scores.numel(), k / scores.numel()]
    assert not any("loss" in r for r in records)  # no training step was taken
    assert "prune-only (one-shot)" in (out / "report.md").read_text()


def test_a_distilling_stage_after_a_prune_only_stage_gets_a_trained_teacher(
    tiny_model_dir, tmp_path, monkeypatch
):
    """The auto teacher trains as long as the stage that distils, not the prune-only stage before it."""
    monkeypatch.setenv("RECIPEC_CACHE", str(tmp_path / "cache"))
    text = yaml.safe_dump(
        {
            "training": {"batch_size": 8, "max_seq_length": 32, "learning_rate": 1e-3},
            "stages": [
                {"name": "prune", "training": {"steps": 0}, "modifiers": [ONE_SHOT_GMP]},
                {
                    "name": "recover",
                    "training": {"epochs": 2},
                    "modifiers": [
                        {"type": "constant"},
                        {"type": "distill", "teacher": "auto", "hardness": 0.5},
                    ],
                },
            ],
        }
    )
    _, report = _apply(text, tiny_model_dir, tmp_path / "run")
    assert report["teacher"]["steps"] == 2 * 5  # 40 examples / batch 8 = 5 steps per epoch
    assert [s["steps"] for s in report["stages"]] == [0, 10]
    assert report["sparsity"]["targets"] == pytest.approx(
        0.6, abs=1e-4
    )  # the constant stage kept the zeros


def test_oneshot_obert_after_training(tiny_model_dir, tmp_path, monkeypatch):
    """The prune-only stage reuses the training stage's final evaluation as its "before"."""
    from recipec.train import loop

    calls = []
    real = loop.evaluate
    monkeypatch.setattr(loop, "evaluate", lambda *a, **k: calls.append(1) or real(*a, **k))
    text = yaml.safe_dump(
        {
            "training": {"batch_size": 8, "max_seq_length": 32},
            "stages": [
                {"name": "train", "training": {"steps": 3}},
                {
                    "name": "prune",
                    "training": {"steps": 0},
                    "modifiers": [
                        {
                            "type": "obert",
                            "init_sparsity": 0.5,
                            "final_sparsity": 0.5,
                            "num_grads": 4,
                            "grad_batch_size": 4,
                            "fisher_block_size": 16,
                        }
                    ],
                },
            ],
        }
    )
    output, report = _apply(text, tiny_model_dir, tmp_path / "run")
    assert [s["steps"] for s in report["stages"]] == [3, 0]
    assert report["sparsity"]["targets"] == pytest.approx(0.5, abs=1e-4)
    assert "obert[0]: step 0: pruned to 50.00%" in output
    assert report["stages"][1]["eval_before_pruning"] == report["stages"][0]["final_eval"]
    assert len(calls) == 2  # the end of training, then after pruning: not the same model twice


def test_ctrl_c_during_the_one_shot_pruning_keeps_it_and_resume_finishes(
    tiny_model_dir, tmp_path, monkeypatch
):
    import os
    import signal

    from recipec.program import Program

    real = Program.step_start

    def pressed(self, step):  # Ctrl-C arrives while the stage prunes
        os.kill(os.getpid(), signal.SIGINT)
        return real(self, step)

    recipe = tmp_path / "r.yaml"
    recipe.write_text(_text([ONE_SHOT_GMP], {"steps": 0, "batch_size": 8, "max_seq_length": 32}))
    out = tmp_path / "run"
    args = [
        "apply",
        str(recipe),
        "--model",
        str(tiny_model_dir),
        "--max-train",
        "40",
        "--max-eval",
        "24",
        "--output",
        str(out),
    ]
    monkeypatch.setattr(Program, "step_start", pressed)
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 130, result.output
    assert "after its one-shot pruning; checkpoint saved" in result.output
    assert not (out / "model").exists()
    monkeypatch.setattr(Program, "step_start", real)
    result = CliRunner().invoke(main, [*args, "--resume"])
    assert result.exit_code == 0, result.output
    assert "pruned to" not in result.output  # the pruning is not run again
    report = json.loads((out / "report.json").read_text())
    assert report["sparsity"]["targets"] == pytest.approx(0.6, abs=1e-4)
    assert report["stages"][0]["eval_before_pruning"]["accuracy"] is not None


def test_zero_epochs_points_to_steps_zero_and_inherited_steps_are_named():
    with pytest.raises(
        RecipeError, match=r"training.epochs: epochs must be greater than 0; .* write steps: 0"
    ):
        load_recipe_text(_text([], training={"epochs": 0}), "r.yaml")
    text = "training:\n  steps: 0\nstages:\n  - name: a\n    modifiers:\n      - {type: lr, init_lr: 1.0e-4}\n"
    with pytest.raises(RecipeError) as info:
        load_recipe_text(text, "r.yaml")
    (problem,) = info.value.problems
    assert (problem.path, problem.location.line) == ("stages.0.modifiers.0.type", 6)
    assert problem.message.endswith("(stage 'a' inherits training.steps: 0 from line 2)")
