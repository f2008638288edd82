"""What --resume may change (recipec.train.runfolder): learning rates, directly or through
variables that feed nothing else; anything else is refused, naming the field."""

from __future__ import annotations

import pytest

from recipec.recipe.load import load_recipe_text
from recipec.train.run import _dump_recipe
from recipec.train.runfolder import RunFolderError, resume_changes

RECIPE = """\
variables: {lr_max: 1.0e-3, target: 0.6, shared: 2.0}
training: {steps: 8, batch_size: 8, learning_rate: "${lr_max}"}
modifiers:
  - {type: gmp, init_sparsity: 0.3, final_sparsity: "${target}", start_step: 2, end_step: 6}
  - {type: lr, schedule: linear, init_lr: "${lr_max}", final_lr: "${shared / 1e4}", start_step: 4}
  - {type: distill, teacher: auto, temperature: "${shared}"}
"""
STAGED = """\
training: {steps: 8, batch_size: 8}
stages:
  - name: dense
    training: {steps: 4, learning_rate: 1.0e-3}
    modifiers: [{type: lr, schedule: constant, init_lr: 1.0e-3}]
  - name: prune
    modifiers: [{type: gmp, init_sparsity: 0.3, final_sparsity: 0.6, start_step: 0, end_step: 4}]
"""


def _asked(text, *overrides, **asked):
    recipe = load_recipe_text(text, overrides=list(overrides))
    return {"recipe": _dump_recipe(recipe), "model": "m", "max_train": 32, **asked}


@pytest.mark.parametrize(
    ("text", "overrides", "fields"),
    [
        (
            RECIPE,
            ["lr_max=5e-4"],
            ["variables.lr_max", "training.learning_rate", "modifiers.1.init_lr"],
        ),
        (RECIPE, ["training.learning_rate=2e-4"], ["training.learning_rate"]),
        (RECIPE, ["modifiers.1.final_lr=0"], ["modifiers.1.final_lr"]),
        (STAGED, ["stages.0.training.learning_rate=5e-4"], ["stages.0.training.learning_rate"]),
        (STAGED, ["stages.0.modifiers.0.init_lr=5e-4"], ["stages.0.modifiers.0.init_lr"]),
    ],
    ids=["variable", "training", "final_lr", "stage-training", "stage-lr-modifier"],
)
def test_learning_rates_may_change_on_resume(tmp_path, text, overrides, fields):
    changes = resume_changes(tmp_path, _asked(text), _asked(text, *overrides))
    assert [c["field"] for c in changes] == fields


@pytest.mark.parametrize(
    ("overrides", "asked", "named"),
    [
        (["target=0.7"], {}, "recipe field modifiers.0.final_sparsity (0.6 then, 0.7 now)"),
        # a variable that feeds a learning rate and something else
        (["shared=3.0"], {}, "recipe field modifiers.2.temperature (2.0 then, 3.0 now)"),
        (["training.batch_size=4"], {}, "recipe field training.batch_size (8 then, 4 now)"),
        ([], {"model": "other"}, "--model ('m' then, 'other' now)"),
        ([], {"max_train": 64}, "--max-train (32 then, 64 now)"),
    ],
    ids=["sparsity-variable", "shared-variable", "batch-size", "model", "max-train"],
)
def test_anything_else_is_refused_naming_what_differs(tmp_path, overrides, asked, named):
    with pytest.raises(RunFolderError) as info:
        resume_changes(tmp_path, _asked(RECIPE), _asked(RECIPE, *overrides, **asked))
    assert named in str(info.value) and "only learning rates may change" in str(info.value)


def test_changes_are_reported_against_the_last_session(tmp_path):
    """A second resume with the same --set changes nothing new; one without it goes back (and
    says so): the recipe given is the recipe that runs."""
    before = _asked(RECIPE)
    lowered = _asked(RECIPE, "lr_max=5e-4")
    before["recipe_now"] = lowered["recipe"]
    assert resume_changes(tmp_path, before, lowered) == []
    back = resume_changes(tmp_path, before, _asked(RECIPE))
    assert {c["field"]: (c["was"], c["now"]) for c in back}["modifiers.1.init_lr"] == (5e-4, 1e-3)
